//! Anthropic adapter (placeholder until the translation lands).

use super::http::UpstreamSettings;
use super::{unsupported, Capabilities, ChunkStream, CompletionStream, ProviderApi, UpstreamError};
use crate::api::types::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    EmbeddingRequest, EmbeddingResponse,
};

#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    up: UpstreamSettings,
}

impl AnthropicProvider {
    pub fn new(up: UpstreamSettings) -> Self {
        AnthropicProvider { up }
    }
}

impl ProviderApi for AnthropicProvider {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            legacy_completions: false,
            embeddings: false,
        }
    }
    async fn chat(
        &self,
        _req: &ChatCompletionRequest,
        _model: &str,
    ) -> Result<ChatCompletionResponse, UpstreamError> {
        Err(unsupported(&self.up.name, "chat"))
    }
    async fn chat_stream(
        &self,
        _req: &ChatCompletionRequest,
        _model: &str,
    ) -> Result<ChunkStream, UpstreamError> {
        Err(unsupported(&self.up.name, "chat"))
    }
    async fn completion(
        &self,
        _req: &CompletionRequest,
        _model: &str,
    ) -> Result<CompletionResponse, UpstreamError> {
        Err(unsupported(&self.up.name, "legacy completions"))
    }
    async fn completion_stream(
        &self,
        _req: &CompletionRequest,
        _model: &str,
    ) -> Result<CompletionStream, UpstreamError> {
        Err(unsupported(&self.up.name, "legacy completions"))
    }
    async fn embeddings(
        &self,
        _req: &EmbeddingRequest,
        _model: &str,
    ) -> Result<EmbeddingResponse, UpstreamError> {
        Err(unsupported(&self.up.name, "embeddings"))
    }
}
