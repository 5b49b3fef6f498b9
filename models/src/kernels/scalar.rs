//! Portable dot products, used where AVX2 is missing and as the reference for the
//! SIMD kernels. For the 32-value formats, a row's dot is computed in exactly the
//! order of ggml's x86 `ggml_vec_dot_*_q8_*` ([`row_32_ggml`]: eight f32 lanes of
//! exact integer sums, one FMA per block and lane, ggml's horizontal sum), so the
//! results are bit for bit llama.cpp's; so are Q4_K/Q5_K ([`row_q45k_ggml`]) and
//! Q6_K ([`row_q6k_ggml`]). For Q2_K/Q3_K, a block's value is the one ggml's generic
//! code adds for that block, and a row's dot is the in-order f32 sum of those values.

use candle_core::quantized::GgmlDType;

use super::act::{Q8Block, Q8KBlock};
use super::formats::{decode_32, decode_k, f16_at};

/// Dot of one K-format super-block with one Q8_K block.
#[inline]
pub(crate) fn dot_block_k(dtype: GgmlDType, w: &[u8], a: &Q8KBlock) -> f32 {
    let k = decode_k(dtype, w);
    let mut isum = 0i32;
    for j in 0..16 {
        let s: i32 = k.q[16 * j..16 * j + 16]
            .iter()
            .zip(&a.qs[16 * j..16 * j + 16])
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum();
        isum += i32::from(k.scales[j]) * s;
    }
    let d = k.d * a.d;
    if matches!(dtype, GgmlDType::Q3K | GgmlDType::Q6K) {
        return d * isum as f32;
    }
    let msum: i32 = k
        .mins
        .iter()
        .zip(&a.bsums)
        .map(|(&m, &b)| i32::from(m) * i32::from(b))
        .sum();
    d * isum as f32 - k.dmin * a.d * msum as f32
}

/// `out[i * acts.len() + r] = dot(ws[i], acts[r])` for rows of 32-value blocks.
pub(crate) fn rows_32(dtype: GgmlDType, ws: &[&[u8]], acts: &[&[Q8Block]], out: &mut [f32]) {
    for (o, (w, a)) in out.iter_mut().zip(pairs(ws, acts)) {
        *o = row_32_ggml(dtype, w, a);
    }
}

/// `out[i * acts.len() + r] = dot(ws[i], acts[r])` for K-format rows: Q4_K/Q5_K and
/// Q6_K in llama.cpp's x86 order ([`row_q45k_ggml`], [`row_q6k_ggml`]), Q2_K/Q3_K as
/// the in-order sum of ggml's generic per-block values.
pub(crate) fn rows_k(
    dtype: GgmlDType,
    ws: &[&[u8]],
    acts: &[&[Q8KBlock]],
    out: &mut [f32],
    prompt: bool,
) {
    let bb = super::formats::block_bytes(dtype);
    for (o, (w, a)) in out.iter_mut().zip(pairs(ws, acts)) {
        *o = match dtype {
            GgmlDType::Q4K | GgmlDType::Q5K => row_q45k_ggml(dtype, w, a, prompt),
            GgmlDType::Q6K => row_q6k_ggml(w, a),
            _ => w
                .chunks_exact(bb)
                .zip(a.iter())
                .map(|(wb, ab)| dot_block_k(dtype, wb, ab))
                .sum(),
        };
    }
}

/// A Q4_K (or Q5_K) row in the order of llama.cpp's repacked Q4_K kernels on x86:
/// exact integer sums `sum_j scale_j dot_j` and `sum_j min_j bsum_j` (16-value
/// sub-blocks), one FMA chain for each (`d_w d_a` and `dmin_w d_a`), subtracted at
/// the end. The GEMV (`ggml_gemv_q4_K_8x8_q8_K`, one-row products and decode steps)
/// adds a whole block's sums at once; the GEMM (`prompt`, rows in groups of 4 of a
/// pass) adds them per 64 values.
pub(crate) fn row_q45k_ggml(dtype: GgmlDType, w: &[u8], a: &[Q8KBlock], prompt: bool) -> f32 {
    let bb = super::formats::block_bytes(dtype);
    let step = if prompt { 4 } else { 16 };
    let (mut acc, mut acc_m) = (0f32, 0f32);
    for (wb, ab) in w.chunks_exact(bb).zip(a) {
        let k = decode_k(dtype, wb);
        for j0 in (0..16).step_by(step) {
            let (mut isum, mut msum) = (0i32, 0i32);
            for j in j0..j0 + step {
                let s: i32 = k.q[16 * j..16 * j + 16]
                    .iter()
                    .zip(&ab.qs[16 * j..16 * j + 16])
                    .map(|(&x, &y)| i32::from(x) * i32::from(y))
                    .sum();
                isum += i32::from(k.scales[j]) * s;
                msum += i32::from(k.mins[j]) * i32::from(ab.bsums[j]);
            }
            acc = (isum as f32).mul_add(k.d * ab.d, acc);
            acc_m = (msum as f32).mul_add(k.dmin * ab.d, acc_m);
        }
    }
    acc - acc_m
}

/// A Q6_K row in the order of ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`: eight i32 lanes
/// (lane L holds quants 4L..4L+4 of every 32, each times its 16-value scale), per
/// block `fma(d_a d_w, lane, acc_L)`, then [`hsum8`].
pub(crate) fn row_q6k_ggml(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let bb = super::formats::block_bytes(GgmlDType::Q6K);
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(bb).zip(a) {
        let k = decode_k(GgmlDType::Q6K, wb);
        let d = ab.d * k.d;
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for g in 0..8 {
                let at = 32 * g + 4 * l;
                let s: i32 = (at..at + 4)
                    .map(|e| i32::from(k.q[e]) * i32::from(ab.qs[e]))
                    .sum();
                lane += i32::from(k.scales[2 * g + l / 4]) * s;
            }
            *acc = d.mul_add(lane as f32, *acc);
        }
    }
    hsum8(&acc)
}

/// `out[i * acts.len() + r] = dot(ws[i], acts[r])` for F32 or F16 rows (F16: `acts`
/// already rounded to f16). ggml's leftover loop sums in f64; we do so for the row.
pub(crate) fn rows_float(dtype: GgmlDType, ws: &[&[u8]], acts: &[&[f32]], out: &mut [f32]) {
    for (o, (w, a)) in out.iter_mut().zip(pairs(ws, acts)) {
        let sum: f64 = if dtype == GgmlDType::F16 {
            w.chunks_exact(2)
                .zip(a.iter())
                .map(|(b, &x)| f64::from(f16_at(b, 0) * x))
                .sum()
        } else {
            w.chunks_exact(4)
                .zip(a.iter())
                .map(|(b, &x)| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * x))
                .sum()
        };
        *o = sum as f32;
    }
}

/// Every (weight row, activation row) pair, weight-row-major.
fn pairs<'a, A>(
    ws: &'a [&'a [u8]],
    acts: &'a [&'a [A]],
) -> impl Iterator<Item = (&'a [u8], &'a [A])> + 'a {
    ws.iter()
        .flat_map(move |&w| acts.iter().map(move |&a| (w, a)))
}

/// ggml's x86 `hsum_float_8`: `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[inline]
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|i| a[i + 4] + a[i]);
    (r[0] + r[2]) + (r[1] + r[3])
}

/// One row of 32-value blocks dotted with one row of Q8 blocks in the order of
/// ggml's AVX2 `ggml_vec_dot_*_q8_*`: eight f32 lanes (lane j holds the products
/// of quants 4j..4j+4), each `fma(d_w d_a, lane sum, acc_j)` block after block,
/// then [`hsum8`]; Q4_1/Q5_1 add `fma(m, s, summs)`, chained apart, at the end.
pub(crate) fn row_32_ggml(dtype: GgmlDType, w: &[u8], a: &[Q8Block]) -> f32 {
    let bb = super::formats::block_bytes(dtype);
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (wb, ab) in w.chunks_exact(bb).zip(a) {
        let d = f16_at(wb, 0) * ab.d;
        let q: [i8; 32] = if dtype == GgmlDType::Q8_0 {
            std::array::from_fn(|i| wb[2 + i] as i8)
        } else {
            decode_32(dtype, wb)
        };
        for (j, acc) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * j..4 * j + 4)
                .map(|i| i32::from(q[i]) * i32::from(ab.qs[i]))
                .sum();
            *acc = d.mul_add(s as f32, *acc);
        }
        if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1) {
            summs = f16_at(wb, 2).mul_add(ab.s, summs);
        }
    }
    hsum8(&acc) + summs
}
