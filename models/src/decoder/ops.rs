//! The element-wise and per-head operations of a decoder step, on plain `f32` slices,
//! each computed the way ggml's CPU backend computes it so our logits track
//! llama.cpp's: RMS norm sums squares in `f64` and scales before multiplying by the
//! weight; rotary angles are built by repeated multiplication in `f32`
//! (`ggml_rope_cache_init`); softmax sums in `f64`; GELU goes through half
//! precision like ggml's `GGML_GELU_FP16` table; attention rounds Q, K, V and the
//! probabilities to half precision, as llama.cpp's F16 KV cache and its `mul_mat`
//! over F16 tensors do (unless the model is loaded with an F32 cache,
//! [`crate::KvCachePrecision`]).
//!
//! Invariants: no function allocates except [`RopeTable::new`]; slice lengths are the
//! caller's contract (checked with `debug_assert!`).

use half::f16;

use super::config::RopeLayout;

/// `x` rounded to half precision and back (what storing in an F16 tensor does).
#[inline]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `out = x / rms(x) * weight` (ggml `rms_norm` then `mul`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    debug_assert_eq!(x.len(), out.len());
    let sum: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// [`rms_norm`] in place.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), weight.len());
    let sum: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
}

/// SiLU-gated product `out = silu(gate) * up` (ggml `swiglu`).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn gelu_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// GELU (tanh)-gated product `out = gelu(gate) * up` (ggml `geglu`): inside
/// (-10, 10) the input is rounded to half precision and the result read back as half
/// precision, as ggml's lookup table does.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            round_f16(gelu_f32(round_f16(x)))
        };
        *g = y * u;
    }
}

/// cos/sin of the rotary angles of some positions, `head_dim / 2` pairs each.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    pairs: usize,
    /// `[cos, sin]` per pair, position after position.
    values: Vec<[f32; 2]>,
}

impl RopeTable {
    /// Angles of `positions` for heads of `head_dim` with `base` and `freq_scale`.
    pub fn new(positions: &[usize], head_dim: usize, base: f32, freq_scale: f32) -> RopeTable {
        Self::with_factors(positions, head_dim, base, freq_scale, &[])
    }

    /// [`RopeTable::new`] with per-pair frequency factors dividing the angles (Llama 3's
    /// `rope_freqs`); an empty `factors` means none.
    pub fn with_factors(
        positions: &[usize],
        head_dim: usize,
        base: f32,
        freq_scale: f32,
        factors: &[f32],
    ) -> RopeTable {
        let pairs = head_dim / 2;
        let theta_scale = base.powf(-2.0 / head_dim as f32);
        let mut values = Vec::with_capacity(positions.len() * pairs);
        for &p in positions {
            let mut theta = p as f32;
            for i in 0..pairs {
                let factor = factors.get(i).copied().unwrap_or(1.0);
                let angle = freq_scale * (theta / factor);
                values.push([angle.cos(), angle.sin()]);
                theta *= theta_scale;
            }
        }
        RopeTable { pairs, values }
    }

    /// Rotates each head of `x` (`heads * head_dim` values) as row `row`.
    pub fn apply(&self, layout: RopeLayout, row: usize, x: &mut [f32], head_dim: usize) {
        let table = &self.values[row * self.pairs..(row + 1) * self.pairs];
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &[cos, sin]) in table.iter().enumerate() {
                let (a, b) = match layout {
                    RopeLayout::Normal => (2 * i, 2 * i + 1),
                    RopeLayout::Neox => (i, i + self.pairs),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// Softmax of `scores` in place (ggml `soft_max`: max, exp, sum in `f64`, scale).
pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for s in scores.iter_mut() {
        let e = if *s == f32::NEG_INFINITY {
            0.0
        } else {
            (*s - max).exp()
        };
        sum += f64::from(e);
        *s = e;
    }
    let inv = (1.0 / sum) as f32;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// Dot product of two equal-length slices with eight partial sums (vectorizes).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

/// One query head attending over the cached keys and values.
///
/// With `half`, the query and the attention weights are rounded to half precision
/// (the keys and values were when cached), as llama.cpp's `mul_mat` over an F16 KV
/// cache does. `q` is the head's query, `keys`/`values` hold
/// `n` rows of `stride` values whose `offset..offset + head_dim` slice belongs to
/// this head; `scores` is scratch of at least `n`. The output is written to `out`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    n: usize,
    kq_scale: f32,
    half: bool,
    scores: &mut [f32],
    q16: &mut [f32],
    out: &mut [f32],
) {
    let head_dim = q.len();
    let round = |v: f32| if half { round_f16(v) } else { v };
    for (d, &v) in q16.iter_mut().zip(q) {
        *d = round(v);
    }
    let scores = &mut scores[..n];
    for (t, s) in scores.iter_mut().enumerate() {
        let k = &keys[t * stride + offset..t * stride + offset + head_dim];
        *s = dot(q16, k) * kq_scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (t, &p) in scores.iter().enumerate() {
        let p = round(p);
        if p == 0.0 {
            continue;
        }
        let v = &values[t * stride + offset..t * stride + offset + head_dim];
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
}
