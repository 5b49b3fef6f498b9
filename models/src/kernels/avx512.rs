//! AVX-512 (F, BW, VL) + VNNI kernels on the packed layout of `pack.rs`: one group of
//! 16 interleaved weight rows against up to [`MAX_ACTS`] activation rows, each weight
//! register unpacked once and multiplied with every activation row by `vpdpbusd`
//! (u8 weights x i8 activations, 4 products summed into each i32 lane, lane = row).
//!
//! Owns the `unsafe` of these kernels. Invariants that make it sound:
//! - every `#[target_feature]` function is reached only through [`group_32`] and
//!   [`group_k`], which take an [`Avx512`] token that exists only after runtime
//!   detection of avx512f/bw/vl/vnni (and avx2/fma/f16c);
//! - the entry points assert the lengths (the group a whole number of packed blocks,
//!   every activation row that many blocks, 1..=8 rows), so every read stays inside
//!   its slice; all loads are unaligned.
//!
//! Numerics: weights enter `vpdpbusd` unsigned (Q8_0 stored as q + 128, Q4_0 / Q5_0 /
//! Q6_K before their -8 / -16 / -32 offset), and the offset times the activations'
//! exact quant sum is subtracted in i32: `sum((q+o) a) - o sum(a)` is the integer
//! dot exactly (no i16 saturation anywhere: `vpdpbusd` widens to i32). The 32-value
//! formats and Q6_K keep ggml's eight lanes apart and sum them in its order; Q4_K and
//! Q5_K follow llama.cpp's repacked Q4_K GEMV/GEMM (scales multiply the exact i32
//! sub-block sums with `vpmulld`, mins use `vpdpwssd` with Q8_K's `bsums`, one FMA
//! chain for each). Every kernel equals the scalar one bit for bit.
//!
//! With two or more activation rows, a kernel also prefetches the next packed
//! group (the next tile of its thread's range) while it computes this one (the
//! 32-value kernels spread those prefetches over their passes): a hint that changes
//! no result. The 4-bit 32-value kernels then unpack each block once: the first
//! pass over the group saves the unpacked registers and widened scales in a
//! thread-local scratch, the later passes load them.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::act::{Q8Block, Q8KBlock};
use super::pack::packed_block_bytes;
use super::{GroupOut, MAX_ACTS};

/// Proof that this CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(());

impl Avx512 {
    pub(crate) fn detect() -> Option<Avx512> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        ok.then_some(Avx512(()))
    }
}

const FMT_Q4_0: u8 = 0;
const FMT_Q4_1: u8 = 1;
const FMT_Q5_0: u8 = 2;
const FMT_Q8_0: u8 = 4;

/// Calls `$f::<.., R>` for `R = $acts.len()` (1..=8).
macro_rules! by_rows {
    ($f:ident, [$($c:expr),*], $w:expr, $acts:expr, $out:expr) => {
        match $acts.len() {
            1 => $f::<$($c,)* 1>($w, $acts, $out),
            2 => $f::<$($c,)* 2>($w, $acts, $out),
            3 => $f::<$($c,)* 3>($w, $acts, $out),
            4 => $f::<$($c,)* 4>($w, $acts, $out),
            5 => $f::<$($c,)* 5>($w, $acts, $out),
            6 => $f::<$($c,)* 6>($w, $acts, $out),
            7 => $f::<$($c,)* 7>($w, $acts, $out),
            _ => $f::<$($c,)* 8>($w, $acts, $out),
        }
    };
}

fn check<A>(w: &[u8], pb: usize, acts: &[&[A]]) {
    let nb = w.len() / pb.max(1);
    assert!(
        pb != 0
            && w.len().is_multiple_of(pb)
            && (1..=MAX_ACTS).contains(&acts.len())
            && acts.iter().all(|a| a.len() == nb),
        "kernels::avx512: a packed group of {} bytes (block {pb}) against {} activation rows",
        w.len(),
        acts.len()
    );
}

/// `out[r][i] = dot(row i of the packed group w, acts[r])` for Q4_0 / Q4_1 / Q5_0 /
/// Q8_0.
pub(crate) fn group_32(
    _: Avx512,
    dtype: GgmlDType,
    w: &[u8],
    acts: &[&[Q8Block]],
    out: &mut GroupOut,
) {
    check(w, packed_block_bytes(dtype), acts);
    // SAFETY: the token proves the CPU features; `check` proved the lengths.
    unsafe {
        match dtype {
            GgmlDType::Q4_0 => by_rows!(kernel_32, [FMT_Q4_0], w, acts, out),
            GgmlDType::Q4_1 => by_rows!(kernel_32, [FMT_Q4_1], w, acts, out),
            GgmlDType::Q5_0 => by_rows!(kernel_32, [FMT_Q5_0], w, acts, out),
            _ => by_rows!(kernel_32, [FMT_Q8_0], w, acts, out),
        }
    }
}

/// `out[r][i] = dot(row i of the packed group w, acts[r])` for Q4_K / Q5_K / Q6_K.
pub(crate) fn group_k(
    _: Avx512,
    dtype: GgmlDType,
    w: &[u8],
    acts: &[&[Q8KBlock]],
    out: &mut GroupOut,
    prompt: bool,
) {
    check(w, packed_block_bytes(dtype), acts);
    // SAFETY: the token proves the CPU features; `check` proved the lengths.
    unsafe {
        match dtype {
            GgmlDType::Q6K => by_rows!(kernel_q6k, [], w, acts, out),
            GgmlDType::Q5K if prompt => by_rows!(kernel_q45k, [true, true], w, acts, out),
            GgmlDType::Q5K => by_rows!(kernel_q45k, [true, false], w, acts, out),
            _ if prompt => by_rows!(kernel_q45k, [false, true], w, acts, out),
            _ => by_rows!(kernel_q45k, [false, false], w, acts, out),
        }
    }
}

/// 16 f16 at `p`, widened.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn f16x16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

/// Prefetches the `bytes` bytes at `p` into L1: a hint, which never faults, so `p`
/// may lie past the end of the weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn prefetch(p: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line).cast());
    }
}

/// 4 activation quants from byte `4 * z` of `qs`, broadcast to every lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn act4(qs: *const i8, z: usize) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(qs.add(4 * z).cast::<i32>()))
}

/// The 8 registers of 4-bit quants of a "nibbles" area at `p` (register z holds
/// quants 4z..4z+4 of each row).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> [__m512i; 8] {
    let m4 = _mm512_set1_epi8(0x0F);
    let mut q = [_mm512_setzero_si512(); 8];
    for t in 0..4 {
        let x = _mm512_loadu_si512(p.add(64 * t).cast());
        q[t] = _mm512_and_si512(x, m4);
        q[t + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), m4);
    }
    q
}

/// Adds 16 to the quants whose bit is set in the 8 masks at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn add_fifth_bits(q: &mut [__m512i; 8], p: *const u8) {
    let x10 = _mm512_set1_epi8(0x10);
    for (z, v) in q.iter_mut().enumerate() {
        let k: __mmask64 = std::ptr::read_unaligned(p.add(8 * z).cast::<u64>());
        *v = _mm512_mask_add_epi8(*v, k, *v, x10);
    }
}

/// Q4_0 / Q4_1 / Q5_0 / Q8_0: 16 packed rows x `R` activation rows, each row's dot
/// summed in ggml's AVX2 order (see `scalar::row_32_ggml`): register z of a block
/// holds quants 4z..4z+4 of each row, which is ggml's lane z, so its `vpdpbusd`
/// (less the lane's own offset) is that lane's exact sum, and each lane keeps its
/// own FMA chain (`acc[z]`); Q4_1's `m * s` terms chain apart; the lanes are added
/// as ggml's `hsum_float_8` adds them.
///
/// # Safety
/// CPU features as in [`Avx512::detect`]; lengths as checked by [`check`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn kernel_32<const FMT: u8, const R: usize>(
    w: &[u8],
    acts: &[&[Q8Block]],
    out: &mut GroupOut,
) {
    // Two activation rows at a time (each weight register unpacked once for both):
    // 2 x (8 lane chains + Q4_1's chain) stay in registers.
    // From two rows on, each pass also prefetches its share of the next packed group
    // (the next tile of a thread's contiguous range), so that load overlaps this
    // group's arithmetic without one pass issuing every prefetch. With one row the
    // hardware prefetcher keeps up; with two (one pass, twice one row's arithmetic per
    // byte) it did not: a 2-row SmolLM2 step took longer than a 4-row one.
    let passes = if R >= 2 { R.div_ceil(2) } else { 0 };
    if passes > 1 && FMT != FMT_Q8_0 {
        // The 4-bit formats: the first pass saves its unpacked registers and widened
        // scales, the later passes load them rather than unpack again (unpacking is
        // a sixth of a pass's vector work; the load ports have room to spare).
        let mut saved = SAVED.with(|b| b.take());
        let regs = w.len() / packed_block_bytes_of::<FMT>() * SAVED_REGS;
        if saved.len() < regs {
            // Every register a later pass loads, the first pass stores first.
            saved.resize(regs, _mm512_setzero_si512());
        }
        let sp = saved.as_mut_ptr();
        let [a, b] = rows_32::<FMT, 2, SAVE>(w, [acts[0], acts[1]], Fetch(0, passes), sp);
        (out[0], out[1]) = (a, b);
        let mut r = 2;
        while r + 2 <= R {
            let pair = [acts[r], acts[r + 1]];
            let [a, b] = rows_32::<FMT, 2, FROM_SAVED>(w, pair, Fetch(r / 2, passes), sp);
            (out[r], out[r + 1]) = (a, b);
            r += 2;
        }
        if r < R {
            [out[r]] = rows_32::<FMT, 1, FROM_SAVED>(w, [acts[r]], Fetch(r / 2, passes), sp);
        }
        SAVED.with(|b| b.replace(saved));
        return;
    }
    let none = std::ptr::null_mut();
    let mut r = 0;
    while r + 2 <= R {
        let pair = [acts[r], acts[r + 1]];
        let [a, b] = rows_32::<FMT, 2, UNPACK>(w, pair, Fetch(r / 2, passes), none);
        (out[r], out[r + 1]) = (a, b);
        r += 2;
    }
    if r < R {
        [out[r]] = rows_32::<FMT, 1, UNPACK>(w, [acts[r]], Fetch(r / 2, passes), none);
    }
}

/// Registers one block of a 4-bit group keeps in [`SAVED`]: its 8 quant registers,
/// its scales and (Q4_1) its mins, widened to f32.
const SAVED_REGS: usize = 10;

thread_local! {
    /// The unpacked blocks of the group a [`kernel_32`] call is passing over (taken
    /// out while in use), kept for the next call's allocation.
    static SAVED: std::cell::Cell<Vec<__m512i>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where a [`rows_32`] pass takes a block's registers from: unpacked from the packed
/// group; unpacked and saved for the later passes; loaded as an earlier pass saved
/// them.
const UNPACK: u8 = 0;
const SAVE: u8 = 1;
const FROM_SAVED: u8 = 2;

/// Bytes of one packed block of 16 rows of format `FMT`.
const fn packed_block_bytes_of<const FMT: u8>() -> usize {
    match FMT {
        FMT_Q4_0 => 288,
        FMT_Q4_1 => 320,
        FMT_Q5_0 => 352,
        _ => 544,
    }
}

/// Pass `.0` of `.1` over a packed group prefetches the `.0`-th of `.1` equal shares
/// of each block of the next group (`.1 == 0`: no prefetching).
#[derive(Clone, Copy)]
struct Fetch(usize, usize);

/// `N` activation rows of [`kernel_32`], taking each block's registers as `SRC` says.
///
/// # Safety
/// As [`kernel_32`]; with `SRC` [`SAVE`] or [`FROM_SAVED`], `saved` points at
/// [`SAVED_REGS`] 64-byte-aligned registers per block of `w`, which a `SAVE` pass over
/// the same group has written before any `FROM_SAVED` pass reads them (with
/// [`UNPACK`] it is not read).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_32<const FMT: u8, const N: usize, const SRC: u8>(
    w: &[u8],
    acts: [&[Q8Block]; N],
    fetch: Fetch,
    saved: *mut __m512i,
) -> [[f32; 16]; N] {
    let pb = packed_block_bytes_of::<FMT>();
    let nb = w.len() / pb;
    let wp = w.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    let mut summs = [_mm512_setzero_ps(); N];
    // This pass's share of each block's lines in the next group.
    let lines = pb.div_ceil(64);
    let (lo, hi) = match fetch {
        Fetch(pass, passes @ 1..) => (pass * lines / passes, (pass + 1) * lines / passes),
        _ => (0, 0),
    };
    for b in 0..nb {
        let wb = wp.add(b * pb);
        if hi > lo {
            // The lines of this block's twin in the next group.
            prefetch(wb.wrapping_add(w.len() + 64 * lo), 64 * (hi - lo));
        }
        let sb = saved.wrapping_add(b * SAVED_REGS);
        let (q, dw, mw): ([__m512i; 8], __m512, __m512) = if SRC == FROM_SAVED {
            (
                std::array::from_fn(|z| _mm512_load_si512(sb.add(z).cast())),
                _mm512_castsi512_ps(_mm512_load_si512(sb.add(8).cast())),
                _mm512_castsi512_ps(_mm512_load_si512(sb.add(9).cast())),
            )
        } else {
            let q = match FMT {
                FMT_Q8_0 => std::array::from_fn(|z| _mm512_loadu_si512(wb.add(32 + 64 * z).cast())),
                FMT_Q4_0 => nibbles(wb.add(32)),
                FMT_Q4_1 => nibbles(wb.add(64)),
                _ => {
                    let mut q = nibbles(wb.add(96));
                    add_fifth_bits(&mut q, wb.add(32));
                    q
                }
            };
            let dw = f16x16(wb);
            let mw = if FMT == FMT_Q4_1 {
                f16x16(wb.add(32))
            } else {
                _mm512_setzero_ps()
            };
            if SRC == SAVE {
                for (z, &qz) in q.iter().enumerate() {
                    _mm512_store_si512(sb.add(z).cast(), qz);
                }
                _mm512_store_si512(sb.add(8).cast(), _mm512_castps_si512(dw));
                _mm512_store_si512(sb.add(9).cast(), _mm512_castps_si512(mw));
            }
            (q, dw, mw)
        };
        for r in 0..N {
            let y = &*acts[r].as_ptr().add(b);
            let qs = y.qs.as_ptr();
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(y.d));
            for (z, &qz) in q.iter().enumerate() {
                // Start the lane at -(its offset) times its 4 activation quants.
                let start = match FMT {
                    FMT_Q8_0 => _mm512_set1_epi32(y.starts[z]),
                    FMT_Q4_0 => _mm512_srai_epi32::<4>(_mm512_set1_epi32(y.starts[z])),
                    FMT_Q5_0 => _mm512_srai_epi32::<3>(_mm512_set1_epi32(y.starts[z])),
                    _ => _mm512_setzero_si512(),
                };
                let s = _mm512_dpbusd_epi32(start, qz, act4(qs, z));
                acc[r][z] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[r][z]);
            }
            if FMT == FMT_Q4_1 {
                summs[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(y.s), summs[r]);
            }
        }
    }
    std::array::from_fn(|r| {
        let acc = &acc[r];
        let t: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(acc[i + 4], acc[i]));
        let sum = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
        let mut res = [0f32; 16];
        _mm512_storeu_ps(res.as_mut_ptr(), _mm512_add_ps(sum, summs[r]));
        res
    })
}

/// Q4_K (`FIVE = false`) or Q5_K: 16 packed rows x `R` activation rows.
///
/// # Safety
/// CPU features as in [`Avx512::detect`]; lengths as checked by [`check`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn kernel_q45k<const FIVE: bool, const PROMPT: bool, const R: usize>(
    w: &[u8],
    acts: &[&[Q8KBlock]],
    out: &mut GroupOut,
) {
    let pb = if FIVE { 2880 } else { 2368 };
    let nb = w.len() / pb;
    let wp = w.as_ptr();
    let a: [*const Q8KBlock; R] = std::array::from_fn(|r| acts[r].as_ptr());
    // ggml's repacked Q4_K order: one FMA chain for the scales, one for the mins.
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_m = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let wb = wp.add(b * pb);
        // The same block of the next packed group, loading while this one computes
        // (worth its instructions from two activation rows on).
        if R >= 2 {
            prefetch(wb.wrapping_add(w.len()), pb);
        }
        let dw = f16x16(wb);
        let dmin = f16x16(wb.add(32));
        let scale: [__m512; R] =
            std::array::from_fn(|r| _mm512_mul_ps(dw, _mm512_set1_ps((*a[r].add(b)).d)));
        let mscale: [__m512; R] =
            std::array::from_fn(|r| _mm512_mul_ps(dmin, _mm512_set1_ps((*a[r].add(b)).d)));
        let mut isum = [_mm512_setzero_si512(); R];
        let mut msum = [_mm512_setzero_si512(); R];
        for j in 0..8 {
            let mut q = nibbles(wb.add(320 + 256 * j));
            if FIVE {
                add_fifth_bits(&mut q, wb.add(2368 + 64 * j));
            }
            let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(wb.add(64 + 16 * j).cast()));
            // Mins: lane i gets min[j][i] * (bsums[2j] + bsums[2j + 1]), with the min
            // in both i16 halves of its lane against the pair of bsums.
            let mn = _mm512_cvtepu8_epi32(_mm_loadu_si128(wb.add(192 + 16 * j).cast()));
            let m2 = _mm512_or_si512(mn, _mm512_slli_epi32::<16>(mn));
            for r in 0..R {
                let y = &*a[r].add(b);
                let qs = y.qs.as_ptr().add(32 * j);
                let mut s = _mm512_setzero_si512();
                for (z, &qz) in q.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, qz, act4(qs, z));
                }
                isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(s, sc));
                let bs = y.bsums.as_ptr().add(2 * j);
                let pair = _mm512_set1_epi32(std::ptr::read_unaligned(bs.cast::<i32>()));
                msum[r] = _mm512_dpwssd_epi32(msum[r], m2, pair);
            }
            // GEMV: one FMA per block; GEMM (prompt rows): one per 64 values.
            if j == 7 || (PROMPT && j % 2 == 1) {
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), scale[r], acc[r]);
                    acc_m[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum[r]), mscale[r], acc_m[r]);
                    isum[r] = _mm512_setzero_si512();
                    msum[r] = _mm512_setzero_si512();
                }
            }
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_sub_ps(acc[r], acc_m[r]));
    }
}

/// Q6_K: 16 packed rows x `R` activation rows, in the order of ggml's AVX2
/// `ggml_vec_dot_q6_K_q8_K`: register z of a 32-value part holds quants 4z..4z+4 of
/// each row, ggml's lane z; as ggml, `vpmaddubsw` forms the pair products less the
/// -32 offset's (exact in i16) and `vpdpwssd` adds them times the 16-value scale into
/// the lane's i32; each lane has its own FMA chain per block, and the lanes are added
/// as `hsum_float_8` does. Each weight register is unpacked once for all `R` rows.
///
/// # Safety
/// CPU features as in [`Avx512::detect`]; lengths as checked by [`check`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn kernel_q6k<const R: usize>(w: &[u8], acts: &[&[Q8KBlock]], out: &mut GroupOut) {
    const PB: usize = 3360;
    let nb = w.len() / PB;
    let wp = w.as_ptr();
    let a: [*const Q8KBlock; R] = std::array::from_fn(|r| acts[r].as_ptr());
    let m30 = _mm512_set1_epi8(0x30);
    let m32 = _mm512_set1_epi8(32);
    let lo16 = _mm512_set1_epi32(0xFFFF);
    let mut acc = [[_mm512_setzero_ps(); 8]; R];
    for b in 0..nb {
        let wb = wp.add(b * PB);
        // The same block of the next packed group, loading while this one computes
        // (worth its instructions from two activation rows on).
        if R >= 2 {
            prefetch(wb.wrapping_add(w.len()), PB);
        }
        let mut lanes = [[_mm512_setzero_si512(); 8]; R];
        for p in 0..8 {
            let at = wb.add(288 + 384 * p);
            let mut q = nibbles(at);
            // High bits: register 4h + f takes bits 2f..2f+2 of part h, moved to bits
            // 4..6 (16-bit shifts; the 0x30 mask drops what crossed a byte).
            for h in 0..2 {
                let x = _mm512_loadu_si512(at.add(256 + 64 * h).cast());
                let hs = [
                    _mm512_slli_epi16::<4>(x),
                    _mm512_slli_epi16::<2>(x),
                    x,
                    _mm512_srli_epi16::<2>(x),
                ];
                for (f, &hf) in hs.iter().enumerate() {
                    // q | (hf & 0x30)
                    q[4 * h + f] = _mm512_ternarylogic_epi32::<0xF8>(q[4 * h + f], hf, m30);
                }
            }
            // Each lane's scale in both of its i16 halves.
            let both = |sc: __m512i| {
                _mm512_or_si512(_mm512_and_si512(sc, lo16), _mm512_slli_epi32::<16>(sc))
            };
            let sc0 = both(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                wb.add(32 + 32 * p).cast(),
            )));
            let sc1 = both(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                wb.add(48 + 32 * p).cast(),
            )));
            for r in 0..R {
                let qs = (*a[r].add(b)).qs.as_ptr().add(32 * p);
                for (z, &qz) in q.iter().enumerate() {
                    let y4 = act4(qs, z);
                    let p16 = _mm512_sub_epi16(
                        _mm512_maddubs_epi16(qz, y4),
                        _mm512_maddubs_epi16(m32, y4),
                    );
                    let sc = if z < 4 { sc0 } else { sc1 };
                    lanes[r][z] = _mm512_dpwssd_epi32(lanes[r][z], p16, sc);
                }
            }
        }
        let dw = f16x16(wb);
        for r in 0..R {
            let d = _mm512_mul_ps(_mm512_set1_ps((*a[r].add(b)).d), dw);
            for (acc, &lane) in acc[r].iter_mut().zip(&lanes[r]) {
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane), *acc);
            }
        }
    }
    for r in 0..R {
        let t: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(acc[r][i + 4], acc[r][i]));
        let sum = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
        _mm512_storeu_ps(out[r].as_mut_ptr(), sum);
    }
}
