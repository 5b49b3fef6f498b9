//! Llama-architecture chat models from a Hugging Face safetensors folder (Llama,
//! Mistral, SmolLM, TinyLlama, ...: `model_type` `llama` or `mistral`).
//!
//! Owns reading such a folder (`config.json`, `*.safetensors` or shards with
//! `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) and running candle-transformers' `llama` over one
//! sequence, its KV cache (`Cache`, kept outside the weights) beside it. Invariants:
//! - weights are F32 whatever the checkpoint holds (BF16/F16 are converted at load:
//!   BF16 matmuls on the CPU are ~2.5x slower), read into memory without mmap
//!   ([`crate::folder`]);
//! - the usable context is `max_position_embeddings` (candle's rotary tables cover
//!   exactly that many positions), capped at Mistral's `sliding_window` when set,
//!   since candle's llama attends over the whole cache;
//! - configurations candle's llama would run wrongly are refused at load: biases in
//!   attention or MLP, an activation other than SiLU, a `head_dim` other than
//!   `hidden_size / num_attention_heads`, rope scaling other than `llama3`;
//! - the tokenizer ([`Tokenizer::from_hf_file`]) never yields an id outside the
//!   embedding (checked at load); BOS/EOS come from `tokenizer_config.json`, else
//!   `config.json`, else `generation_config.json`;
//! - positions and poisoning follow [`crate::family::Sequence`]; loading and forward
//!   passes run under `catch_unwind` (candle's `Llama::load` unwraps per layer).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig, LlamaEosToks};
use serde::Deserialize;

use crate::error::{catch_panic, ModelError};
use crate::family::Sequence;
use crate::folder::{read_json, read_weights, TokenizerConfigFile};
use crate::gguf::{detect_format, ModelFormat, ModelInfo};
use crate::template::{ChatTemplate, CHATML_TEMPLATE};
use crate::tokenizer::{HfSpecialTokens, Tokenizer};
use crate::{LanguageModel, LoadOptions};

/// `model_type` values served by this module.
pub const ARCHITECTURES: &[&str] = &["llama", "mistral"];
const CLASSES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// A loaded safetensors llama: weights, tokenizer, chat template and one KV cache.
#[derive(Clone)]
pub struct LlamaSafetensors {
    model: Llama,
    cache: Cache,
    /// An empty cache (rotary tables built once) that `reset` copies.
    fresh: Cache,
    device: Device,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    sequence: Sequence,
}

impl std::fmt::Debug for LlamaSafetensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaSafetensors")
            .field("info", &self.info)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// The parts of config.json candle's `LlamaConfig` ignores but we must check.
#[derive(Debug, Deserialize)]
struct Extras {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_act: Option<String>,
    head_dim: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<usize>,
}

impl Extras {
    /// The served architecture this folder holds, if any.
    fn architecture(&self) -> Option<&str> {
        match self.model_type.as_deref() {
            Some(t) => ARCHITECTURES.iter().copied().find(|a| *a == t),
            None => self
                .architectures
                .iter()
                .find_map(|c| CLASSES.iter().position(|k| k == c))
                .map(|i| ARCHITECTURES[i]),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct GenerationConfig {
    bos_token_id: Option<u32>,
    eos_token_id: Option<LlamaEosToks>,
}

fn first(eos: Option<&LlamaEosToks>) -> Option<u32> {
    match eos? {
        LlamaEosToks::Single(id) => Some(*id),
        LlamaEosToks::Multiple(ids) => ids.first().copied(),
    }
}

/// Whether `path` is a safetensors folder this module serves.
pub fn is_llama_dir(path: &Path) -> bool {
    matches!(detect_format(path), Ok(ModelFormat::SafetensorsDir(_)))
        && read_json::<Extras>(&path.join("config.json")).is_ok_and(|e| e.architecture().is_some())
}

impl LlamaSafetensors {
    /// Loads the folder at `dir` onto `options.device`.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self, ModelError> {
        let ModelFormat::SafetensorsDir(dir) = detect_format(dir)? else {
            return Err(ModelError::UnrecognizedFormat {
                path: dir.to_path_buf(),
                reason: "a safetensors model is a folder with config.json, tokenizer.json \
                         and *.safetensors"
                    .to_string(),
            });
        };
        let config_path = dir.join("config.json");
        let (config, extras) = read_config(&config_path)?;
        let architecture = extras.architecture().unwrap_or("llama").to_string();

        let generation_path = dir.join("generation_config.json");
        let generation: GenerationConfig = if generation_path.is_file() {
            read_json(&generation_path)?
        } else {
            GenerationConfig::default()
        };
        let files = TokenizerConfigFile::read(&dir)?;
        let tokenizer = Tokenizer::from_hf_file(
            &dir.join("tokenizer.json"),
            HfSpecialTokens {
                bos_token: files.bos_token.clone(),
                eos_token: files.eos_token.clone(),
                bos_token_id: config.bos_token_id.or(generation.bos_token_id),
                eos_token_id: first(config.eos_token_id.as_ref())
                    .or(first(generation.eos_token_id.as_ref())),
                add_bos_token: files.add_bos_token,
                add_eos_token: files.add_eos_token,
            },
        )?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(ModelError::InvalidFile {
                path: dir.join("tokenizer.json"),
                reason: format!(
                    "{} tokens but the model embeds only {}",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            });
        }
        let token_str = |text: &Option<String>, id: Option<u32>| {
            text.clone()
                .or_else(|| {
                    id.and_then(|id| tokenizer.token_text(id))
                        .map(str::to_string)
                })
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            files.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE),
            token_str(&files.bos_token, tokenizer.bos_token_id()),
            token_str(&files.eos_token, tokenizer.eos_token_id()),
        )?
        // The tokenizer adds BOS itself: a template that writes it would double it.
        .strip_leading_bos(tokenizer.add_bos_token());

        let device = options.device.candle()?;
        let (tensors, weight_files) = read_weights(&dir, DType::F32, &device)?;
        let invalid = |e: candle_core::Error| ModelError::InvalidFile {
            path: weights_label(&dir, &weight_files),
            reason: e.to_string(),
        };
        let (model, cache) = catch_panic("loading llama weights", || {
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
            let model = Llama::load(vb, &config).map_err(invalid)?;
            let cache = Cache::new(true, DType::F32, &config, &device).map_err(invalid)?;
            Ok((model, cache))
        })?;

        let max_context = match extras.sliding_window {
            Some(window) if window > 0 => config.max_position_embeddings.min(window),
            _ => config.max_position_embeddings,
        };
        let info = ModelInfo {
            architecture,
            name: None,
            context_length: Some(config.max_position_embeddings),
            embedding_length: Some(config.hidden_size),
            block_count: Some(config.num_hidden_layers),
            vocab_size: config.vocab_size,
            tokenizer_model: "tokenizer.json".to_string(),
            tokenizer_pre: None,
            bos_token_id: tokenizer.bos_token_id(),
            eos_token_id: first(generation.eos_token_id.as_ref())
                .or(first(config.eos_token_id.as_ref()))
                .or(tokenizer.eos_token_id()),
            unknown_token_id: None,
            padding_token_id: None,
            add_bos_token: Some(tokenizer.add_bos_token()),
            add_space_prefix: None,
            chat_template: files.chat_template,
        };
        Ok(Self {
            model,
            fresh: cache.clone(),
            cache,
            device,
            sequence: Sequence::new(max_context, config.vocab_size),
            info,
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
        })
    }
}

/// Parses config.json and refuses what candle's llama would run wrongly.
fn read_config(path: &Path) -> Result<(Config, Extras), ModelError> {
    let value: serde_json::Value = read_json(path)?;
    let invalid = |reason: String| ModelError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    };
    let extras: Extras =
        serde_json::from_value(value.clone()).map_err(|e| invalid(e.to_string()))?;
    match extras.architecture() {
        Some(_) => {}
        None if extras.model_type.as_deref() == Some("bert") => {
            return Err(invalid(
                "a BERT folder is an embedding model (EmbeddingModel), not a chat model"
                    .to_string(),
            ))
        }
        None => {
            return Err(ModelError::UnsupportedArchitecture(
                extras
                    .model_type
                    .clone()
                    .or_else(|| extras.architectures.first().cloned())
                    .unwrap_or_else(|| "unknown".to_string()),
            ))
        }
    }
    let config: LlamaConfig = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    let config = config.into_config(false);
    let (heads, kv_heads, hidden) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.hidden_size,
    );
    if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
        return Err(invalid(format!(
            "{heads} attention heads, {kv_heads} key/value heads and hidden_size {hidden} \
             do not fit together"
        )));
    }
    let head_dim = hidden / heads;
    if head_dim % 2 != 0 || extras.head_dim.is_some_and(|d| d != head_dim) {
        return Err(invalid(format!(
            "head_dim {:?} (hidden_size / heads = {head_dim}) is not supported",
            extras.head_dim
        )));
    }
    if config.vocab_size == 0 || config.num_hidden_layers == 0 {
        return Err(invalid(
            "vocab_size and num_hidden_layers must be positive".into(),
        ));
    }
    if config.max_position_embeddings == 0 || u32::try_from(config.max_position_embeddings).is_err()
    {
        return Err(invalid(format!(
            "max_position_embeddings {} is not usable",
            config.max_position_embeddings
        )));
    }
    if extras.attention_bias || extras.mlp_bias {
        return Err(invalid("attention or MLP biases are not supported".into()));
    }
    if let Some(act) = extras.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(invalid(format!(
            "hidden_act {act:?} is not supported (silu)"
        )));
    }
    Ok((config, extras))
}

fn weights_label(dir: &Path, files: &[PathBuf]) -> PathBuf {
    match files {
        [one] => one.clone(),
        _ => dir.join("*.safetensors"),
    }
}

impl LanguageModel for LlamaSafetensors {
    crate::family::model_accessors!();

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        let (model, cache, device) = (&self.model, &mut self.cache, &self.device);
        self.sequence.forward(tokens, pos, || {
            let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
            model
                .forward(&input, pos, cache)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_vec1()
        })
    }

    fn reset(&mut self) {
        self.cache = self.fresh.clone();
        self.sequence.reset();
    }
}
