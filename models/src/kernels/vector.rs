//! The f32 vector loops of a forward pass outside the matmuls (attention scores and
//! weighted sums, half-precision rounding, SiLU-gated products), compiled twice: as
//! portable code, and the same code with AVX2+FMA+F16C enabled, chosen at run time.
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

/// `out[t] = dot(q, keys[t * stride + offset ..][..q.len()]) * scale` for every `t`.
pub fn attention_scores(
    q: &[f32],
    keys: &[f32],
    stride: usize,
    offset: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = out.len();
    assert!(
        n == 0 || (n - 1) * stride + offset + q.len() <= keys.len(),
        "attention_scores: {n} keys of stride {stride} do not fit in {}",
        keys.len()
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: the token proves avx2/fma/f16c; the body is safe code.
        return unsafe { scores_avx2(t, q, keys, stride, offset, scale, out) };
    }
    scores(q, keys, stride, offset, scale, out)
}

/// `out = sum_t p[t] * values[t * stride + offset ..][..out.len()]`.
pub fn weighted_sum(p: &[f32], values: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    let n = p.len();
    assert!(
        n == 0 || (n - 1) * stride + offset + out.len() <= values.len(),
        "weighted_sum: {n} values of stride {stride} do not fit in {}",
        values.len()
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        // SAFETY: as above.
        return unsafe { weighted_sum_avx2(t, p, values, stride, offset, out) };
    }
    weighted(p, values, stride, offset, out)
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
/// then `exp(x - max)` with `ggml_v_expf` for each whole group of 16 values (libm's
/// for the rest), each group's sum reduced in f32 and accumulated in f64, and the
/// values scaled by `1 / sum`. Masked entries (`-inf`) become 0.
pub fn softmax(scores: &mut [f32]) {
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
        // _mm512_reduce_add_ps: halves added pairwise.
        let mut h = [0f32; 8];
        for i in 0..8 {
            h[i] = g[i] + g[i + 8];
        }
        let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
        let d = [q[0] + q[2], q[1] + q[3]];
        sum += f64::from(d[0] + d[1]);
    }
    for v in groups.into_remainder() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
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

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..16 {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

/// Four dot products of `q` with four keys at once: independent FMA chains, so the
/// loop runs at throughput rather than latency.
#[inline(always)]
fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let d = q.len() / 8 * 8;
    let mut i = 0;
    while i < d {
        for (j, kj) in k.iter().enumerate() {
            for l in 0..8 {
                acc[j][l] = q[i + l].mul_add(kj[i + l], acc[j][l]);
            }
        }
        i += 8;
    }
    let mut out = [0f32; 4];
    for j in 0..4 {
        let mut s: f32 = acc[j].iter().sum();
        for l in d..q.len() {
            s = q[l].mul_add(k[j][l], s);
        }
        out[j] = s;
    }
    out
}

#[inline(always)]
fn scores(q: &[f32], keys: &[f32], stride: usize, offset: usize, scale: f32, out: &mut [f32]) {
    let d = q.len();
    let key = |t: usize| &keys[t * stride + offset..t * stride + offset + d];
    let n = out.len();
    let mut t = 0;
    while t + 4 <= n {
        let s = dot4(q, [key(t), key(t + 1), key(t + 2), key(t + 3)]);
        for j in 0..4 {
            out[t + j] = s[j] * scale;
        }
        t += 4;
    }
    while t < n {
        out[t] = dot(q, key(t)) * scale;
        t += 1;
    }
}

#[inline(always)]
fn weighted(p: &[f32], values: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    let d = out.len();
    let value = |t: usize| &values[t * stride + offset..t * stride + offset + d];
    out.fill(0.0);
    let n = p.len();
    let mut t = 0;
    // Four positions per pass over `out`: a quarter of the loads and stores.
    while t + 4 <= n {
        let (w, v) = (
            [p[t], p[t + 1], p[t + 2], p[t + 3]],
            [value(t), value(t + 1), value(t + 2), value(t + 3)],
        );
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = *o;
            for j in 0..4 {
                acc = w[j].mul_add(v[j][i], acc);
            }
            *o = acc;
        }
        t += 4;
    }
    while t < n {
        let (w, v) = (p[t], value(t));
        for (o, &x) in out.iter_mut().zip(v) {
            *o = w.mul_add(x, *o);
        }
        t += 1;
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
fn scores_avx2(
    _: Avx2,
    q: &[f32],
    keys: &[f32],
    stride: usize,
    offset: usize,
    scale: f32,
    out: &mut [f32],
) {
    scores(q, keys, stride, offset, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn weighted_sum_avx2(
    _: Avx2,
    p: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    out: &mut [f32],
) {
    weighted(p, values, stride, offset, out)
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

    #[test]
    fn simd_and_portable_builds_agree() {
        let (q, keys) = (values(64), values(64 * 3 * 10));
        let mut a = vec![0.0; 10];
        let mut b = vec![0.0; 10];
        attention_scores(&q, &keys, 192, 64, 0.125, &mut a);
        scores(&q, &keys, 192, 64, 0.125, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
        let p = values(10);
        let (mut a, mut b) = (vec![0.0; 64], vec![0.0; 64]);
        weighted_sum(&p, &keys, 192, 64, &mut a);
        weighted(&p, &keys, 192, 64, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
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
