//! The crate's one error type: why a request was refused before it ran.

/// A request the engine will not take.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RuntimeError {
    /// The admission queue is full; retry later (HTTP 429/503).
    #[error("the local engine is overloaded: its queue is full")]
    Overloaded,
    /// `prompt + max_tokens` does not fit the model's context; nothing is truncated.
    #[error("prompt ({prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {context} tokens")]
    ContextOverflow {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    /// A sampling parameter is out of range.
    #[error("invalid `{param}`: {message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The engine thread is gone.
    #[error("the local engine has stopped")]
    EngineStopped,
}
