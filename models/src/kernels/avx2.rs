//! AVX2 (+FMA, F16C) kernels: a few weight rows against a few activation rows (the
//! shapes in [`SHAPES`]), each weight block loaded and unpacked once and multiplied
//! with every activation row of the call.
//!
//! Owns all `unsafe` of the kernels. Invariants that make it sound:
//! - every `#[target_feature]` function is reached only through the safe entry points
//!   [`rows_32`], [`rows_k`] and [`rows_float`], which take an [`Avx2`] token that
//!   exists only after runtime detection of avx2, fma and f16c;
//! - the entry points assert the shape and lengths (weight rows equal and a whole
//!   number of blocks, every activation row that many blocks), so every pointer read in
//!   the kernels stays inside its slice; all loads are unaligned loads.
//!
//! Numerics: integer products are summed exactly in i32 lanes (the u8 x i8 pair sums
//! of `maddubs` stay below i16 saturation for every format: weights are at most 6
//! bits unsigned, or sign-folded for Q8_0), then scaled once per block in f32 as
//! ggml's AVX2 `ggml_vec_dot_*` do. Offsets of the symmetric formats (Q4_0 -8, Q5_0
//! -16, Q6_K -32) are applied as `offset * sum(activation quants)`, an exact
//! integer identity, and mins as `min * bsum`. Results equal the scalar kernels up
//! to f32 summation order.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::act::{Q8Block, Q8KBlock, QK8, QK_K};
use super::formats::{block_bytes, scale_min_k4};
use super::scalar;

/// Proof that this CPU has AVX2, FMA and F16C.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn detect() -> Option<Avx2> {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        ok.then_some(Avx2(()))
    }
}

/// The (weight rows, activation rows) shapes one kernel call takes: 4 independent
/// accumulator chains or more, so FMA latency is hidden even for one activation row.
pub(crate) const SHAPES: [(usize, usize); 6] = [(4, 1), (2, 2), (1, 1), (1, 2), (1, 3), (1, 4)];

const FMT_Q4_0: u8 = 0;
const FMT_Q4_1: u8 = 1;
const FMT_Q5_0: u8 = 2;
const FMT_Q5_1: u8 = 3;
const FMT_Q8_0: u8 = 4;

/// Calls `$f::<.., RW, R>` for the shape (`$ws.len()`, `$acts.len()`), one of [`SHAPES`].
macro_rules! by_shape {
    ($f:ident, [$($c:expr),*], $ws:expr, $acts:expr, $out:expr) => {
        match ($ws.len(), $acts.len()) {
            (4, 1) => $f::<$($c,)* 4, 1>($ws, $acts, $out),
            (2, 2) => $f::<$($c,)* 2, 2>($ws, $acts, $out),
            (1, 1) => $f::<$($c,)* 1, 1>($ws, $acts, $out),
            (1, 2) => $f::<$($c,)* 1, 2>($ws, $acts, $out),
            (1, 3) => $f::<$($c,)* 1, 3>($ws, $acts, $out),
            _ => $f::<$($c,)* 1, 4>($ws, $acts, $out),
        }
    };
}

fn check<A>(ws: &[&[u8]], bb: usize, acts: &[&[A]], out: &[f32]) {
    let n = ws.first().map_or(0, |w| w.len());
    assert!(
        SHAPES.contains(&(ws.len(), acts.len()))
            && n.is_multiple_of(bb)
            && ws.iter().all(|w| w.len() == n)
            && acts.iter().all(|a| a.len() == n / bb)
            && out.len() == ws.len() * acts.len(),
        "kernels::avx2: {} weight rows of {n} bytes (block {bb}) against activation rows of {:?} blocks into {} outputs",
        ws.len(),
        acts.iter().map(|a| a.len()).collect::<Vec<_>>(),
        out.len()
    );
}

/// `out[i * R + r] = dot(ws[i], acts[r])` for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 rows.
pub(crate) fn rows_32(
    _: Avx2,
    dtype: GgmlDType,
    ws: &[&[u8]],
    acts: &[&[Q8Block]],
    out: &mut [f32],
) {
    check(ws, block_bytes(dtype), acts, out);
    // SAFETY: the token proves the CPU features; `check` proved shape and lengths.
    unsafe {
        match dtype {
            GgmlDType::Q4_0 => by_shape!(kernel_32, [FMT_Q4_0], ws, acts, out),
            GgmlDType::Q4_1 => by_shape!(kernel_32, [FMT_Q4_1], ws, acts, out),
            GgmlDType::Q5_0 => by_shape!(kernel_32, [FMT_Q5_0], ws, acts, out),
            GgmlDType::Q5_1 => by_shape!(kernel_32, [FMT_Q5_1], ws, acts, out),
            GgmlDType::Q8_0 => by_shape!(kernel_32, [FMT_Q8_0], ws, acts, out),
            _ => scalar::rows_32(dtype, ws, acts, out),
        }
    }
}

/// `out[i * R + r] = dot(ws[i], acts[r])` for K-format rows (SIMD for Q4_K, Q5_K, Q6_K).
pub(crate) fn rows_k(
    _: Avx2,
    dtype: GgmlDType,
    ws: &[&[u8]],
    acts: &[&[Q8KBlock]],
    out: &mut [f32],
    prompt: bool,
) {
    check(ws, block_bytes(dtype), acts, out);
    // SAFETY: the token proves the CPU features; `check` proved shape and lengths.
    unsafe {
        match dtype {
            GgmlDType::Q4K if prompt => by_shape!(kernel_q45k, [false, true], ws, acts, out),
            GgmlDType::Q4K => by_shape!(kernel_q45k, [false, false], ws, acts, out),
            GgmlDType::Q5K if prompt => by_shape!(kernel_q45k, [true, true], ws, acts, out),
            GgmlDType::Q5K => by_shape!(kernel_q45k, [true, false], ws, acts, out),
            GgmlDType::Q6K => by_shape!(kernel_q6k, [], ws, acts, out),
            _ => scalar::rows_k(dtype, ws, acts, out, prompt),
        }
    }
}

/// `out[i * R + r] = dot(ws[i], acts[r])` for F32 or F16 rows (F16: `acts` rounded).
pub(crate) fn rows_float(
    _: Avx2,
    dtype: GgmlDType,
    ws: &[&[u8]],
    acts: &[&[f32]],
    out: &mut [f32],
) {
    check(ws, block_bytes(dtype), acts, out);
    // SAFETY: the token proves the CPU features; `check` proved shape and lengths.
    unsafe {
        if dtype == GgmlDType::F16 {
            by_shape!(kernel_float, [true], ws, acts, out)
        } else {
            by_shape!(kernel_float, [false], ws, acts, out)
        }
    }
}

/// The AVX2 twin of `act::quantize_q8`: the same formulas, bit-identical results
/// (tests compare them), about 8x faster than the compiler's vectorisation of it.
pub(crate) fn quantize_q8(_: Avx2, x: &[f32], out: &mut [Q8Block]) {
    // SAFETY: the token proves the CPU features; the body is safe code.
    unsafe { quantize_q8_avx2(x, out) }
}

/// The AVX2 twin of `act::quantize_q8k`: the same formulas, bit-identical results.
pub(crate) fn quantize_q8k(_: Avx2, x: &[f32], out: &mut [Q8KBlock]) {
    // SAFETY: the token proves the CPU features; the body is safe code.
    unsafe { quantize_q8k_avx2(x, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_avx2(x: &[f32], out: &mut [Q8Block]) {
    debug_assert_eq!(x.len(), out.len() * QK8);
    let sign = _mm256_set1_ps(-0.0);
    // packs_epi32/packs_epi16 interleave 128-bit lanes; this puts them back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xs, block) in x.chunks_exact(QK8).zip(out.iter_mut()) {
        // SAFETY: `xs` holds exactly 32 f32s and `block.qs` 32 bytes; unaligned
        // loads and stores.
        unsafe {
            let p = xs.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let abs = |v: __m256| _mm256_andnot_ps(sign, v);
            let m = _mm256_max_ps(
                _mm256_max_ps(abs(v[0]), abs(v[1])),
                _mm256_max_ps(abs(v[2]), abs(v[3])),
            );
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            let amax = _mm_cvtss_f32(m4);
            // The same formulas as act::quantize_q8 (ggml's x86 quantizer).
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mul = _mm256_set1_ps(id);
            let q = |v: __m256| {
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(_mm256_mul_ps(v, mul)))
            };
            let (i0, i1, i2, i3) = (q(v[0]), q(v[1]), q(v[2]), q(v[3]));
            let sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32::<1>(s4));
            let total = _mm_cvtsi128_si32(s4);
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            let packed = _mm256_permutevar8x32_epi32(packed, order);
            _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), packed);
            let half = |x: f32| {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                    _mm_set_ss(x),
                )))
            };
            block.d = half(d);
            block.s = half(total as f32 * d);
            block.sum = total;
            block.starts = super::act::lane_starts(&block.qs);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8k_avx2(x: &[f32], out: &mut [Q8KBlock]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let top = _mm256_set1_epi32(127);
    for (xs, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        // SAFETY: `xs` holds exactly 256 f32s and `block.qs` 256 bytes; every load
        // and store below stays inside them (unaligned).
        unsafe {
            let p = xs.as_ptr();
            let mut m = _mm256_setzero_ps();
            for c in 0..QK_K / 8 {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * c))));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            if amax == 0.0 {
                block.d = 0.0;
                block.qs = [0; QK_K];
                block.bsums = [0; QK_K / 16];
                continue;
            }
            // The signed value of largest magnitude, the first one on ties (as the
            // portable act::quantize_q8k and ggml's reference).
            let max = xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
            let iscale = -127.0 / max;
            let mul = _mm256_set1_ps(iscale);
            let q = |c: usize| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * c)), mul);
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                _mm256_min_epi32(_mm256_cvtps_epi32(r), top)
            };
            for g in 0..QK_K / 32 {
                let (i0, i1, i2, i3) = (q(4 * g), q(4 * g + 1), q(4 * g + 2), q(4 * g + 3));
                let packed =
                    _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
                let packed = _mm256_permutevar8x32_epi32(packed, order);
                _mm256_storeu_si256(block.qs.as_mut_ptr().add(32 * g).cast(), packed);
            }
            block.d = 1.0 / iscale;
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| i16::from(q)).sum();
        }
    }
}

/// # Safety
/// Needs avx2/fma/f16c (all helpers below); `p` must point at 2 readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The sum of the 8 i32 lanes (exact: callers' totals fit in i32).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Sums of adjacent pairs of u8 x i8 products, widened to 8 lanes of i32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// The 32 nibbles of 16 bytes at `p`: low nibbles in bytes 0..16, high in 16..32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles_16(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p.cast());
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(q, m4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), m4);
    _mm256_set_m128i(hi, lo)
}

/// Byte i = 0x10 where bit i of the little-endian u32 at `p` is set, else 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bits_to_0x10(p: *const u8) -> __m256i {
    let x = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 against Q8 blocks: `RW` weight rows x `R`
/// activation rows.
///
/// # Safety
/// avx2/fma/f16c present; shape and lengths as checked by [`check`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel_32<const FMT: u8, const RW: usize, const R: usize>(
    ws: &[&[u8]],
    acts: &[&[Q8Block]],
    out: &mut [f32],
) {
    let (bb, offset, has_min) = match FMT {
        FMT_Q4_0 => (18, 8, false),
        FMT_Q4_1 => (20, 0, true),
        FMT_Q5_0 => (22, 16, false),
        FMT_Q5_1 => (24, 0, true),
        _ => (34, 0, false),
    };
    let nb = ws[0].len() / bb;
    let w: [*const u8; RW] = std::array::from_fn(|i| ws[i].as_ptr());
    let a: [*const Q8Block; R] = std::array::from_fn(|r| acts[r].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); R]; RW];
    let mut summ = [[0f32; R]; RW];
    for b in 0..nb {
        for i in 0..RW {
            let wb = w[i].add(b * bb);
            let d = f16_at(wb);
            let u = match FMT {
                FMT_Q4_0 => nibbles_16(wb.add(2)),
                FMT_Q4_1 => nibbles_16(wb.add(4)),
                FMT_Q5_0 => _mm256_or_si256(nibbles_16(wb.add(6)), bits_to_0x10(wb.add(2))),
                FMT_Q5_1 => _mm256_or_si256(nibbles_16(wb.add(8)), bits_to_0x10(wb.add(4))),
                _ => _mm256_loadu_si256(wb.add(2).cast()),
            };
            // Q8_0 weights are signed: multiply |w| by y carrying w's sign.
            let ax = if FMT == FMT_Q8_0 {
                _mm256_sign_epi8(u, u)
            } else {
                u
            };
            let m = if has_min { f16_at(wb.add(2)) } else { 0.0 };
            for r in 0..R {
                let y = &*a[r].add(b);
                let qy = _mm256_loadu_si256(y.qs.as_ptr().cast());
                let mut p = if FMT == FMT_Q8_0 {
                    dot_u8_i8(ax, _mm256_sign_epi8(qy, u))
                } else {
                    dot_u8_i8(ax, qy)
                };
                if offset != 0 {
                    // Each lane's own offset (-offset x its quant sum = its start, -128 x
                    // the sum, shifted), so every lane holds ggml's signed sum.
                    let starts = _mm256_loadu_si256(y.starts.as_ptr().cast());
                    let starts = if offset == 8 {
                        _mm256_srai_epi32::<4>(starts)
                    } else {
                        _mm256_srai_epi32::<3>(starts)
                    };
                    p = _mm256_add_epi32(p, starts);
                }
                acc[i][r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(p), acc[i][r]);
                if has_min {
                    summ[i][r] = m.mul_add(y.s, summ[i][r]);
                }
            }
        }
    }
    for i in 0..RW {
        for r in 0..R {
            out[i * R + r] = hsum_ps(acc[i][r]) + summ[i][r];
        }
    }
}

/// Q4_K (`FIVE = false`) or Q5_K against Q8_K blocks: `RW` weight rows x `R`
/// activation rows.
///
/// # Safety
/// avx2/fma/f16c present; shape and lengths as checked by [`check`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel_q45k<const FIVE: bool, const PROMPT: bool, const RW: usize, const R: usize>(
    ws: &[&[u8]],
    acts: &[&[Q8KBlock]],
    out: &mut [f32],
) {
    let bb = if FIVE { 176 } else { 144 };
    let qs_at = if FIVE { 48 } else { 16 };
    let nb = ws[0].len() / bb;
    let a: [*const Q8KBlock; R] = std::array::from_fn(|r| acts[r].as_ptr());
    let mut acc = [[0f32; R]; RW];
    let mut acc_m = [[0f32; R]; RW];
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        for i in 0..RW {
            let wb = &ws[i][b * bb..(b + 1) * bb];
            let d = f16_at(wb.as_ptr());
            let dmin = f16_at(wb.as_ptr().add(2));
            let mut sc = [_mm256_setzero_si256(); 8];
            let mut mins = [0i16; 16];
            let mut mins_k = [0u8; 8];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &wb[4..16]);
                sc[j] = _mm256_set1_epi16(i16::from(s));
                mins[2 * j] = i16::from(m);
                mins[2 * j + 1] = i16::from(m);
                mins_k[j] = m;
            }
            let mins = _mm256_loadu_si256(mins.as_ptr().cast());
            let qh = if FIVE {
                _mm256_loadu_si256(wb.as_ptr().add(16).cast())
            } else {
                _mm256_setzero_si256()
            };
            let mut isum = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let q = _mm256_loadu_si256(wb.as_ptr().add(qs_at + 32 * c).cast());
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                if FIVE {
                    let bit_lo = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
                    let bit_hi = _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8);
                    let x10 = _mm256_set1_epi8(0x10);
                    let h_lo = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_lo), bit_lo);
                    let h_hi = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_hi), bit_hi);
                    lo = _mm256_or_si256(lo, _mm256_and_si256(h_lo, x10));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(h_hi, x10));
                }
                for r in 0..R {
                    let y = (*a[r].add(b)).qs.as_ptr().add(64 * c);
                    let ylo = _mm256_loadu_si256(y.cast());
                    let yhi = _mm256_loadu_si256(y.add(32).cast());
                    let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo), sc[2 * c]);
                    let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi), sc[2 * c + 1]);
                    isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(plo, phi));
                    if PROMPT {
                        // ggml's Q4_K GEMM: one FMA per 64 values.
                        let y = &*a[r].add(b);
                        let bs = &y.bsums[4 * c..4 * c + 4];
                        let mt = i32::from(mins_k[2 * c]) * (i32::from(bs[0]) + i32::from(bs[1]))
                            + i32::from(mins_k[2 * c + 1]) * (i32::from(bs[2]) + i32::from(bs[3]));
                        acc[i][r] = (hsum_epi32(isum[r]) as f32).mul_add(d * y.d, acc[i][r]);
                        acc_m[i][r] = (mt as f32).mul_add(dmin * y.d, acc_m[i][r]);
                        isum[r] = _mm256_setzero_si256();
                    }
                }
            }
            if PROMPT {
                continue;
            }
            for r in 0..R {
                let y = &*a[r].add(b);
                let bsums = _mm256_loadu_si256(y.bsums.as_ptr().cast());
                let pm = _mm256_madd_epi16(bsums, mins);
                // ggml's repacked Q4_K GEMV: the block's exact integer totals, one
                // FMA chain for the scales and one for the mins, subtracted at the end.
                let (it, mt) = (hsum_epi32(isum[r]), hsum_epi32(pm));
                acc[i][r] = (it as f32).mul_add(d * y.d, acc[i][r]);
                acc_m[i][r] = (mt as f32).mul_add(dmin * y.d, acc_m[i][r]);
            }
        }
    }
    for i in 0..RW {
        for r in 0..R {
            out[i * R + r] = acc[i][r] - acc_m[i][r];
        }
    }
}

/// Q6_K against Q8_K blocks: `RW` weight rows x `R` activation rows.
///
/// # Safety
/// avx2/fma/f16c present; shape and lengths as checked by [`check`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel_q6k<const RW: usize, const R: usize>(
    ws: &[&[u8]],
    acts: &[&[Q8KBlock]],
    out: &mut [f32],
) {
    const BB: usize = 210;
    let nb = ws[0].len() / BB;
    let w: [*const u8; RW] = std::array::from_fn(|i| ws[i].as_ptr());
    let a: [*const Q8KBlock; R] = std::array::from_fn(|r| acts[r].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); R]; RW];
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(0x03);
    let m_c = _mm256_set1_epi8(0x0C);
    let m_30 = _mm256_set1_epi8(0x30);
    let m_c0 = _mm256_set1_epi8(0xC0u8 as i8);
    let m32 = _mm256_set1_epi8(32);
    for b in 0..nb {
        for i in 0..RW {
            let wb = w[i].add(b * BB);
            let d = f16_at(wb.add(208));
            let scales = std::slice::from_raw_parts(wb.add(192), 16);
            // Scale pairs for each 32 values: sub-blocks 2k (low lane) and 2k + 1 (high).
            let mut sv = [_mm256_setzero_si256(); 8];
            for (k, v) in sv.iter_mut().enumerate() {
                *v = _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(scales[2 * k + 1] as i8)),
                    _mm_set1_epi16(i16::from(scales[2 * k] as i8)),
                );
            }
            let mut isum = [_mm256_setzero_si256(); R];
            for n in 0..2 {
                let ql0 = _mm256_loadu_si256(wb.add(64 * n).cast());
                let ql1 = _mm256_loadu_si256(wb.add(64 * n + 32).cast());
                let qh = _mm256_loadu_si256(wb.add(128 + 32 * n).cast());
                let u = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_slli_epi16::<2>(_mm256_and_si256(qh, m_c)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _mm256_and_si256(qh, m_30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        _mm256_srli_epi16::<2>(_mm256_and_si256(qh, m_c0)),
                    ),
                ];
                for r in 0..R {
                    let y = (*a[r].add(b)).qs.as_ptr().add(128 * n);
                    for (k, &uk) in u.iter().enumerate() {
                        let qy = _mm256_loadu_si256(y.add(32 * k).cast());
                        // The -32 offset in every pair (as ggml: lane L keeps the
                        // products of quants 4L..4L+4 of each 32).
                        let p16 = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(uk, qy),
                            _mm256_maddubs_epi16(m32, qy),
                        );
                        let p = _mm256_madd_epi16(p16, sv[4 * n + k]);
                        isum[r] = _mm256_add_epi32(isum[r], p);
                    }
                }
            }
            for r in 0..R {
                let y = &*a[r].add(b);
                let dy = _mm256_set1_ps(y.d * d);
                acc[i][r] = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(isum[r]), acc[i][r]);
            }
        }
    }
    for i in 0..RW {
        for r in 0..R {
            out[i * R + r] = hsum_ps(acc[i][r]);
        }
    }
}

/// 8 weights from element `i` of an F16 (`HALF`) or F32 row at `wp`.
///
/// # Safety
/// avx2/fma/f16c present; elements `i..i + 8` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_w<const HALF: bool>(wp: *const u8, i: usize) -> __m256 {
    if HALF {
        _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i).cast()))
    } else {
        _mm256_loadu_ps(wp.add(4 * i).cast())
    }
}

/// F32 (`HALF = false`) or F16 weights against f32 activations: `RW` weight rows x
/// `R` activation rows.
///
/// # Safety
/// avx2/fma/f16c present; shape and lengths as checked by [`check`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel_float<const HALF: bool, const RW: usize, const R: usize>(
    ws: &[&[u8]],
    acts: &[&[f32]],
    out: &mut [f32],
) {
    let esize = if HALF { 2 } else { 4 };
    let n = ws[0].len() / esize;
    let w: [*const u8; RW] = std::array::from_fn(|i| ws[i].as_ptr());
    let a: [*const f32; R] = std::array::from_fn(|r| acts[r].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); R]; RW];
    let mut j = 0;
    while j + 8 <= n {
        for i in 0..RW {
            let wv = load_w::<HALF>(w[i], j);
            for r in 0..R {
                acc[i][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a[r].add(j)), acc[i][r]);
            }
        }
        j += 8;
    }
    for i in 0..RW {
        for r in 0..R {
            let mut s = hsum_ps(acc[i][r]);
            for t in j..n {
                let wt = if HALF {
                    f16_at(w[i].add(2 * t))
                } else {
                    f32::from_le_bytes(std::ptr::read_unaligned(w[i].add(4 * t).cast::<[u8; 4]>()))
                };
                s += wt * *a[r].add(t);
            }
            out[i * R + r] = s;
        }
    }
}

// Block sizes the kernels hard-code, checked against the shared geometry.
const _: () = assert!(QK8 == 32 && QK_K == 256);
