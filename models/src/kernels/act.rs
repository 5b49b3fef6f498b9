//! Activation quantization: one row of f32 activations into the block format that
//! ggml pairs with the weight type (its `vec_dot_type`).
//!
//! Owns the formulas, which follow the code llama.cpp runs on x86 CPUs:
//! - Q8_0 / Q8_1 (ggml-cpu's x86 `quantize_row_q8_0` / `quantize_row_q8_1`): per 32
//!   values, `d = amax / 127`, `q = round(x * (127 / amax))` with ties to even
//!   (`_mm256_round_ps(.., _MM_ROUND_NEAREST)`), `d` stored as f16; Q8_1 also stores
//!   `s = f16(d * sum(q))` with the unrounded `d`. (ggml's reference C,
//!   `quantize_row_q8_0_ref`, which candle follows, multiplies by `1 / d` and rounds
//!   ties away from zero: a quant can differ by one on a near-tie.)
//! - Q8_K (`quantize_row_q8_K_ref`, which ggml's x86 build also runs): per 256 values, `iscale = -127 / max` where `max`
//!   is the signed value of largest magnitude (the first one on ties),
//!   `q = min(127, nearest_int(iscale * x))` (ties to even), `d = 1 / iscale` as f32,
//!   and `bsums` the sums of each 16 quants.
//!
//! The functions here are the portable reference; `avx2.rs` has hand-written AVX2
//! twins of both and `mod.rs` splits long inputs (prefill) over rayon's pool in whole
//! blocks, all bit-identical to these (tested).
//!
//! Invariants: [`Q8Block::d`] and [`Q8Block::s`] hold f16 values widened to f32 (so a
//! kernel multiplies exactly what ggml multiplies, without converting per block);
//! [`Q8Block::sum`] is the exact integer sum of `qs`. Q8_0 and Q8_1 blocks have the
//! same `d` and `qs` (ggml computes them identically), so one block type serves both.

use half::f16;

/// Values per Q8_0 / Q8_1 block.
pub(crate) const QK8: usize = 32;
/// Values per K-quant super-block.
pub(crate) const QK_K: usize = 256;

/// One Q8_0 / Q8_1 block of 32 activations.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(16))]
pub(crate) struct Q8Block {
    /// Scale, an f16 value widened to f32.
    pub d: f32,
    /// Q8_1's `s = d * sum(qs)`, an f16 value widened to f32.
    pub s: f32,
    /// Exact sum of `qs`.
    pub sum: i32,
    pub qs: [i8; QK8],
    /// -128 times the exact sum of each 4 quants (ggml's eight lanes): where the
    /// kernels read weights stored with an offset (Q8_0 as q + 128, Q4_0 and Q5_0
    /// before their -8 / -16) they start lane z's integer dot at `starts[z]` (Q8_0)
    /// or at it shifted right by 4 / 3 (exact: a multiple of 128), so the lane ends
    /// at the signed dot. Kept scaled so the Q8_0 start is one broadcast load.
    pub starts: [i32; 8],
}

/// One Q8_K super-block of 256 activations.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(16))]
pub(crate) struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; QK_K],
    /// Sum of each 16 consecutive quants.
    pub bsums: [i16; QK_K / 16],
}

#[inline(always)]
fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks).
/// Always inlined so that the `avx2.rs` wrapper compiles it with SSE4.1 rounding
/// instructions instead of libm calls (same results: IEEE operations only).
#[inline(always)]
pub(crate) fn quantize_q8(x: &[f32], out: &mut [Q8Block]) {
    debug_assert_eq!(x.len(), out.len() * QK8);
    for (xs, block) in x.chunks_exact(QK8).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        // As ggml's x86 `quantize_row_q8_0`/`_q8_1` (the code llama.cpp runs on these
        // CPUs, not its reference C): the inverse scale is 127 / amax and the products
        // round to nearest, ties to even (`_mm256_round_ps(.., _MM_ROUND_NEAREST)`).
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            // |v * id| <= 127 (up to rounding of `id`), so the cast never saturates.
            *q = (v * id).round_ties_even() as i8;
            sum += i32::from(*q);
        }
        block.d = f16_round(d);
        block.s = f16_round(sum as f32 * d);
        block.sum = sum;
        block.starts = lane_starts(&block.qs);
    }
}

/// -128 times the sum of each 4 consecutive quants ([`Q8Block::starts`]).
#[inline(always)]
pub(crate) fn lane_starts(qs: &[i8; QK8]) -> [i32; 8] {
    std::array::from_fn(|z| {
        -128 * qs[4 * z..4 * z + 4]
            .iter()
            .map(|&q| i32::from(q))
            .sum::<i32>()
    })
}

/// ggml's `nearest_int`: round to nearest, ties to even.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Quantizes `x` (a multiple of 256 long) into `out` (`x.len() / 256` blocks).
/// Always inlined, as [`quantize_q8`].
#[inline(always)]
pub(crate) fn quantize_q8k(x: &[f32], out: &mut [Q8KBlock]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (xs, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut max = 0f32;
        let mut amax = 0f32;
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            block.d = 0.0;
            block.qs = [0; QK_K];
            block.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (bsum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *bsum = qs.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
    }
}

/// Rounds each activation to f16 and back (ggml converts src1 to F16 for F16 weights).
pub(crate) fn round_f16(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f16_round(v);
    }
}

impl Q8Block {
    pub(crate) const ZERO: Q8Block = Q8Block {
        d: 0.0,
        s: 0.0,
        sum: 0,
        qs: [0; QK8],
        starts: [0; 8],
    };
}

impl Q8KBlock {
    pub(crate) const ZERO: Q8KBlock = Q8KBlock {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}
