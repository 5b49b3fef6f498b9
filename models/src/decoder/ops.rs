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

use std::sync::OnceLock;

use rayon::prelude::*;

use half::f16;

use crate::kernels::vector;

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
    // ggml: each square in f32, summed in f64.
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// [`rms_norm`] in place.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), weight.len());
    // ggml: each square in f32, summed in f64.
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
}

/// SiLU-gated product `out = silu(gate) * up` (ggml `swiglu`, its vectorised `expf`).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    split_gated(gate, up, vector::swiglu)
}

/// Runs an element-wise gated activation `f(gate, up)` over pieces of the two
/// slices: on rayon's pool, two whole 16-value pieces per thread, for at least
/// [`PARALLEL_MIN_ELEMENTS`] elements (a batch's rows); else in one call. Each
/// element's value is its own, so the split changes none.
fn split_gated(gate: &mut [f32], up: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    let threads = rayon::current_num_threads();
    if gate.len() < PARALLEL_MIN_ELEMENTS || threads < 2 || gate.len() != up.len() {
        return f(gate, up);
    }
    let piece = gate.len().div_ceil(2 * threads).next_multiple_of(16);
    gate.par_chunks_mut(piece)
        .zip(up.par_chunks(piece))
        .for_each(|(g, u)| f(g, u));
}

/// Element-wise work of at least this many values (a batch of several rows) is
/// split across rayon's pool; less (one row) runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 4096;

fn gelu_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    // As GCC compiles ggml's `ggml_gelu_f32`: `1 + a x x` is one FMA.
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (COEF_A * x).mul_add(x, 1.0)).tanh())
}

/// ggml's `ggml_table_gelu_f16`: GELU of every half-precision value, in half
/// precision, indexed by its bits.
fn gelu_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_f32(f16::from_bits(bits).to_f32())).to_bits())
            .collect()
    })
}

/// GELU (tanh)-gated product `out = gelu(gate) * up` (ggml `geglu`): inside
/// (-10, 10) the input is rounded to half precision and looked up in ggml's table of
/// half-precision results.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    split_gated(gate, up, geglu_serial)
}

fn geglu_serial(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            f16::from_bits(table[usize::from(f16::from_f32(x).to_bits())]).to_f32()
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
        vector::rope(x, head_dim, table, matches!(layout, RopeLayout::Neox));
    }
}

/// Softmax of `scores` in place, as ggml's `soft_max` computes it (see [`vector::softmax`]).
pub fn softmax(scores: &mut [f32]) {
    vector::softmax(scores)
}

/// The query heads that share one KV head attending over its cached keys and values.
///
/// `q` holds the `q.len() / head_dim` heads' queries one after the other, `out`
/// receives their outputs likewise; each head's output is what it would be alone,
/// bit for bit (the one-token loops read the shared keys and values once for several
/// heads, with every head's own sums unchanged).
///
/// With `half`, the query and the attention weights are rounded to half precision
/// (the keys and values were when cached), as llama.cpp's `mul_mat` over an F16 KV
/// cache does. `values` hold `n` rows of `stride` values (f32, or f16 bits: the same
/// values) whose `offset..offset + head_dim` slice belongs to this KV head, `keys` the
/// last `n - masked` of those rows: the first `masked` positions are outside a sliding
/// window, masked as llama.cpp masks them (score -inf, weight 0) but still summed
/// over, so every term keeps its lane. Dots are summed in llama.cpp's order for a pass
/// of `tokens` tokens of this sequence whose KV view holds `n_kv` cells (see
/// [`vector::Order`]). `scratch` holds the per-thread buffers.
#[allow(clippy::too_many_arguments)]
pub fn attend_heads(
    q: &[f32],
    head_dim: usize,
    keys: vector::KvRun<'_>,
    values: vector::KvRun<'_>,
    stride: usize,
    offset: usize,
    n: usize,
    kq_scale: f32,
    half: bool,
    tokens: usize,
    n_kv: usize,
    masked: usize,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    let AttendScratch {
        scores,
        q16,
        acc,
        wide,
    } = scratch;
    let heads = q.len() / head_dim;
    q16.clear();
    q16.extend_from_slice(q);
    if half {
        vector::round_to_f16(q16);
    }
    scores.resize(heads * n, 0.0);
    let scores = &mut scores[..heads * n];
    for row in scores.chunks_exact_mut(n) {
        row[..masked].fill(f32::NEG_INFINITY);
    }
    let order = vector::Order::for_pass(tokens, head_dim);
    vector::attention_scores_kv_heads(
        q16,
        head_dim,
        keys,
        stride,
        offset,
        kq_scale,
        order,
        wide,
        n - masked,
        &mut scores[masked..],
        n,
        // The values the weighted sum reads next, from the same positions.
        Some(values.skip(masked * stride)),
    );
    for row in scores.chunks_exact_mut(n) {
        softmax(row);
        if half {
            vector::round_to_f16(row);
        }
    }
    let order = vector::Order::for_pass(tokens, n_kv);
    vector::weighted_sum_kv_heads(
        scores, n, values, stride, offset, order, n_kv, wide, acc, head_dim, out,
    );
}

/// Scratch buffers of [`attend_heads`], kept per thread across heads.
#[derive(Debug, Default)]
pub struct AttendScratch {
    scores: Vec<f32>,
    q16: Vec<f32>,
    acc: Vec<f32>,
    /// Half-precision keys or values widened to f32, where a loop needs them so.
    wide: Vec<f32>,
}
