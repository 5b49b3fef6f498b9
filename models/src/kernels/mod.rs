//! Our own CPU matmul for GGML-quantized weights, with llama.cpp's (ggml-cpu's)
//! numerics: `out = x · Wᵀ` for a weight `W` of `rows` x `cols` stored as GGUF blocks.
//!
//! Owns [`QWeight`] and the path from f32 activations to f32 outputs:
//! 1. the activations are quantized once per call, per row, into ggml's `vec_dot_type`
//!    for the weight format (`act.rs`): Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1,
//!    Q8_K for the K formats, f16-rounded f32 for F16, plain f32 for F32;
//! 2. each weight row is dotted with the activation rows block by block as ggml's
//!    `ggml_vec_dot_*` does: integer products summed exactly, scaled once per block
//!    (`scalar.rs` portable, `avx2.rs` AVX2+FMA+F16C chosen at run time);
//! 3. the output columns (weight rows) are split across rayon's pool in contiguous
//!    ranges, as ggml splits by rows; inside a range, a tile of 16 weight rows is
//!    dotted with groups of up to 4 activation rows, each weight block read and
//!    unpacked once per group while the tile stays in cache (for a single
//!    activation row, 4 weight rows per call keep 4 accumulator chains busy).
//!
//! Invariants: `data` holds exactly `rows` rows of `cols / block_len` blocks of the
//! format, row-major, as in the GGUF file; `cols` is a multiple of the block length
//! (32, or 256 for K formats). Results do not depend on the thread count or on `m`
//! (each output is one kernel's dot of one weight row with one activation row), and
//! equal the scalar path up to f32 summation order. Mismatched slice lengths in
//! [`QWeight::matmul`] / [`QWeight::dequantize_row`] are programming errors and panic
//! with a message; malformed tensors are refused with an error at construction.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod formats;
mod scalar;
#[cfg(test)]
mod tests;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use act::{Q8Block, Q8KBlock, QK8, QK_K};

#[cfg(target_arch = "x86_64")]
use avx2::Avx2 as Simd;

/// No SIMD kernels off x86_64: the portable ones run.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug)]
enum Simd {}

fn detect_simd() -> Option<Simd> {
    #[cfg(target_arch = "x86_64")]
    {
        Simd::detect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Most activation rows one kernel call takes (each weight block is unpacked once
/// for them all).
const GROUP_ROWS: usize = 4;

/// Weight rows per kernel call for a group of `g` activation rows: enough that a
/// call runs at least 4 independent accumulator chains (the kernel shapes of
/// `avx2::SHAPES`).
fn weight_rows_per_call(g: usize) -> usize {
    match g {
        1 => 4,
        2 => 2,
        _ => 1,
    }
}
/// Weight rows dotted with every activation group before moving on: a tile of this
/// many rows stays in L1/L2 while the activation rows stream past it.
const TILE_ROWS: usize = 16;
/// Below this many multiply-adds a call runs on the calling thread alone.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// A weight matrix of `rows` output features by `cols` input features, in a GGML
/// quantized (or float) format, stored as the GGUF blocks, row-major (each row =
/// cols/block_size blocks).
#[derive(Clone, Debug)]
pub struct QWeight {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl QWeight {
    /// A 2-D tensor `(rows, cols)` as read from GGUF (its bytes are copied).
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<QWeight> {
        let dtype = t.dtype();
        let (rows, cols) = t.shape().dims2()?;
        let data = t.data()?.into_owned();
        Self::from_bytes(dtype, rows, cols, data)
    }

    /// Quantizes `data` (`rows * cols` values, row-major) to `dtype` with candle's
    /// quantizers (ggml's reference ones).
    pub fn from_f32(
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: GgmlDType,
    ) -> candle_core::Result<QWeight> {
        if data.len() != rows * cols {
            candle_core::bail!(
                "QWeight::from_f32: {} values for a {rows}x{cols} matrix",
                data.len()
            );
        }
        let t = Tensor::from_slice(data, (rows, cols), &Device::Cpu)?;
        Self::from_qtensor(&QTensor::quantize(&t, dtype)?)
    }

    fn from_bytes(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> candle_core::Result<QWeight> {
        if !formats::is_supported(dtype) {
            candle_core::bail!("QWeight: weight format {dtype:?} is not supported");
        }
        let block = formats::block_len(dtype);
        if cols % block != 0 {
            candle_core::bail!(
                "QWeight: {cols} columns is not a multiple of {dtype:?}'s block of {block}"
            );
        }
        let row_bytes = cols / block * formats::block_bytes(dtype);
        if data.len() != rows * row_bytes {
            candle_core::bail!(
                "QWeight: {} bytes for a {rows}x{cols} {dtype:?} matrix (expected {})",
                data.len(),
                rows * row_bytes
            );
        }
        Ok(QWeight {
            dtype,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// `out[i*rows + j] = dot(x[i*cols..(i+1)*cols], weight row j)` for i in 0..m.
    ///
    /// Activations are quantized per row exactly as llama.cpp does for this weight
    /// type (its `vec_dot_type`): Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K
    /// for Q2_K..Q6_K; F32 weights use f32 dots; F16 weights: activations rounded to
    /// f16 like ggml's vec_dot_f16.
    ///
    /// # Panics
    /// If `x.len() != m * cols` or `out.len() != m * rows` (a caller bug).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(x, m, out, detect_simd());
    }

    fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], simd: Option<Simd>) {
        assert!(
            x.len() == m * self.cols && out.len() == m * self.rows,
            "QWeight::matmul: {m} rows of activations need x of {} and out of {} values, got {} and {}",
            m * self.cols,
            m * self.rows,
            x.len(),
            out.len()
        );
        if m == 0 || self.rows == 0 {
            return;
        }
        let dtype = self.dtype;
        match dtype {
            GgmlDType::F32 => {
                self.drive(x, self.cols, out, |w, a, o| dot_float(simd, dtype, w, a, o))
            }
            GgmlDType::F16 => {
                let mut xr = vec![0f32; x.len()];
                act::round_f16(x, &mut xr);
                self.drive(&xr, self.cols, out, |w, a, o| {
                    dot_float(simd, dtype, w, a, o)
                });
            }
            GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
                let mut q = vec![Q8KBlock::ZERO; x.len() / QK_K];
                act::quantize_q8k(x, &mut q);
                self.drive(&q, self.cols / QK_K, out, |w, a, o| {
                    dot_k(simd, dtype, w, a, o)
                });
            }
            _ => {
                let mut q = vec![Q8Block::ZERO; x.len() / QK8];
                act::quantize_q8(x, &mut q);
                self.drive(&q, self.cols / QK8, out, |w, a, o| {
                    dot_32(simd, dtype, w, a, o)
                });
            }
        }
    }

    /// Dequantized row `r` into `out` (len cols) — used for token embedding lookups
    /// (ggml get_rows).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols` (a caller bug).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "QWeight::dequantize_row: row {r} of {} into {} values (cols {})",
            self.rows,
            out.len(),
            self.cols
        );
        formats::dequantize_row(self.dtype, self.row(r), out);
    }

    fn row(&self, j: usize) -> &[u8] {
        &self.data[j * self.row_bytes..(j + 1) * self.row_bytes]
    }

    /// Runs `dot` over every (weight row, activation group) pair, in parallel over
    /// contiguous ranges of weight rows. `acts` holds `out.len() / rows` activation
    /// rows of `act_row` elements each.
    fn drive<A: Sync, F>(&self, acts: &[A], act_row: usize, out: &mut [f32], dot: F)
    where
        F: Fn(&[&[u8]], &[&[A]], &mut [f32]) + Sync,
    {
        let rows = self.rows;
        let m = out.len() / rows;
        let macs = rows.saturating_mul(self.cols).saturating_mul(m);
        let threads = rayon::current_num_threads();
        let tasks = if macs < PARALLEL_MIN_MACS || threads < 2 {
            1
        } else {
            (threads * 4).min(rows.div_ceil(TILE_ROWS)).max(1)
        };
        if tasks == 1 {
            let mut outs: Vec<&mut [f32]> = out.chunks_mut(rows).collect();
            self.run_range(0, &mut outs, acts, act_row, &dot);
            return;
        }
        // Contiguous ranges of weight rows, whole tiles except the last.
        let per_task = rows.div_ceil(tasks).div_ceil(TILE_ROWS) * TILE_ROWS;
        let starts: Vec<usize> = (0..rows).step_by(per_task).collect();
        let mut parts: Vec<(usize, Vec<&mut [f32]>)> =
            starts.iter().map(|&s| (s, Vec::with_capacity(m))).collect();
        for out_row in out.chunks_mut(rows) {
            let mut rest = out_row;
            for (start, outs) in parts.iter_mut() {
                let len = per_task.min(rows - *start);
                let (mine, tail) = rest.split_at_mut(len);
                outs.push(mine);
                rest = tail;
            }
        }
        parts
            .into_par_iter()
            .for_each(|(start, mut outs)| self.run_range(start, &mut outs, acts, act_row, &dot));
    }

    /// Weight rows `start..start + outs[0].len()` against all activation rows; `outs[i]`
    /// receives activation row i's outputs for those weight rows.
    fn run_range<A, F>(
        &self,
        start: usize,
        outs: &mut [&mut [f32]],
        acts: &[A],
        act_row: usize,
        dot: &F,
    ) where
        F: Fn(&[&[u8]], &[&[A]], &mut [f32]),
    {
        let m = outs.len();
        let len = outs.first().map_or(0, |o| o.len());
        let mut res = [0f32; 4];
        for t0 in (0..len).step_by(TILE_ROWS) {
            let t1 = (t0 + TILE_ROWS).min(len);
            for i0 in (0..m).step_by(GROUP_ROWS) {
                let g = (m - i0).min(GROUP_ROWS);
                let group: [&[A]; GROUP_ROWS] = std::array::from_fn(|k| {
                    if k < g {
                        &acts[(i0 + k) * act_row..(i0 + k + 1) * act_row]
                    } else {
                        &[]
                    }
                });
                let rw = weight_rows_per_call(g);
                let mut j = t0;
                while j < t1 {
                    let n = if j + rw <= t1 { rw } else { 1 };
                    let ws: [&[u8]; 4] =
                        std::array::from_fn(|i| if i < n { self.row(start + j + i) } else { &[] });
                    dot(&ws[..n], &group[..g], &mut res[..n * g]);
                    for i in 0..n {
                        for (k, &v) in res[i * g..(i + 1) * g].iter().enumerate() {
                            outs[i0 + k][j + i] = v;
                        }
                    }
                    j += n;
                }
            }
        }
    }
}

fn dot_32(simd: Option<Simd>, dtype: GgmlDType, w: &[&[u8]], a: &[&[Q8Block]], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::rows_32(t, dtype, w, a, o);
    }
    let _ = simd;
    scalar::rows_32(dtype, w, a, o)
}

fn dot_k(simd: Option<Simd>, dtype: GgmlDType, w: &[&[u8]], a: &[&[Q8KBlock]], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::rows_k(t, dtype, w, a, o);
    }
    let _ = simd;
    scalar::rows_k(dtype, w, a, o)
}

fn dot_float(simd: Option<Simd>, dtype: GgmlDType, w: &[&[u8]], a: &[&[f32]], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::rows_float(t, dtype, w, a, o);
    }
    let _ = simd;
    scalar::rows_float(dtype, w, a, o)
}
