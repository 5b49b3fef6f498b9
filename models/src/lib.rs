//! `airlock-models`: a model as an artifact and a function.
//!
//! Owns format detection (a GGUF file, or a folder with config.json + *.safetensors +
//! tokenizer.json), metadata ([`ModelInfo`]), loading weights with candle, tokenizers
//! ([`Tokenizer`], rebuilt from GGUF metadata or read from tokenizer.json), chat
//! templates ([`ChatTemplate`]) and forward passes ([`LanguageModel`]). It never does
//! threads, async, HTTP or queues: the local runtime drives a model from its own
//! engine thread.
//!
//! GGUF chat models run on our own CPU decoder ([`DecoderModel`]) unless the options
//! name a GPU; there `qwen2`, `qwen3` and `gemma3` run on one pass written on candle
//! tensors ([`TensorDecoder`]) and `llama` on candle's `quantized_llama`
//! ([`LlamaModel`]). Both of our passes read the metadata through one
//! [`decoder::Config`].
//!
//! Served today: GGUF files with `general.architecture = "llama"` and a byte-level BPE
//! (`gpt2`) vocabulary, `qwen2` and `qwen3` (byte-level BPE, `qwen2` pre-tokenizer), `phi3`,
//! `gemma3` with a SentencePiece (`llama`) vocabulary, and safetensors folders whose
//! `model_type` is `llama` or `mistral` ([`LlamaSafetensors`]); BERT folders are
//! embedding models ([`EmbeddingModel`]).
//! Anything else is refused at [`load`] with a clear error.
//! Nothing here panics on a bad artifact: loaders run under `catch_unwind`.

pub mod decoder;
pub mod embedding;
mod error;
mod family;
mod folder;
pub mod gguf;
pub mod kernels;
pub mod llama;
pub mod llama_safetensors;
pub mod quant;
pub mod template;
pub mod tensor_pass;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;

pub use decoder::DecoderModel;
pub use embedding::{is_embedding_dir, Embedded, EmbeddingInfo, EmbeddingModel, Pooling};
pub use error::ModelError;
pub use gguf::{detect_format, GgufFile, ModelFormat, ModelInfo};
pub use llama::LlamaModel;
pub use llama_safetensors::{is_llama_dir, LlamaSafetensors};
pub use template::{ChatMessage, ChatTemplate};
pub use tensor_pass::TensorDecoder;
pub use tokenizer::{EncodeOptions, StreamDecoder, Tokenizer};

/// A loaded language model holding one sequence's KV cache.
///
/// Usage: `forward(prompt, 0)`, then `forward(&[next], n)` for each generated token,
/// where `n` is [`cached_tokens`](Self::cached_tokens); `reset()` before a new sequence.
pub trait LanguageModel: Send + std::fmt::Debug {
    fn info(&self) -> &ModelInfo;
    /// Shared so a server can tokenize and render prompts while an engine thread owns
    /// the model.
    fn tokenizer(&self) -> &Arc<Tokenizer>;
    fn chat_template(&self) -> &Arc<ChatTemplate>;
    /// The most positions a sequence may use.
    fn max_context(&self) -> usize;
    /// Positions currently in the KV cache: the `pos` the next forward call must use.
    fn cached_tokens(&self) -> usize;
    /// Runs `tokens` at positions `pos..pos + tokens.len()` and returns the logits
    /// (one per vocabulary entry) for the last of them.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError>;
    /// Empties the KV cache (and clears the state left by a failed forward pass).
    fn reset(&mut self);
    /// Another handle on the same weights with its own empty KV cache, so an engine can
    /// run several sequences at once; `None` when the model cannot share its weights.
    fn fork(&self) -> Option<Box<dyn LanguageModel>> {
        None
    }
    /// The concrete model, for [`forward_batch`] to find handles it can run together.
    fn as_any_mut(&mut self) -> Option<&mut (dyn std::any::Any + 'static)> {
        None
    }
    /// Handles with the same `Some` group share weights and can run in one
    /// [`forward_batch`] pass.
    fn batch_group(&self) -> Option<usize> {
        None
    }
}

/// Runs `tokens[i]` through `models[i]` (each at its own [`LanguageModel::cached_tokens`])
/// and returns each one's logits for its last token, as `forward` would one by one.
/// Handles of one [`DecoderModel`] (same [`LanguageModel::batch_group`]) run in a
/// single pass that multiplies each weight matrix once for all their rows; others run
/// one after another.
pub fn forward_batch(
    models: &mut [&mut (dyn LanguageModel + 'static)],
    tokens: &[&[u32]],
) -> Vec<Result<Vec<f32>, ModelError>> {
    let group = models.first().and_then(|m| m.batch_group());
    let together = models.len() > 1
        && models.len() == tokens.len()
        && group.is_some()
        && models.iter().all(|m| m.batch_group() == group);
    if together {
        if let Some(results) = decoder::forward_batch(models, tokens) {
            return results;
        }
    }
    models
        .iter_mut()
        .zip(tokens)
        .map(|(m, t)| {
            let pos = m.cached_tokens();
            m.forward(t, pos)
        })
        .collect()
}

/// Where a model's tensors live and its forward passes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal; needs the `cuda` build feature.
    Cuda(usize),
}

impl ComputeDevice {
    /// The candle device; a CUDA device in a build without the `cuda` feature (or
    /// without that GPU) is an error, not a panic.
    pub fn candle(self) -> Result<candle_core::Device, ModelError> {
        match self {
            ComputeDevice::Cpu => Ok(candle_core::Device::Cpu),
            ComputeDevice::Cuda(n) => candle_core::Device::new_cuda(n)
                .map_err(|e| ModelError::Device(format!("cuda:{n}: {e}"))),
        }
    }

    /// Whether this build can use CUDA devices at all.
    pub const fn cuda_compiled() -> bool {
        cfg!(feature = "cuda")
    }
}

/// Choices made when loading weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Requantize tensors whose formats have only slow CPU kernels in candle (Q4_1,
    /// Q5_0, Q5_1) to Q8_0: ~2x faster decode and ~4x faster prefill for ~1.7x their
    /// memory.
    /// See [`quant`].
    pub requantize_slow_formats: bool,
    pub device: ComputeDevice,
    /// How the CPU decoder keeps keys and values (llama.cpp's `--cache-type-k/v`).
    pub kv_cache: KvCachePrecision,
}

/// The precision of the KV cache of the CPU decoder ([`DecoderModel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCachePrecision {
    /// Half precision, llama.cpp's default: keys, values, queries and attention
    /// weights are rounded as its F16 cache and matmuls round them, so logits track
    /// llama.cpp's.
    #[default]
    F16,
    /// Full precision (what candle's passes compute).
    F32,
}

impl LoadOptions {
    /// Whether the weights go to a GPU (where candle's own kernels run the model).
    pub fn device_is_gpu(&self) -> bool {
        self.device != ComputeDevice::Cpu
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            requantize_slow_formats: true,
            device: ComputeDevice::Cpu,
            kv_cache: KvCachePrecision::F16,
        }
    }
}

/// Loads the model at `path` with default options, choosing the implementation by
/// its format and `general.architecture` (a folder's `model_type`).
pub fn load(path: impl AsRef<Path>) -> Result<Box<dyn LanguageModel>, ModelError> {
    load_with(path, &LoadOptions::default())
}

/// Loads the model at `path` with `options`.
pub fn load_with(
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<Box<dyn LanguageModel>, ModelError> {
    let path = path.as_ref();
    match detect_format(path)? {
        ModelFormat::SafetensorsDir(path) => Ok(Box::new(LlamaSafetensors::load(&path, options)?)),
        ModelFormat::Gguf(path) => {
            let gguf = GgufFile::open(&path)?;
            match gguf.info.architecture.as_str() {
                arch if DecoderModel::supports(arch) && !options.device_is_gpu() => {
                    Ok(Box::new(DecoderModel::load(gguf, options)?))
                }
                arch if TensorDecoder::supports(arch) => {
                    Ok(Box::new(TensorDecoder::load(gguf, options)?))
                }
                "llama" => Ok(Box::new(LlamaModel::load(gguf, options)?)),
                other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
            }
        }
    }
}
