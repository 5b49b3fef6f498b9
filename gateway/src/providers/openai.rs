//! OpenAI and every OpenAI-compatible server (vLLM, Ollama, TGI, Mistral, Groq,
//! DeepSeek...), reached through `base_url`.
//!
//! The request is already in this provider's format, so the adapter forwards it,
//! including fields Airlock does not model, with the upstream model name swapped in.
//! Invariants: streams always ask upstream for usage (`stream_options.include_usage`);
//! `stream_options` is never sent on a non-streaming call (OpenAI rejects it); a stream
//! ends cleanly only on `data: [DONE]`.

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::http::UpstreamSettings;
use super::{
    Capabilities, ChunkStream, CompletionStream, ProviderApi, UpstreamError, UpstreamErrorKind,
};
use crate::api::types::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    EmbeddingRequest, EmbeddingResponse,
};

#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    up: UpstreamSettings,
}

impl OpenAiProvider {
    pub fn new(up: UpstreamSettings) -> Self {
        OpenAiProvider { up }
    }

    fn request(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        let rb = self.up.post(&self.up.url(path)).json(body);
        match &self.up.api_key {
            Some(key) => rb.bearer_auth(key),
            None => rb,
        }
    }

    async fn stream<T>(
        &self,
        path: &str,
        body: Value,
    ) -> Result<BoxStream<'static, Result<T, UpstreamError>>, UpstreamError>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let resp = self.up.send(self.request(path, &body)).await?;
        Ok(sse_stream(self.up.clone(), resp))
    }
}

/// Sets `model`, and `stream` with its options, on a serialized request body.
fn body_for<T: serde::Serialize>(
    req: &T,
    model: &str,
    stream: bool,
) -> Result<Value, UpstreamError> {
    let mut body = serde_json::to_value(req).map_err(|e| {
        UpstreamError::new(UpstreamErrorKind::InvalidResponse, "openai", e.to_string())
    })?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("model".into(), Value::String(model.to_string()));
        if stream {
            obj.insert("stream".into(), Value::Bool(true));
            let opts = obj.entry("stream_options").or_insert_with(|| json!({}));
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        } else {
            obj.remove("stream");
            obj.remove("stream_options");
        }
    }
    Ok(body)
}

/// Decodes an OpenAI-style SSE stream of `T` objects ending in `data: [DONE]`.
pub(crate) fn sse_stream<T>(
    up: UpstreamSettings,
    resp: reqwest::Response,
) -> BoxStream<'static, Result<T, UpstreamError>>
where
    T: DeserializeOwned + Send + 'static,
{
    let mut events = up.events(resp);
    async_stream::stream! {
        let mut done = false;
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => { yield Err(e); return; }
            };
            let data = ev.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                done = true;
                break;
            }
            // One parse on the hot path: straight into the chunk type. Only an event
            // that is not a chunk is looked at again, to tell an error event apart.
            let err = match serde_json::from_str::<T>(data) {
                Ok(item) => {
                    yield Ok(item);
                    continue;
                }
                Err(e) => e,
            };
            let error = match serde_json::from_str::<Value>(data) {
                Err(e) => UpstreamError::new(
                    UpstreamErrorKind::InvalidResponse,
                    &up.name,
                    format!("stream event is not JSON: {e}"),
                ),
                Ok(v) if v.get("error").is_some_and(|e| !e.is_null()) => UpstreamError::new(
                    UpstreamErrorKind::StreamError,
                    &up.name,
                    super::http::error_message(data.as_bytes(), 200),
                ),
                Ok(_) => UpstreamError::new(
                    UpstreamErrorKind::InvalidResponse,
                    &up.name,
                    format!("unparseable stream event: {err}"),
                ),
            };
            yield Err(error);
            return;
        }
        if !done {
            yield Err(UpstreamError::new(
                UpstreamErrorKind::StreamInterrupted,
                &up.name,
                "stream ended without [DONE]",
            ));
        }
    }
    .boxed()
}

impl ProviderApi for OpenAiProvider {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            legacy_completions: true,
            embeddings: true,
        }
    }

    async fn chat(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatCompletionResponse, UpstreamError> {
        let body = body_for(req, model, false)?;
        self.up
            .call_json(self.request("/chat/completions", &body))
            .await
    }

    async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChunkStream, UpstreamError> {
        self.stream("/chat/completions", body_for(req, model, true)?)
            .await
    }

    async fn completion(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionResponse, UpstreamError> {
        let body = body_for(req, model, false)?;
        self.up.call_json(self.request("/completions", &body)).await
    }

    async fn completion_stream(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionStream, UpstreamError> {
        self.stream("/completions", body_for(req, model, true)?)
            .await
    }

    async fn embeddings(
        &self,
        req: &EmbeddingRequest,
        model: &str,
    ) -> Result<EmbeddingResponse, UpstreamError> {
        let body = body_for(req, model, false)?;
        self.up.call_json(self.request("/embeddings", &body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_bodies_ask_for_usage_and_plain_bodies_drop_stream_options() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "alias", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "stream_options": {"include_usage": false},
            "reasoning_effort": "low"
        }))
        .unwrap();
        let b = body_for(&req, "gpt-4o-mini", true).unwrap();
        assert_eq!(b["model"], "gpt-4o-mini");
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(
            b["reasoning_effort"], "low",
            "unmodelled fields pass through"
        );
        let b = body_for(&req, "gpt-4o-mini", false).unwrap();
        assert!(b.get("stream").is_none());
        assert!(b.get("stream_options").is_none());
    }
}
