//! Llama-family GGUF models (`general.architecture = "llama"`) on GPU devices (the
//! CPU runs [`crate::decoder`]).
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
//! - candle's pass ignores `rope_freqs.weight` (Llama 3.1's per-dimension rotary
//!   factors), which the CPU decoder applies: such files drift from llama.cpp at
//!   long positions here;
//! - loading and forward passes run under `catch_unwind`: a candle panic becomes a
//!   [`ModelError::Panicked`], never a crashed process.
//!
//! The checks and bookkeeping shared with other families live in [`crate::family`].

use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};

use crate::error::ModelError;
use crate::family::{read_weights, GgufParts, Sequence};
use crate::gguf::{GgufFile, ModelInfo};
use crate::template::{ChatTemplate, CHATML_TEMPLATE};
use crate::tokenizer::Tokenizer;
use crate::{LanguageModel, LoadOptions};

/// A loaded llama-family model: weights, tokenizer, chat template and one KV cache.
#[derive(Clone)]
pub struct LlamaModel {
    weights: ModelWeights,
    device: Device,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    sequence: Sequence,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("info", &self.info)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl LlamaModel {
    /// Builds the tokenizer and template from the header, then loads the weights.
    pub fn load(gguf: GgufFile, options: &LoadOptions) -> Result<Self, ModelError> {
        let header = GgufParts::new(gguf, CHATML_TEMPLATE)?;
        let device = options.device.candle()?;
        let weights = read_weights(
            &header.path,
            header.content,
            options,
            |content, mut reader| ModelWeights::from_gguf(content, &mut reader, &device),
        )?;
        let max_context = header
            .info
            .context_length
            .unwrap_or(MAX_SEQ_LEN)
            .clamp(1, MAX_SEQ_LEN);
        Ok(Self {
            weights,
            sequence: Sequence::new(max_context, header.info.vocab_size),
            device,
            info: header.info,
            tokenizer: header.tokenizer,
            template: header.template,
        })
    }
}

impl LanguageModel for LlamaModel {
    crate::family::model_accessors!();

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        let (weights, device) = (&mut self.weights, &self.device);
        self.sequence.forward(tokens, pos, || {
            let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
            let logits = weights.forward(&input, pos)?;
            logits
                .squeeze(0)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()
        })
    }

    fn reset(&mut self) {
        self.weights.clear_kv_cache();
        self.sequence.reset();
    }
}
