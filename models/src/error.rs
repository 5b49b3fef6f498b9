//! The crate's one error type.
//!
//! Every fallible public function in `airlock-models` returns [`ModelError`]. Variants
//! say what went wrong in terms of the artifact (its path, the metadata key, the
//! architecture) so the runtime can report them without knowing candle. Candle's own
//! errors are kept as text: they carry no structure worth matching on.

use std::path::PathBuf;

/// Everything that can go wrong detecting, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The compute device cannot be used (no CUDA in this build, no such GPU).
    #[error("device {0}")]
    Device(String),
    /// Reading the artifact from disk failed.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a GGUF file nor a model folder we recognise.
    #[error("{path} is not a model: {reason}")]
    UnrecognizedFormat { path: PathBuf, reason: String },
    /// The format is recognised but not served yet (e.g. safetensors folders).
    #[error("{path}: {format} models are not supported yet")]
    UnsupportedFormat { path: PathBuf, format: &'static str },
    /// The GGUF file could not be parsed, or its tensors could not be loaded.
    #[error("invalid GGUF file {path}: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    /// A file of a model folder (config.json, a safetensors file, a
    /// sentence-transformers module config) is malformed or asks for something we
    /// cannot run.
    #[error("invalid model file {path}: {reason}")]
    InvalidFile { path: PathBuf, reason: String },
    /// A metadata key the model needs is missing or has the wrong type.
    #[error("GGUF metadata key `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    /// `general.architecture` (a folder's `model_type`) names a family this crate
    /// cannot run yet.
    #[error(
        "unsupported architecture `{0}` (supported: GGUF llama, qwen2, qwen3, gemma3 and phi3, \
         safetensors llama and mistral)"
    )]
    UnsupportedArchitecture(String),
    /// The tokenizer described by the metadata cannot be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template does not compile or fails to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A forward pass was called with arguments the model cannot accept.
    #[error("invalid forward call: {0}")]
    InvalidInput(String),
    /// Input `index` of an embedding call has more tokens than the model accepts; it is
    /// refused rather than silently truncated.
    #[error("input {index} has {tokens} tokens, more than the model's maximum of {max}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    /// Candle failed during a forward pass.
    #[error("forward pass failed: {0}")]
    Forward(String),
    /// Candle panicked; the panic was caught and turned into this error.
    #[error("candle panicked while {context}: {message}")]
    Panicked {
        context: &'static str,
        message: String,
    },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Runs `f`, turning a panic inside it into [`ModelError::Panicked`].
///
/// Candle loaders can panic on malformed shapes; a bad file must never take the
/// process down. The closure is asserted unwind-safe: callers only pass values they
/// drop (or poison) when a panic occurs.
pub(crate) fn catch_panic<T>(
    context: &'static str,
    f: impl FnOnce() -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic payload".to_string()
            };
            Err(ModelError::Panicked { context, message })
        }
    }
}
