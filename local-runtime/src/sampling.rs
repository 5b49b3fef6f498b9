//! Sampling: turning one position's logits into the next token, OpenAI semantics.
//!
//! Order: logit_bias, then presence/frequency penalties over the generated tokens,
//! then temperature. `temperature == 0` is plain greedy (argmax, lowest id on ties) and
//! ignores top_k/top_p/min_p and the seed. Otherwise softmax, then top_k (0 = off),
//! top_p (1 = off), min_p (0 = off), then one draw from a per-request `StdRng`: the same
//! seed and the same logits give the same tokens; without a seed one is drawn at random.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::RuntimeError;

/// Validated-on-submit sampling parameters for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0..=2; 0 is greedy.
    pub temperature: f32,
    /// (0, 1]; 1 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// [0, 1]; 0 disables.
    pub min_p: f32,
    pub seed: Option<u64>,
    /// [-2, 2]; subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// [-2, 2]; subtracted once per earlier occurrence.
    pub frequency_penalty: f32,
    /// Token id -> bias in [-100, 100], added to its logit.
    pub logit_bias: HashMap<u32, f32>,
    /// At least 1.
    pub max_tokens: usize,
    /// At most 4 non-empty strings.
    pub stop: Vec<String>,
    /// `Some(k)`: report each sampled token's log-probability and the `k` (0..=20)
    /// most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            max_tokens: 256,
            stop: Vec::new(),
            logprobs: None,
        }
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidParam {
        param,
        message: message.into(),
    }
}

fn check_range(param: &'static str, v: f32, lo: f32, hi: f32) -> Result<(), RuntimeError> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(invalid(param, format!("{v} is not within [{lo}, {hi}]")))
    }
}

impl SamplingParams {
    /// Checks every range; `vocab_size` bounds the `logit_bias` keys.
    pub fn validate(&self, vocab_size: usize) -> Result<(), RuntimeError> {
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        if self.top_p == 0.0 {
            return Err(invalid("top_p", "must be greater than 0"));
        }
        check_range("min_p", self.min_p, 0.0, 1.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        for (&id, &bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(invalid(
                    "logit_bias",
                    format!("token {id} is outside the vocabulary of {vocab_size}"),
                ));
            }
            check_range("logit_bias", bias, -100.0, 100.0)?;
        }
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        if self.stop.len() > 4 {
            return Err(invalid("stop", "at most 4 stop sequences"));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop sequences must not be empty"));
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(invalid(
                "top_logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives"),
            ));
        }
        Ok(())
    }
}

/// Most alternatives `logprobs` reports per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A sampled token's log-probability under the model (before bias, penalties and
/// temperature) and the most likely alternatives, highest first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax view of one position's raw logits.
#[derive(Debug, Clone)]
pub struct Logprobs {
    log_sum_exp: f32,
    top: Vec<(u32, f32)>,
}

impl Logprobs {
    /// Summarizes `logits` (unmodified) keeping the `k` largest.
    pub fn new(logits: &[f32], k: usize) -> Logprobs {
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits
            .iter()
            .filter(|l| !l.is_nan())
            .map(|&l| f64::from(l - max).exp())
            .sum();
        let log_sum_exp = max + sum.ln() as f32;
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if k > 0 && k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
        } else {
            idx.truncate(k);
        }
        idx.sort_by(by_logit);
        let top = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - log_sum_exp))
            .collect();
        Logprobs { log_sum_exp, top }
    }

    /// The entry for the sampled `token`, whose raw logit was `logit`.
    pub fn for_token(self, token: u32, logit: f32) -> TokenLogprob {
        TokenLogprob {
            token,
            logprob: logit - self.log_sum_exp,
            top: self.top,
        }
    }
}

/// One request's sampler: its parameters and its RNG.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            counts: HashMap::new(),
        }
    }

    /// Picks the next token. `logits` is modified in place; `generated` is every
    /// token this request has produced so far (penalties apply to those only).
    pub fn sample(&mut self, logits: &mut [f32], generated: &[u32]) -> u32 {
        let p = &self.params;
        for (&id, &bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            self.counts.clear();
            for &t in generated {
                *self.counts.entry(t).or_insert(0) += 1;
            }
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, f64::from(l) / f64::from(p.temperature)))
            .collect();
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f64::NEG_INFINITY, f64::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        for c in &mut candidates {
            c.1 = (c.1 - max).exp();
        }
        // Highest probability first, lowest id on ties: deterministic order.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            candidates.truncate(p.top_k);
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1 / total;
                if cumulative >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = candidates.first().map_or(0.0, |c| c.1) * f64::from(p.min_p);
            candidates.retain(|c| c.1 >= floor);
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.random::<f64>() * total;
        for c in &candidates {
            if draw < c.1 {
                return c.0;
            }
            draw -= c.1;
        }
        candidates.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// The id of the largest logit; the lowest such id on ties; NaN never wins (0 when
/// nothing beats -inf).
///
/// Sixteen running maxima with their first ids, one per lane of a 16-logit chunk, so
/// the loop compiles to vector compares and blends (a vocabulary of 49k-262k logits
/// per sequence per step, on the engine's thread); then the lanes' best, lowest id
/// on ties. Same answer as the one-at-a-time scan [`argmax_scan`].
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut value = [f32::NEG_INFINITY; LANES];
    let mut id = [0u32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let base = (c * LANES) as u32;
        for j in 0..LANES {
            // Strict: a lane keeps its first id among equal values; NaN never wins.
            let better = chunk[j] > value[j];
            value[j] = if better { chunk[j] } else { value[j] };
            id[j] = if better { base + j as u32 } else { id[j] };
        }
    }
    let (mut best, mut best_value) = (0u32, f32::NEG_INFINITY);
    for (&v, &i) in value.iter().zip(&id) {
        if v > best_value || (v == best_value && v > f32::NEG_INFINITY && i < best) {
            (best, best_value) = (i, v);
        }
    }
    let start = logits.len() - tail.len();
    for (k, &l) in tail.iter().enumerate() {
        if l > best_value {
            (best, best_value) = ((start + k) as u32, l);
        }
    }
    best
}

/// [`argmax`] one logit at a time: the reference its tests compare against.
#[cfg(test)]
fn argmax_scan(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best = i;
            best_value = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn draw(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p.clone());
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    const PEAKED: [f32; 5] = [1.0, 3.0, 2.5, 0.5, 3.0];

    /// The lane-parallel argmax equals the one-at-a-time scan: ties (lowest id),
    /// NaN, infinities, all -inf, every length around the 16-lane chunks.
    #[test]
    fn argmax_equals_the_scan() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as u32
        };
        let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -0.0, 0.0];
        for len in (0..70).chain([1000, 49_152, 49_153]) {
            for round in 0..20 {
                let logits: Vec<f32> = (0..len)
                    .map(|_| match next() % 16 {
                        0 if round % 4 == 0 => specials[next() as usize % specials.len()],
                        // Few distinct values: many ties.
                        _ => (next() % 7) as f32 - 3.0,
                    })
                    .collect();
                assert_eq!(argmax(&logits), argmax_scan(&logits), "{logits:?}");
            }
        }
        let none = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(argmax(&none), 0);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        let mut late = vec![1.0f32; 40];
        late[37] = 2.0;
        late[21] = 2.0;
        assert_eq!(argmax(&late), 21);
    }

    #[test]
    fn greedy_is_deterministic_and_breaks_ties_low() {
        let p = SamplingParams {
            temperature: 0.0,
            ..params()
        };
        assert_eq!(draw(&p, &PEAKED, 10), vec![1; 10]);
    }

    #[test]
    fn same_seed_same_output_different_seeds_differ() {
        let flat = [0.0f32; 64];
        let p = |seed| SamplingParams {
            seed: Some(seed),
            ..params()
        };
        assert_eq!(draw(&p(7), &flat, 32), draw(&p(7), &flat, 32));
        assert_ne!(draw(&p(7), &flat, 32), draw(&p(8), &flat, 32));
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let p = SamplingParams {
            top_k: 1,
            seed: Some(1),
            ..params()
        };
        assert_eq!(draw(&p, &PEAKED, 20), vec![1; 20]);
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [10.0f32, 0.0, 0.0, 0.0];
        for p in [
            SamplingParams {
                top_p: 0.5,
                seed: Some(3),
                ..params()
            },
            SamplingParams {
                min_p: 0.1,
                seed: Some(3),
                ..params()
            },
        ] {
            assert_eq!(draw(&p, &logits, 50), vec![0; 50]);
        }
    }

    #[test]
    fn zero_penalties_change_nothing() {
        let mut logits = PEAKED.to_vec();
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        assert_eq!(s.sample(&mut logits, &[1, 1, 1, 4]), 1);
        assert_eq!(logits, PEAKED.to_vec());
    }

    #[test]
    fn penalties_lower_repeated_tokens() {
        let base = SamplingParams {
            temperature: 0.0,
            ..params()
        };
        let mut logits = PEAKED.to_vec();
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.5,
            ..base.clone()
        });
        // token 1 seen twice: 3.0 - 1.0 = 2.0 < token 4's 3.0.
        assert_eq!(s.sample(&mut logits, &[1, 1]), 4);
        assert_eq!(logits[1], 2.0);
        let mut logits = PEAKED.to_vec();
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.0,
            ..base
        });
        assert_eq!(s.sample(&mut logits, &[1, 1, 4]), 2);
        assert_eq!(logits[1], 2.0);
        assert_eq!(logits[4], 2.0);
    }

    #[test]
    fn logit_bias_forces_and_excludes() {
        let force = SamplingParams {
            logit_bias: HashMap::from([(3, 100.0)]),
            seed: Some(5),
            ..params()
        };
        assert_eq!(draw(&force, &PEAKED, 20), vec![3; 20]);
        let exclude = SamplingParams {
            temperature: 0.0,
            logit_bias: HashMap::from([(1, -100.0), (4, -100.0)]),
            ..params()
        };
        assert_eq!(draw(&exclude, &PEAKED, 3), vec![2; 3]);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = [
            (
                "temperature",
                SamplingParams {
                    temperature: 2.5,
                    ..params()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.0,
                    ..params()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: f32::NAN,
                    ..params()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: -3.0,
                    ..params()
                },
            ),
            (
                "frequency_penalty",
                SamplingParams {
                    frequency_penalty: 2.1,
                    ..params()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: HashMap::from([(99, 1.0)]),
                    ..params()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: HashMap::from([(1, 101.0)]),
                    ..params()
                },
            ),
            (
                "max_tokens",
                SamplingParams {
                    max_tokens: 0,
                    ..params()
                },
            ),
            (
                "stop",
                SamplingParams {
                    stop: vec![String::new()],
                    ..params()
                },
            ),
        ];
        for (name, p) in bad {
            match p.validate(10) {
                Err(RuntimeError::InvalidParam { param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(params().validate(10), Ok(()));
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_alternatives_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NAN];
        let lp = Logprobs::new(&logits, 3);
        let t = lp.for_token(2, 2.0);
        let total: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        assert!((f64::from(t.logprob) - (2.0 - total.ln())).abs() < 1e-5);
        // Highest first, lowest id on ties.
        let ids: Vec<u32> = t.top.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let mass: f64 = t.top.iter().map(|(_, l)| f64::from(*l).exp()).sum();
        assert!(mass < 1.0 && mass > 0.9);
        assert!(Logprobs::new(&logits, 0).for_token(0, 1.0).top.is_empty());
        let mut p = params();
        p.logprobs = Some(MAX_TOP_LOGPROBS + 1);
        assert!(p.validate(10).is_err());
    }
}
