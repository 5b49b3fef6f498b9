//! What the real-model tests share: llama.cpp reference fixtures
//! (`fixtures/<family>_tokens.json`, written by `scripts/make-llamacpp-fixture.py`
//! with llama-cpp-python) and the checks against them.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use airlock_models::{EncodeOptions, LanguageModel, Tokenizer};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Fixture {
    pub tokens: Vec<TokenCase>,
    pub greedy: Vec<GreedyCase>,
    pub loglik: Loglik,
}

/// llama.cpp's log-probability of each token of a fixed text given the ones before.
#[derive(Debug, Deserialize)]
pub struct Loglik {
    pub ids: Vec<u32>,
    /// For `ids[1..]`.
    pub logprobs: Vec<f64>,
    pub mean: f64,
}

#[derive(Debug, Deserialize)]
pub struct TokenCase {
    pub text: String,
    pub add_bos: bool,
    pub special: bool,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct GreedyCase {
    pub question: String,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    /// llama.cpp's best-minus-second logit at each step.
    pub margins: Vec<f32>,
    /// The 20 best `(id, logit)` of the first step.
    pub top_logits: Vec<(u32, f32)>,
    pub text: String,
}

/// Reads `tests/fixtures/<family>_tokens.json`.
pub fn load_fixture(family: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/{family}_tokens.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every fixture case encodes to llama.cpp's ids.
pub fn assert_tokenizer_matches(tok: &Tokenizer, fixture: &Fixture) {
    let mut mismatches = Vec::new();
    for case in &fixture.tokens {
        let options = EncodeOptions {
            add_special: case.add_bos,
            parse_special: case.special,
        };
        let got = tok.encode(&case.text, options);
        if got != case.ids {
            mismatches.push(format!(
                "{:?} (bos {}, special {}):\n  ours      {got:?}\n  llama.cpp {:?}",
                case.text, case.add_bos, case.special, case.ids
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(fixture.tokens.len() >= 20);
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in logits.iter().enumerate() {
        if *x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of the cached sequence: up to `n` tokens, the end token
/// included when one comes.
pub fn greedy(
    model: &mut dyn LanguageModel,
    mut logits: Vec<f32>,
    n: usize,
    ends: &[u32],
) -> Vec<u32> {
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        if ends.contains(&next) {
            break;
        }
        let pos = model.cached_tokens();
        logits = model.forward(&[next], pos).unwrap();
    }
    out
}

/// Runs every fixture prompt greedily and compares with llama.cpp. A prompt agrees
/// when its whole continuation is llama.cpp's; a prompt that leaves llama.cpp's path
/// within the first `must_agree` tokens must do so at a near tie (llama.cpp's margin
/// below `near_tie` at or before that step). Returns how many prompts agree in full.
pub fn check_greedy(
    model: &mut dyn LanguageModel,
    fixture: &Fixture,
    ends: &[u32],
    must_agree: usize,
    near_tie: f32,
) -> usize {
    let (mut steps, mut seconds, mut whole) = (0usize, 0f64, 0usize);
    for case in &fixture.greedy {
        model.reset();
        let logits = model.forward(&case.prompt_ids, 0).unwrap();
        let start = Instant::now();
        let ours = greedy(model, logits, case.ids.len(), ends);
        seconds += start.elapsed().as_secs_f64();
        steps += ours.len().saturating_sub(1);
        let common = ours
            .iter()
            .zip(&case.ids)
            .take_while(|(a, b)| a == b)
            .count();
        if common == case.ids.len() {
            whole += 1;
        }
        let text = model.tokenizer().decode(&ours, true);
        eprintln!(
            "{:?}: {common}/{} tokens as llama.cpp\n  ours      {text:?}\n  llama.cpp {:?}",
            case.question,
            case.ids.len(),
            case.text
        );
        if common < case.ids.len().min(must_agree) {
            let margin = case.margins[common];
            assert!(
                case.margins[..=common].iter().any(|m| *m < near_tie),
                "{:?} leaves llama.cpp at step {common} where its margin is {margin}: \
                 ours {ours:?}, llama.cpp {:?}",
                case.question,
                case.ids
            );
        }
    }
    eprintln!(
        "{whole}/{} prompts as llama.cpp; decode {steps} tokens in {seconds:.2} s ({:.1} tok/s, one stream)",
        fixture.greedy.len(),
        steps as f64 / seconds
    );
    model.reset();
    whole
}

/// `log softmax(logits)[id]`, in `f64`.
pub fn logprob(logits: &[f32], id: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[id as usize] as f64 - max - sum.ln()
}

/// Our mean log-likelihood per token of the fixture's text (the text fed one token
/// at a time), beside llama.cpp's; fails unless within `tolerance` (relative).
pub fn check_loglik(model: &mut dyn LanguageModel, fixture: &Fixture, tolerance: f64) -> f64 {
    let ids = &fixture.loglik.ids;
    model.reset();
    let mut logits = model.forward(&ids[..1], 0).unwrap();
    let mut ours = Vec::with_capacity(ids.len() - 1);
    for (i, &id) in ids.iter().enumerate().skip(1) {
        ours.push(logprob(&logits, id));
        if i + 1 < ids.len() {
            logits = model.forward(&[id], i).unwrap();
        }
    }
    model.reset();
    let mean = ours.iter().sum::<f64>() / ours.len() as f64;
    let theirs = fixture.loglik.mean;
    let worst = ours
        .iter()
        .zip(&fixture.loglik.logprobs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let relative = ((mean - theirs) / theirs).abs();
    eprintln!(
        "mean log-likelihood ours {mean:.5}, llama.cpp {theirs:.5} ({:.3}% apart; worst token {worst:.4} nats)",
        relative * 100.0
    );
    assert!(
        relative <= tolerance,
        "mean log-likelihood {mean} vs llama.cpp {theirs}: {:.3}% apart",
        relative * 100.0
    );
    relative
}

/// The largest difference between our first-step logits and llama.cpp's 20 best,
/// over every greedy prompt; fails above `tolerance`.
pub fn check_first_logits(model: &mut dyn LanguageModel, fixture: &Fixture, tolerance: f32) -> f32 {
    let mut worst = 0f32;
    for case in &fixture.greedy {
        model.reset();
        let logits = model.forward(&case.prompt_ids, 0).unwrap();
        for &(id, theirs) in &case.top_logits {
            worst = worst.max((logits[id as usize] - theirs).abs());
        }
    }
    model.reset();
    eprintln!("first-step logits: at most {worst:.4} from llama.cpp's 20 best");
    assert!(worst <= tolerance, "logits {worst} from llama.cpp's");
    worst
}

/// Three sequences at different stages (a long prefill chunk, a short prompt, one
/// decoding) run in one [`airlock_models::forward_batch`] give the logits each gives
/// alone.
pub fn check_batch_equals_alone(model: &dyn LanguageModel, prompt: &[u32]) {
    let fork = || model.fork().expect("the model forks");
    let (mut a, mut b, mut c) = (fork(), fork(), fork());
    // c has already decoded a few tokens; a and b start now.
    c.forward(&prompt[..5], 0).unwrap();
    c.forward(&prompt[5..6], 5).unwrap();
    let inputs: [&[u32]; 3] = [prompt, &prompt[..3], &prompt[6..7]];
    let alone: Vec<Vec<f32>> = {
        let (mut a2, mut b2, mut c2) = (fork(), fork(), fork());
        c2.forward(&prompt[..6], 0).unwrap();
        vec![
            a2.forward(inputs[0], 0).unwrap(),
            b2.forward(inputs[1], 0).unwrap(),
            c2.forward(inputs[2], 6).unwrap(),
        ]
    };
    let mut models: Vec<&mut (dyn LanguageModel + 'static)> =
        vec![a.as_mut(), b.as_mut(), c.as_mut()];
    let together = airlock_models::forward_batch(&mut models, &inputs);
    for (i, (t, alone)) in together.into_iter().zip(&alone).enumerate() {
        let t = t.unwrap();
        let worst = t
            .iter()
            .zip(alone)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-3,
            "sequence {i}: batched logits {worst} from alone"
        );
        assert_eq!(argmax(&t), argmax(alone));
    }
    assert_eq!(a.cached_tokens(), prompt.len());
    assert_eq!(b.cached_tokens(), 3);
    assert_eq!(c.cached_tokens(), 7);
}
