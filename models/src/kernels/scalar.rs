//! Portable dot products, used where AVX2 is missing and as the reference for the
//! SIMD kernels. For the 32-value formats, a row's dot is computed in exactly the
//! order of ggml's x86 `ggml_vec_dot_*_q8_*` ([`row_32_ggml`]: eight f32 lanes of
//! exact integer sums, one FMA per block and lane, ggml's horizontal sum), so the
//! results are bit for bit llama.cpp's. For the K formats, a block's value is the
//! one ggml's generic code adds for that block, and a row's dot is the in-order f32
//! sum of those values.

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

/// `out[i * acts.len() + r] = dot(ws[i], acts[r])` for K-format rows.
pub(crate) fn rows_k(dtype: GgmlDType, ws: &[&[u8]], acts: &[&[Q8KBlock]], out: &mut [f32]) {
    let bb = super::formats::block_bytes(dtype);
    for (o, (w, a)) in out.iter_mut().zip(pairs(ws, acts)) {
        *o = w
            .chunks_exact(bb)
            .zip(a.iter())
            .map(|(wb, ab)| dot_block_k(dtype, wb, ab))
            .sum();
    }
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
