//! What every model family shares, whatever its forward pass.
//!
//! Owns three things the families would otherwise each copy: taking a GGUF file
//! apart into its header, tokenizer and chat template, with the embedding checked
//! against the vocabulary ([`GgufParts`]); reading candle weights from the file or
//! from a copy with slow formats requantized ([`read_weights`]); and the
//! bookkeeping of one sequence in a KV cache ([`Sequence`]). Invariants of
//! [`Sequence`]: it counts exactly the positions the cache holds; a pass must start
//! at that count and stay within the context and the vocabulary; a failed or
//! panicking pass poisons it until [`Sequence::reset`], since the cache is then in an
//! unknown state.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;

use crate::error::{catch_panic, ModelError};
use crate::gguf::{GgufFile, ModelInfo};
use crate::quant;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::LoadOptions;

/// A GGUF file taken apart for a family's `load`: the header as read, and the
/// tokenizer and chat template built from it.
pub(crate) struct GgufParts {
    pub(crate) path: PathBuf,
    pub(crate) content: Content,
    pub(crate) info: ModelInfo,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) template: Arc<ChatTemplate>,
}

/// `Read + Seek` as one object-safe trait, so a weight loader takes the file and its
/// requantized copy alike.
pub(crate) trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

impl GgufParts {
    /// Builds the tokenizer and template (`fallback` when the file has none) and
    /// checks the embedding ([`header_parts`]).
    pub(crate) fn new(gguf: GgufFile, fallback: &str) -> Result<Self, ModelError> {
        let GgufFile {
            path,
            content,
            info,
        } = gguf;
        let (tokenizer, template) = header_parts(&path, &content, &info, fallback)?;
        Ok(Self {
            path,
            content,
            info,
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
        })
    }
}

/// Reads candle weights with `load`, under `catch_unwind`: from the file, or, when
/// `options` ask and the file has slow formats, from an in-memory copy with those
/// requantized to Q8_0 ([`crate::quant`]). A candle error is the file's fault
/// ([`ModelError::InvalidGguf`]).
pub(crate) fn read_weights<T>(
    path: &Path,
    content: Content,
    options: &LoadOptions,
    load: impl FnOnce(Content, &mut dyn ReadSeek) -> candle_core::Result<T>,
) -> Result<T, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let invalid = |e: candle_core::Error| ModelError::InvalidGguf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    catch_panic("loading weights", || {
        let weights = if options.requantize_slow_formats && quant::needs_requantize(&content) {
            let (content, mut bytes) =
                quant::requantize_to_q8_0(&content, &mut reader).map_err(invalid)?;
            load(content, &mut bytes)
        } else {
            load(content, &mut reader)
        };
        weights.map_err(invalid)
    })
}

/// Builds the tokenizer and chat template from a GGUF header, and checks that the
/// embedding covers the vocabulary (or valid token ids would index out of it during
/// a forward pass). `fallback` is the template used when the file carries none.
fn header_parts(
    path: &Path,
    content: &Content,
    info: &ModelInfo,
    fallback: &str,
) -> Result<(Tokenizer, ChatTemplate), ModelError> {
    let tokenizer = Tokenizer::from_gguf(content, info)?;
    let token_str = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_text(id))
            .unwrap_or_default()
            .to_string()
    };
    let (bos, eos) = (token_str(info.bos_token_id), token_str(info.eos_token_id));
    let template = ChatTemplate::new(info.chat_template.as_deref().unwrap_or(fallback), bos, eos)?
        // The tokenizer adds BOS itself: a template that writes it would double it.
        .strip_leading_bos(tokenizer.add_bos_token());

    let rows = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .ok_or_else(|| ModelError::InvalidGguf {
            path: path.to_path_buf(),
            reason: "no token_embd.weight tensor".to_string(),
        })?;
    if rows < info.vocab_size || rows < tokenizer.vocab_size() {
        return Err(ModelError::InvalidGguf {
            path: path.to_path_buf(),
            reason: format!(
                "token_embd.weight has {rows} rows for a vocabulary of {}",
                info.vocab_size.max(tokenizer.vocab_size())
            ),
        });
    }
    Ok((tokenizer, template))
}

/// Position bookkeeping for one sequence in a KV cache.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    max_context: usize,
    vocab_size: usize,
    cached: usize,
    poisoned: bool,
}

impl Sequence {
    pub(crate) fn new(max_context: usize, vocab_size: usize) -> Self {
        Self {
            max_context,
            vocab_size,
            cached: 0,
            poisoned: false,
        }
    }

    pub(crate) fn max_context(&self) -> usize {
        self.max_context
    }

    pub(crate) fn cached(&self) -> usize {
        self.cached
    }

    /// Runs `pass` (a forward pass over `tokens` at `pos`) if the call is valid,
    /// under `catch_unwind`; counts the tokens on success, poisons on failure.
    pub(crate) fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        pass: impl FnOnce() -> candle_core::Result<Vec<f32>>,
    ) -> Result<Vec<f32>, ModelError> {
        self.check(tokens, pos)?;
        let result = catch_panic("running a forward pass", || {
            pass().map_err(|e| ModelError::Forward(e.to_string()))
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

    /// Counts `n` more positions after a pass run outside [`Sequence::forward`].
    pub(crate) fn advance(&mut self, n: usize) {
        self.cached += n;
    }

    /// Marks the cache unknown after a failed pass run outside [`Sequence::forward`].
    pub(crate) fn poison(&mut self) {
        self.poisoned = true;
    }

    /// Forgets the sequence (the caller empties its cache).
    pub(crate) fn reset(&mut self) {
        self.cached = 0;
        self.poisoned = false;
    }

    pub(crate) fn check(&self, tokens: &[u32], pos: usize) -> Result<(), ModelError> {
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
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(())
    }
}

/// The `LanguageModel` methods every family implements the same way, for a struct
/// with `info`, `tokenizer`, `template` and `sequence` fields that is `Clone` (its
/// weights reference-counted, so a clone shares them): the accessors, and `fork` as a
/// clone with an empty cache.
macro_rules! model_accessors {
    () => {
        fn info(&self) -> &crate::gguf::ModelInfo {
            &self.info
        }

        fn tokenizer(&self) -> &std::sync::Arc<crate::tokenizer::Tokenizer> {
            &self.tokenizer
        }

        fn chat_template(&self) -> &std::sync::Arc<crate::template::ChatTemplate> {
            &self.template
        }

        fn max_context(&self) -> usize {
            self.sequence.max_context()
        }

        fn cached_tokens(&self) -> usize {
            self.sequence.cached()
        }

        fn fork(&self) -> Option<Box<dyn crate::LanguageModel>> {
            let mut twin = self.clone();
            crate::LanguageModel::reset(&mut twin);
            Some(Box::new(twin))
        }
    };
}
pub(crate) use model_accessors;
