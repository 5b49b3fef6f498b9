//! The `qwen2`, `qwen3` and `gemma3` GGUF families on candle tensors and quantized
//! matmuls: what runs them on GPU devices (the CPU runs [`crate::decoder`]).
//!
//! Owns one forward pass over one sequence with its KV cache ([`TensorDecoder`]),
//! configured by the decoder's [`Config`] (`Config::read`: the metadata is read
//! there and nowhere else), so the differences between the families are data: Q, K
//! and V biases (qwen2); per-head Q/K RMS norms (qwen3, gemma3; Qwen 3's head size is
//! `attention.key_length`); post-attention and post-FFN norms, a GELU-tanh gate,
//! embeddings scaled by `sqrt(n_embd)`, Q scaled instead of the scores, and
//! sliding-window layers with their own rotary base (gemma3). Per layer: RMS norm,
//! grouped-query attention with NeoX rotary embeddings, output projection (+ post
//! norm), residual; the same around the gated MLP. The output projection is
//! `output.weight`, or the embedding when the file ties them. Llama stays on
//! candle's `quantized_llama` ([`crate::llama`]).
//!
//! Why not candle-transformers' own passes: `quantized_qwen2`'s `ModelWeights` is not
//! `Clone`, so a second sequence could not share its weights
//! ([`LanguageModel::fork`]); `quantized_qwen3` builds its rotary table in F16 unless
//! the file says `general.dtype = 0` (which llama.cpp never writes), so its angles
//! are off by up to a quarter of a radian by position 1000, and keeps decoded tokens
//! in a cache a later multi-token pass does not read; `quantized_gemma3` gates the
//! MLP with SiLU where Gemma uses GELU (huggingface/candle#3745), applies the sliding
//! window only during prefill, cannot prefill a chunk after position 0, and builds a
//! 128K-position rotary table for every layer (~2.3 GB for the 270M model).
//!
//! Invariants:
//! - the KV cache holds exactly [`LanguageModel::cached_tokens`] positions (global
//!   layers keep them all, sliding layers the last `window - 1`); a forward call must
//!   start at that position and may have any length: a query at position `p` sees
//!   keys `p - window + 1 ..= p` on sliding layers and `0 ..= p` on the others,
//!   whatever the chunking, in prefill and decode alike;
//! - a failed or panicking pass poisons the handle until
//!   [`reset`](LanguageModel::reset) (`crate::family`);
//! - the usable context is the file's `context_length` capped at [`MAX_CONTEXT`];
//!   one rotary table per base (the global one, and the sliding layers' on gemma3),
//!   built for exactly that many positions, is shared by every layer and every fork
//!   (positions x head_dim / 2 x 8 bytes: 20 MiB for Qwen 3 0.6B at 40960);
//! - weights are read-only and shared by forks through an `Arc`; each handle owns
//!   only its cache;
//! - what [`Config`] refuses (YaRN rope scaling, partial rotary, inconsistent heads)
//!   is refused at load, not run wrongly; Q4_1/Q5_0/Q5_1 tensors are requantized to
//!   Q8_0 unless the options say otherwise ([`crate::quant`]); the embedding is held
//!   dequantized (F32);
//! - loading and forward passes run under `catch_unwind`;
//! - the file's `tokenizer.chat_template` is used, else the family's
//!   ([`crate::decoder::Arch::fallback_template`]: Google's for Gemma, ChatML).

use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use crate::decoder::{Activation, Arch, Config};
use crate::error::ModelError;
use crate::family::{read_weights, ReadSeek, Sequence};
use crate::gguf::{GgufFile, ModelInfo};
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::{LanguageModel, LoadOptions};

/// The most positions a sequence may use, whatever the file says (Qwen 2.5's native
/// context is 32768, Qwen 3's 40960; 131072 is Gemma 3's, and what Qwen reaches with
/// YaRN, which is not implemented).
pub const MAX_CONTEXT: usize = 131_072;

/// A `qwen2`, `qwen3` or `gemma3` model on candle tensors: shared weights and this
/// handle's KV cache.
#[derive(Clone)]
pub struct TensorDecoder {
    weights: Arc<Weights>,
    /// Per layer: keys and values `(1, n_kv_head, cached, head_dim)`, rotated, of the
    /// latest positions.
    cache: Vec<Option<(Tensor, Tensor)>>,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    sequence: Sequence,
}

impl std::fmt::Debug for TensorDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorDecoder")
            .field("config", &self.weights.config)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl TensorDecoder {
    /// Whether `general.architecture` is one this pass runs.
    pub fn supports(architecture: &str) -> bool {
        Arch::from_name(architecture).is_some_and(|a| !matches!(a, Arch::Llama | Arch::Phi3))
    }

    /// Builds the tokenizer and template from the header, then loads the weights on
    /// `options.device`.
    pub fn load(gguf: GgufFile, options: &LoadOptions) -> Result<Self, ModelError> {
        if !Self::supports(&gguf.info.architecture) {
            return Err(ModelError::UnsupportedArchitecture(
                gguf.info.architecture.clone(),
            ));
        }
        let (config, header) = Config::read(gguf)?;
        let max_context = config
            .context_length
            .unwrap_or(MAX_CONTEXT)
            .clamp(1, MAX_CONTEXT);
        let device = options.device.candle()?;
        let weights = read_weights(&header.path, header.content, options, |content, reader| {
            Weights::load(&content, reader, config, max_context, &device)
        })?;
        Ok(Self {
            cache: vec![None; weights.layers.len()],
            weights: Arc::new(weights),
            sequence: Sequence::new(max_context, header.info.vocab_size),
            info: header.info,
            tokenizer: header.tokenizer,
            template: header.template,
        })
    }

    pub fn config(&self) -> &Config {
        &self.weights.config
    }
}

impl LanguageModel for TensorDecoder {
    crate::family::model_accessors!();

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        let (weights, cache) = (&self.weights, &mut self.cache);
        self.sequence
            .forward(tokens, pos, || weights.forward(cache, tokens, pos))
    }

    fn reset(&mut self) {
        self.cache.iter_mut().for_each(|layer| *layer = None);
        self.sequence.reset();
    }
}

/// cos/sin of every position's rotary angles, `(positions, head_dim / 2)`.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(
        head_dim: usize,
        base: f32,
        freq_scale: f32,
        positions: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::new(inv_freq.as_slice(), device)?.unsqueeze(0)?;
        let pos = (Tensor::arange(0, positions as u32, device)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            * f64::from(freq_scale))?;
        let angles = pos.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }
}

/// A projection with an optional bias (Qwen 2's Q, K and V).
struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct Layer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: QMatMul,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    post_ffn_norm: Option<RmsNorm>,
    /// The sliding window, or `None` on layers that attend to every position.
    window: Option<usize>,
}

/// Everything read-only about a model: shared by all its handles.
struct Weights {
    config: Config,
    /// `(vocab, n_embd)` in F32: looked up row by row.
    embedding: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    global_rope: Rope,
    /// The sliding layers' table, when there are such layers.
    sliding_rope: Option<Rope>,
    device: Device,
}

impl Weights {
    fn load(
        content: &Content,
        mut reader: &mut dyn ReadSeek,
        config: Config,
        max_context: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let c = &config;
        let mut tensor = |name: &str| content.tensor(&mut reader, name, device);
        let embedding_q = tensor("token_embd.weight")?;
        let embedding = embedding_q.dequantize(device)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => tensor("output.weight")?,
            false => embedding_q,
        };
        let norm = |t: QTensor| RmsNorm::from_qtensor(t, f64::from(c.eps));
        let (biased, qk_normed, post_normed) = (
            c.arch == Arch::Qwen2,
            matches!(c.arch, Arch::Qwen3 | Arch::Gemma3),
            c.arch == Arch::Gemma3,
        );
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}"));
            let mut linear = |name: &str| -> candle_core::Result<Linear> {
                let weight = QMatMul::from_qtensor(t(&format!("{name}.weight"))?)?;
                let bias = match biased {
                    true => Some(t(&format!("{name}.bias"))?.dequantize(device)?),
                    false => None,
                };
                Ok(Linear { weight, bias })
            };
            let (wq, wk, wv) = (linear("attn_q")?, linear("attn_k")?, linear("attn_v")?);
            let mut optional_norm = |on: bool, name: &str| match on {
                true => norm(t(name)?).map(Some),
                false => Ok(None),
            };
            let q_norm = optional_norm(qk_normed, "attn_q_norm.weight")?;
            let k_norm = optional_norm(qk_normed, "attn_k_norm.weight")?;
            let post_attn_norm = optional_norm(post_normed, "post_attention_norm.weight")?;
            let post_ffn_norm = optional_norm(post_normed, "post_ffw_norm.weight")?;
            layers.push(Layer {
                attn_norm: norm(t("attn_norm.weight")?)?,
                wq,
                wk,
                wv,
                wo: QMatMul::from_qtensor(t("attn_output.weight")?)?,
                q_norm,
                k_norm,
                post_attn_norm,
                ffn_norm: norm(t("ffn_norm.weight")?)?,
                gate: QMatMul::from_qtensor(t("ffn_gate.weight")?)?,
                up: QMatMul::from_qtensor(t("ffn_up.weight")?)?,
                down: QMatMul::from_qtensor(t("ffn_down.weight")?)?,
                post_ffn_norm,
                window: c.sliding.filter(|s| !s.is_global(i)).map(|s| s.window),
            });
        }
        let rope = |base, freq_scale| Rope::new(c.head_dim, base, freq_scale, max_context, device);
        Ok(Self {
            embedding,
            norm: norm(tensor("output_norm.weight")?)?,
            output: QMatMul::from_qtensor(output)?,
            layers,
            global_rope: rope(c.rope_base, c.rope_freq_scale)?,
            sliding_rope: c.sliding.map(|s| rope(s.rope_base, 1.0)).transpose()?,
            device: device.clone(),
            config,
        })
    }

    /// Logits for the last of `tokens`, run at positions `pos..` after the `cache`.
    fn forward(
        &self,
        cache: &mut [Option<(Tensor, Tensor)>],
        tokens: &[u32],
        pos: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let c = &self.config;
        let seq = tokens.len();
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embedding.index_select(&ids, 0)?;
        if let Some(scale) = c.embed_scale {
            x = (x * f64::from(scale))?;
        }
        let mut x = x.unsqueeze(0)?;
        for (layer, cache) in self.layers.iter().zip(cache) {
            let rope = match (layer.window, &self.sliding_rope) {
                (Some(_), Some(sliding)) => sliding,
                _ => &self.global_rope,
            };
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(layer, cache, rope, &h, pos)?;
            x = (x + post_norm(layer.post_attn_norm.as_ref(), h)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gate = layer.gate.forward(&h)?;
            let gate = match c.activation {
                Activation::Silu => candle_nn::ops::silu(&gate)?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let h = layer.down.forward(&(gate * layer.up.forward(&h)?)?)?;
            x = (x + post_norm(layer.post_ffn_norm.as_ref(), h)?)?;
        }
        let last = self.norm.forward(&x.i((.., seq - 1, ..))?)?;
        self.output.forward(&last)?.squeeze(0)?.to_vec1()
    }

    /// Self-attention of `x` `(1, seq, n_embd)` at positions `pos..pos + seq`,
    /// appending its keys and values to the layer's `cache`.
    fn attention(
        &self,
        layer: &Layer,
        cache: &mut Option<(Tensor, Tensor)>,
        rope: &Rope,
        x: &Tensor,
        pos: usize,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (_, seq, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| {
            t.reshape((1, seq, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = post_norm(
            layer.q_norm.as_ref(),
            heads(layer.wq.forward(x)?, c.n_head)?,
        )?;
        let k = post_norm(
            layer.k_norm.as_ref(),
            heads(layer.wk.forward(x)?, c.n_kv_head)?,
        )?;
        let v = heads(layer.wv.forward(x)?, c.n_kv_head)?;
        let cos = rope.cos.narrow(0, pos, seq)?;
        let sin = rope.sin.narrow(0, pos, seq)?;
        let mut q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
        if let Some(scale) = c.q_scale {
            q = (q * f64::from(scale))?;
        }

        let (k, v) = match cache.take() {
            None => (k, v),
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
        };
        let n_keys = k.dim(2)?;
        // Absolute position of the first key.
        let first_key = pos + seq - n_keys;
        *cache = Some(match layer.window {
            // Later queries (at pos + seq and beyond) never see more than window - 1
            // earlier keys.
            Some(w) if n_keys > w.saturating_sub(1).max(1) => {
                let keep = w.saturating_sub(1).max(1);
                (
                    k.narrow(2, n_keys - keep, keep)?,
                    v.narrow(2, n_keys - keep, keep)?,
                )
            }
            _ => (k.clone(), v.clone()),
        });

        // Grouped-query attention: the query heads sharing a KV head go side by side.
        let groups = c.group();
        let q = q.reshape((1, c.n_kv_head, groups * seq, c.head_dim))?;
        let scores = (q.matmul(&k.t()?)? * f64::from(c.kq_scale))?;
        let needs_mask = seq > 1 || layer.window.is_some_and(|w| n_keys > w);
        let scores = if needs_mask {
            let mask = mask(seq, n_keys, pos, first_key, layer.window, k.device())?;
            scores
                .reshape((1, c.n_kv_head, groups, seq, n_keys))?
                .broadcast_add(&mask)?
                .reshape((1, c.n_kv_head, groups * seq, n_keys))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v.contiguous()?)?
            .reshape((1, c.n_head, seq, c.head_dim))?
            .transpose(1, 2)?
            .reshape((1, seq, c.q_width()))?;
        layer.wo.forward(&out)
    }
}

/// `x` through `norm` when the layer has one.
fn post_norm(norm: Option<&RmsNorm>, x: Tensor) -> candle_core::Result<Tensor> {
    match norm {
        Some(norm) => norm.forward(&x),
        None => Ok(x),
    }
}

/// `(seq, n_keys)`: 0 where query `pos + i` may see key `first_key + j` (causal, and
/// within the window when there is one), -inf elsewhere.
fn mask(
    seq: usize,
    n_keys: usize,
    pos: usize,
    first_key: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut values = Vec::with_capacity(seq * n_keys);
    for i in 0..seq {
        let query = pos + i;
        for j in 0..n_keys {
            let key = first_key + j;
            let visible = key <= query && window.is_none_or(|w| query - key < w);
            values.push(if visible { 0.0 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(values, (seq, n_keys), device)
}
