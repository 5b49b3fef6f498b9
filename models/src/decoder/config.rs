//! The hyperparameters of a decoder-only GGUF model, read from `<arch>.*` metadata.
//!
//! Owns the per-architecture differences that are data, not code: which rotary
//! layout, which activation, which optional tensors (biases, per-head norms, post
//! norms), the attention scale and the sliding-window pattern, each as llama.cpp
//! builds that architecture's graph. Both GGUF passes, the CPU [`crate::decoder`] and
//! the candle-tensor [`crate::tensor_pass`], read their metadata here and nowhere
//! else ([`Config::read`]). Invariant: a [`Config`] that loads is internally
//! consistent (heads divide evenly, the head size is even, the window is non-zero);
//! anything else is a [`ModelError::Metadata`] at load, never a panic later.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::ModelError;
use crate::family::GgufParts;
use crate::gguf::GgufFile;
use crate::template::{CHATML_TEMPLATE, GEMMA_TEMPLATE};

/// The architectures this decoder runs (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, Mistral, SmolLM: the baseline.
    Llama,
    /// Qwen2: biases on Q, K and V; NeoX rotary.
    Qwen2,
    /// Qwen3: per-head RMS norms on Q and K; NeoX rotary.
    Qwen3,
    /// Gemma 3: per-head Q/K norms, post-attention and post-FFN norms, GELU, scaled
    /// embeddings, sliding-window layers with their own rotary base.
    Gemma3,
    /// Phi-3: fused Q/K/V (`attn_qkv`) and gate/up (`ffn_up`) matrices, NeoX rotary,
    /// Q scaled before attention; no sliding window (llama.cpp disables Phi's).
    Phi3,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3" => Some(Arch::Gemma3),
            "phi3" => Some(Arch::Phi3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// The chat template used when the file has none: Google's for Gemma, ChatML
    /// otherwise.
    pub fn fallback_template(self) -> &'static str {
        match self {
            Arch::Gemma3 => GEMMA_TEMPLATE,
            _ => CHATML_TEMPLATE,
        }
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Adjacent pairs `(2i, 2i + 1)` (llama.cpp `LLAMA_ROPE_TYPE_NORM`).
    Normal,
    /// Halves `(i, i + d/2)` (`LLAMA_ROPE_TYPE_NEOX`).
    Neox,
}

/// The gate activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
}

/// Everything the forward pass needs to know about the shapes and variants.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub rope: RopeLayout,
    pub rope_base: f32,
    /// `1 / rope.scaling.factor` (llama.cpp's `freq_scale`), for global layers.
    pub rope_freq_scale: f32,
    pub activation: Activation,
    /// Multiplies the token embeddings (Gemma: `sqrt(n_embd)`).
    pub embed_scale: Option<f32>,
    /// Scale applied to Q before attention (Gemma 3) instead of to the scores.
    pub q_scale: Option<f32>,
    /// Scale of the attention scores (1 when Q is scaled instead).
    pub kq_scale: f32,
    /// Sliding window: `(window, every Nth layer is global, rotary base of the others)`.
    pub sliding: Option<Sliding>,
    /// The file's context length, if it says.
    pub context_length: Option<usize>,
}

/// Gemma 3's interleaved local/global attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sliding {
    pub window: usize,
    /// Layer `i` is global when `(i + 1) % pattern == 0`.
    pub pattern: usize,
    pub rope_base: f32,
}

impl Sliding {
    pub fn is_global(&self, layer: usize) -> bool {
        (layer + 1).is_multiple_of(self.pattern)
    }
}

/// Gemma 3's local layers: every sixth layer global, rotary base 10 000 on the others
/// (llama.cpp's `set_swa_pattern(6)` and `rope_freq_base_train_swa`).
const GEMMA3_SWA_PATTERN: usize = 6;
const GEMMA3_SWA_ROPE_BASE: f32 = 10_000.0;

impl Config {
    /// Takes a GGUF file apart for a pass this config drives: the architecture
    /// (refused unless [`Arch`] names it), the tokenizer and template
    /// ([`Arch::fallback_template`] when the file has none), and the config.
    pub(crate) fn read(gguf: GgufFile) -> Result<(Config, GgufParts), ModelError> {
        let arch = Arch::from_name(&gguf.info.architecture)
            .ok_or_else(|| ModelError::UnsupportedArchitecture(gguf.info.architecture.clone()))?;
        let parts = GgufParts::new(gguf, arch.fallback_template())?;
        let config = Config::from_metadata(arch, &parts.content.metadata)?;
        Ok((config, parts))
    }

    pub fn from_metadata(arch: Arch, md: &HashMap<String, Value>) -> Result<Config, ModelError> {
        let prefix = arch.name();
        let key = |suffix: &str| format!("{prefix}.{suffix}");
        let wrong = |suffix: &str, reason: String| ModelError::Metadata {
            key: key(suffix),
            reason,
        };
        let usize_opt = |suffix: &str| -> Result<Option<usize>, ModelError> {
            match md.get(&key(suffix)) {
                None => Ok(None),
                Some(v) => v
                    .to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|n| n.max(0) as u64))
                    .map(|n| Some(n as usize))
                    .map_err(|e| wrong(suffix, e.to_string())),
            }
        };
        let usize_of = |suffix: &str| -> Result<usize, ModelError> {
            usize_opt(suffix)?.ok_or_else(|| wrong(suffix, "missing".to_string()))
        };
        let f32_or = |suffix: &str, default: f32| -> Result<f32, ModelError> {
            match md.get(&key(suffix)) {
                Some(v) => v.to_f32().map_err(|e| wrong(suffix, e.to_string())),
                None => Ok(default),
            }
        };

        let n_embd = usize_of("embedding_length")?;
        let n_head = usize_of("attention.head_count")?;
        let n_kv_head = usize_opt("attention.head_count_kv")?.unwrap_or(n_head);
        let head_dim = match usize_opt("attention.key_length")? {
            Some(d) => d,
            None if n_head > 0 => n_embd / n_head,
            None => 0,
        };
        if let Some(v) = usize_opt("attention.value_length")? {
            if v != head_dim {
                return Err(wrong(
                    "attention.value_length",
                    format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        // Rotary variants this pass does not implement are refused, not approximated.
        match md.get(&key("rope.scaling.type")) {
            None => {}
            Some(v) => match v.to_string().map(String::as_str) {
                Ok("none" | "linear") => {}
                Ok(other) => {
                    return Err(wrong(
                        "rope.scaling.type",
                        format!("rope scaling `{other}` is not supported (none, linear)"),
                    ))
                }
                Err(e) => return Err(wrong("rope.scaling.type", e.to_string())),
            },
        }
        let default_eps = if arch == Arch::Gemma3 { 1e-6 } else { 1e-5 };
        let rope_scale = f32_or("rope.scaling.factor", 1.0)?;
        let gemma = arch == Arch::Gemma3;
        let config = Config {
            arch,
            n_layer: usize_of("block_count")?,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            eps: f32_or("attention.layer_norm_rms_epsilon", default_eps)?,
            rope: match arch {
                Arch::Llama => RopeLayout::Normal,
                _ => RopeLayout::Neox,
            },
            rope_base: f32_or("rope.freq_base", if gemma { 1_000_000.0 } else { 10_000.0 })?,
            rope_freq_scale: if rope_scale > 0.0 {
                1.0 / rope_scale
            } else {
                0.0
            },
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            embed_scale: gemma.then(|| (n_embd as f32).sqrt()),
            // llama.cpp: Gemma 3 and Phi-3 scale Q by 1/sqrt(head_dim) and the scores by 1.
            q_scale: (gemma || arch == Arch::Phi3).then(|| 1.0 / (head_dim as f32).sqrt()),
            kq_scale: if gemma || arch == Arch::Phi3 {
                1.0
            } else {
                1.0 / (head_dim as f32).sqrt()
            },
            sliding: match gemma {
                true => Some(Sliding {
                    window: usize_of("attention.sliding_window")?,
                    pattern: GEMMA3_SWA_PATTERN,
                    rope_base: GEMMA3_SWA_ROPE_BASE,
                }),
                false => None,
            },
            context_length: usize_opt("context_length")?,
        };
        config.check()?;
        if let Some(dims) = usize_opt("rope.dimension_count")? {
            if dims != head_dim {
                return Err(wrong(
                    "rope.dimension_count",
                    format!("rope dimensions {dims} differ from the head size {head_dim}"),
                ));
            }
        }
        Ok(config)
    }

    fn check(&self) -> Result<(), ModelError> {
        let ok = self.n_layer > 0
            && self.n_embd > 0
            && self.n_head > 0
            && self.n_kv_head > 0
            && self.n_head.is_multiple_of(self.n_kv_head)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2)
            // NaN included: only finite positive values make a rotary table.
            && self.rope_base.is_finite()
            && self.rope_base > 0.0
            && self.rope_freq_scale.is_finite()
            && self.rope_freq_scale > 0.0
            && self.sliding.is_none_or(|s| s.window > 0);
        match ok {
            true => Ok(()),
            false => Err(ModelError::Metadata {
                key: format!("{}.attention", self.arch.name()),
                reason: format!("inconsistent shape {self:?}"),
            }),
        }
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}
