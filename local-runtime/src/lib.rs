//! `airlock-runtime`: serving local models in-process.
//!
//! Owns the engine ([`Engine`]): one dedicated thread per loaded model that owns the
//! model, fed by a bounded queue (full -> [`RuntimeError::Overloaded`] at once);
//! sampling ([`SamplingParams`], [`Sampler`]) with OpenAI semantics and a seeded RNG
//! per request; stop strings ([`StopMatcher`]) matched across token boundaries with
//! hold-back; streaming [`Event`]s over a tokio channel.
//!
//! Invariants: requests run one at a time (continuous batching comes later); a prompt
//! plus `max_tokens` that exceeds the context is refused at submit, never truncated;
//! the KV cache is reset between requests; a dropped receiver cancels its request at
//! the next step; a panicking model yields [`Event::Error`] and the engine lives on.
//! It never does HTTP, keys, budgets or provider logic.

mod engine;
mod error;
pub mod manifest;
pub mod pool;
pub mod sampling;
pub mod stop;

/// The model crate, for callers that need its types (messages, options, errors).
pub use airlock_models as models;
pub use engine::{Engine, Event, FinishReason, GenerateRequest};
pub use error::RuntimeError;
pub use manifest::{FileDigest, Manifest, ManifestError, ModelKind, WeightFormat};
pub use pool::{Loaded, ModelPool, ModelStatus, PoolConfig, PoolError};
pub use sampling::{Logprobs, Sampler, SamplingParams, TokenLogprob, MAX_TOP_LOGPROBS};
pub use stop::{StopMatcher, StopOutcome};
