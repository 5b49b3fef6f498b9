//! Provider adapters: one interface, one file per provider kind.
//!
//! A provider turns the canonical OpenAI-shaped request ([`crate::api::types`]) into its
//! own wire format, sends it through the one shared HTTP client ([`http`]), and turns
//! the answer (and each streamed event) back into OpenAI shapes. Invariants:
//! - Wire types of a provider stay private to its module.
//! - Parameters a provider does not know are dropped or mapped, never forwarded blindly;
//!   only OpenAI-compatible upstreams receive a client's unmodelled fields.
//! - A stream always ends in one of two ways: the adapter saw the provider's own end
//!   marker and the stream ends cleanly, or it yields an [`UpstreamError`] of kind
//!   [`UpstreamErrorKind::StreamInterrupted`] (or the provider's error) as its last item.
//! - A stream that ends cleanly yields a final usage chunk (empty `choices`, `usage` set)
//!   whenever the provider reported usage; the API layer decides whether the client
//!   sees it.
//! - Chat answers and chunks reach the chat route either typed or, from upstreams that
//!   already speak the client's format (OpenAI-compatible), as the upstream's own bytes
//!   checked for shape with their usage read ([`raw`]); the other routes get typed values.

pub mod anthropic;
pub mod client;
pub mod gemini;
pub mod http;
pub mod local;
pub mod openai;
pub mod raw;

use std::future::Future;
use std::time::Duration;

use axum::http::StatusCode;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::api::types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, EmbeddingRequest, EmbeddingResponse,
};
use crate::config::{ProviderConfig, ProviderKind};
pub use raw::{ChatAnswer, ChatChunk};

/// A stream of OpenAI chunks translated from a provider's stream.
pub type ChunkStream = BoxStream<'static, Result<ChatCompletionChunk, UpstreamError>>;

/// A stream of chat chunks for the chat route: typed, or as the upstream sent them.
pub type ChatChunkStream = BoxStream<'static, Result<ChatChunk, UpstreamError>>;

/// A stream of legacy completion chunks (`text_completion` objects).
pub type CompletionStream = BoxStream<'static, Result<CompletionResponse, UpstreamError>>;

/// Why an upstream call failed. Decides the client status and whether another attempt
/// (same target or the next) may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Could not connect (refused, DNS, TLS).
    Connect,
    /// No first byte, or no complete answer, within the configured time.
    Timeout,
    /// 429 from the provider.
    RateLimited,
    /// 5xx from the provider, or a network error after connecting.
    Server,
    /// The provider refused our credentials (401/403): an operator problem.
    Auth,
    /// 400/404/422: the provider says the request itself is wrong.
    BadRequest,
    /// A 4xx saying the prompt and output do not fit the model's context window.
    ContextWindowExceeded,
    /// A 4xx refusing the content under the provider's usage policy.
    ContentPolicy,
    /// The provider answered with a body we cannot parse.
    InvalidResponse,
    /// A stream stopped before the provider's end marker.
    StreamInterrupted,
    /// The provider sent an error event inside a stream.
    StreamError,
    /// A local model's queue is full (429 `model_overloaded`, with `Retry-After`); the
    /// next target may take the request (spill-over).
    Overloaded,
    /// A parameter the target cannot honour (400 `invalid_value`).
    InvalidRequest,
    /// The local model named is not registered (404 `model_not_found`).
    ModelNotFound,
    /// A local model's files changed since registration (503 `model_file_changed`).
    ModelChanged,
    /// A local model could not be loaded: bad weights, over the memory budget (503
    /// `model_load_failed`).
    ModelLoadFailed,
}

/// An upstream failure, as data: kind, status, provider's message, retry hint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider}: {message}")]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub provider: String,
    pub status: Option<u16>,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl UpstreamError {
    pub fn new(kind: UpstreamErrorKind, provider: &str, message: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            provider: provider.to_string(),
            status: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Whether trying again (here or on another target) may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            UpstreamErrorKind::Connect
                | UpstreamErrorKind::Timeout
                | UpstreamErrorKind::RateLimited
                | UpstreamErrorKind::Server
                | UpstreamErrorKind::Auth
                | UpstreamErrorKind::InvalidResponse
                | UpstreamErrorKind::StreamInterrupted
                | UpstreamErrorKind::Overloaded
        )
    }

    pub fn client_status(&self) -> StatusCode {
        match self.kind {
            UpstreamErrorKind::RateLimited | UpstreamErrorKind::Overloaded => {
                StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            UpstreamErrorKind::ModelNotFound => StatusCode::NOT_FOUND,
            UpstreamErrorKind::ModelChanged | UpstreamErrorKind::ModelLoadFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamErrorKind::ContextWindowExceeded | UpstreamErrorKind::ContentPolicy => {
                StatusCode::BAD_REQUEST
            }
            UpstreamErrorKind::BadRequest => match self.status {
                Some(404) => StatusCode::NOT_FOUND,
                Some(422) => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            },
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn code(&self) -> &'static str {
        match self.kind {
            UpstreamErrorKind::Connect => "upstream_unavailable",
            UpstreamErrorKind::Timeout => "upstream_timeout",
            UpstreamErrorKind::RateLimited => "upstream_rate_limited",
            UpstreamErrorKind::Server => "upstream_error",
            UpstreamErrorKind::Auth => "upstream_auth_failed",
            UpstreamErrorKind::BadRequest => "upstream_rejected_request",
            UpstreamErrorKind::ContextWindowExceeded => "context_length_exceeded",
            UpstreamErrorKind::ContentPolicy => "content_policy_violation",
            UpstreamErrorKind::InvalidResponse => "upstream_invalid_response",
            UpstreamErrorKind::StreamInterrupted => "upstream_stream_interrupted",
            UpstreamErrorKind::StreamError => "upstream_stream_error",
            UpstreamErrorKind::Overloaded => "model_overloaded",
            UpstreamErrorKind::InvalidRequest => "invalid_value",
            UpstreamErrorKind::ModelNotFound => "model_not_found",
            UpstreamErrorKind::ModelChanged => "model_file_changed",
            UpstreamErrorKind::ModelLoadFailed => "model_load_failed",
        }
    }

    /// What the client may read: the provider's own words only when they are about the
    /// client's request; otherwise a generic line naming the provider.
    pub fn public_message(&self) -> String {
        match self.kind {
            // Our own local runtime's words: they describe the request or the model,
            // never a secret.
            UpstreamErrorKind::Overloaded
            | UpstreamErrorKind::InvalidRequest
            | UpstreamErrorKind::ModelNotFound
            | UpstreamErrorKind::ModelChanged
            | UpstreamErrorKind::ModelLoadFailed => self.message.clone(),
            UpstreamErrorKind::BadRequest
            | UpstreamErrorKind::StreamError
            | UpstreamErrorKind::ContextWindowExceeded
            | UpstreamErrorKind::ContentPolicy => {
                format!("Provider `{}` rejected the request: {}", self.provider, self.message)
            }
            UpstreamErrorKind::RateLimited => {
                format!("Provider `{}` is rate limiting requests", self.provider)
            }
            UpstreamErrorKind::Timeout => {
                format!("Provider `{}` did not answer in time", self.provider)
            }
            UpstreamErrorKind::Connect => {
                format!("Provider `{}` could not be reached", self.provider)
            }
            UpstreamErrorKind::Auth => format!(
                "Provider `{}` refused the gateway's credentials; ask the operator to check its API key",
                self.provider
            ),
            UpstreamErrorKind::StreamInterrupted => format!(
                "The stream from provider `{}` ended before it was complete",
                self.provider
            ),
            UpstreamErrorKind::Server | UpstreamErrorKind::InvalidResponse => {
                format!("Provider `{}` failed to answer", self.provider)
            }
        }
    }
}

/// What a provider can do natively.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Native `/v1/completions`; without it the API layer maps legacy completions to chat.
    pub legacy_completions: bool,
    pub embeddings: bool,
}

/// The provider interface. Methods take the upstream model name separately from the
/// request: the request's `model` is what the client sent (an alias, possibly).
pub trait ProviderApi {
    fn capabilities(&self) -> Capabilities;

    fn chat(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> impl Future<Output = Result<ChatCompletionResponse, UpstreamError>> + Send;

    /// Starts a stream. Resolves once the provider accepted the request (status 200), so
    /// a failure here happened before anything reached the client.
    fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> impl Future<Output = Result<ChunkStream, UpstreamError>> + Send;

    /// [`ProviderApi::chat`] for the chat route: adapters whose upstream answers in the
    /// client's format already may hand its bytes over instead ([`ChatAnswer::Raw`]).
    fn chat_answer(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> impl Future<Output = Result<ChatAnswer, UpstreamError>> + Send
    where
        Self: Sync,
    {
        async move { self.chat(req, model).await.map(ChatAnswer::Typed) }
    }

    /// [`ProviderApi::chat_stream`] for the chat route, with the same choice as
    /// [`ProviderApi::chat_answer`] for each chunk.
    fn chat_chunks(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> impl Future<Output = Result<ChatChunkStream, UpstreamError>> + Send
    where
        Self: Sync,
    {
        async move {
            let s = self.chat_stream(req, model).await?;
            Ok(s.map(|r| r.map(ChatChunk::Typed)).boxed())
        }
    }

    fn completion(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> impl Future<Output = Result<CompletionResponse, UpstreamError>> + Send;

    fn completion_stream(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> impl Future<Output = Result<CompletionStream, UpstreamError>> + Send;

    fn embeddings(
        &self,
        req: &EmbeddingRequest,
        model: &str,
    ) -> impl Future<Output = Result<EmbeddingResponse, UpstreamError>> + Send;
}

/// Every configured provider: an enum over the one trait, dispatched statically.
#[derive(Debug, Clone)]
pub enum Provider {
    OpenAi(openai::OpenAiProvider),
    Anthropic(anthropic::AnthropicProvider),
    Gemini(gemini::GeminiProvider),
    /// Registered models served in-process (`local/NAME`).
    Local(local::LocalProvider),
}

macro_rules! dispatch {
    ($self:ident, $p:ident => $e:expr) => {
        match $self {
            Provider::OpenAi($p) => $e,
            Provider::Anthropic($p) => $e,
            Provider::Gemini($p) => $e,
            Provider::Local($p) => $e,
        }
    };
}

impl Provider {
    /// Builds the adapter for one configured provider.
    pub fn new(cfg: &ProviderConfig, client: http::Client) -> Provider {
        let settings = http::UpstreamSettings::from_config(cfg, client);
        match cfg.kind {
            ProviderKind::OpenAi => Provider::OpenAi(openai::OpenAiProvider::new(settings)),
            ProviderKind::Anthropic => {
                Provider::Anthropic(anthropic::AnthropicProvider::new(settings))
            }
            ProviderKind::Gemini => Provider::Gemini(gemini::GeminiProvider::new(settings)),
        }
    }
}

impl ProviderApi for Provider {
    fn capabilities(&self) -> Capabilities {
        dispatch!(self, p => p.capabilities())
    }

    async fn chat(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatCompletionResponse, UpstreamError> {
        dispatch!(self, p => p.chat(req, model).await)
    }

    async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChunkStream, UpstreamError> {
        dispatch!(self, p => p.chat_stream(req, model).await)
    }

    async fn chat_answer(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatAnswer, UpstreamError> {
        dispatch!(self, p => p.chat_answer(req, model).await)
    }

    async fn chat_chunks(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatChunkStream, UpstreamError> {
        dispatch!(self, p => p.chat_chunks(req, model).await)
    }

    async fn completion(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionResponse, UpstreamError> {
        dispatch!(self, p => p.completion(req, model).await)
    }

    async fn completion_stream(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionStream, UpstreamError> {
        dispatch!(self, p => p.completion_stream(req, model).await)
    }

    async fn embeddings(
        &self,
        req: &EmbeddingRequest,
        model: &str,
    ) -> Result<EmbeddingResponse, UpstreamError> {
        dispatch!(self, p => p.embeddings(req, model).await)
    }
}

/// The error a provider returns for an operation it does not offer natively.
pub fn unsupported(provider: &str, what: &str) -> UpstreamError {
    UpstreamError::new(
        UpstreamErrorKind::BadRequest,
        provider,
        format!("{what} is not supported by this provider"),
    )
}
