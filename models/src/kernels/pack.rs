//! The repacked weight layout the AVX-512 VNNI kernels (`avx512.rs`) read: 16 weight
//! rows interleaved so that one 512-bit register holds 4 consecutive quants of each
//! of the 16 rows (byte `4 * r + k` = quant `4 * z + k` of row `r`), and `vpdpbusd`
//! against 4 broadcast activation bytes leaves row `r`'s partial dot in i32 lane `r`.
//! Scales are separated from quants, 16 rows side by side, so one load feeds 16 lanes.
//!
//! Owns the layouts and their exact inverse ([`unpack_row`]), so a packed matrix still
//! dequantizes and still runs on the portable kernels. A packed matrix is `rows / 16`
//! groups of `group_bytes` bytes (a group = the blocks of 16 rows, block-major),
//! followed by the `rows % 16` remaining rows in GGUF layout. Per block of 16 rows
//! (offsets in bytes; `d`, `m`, `dmin` f16; "nibbles" = 4 x 64 bytes where byte
//! `64 * t + 4 * r + k` holds quant `4t + k` of row `r` in its low nibble and quant
//! `16 + 4t + k` in its high one; "masks" = one u64 per register, bit `4r + k` = the
//! fifth bit of that register's quant `k` of row `r`):
//!
//! | format | layout of one block of 16 rows | bytes |
//! |--------|--------------------------------|-------|
//! | Q8_0 | d[16], then 8 registers of quants + 128 as u8 | 544 |
//! | Q4_0 | d[16], nibbles | 288 |
//! | Q4_1 | d[16], m[16], nibbles | 320 |
//! | Q5_0 | d[16], masks[8], nibbles | 352 |
//! | Q4_K | d[16], dmin[16], scales u8[8][16], mins u8[8][16], nibbles of sub-block 0..8 | 2368 |
//! | Q5_K | as Q4_K, then masks[8][8] (sub-block, register) | 2880 |
//! | Q6_K | d[16], scales i8[16][16], then per 32 values: nibbles (low 4 bits), 2 x 64 bytes of high bits (register `4h + f` in bits `2f..2f+2` of part `h`) | 3360 |
//!
//! Invariant: [`pack_group`] followed by [`unpack_row`] gives back every byte of the
//! GGUF rows (the 6-bit scale encoding of Q4_K/Q5_K is a bijection of its 12 bytes).

use candle_core::quantized::GgmlDType;

use super::formats::{block_bytes, scale_min_k4};

/// Rows interleaved in one group.
pub(crate) const GROUP: usize = 16;

/// Whether `dtype` has a packed layout (and AVX-512 kernels).
pub(crate) fn packable(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(dtype, Q4_0 | Q4_1 | Q5_0 | Q8_0 | Q4K | Q5K | Q6K)
}

/// Bytes of one block of 16 packed rows.
pub(crate) fn packed_block_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q8_0 => 544,
        GgmlDType::Q4_0 => 288,
        GgmlDType::Q4_1 => 320,
        GgmlDType::Q5_0 => 352,
        GgmlDType::Q4K => 2368,
        GgmlDType::Q5K => 2880,
        GgmlDType::Q6K => 3360,
        _ => 0,
    }
}

/// Offset of the nibbles in a packed 32-value block.
fn nibbles_at(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4_0 => 32,
        GgmlDType::Q4_1 => 64,
        _ => 96, // Q5_0
    }
}

/// Packs the 16 GGUF rows `rows` (each `nb` blocks of `dtype`) into `out`
/// (`nb * packed_block_bytes(dtype)` bytes).
pub(crate) fn pack_group(dtype: GgmlDType, rows: &[&[u8]], out: &mut [u8]) {
    let (bb, pb) = (block_bytes(dtype), packed_block_bytes(dtype));
    debug_assert_eq!(rows.len(), GROUP);
    for (b, o) in out.chunks_exact_mut(pb).enumerate() {
        let blocks: [&[u8]; GROUP] = std::array::from_fn(|r| &rows[r][b * bb..(b + 1) * bb]);
        match dtype {
            GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => pack_k(dtype, &blocks, o),
            _ => pack_32(dtype, &blocks, o),
        }
    }
}

/// Writes row `r` of a packed group (`nb` blocks) back in GGUF layout into `out`.
pub(crate) fn unpack_row(dtype: GgmlDType, group: &[u8], r: usize, out: &mut [u8]) {
    let (bb, pb) = (block_bytes(dtype), packed_block_bytes(dtype));
    for (p, o) in group.chunks_exact(pb).zip(out.chunks_exact_mut(bb)) {
        match dtype {
            GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => unpack_k(dtype, p, r, o),
            _ => unpack_32(dtype, p, r, o),
        }
    }
}

/// f16 `d` of each row: the first 2 bytes of each block at `src_off`, into `o[dst..]`.
fn pack_f16s(blocks: &[&[u8]; GROUP], src_off: usize, o: &mut [u8], dst: usize) {
    for (r, b) in blocks.iter().enumerate() {
        o[dst + 2 * r..dst + 2 * r + 2].copy_from_slice(&b[src_off..src_off + 2]);
    }
}

fn pack_32(dtype: GgmlDType, blocks: &[&[u8]; GROUP], o: &mut [u8]) {
    pack_f16s(blocks, 0, o, 0);
    if dtype == GgmlDType::Q8_0 {
        for (r, b) in blocks.iter().enumerate() {
            for e in 0..32 {
                o[32 + 64 * (e / 4) + 4 * r + e % 4] = b[2 + e] ^ 0x80;
            }
        }
        return;
    }
    if dtype == GgmlDType::Q4_1 {
        pack_f16s(blocks, 2, o, 32);
    }
    let qs_at = match dtype {
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 4,
        _ => 6,
    };
    let nib = nibbles_at(dtype);
    for (r, b) in blocks.iter().enumerate() {
        for i in 0..16 {
            o[nib + 64 * (i / 4) + 4 * r + i % 4] = b[qs_at + i];
        }
    }
    if dtype == GgmlDType::Q5_0 {
        let mut masks = [0u64; 8];
        for (r, b) in blocks.iter().enumerate() {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for (z, mask) in masks.iter_mut().enumerate() {
                for k in 0..4 {
                    *mask |= u64::from((qh >> (4 * z + k)) & 1) << (4 * r + k);
                }
            }
        }
        for (z, mask) in masks.iter().enumerate() {
            o[32 + 8 * z..40 + 8 * z].copy_from_slice(&mask.to_le_bytes());
        }
    }
}

fn unpack_32(dtype: GgmlDType, p: &[u8], r: usize, b: &mut [u8]) {
    b[0..2].copy_from_slice(&p[2 * r..2 * r + 2]);
    if dtype == GgmlDType::Q8_0 {
        for e in 0..32 {
            b[2 + e] = p[32 + 64 * (e / 4) + 4 * r + e % 4] ^ 0x80;
        }
        return;
    }
    if dtype == GgmlDType::Q4_1 {
        b[2..4].copy_from_slice(&p[32 + 2 * r..34 + 2 * r]);
    }
    let qs_at = match dtype {
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 4,
        _ => 6,
    };
    let nib = nibbles_at(dtype);
    for i in 0..16 {
        b[qs_at + i] = p[nib + 64 * (i / 4) + 4 * r + i % 4];
    }
    if dtype == GgmlDType::Q5_0 {
        let mut qh = 0u32;
        for z in 0..8 {
            let at = 32 + 8 * z;
            let mask = u64::from_le_bytes(p[at..at + 8].try_into().unwrap_or([0; 8]));
            for k in 0..4 {
                qh |= (((mask >> (4 * r + k)) & 1) as u32) << (4 * z + k);
            }
        }
        b[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// The 256 quants of a Q4_K / Q5_K (unsigned, 4 or 5 bits) or Q6_K (unsigned 6 bits,
/// before the -32 offset) super-block, in value order.
fn k_quants(dtype: GgmlDType, b: &[u8]) -> [u8; 256] {
    std::array::from_fn(|e| match dtype {
        GgmlDType::Q6K => {
            let (n, kk, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = (b[64 * n + 32 * (kk & 1) + l] >> (4 * (kk >> 1))) & 0xF;
            let high = (b[128 + 32 * n + l] >> (2 * kk)) & 3;
            low | (high << 4)
        }
        _ => {
            let qs_at = if dtype == GgmlDType::Q5K { 48 } else { 16 };
            let (c, h, l) = (e / 64, (e % 64) / 32, e % 32);
            let mut v = (b[qs_at + 32 * c + l] >> (4 * h)) & 0xF;
            if dtype == GgmlDType::Q5K && b[16 + l] & (1 << (e / 32)) != 0 {
                v += 16;
            }
            v
        }
    })
}

/// Inverse of [`k_quants`]: writes the quant bytes (and Q5_K's `qh`) of `b`.
fn put_k_quants(dtype: GgmlDType, q: &[u8; 256], b: &mut [u8]) {
    match dtype {
        GgmlDType::Q6K => {
            b[..192].fill(0);
            for (e, &v) in q.iter().enumerate() {
                let (n, kk, l) = (e / 128, (e % 128) / 32, e % 32);
                b[64 * n + 32 * (kk & 1) + l] |= (v & 0xF) << (4 * (kk >> 1));
                b[128 + 32 * n + l] |= ((v >> 4) & 3) << (2 * kk);
            }
        }
        _ => {
            let five = dtype == GgmlDType::Q5K;
            let qs_at = if five { 48 } else { 16 };
            b[qs_at..qs_at + 128].fill(0);
            if five {
                b[16..48].fill(0);
            }
            for (e, &v) in q.iter().enumerate() {
                let (c, h, l) = (e / 64, (e % 64) / 32, e % 32);
                b[qs_at + 32 * c + l] |= (v & 0xF) << (4 * h);
                if five && v & 0x10 != 0 {
                    b[16 + l] |= 1 << (e / 32);
                }
            }
        }
    }
}

/// Nibbles of 32 quants per row (`q[r][e]`, e in 0..32, low 4 bits) into 256 bytes.
fn put_nibbles(q: &[[u8; 32]; GROUP], o: &mut [u8]) {
    for (r, q) in q.iter().enumerate() {
        for t in 0..4 {
            for k in 0..4 {
                o[64 * t + 4 * r + k] = (q[4 * t + k] & 0xF) | ((q[16 + 4 * t + k] & 0xF) << 4);
            }
        }
    }
}

/// Inverse of [`put_nibbles`] for row `r`: adds the low 4 bits of quants 0..32.
fn get_nibbles(p: &[u8], r: usize, q: &mut [u8]) {
    for t in 0..4 {
        for k in 0..4 {
            let byte = p[64 * t + 4 * r + k];
            q[4 * t + k] |= byte & 0xF;
            q[16 + 4 * t + k] |= byte >> 4;
        }
    }
}

fn pack_k(dtype: GgmlDType, blocks: &[&[u8]; GROUP], o: &mut [u8]) {
    let q: [[u8; 256]; GROUP] = std::array::from_fn(|r| k_quants(dtype, blocks[r]));
    let sub = |j: usize| -> [[u8; 32]; GROUP] {
        std::array::from_fn(|r| std::array::from_fn(|e| q[r][32 * j + e]))
    };
    if dtype == GgmlDType::Q6K {
        pack_f16s(blocks, 208, o, 0);
        for (r, b) in blocks.iter().enumerate() {
            for j in 0..16 {
                o[32 + 16 * j + r] = b[192 + j];
            }
        }
        for p in 0..8 {
            let at = 288 + 384 * p;
            let s = sub(p);
            put_nibbles(&s, &mut o[at..at + 256]);
            for (r, s) in s.iter().enumerate() {
                for h in 0..2 {
                    for k in 0..4 {
                        let mut byte = 0;
                        for f in 0..4 {
                            byte |= (s[4 * (4 * h + f) + k] >> 4) << (2 * f);
                        }
                        o[at + 256 + 64 * h + 4 * r + k] = byte;
                    }
                }
            }
        }
        return;
    }
    pack_f16s(blocks, 0, o, 0);
    pack_f16s(blocks, 2, o, 32);
    for (r, b) in blocks.iter().enumerate() {
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            o[64 + 16 * j + r] = sc;
            o[192 + 16 * j + r] = m;
        }
    }
    for j in 0..8 {
        let s = sub(j);
        put_nibbles(&s, &mut o[320 + 256 * j..576 + 256 * j]);
        if dtype == GgmlDType::Q5K {
            for z in 0..8 {
                let mut mask = 0u64;
                for (r, s) in s.iter().enumerate() {
                    for k in 0..4 {
                        mask |= u64::from((s[4 * z + k] >> 4) & 1) << (4 * r + k);
                    }
                }
                let at = 2368 + 64 * j + 8 * z;
                o[at..at + 8].copy_from_slice(&mask.to_le_bytes());
            }
        }
    }
}

fn unpack_k(dtype: GgmlDType, p: &[u8], r: usize, b: &mut [u8]) {
    let mut q = [0u8; 256];
    if dtype == GgmlDType::Q6K {
        b[208..210].copy_from_slice(&p[2 * r..2 * r + 2]);
        for j in 0..16 {
            b[192 + j] = p[32 + 16 * j + r];
        }
        for pi in 0..8 {
            let at = 288 + 384 * pi;
            let s = &mut q[32 * pi..32 * pi + 32];
            get_nibbles(&p[at..at + 256], r, s);
            for h in 0..2 {
                for k in 0..4 {
                    let byte = p[at + 256 + 64 * h + 4 * r + k];
                    for f in 0..4 {
                        s[4 * (4 * h + f) + k] |= ((byte >> (2 * f)) & 3) << 4;
                    }
                }
            }
        }
        put_k_quants(dtype, &q, b);
        return;
    }
    b[0..2].copy_from_slice(&p[2 * r..2 * r + 2]);
    b[2..4].copy_from_slice(&p[32 + 2 * r..34 + 2 * r]);
    // ggml's 6-bit scale/min encoding (quantize_row_q4_K_ref), the inverse of
    // `scale_min_k4`.
    let s = &mut b[4..16];
    s.fill(0);
    for j in 0..8 {
        let (sc, m) = (p[64 + 16 * j + r], p[192 + 16 * j + r]);
        if j < 4 {
            s[j] |= sc & 63;
            s[j + 4] |= m & 63;
        } else {
            s[j + 4] = (sc & 0xF) | ((m & 0xF) << 4);
            s[j - 4] |= (sc >> 4) << 6;
            s[j] |= (m >> 4) << 6;
        }
    }
    for j in 0..8 {
        let sq = &mut q[32 * j..32 * j + 32];
        get_nibbles(&p[320 + 256 * j..576 + 256 * j], r, sq);
        if dtype == GgmlDType::Q5K {
            for z in 0..8 {
                let at = 2368 + 64 * j + 8 * z;
                let mask = u64::from_le_bytes(p[at..at + 8].try_into().unwrap_or([0; 8]));
                for k in 0..4 {
                    sq[4 * z + k] |= (((mask >> (4 * r + k)) & 1) as u8) << 4;
                }
            }
        }
    }
    put_k_quants(dtype, &q, b);
}
