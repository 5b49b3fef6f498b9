//! The f32 vector loops of a forward pass outside the matmuls (attention scores and
//! weighted sums, softmax, rope, half-precision rounding, SiLU-gated products),
//! compiled twice: as portable code, and the same code with AVX2+FMA+F16C enabled,
//! chosen at run time. The attention loops over the F16 cache (both orders) and
//! softmax also have AVX-512 forms (one 16-lane chain a register, 16 keys' sums
//! reduced together, several query heads of one KV head at once), which perform the
//! very same f32 operations: each is tested bit for bit against the portable loop.
//!
//! Owns the numerics of those loops. Invariants: both builds compute the same
//! formulas; they may differ only in f32 summation order and in fused multiply-adds
//! (the AVX2 build fuses `a * b + c` where the portable build may not). Half-precision
//! rounding is round-to-nearest-even in both (F16C's `vcvtps2ph` with rounding mode 0,
//! or `half`'s conversion). The SiLU uses ggml's vectorised `expf` approximation
//! (`ggml_v_expf`, the AVX-512 form: max error ~1.5 ulp) so it vectorises and follows
//! llama.cpp's CPU code. Slices of the wrong length are programming errors (asserted).

#![allow(unsafe_code)]

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::avx2::Avx2;
#[cfg(target_arch = "x86_64")]
use super::avx512::Avx512;

/// `out[t] = dot(q, keys[t * stride + offset ..][..q.len()]) * scale` for every `t`.
pub fn attention_scores(
    q: &[f32],
    keys: &[f32],
    stride: usize,
    offset: usize,
    scale: f32,
    order: Order,
    out: &mut [f32],
) {
    let n = out.len();
    assert!(
        n == 0 || (n - 1) * stride + offset + q.len() <= keys.len(),
        "attention_scores: {n} keys of stride {stride} do not fit in {}",
        keys.len()
    );
    #[cfg(target_arch = "x86_64")]
    if order == Order::VecDot {
        if let Some(t) = Avx512::detect() {
            // SAFETY: the token proves the AVX-512 features; the lengths are asserted.
            return unsafe {
                scores_avx512::<false>(t, q, keys.as_ptr().cast(), stride, offset, scale, out)
            };
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: the token proves avx2/fma/f16c; the body is safe code.
        return unsafe { scores_avx2(t, q, keys, stride, offset, scale, order, out) };
    }
    scores(q, keys, stride, offset, scale, order, out)
}

/// `out = sum_t p[t] * values[t * stride + offset ..][..out.len()]`, summed in
/// `order` over a KV view of `n_kv` cells (see [`Order`]); `acc` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn weighted_sum(
    p: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    order: Order,
    n_kv: usize,
    acc: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = p.len();
    assert!(
        n == 0 || (n - 1) * stride + offset + out.len() <= values.len(),
        "weighted_sum: {n} values of stride {stride} do not fit in {}",
        values.len()
    );
    #[cfg(target_arch = "x86_64")]
    if order == Order::VecDot && out.len().is_multiple_of(16) {
        if let Some(t) = Avx512::detect() {
            // SAFETY: the token proves the AVX-512 features; the lengths are asserted.
            return unsafe {
                weighted_avx512::<false>(t, p, values.as_ptr().cast(), stride, offset, n_kv, out)
            };
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { weighted_sum_avx2(t, p, values, stride, offset, order, n_kv, acc, out) };
    }
    weighted(p, values, stride, offset, order, n_kv, acc, out)
}

/// A run of cached keys or values: f32, or the bits of half-precision values (an F16
/// KV cache: the same values, widened exactly when read, at half the memory traffic).
#[derive(Clone, Copy, Debug)]
pub enum KvRun<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl KvRun<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvRun::F32(x) => x.len(),
            KvRun::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The run past its first `elems` elements (empty past the end).
    pub fn skip(&self, elems: usize) -> Self {
        match *self {
            KvRun::F32(x) => KvRun::F32(x.get(elems..).unwrap_or_default()),
            KvRun::F16(x) => KvRun::F16(x.get(elems..).unwrap_or_default()),
        }
    }

    /// The values as f32: borrowed, or widened into `buf`.
    fn widen<'b>(&'b self, buf: &'b mut Vec<f32>) -> &'b [f32] {
        match *self {
            KvRun::F32(x) => x,
            KvRun::F16(x) => {
                buf.clear();
                buf.resize(x.len(), 0.0);
                widen_f16(x, buf);
                buf
            }
        }
    }
}

/// [`attention_scores`] over a [`KvRun`]: half-precision keys are read in place by
/// the AVX-512 one-token loop, widened into `wide` otherwise. Same results.
#[allow(clippy::too_many_arguments)]
pub fn attention_scores_kv(
    q: &[f32],
    keys: KvRun<'_>,
    stride: usize,
    offset: usize,
    scale: f32,
    order: Order,
    wide: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = out.len();
    assert!(
        n == 0 || (n - 1) * stride + offset + q.len() <= keys.len(),
        "attention_scores: {n} keys of stride {stride} do not fit in {}",
        keys.len()
    );
    #[cfg(target_arch = "x86_64")]
    if let (Order::VecDot, KvRun::F16(k), Some(t)) = (order, keys, Avx512::detect()) {
        // SAFETY: the token proves the AVX-512 features; the lengths are asserted.
        return unsafe {
            scores_avx512::<true>(t, q, k.as_ptr().cast(), stride, offset, scale, out)
        };
    }
    #[cfg(target_arch = "x86_64")]
    if let (Order::Gemm, true, KvRun::F16(k), Some(t)) =
        (order, q.len().is_multiple_of(16), keys, Avx512::detect())
    {
        // SAFETY: the token proves the AVX-512 features; the lengths are asserted.
        return unsafe { scores_gemm_half_avx512(t, q, k.as_ptr(), stride, offset, scale, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if let (Order::Gemm, true, KvRun::F16(k), Some(t)) =
        (order, q.len().is_multiple_of(16), keys, Avx2::detect())
    {
        // SAFETY: the token proves avx2/fma/f16c; the lengths are asserted.
        return unsafe { scores_gemm_half(t, q, k.as_ptr(), stride, offset, scale, out) };
    }
    attention_scores(q, keys.widen(wide), stride, offset, scale, order, out)
}

/// [`weighted_sum`] over a [`KvRun`], as [`attention_scores_kv`] does.
#[allow(clippy::too_many_arguments)]
pub fn weighted_sum_kv(
    p: &[f32],
    values: KvRun<'_>,
    stride: usize,
    offset: usize,
    order: Order,
    n_kv: usize,
    wide: &mut Vec<f32>,
    acc: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = p.len();
    assert!(
        n == 0 || (n - 1) * stride + offset + out.len() <= values.len(),
        "weighted_sum: {n} values of stride {stride} do not fit in {}",
        values.len()
    );
    #[cfg(target_arch = "x86_64")]
    if let (Order::VecDot, true, KvRun::F16(v), Some(t)) = (
        order,
        out.len().is_multiple_of(16),
        values,
        Avx512::detect(),
    ) {
        // SAFETY: as above.
        return unsafe {
            weighted_avx512::<true>(t, p, v.as_ptr().cast(), stride, offset, n_kv, out)
        };
    }
    #[cfg(target_arch = "x86_64")]
    if let (Order::Gemm, true, KvRun::F16(v), Some(t)) = (
        order,
        out.len().is_multiple_of(16),
        values,
        Avx512::detect(),
    ) {
        // SAFETY: as above.
        return unsafe { weighted_gemm_half_avx512(t, p, v.as_ptr(), stride, offset, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if let (Order::Gemm, true, KvRun::F16(v), Some(t)) =
        (order, out.len().is_multiple_of(8), values, Avx2::detect())
    {
        // SAFETY: as above.
        return unsafe { weighted_gemm_half(t, p, v.as_ptr(), stride, offset, out) };
    }
    weighted_sum(p, values.widen(wide), stride, offset, order, n_kv, acc, out)
}

/// Most query heads the AVX-512 one-token loops take at once (their accumulators
/// fill the registers).
const MAX_HEADS: usize = 4;

/// [`attention_scores_kv`] for the `q.len() / d` query heads that share one KV head:
/// head `h`'s query is `q[h * d..][..d]` and its `n` scores go to
/// `out[h * out_stride..][..n]`. Each head's scores are what [`attention_scores_kv`]
/// gives it alone, bit for bit: the AVX-512 one-token loop widens each half-precision
/// key once for up to [`MAX_HEADS`] heads and keeps every head's chains as they are.
///
/// `prefetch`, a half-precision run laid out as the keys (the values the caller
/// reads next), has each key's row hinted into L2 as the AVX-512 loop reads the
/// key: the weighted sum then finds its strided rows in cache. A hint only.
#[allow(clippy::too_many_arguments)]
pub fn attention_scores_kv_heads(
    q: &[f32],
    d: usize,
    keys: KvRun<'_>,
    stride: usize,
    offset: usize,
    scale: f32,
    order: Order,
    wide: &mut Vec<f32>,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
    prefetch: Option<KvRun<'_>>,
) {
    let heads = q.len() / d.max(1);
    assert!(
        q.len() == heads * d
            && (heads == 0 || (heads - 1) * out_stride + n <= out.len())
            && (n == 0 || (n - 1) * stride + offset + d <= keys.len()),
        "attention_scores_kv_heads: {heads} heads of {d}, {n} keys of stride {stride} in {}",
        keys.len()
    );
    #[cfg(target_arch = "x86_64")]
    let fast = match (order, keys, Avx512::detect()) {
        (Order::VecDot, KvRun::F16(k), Some(t)) => Some((t, k.as_ptr().cast::<u8>())),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let fast: Option<((), ())> = None;
    // Rows of `prefetch` the loop hints into cache beside each key: a hint, so any
    // address is sound; only half-precision runs as long as the keys take it.
    #[cfg(target_arch = "x86_64")]
    let pf = match prefetch {
        Some(KvRun::F16(v)) if n == 0 || (n - 1) * stride + offset + d <= v.len() => {
            v.as_ptr().cast::<u8>()
        }
        _ => std::ptr::null(),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = prefetch;
    for (h, g) in head_chunks(heads, fast.is_some()) {
        #[cfg(target_arch = "x86_64")]
        if let (Some((t, k)), 2..) = (fast, g) {
            let (q, out) = (&q[h * d..(h + g) * d], &mut out[h * out_stride..]);
            let (o, f) = (out_stride, if h == 0 { pf } else { std::ptr::null() });
            // SAFETY: the token proves the AVX-512 features; the lengths are asserted.
            unsafe {
                match g {
                    2 => {
                        scores_avx512_heads::<true, 2>(t, q, k, stride, offset, scale, n, out, o, f)
                    }
                    3 => {
                        scores_avx512_heads::<true, 3>(t, q, k, stride, offset, scale, n, out, o, f)
                    }
                    _ => {
                        scores_avx512_heads::<true, 4>(t, q, k, stride, offset, scale, n, out, o, f)
                    }
                }
            }
            continue;
        }
        let (qh, row) = (&q[h * d..(h + 1) * d], &mut out[h * out_stride..][..n]);
        attention_scores_kv(qh, keys, stride, offset, scale, order, wide, row);
    }
}

/// `(first head, heads)` of each chunk a heads loop takes: up to [`MAX_HEADS`] at a
/// time on the fast path, else one at a time.
fn head_chunks(heads: usize, fast: bool) -> impl Iterator<Item = (usize, usize)> {
    let step = if fast { MAX_HEADS } else { 1 };
    (0..heads)
        .step_by(step)
        .map(move |h| (h, step.min(heads - h)))
}

/// [`weighted_sum_kv`] for the `out.len() / d` query heads that share one KV head:
/// head `h`'s weights are `p[h * n..][..n]`, its output `out[h * d..][..d]`. Each
/// head's output is what [`weighted_sum_kv`] gives it alone, bit for bit: the AVX-512
/// one-token loop widens each half-precision value once for up to [`MAX_HEADS`] heads.
#[allow(clippy::too_many_arguments)]
pub fn weighted_sum_kv_heads(
    p: &[f32],
    n: usize,
    values: KvRun<'_>,
    stride: usize,
    offset: usize,
    order: Order,
    n_kv: usize,
    wide: &mut Vec<f32>,
    acc: &mut Vec<f32>,
    d: usize,
    out: &mut [f32],
) {
    let heads = out.len() / d.max(1);
    assert!(
        out.len() == heads * d
            && p.len() == heads * n
            && (n == 0 || (n - 1) * stride + offset + d <= values.len()),
        "weighted_sum_kv_heads: {heads} heads of {d}, {n} values of stride {stride} in {}",
        values.len()
    );
    #[cfg(target_arch = "x86_64")]
    let fast = match (order, d.is_multiple_of(16), values, Avx512::detect()) {
        (Order::VecDot, true, KvRun::F16(v), Some(t)) => Some((t, v.as_ptr().cast::<u8>())),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let fast: Option<((), ())> = None;
    for (h, g) in head_chunks(heads, fast.is_some()) {
        #[cfg(target_arch = "x86_64")]
        if let (Some((t, v)), 2..) = (fast, g) {
            let (p, out) = (&p[h * n..(h + g) * n], &mut out[h * d..(h + g) * d]);
            // SAFETY: the token proves the AVX-512 features; the lengths are asserted.
            unsafe {
                match g {
                    2 => weighted_avx512_heads::<true, 2, 8>(t, p, n, v, stride, offset, n_kv, out),
                    3 => weighted_avx512_heads::<true, 3, 8>(t, p, n, v, stride, offset, n_kv, out),
                    _ => weighted_avx512_heads::<true, 4, 4>(t, p, n, v, stride, offset, n_kv, out),
                }
            }
            continue;
        }
        let (ph, oh) = (&p[h * n..(h + 1) * n], &mut out[h * d..(h + 1) * d]);
        weighted_sum_kv(ph, values, stride, offset, order, n_kv, wide, acc, oh);
    }
}

/// `out[i]` = the half-precision rounding of `x[i]`, as bits (round to nearest even).
pub fn narrow_to_f16(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len(), "narrow_to_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { narrow_avx2(t, x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f16::from_f32(v).to_bits();
    }
}

/// `out[i]` = the half-precision value with bits `x[i]`, widened (exact).
pub fn widen_f16(x: &[u16], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "widen_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { widen_avx2(t, x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f16::from_bits(v).to_f32();
    }
}

/// Rounds every value to half precision (and back), as storing it in an F16 tensor
/// does.
pub fn round_to_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { round_avx2(t, x) };
    }
    round_portable(x)
}

/// Softmax in place, as ggml's `soft_max` computes it on AVX-512 CPUs: the maximum,
/// then `exp(x - max)` with `ggml_v_expf` for each group of 16 values (a last,
/// partial group as if padded with masked entries, as llama.cpp's KV views are),
/// each group's sum reduced in f32 ([`reduce16`]) and accumulated in f64, and the
/// values scaled by `1 / sum`. Masked entries (`-inf`) become 0.
pub fn softmax(scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx512::detect() {
        // SAFETY: the token proves the AVX-512 features.
        return unsafe { softmax_avx512(t, scores) };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { softmax_avx2(t, scores) };
    }
    softmax_portable(scores)
}

#[inline(always)]
fn softmax_portable(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    let mut groups = scores.chunks_exact_mut(16);
    for g in &mut groups {
        for v in g.iter_mut() {
            *v = expf(*v - max);
        }
        let g: &[f32; 16] = (&*g).try_into().unwrap_or(&[0.0; 16]);
        sum += f64::from(reduce16(g));
    }
    // ggml's rows are padded to whole groups with masked (-inf) entries: the tail
    // is one more group whose missing values are zeros.
    let tail = groups.into_remainder();
    if !tail.is_empty() {
        let mut g = [0f32; 16];
        for (v, g) in tail.iter_mut().zip(g.iter_mut()) {
            *v = expf(*v - max);
            *g = *v;
        }
        sum += f64::from(reduce16(&g));
    }
    let inv = (1.0 / sum) as f32;
    for v in scores.iter_mut() {
        *v *= inv;
    }
}

/// `gate = silu(gate) * up` (ggml `swiglu`).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in length");
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { swiglu_avx2(t, gate, up) };
    }
    swiglu_portable(gate, up)
}

/// Rotates each head of `x` (heads of `head_dim` values) by the `[cos, sin]` of each
/// pair in `table` (`head_dim / 2` of them): pair `i` is elements `(2i, 2i + 1)`, or
/// `(i, i + head_dim / 2)` with `neox`. One FMA per output, as ggml-cpu's compiled rope
/// (GCC contracts each line into one), so both builds give the same bits; the AVX2
/// build only makes `mul_add` an instruction instead of a call.
pub fn rope(x: &mut [f32], head_dim: usize, table: &[[f32; 2]], neox: bool) {
    assert!(
        table.len() * 2 == head_dim && x.len().is_multiple_of(head_dim),
        "rope: {} values in heads of {head_dim} with {} pairs",
        x.len(),
        table.len()
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { rope_avx2(t, x, head_dim, table, neox) };
    }
    rope_portable(x, head_dim, table, neox)
}

#[inline(always)]
fn rope_portable(x: &mut [f32], head_dim: usize, table: &[[f32; 2]], neox: bool) {
    let pairs = table.len();
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &[cos, sin]) in table.iter().enumerate() {
            let (a, b) = if neox {
                (i, i + pairs)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0.mul_add(cos, -(x1 * sin));
            head[b] = x0.mul_add(sin, x1 * cos);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn rope_avx2(_: Avx2, x: &mut [f32], head_dim: usize, table: &[[f32; 2]], neox: bool) {
    rope_portable(x, head_dim, table, neox)
}

/// GCC's `_mm512_reduce_add_ps`: halves, then quarters, then pairs, then the last two.
#[inline(always)]
fn reduce16(a: &[f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| a[i + 8] + a[i]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i + 4] + h[i]);
    (q[0] + q[2]) + (q[1] + q[3])
}

/// How llama.cpp's CPU `mul_mat` over an F16 KV cache sums a dot product of `k`
/// terms. [`Order::Gemm`]: a pass of two or more tokens goes through llamafile's
/// tinyBLAS (16 lanes, one FMA chain each over the 16-term chunks, then
/// [`reduce16`]) when `k` is a multiple of 16; otherwise (and for one token)
/// `ggml_vec_dot_f16`: four chains of 16 lanes over 64-term steps, added
/// `(0+2)+(1+3)`, [`reduce16`], then the leftover terms one by one in f64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Gemm,
    VecDot,
}

impl Order {
    /// The order llama.cpp uses for a pass of `tokens` tokens over `k`-term dots.
    pub fn for_pass(tokens: usize, k: usize) -> Order {
        if tokens >= 2 && k.is_multiple_of(16) {
            Order::Gemm
        } else {
            Order::VecDot
        }
    }
}

/// `sum(a[i] * b[i])` in `order` (`a.len()` terms).
#[inline(always)]
fn dot(a: &[f32], b: &[f32], order: Order) -> f32 {
    let n = a.len();
    match order {
        Order::Gemm => {
            let mut acc = [0f32; 16];
            for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
                for l in 0..16 {
                    acc[l] = x[l].mul_add(y[l], acc[l]);
                }
            }
            reduce16(&acc)
        }
        Order::VecDot => {
            let np = n / 64 * 64;
            let mut acc = [[0f32; 16]; 4];
            for (x, y) in a[..np].chunks_exact(64).zip(b[..np].chunks_exact(64)) {
                for (j, acc) in acc.iter_mut().enumerate() {
                    for l in 0..16 {
                        acc[l] = x[16 * j + l].mul_add(y[16 * j + l], acc[l]);
                    }
                }
            }
            let lanes: [f32; 16] =
                std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
            let mut sum = f64::from(reduce16(&lanes));
            for (x, y) in a[np..].iter().zip(&b[np..]) {
                sum += f64::from(x * y);
            }
            sum as f32
        }
    }
}

#[inline(always)]
fn scores(
    q: &[f32],
    keys: &[f32],
    stride: usize,
    offset: usize,
    scale: f32,
    order: Order,
    out: &mut [f32],
) {
    let d = q.len();
    let key = |t: usize| &keys[t * stride + offset..t * stride + offset + d];
    let n = out.len();
    let mut t = 0;
    if order == Order::Gemm {
        // Four keys at once: four independent FMA chains (each key's own chain is
        // unchanged), so the loop runs at throughput rather than latency.
        while t + 4 <= n {
            let ks = [key(t), key(t + 1), key(t + 2), key(t + 3)];
            let mut acc = [[0f32; 16]; 4];
            for c in (0..d / 16 * 16).step_by(16) {
                for (acc, k) in acc.iter_mut().zip(&ks) {
                    for l in 0..16 {
                        acc[l] = k[c + l].mul_add(q[c + l], acc[l]);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                out[t + j] = reduce16(acc) * scale;
            }
            t += 4;
        }
    }
    for (t, o) in out.iter_mut().enumerate().skip(t) {
        *o = dot(key(t), q, order) * scale;
    }
}

/// `out[i] = sum_t p[t] * value(t)[i]` in `order`, over a KV view of `n_kv` cells
/// (`p.len()` of them used, the rest zero). `acc` is scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted(
    p: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    order: Order,
    n_kv: usize,
    acc: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = out.len();
    let value = |t: usize| &values[t * stride + offset..t * stride + offset + d];
    let n = p.len();
    // acc[(chain * 16 + lane) * d + i]: one FMA chain per output, lane and chain.
    let chains = if order == Order::Gemm { 1 } else { 4 };
    acc.clear();
    acc.resize(chains * 16 * d, 0.0);
    let vector_part = match order {
        Order::Gemm => n,
        Order::VecDot => n.min(n_kv / 64 * 64),
    };
    for (t, &w) in p.iter().enumerate().take(vector_part) {
        let slot = match order {
            Order::Gemm => t % 16,
            Order::VecDot => t % 64,
        };
        let v = value(t);
        let a = &mut acc[slot * d..(slot + 1) * d];
        for (a, &x) in a.iter_mut().zip(v) {
            *a = x.mul_add(w, *a);
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        let lane = |c: usize, l: usize| acc[(c * 16 + l) * d + i];
        *o = match order {
            Order::Gemm => reduce16(&std::array::from_fn(|l| lane(0, l))),
            Order::VecDot => {
                let lanes: [f32; 16] =
                    std::array::from_fn(|l| (lane(0, l) + lane(2, l)) + (lane(1, l) + lane(3, l)));
                let mut sum = f64::from(reduce16(&lanes));
                for (t, &w) in p.iter().enumerate().skip(vector_part) {
                    sum += f64::from(value(t)[i] * w);
                }
                sum as f32
            }
        };
    }
}

fn round_portable(x: &mut [f32]) {
    for v in x {
        *v = f16::from_f32(*v).to_f32();
    }
}

/// ggml's `ggml_v_expf` (AVX-512 form) for one value: exp(x) by a degree-5
/// polynomial on the reduced argument and an exact power-of-two scale.
#[inline(always)]
fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 125.0 {
        // Outside the exponent range: what ggml's blend yields (0 or infinity).
        return if n > 0.0 { f32::INFINITY } else { 0.0 };
    }
    // j * 2^n, exactly (n is an integer in [-125, 125]).
    f32::from_bits((j.to_bits() as i32 + ((n as i32) << 23)) as u32)
}

#[inline(always)]
fn swiglu_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = x / (1.0 + expf(-x)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn scores_avx2(
    _: Avx2,
    q: &[f32],
    keys: &[f32],
    stride: usize,
    offset: usize,
    scale: f32,
    order: Order,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let n = out.len();
    let mut t = 0;
    if order == Order::Gemm {
        // Four keys at once, each key's 16 lanes in two registers (lanes 0..8 and
        // 8..16): the same chains and the same `reduce16` as `dot`, interleaved.
        let reduce = |lo: __m256, hi: __m256| -> f32 {
            // a[i + 8] + a[i], then [i + 4] + [i], then (0 + 2) + (1 + 3).
            let h = _mm256_add_ps(hi, lo);
            let q4 = _mm_add_ps(_mm256_extractf128_ps::<1>(h), _mm256_castps256_ps128(h));
            let t2 = _mm_add_ps(q4, _mm_movehl_ps(q4, q4));
            _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)))
        };
        while t + 4 <= n {
            let base: [usize; 4] = std::array::from_fn(|j| (t + j) * stride + offset);
            assert!(base[3] + d <= keys.len());
            let mut lo = [_mm256_setzero_ps(); 4];
            let mut hi = [_mm256_setzero_ps(); 4];
            for c in (0..d).step_by(16) {
                // SAFETY: c + 16 <= d (d is a multiple of 16 in this order), and every
                // key's run base[j] .. base[j] + d lies inside `keys` (asserted).
                unsafe {
                    let q0 = _mm256_loadu_ps(q.as_ptr().add(c));
                    let q1 = _mm256_loadu_ps(q.as_ptr().add(c + 8));
                    for j in 0..4 {
                        let k = keys.as_ptr().add(base[j] + c);
                        lo[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k), q0, lo[j]);
                        hi[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k.add(8)), q1, hi[j]);
                    }
                }
            }
            for j in 0..4 {
                out[t + j] = reduce(lo[j], hi[j]) * scale;
            }
            t += 4;
        }
    }
    let key = |t: usize| &keys[t * stride + offset..t * stride + offset + d];
    for (t, o) in out.iter_mut().enumerate().skip(t) {
        *o = dot(key(t), q, order) * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn weighted_sum_avx2(
    _: Avx2,
    p: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    order: Order,
    n_kv: usize,
    acc: &mut Vec<f32>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = out.len();
    let n = p.len();
    if !d.is_multiple_of(8) {
        return weighted(p, values, stride, offset, order, n_kv, acc, out);
    }
    assert!(n == 0 || (n - 1) * stride + offset + d <= values.len());
    // SAFETY (every use): t < n and i + 8 <= d, so the 8 values lie inside `values`
    // (asserted above).
    let at = |t: usize, i: usize| unsafe {
        _mm256_loadu_ps(values.as_ptr().add(t * stride + offset + i))
    };
    let reduce16 = |a: &[__m256; 16]| {
        let h: [__m256; 8] = std::array::from_fn(|l| _mm256_add_ps(a[l + 8], a[l]));
        let q: [__m256; 4] = std::array::from_fn(|l| _mm256_add_ps(h[l + 4], h[l]));
        _mm256_add_ps(_mm256_add_ps(q[0], q[2]), _mm256_add_ps(q[1], q[3]))
    };
    if order == Order::VecDot {
        // ggml_vec_dot_f16's four chains of 16 lanes per 64-position step, one chain
        // at a time (position 64 s + 16 j + l feeds chain j, lane l), then the
        // leftover positions past the view's last whole step, in f64.
        let vector_part = n.min(n_kv / 64 * 64);
        for i in (0..d).step_by(8) {
            let mut chains = [[_mm256_setzero_ps(); 16]; 4];
            for (j, a) in chains.iter_mut().enumerate() {
                for base in (0..vector_part).step_by(64) {
                    let from = base + 16 * j;
                    let len = 16.min(vector_part.saturating_sub(from));
                    for (l, a) in a.iter_mut().enumerate().take(len) {
                        let t = from + l;
                        *a = _mm256_fmadd_ps(at(t, i), _mm256_set1_ps(p[t]), *a);
                    }
                }
            }
            let lanes: [__m256; 16] = std::array::from_fn(|l| {
                _mm256_add_ps(
                    _mm256_add_ps(chains[0][l], chains[2][l]),
                    _mm256_add_ps(chains[1][l], chains[3][l]),
                )
            });
            let mut r = [0f32; 8];
            // SAFETY: `r` holds 8 f32s.
            unsafe { _mm256_storeu_ps(r.as_mut_ptr(), reduce16(&lanes)) };
            for (k, r) in r.iter().enumerate() {
                let mut sum = f64::from(*r);
                for (t, &w) in p.iter().enumerate().skip(vector_part) {
                    sum += f64::from(values[t * stride + offset + i + k] * w);
                }
                out[i + k] = sum as f32;
            }
        }
        return;
    }
    // Eight outputs at a time with their 16 lane chains in registers (chain t % 16
    // takes position t, as in `weighted`), then `reduce16` across the chains.
    for i in (0..d).step_by(8) {
        let mut a = [_mm256_setzero_ps(); 16];
        let whole = n / 16 * 16;
        for t0 in (0..whole).step_by(16) {
            for l in 0..16 {
                a[l] = _mm256_fmadd_ps(at(t0 + l, i), _mm256_set1_ps(p[t0 + l]), a[l]);
            }
        }
        for (l, (a, &w)) in a.iter_mut().zip(&p[whole..]).enumerate() {
            *a = _mm256_fmadd_ps(at(whole + l, i), _mm256_set1_ps(w), *a);
        }
        let r = reduce16(&a);
        // SAFETY: i + 8 <= d = out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), r) };
    }
}

/// [`scores`] in [`Order::VecDot`] with AVX-512: each of `dot`'s four chains of 16
/// lanes is one register (the same FMAs in the same order), then `(0+2)+(1+3)`,
/// [`reduce16`] and the leftover terms in f64, as `dot`; four keys at a time so
/// their chains overlap. `keys` points at f16 bits when `HALF` (widened exactly on
/// load), else at f32s.
///
/// # Safety
/// AVX-512 as the token proves; every key `t < out.len()`, elements
/// `t * stride + offset .. + q.len()`, lies inside the allocation `keys` points into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scores_avx512<const HALF: bool>(
    t: Avx512,
    q: &[f32],
    keys: *const u8,
    stride: usize,
    offset: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = out.len();
    // SAFETY: the caller's contract is the one-head case of the heads loop's.
    unsafe {
        scores_avx512_heads::<HALF, 1>(
            t,
            q,
            keys,
            stride,
            offset,
            scale,
            n,
            out,
            n,
            std::ptr::null(),
        )
    }
}

/// [`weighted`] in [`Order::VecDot`] with AVX-512, for 16 outputs at a time
/// (`out.len()` a multiple of 16): one register per lane of a chain, the chains one
/// after the other (position `64 s + 16 j + l` feeds chain `j`, lane `l`), then
/// `(0+2)+(1+3)`, [`reduce16`] across the lanes and the leftover positions past the
/// view's last whole step in f64, as `weighted` sums them. `values` points at f16
/// bits when `HALF`, else at f32s.
///
/// # Safety
/// AVX-512 as the token proves; every value `t < p.len()`, elements
/// `t * stride + offset .. + out.len()`, lies inside the allocation `values` points into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn weighted_avx512<const HALF: bool>(
    t: Avx512,
    p: &[f32],
    values: *const u8,
    stride: usize,
    offset: usize,
    n_kv: usize,
    out: &mut [f32],
) {
    // SAFETY: the caller's contract is the one-head case of the heads loop's.
    unsafe {
        weighted_avx512_heads::<HALF, 1, 16>(t, p, p.len(), values, stride, offset, n_kv, out)
    }
}

/// [`reduce16`] of 16 registers at once: lane `k` of the result is the sum of
/// `v[k]`'s lanes, by the very same adds (`a[i + 8] + a[i]`, then `[i + 4] + [i]`,
/// then `(0 + 2) + (1 + 3)`), done for several registers per instruction after
/// shuffles instead of one register at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn reduce16_x16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Halves: registers 2p and 2p + 1 side by side, 8 sums each.
    let a: [__m512; 8] = std::array::from_fn(|p| {
        let (x, y) = (v[2 * p], v[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        )
    });
    // Quarters: 128-bit lane j of b[p] = register 4p + j's 4 sums.
    let b: [__m512; 4] = std::array::from_fn(|p| {
        let (x, y) = (a[2 * p], a[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        )
    });
    // (0 + 2) and (1 + 3): lane j of c[p] = [r.t0, r.t1, r'.t0, r'.t1] for registers
    // r = 8p + j and r' = 8p + 4 + j.
    let c: [__m512; 2] = std::array::from_fn(|p| {
        let (x, y) = (b[2 * p], b[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(x, y),
            _mm512_shuffle_ps::<0xEE>(x, y),
        )
    });
    // t0 + t1: element 4j + e holds register j + 4e; put register k at element k.
    let d = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(c[0], c[1]),
        _mm512_shuffle_ps::<0xDD>(c[0], c[1]),
    );
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, d)
}

/// [`scores_avx512`] for `G` query heads at once (`q` holds them one after the other;
/// `keys` f16 bits when `HALF`, else f32s): each key's registers are loaded (widened)
/// once and feed every head's own four chains, which see the very same FMAs in the
/// same order as alone; the 16-lane sums of 16 keys are then reduced together
/// ([`reduce16_x16`]). Head `h`'s `n` scores go to `out[h * out_stride..]`.
///
/// # Safety
/// AVX-512 as the token proves; `q.len()` a multiple of `G`; every key `t < n`,
/// elements `t * stride + offset .. + q.len() / G`, inside the allocation `keys`
/// points into; `out` holds `(G - 1) * out_stride + n` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx512_heads<const HALF: bool, const G: usize>(
    _: Avx512,
    q: &[f32],
    keys: *const u8,
    stride: usize,
    offset: usize,
    scale: f32,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
    prefetch: *const u8,
) {
    use std::arch::x86_64::*;
    let d = q.len() / G;
    let np = d / 64 * 64;
    let elem_bytes = if HALF { 2 } else { 4 };
    // lanes[h][j]: head h's four chains added (0+2)+(1+3) for key t0 + j.
    let mut lanes = [[_mm512_setzero_ps(); 16]; G];
    for t0 in (0..n).step_by(16) {
        let kn = 16.min(n - t0);
        for j in 0..kn {
            let base = (t0 + j) * stride + offset;
            if !prefetch.is_null() {
                // The first and last byte of the same row of `prefetch` (a hint: no
                // fault, whatever the address).
                let row = prefetch.wrapping_add(base * elem_bytes);
                _mm_prefetch::<_MM_HINT_T1>(row.cast());
                _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(d * elem_bytes - 1).cast());
            }
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            for s in (0..np).step_by(64) {
                // SAFETY: s + 64 <= d, inside key t0 + j's run and each head's query.
                unsafe {
                    let kv: [__m512; 4] =
                        std::array::from_fn(|c| load16::<HALF>(keys, base + s + 16 * c));
                    for (h, acc) in acc.iter_mut().enumerate() {
                        let qp = q.as_ptr().add(h * d + s);
                        for (c, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(kv[c], _mm512_loadu_ps(qp.add(16 * c)), *a);
                        }
                    }
                }
            }
            for (lanes, a) in lanes.iter_mut().zip(&acc) {
                lanes[j] = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            }
        }
        for (h, lanes) in lanes.iter().enumerate() {
            // Registers past `kn` hold stale values; their sums are not used.
            let mut sums = [0f32; 16];
            // SAFETY: `sums` holds 16 f32s.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce16_x16(lanes)) };
            for (j, &x) in sums.iter().enumerate().take(kn) {
                let base = (t0 + j) * stride + offset;
                let mut sum = f64::from(x);
                for i in np..d {
                    // SAFETY: i < d, inside key t0 + j's run.
                    let k = unsafe { elem::<HALF>(keys, base + i) };
                    sum += f64::from(k * q[h * d + i]);
                }
                out[h * out_stride + t0 + j] = sum as f32 * scale;
            }
        }
    }
}

/// [`weighted_avx512`] for `G` heads at once (`p` holds their `n` weights each, one
/// head after the other; `out` their outputs; `values` f16 bits when `HALF`, else
/// f32s): each value register is loaded (widened) once and feeds every head's
/// accumulator of that chain and lane, `L` lanes of a chain at a time (so `G x L`
/// accumulators stay in registers); every head sees the very same FMAs in the same
/// order as alone, then the same sums.
///
/// # Safety
/// AVX-512 as the token proves; `out.len()` = `G` x a multiple of 16; `p.len()` =
/// `G * n`; `L` divides 16; every value `t < n`, elements
/// `t * stride + offset .. + out.len() / G`, inside the allocation `values` points
/// into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_avx512_heads<const HALF: bool, const G: usize, const L: usize>(
    _: Avx512,
    p: &[f32],
    n: usize,
    values: *const u8,
    stride: usize,
    offset: usize,
    n_kv: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = out.len() / G;
    let vector_part = n.min(n_kv / 64 * 64);
    // SAFETY (every use): t < n and i + 16 <= d, inside the caller's values.
    let at = |t: usize, i: usize| unsafe { load16::<HALF>(values, t * stride + offset + i) };
    for i in (0..d).step_by(16) {
        // chains[h][j][l]: head h's chain j, lane l (position 64 s + 16 j + l).
        let mut chains = [[[_mm512_setzero_ps(); 16]; 4]; G];
        for j in 0..4 {
            for lb in (0..16).step_by(L) {
                let mut a = [[_mm512_setzero_ps(); L]; G];
                for base in (0..vector_part).step_by(64) {
                    let from = base + 16 * j + lb;
                    for l in 0..L {
                        let t = from + l;
                        if t < vector_part {
                            let v = at(t, i);
                            for (h, a) in a.iter_mut().enumerate() {
                                let w = _mm512_set1_ps(p[h * n + t]);
                                a[l] = _mm512_fmadd_ps(v, w, a[l]);
                            }
                        }
                    }
                }
                for (chain, a) in chains.iter_mut().zip(&a) {
                    chain[j][lb..lb + L].copy_from_slice(a);
                }
            }
        }
        for (h, chains) in chains.iter().enumerate() {
            let lanes: [__m512; 16] = std::array::from_fn(|l| {
                _mm512_add_ps(
                    _mm512_add_ps(chains[0][l], chains[2][l]),
                    _mm512_add_ps(chains[1][l], chains[3][l]),
                )
            });
            let hh: [__m512; 8] = std::array::from_fn(|l| _mm512_add_ps(lanes[l + 8], lanes[l]));
            let q: [__m512; 4] = std::array::from_fn(|l| _mm512_add_ps(hh[l + 4], hh[l]));
            let r = _mm512_add_ps(_mm512_add_ps(q[0], q[2]), _mm512_add_ps(q[1], q[3]));
            // The positions past the last whole step, in f64, output by output in
            // position order (8 outputs to a register): each product rounded to f32
            // first, as `weighted` adds them.
            let upper =
                |v: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let mut lo = _mm512_cvtps_pd(_mm512_castps512_ps256(r));
            let mut hi = _mm512_cvtps_pd(upper(r));
            for t in vector_part..n {
                let prod = _mm512_mul_ps(at(t, i), _mm512_set1_ps(p[h * n + t]));
                lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(prod)));
                hi = _mm512_add_pd(hi, _mm512_cvtps_pd(upper(prod)));
            }
            let o = out.as_mut_ptr().add(h * d + i);
            // SAFETY: h * d + i + 16 <= out.len().
            unsafe {
                _mm256_storeu_ps(o, _mm512_cvtpd_ps(lo));
                _mm256_storeu_ps(o.add(8), _mm512_cvtpd_ps(hi));
            }
        }
    }
}

/// `scores_avx2`'s [`Order::Gemm`] loop over half-precision keys (widened exactly on
/// load): per key, 16 lanes in two registers, one FMA chain each over the 16-term
/// chunks, then [`reduce16`], as `dot`; up to four keys at a time.
///
/// # Safety
/// avx2/fma/f16c as the token proves; `q.len()` a multiple of 16; every key
/// `t < out.len()`, elements `t * stride + offset .. + q.len()`, inside the allocation
/// `keys` points into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_gemm_half(
    _: Avx2,
    q: &[f32],
    keys: *const u16,
    stride: usize,
    offset: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let reduce = |lo: __m256, hi: __m256| -> f32 {
        // a[i + 8] + a[i], then [i + 4] + [i], then (0 + 2) + (1 + 3).
        let h = _mm256_add_ps(hi, lo);
        let q4 = _mm_add_ps(_mm256_extractf128_ps::<1>(h), _mm256_castps256_ps128(h));
        let t2 = _mm_add_ps(q4, _mm_movehl_ps(q4, q4));
        _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)))
    };
    let load8 = |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(keys.add(at).cast()));
    let mut t = 0;
    for o in out.chunks_mut(4) {
        let kn = o.len();
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        for c in (0..d).step_by(16) {
            let q0 = _mm256_loadu_ps(q.as_ptr().add(c));
            let q1 = _mm256_loadu_ps(q.as_ptr().add(c + 8));
            for j in 0..kn {
                let k = (t + j) * stride + offset + c;
                lo[j] = _mm256_fmadd_ps(load8(k), q0, lo[j]);
                hi[j] = _mm256_fmadd_ps(load8(k + 8), q1, hi[j]);
            }
        }
        for (j, o) in o.iter_mut().enumerate() {
            *o = reduce(lo[j], hi[j]) * scale;
        }
        t += kn;
    }
}

/// `weighted_sum_avx2`'s [`Order::Gemm`] loop over half-precision values (widened
/// exactly on load): eight outputs at a time, chain `t % 16` takes position `t`, then
/// [`reduce16`] across the chains, as `weighted`.
///
/// # Safety
/// avx2/fma/f16c as the token proves; `out.len()` a multiple of 8; every value
/// `t < p.len()`, elements `t * stride + offset .. + out.len()`, inside the allocation
/// `values` points into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_gemm_half(
    _: Avx2,
    p: &[f32],
    values: *const u16,
    stride: usize,
    offset: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, n) = (out.len(), p.len());
    let at = |t: usize, i: usize| {
        _mm256_cvtph_ps(_mm_loadu_si128(values.add(t * stride + offset + i).cast()))
    };
    let reduce16 = |a: &[__m256; 16]| {
        let h: [__m256; 8] = std::array::from_fn(|l| _mm256_add_ps(a[l + 8], a[l]));
        let q: [__m256; 4] = std::array::from_fn(|l| _mm256_add_ps(h[l + 4], h[l]));
        _mm256_add_ps(_mm256_add_ps(q[0], q[2]), _mm256_add_ps(q[1], q[3]))
    };
    let whole = n / 16 * 16;
    for i in (0..d).step_by(8) {
        let mut a = [_mm256_setzero_ps(); 16];
        for t0 in (0..whole).step_by(16) {
            for l in 0..16 {
                a[l] = _mm256_fmadd_ps(at(t0 + l, i), _mm256_set1_ps(p[t0 + l]), a[l]);
            }
        }
        for (l, (a, &w)) in a.iter_mut().zip(&p[whole..]).enumerate() {
            *a = _mm256_fmadd_ps(at(whole + l, i), _mm256_set1_ps(w), *a);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(i), reduce16(&a));
    }
}

/// [`scores_gemm_half`] with AVX-512: each key's 16 lanes are one register (the same
/// FMAs in the same order), sixteen keys at a time so their chains overlap and their
/// sums reduce together ([`reduce16_x16`]).
///
/// # Safety
/// AVX-512 as the token proves; `q.len()` a multiple of 16; every key `t < out.len()`,
/// elements `t * stride + offset .. + q.len()`, inside the allocation `keys` points
/// into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scores_gemm_half_avx512(
    _: Avx512,
    q: &[f32],
    keys: *const u16,
    stride: usize,
    offset: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let keys = keys.cast::<u8>();
    let mut t = 0;
    for o in out.chunks_mut(16) {
        let kn = o.len();
        let mut acc = [_mm512_setzero_ps(); 16];
        for c in (0..d).step_by(16) {
            let qc = _mm512_loadu_ps(q.as_ptr().add(c));
            for (j, a) in acc.iter_mut().enumerate().take(kn) {
                let k = load16::<true>(keys, (t + j) * stride + offset + c);
                *a = _mm512_fmadd_ps(k, qc, *a);
            }
        }
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), reduce16_x16(&acc));
        for (o, x) in o.iter_mut().zip(sums) {
            *o = x * scale;
        }
        t += kn;
    }
}

/// [`weighted_gemm_half`] with AVX-512: sixteen outputs at a time in one register per
/// chain (chain `t % 16` takes position `t`), then [`reduce16`] across the chains.
///
/// # Safety
/// AVX-512 as the token proves; `out.len()` a multiple of 16; every value
/// `t < p.len()`, elements `t * stride + offset .. + out.len()`, inside the allocation
/// `values` points into.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn weighted_gemm_half_avx512(
    _: Avx512,
    p: &[f32],
    values: *const u16,
    stride: usize,
    offset: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, n) = (out.len(), p.len());
    let values = values.cast::<u8>();
    let at = |t: usize, i: usize| load16::<true>(values, t * stride + offset + i);
    let whole = n / 16 * 16;
    for i in (0..d).step_by(16) {
        let mut a = [_mm512_setzero_ps(); 16];
        for t0 in (0..whole).step_by(16) {
            for (l, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(at(t0 + l, i), _mm512_set1_ps(p[t0 + l]), *a);
            }
        }
        for (l, (a, &w)) in a.iter_mut().zip(&p[whole..]).enumerate() {
            *a = _mm512_fmadd_ps(at(whole + l, i), _mm512_set1_ps(w), *a);
        }
        let h: [__m512; 8] = std::array::from_fn(|l| _mm512_add_ps(a[l + 8], a[l]));
        let q: [__m512; 4] = std::array::from_fn(|l| _mm512_add_ps(h[l + 4], h[l]));
        let r = _mm512_add_ps(_mm512_add_ps(q[0], q[2]), _mm512_add_ps(q[1], q[3]));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), r);
    }
}

/// 16 values from element `at` of `p` (f16 bits when `HALF`, else f32), as f32.
///
/// # Safety
/// The 16 elements lie inside the allocation `p` points into; AVX-512 F available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn load16<const HALF: bool>(p: *const u8, at: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if HALF {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * at).cast()))
    } else {
        _mm512_loadu_ps(p.add(4 * at).cast())
    }
}

/// Element `at` of `p` (f16 bits when `HALF`, else f32), as f32.
///
/// # Safety
/// The element lies inside the allocation `p` points into.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn elem<const HALF: bool>(p: *const u8, at: usize) -> f32 {
    if HALF {
        f16::from_bits(std::ptr::read_unaligned(p.add(2 * at).cast::<u16>())).to_f32()
    } else {
        std::ptr::read_unaligned(p.add(4 * at).cast::<f32>())
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn narrow_avx2(_: Avx2, x: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let mut o = out.chunks_exact_mut(8);
    let mut c = x.chunks_exact(8);
    for (x, o) in (&mut c).zip(&mut o) {
        // SAFETY: 8 f32s in, 8 u16s out; unaligned loads and stores.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr()));
            _mm_storeu_si128(o.as_mut_ptr().cast(), h);
        }
    }
    for (o, &v) in o.into_remainder().iter_mut().zip(c.remainder()) {
        *o = f16::from_f32(v).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_avx2(_: Avx2, x: &[u16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut o = out.chunks_exact_mut(8);
    let mut c = x.chunks_exact(8);
    for (x, o) in (&mut c).zip(&mut o) {
        // SAFETY: 8 u16s in, 8 f32s out; unaligned loads and stores.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().cast()));
            _mm256_storeu_ps(o.as_mut_ptr(), v);
        }
    }
    for (o, &v) in o.into_remainder().iter_mut().zip(c.remainder()) {
        *o = f16::from_bits(v).to_f32();
    }
}

/// [`expf`] on 16 lanes: the same FMAs, products and exponent arithmetic, lane by
/// lane, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn expf_x16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
    let r = c(0x4b40_0000);
    let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm512_sub_ps(z, r);
    let neg = _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(n),
        _mm512_set1_epi32(i32::MIN),
    ));
    let b = _mm512_fmadd_ps(neg, c(0x35bf_be8e), _mm512_fmadd_ps(neg, c(0x3f31_7200), x));
    let u = _mm512_mul_ps(b, b);
    let hi = _mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17));
    let mid = _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb));
    let lo = _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0));
    let j = _mm512_fmadd_ps(_mm512_fmadd_ps(hi, u, mid), u, lo);
    // j * 2^n by the exponent bits; outside [-125, 125], 0 or infinity.
    let scaled = _mm512_castsi512_ps(_mm512_add_epi32(
        _mm512_castps_si512(j),
        _mm512_slli_epi32::<23>(_mm512_cvttps_epi32(n)),
    ));
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(125.0));
    let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(n, _mm512_setzero_ps());
    let edge = _mm512_mask_blend_ps(above, _mm512_setzero_ps(), _mm512_set1_ps(f32::INFINITY));
    _mm512_mask_blend_ps(big, scaled, edge)
}

/// [`softmax_portable`] with AVX-512: each group of 16 is one register through
/// [`expf_x16`] (the partial last group loaded with masked entries, which become 0),
/// sixteen groups' sums reduced together ([`reduce16_x16`]) and added to the f64 sum
/// in group order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn softmax_avx512(_: Avx512, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let vmax = _mm512_set1_ps(max);
    let mut sum = 0f64;
    let mut groups = [_mm512_setzero_ps(); 16];
    for chunk in scores.chunks_mut(256) {
        let k = chunk.len().div_ceil(16);
        for (g, vals) in chunk.chunks_mut(16).enumerate() {
            let m: __mmask16 = if vals.len() == 16 {
                !0
            } else {
                (1u16 << vals.len()) - 1
            };
            // SAFETY: the mask covers `vals` only.
            let x = unsafe {
                _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, vals.as_ptr())
            };
            let e = expf_x16(_mm512_sub_ps(x, vmax));
            // SAFETY: as above.
            unsafe { _mm512_mask_storeu_ps(vals.as_mut_ptr(), m, e) };
            groups[g] = e;
        }
        let mut sums = [0f32; 16];
        // SAFETY: `sums` holds 16 f32s.
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce16_x16(&groups)) };
        for s in &sums[..k] {
            sum += f64::from(*s);
        }
    }
    let inv = (1.0 / sum) as f32;
    for v in scores.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn softmax_avx2(_: Avx2, scores: &mut [f32]) {
    softmax_portable(scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn swiglu_avx2(_: Avx2, gate: &mut [f32], up: &[f32]) {
    swiglu_portable(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn round_avx2(_: Avx2, x: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds exactly 8 f32s; unaligned loads and stores.
        unsafe {
            let v = _mm256_loadu_ps(c.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    round_portable(chunks.into_remainder());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        let mut s = 0x9e37_79b9u32;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 8.0
            })
            .collect()
    }

    #[test]
    fn expf_is_within_two_ulp_of_libm() {
        for i in -2000..2000 {
            let x = i as f32 * 0.043;
            let (ours, libm) = (expf(x), x.exp());
            let ulp = (ours.to_bits() as i64 - libm.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {ours}, libm {libm}");
        }
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
    }

    /// The weighted sum (a pass over positions, one chain per output, lane and
    /// chain) sums each output in the same order as `dot` over that output's column,
    /// for both of llama.cpp's orders, whole 64-term steps or not, with the KV view's
    /// padding deciding which terms are leftovers.
    #[test]
    fn weighted_sum_sums_each_output_as_dot_does() {
        let d = 8;
        for (n, n_kv) in [
            (5, 32),
            (37, 64),
            (64, 64),
            (70, 96),
            (130, 160),
            (160, 160),
        ] {
            let (p, v) = (values(n), values(n * d));
            for order in [Order::Gemm, Order::VecDot] {
                let (mut out, mut acc) = (vec![0.0; d], Vec::new());
                weighted(&p, &v, d, 0, order, n_kv, &mut acc, &mut out);
                for (i, &o) in out.iter().enumerate() {
                    // The view's unused cells are zeros in both operands.
                    let mut col: Vec<f32> = (0..n).map(|t| v[t * d + i]).collect();
                    let mut pp = p.clone();
                    col.resize(n_kv, 0.0);
                    pp.resize(n_kv, 0.0);
                    let want = dot(&col, &pp, order);
                    assert_eq!(
                        o.to_bits(),
                        want.to_bits(),
                        "n {n} n_kv {n_kv} {order:?} output {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn orders_follow_the_pass() {
        assert_eq!(Order::for_pass(1, 64), Order::VecDot);
        assert_eq!(Order::for_pass(7, 64), Order::Gemm);
        assert_eq!(Order::for_pass(7, 40), Order::VecDot);
        // ggml_vec_dot_f16: the leftovers past the last 64-term step are summed in f64.
        let (a, b) = (values(70), values(70));
        let head: f32 = {
            let mut acc = [[0f32; 16]; 4];
            for j in 0..4 {
                for l in 0..16 {
                    acc[j][l] = a[16 * j + l] * b[16 * j + l];
                }
            }
            reduce16(&std::array::from_fn(|l| {
                (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l])
            }))
        };
        let tail: f64 = (64..70).map(|i| f64::from(a[i] * b[i])).sum();
        let want = (f64::from(head) + tail) as f32;
        let mut sum = f64::from(head);
        for i in 64..70 {
            sum += f64::from(a[i] * b[i]);
        }
        assert_eq!(dot(&a, &b, Order::VecDot), sum as f32);
        assert!((dot(&a, &b, Order::VecDot) - want).abs() <= 1e-5 * want.abs().max(1.0));
    }

    #[test]
    fn attention_loops_agree_for_every_head_size() {
        for d in [16, 48, 64, 72, 128, 256] {
            let stride = 2 * d;
            let q = values(d);
            for n in [1, 3, 5, 8, 70] {
                let keys = values(stride * n);
                // Gemm only where `Order::for_pass` picks it (d a multiple of 16).
                for order in [Order::for_pass(2, d), Order::VecDot] {
                    let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                    attention_scores(&q, &keys, stride, d, 0.125, order, &mut a);
                    scores(&q, &keys, stride, d, 0.125, order, &mut b);
                    assert_eq!(a, b, "scores {order:?} d {d} n {n}");
                    let p = values(n);
                    for n_kv in [n.next_multiple_of(32), n.next_multiple_of(64) + 64] {
                        let (mut a, mut b, mut acc) = (vec![0.0; d], vec![0.0; d], Vec::new());
                        weighted_sum(&p, &keys, stride, d, order, n_kv, &mut acc, &mut a);
                        weighted(&p, &keys, stride, d, order, n_kv, &mut acc, &mut b);
                        assert_eq!(a, b, "weighted {order:?} d {d} n {n} n_kv {n_kv}");
                    }
                }
            }
        }
    }

    #[test]
    fn half_precision_runs_give_the_f32_results() {
        for d in [48, 64, 256] {
            let stride = 2 * d;
            let q = values(d);
            for n in [1, 5, 70] {
                let mut keys = values(stride * n);
                round_to_f16(&mut keys);
                let mut bits = vec![0u16; keys.len()];
                narrow_to_f16(&keys, &mut bits);
                let mut back = vec![0f32; keys.len()];
                widen_f16(&bits, &mut back);
                assert_eq!(back, keys);
                let (mut wide, mut acc) = (Vec::new(), Vec::new());
                for order in [Order::for_pass(2, d), Order::VecDot] {
                    let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                    attention_scores(&q, &keys, stride, d, 0.125, order, &mut a);
                    let half = KvRun::F16(&bits);
                    attention_scores_kv(&q, half, stride, d, 0.125, order, &mut wide, &mut b);
                    assert_eq!(a, b, "scores {order:?} d {d} n {n}");
                    let p = values(n);
                    let n_kv = n.next_multiple_of(32);
                    let (mut a, mut b) = (vec![0.0; d], vec![0.0; d]);
                    weighted_sum(&p, &keys, stride, d, order, n_kv, &mut acc, &mut a);
                    weighted_sum_kv(
                        &p, half, stride, d, order, n_kv, &mut wide, &mut acc, &mut b,
                    );
                    assert_eq!(a, b, "weighted {order:?} d {d} n {n}");
                }
            }
        }
    }

    /// The KV-head loops give every query head what the one-head loops give it, bit
    /// for bit, in both orders, for group sizes past the loops' chunk of 4 heads.
    #[test]
    fn heads_of_one_kv_head_equal_heads_alone() {
        for d in [64, 72, 80, 128] {
            let stride = 3 * d;
            for heads in 1..=6 {
                let q = values(heads * d);
                for n in [1, 5, 70, 130] {
                    let mut keys = values(stride * n);
                    round_to_f16(&mut keys);
                    let mut bits = vec![0u16; keys.len()];
                    narrow_to_f16(&keys, &mut bits);
                    let kv = KvRun::F16(&bits);
                    let (mut wide, mut acc) = (Vec::new(), Vec::new());
                    for order in [Order::for_pass(2, d), Order::VecDot] {
                        let out_stride = n + 3;
                        let mut got = vec![7.0; heads * out_stride];
                        // The keys hint themselves: a prefetch changes no score.
                        attention_scores_kv_heads(
                            &q,
                            d,
                            kv,
                            stride,
                            d,
                            0.125,
                            order,
                            &mut wide,
                            n,
                            &mut got,
                            out_stride,
                            Some(kv),
                        );
                        for h in 0..heads {
                            let mut want = vec![0.0; n];
                            let qh = &q[h * d..(h + 1) * d];
                            attention_scores_kv(
                                qh, kv, stride, d, 0.125, order, &mut wide, &mut want,
                            );
                            let row = &got[h * out_stride..h * out_stride + n];
                            assert_eq!(row, &want[..], "scores d {d} heads {heads} n {n} head {h}");
                        }
                        let p = values(heads * n);
                        let n_kv = n.next_multiple_of(32);
                        let mut got = vec![0.0; heads * d];
                        weighted_sum_kv_heads(
                            &p, n, kv, stride, d, order, n_kv, &mut wide, &mut acc, d, &mut got,
                        );
                        for h in 0..heads {
                            let mut want = vec![0.0; d];
                            let ph = &p[h * n..(h + 1) * n];
                            weighted_sum_kv(
                                ph, kv, stride, d, order, n_kv, &mut wide, &mut acc, &mut want,
                            );
                            let row = &got[h * d..(h + 1) * d];
                            assert_eq!(
                                row,
                                &want[..],
                                "weighted d {d} heads {heads} n {n} head {h}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 softmax (and its `expf`) gives the portable one's bits, partial last
    /// groups, masked entries and values far outside `exp`'s range included.
    #[test]
    fn softmax_builds_agree_bit_for_bit() {
        for n in [1, 5, 16, 17, 70, 255, 256, 300, 600] {
            let mut x = values(n);
            for (i, v) in x.iter_mut().enumerate() {
                *v *= [1.0, 10.0, 40.0][i % 3];
            }
            x[0] = f32::NEG_INFINITY;
            if n > 3 {
                x[3] = -300.0;
            }
            let (mut a, mut b) = (x.clone(), x.clone());
            softmax(&mut a);
            softmax_portable(&mut b);
            let (a, b): (Vec<u32>, Vec<u32>) = (
                a.iter().map(|v| v.to_bits()).collect(),
                b.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(a, b, "n {n}");
        }
    }

    /// The 16-register reduction adds each register's lanes exactly as `reduce16`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce16_of_sixteen_registers_is_reduce16_of_each() {
        let Some(t) = Avx512::detect() else { return };
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn run(_: Avx512, x: &[f32]) -> [f32; 16] {
            use std::arch::x86_64::*;
            // SAFETY: x holds 256 values.
            let v: [__m512; 16] =
                std::array::from_fn(|k| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * k)) });
            let mut out = [0f32; 16];
            // SAFETY: out holds 16 values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), reduce16_x16(&v)) };
            out
        }
        let mut x = values(256);
        // Magnitudes far apart, so a different order of the adds would show.
        for (i, v) in x.iter_mut().enumerate() {
            *v *= [1.0, 1e-3, 1e4, 1e-7][i % 4];
        }
        // SAFETY: the token proves the features.
        let got = unsafe { run(t, &x) };
        for (k, g) in got.iter().enumerate() {
            let r: &[f32; 16] = x[16 * k..16 * k + 16].try_into().unwrap_or(&[0.0; 16]);
            assert_eq!(g.to_bits(), reduce16(r).to_bits(), "register {k}");
        }
    }

    #[test]
    fn simd_and_portable_builds_agree() {
        let (q, keys) = (values(64), values(64 * 3 * 10));
        for order in [Order::Gemm, Order::VecDot] {
            let mut a = vec![0.0; 10];
            let mut b = vec![0.0; 10];
            attention_scores(&q, &keys, 192, 64, 0.125, order, &mut a);
            scores(&q, &keys, 192, 64, 0.125, order, &mut b);
            assert_eq!(a, b);
            let many = values(64 * 3 * 160);
            for (n, n_kv) in [
                (10, 32),
                (37, 64),
                (64, 64),
                (70, 96),
                (130, 160),
                (160, 160),
            ] {
                let p = values(n);
                let (mut a, mut b, mut acc) = (vec![0.0; 64], vec![0.0; 64], Vec::new());
                weighted_sum(&p, &many, 192, 64, order, n_kv, &mut acc, &mut a);
                weighted(&p, &many, 192, 64, order, n_kv, &mut acc, &mut b);
                assert_eq!(a, b, "{order:?} n {n} n_kv {n_kv}");
            }
        }
        let mut a = values(37);
        let mut b = a.clone();
        round_to_f16(&mut a);
        round_portable(&mut b);
        assert_eq!(a, b);
        let up = values(37);
        let (mut a, mut b) = (values(37), values(37));
        swiglu(&mut a, &up);
        swiglu_portable(&mut b, &up);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
        let mut sm = values(37);
        sm[3] = f32::NEG_INFINITY;
        let mut exact = sm.clone();
        softmax(&mut sm);
        let max = exact.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = exact.iter().map(|v| (v - max).exp()).sum();
        exact.iter_mut().for_each(|v| *v = (*v - max).exp() / total);
        for (x, y) in sm.iter().zip(&exact) {
            assert!((x - y).abs() <= 1e-6, "softmax {x} vs {y}");
        }
        assert_eq!(sm[3], 0.0);
        // And against the textbook SiLU.
        let g = values(37);
        for ((x, &gate), &u) in a.iter().zip(&g).zip(&up) {
            let exact = gate / (1.0 + (-gate).exp()) * u;
            assert!((x - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
        }
    }
}
