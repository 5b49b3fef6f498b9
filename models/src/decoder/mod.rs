//! Our own forward pass for decoder-only GGUF models: llama (Llama, Mistral,
//! SmolLM), qwen2, qwen3, gemma3 and phi3 (fused Q/K/V and gate/up matrices), over
//! several sequences at once.
//!
//! Owns the weights ([`Weights`], shared by every handle through an `Arc`), one KV
//! cache per handle ([`DecoderModel`]), and [`forward_batch`]: one pass over the new
//! tokens of several sequences, each at its own position with its own cache, where
//! every weight matrix is multiplied once for all their rows
//! ([`crate::kernels::QWeight::matmul`]). Per layer, as llama.cpp builds the graph:
//! RMS norm; Q, K, V projections (+ biases for qwen2; per-head RMS norms for qwen3
//! and gemma3); rotary embeddings (adjacent pairs for llama, halves otherwise); the
//! new keys and values appended to each sequence's cache (rounded to half precision
//! and stored as f16 bits unless [`KvCachePrecision::F32`]);
//! attention of each row over its own sequence's positions up to its own (within the
//! window on Gemma's sliding layers); output projection (+ post-norm on gemma3);
//! residual; the same around a SiLU- (GELU- for gemma3) gated MLP. The numerics of
//! each step follow ggml's CPU code ([`ops`]).
//!
//! Invariants:
//! - a handle's cache holds exactly [`crate::LanguageModel::cached_tokens`] positions
//!   (its [`Sequence`] counts them); a pass starts at that position;
//! - a batch runs only handles of the same weights; each row attends only to its own
//!   sequence and every sum is taken in the order llama.cpp uses for that sequence's
//!   own pass (its token count decides), so a sequence's logits do not depend on what
//!   runs beside it, bit for bit;
//! - a failed or panicking pass poisons every handle in it until `reset`;
//! - the usable context is the file's `context_length` (capped at
//!   [`MAX_CONTEXT`]).

mod config;
pub mod ops;

use std::any::Any;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use rayon::prelude::*;

pub use config::{Activation, Arch, Config, RopeLayout};

use crate::error::{catch_panic, ModelError};
use crate::family::Sequence;
use crate::gguf::{GgufFile, ModelInfo};
use crate::kernels::vector::KvRun;
use crate::kernels::QWeight;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::{KvCachePrecision, LanguageModel, LoadOptions};

use ops::RopeTable;

/// The most positions a sequence may use, whatever the file says (bounds the KV
/// cache a request can grow).
pub const MAX_CONTEXT: usize = 32_768;

/// Attention work (query heads x visible keys, summed over rows) above which a pass
/// spreads attention over threads.
const PARALLEL_ATTENTION_WORK: usize = 2_048;

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>,
    qkv: Qkv,
    wo: QWeight,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate_up: GateUp,
    down: QWeight,
    post_ffn_norm: Option<Vec<f32>>,
    /// The sliding window, or `None` on layers that attend to every position.
    window: Option<usize>,
}

/// The Q, K and V projections: three matrices, or one with their rows stacked
/// (Phi-3's `attn_qkv`).
enum Qkv {
    Split {
        wq: QWeight,
        wk: QWeight,
        wv: QWeight,
    },
    Fused(QWeight),
}

/// The gate and up projections: two matrices, or one with the gate's rows first
/// (Phi-3's `ffn_up`).
enum GateUp {
    Split { gate: QWeight, up: QWeight },
    Fused(QWeight),
}

impl GateUp {
    fn n_ff(&self) -> usize {
        match self {
            GateUp::Split { gate, .. } => gate.rows(),
            GateUp::Fused(w) => w.rows() / 2,
        }
    }
}

/// Everything read-only about a model: shared by all its handles.
pub struct Weights {
    config: Config,
    embedding: QWeight,
    /// `None` when the output projection is tied to the embedding.
    output: Option<QWeight>,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// Per-dimension rotary frequency factors (`rope_freqs.weight`, Llama 3).
    rope_freqs: Option<Vec<f32>>,
    vocab: usize,
    kv: KvCachePrecision,
}

/// Keys and values of one layer: per KV head, `head_dim` values per position,
/// position after position (so a head's attention reads one contiguous run), as the
/// cache precision says: f32, or (F16) the bits of their half-precision rounding,
/// which the attention loops widen exactly (half the memory an f32 copy of the same
/// values would take, and half the traffic of reading it).
#[derive(Clone)]
enum KvHead {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl KvHead {
    fn new(kv: KvCachePrecision) -> KvHead {
        match kv {
            KvCachePrecision::F16 => KvHead::F16(Vec::new()),
            KvCachePrecision::F32 => KvHead::F32(Vec::new()),
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            KvHead::F32(x) => x.truncate(len),
            KvHead::F16(x) => x.truncate(len),
        }
    }

    fn clear(&mut self) {
        self.truncate(0);
    }

    /// Appends `values`, rounded to half precision in an F16 cache.
    fn extend(&mut self, values: &[f32]) {
        match self {
            KvHead::F32(x) => x.extend_from_slice(values),
            KvHead::F16(x) => {
                let start = x.len();
                x.resize(start + values.len(), 0);
                crate::kernels::vector::narrow_to_f16(values, &mut x[start..]);
            }
        }
    }

    /// Values `range` (indices into the run).
    fn run(&self, range: std::ops::Range<usize>) -> KvRun<'_> {
        match self {
            KvHead::F32(x) => KvRun::F32(&x[range]),
            KvHead::F16(x) => KvRun::F16(&x[range]),
        }
    }
}

#[derive(Clone, Default)]
struct LayerCache {
    k: Vec<KvHead>,
    v: Vec<KvHead>,
}

/// A decoder-only GGUF model: shared weights and this handle's KV cache.
#[derive(Clone)]
pub struct DecoderModel {
    weights: Arc<Weights>,
    cache: Vec<LayerCache>,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    sequence: Sequence,
}

impl std::fmt::Debug for DecoderModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderModel")
            .field("config", &self.weights.config)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl DecoderModel {
    /// Whether `general.architecture` is one this decoder runs.
    pub fn supports(architecture: &str) -> bool {
        Arch::from_name(architecture).is_some()
    }

    /// Builds the tokenizer and template from the header, then loads the weights.
    pub fn load(gguf: GgufFile, options: &LoadOptions) -> Result<Self, ModelError> {
        if options.device.candle()?.is_cuda() {
            return Err(ModelError::Device(
                "the GGUF decoder runs on the CPU only".to_string(),
            ));
        }
        let (config, header) = Config::read(gguf)?;
        let (path, info) = (&header.path, &header.info);
        let max_context = config
            .context_length
            .or(info.context_length)
            .unwrap_or(4096)
            .clamp(1, MAX_CONTEXT);
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let weights = catch_panic("loading weights", || {
            Weights::load(path, &header.content, &mut reader, config, options.kv_cache)
        })?;
        if weights.vocab < info.vocab_size {
            return Err(ModelError::InvalidGguf {
                path: path.clone(),
                reason: format!(
                    "the output projection has {} rows for a vocabulary of {}",
                    weights.vocab, info.vocab_size
                ),
            });
        }
        Ok(Self {
            cache: vec![LayerCache::default(); weights.layers.len()],
            weights: Arc::new(weights),
            sequence: Sequence::new(max_context, info.vocab_size),
            info: header.info,
            tokenizer: header.tokenizer,
            template: header.template,
        })
    }

    pub fn config(&self) -> &Config {
        &self.weights.config
    }
}

impl LanguageModel for DecoderModel {
    crate::family::model_accessors!();

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        let (weights, cache) = (&self.weights, &mut self.cache);
        self.sequence.forward(tokens, pos, || {
            let mut seqs = [SeqInput { cache, tokens, pos }];
            let mut logits = weights
                .forward(&mut seqs)
                .map_err(candle_core::Error::Msg)?;
            Ok(logits.pop().unwrap_or_default())
        })
    }

    fn reset(&mut self) {
        for layer in &mut self.cache {
            layer.k.iter_mut().for_each(KvHead::clear);
            layer.v.iter_mut().for_each(KvHead::clear);
        }
        self.sequence.reset();
    }

    fn as_any_mut(&mut self) -> Option<&mut (dyn Any + 'static)> {
        Some(self)
    }

    fn batch_group(&self) -> Option<usize> {
        Some(Arc::as_ptr(&self.weights) as usize)
    }
}

/// Runs one pass over several handles of the same weights (see
/// [`crate::forward_batch`]); `None` when they are not all [`DecoderModel`]s of one
/// model.
pub(crate) fn forward_batch(
    models: &mut [&mut (dyn LanguageModel + 'static)],
    tokens: &[&[u32]],
) -> Option<Vec<Result<Vec<f32>, ModelError>>> {
    let mut decoders: Vec<&mut DecoderModel> = Vec::with_capacity(models.len());
    for model in models.iter_mut() {
        decoders.push(model.as_any_mut()?.downcast_mut::<DecoderModel>()?);
    }
    let weights = Arc::clone(&decoders.first()?.weights);
    if !decoders.iter().all(|d| Arc::ptr_eq(&d.weights, &weights)) {
        return None;
    }
    // Handles whose call is invalid get their error; the rest run together.
    let mut results: Vec<Option<Result<Vec<f32>, ModelError>>> = Vec::new();
    let mut runnable = Vec::new();
    for (i, (d, t)) in decoders.iter_mut().zip(tokens).enumerate() {
        let pos = d.sequence.cached();
        match d.sequence.check(t, pos) {
            Ok(()) => {
                results.push(None);
                runnable.push(i);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut seqs: Vec<SeqInput<'_>> = Vec::with_capacity(runnable.len());
    let mut sequences: Vec<&mut Sequence> = Vec::with_capacity(runnable.len());
    for (i, d) in decoders.into_iter().enumerate() {
        if runnable.contains(&i) {
            let pos = d.sequence.cached();
            seqs.push(SeqInput {
                cache: &mut d.cache,
                tokens: tokens[i],
                pos,
            });
            sequences.push(&mut d.sequence);
        }
    }
    if !seqs.is_empty() {
        let outcome = catch_panic("running a batched forward pass", || {
            weights.forward(&mut seqs).map_err(ModelError::Forward)
        });
        match outcome {
            Ok(logits) => {
                for ((&i, seq), l) in runnable.iter().zip(sequences).zip(logits) {
                    seq.advance(tokens[i].len());
                    results[i] = Some(Ok(l));
                }
            }
            Err(e) => {
                for (&i, seq) in runnable.iter().zip(sequences) {
                    seq.poison();
                    results[i] = Some(Err(ModelError::Forward(e.to_string())));
                }
            }
        }
    }
    Some(
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ModelError::Forward("not run".to_string()))))
            .collect(),
    )
}

/// One sequence's part of a pass.
struct SeqInput<'a> {
    cache: &'a mut Vec<LayerCache>,
    tokens: &'a [u32],
    pos: usize,
}

/// Scratch buffers of one pass, `rows` rows each.
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The output of a fused matrix before it is split.
    fused: Vec<f32>,
}

impl Weights {
    fn load<R: Read + Seek>(
        path: &Path,
        content: &Content,
        reader: &mut R,
        config: Config,
        kv: KvCachePrecision,
    ) -> Result<Weights, ModelError> {
        let mut t = Tensors {
            path,
            content,
            reader,
        };
        let c = &config;
        let (e, qw, kvw, hd) = (c.n_embd, c.q_width(), c.kv_width(), c.head_dim);
        let embedding = t.matrix("token_embd.weight", None, e)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => Some(t.matrix("output.weight", None, e)?),
            false => None,
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}");
            let phi3 = c.arch == Arch::Phi3;
            let gate_up = match phi3 {
                true => GateUp::Fused(t.matrix(&name("ffn_up.weight"), None, e)?),
                false => {
                    let gate = t.matrix(&name("ffn_gate.weight"), None, e)?;
                    let up = t.matrix(&name("ffn_up.weight"), Some(gate.rows()), e)?;
                    GateUp::Split { gate, up }
                }
            };
            let n_ff = gate_up.n_ff();
            if n_ff == 0 || (phi3 && gate_up_rows_odd(&gate_up)) {
                return Err(t.invalid(&name("ffn_up.weight"), "no feed-forward rows"));
            }
            let qkv = match phi3 {
                true => Qkv::Fused(t.matrix(&name("attn_qkv.weight"), Some(qw + 2 * kvw), e)?),
                false => Qkv::Split {
                    wq: t.matrix(&name("attn_q.weight"), Some(qw), e)?,
                    wk: t.matrix(&name("attn_k.weight"), Some(kvw), e)?,
                    wv: t.matrix(&name("attn_v.weight"), Some(kvw), e)?,
                },
            };
            let optional = |t: &mut Tensors<'_, R>, on: bool, n: &str, len: usize| match on {
                true => t.vector(&name(n), len).map(Some),
                false => Ok(None),
            };
            let (qwen2, normed, gemma) = (
                c.arch == Arch::Qwen2,
                matches!(c.arch, Arch::Qwen3 | Arch::Gemma3),
                c.arch == Arch::Gemma3,
            );
            layers.push(Layer {
                attn_norm: t.vector(&name("attn_norm.weight"), e)?,
                qkv,
                wo: t.matrix(&name("attn_output.weight"), Some(e), qw)?,
                bq: optional(&mut t, qwen2, "attn_q.bias", qw)?,
                bk: optional(&mut t, qwen2, "attn_k.bias", kvw)?,
                bv: optional(&mut t, qwen2, "attn_v.bias", kvw)?,
                q_norm: optional(&mut t, normed, "attn_q_norm.weight", hd)?,
                k_norm: optional(&mut t, normed, "attn_k_norm.weight", hd)?,
                post_attn_norm: optional(&mut t, gemma, "post_attention_norm.weight", e)?,
                ffn_norm: t.vector(&name("ffn_norm.weight"), e)?,
                down: t.matrix(&name("ffn_down.weight"), Some(e), n_ff)?,
                gate_up,
                post_ffn_norm: optional(&mut t, gemma, "post_ffw_norm.weight", e)?,
                window: c.sliding.filter(|s| !s.is_global(i)).map(|s| s.window),
            });
        }
        let output_norm = t.vector("output_norm.weight", e)?;
        let rope_freqs = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(t.vector("rope_freqs.weight", hd / 2)?),
            false => None,
        };
        let vocab = output.as_ref().unwrap_or(&embedding).rows();
        Ok(Weights {
            config,
            embedding,
            output,
            output_norm,
            layers,
            rope_freqs,
            vocab,
            kv,
        })
    }

    /// Logits of the last token of each sequence, after appending all their tokens
    /// to their caches. Callers have checked positions, lengths and token ids.
    ///
    /// The whole pass runs on a thread of rayon's pool: its serial parts (norms,
    /// rotary, the activations' quantization) then run on a pool thread, and each
    /// parallel matmul or attention is a fork inside the pool, not a job sent in from
    /// outside that wakes the pool and puts the caller to sleep every time (a pass
    /// has hundreds of them; sent from outside, one-token decode was ~1.6x slower).
    fn forward(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String> {
        if rayon::current_thread_index().is_some() {
            return self.forward_on_pool(seqs);
        }
        let mut result = Err(String::new());
        rayon::scope(|_| result = self.forward_on_pool(seqs));
        result
    }

    fn forward_on_pool(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String> {
        let c = &self.config;
        let (e, qw, kvw, hd) = (c.n_embd, c.q_width(), c.kv_width(), c.head_dim);
        // Row r belongs to sequence rows_seq[r] at position rows_pos[r].
        let mut rows_seq = Vec::new();
        let mut rows_pos = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            for i in 0..seq.tokens.len() {
                rows_seq.push(s);
                rows_pos.push(seq.pos + i);
            }
        }
        let m = rows_seq.len();
        let seq_lens: Vec<usize> = seqs.iter().map(|q| q.tokens.len()).collect();
        let n_ff = self.layers.first().map_or(0, |l| l.gate_up.n_ff());
        let mut s = Scratch {
            x: vec![0.0; m * e],
            h: vec![0.0; m * e],
            q: vec![0.0; m * qw],
            k: vec![0.0; m * kvw],
            v: vec![0.0; m * kvw],
            att: vec![0.0; m * qw],
            o: vec![0.0; m * e],
            gate: vec![0.0; m * n_ff],
            up: vec![0.0; m * n_ff],
            fused: Vec::new(),
        };
        let tokens = seqs.iter().flat_map(|q| q.tokens.iter().copied());
        for (row, token) in s.x.chunks_exact_mut(e).zip(tokens) {
            self.embedding.dequantize_row(token as usize, row);
            if let Some(scale) = c.embed_scale {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        let global_rope = self.rope_table(&rows_pos, c.rope_base, c.rope_freq_scale);
        let local_rope = c
            .sliding
            .map(|sl| RopeTable::new(&rows_pos, hd, sl.rope_base, 1.0));

        for (li, layer) in self.layers.iter().enumerate() {
            for (x, h) in s.x.chunks_exact(e).zip(s.h.chunks_exact_mut(e)) {
                ops::rms_norm(x, &layer.attn_norm, c.eps, h);
            }
            match &layer.qkv {
                Qkv::Split { wq, wk, wv } => QWeight::matmul_many(
                    &s.h,
                    &seq_lens,
                    &mut [(wq, &mut s.q), (wk, &mut s.k), (wv, &mut s.v)],
                ),
                Qkv::Fused(w) => {
                    let width = w.rows();
                    s.fused.resize(m * width, 0.0);
                    w.matmul_seqs(&s.h, &seq_lens, &mut s.fused);
                    split_rows(&s.fused, width, 0, &mut s.q, qw);
                    split_rows(&s.fused, width, qw, &mut s.k, kvw);
                    split_rows(&s.fused, width, qw + kvw, &mut s.v, kvw);
                }
            }
            add_bias(&mut s.q, layer.bq.as_deref());
            add_bias(&mut s.k, layer.bk.as_deref());
            add_bias(&mut s.v, layer.bv.as_deref());
            if let Some(w) = &layer.q_norm {
                s.q.chunks_exact_mut(hd)
                    .for_each(|head| ops::rms_norm_in_place(head, w, c.eps));
            }
            if let Some(w) = &layer.k_norm {
                s.k.chunks_exact_mut(hd)
                    .for_each(|head| ops::rms_norm_in_place(head, w, c.eps));
            }
            let rope = match (layer.window, &local_rope) {
                (Some(_), Some(local)) => local,
                _ => &global_rope,
            };
            for r in 0..m {
                rope.apply(c.rope, r, &mut s.q[r * qw..(r + 1) * qw], hd);
                rope.apply(c.rope, r, &mut s.k[r * kvw..(r + 1) * kvw], hd);
            }
            if let Some(scale) = c.q_scale {
                s.q.iter_mut().for_each(|v| *v *= scale);
            }
            // Append the new keys and values (half precision, like an F16 cache).
            let mut r = 0;
            for seq in seqs.iter_mut() {
                let lc = &mut seq.cache[li];
                let n = seq.tokens.len();
                lc.k.resize_with(c.n_kv_head, || KvHead::new(self.kv));
                lc.v.resize_with(c.n_kv_head, || KvHead::new(self.kv));
                for (g, (kh, vh)) in lc.k.iter_mut().zip(lc.v.iter_mut()).enumerate() {
                    kh.truncate(seq.pos * hd);
                    vh.truncate(seq.pos * hd);
                    for row in r..r + n {
                        let at = row * kvw + g * hd;
                        kh.extend(&s.k[at..at + hd]);
                        vh.extend(&s.v[at..at + hd]);
                    }
                }
                r += n;
            }
            self.attention(li, seqs, &rows_seq, &rows_pos, &s.q, &mut s.att);
            layer.wo.matmul_seqs(&s.att, &seq_lens, &mut s.o);
            if let Some(w) = &layer.post_attn_norm {
                s.o.chunks_exact_mut(e)
                    .for_each(|row| ops::rms_norm_in_place(row, w, c.eps));
            }
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);

            for (x, h) in s.x.chunks_exact(e).zip(s.h.chunks_exact_mut(e)) {
                ops::rms_norm(x, &layer.ffn_norm, c.eps, h);
            }
            match &layer.gate_up {
                GateUp::Split { gate, up } => QWeight::matmul_many(
                    &s.h,
                    &seq_lens,
                    &mut [(gate, &mut s.gate), (up, &mut s.up)],
                ),
                GateUp::Fused(w) => {
                    let width = w.rows();
                    s.fused.resize(m * width, 0.0);
                    w.matmul_seqs(&s.h, &seq_lens, &mut s.fused);
                    split_rows(&s.fused, width, 0, &mut s.gate, n_ff);
                    split_rows(&s.fused, width, n_ff, &mut s.up, n_ff);
                }
            }
            match c.activation {
                Activation::Silu => ops::swiglu(&mut s.gate, &s.up),
                Activation::GeluTanh => ops::geglu(&mut s.gate, &s.up),
            }
            layer.down.matmul_seqs(&s.gate, &seq_lens, &mut s.o);
            if let Some(w) = &layer.post_ffn_norm {
                s.o.chunks_exact_mut(e)
                    .for_each(|row| ops::rms_norm_in_place(row, w, c.eps));
            }
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
        }

        // The last row of each sequence: final norm, then the output projection.
        let mut last = Vec::with_capacity(seqs.len() * e);
        let mut end = 0;
        for seq in seqs.iter() {
            end += seq.tokens.len();
            let row = &s.x[(end - 1) * e..end * e];
            let start = last.len();
            last.resize(start + e, 0.0);
            ops::rms_norm(row, &self.output_norm, c.eps, &mut last[start..]);
        }
        let output = self.output.as_ref().unwrap_or(&self.embedding);
        let vocab = output.rows();
        let mut logits = vec![0.0; seqs.len() * vocab];
        // One output row per sequence, each a one-row product as in llama.cpp.
        output.matmul_seqs(&last, &vec![1; seqs.len()], &mut logits);
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn rope_table(&self, positions: &[usize], base: f32, freq_scale: f32) -> RopeTable {
        let hd = self.config.head_dim;
        match &self.rope_freqs {
            None => RopeTable::new(positions, hd, base, freq_scale),
            Some(factors) => RopeTable::with_factors(positions, hd, base, freq_scale, factors),
        }
    }

    /// Attention of every row over its own sequence's cache, into `att`.
    fn attention(
        &self,
        li: usize,
        seqs: &[SeqInput<'_>],
        rows_seq: &[usize],
        rows_pos: &[usize],
        q: &[f32],
        att: &mut [f32],
    ) {
        let c = &self.config;
        let layer = &self.layers[li];
        let (qw, hd, group) = (c.q_width(), c.head_dim, c.group());
        let first_visible = |p: usize| match layer.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        // One item: `per` query heads of row `r` sharing KV head `g`, over that KV
        // head's contiguous run. A whole group per item reads the shared keys and
        // values once; fewer where there would not be two items per thread (each
        // head's output is the same either way).
        let threads = rayon::current_num_threads();
        let per = (1..=group)
            .rev()
            .find(|&k| group.is_multiple_of(k) && rows_pos.len() * (c.n_head / k) >= 2 * threads)
            .unwrap_or(1);
        let items_per_row = c.n_head / per;
        let head = |i: usize, out: &mut [f32], scratch: &mut ops::AttendScratch| {
            let (r, h) = (i / items_per_row, i % items_per_row * per);
            let g = h / group;
            let p = rows_pos[r];
            let lo = first_visible(p);
            let seq = &seqs[rows_seq[r]];
            let cache = &seq.cache[li];
            // llama.cpp's KV view: every cell from the first up to the pass's last,
            // padded to 32; on a sliding-window layer (llama.cpp's full-size SWA cache)
            // the cells before the window are in the view, masked (weight 0), so the
            // sums keep the lanes of their cell numbers.
            let n_kv = (seq.pos + seq.tokens.len()).next_multiple_of(32);
            ops::attend_heads(
                &q[r * qw + h * hd..r * qw + (h + per) * hd],
                hd,
                cache.k[g].run(lo * hd..(p + 1) * hd),
                cache.v[g].run(0..(p + 1) * hd),
                hd,
                0,
                p + 1,
                c.kq_scale,
                self.kv == KvCachePrecision::F16,
                seq.tokens.len(),
                n_kv,
                lo,
                scratch,
                out,
            );
        };
        let work: usize = rows_pos
            .iter()
            .map(|&p| (p + 1 - first_visible(p)) * c.n_head)
            .sum();
        if work >= PARALLEL_ATTENTION_WORK && rows_pos.len() * items_per_row > 1 {
            att.par_chunks_exact_mut(per * hd)
                .enumerate()
                .for_each_init(ops::AttendScratch::default, |scratch, (i, out)| {
                    head(i, out, scratch)
                });
        } else {
            let mut scratch = ops::AttendScratch::default();
            for (i, out) in att.chunks_exact_mut(per * hd).enumerate() {
                head(i, out, &mut scratch);
            }
        }
    }
}

fn gate_up_rows_odd(g: &GateUp) -> bool {
    matches!(g, GateUp::Fused(w) if w.rows() % 2 != 0)
}

/// Copies row `r`'s `[from, from + out_width)` slice of `src` (rows of `src_width`)
/// into row `r` of `out`, for every row.
fn split_rows(src: &[f32], src_width: usize, from: usize, out: &mut [f32], out_width: usize) {
    for (row, dst) in src
        .chunks_exact(src_width)
        .zip(out.chunks_exact_mut(out_width))
    {
        dst.copy_from_slice(&row[from..from + out_width]);
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
}

/// Reads named tensors of a GGUF file, checking their shapes.
struct Tensors<'a, R> {
    path: &'a Path,
    content: &'a Content,
    reader: &'a mut R,
}

impl<R: Read + Seek> Tensors<'_, R> {
    fn invalid(&self, name: &str, reason: impl std::fmt::Display) -> ModelError {
        ModelError::InvalidGguf {
            path: self.path.to_path_buf(),
            reason: format!("{name}: {reason}"),
        }
    }

    fn read(&mut self, name: &str) -> Result<candle_core::quantized::QTensor, ModelError> {
        self.content
            .tensor(self.reader, name, &Device::Cpu)
            .map_err(|e| self.invalid(name, e))
    }

    /// A weight matrix of `cols` input features (and `rows` outputs when given).
    fn matrix(
        &mut self,
        name: &str,
        rows: Option<usize>,
        cols: usize,
    ) -> Result<QWeight, ModelError> {
        let t = self.read(name)?;
        let w = QWeight::from_qtensor(&t).map_err(|e| self.invalid(name, e))?;
        if rows.is_some_and(|r| r != w.rows()) || w.cols() != cols {
            return Err(self.invalid(
                name,
                format!(
                    "{}x{}, expected {}x{cols}",
                    w.rows(),
                    w.cols(),
                    rows.unwrap_or(w.rows())
                ),
            ));
        }
        Ok(w)
    }

    /// A 1-D tensor of `len` values (norm weights, biases), as `f32`.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.read(name)?;
        let values: Vec<f32> = t
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| self.invalid(name, e))?;
        if values.len() != len {
            return Err(self.invalid(name, format!("{} values, expected {len}", values.len())));
        }
        Ok(values)
    }
}
