//! Qwen 2 / 2.5 and Qwen 3 GGUF models (`general.architecture = "qwen2"` or `"qwen3"`)
//! on the CPU.
//!
//! Owns loading both families' weights and their forward pass over one sequence with
//! its KV cache. They are llama's block (RMS norm, grouped-query attention, RMS norm,
//! SiLU-gated MLP, residuals) with NeoX rotary embeddings (halves rotated, not
//! interleaved pairs) of base `rope.freq_base`, plus: Qwen 2 adds a bias to the Q, K
//! and V projections (`attn_{q,k,v}.bias`); Qwen 3 has no biases but RMS-normalises
//! every query and key head before the rotation (`attn_q_norm`, `attn_k_norm`) and its
//! head size is `attention.key_length` rather than `embedding_length / head_count`.
//! The output projection is `output.weight`, or the embedding when the file ties them.
//!
//! The pass is ours, on candle tensors and quantized matmuls, rather than
//! candle-transformers' `quantized_qwen2` / `quantized_qwen3`: the first's
//! `ModelWeights` is not `Clone`, so a second sequence could not share its weights
//! ([`LanguageModel::fork`]); the second builds its rotary table in F16 unless the
//! file says `general.dtype = 0` (which llama.cpp never writes), so its angles are off
//! by up to a quarter of a radian by position 1000, keeps decoded tokens in a cache
//! that a later multi-token pass does not read, and preallocates a 4096-position
//! cache per layer in every handle.
//!
//! Invariants:
//! - the KV cache holds exactly [`QwenModel::cached_tokens`] positions; a forward call
//!   must start at that position, and may have any length (chunked prefill is exact);
//!   a failed pass poisons the model until [`reset`](crate::LanguageModel::reset)
//!   ([`crate::family`]);
//! - the usable context is the file's `context_length` (Qwen 2.5: 32768, Qwen 3:
//!   40960) capped at [`MAX_CONTEXT`]; the one rotary table, shared by every layer and
//!   every fork, is built for exactly that many positions (positions x head_dim / 2
//!   x 8 bytes: 20 MiB for Qwen 3 0.6B);
//! - rope scaling other than none or linear (YaRN, which some long-context Qwen 2.5
//!   files ask for) and partial rotary dimensions are refused at load, not run wrongly;
//! - Q4_1/Q5_0/Q5_1 tensors are requantized to Q8_0 at load unless the options say
//!   otherwise ([`crate::quant`]); the embedding is held dequantized (F32);
//! - loading and forward passes run under `catch_unwind`.
//!
//! The vocabulary is byte-level BPE with the `qwen2` pre-tokenizer
//! ([`crate::tokenizer::PreTokenizer::Qwen2`]), no BOS, and ends on `<|im_end|>` or
//! `<|endoftext|>`; the file's `tokenizer.chat_template` is used, ChatML when it has
//! none.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use crate::error::{catch_panic, ModelError};
use crate::family::{header_parts, Sequence};
use crate::gguf::{GgufFile, ModelInfo};
use crate::quant;
use crate::template::{ChatTemplate, CHATML_TEMPLATE};
use crate::tokenizer::Tokenizer;
use crate::{LanguageModel, LoadOptions};

/// The most positions a sequence may use, whatever the file says (Qwen 2.5's largest
/// native context is 32768, Qwen 3's 40960; 131072 is what they reach with YaRN,
/// which is not implemented).
pub const MAX_CONTEXT: usize = 131_072;

/// Which of the two families a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Biases on Q, K and V.
    Qwen2,
    /// Per-head Q and K RMS norms.
    Qwen3,
}

/// A loaded Qwen 2 or Qwen 3 model: weights, tokenizer, chat template and one KV
/// cache.
#[derive(Clone)]
pub struct QwenModel {
    weights: Weights,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    sequence: Sequence,
}

impl std::fmt::Debug for QwenModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenModel")
            .field("info", &self.info)
            .field("config", &self.weights.config)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl QwenModel {
    /// Builds the tokenizer and template from the header, then loads the weights.
    pub fn load(gguf: GgufFile, options: &LoadOptions) -> Result<Self, ModelError> {
        let GgufFile {
            path,
            content,
            info,
        } = gguf;
        let variant = match info.architecture.as_str() {
            "qwen2" => Variant::Qwen2,
            "qwen3" => Variant::Qwen3,
            other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
        };
        let (tokenizer, template) = header_parts(&path, &content, &info, CHATML_TEMPLATE)?;
        let config = Config::from_metadata(&content.metadata, variant, &info.architecture)?;
        let max_context = info
            .context_length
            .unwrap_or(MAX_CONTEXT)
            .clamp(1, MAX_CONTEXT);

        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut reader = BufReader::new(file);
        let invalid = |e: candle_core::Error| ModelError::InvalidGguf {
            path: path.clone(),
            reason: e.to_string(),
        };
        let device = options.device.candle()?;
        let weights = catch_panic("loading qwen weights", || {
            if options.requantize_slow_formats && quant::needs_requantize(&content) {
                let (content, mut bytes) =
                    quant::requantize_to_q8_0(&content, &mut reader).map_err(invalid)?;
                Weights::load(&content, &mut bytes, config, max_context, &device).map_err(invalid)
            } else {
                Weights::load(&content, &mut reader, config, max_context, &device).map_err(invalid)
            }
        })?;
        Ok(Self {
            weights,
            sequence: Sequence::new(max_context, info.vocab_size),
            info,
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
        })
    }
}

impl LanguageModel for QwenModel {
    crate::family::model_accessors!();

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        let weights = &mut self.weights;
        self.sequence
            .forward(tokens, pos, || weights.forward(tokens, pos))
    }

    fn reset(&mut self) {
        for layer in &mut self.weights.layers {
            layer.cache = None;
        }
        self.sequence.reset();
    }
}

/// The hyperparameters read from `qwen2.*` / `qwen3.*` metadata.
#[derive(Debug, Clone, Copy)]
struct Config {
    variant: Variant,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    n_layer: usize,
    eps: f64,
    rope_base: f32,
    /// Linear rope scaling (`rope.scaling.factor` with `rope.scaling.type = linear`).
    rope_scale: f32,
}

impl Config {
    fn from_metadata(
        md: &HashMap<String, Value>,
        variant: Variant,
        arch: &str,
    ) -> Result<Self, ModelError> {
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let wrong = |suffix: &str, reason: String| ModelError::Metadata {
            key: key(suffix),
            reason,
        };
        let opt_usize = |suffix: &str| -> Result<Option<usize>, ModelError> {
            md.get(&key(suffix))
                .map(|v| {
                    v.to_u64()
                        .or_else(|_| v.to_u32().map(u64::from))
                        .map(|n| n as usize)
                        .map_err(|e| wrong(suffix, e.to_string()))
                })
                .transpose()
        };
        let usize_of =
            |suffix: &str| opt_usize(suffix)?.ok_or_else(|| wrong(suffix, "missing".to_string()));
        let f32_or = |suffix: &str, default: f32| -> Result<f32, ModelError> {
            match md.get(&key(suffix)) {
                Some(v) => v.to_f32().map_err(|e| wrong(suffix, e.to_string())),
                None => Ok(default),
            }
        };
        let n_head = usize_of("attention.head_count")?;
        let n_embd = usize_of("embedding_length")?;
        let head_dim = match opt_usize("attention.key_length")? {
            Some(d) => d,
            None => n_embd.checked_div(n_head).unwrap_or(0),
        };
        let rope_scale = match md.get(&key("rope.scaling.type")) {
            None => 1.0,
            Some(v) => match v.to_string().map(String::as_str) {
                Ok("none") => 1.0,
                Ok("linear") => f32_or("rope.scaling.factor", 1.0)?,
                Ok(other) => {
                    return Err(wrong(
                        "rope.scaling.type",
                        format!("rope scaling `{other}` is not supported (none, linear)"),
                    ))
                }
                Err(e) => return Err(wrong("rope.scaling.type", e.to_string())),
            },
        };
        let config = Self {
            variant,
            n_head,
            n_kv_head: usize_of("attention.head_count_kv")?,
            head_dim,
            n_layer: usize_of("block_count")?,
            eps: f64::from(f32_or("attention.layer_norm_rms_epsilon", 1e-6)?),
            rope_base: f32_or("rope.freq_base", 10_000.0)?,
            rope_scale,
        };
        let value_length = opt_usize("attention.value_length")?.unwrap_or(head_dim);
        let rope_dims = opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        if config.n_head == 0
            || config.n_kv_head == 0
            || !config.n_head.is_multiple_of(config.n_kv_head)
            || config.head_dim == 0
            || !config.head_dim.is_multiple_of(2)
            || value_length != config.head_dim
            || rope_dims != config.head_dim
            // NaN included: only finite positive values make a rotary table.
            || !config.rope_scale.is_normal()
            || config.rope_scale < 0.0
            || !config.rope_base.is_normal()
            || config.rope_base < 0.0
        {
            return Err(ModelError::Metadata {
                key: key("attention"),
                reason: format!(
                    "inconsistent shape {config:?} (value_length {value_length}, rope \
                     dimensions {rope_dims})"
                ),
            });
        }
        Ok(config)
    }
}

/// cos/sin of every position's rotary angles, `(positions, head_dim / 2)`.
#[derive(Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(c: &Config, positions: usize, device: &Device) -> candle_core::Result<Self> {
        let inv_freq: Vec<f32> = (0..c.head_dim)
            .step_by(2)
            .map(|i| 1.0 / c.rope_base.powf(i as f32 / c.head_dim as f32))
            .collect();
        let inv_freq = Tensor::new(inv_freq.as_slice(), device)?.unsqueeze(0)?;
        let pos = (Tensor::arange(0, positions as u32, device)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            / f64::from(c.rope_scale))?;
        let angles = pos.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }
}

/// A projection with an optional bias (Qwen 2's Q, K and V).
#[derive(Clone)]
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

#[derive(Clone)]
struct Layer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: QMatMul,
    /// Qwen 3's per-head norms.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    /// Keys and values `(1, n_kv_head, cached, head_dim)`, rotated.
    cache: Option<(Tensor, Tensor)>,
}

#[derive(Clone)]
struct Weights {
    config: Config,
    /// `(vocab, n_embd)` in F32: looked up row by row.
    embedding: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    rope: Rope,
    device: Device,
}

impl Weights {
    fn load<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        config: Config,
        max_context: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let device = device.clone();
        let mut tensor = |name: &str| content.tensor(reader, name, &device);
        let embedding_q = tensor("token_embd.weight")?;
        let embedding = embedding_q.dequantize(&device)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => tensor("output.weight")?,
            false => embedding_q,
        };
        let norm = |t: QTensor| RmsNorm::from_qtensor(t, config.eps);
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}"));
            let mut linear = |name: &str| -> candle_core::Result<Linear> {
                let weight = QMatMul::from_qtensor(t(&format!("{name}.weight"))?)?;
                let bias = match config.variant {
                    Variant::Qwen2 => Some(t(&format!("{name}.bias"))?.dequantize(&device)?),
                    Variant::Qwen3 => None,
                };
                Ok(Linear { weight, bias })
            };
            let (wq, wk, wv) = (linear("attn_q")?, linear("attn_k")?, linear("attn_v")?);
            let qk_norm = match config.variant {
                Variant::Qwen2 => None,
                Variant::Qwen3 => Some((
                    norm(t("attn_q_norm.weight")?)?,
                    norm(t("attn_k_norm.weight")?)?,
                )),
            };
            layers.push(Layer {
                attn_norm: norm(t("attn_norm.weight")?)?,
                wq,
                wk,
                wv,
                wo: QMatMul::from_qtensor(t("attn_output.weight")?)?,
                qk_norm,
                ffn_norm: norm(t("ffn_norm.weight")?)?,
                gate: QMatMul::from_qtensor(t("ffn_gate.weight")?)?,
                up: QMatMul::from_qtensor(t("ffn_up.weight")?)?,
                down: QMatMul::from_qtensor(t("ffn_down.weight")?)?,
                cache: None,
            });
        }
        Ok(Self {
            embedding,
            norm: norm(tensor("output_norm.weight")?)?,
            output: QMatMul::from_qtensor(output)?,
            layers,
            rope: Rope::new(&config, max_context, &device)?,
            config,
            device,
        })
    }

    /// Logits for the last of `tokens`, run at positions `pos..`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        let seq = tokens.len();
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embedding.index_select(&ids, 0)?.unsqueeze(0)?;
        for layer in &mut self.layers {
            let h = layer.attn_norm.forward(&x)?;
            let h = attention(layer, &self.config, &self.rope, &h, pos)?;
            x = (x + h)?;
            let h = layer.ffn_norm.forward(&x)?;
            let h = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&h)?)?;
        }
        let last = self.norm.forward(&x.i((.., seq - 1, ..))?)?;
        self.output.forward(&last)?.squeeze(0)?.to_vec1()
    }
}

/// Self-attention of `x` `(1, seq, n_embd)` at positions `pos..pos + seq`, appending
/// its keys and values to the layer's cache.
fn attention(
    layer: &mut Layer,
    c: &Config,
    rope: &Rope,
    x: &Tensor,
    pos: usize,
) -> candle_core::Result<Tensor> {
    let (_, seq, _) = x.dims3()?;
    let heads = |t: Tensor, n: usize| {
        t.reshape((1, seq, n, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let mut q = heads(layer.wq.forward(x)?, c.n_head)?;
    let mut k = heads(layer.wk.forward(x)?, c.n_kv_head)?;
    let v = heads(layer.wv.forward(x)?, c.n_kv_head)?;
    if let Some((q_norm, k_norm)) = &layer.qk_norm {
        q = q_norm.forward(&q)?;
        k = k_norm.forward(&k)?;
    }
    let cos = rope.cos.narrow(0, pos, seq)?;
    let sin = rope.sin.narrow(0, pos, seq)?;
    let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
    let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;

    let (k, v) = match layer.cache.take() {
        None => (k, v),
        Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
    };
    layer.cache = Some((k.clone(), v.clone()));
    let n_keys = k.dim(2)?;

    // Grouped-query attention: the query heads sharing a KV head go side by side.
    let groups = c.n_head / c.n_kv_head;
    let q = q.reshape((1, c.n_kv_head, groups * seq, c.head_dim))?;
    let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
    let scores = if seq > 1 {
        let mask = causal_mask(seq, n_keys, pos, k.device())?;
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
        .reshape((1, seq, c.n_head * c.head_dim))?;
    layer.wo.forward(&out)
}

/// `(seq, n_keys)`: 0 where query `pos + i` may see key `j` (`j <= pos + i`), -inf
/// elsewhere. The cache holds every position from 0, so key `j` is at position `j`.
fn causal_mask(
    seq: usize,
    n_keys: usize,
    pos: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..n_keys).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(values, (seq, n_keys), device)
}
