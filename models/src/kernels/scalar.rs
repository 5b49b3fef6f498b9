//! Portable dot products, one weight block against one activation block: ggml's
//! generic `ggml_vec_dot_*` (integer products summed exactly, then scaled once per
//! block), used where AVX2 is missing and as the reference for the SIMD kernels.
//!
//! Invariant: each function returns, per block, the value ggml's generic code adds
//! to its sum for that block; a row's dot is the in-order f32 sum of those values.

use candle_core::quantized::GgmlDType;

use super::act::{Q8Block, Q8KBlock};
use super::formats::{decode_32, decode_k, f16_at};

/// Dot of one Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 block with one Q8 block.
#[inline]
pub(crate) fn dot_block_32(dtype: GgmlDType, w: &[u8], a: &Q8Block) -> f32 {
    let d = f16_at(w, 0);
    if dtype == GgmlDType::Q8_0 {
        let sumi: i32 = w[2..34]
            .iter()
            .zip(&a.qs)
            .map(|(&x, &y)| i32::from(x as i8) * i32::from(y))
            .sum();
        return sumi as f32 * (d * a.d);
    }
    let q = decode_32(dtype, w);
    let sumi: i32 = q
        .iter()
        .zip(&a.qs)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => sumi as f32 * (d * a.d) + f16_at(w, 2) * a.s,
        _ => sumi as f32 * (d * a.d),
    }
}

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
    let bb = super::formats::block_bytes(dtype);
    for (o, (w, a)) in out.iter_mut().zip(pairs(ws, acts)) {
        *o = w
            .chunks_exact(bb)
            .zip(a.iter())
            .map(|(wb, ab)| dot_block_32(dtype, wb, ab))
            .sum();
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
