//! Our own CPU matmul for GGML-quantized weights, with llama.cpp's (ggml-cpu's)
//! numerics: `out = x · Wᵀ` for a weight `W` of `rows` x `cols` stored as GGUF blocks.
//!
//! Owns [`QWeight`] and the path from f32 activations to f32 outputs:
//! 1. the activations are quantized once per call, per row, into ggml's `vec_dot_type`
//!    for the weight format (`act.rs`): Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1,
//!    Q8_K for the K formats, f16-rounded f32 for F16, plain f32 for F32
//!    ([`QWeight::matmul_many`] shares one quantization between the weights that read
//!    the same activations);
//! 2. each weight row is dotted with the activation rows block by block as ggml's
//!    `ggml_vec_dot_*` does: integer products summed exactly, scaled once per block
//!    (`scalar.rs` portable, `avx2.rs` AVX2+FMA+F16C, `avx512.rs` AVX-512 VNNI, the
//!    best the CPU has chosen at run time);
//! 3. where the CPU has AVX-512 VNNI, Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K weights are
//!    repacked at construction (`pack.rs`): 16 rows interleaved so one `vpdpbusd`
//!    yields 16 rows' partial dots, each weight register unpacked once for up to 8
//!    activation rows (the K formats) or 2 (the 32-value formats, whose eight lane
//!    chains per row fill the registers; with more rows they pass over the group, in
//!    L1, again, the 4-bit ones loading the registers the first pass unpacked, and
//!    prefetch the next group); rows past the last whole group of 16 stay
//!    in GGUF layout and run on the AVX2 kernels;
//! 4. the output columns (weight rows) are split across rayon's pool in contiguous
//!    ranges of whole 16-row tiles, as ggml splits by rows; inside a range, a tile
//!    is dotted with every activation row (groups of 8 packed, of up to 4 on AVX2)
//!    while it stays in cache (for a single activation row on AVX2, 4 weight rows
//!    per call keep 4 accumulator chains busy).
//!
//! Numerics: every dot of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q4_K/Q5_K and Q6_K weights is
//! summed in the order llama.cpp's x86 CPU code uses (see `scalar.rs`), so results
//! are bit for bit llama.cpp's and the SIMD paths equal the scalar one exactly. For
//! Q4_K/Q5_K that order depends on the row's place in its pass, as llama.cpp's
//! repacked Q4_K kernels do: the rows of a sequence in whole groups of 4 take the
//! GEMM order, the rest (and every decode step) the GEMV order ([`prompt_rows`],
//! [`QWeight::matmul_seqs`]).
//!
//! Invariants: `data` holds the `rows` rows as GGUF blocks, row-major, except that
//! when `packed` the first `rows / 16` groups of 16 rows are in `pack.rs`'s layout
//! (same information, [`QWeight::dequantize_row`] unpacks); `cols` is a multiple of
//! the block length (32, or 256 for K formats). Results do not depend on the thread
//! count, nor on other sequences' rows (each output is one kernel's dot of one weight
//! row with one activation row, in the order its own sequence gives it). Mismatched
//! slice lengths in [`QWeight::matmul`] / [`QWeight::dequantize_row`] are programming
//! errors and panic with a message; malformed tensors are refused with an error at
//! construction.
//!
//! `vector.rs` holds the other f32 loops of a forward pass (attention over f32 or f16
//! KV runs, half-precision rounding, SiLU), compiled for AVX2 where the CPU has it,
//! with AVX-512 forms of the one-token attention loops.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod formats;
mod pack;
mod scalar;
#[cfg(test)]
mod tests;
pub mod vector;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use act::{Q8Block, Q8KBlock, QK8, QK_K};

use pack::GROUP;

#[cfg(target_arch = "x86_64")]
use avx2::Avx2 as Simd;
#[cfg(target_arch = "x86_64")]
use avx512::Avx512 as Wide;

/// No SIMD kernels off x86_64: the portable ones run.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug)]
enum Simd {}
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug)]
enum Wide {}

/// The kernel families this CPU runs: AVX2 for the GGUF layout, AVX-512 VNNI for the
/// packed one (`pack.rs`). Both `None` = the portable kernels.
#[derive(Clone, Copy, Debug)]
struct Isa {
    avx2: Option<Simd>,
    avx512: Option<Wide>,
}

impl Isa {
    #[cfg(test)]
    const SCALAR: Isa = Isa {
        avx2: None,
        avx512: None,
    };
}

fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        Isa {
            avx2: Simd::detect(),
            avx512: Wide::detect(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa {
            avx2: None,
            avx512: None,
        }
    }
}

/// Outputs of one packed-group kernel call: 16 weight rows for each of up to
/// [`MAX_ACTS`] activation rows.
type GroupOut = [[f32; GROUP]; MAX_ACTS];
/// Most activation rows one packed-group kernel call takes.
const MAX_ACTS: usize = 8;

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
const _: () = assert!(TILE_ROWS == GROUP);
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
    /// Whether the first `rows / 16 * 16` rows are in the packed layout of `pack.rs`
    /// (the rest stay in GGUF layout after them).
    packed: bool,
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

    /// Packs the rows for the AVX-512 kernels where this CPU has them.
    fn from_bytes(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> candle_core::Result<QWeight> {
        let pack = pack::packable(dtype) && detect_isa().avx512.is_some();
        Self::from_bytes_layout(dtype, rows, cols, data, pack)
    }

    fn from_bytes_layout(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        pack: bool,
    ) -> candle_core::Result<QWeight> {
        if !formats::is_supported(dtype) {
            candle_core::bail!("QWeight: weight format {dtype:?} is not supported");
        }
        let block = formats::block_len(dtype);
        if !cols.is_multiple_of(block) {
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
        let mut w = QWeight {
            dtype,
            rows,
            cols,
            row_bytes,
            packed: false,
            data,
        };
        if pack && pack::packable(dtype) && rows >= GROUP {
            w.pack();
        }
        Ok(w)
    }

    /// Bytes of one packed group of 16 rows.
    fn group_bytes(&self) -> usize {
        self.cols / formats::block_len(self.dtype) * pack::packed_block_bytes(self.dtype)
    }

    /// Rows held in the packed layout.
    fn packed_rows(&self) -> usize {
        if self.packed {
            self.rows / GROUP * GROUP
        } else {
            0
        }
    }

    /// Rewrites the GGUF rows into the packed layout (same position for the tail rows).
    fn pack(&mut self) {
        let (groups, gb, rb) = (self.rows / GROUP, self.group_bytes(), self.row_bytes);
        let tail = groups * GROUP * rb;
        let mut data = vec![0u8; groups * gb + self.data.len() - tail];
        for (g, out) in data.chunks_exact_mut(gb).take(groups).enumerate() {
            let rows: [&[u8]; GROUP] = std::array::from_fn(|i| {
                let j = g * GROUP + i;
                &self.data[j * rb..(j + 1) * rb]
            });
            pack::pack_group(self.dtype, &rows, out);
        }
        data[groups * gb..].copy_from_slice(&self.data[tail..]);
        self.data = data;
        self.packed = true;
    }

    /// The same matrix in GGUF layout.
    fn unpacked(&self) -> QWeight {
        let mut data = vec![0u8; self.rows * self.row_bytes];
        for (j, out) in data.chunks_exact_mut(self.row_bytes).enumerate() {
            self.copy_row(j, out);
        }
        QWeight {
            packed: false,
            data,
            ..*self
        }
    }

    /// Row `j` in GGUF layout into `out` (`row_bytes` long).
    fn copy_row(&self, j: usize, out: &mut [u8]) {
        if j < self.packed_rows() {
            let gb = self.group_bytes();
            let g = &self.data[j / GROUP * gb..(j / GROUP + 1) * gb];
            pack::unpack_row(self.dtype, g, j % GROUP, out);
        } else {
            out.copy_from_slice(self.row(j));
        }
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
        self.matmul_with(x, m, out, detect_isa());
    }

    /// [`QWeight::matmul`] over the rows of several sequences, `seq_lens[s]` rows
    /// each, one after the other: each row is summed in the order llama.cpp uses for
    /// its place in its own sequence's pass ([`prompt_rows`]), so a row's result does
    /// not depend on the other sequences.
    ///
    /// # Panics
    /// As [`QWeight::matmul`], with `m` the sum of `seq_lens`.
    pub fn matmul_seqs(&self, x: &[f32], seq_lens: &[usize], out: &mut [f32]) {
        let m = seq_lens.iter().sum();
        self.matmul_ordered(x, m, &prompt_rows(seq_lens), out, detect_isa());
    }

    /// One sequence of `m` rows.
    fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], isa: Isa) {
        self.matmul_ordered(x, m, &prompt_rows(&[m]), out, isa)
    }

    fn matmul_ordered(&self, x: &[f32], m: usize, prompt: &[bool], out: &mut [f32], isa: Isa) {
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
        if self.packed && isa.avx512.is_none() {
            // Only tests get here: packing happens where AVX-512 VNNI exists.
            return self.unpacked().matmul_ordered(x, m, prompt, out, isa);
        }
        let dtype = self.dtype;
        let simd = isa.avx2;
        let none = |_: &[u8], _: &[&[f32]], _: &mut GroupOut, _: bool| {};
        match dtype {
            GgmlDType::F32 => self.drive(
                x,
                self.cols,
                prompt,
                out,
                |w, a, o, _| dot_float(simd, dtype, w, a, o),
                none,
            ),
            GgmlDType::F16 => {
                let mut xr = vec![0f32; x.len()];
                act::round_f16(x, &mut xr);
                self.drive(
                    &xr,
                    self.cols,
                    prompt,
                    out,
                    |w, a, o, _| dot_float(simd, dtype, w, a, o),
                    none,
                );
            }
            GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
                let mut q = Q8K_BUF.with(|b| b.take());
                q.clear();
                q.resize(x.len() / QK_K, Q8KBlock::ZERO);
                quantize_acts(x, &mut q, QK_K, |x, o| quantize_q8k(simd, x, o));
                self.drive(
                    &q,
                    self.cols / QK_K,
                    prompt,
                    out,
                    |w, a, o, p| dot_k(simd, dtype, w, a, o, p),
                    |w, a, o, p| group_k(isa, dtype, w, a, o, p),
                );
                Q8K_BUF.with(|b| b.replace(q));
            }
            _ => {
                let mut q = Q8_BUF.with(|b| b.take());
                q.clear();
                q.resize(x.len() / QK8, Q8Block::ZERO);
                quantize_acts(x, &mut q, QK8, |x, o| quantize_q8(simd, x, o));
                self.drive(
                    &q,
                    self.cols / QK8,
                    prompt,
                    out,
                    |w, a, o, _| dot_32(simd, dtype, w, a, o),
                    |w, a, o, _| group_32(isa, dtype, w, a, o),
                );
                Q8_BUF.with(|b| b.replace(q));
            }
        }
    }

    /// Several matmuls of the same activations (`x`, the rows of sequences of
    /// `seq_lens` rows) into their own outputs, quantizing the activations once per
    /// `vec_dot_type` rather than once per weight (Q, K and V projections; gate and
    /// up). Each result is exactly what [`QWeight::matmul_seqs`] gives.
    ///
    /// # Panics
    /// As [`QWeight::matmul`], for any of the jobs.
    pub fn matmul_many(x: &[f32], seq_lens: &[usize], jobs: &mut [(&QWeight, &mut [f32])]) {
        let m = seq_lens.iter().sum();
        let prompt = &prompt_rows(seq_lens);
        let isa = detect_isa();
        let simd = isa.avx2;
        let mut q8: Option<Vec<Q8Block>> = None;
        let mut q8k: Option<Vec<Q8KBlock>> = None;
        for (w, out) in jobs.iter_mut() {
            let (w, out): (&QWeight, &mut [f32]) = (w, out);
            let k_format = matches!(
                w.dtype,
                GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
            );
            let plain = matches!(w.dtype, GgmlDType::F32 | GgmlDType::F16);
            let shaped = x.len() == m * w.cols && out.len() == m * w.rows;
            if plain || !shaped || m == 0 || w.rows == 0 || (w.packed && isa.avx512.is_none()) {
                // The general path (and its length check).
                w.matmul_ordered(x, m, prompt, out, isa);
                continue;
            }
            let dtype = w.dtype;
            if k_format {
                let q = q8k.get_or_insert_with(|| {
                    let mut q = vec![Q8KBlock::ZERO; x.len() / QK_K];
                    quantize_acts(x, &mut q, QK_K, |x, o| quantize_q8k(simd, x, o));
                    q
                });
                w.drive(
                    q,
                    w.cols / QK_K,
                    prompt,
                    out,
                    |wr, a, o, p| dot_k(simd, dtype, wr, a, o, p),
                    |wr, a, o, p| group_k(isa, dtype, wr, a, o, p),
                );
            } else {
                let q = q8.get_or_insert_with(|| {
                    let mut q = vec![Q8Block::ZERO; x.len() / QK8];
                    quantize_acts(x, &mut q, QK8, |x, o| quantize_q8(simd, x, o));
                    q
                });
                w.drive(
                    q,
                    w.cols / QK8,
                    prompt,
                    out,
                    |wr, a, o, _| dot_32(simd, dtype, wr, a, o),
                    |wr, a, o, _| group_32(isa, dtype, wr, a, o),
                );
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
        if r < self.packed_rows() {
            let mut row = vec![0u8; self.row_bytes];
            self.copy_row(r, &mut row);
            formats::dequantize_row(self.dtype, &row, out);
        } else {
            formats::dequantize_row(self.dtype, self.row(r), out);
        }
    }

    /// Row `j` in GGUF layout, for a row outside the packed groups.
    fn row(&self, j: usize) -> &[u8] {
        let p = self.packed_rows();
        debug_assert!(j >= p);
        let at = p / GROUP * self.group_bytes() + (j - p) * self.row_bytes;
        &self.data[at..at + self.row_bytes]
    }

    /// Packed group `g` (rows `16 g .. 16 g + 16`).
    fn group(&self, g: usize) -> &[u8] {
        let gb = self.group_bytes();
        &self.data[g * gb..(g + 1) * gb]
    }

    /// Runs `dot` over every (weight row, activation group) pair, in parallel over
    /// contiguous ranges of weight rows. `acts` holds `out.len() / rows` activation
    /// rows of `act_row` elements each.
    /// `gdot` runs a packed group of 16 rows against up to [`MAX_ACTS`] activation rows.
    fn drive<A: Sync, F, G>(
        &self,
        acts: &[A],
        act_row: usize,
        prompt: &[bool],
        out: &mut [f32],
        dot: F,
        gdot: G,
    ) where
        F: Fn(&[&[u8]], &[&[A]], &mut [f32], bool) + Sync,
        G: Fn(&[u8], &[&[A]], &mut GroupOut, bool) + Sync,
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
            self.run_range(0, &mut outs, acts, act_row, prompt, &dot, &gdot);
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
        parts.into_par_iter().for_each(|(start, mut outs)| {
            self.run_range(start, &mut outs, acts, act_row, prompt, &dot, &gdot)
        });
    }

    /// Weight rows `start..start + outs[0].len()` against all activation rows; `outs[i]`
    /// receives activation row i's outputs for those weight rows.
    /// `start` is a multiple of [`TILE_ROWS`], so packed groups are whole in a range.
    #[allow(clippy::too_many_arguments)]
    fn run_range<A, F, G>(
        &self,
        start: usize,
        outs: &mut [&mut [f32]],
        acts: &[A],
        act_row: usize,
        prompt: &[bool],
        dot: &F,
        gdot: &G,
    ) where
        F: Fn(&[&[u8]], &[&[A]], &mut [f32], bool),
        G: Fn(&[u8], &[&[A]], &mut GroupOut, bool),
    {
        let m = outs.len();
        let len = outs.first().map_or(0, |o| o.len());
        let packed_rows = self.packed_rows();
        let act = |i: usize| &acts[i * act_row..(i + 1) * act_row];
        let mut res = [0f32; 4];
        let mut gres: GroupOut = [[0f32; GROUP]; MAX_ACTS];
        for t0 in (0..len).step_by(TILE_ROWS) {
            let t1 = (t0 + TILE_ROWS).min(len);
            if start + t0 < packed_rows {
                let w = self.group((start + t0) / GROUP);
                let mut i0 = 0;
                while i0 < m {
                    let g = same_order(prompt, i0, MAX_ACTS);
                    let group: [&[A]; MAX_ACTS] =
                        std::array::from_fn(|k| if k < g { act(i0 + k) } else { &[] });
                    gdot(w, &group[..g], &mut gres, prompt[i0]);
                    for (k, res) in gres[..g].iter().enumerate() {
                        outs[i0 + k][t0..t1].copy_from_slice(res);
                    }
                    i0 += g;
                }
                continue;
            }
            let mut i0 = 0;
            while i0 < m {
                let g = same_order(prompt, i0, GROUP_ROWS);
                let group: [&[A]; GROUP_ROWS] =
                    std::array::from_fn(|k| if k < g { act(i0 + k) } else { &[] });
                let rw = weight_rows_per_call(g);
                let mut j = t0;
                while j < t1 {
                    let n = if j + rw <= t1 { rw } else { 1 };
                    let ws: [&[u8]; 4] =
                        std::array::from_fn(|i| if i < n { self.row(start + j + i) } else { &[] });
                    dot(&ws[..n], &group[..g], &mut res[..n * g], prompt[i0]);
                    for i in 0..n {
                        for (k, &v) in res[i * g..(i + 1) * g].iter().enumerate() {
                            outs[i0 + k][j + i] = v;
                        }
                    }
                    j += n;
                }
                i0 += g;
            }
        }
    }
}

/// How many rows from `i0` (at most `max`) share `prompt[i0]`'s order.
fn same_order(prompt: &[bool], i0: usize, max: usize) -> usize {
    prompt[i0..]
        .iter()
        .take(max)
        .take_while(|&&p| p == prompt[i0])
        .count()
}

/// Which activation rows llama.cpp multiplies in its prompt (GEMM) order rather than
/// its one-row (GEMV) order, for sequences of `seq_lens` rows laid out one after the
/// other: in a sequence of 4 or more rows, the first whole groups of 4 (what
/// llama.cpp's repacked Q4_K `mul_mat` does with the rows of one pass).
pub fn prompt_rows(seq_lens: &[usize]) -> Vec<bool> {
    let mut rows = Vec::with_capacity(seq_lens.iter().sum());
    for &n in seq_lens {
        let grouped = if n > 3 { n - n % 4 } else { 0 };
        rows.extend((0..n).map(|i| i < grouped));
    }
    rows
}

thread_local! {
    /// Quantized activations of the last call on this thread, kept for the next one
    /// (taken out while in use, so a nested call on the same thread allocates its
    /// own rather than aliasing).
    static Q8_BUF: std::cell::Cell<Vec<Q8Block>> = const { std::cell::Cell::new(Vec::new()) };
    static Q8K_BUF: std::cell::Cell<Vec<Q8KBlock>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Activations at least this long are quantized on rayon's pool (prefill chunks, and
/// the rows of a batched decode step; one row stays on the calling thread).
const PARALLEL_MIN_QUANT: usize = 1 << 12;

/// Quantizes `x` into `out` (blocks of `block` values) with `f`, split over rayon's
/// pool in whole blocks when `x` is long: the same blocks as one call, since every
/// block is quantized on its own.
fn quantize_acts<B: Send>(
    x: &[f32],
    out: &mut [B],
    block: usize,
    f: impl Fn(&[f32], &mut [B]) + Sync,
) {
    let threads = rayon::current_num_threads();
    if x.len() < PARALLEL_MIN_QUANT || threads < 2 {
        return f(x, out);
    }
    let blocks = out.len().div_ceil(threads * 2).max(1);
    x.par_chunks(blocks * block)
        .zip(out.par_chunks_mut(blocks))
        .for_each(|(x, o)| f(x, o));
}

fn quantize_q8(simd: Option<Simd>, x: &[f32], out: &mut [Q8Block]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::quantize_q8(t, x, out);
    }
    let _ = simd;
    act::quantize_q8(x, out)
}

fn quantize_q8k(simd: Option<Simd>, x: &[f32], out: &mut [Q8KBlock]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::quantize_q8k(t, x, out);
    }
    let _ = simd;
    act::quantize_q8k(x, out)
}

fn dot_32(simd: Option<Simd>, dtype: GgmlDType, w: &[&[u8]], a: &[&[Q8Block]], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::rows_32(t, dtype, w, a, o);
    }
    let _ = simd;
    scalar::rows_32(dtype, w, a, o)
}

fn dot_k(
    simd: Option<Simd>,
    dtype: GgmlDType,
    w: &[&[u8]],
    a: &[&[Q8KBlock]],
    o: &mut [f32],
    prompt: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::rows_k(t, dtype, w, a, o, prompt);
    }
    let _ = simd;
    scalar::rows_k(dtype, w, a, o, prompt)
}

fn group_32(isa: Isa, dtype: GgmlDType, w: &[u8], a: &[&[Q8Block]], o: &mut GroupOut) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = isa.avx512 {
        return avx512::group_32(t, dtype, w, a, o);
    }
    let _ = isa;
    group_portable(dtype, w, a, o, scalar::rows_32)
}

fn group_k(
    isa: Isa,
    dtype: GgmlDType,
    w: &[u8],
    a: &[&[Q8KBlock]],
    o: &mut GroupOut,
    prompt: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = isa.avx512 {
        return avx512::group_k(t, dtype, w, a, o, prompt);
    }
    let _ = isa;
    group_portable(dtype, w, a, o, |d, w, a, o| {
        scalar::rows_k(d, w, a, o, prompt)
    })
}

/// A packed group on the portable kernels (`scalar::rows_*`), row by row
/// (unreachable in practice: `matmul_with` unpacks the matrix when AVX-512 is missing).
fn group_portable<A>(
    dtype: GgmlDType,
    w: &[u8],
    a: &[&[A]],
    o: &mut GroupOut,
    rows: impl Fn(GgmlDType, &[&[u8]], &[&[A]], &mut [f32]),
) {
    let nb = w.len() / pack::packed_block_bytes(dtype);
    let mut row = vec![0u8; nb * formats::block_bytes(dtype)];
    let mut res = [0f32; MAX_ACTS];
    for i in 0..GROUP {
        pack::unpack_row(dtype, w, i, &mut row);
        rows(dtype, &[&row], a, &mut res[..a.len()]);
        for (o, &v) in o.iter_mut().zip(&res[..a.len()]) {
            o[i] = v;
        }
    }
}

fn dot_float(simd: Option<Simd>, dtype: GgmlDType, w: &[&[u8]], a: &[&[f32]], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = simd {
        return avx2::rows_float(t, dtype, w, a, o);
    }
    let _ = simd;
    scalar::rows_float(dtype, w, a, o)
}
