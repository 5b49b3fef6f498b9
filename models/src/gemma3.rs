//! Gemma 3 GGUF models (`general.architecture = "gemma3"`) on the CPU.
//!
//! Owns loading Gemma 3 weights and its forward pass over one sequence with its KV
//! cache. The pass is ours, written on candle tensors after candle-transformers'
//! `quantized_gemma3`, because that one departs from the model (and from llama.cpp):
//! it gates the MLP with SiLU where Gemma uses GELU (tanh approximation)
//! (huggingface/candle#3745), it applies the sliding window only during prefill, it
//! cannot prefill a chunk after position 0 (its mask mixes dtypes and hides the
//! cache), and it builds 128K-position rotary tables for every layer (~2.3 GB for the
//! 270M model). Here, per layer: RMS norm, attention with per-head Q/K RMS norms and
//! NeoX rotary embeddings (base `rope.freq_base` on global layers, 10 000 on
//! sliding ones, every sixth layer global as in llama.cpp), RMS norm, residual; the
//! same around a GELU-gated MLP. Invariants:
//! - the KV cache holds exactly [`Gemma3Model::cached_tokens`] positions (global
//!   layers keep them all, sliding layers the last `window - 1`); a forward call must
//!   start at that position, and a query at position `p` sees keys at `p - window + 1
//!   ..= p` on sliding layers, `0 ..= p` on global ones, whatever the chunking;
//! - a failed forward pass leaves the cache in an unknown state, so the model refuses
//!   further passes until [`reset`](crate::LanguageModel::reset) ([`crate::family`]);
//! - Q4_1/Q5_0/Q5_1 tensors are requantized to Q8_0 at load unless the options say
//!   otherwise ([`crate::quant`]);
//! - the usable context is the file's `context_length` capped at candle's
//!   `quantized_gemma3::MAX_SEQ_LEN` (131072); the two rotary tables (sliding and
//!   global) are built for exactly that many positions;
//! - loading and forward passes run under `catch_unwind`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_transformers::models::quantized_gemma3::MAX_SEQ_LEN;
use candle_transformers::quantized_nn::RmsNorm;

use crate::error::{catch_panic, ModelError};
use crate::family::{header_parts, Sequence};
use crate::gguf::{GgufFile, ModelInfo};
use crate::quant;
use crate::template::{ChatTemplate, GEMMA_TEMPLATE};
use crate::tokenizer::Tokenizer;
use crate::{LanguageModel, LoadOptions};

/// Every sixth layer attends globally, the others through the sliding window
/// (llama.cpp's `set_swa_pattern(6)` for Gemma 3).
const SLIDING_PATTERN: usize = 6;
/// Rotary base of the sliding-window layers (fixed by the architecture).
const SLIDING_ROPE_BASE: f32 = 10_000.0;

/// A loaded Gemma 3 model: weights, tokenizer, chat template and one KV cache.
#[derive(Clone)]
pub struct Gemma3Model {
    weights: Weights,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    sequence: Sequence,
}

impl std::fmt::Debug for Gemma3Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemma3Model")
            .field("info", &self.info)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Gemma3Model {
    /// Builds the tokenizer and template from the header, then loads the weights.
    pub fn load(gguf: GgufFile, options: &LoadOptions) -> Result<Self, ModelError> {
        let GgufFile {
            path,
            content,
            info,
        } = gguf;
        let (tokenizer, template) = header_parts(&path, &content, &info, GEMMA_TEMPLATE)?;
        let max_context = info
            .context_length
            .unwrap_or(MAX_SEQ_LEN)
            .clamp(1, MAX_SEQ_LEN);

        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut reader = BufReader::new(file);
        let invalid = |e: candle_core::Error| ModelError::InvalidGguf {
            path: path.clone(),
            reason: e.to_string(),
        };
        let device = options.device.candle()?;
        let weights = catch_panic("loading gemma3 weights", || {
            let config = Config::from_metadata(&content.metadata)?;
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

impl LanguageModel for Gemma3Model {
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

/// The hyperparameters read from `gemma3.*` metadata.
#[derive(Debug, Clone, Copy)]
struct Config {
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    n_layer: usize,
    n_embd: usize,
    eps: f64,
    window: usize,
    rope_base: f32,
    /// Linear rope scaling of the global layers (`rope.scaling.factor`), as llama.cpp.
    rope_scale: f32,
}

impl Config {
    fn from_metadata(md: &HashMap<String, Value>) -> Result<Self, ModelError> {
        let get = |suffix: &str| {
            let key = format!("gemma3.{suffix}");
            md.get(&key).ok_or(ModelError::Metadata {
                key,
                reason: "missing".to_string(),
            })
        };
        let wrong = |suffix: &str, e: candle_core::Error| ModelError::Metadata {
            key: format!("gemma3.{suffix}"),
            reason: e.to_string(),
        };
        let usize_of = |suffix: &str| -> Result<usize, ModelError> {
            let v = get(suffix)?;
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .map(|n| n as usize)
                .map_err(|e| wrong(suffix, e))
        };
        let f32_or = |suffix: &str, default: f32| -> Result<f32, ModelError> {
            match get(suffix) {
                Ok(v) => v.to_f32().map_err(|e| wrong(suffix, e)),
                Err(_) => Ok(default),
            }
        };
        let config = Self {
            n_head: usize_of("attention.head_count")?,
            n_kv_head: usize_of("attention.head_count_kv")?,
            head_dim: usize_of("attention.key_length")?,
            n_layer: usize_of("block_count")?,
            n_embd: usize_of("embedding_length")?,
            eps: f64::from(f32_or("attention.layer_norm_rms_epsilon", 1e-6)?),
            window: usize_of("attention.sliding_window")?,
            rope_base: f32_or("rope.freq_base", 1_000_000.0)?,
            rope_scale: f32_or("rope.scaling.factor", 1.0)?,
        };
        let value_length = usize_of("attention.value_length")?;
        if config.n_head == 0
            || config.n_kv_head == 0
            || !config.n_head.is_multiple_of(config.n_kv_head)
            || config.head_dim == 0
            || !config.head_dim.is_multiple_of(2)
            || value_length != config.head_dim
            || config.window == 0
            || config.rope_scale <= 0.0
        {
            return Err(ModelError::Metadata {
                key: "gemma3.attention".to_string(),
                reason: format!("inconsistent shape {config:?} (value_length {value_length})"),
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
    fn new(
        head_dim: usize,
        base: f32,
        scale: f32,
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
            / f64::from(scale))?;
        let angles = pos.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }
}

#[derive(Clone)]
struct Layer {
    attn_norm: RmsNorm,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    post_ffn_norm: RmsNorm,
    /// The sliding window, or `None` on global layers.
    window: Option<usize>,
    /// Keys and values `(1, n_kv_head, cached, head_dim)` of the latest positions.
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
    sliding_rope: Rope,
    global_rope: Rope,
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
        let norm = |t: candle_core::quantized::QTensor| RmsNorm::from_qtensor(t, config.eps);
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}.weight"));
            let matmul = QMatMul::from_qtensor;
            let global = (i + 1) % SLIDING_PATTERN == 0;
            layers.push(Layer {
                attn_norm: norm(t("attn_norm")?)?,
                wq: matmul(t("attn_q")?)?,
                wk: matmul(t("attn_k")?)?,
                wv: matmul(t("attn_v")?)?,
                wo: matmul(t("attn_output")?)?,
                q_norm: norm(t("attn_q_norm")?)?,
                k_norm: norm(t("attn_k_norm")?)?,
                post_attn_norm: norm(t("post_attention_norm")?)?,
                ffn_norm: norm(t("ffn_norm")?)?,
                gate: matmul(t("ffn_gate")?)?,
                up: matmul(t("ffn_up")?)?,
                down: matmul(t("ffn_down")?)?,
                post_ffn_norm: norm(t("post_ffw_norm")?)?,
                window: (!global).then_some(config.window),
                cache: None,
            });
        }
        Ok(Self {
            embedding,
            norm: norm(tensor("output_norm.weight")?)?,
            output: QMatMul::from_qtensor(output)?,
            layers,
            sliding_rope: Rope::new(
                config.head_dim,
                SLIDING_ROPE_BASE,
                1.0,
                max_context,
                &device,
            )?,
            global_rope: Rope::new(
                config.head_dim,
                config.rope_base,
                config.rope_scale,
                max_context,
                &device,
            )?,
            config,
            device,
        })
    }

    /// Logits for the last of `tokens`, run at positions `pos..`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        let seq = tokens.len();
        let ids = Tensor::new(tokens, &self.device)?;
        let scale = (self.config.n_embd as f64).sqrt();
        let mut x = (self.embedding.index_select(&ids, 0)? * scale)?.unsqueeze(0)?;
        for layer in &mut self.layers {
            let rope = match layer.window {
                Some(_) => &self.sliding_rope,
                None => &self.global_rope,
            };
            let h = layer.attn_norm.forward(&x)?;
            let h = attention(layer, &self.config, rope, &h, pos)?;
            x = (x + layer.post_attn_norm.forward(&h)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let h = (layer.gate.forward(&h)?.gelu()? * layer.up.forward(&h)?)?;
            let h = layer.down.forward(&h)?;
            x = (x + layer.post_ffn_norm.forward(&h)?)?;
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
    let q = layer
        .q_norm
        .forward(&heads(layer.wq.forward(x)?, c.n_head)?)?;
    let k = layer
        .k_norm
        .forward(&heads(layer.wk.forward(x)?, c.n_kv_head)?)?;
    let v = heads(layer.wv.forward(x)?, c.n_kv_head)?;
    let cos = rope.cos.narrow(0, pos, seq)?;
    let sin = rope.sin.narrow(0, pos, seq)?;
    let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
    let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;

    let (k, v) = match layer.cache.take() {
        None => (k, v),
        Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
    };
    let n_keys = k.dim(2)?;
    // Absolute position of the first key.
    let first_key = pos + seq - n_keys;
    layer.cache = Some(match layer.window {
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
    let groups = c.n_head / c.n_kv_head;
    let q = q.reshape((1, c.n_kv_head, groups * seq, c.head_dim))?;
    let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
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
        .reshape((1, seq, c.n_head * c.head_dim))?;
    layer.wo.forward(&out)
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
