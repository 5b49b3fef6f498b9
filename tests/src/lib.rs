//! Black-box test harness for Airlock: the real `airlock` binary against mock upstreams.
//!
//! This crate is test-only: nothing in it ships, so failing loudly (unwrap, expect, panic)
//! is the right way to report a broken precondition, and the workspace lints that forbid
//! them are lifted here.
//!
//! - [`gateway`]: start the binary on port 0 with a temp data dir, talk to it, stop it
//!   with SIGTERM; run its other subcommands.
//! - [`config`]: a builder for the TOML config the binary reads.
//! - [`mock`]: in-process upstreams speaking the OpenAI, Anthropic and Gemini wire
//!   formats, recording every request and obeying injected faults.
//! - [`sse`]: reading `text/event-stream` responses event by event.
//! - [`stack`]: the usual setup (one mock per provider kind behind one gateway) and the
//!   request bodies tests share.
//!
//! Invariants: every helper binds 127.0.0.1 port 0, so tests run in parallel; nothing
//! here reaches into the gateway's internals, only its CLI and HTTP surface.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod config;
pub mod gateway;
pub mod mock;
pub mod sse;
pub mod stack;

pub use config::ConfigBuilder;
pub use gateway::{Gateway, HttpReply};
pub use mock::{Fault, MockUpstream, ProviderKind, RecordedRequest};
pub use sse::{SseEvent, SseReader, SseTranscript};
pub use stack::{Stack, Wiring};

/// Generates `mod scenario { openai, anthropic, gemini }` tests calling `scenario(kind)`.
#[macro_export]
macro_rules! per_provider {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use $crate::mock::ProviderKind;
            #[tokio::test]
            async fn openai() {
                super::$scenario(ProviderKind::OpenAi).await
            }
            #[tokio::test]
            async fn anthropic() {
                super::$scenario(ProviderKind::Anthropic).await
            }
            #[tokio::test]
            async fn gemini() {
                super::$scenario(ProviderKind::Gemini).await
            }
        }
    )*};
}
