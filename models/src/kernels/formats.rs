//! The GGML weight formats this module runs: their block geometry, how a block's
//! bytes decode, and dequantization (ggml's `dequantize_row_*`).
//!
//! Owns the on-disk layouts, which are GGUF's (little-endian, no padding, blocks
//! back to back, each row of a matrix a whole number of blocks):
//!
//! | format | values | bytes | layout |
//! |--------|--------|-------|--------|
//! | Q4_0 | 32 | 18 | d: f16, qs[16]: value j in the low nibble of qs[j], j+16 in the high |
//! | Q4_1 | 32 | 20 | d: f16, m: f16, qs[16] |
//! | Q5_0 | 32 | 22 | d: f16, qh: u32 (bit j = fifth bit of value j), qs[16] |
//! | Q5_1 | 32 | 24 | d: f16, m: f16, qh: u32, qs[16] |
//! | Q8_0 | 32 | 34 | d: f16, qs[32]: i8 |
//! | Q2_K | 256 | 84 | scales[16] (low nibble scale, high nibble min), qs[64], d, dmin |
//! | Q3_K | 256 | 110 | hmask[32], qs[64], scales[12] (16 x 6 bits), d |
//! | Q4_K | 256 | 144 | d, dmin, scales[12] (8 scales + 8 mins, 6 bits), qs[128] |
//! | Q5_K | 256 | 176 | d, dmin, scales[12], qh[32], qs[128] |
//! | Q6_K | 256 | 210 | ql[128], qh[64], scales[16]: i8, d |
//!
//! Invariant: the K-format decoders below index values in natural order (value `e`
//! of a super-block belongs to sub-block `e / 16` or `e / 32`), so the scalar dots,
//! the dequantizers and the tests share one definition of each layout; the SIMD
//! kernels in `avx2.rs` re-derive the same layouts with byte shuffles.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::act::QK_K;

/// f16 at byte `off` of `b`, widened.
#[inline]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Bytes of one block (or one element, for F32/F16) of `dtype`.
pub(crate) fn block_bytes(dtype: GgmlDType) -> usize {
    dtype.type_size()
}

/// Values in one block (1 for F32/F16).
pub(crate) fn block_len(dtype: GgmlDType) -> usize {
    dtype.block_size()
}

/// The formats [`super::QWeight`] accepts.
pub(crate) fn is_supported(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        F32 | F16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// ggml's `get_scale_min_k4`: 6-bit scale and min `j` (0..8) of a Q4_K / Q5_K block.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 16 signed 6-bit scales of a Q3_K block (already minus 32).
#[inline]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// A K-format super-block decoded to integers: `value[e] = d * scale[e/16] * q[e] -
/// dmin * min[e/16]` (scales and mins per 16 values; formats with 32-value sub-blocks
/// repeat each twice).
pub(crate) struct KBlock {
    pub q: [i8; QK_K],
    pub scales: [i8; 16],
    /// Only Q2_K, Q4_K and Q5_K have mins (unsigned 4 or 6 bits).
    pub mins: [u8; 16],
    pub d: f32,
    pub dmin: f32,
}

/// Decodes one super-block of a K format.
pub(crate) fn decode_k(dtype: GgmlDType, b: &[u8]) -> KBlock {
    let mut k = KBlock {
        q: [0; QK_K],
        scales: [0; 16],
        mins: [0; 16],
        d: 0.0,
        dmin: 0.0,
    };
    match dtype {
        GgmlDType::Q2K => {
            let (sc, qs) = (&b[0..16], &b[16..80]);
            for (e, q) in k.q.iter_mut().enumerate() {
                let (n, kk, l) = (e / 128, (e % 128) / 32, e % 32);
                *q = ((qs[32 * n + l] >> (2 * kk)) & 3) as i8;
            }
            k.scales = std::array::from_fn(|j| (sc[j] & 0xF) as i8);
            k.mins = std::array::from_fn(|j| sc[j] >> 4);
            k.d = f16_at(b, 80);
            k.dmin = f16_at(b, 82);
        }
        GgmlDType::Q3K => {
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            for (e, q) in k.q.iter_mut().enumerate() {
                let (n, kk, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = ((qs[32 * n + l] >> (2 * kk)) & 3) as i8;
                let high = hmask[l] & (1 << (4 * n + kk)) != 0;
                *q = if high { low } else { low - 4 };
            }
            k.scales = q3k_scales(&b[96..108]);
            k.d = f16_at(b, 108);
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let five = dtype == GgmlDType::Q5K;
            let (qh, qs) = if five {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for (e, q) in k.q.iter_mut().enumerate() {
                let (c, h, l) = (e / 64, (e % 64) / 32, e % 32);
                let mut v = (qs[32 * c + l] >> (4 * h)) & 0xF;
                if five && qh[l] & (1 << (e / 32)) != 0 {
                    v += 16;
                }
                *q = v as i8;
            }
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                k.scales[2 * j] = sc as i8;
                k.scales[2 * j + 1] = sc as i8;
                k.mins[2 * j] = m;
                k.mins[2 * j + 1] = m;
            }
            k.d = f16_at(b, 0);
            k.dmin = f16_at(b, 2);
        }
        GgmlDType::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for (e, q) in k.q.iter_mut().enumerate() {
                let (n, kk, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = (ql[64 * n + 32 * (kk & 1) + l] >> (4 * (kk >> 1))) & 0xF;
                let high = (qh[32 * n + l] >> (2 * kk)) & 3;
                *q = (low | (high << 4)) as i8 - 32;
            }
            k.scales = std::array::from_fn(|j| b[192 + j] as i8);
            k.d = f16_at(b, 208);
        }
        _ => {}
    }
    k
}

/// Dequantizes one row (`bytes` holds exactly the row's blocks) into `out`, with the
/// operations of ggml's `dequantize_row_*` (so results match candle's bit for bit).
pub(crate) fn dequantize_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    let bb = block_bytes(dtype);
    let bl = block_len(dtype);
    debug_assert_eq!(bytes.len() / bb * bl, out.len());
    for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        match dtype {
            GgmlDType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlDType::F16 => y[0] = f16_at(b, 0),
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                let d = f16_at(b, 0);
                let v = decode_32(dtype, b);
                if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1) {
                    let m = f16_at(b, 2);
                    for (y, &q) in y.iter_mut().zip(&v) {
                        *y = f32::from(q) * d + m;
                    }
                } else {
                    for (y, &q) in y.iter_mut().zip(&v) {
                        *y = f32::from(q) * d;
                    }
                }
            }
            GgmlDType::Q8_0 => {
                let d = f16_at(b, 0);
                for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                    *y = f32::from(q as i8) * d;
                }
            }
            GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
                let k = decode_k(dtype, b);
                for (j, ys) in y.chunks_exact_mut(16).enumerate() {
                    let dl = k.d * f32::from(k.scales[j]);
                    let ml = k.dmin * f32::from(k.mins[j]);
                    for (y, &q) in ys.iter_mut().zip(&k.q[16 * j..16 * j + 16]) {
                        *y = dl * f32::from(q) - ml;
                    }
                }
            }
            _ => y.fill(0.0),
        }
    }
}

/// The 32 quants of a Q4_0 / Q4_1 / Q5_0 / Q5_1 block in value order, with the
/// offset of the symmetric formats applied (Q4_0: -8, Q5_0: -16).
#[inline]
pub(crate) fn decode_32(dtype: GgmlDType, b: &[u8]) -> [i8; 32] {
    let (qh, qs, offset) = match dtype {
        GgmlDType::Q4_0 => (0, &b[2..18], 8),
        GgmlDType::Q4_1 => (0, &b[4..20], 0),
        GgmlDType::Q5_0 => (u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22], 16),
        _ => (u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24], 0),
    };
    std::array::from_fn(|e| {
        let nibble = if e < 16 { qs[e] & 0xF } else { qs[e - 16] >> 4 };
        let high = ((qh >> e) & 1) as u8;
        (nibble | (high << 4)) as i8 - offset
    })
}
