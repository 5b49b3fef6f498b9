//! Llama-family GGUF models (`general.architecture = "llama"`) on the CPU.
//!
//! Owns loading the weights with candle-transformers' `quantized_llama` and running
//! forward passes over one sequence with its KV cache. Invariants:
//! - the KV cache holds exactly [`LlamaModel::cached_tokens`] positions; a forward
//!   call must start at that position (candle appends to the cache whatever position
//!   it is told, so a wrong `pos` would silently corrupt attention);
//! - a failed forward pass leaves the cache in an unknown state, so the model refuses
//!   further passes until [`reset`](crate::LanguageModel::reset);
//! - Q4_1/Q5_0/Q5_1 tensors are requantized to Q8_0 at load unless the options say
//!   otherwise ([`crate::quant`]);
//! - the usable context is the file's `context_length` capped at candle's
//!   `MAX_SEQ_LEN` (4096), the size of its precomputed rotary tables;
//! - loading and forward passes run under `catch_unwind`: a candle panic becomes a
//!   [`ModelError::Panicked`], never a crashed process.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};

use crate::error::{catch_panic, ModelError};
use crate::gguf::{GgufFile, ModelInfo};
use crate::quant;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::{LanguageModel, LoadOptions};

/// A loaded llama-family model: weights, tokenizer, chat template and one KV cache.
pub struct LlamaModel {
    weights: ModelWeights,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    max_context: usize,
    cached: usize,
    poisoned: bool,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("info", &self.info)
            .field("max_context", &self.max_context)
            .field("cached", &self.cached)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl LlamaModel {
    /// Builds the tokenizer and template from the header, then loads the weights.
    pub fn load(gguf: GgufFile, options: &LoadOptions) -> Result<Self, ModelError> {
        let GgufFile {
            path,
            content,
            info,
        } = gguf;
        let tokenizer = Tokenizer::from_gguf(&content, &info)?;
        let token_str = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_text(id))
                .unwrap_or_default()
                .to_string()
        };
        let (bos, eos) = (token_str(info.bos_token_id), token_str(info.eos_token_id));
        let template = match &info.chat_template {
            Some(source) => ChatTemplate::new(source, bos, eos)?,
            None => ChatTemplate::fallback(bos, eos)?,
        };

        // The embedding must cover the vocabulary, or valid token ids would index out
        // of it during a forward pass.
        let rows = content
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().copied())
            .ok_or_else(|| ModelError::InvalidGguf {
                path: path.clone(),
                reason: "no token_embd.weight tensor".to_string(),
            })?;
        if rows < info.vocab_size || rows < tokenizer.vocab_size() {
            return Err(ModelError::InvalidGguf {
                path,
                reason: format!(
                    "token_embd.weight has {rows} rows for a vocabulary of {}",
                    info.vocab_size.max(tokenizer.vocab_size())
                ),
            });
        }

        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut reader = BufReader::new(file);
        let invalid = |e: candle_core::Error| ModelError::InvalidGguf {
            path: path.clone(),
            reason: e.to_string(),
        };
        let weights = catch_panic("loading llama weights", || {
            if options.requantize_slow_formats && quant::needs_requantize(&content) {
                let (content, mut bytes) =
                    quant::requantize_to_q8_0(&content, &mut reader).map_err(invalid)?;
                ModelWeights::from_gguf(content, &mut bytes, &Device::Cpu).map_err(invalid)
            } else {
                ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).map_err(invalid)
            }
        })?;
        let max_context = info
            .context_length
            .unwrap_or(MAX_SEQ_LEN)
            .clamp(1, MAX_SEQ_LEN);
        Ok(Self {
            weights,
            info,
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
            max_context,
            cached: 0,
            poisoned: false,
        })
    }

    fn check(&self, tokens: &[u32], pos: usize) -> Result<(), ModelError> {
        if self.poisoned {
            return Err(ModelError::InvalidInput(
                "a previous forward pass failed; reset() before the next one".to_string(),
            ));
        }
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("no tokens".to_string()));
        }
        if pos != self.cached {
            return Err(ModelError::InvalidInput(format!(
                "pos {pos} but the KV cache holds {} tokens; continue at {} or reset()",
                self.cached, self.cached
            )));
        }
        if pos + tokens.len() > self.max_context {
            return Err(ModelError::InvalidInput(format!(
                "{} + {} tokens exceed the context of {}",
                pos,
                tokens.len(),
                self.max_context
            )));
        }
        if let Some(bad) = tokens
            .iter()
            .find(|&&id| id as usize >= self.info.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.info.vocab_size
            )));
        }
        Ok(())
    }
}

impl LanguageModel for LlamaModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    fn chat_template(&self) -> &Arc<ChatTemplate> {
        &self.template
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn cached_tokens(&self) -> usize {
        self.cached
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        self.check(tokens, pos)?;
        let weights = &mut self.weights;
        let result = catch_panic("running a forward pass", || {
            let mut run = || -> candle_core::Result<Vec<f32>> {
                let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
                let logits = weights.forward(&input, pos)?;
                logits
                    .squeeze(0)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()
            };
            run().map_err(|e| ModelError::Forward(e.to_string()))
        });
        match result {
            Ok(logits) => {
                self.cached += tokens.len();
                Ok(logits)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    fn reset(&mut self) {
        self.weights.clear_kv_cache();
        self.cached = 0;
        self.poisoned = false;
    }
}
