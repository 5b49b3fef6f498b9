//! OpenAI and every OpenAI-compatible server (vLLM, Ollama, TGI, Mistral, Groq,
//! DeepSeek...), reached through `base_url`.
//!
//! The request is already in this provider's format, so the adapter forwards it,
//! including fields Airlock does not model, with the upstream model name swapped in:
//! serialized once from the typed request with the name spliced in ([`encode`]), or, for
//! the forms that need more editing, through a JSON value. Chat answers and chunks go
//! back to the chat route as the upstream's own bytes, checked for shape and with their
//! usage read ([`super::raw`]); the other routes parse them into typed values.
//! Invariants: streams always ask upstream for usage (`stream_options.include_usage`);
//! `stream_options` is never sent on a non-streaming call (OpenAI rejects it); a stream
//! ends cleanly only on `data: [DONE]`.

use ::http::header::{HeaderValue, CONTENT_TYPE};
use ::http::Uri;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::http::{RequestBuilder, Response, UpstreamSettings};
use super::raw::{ChatAnswer, ChatChunk, RawAnswer, RawChunk};
use super::{
    Capabilities, ChatChunkStream, ChunkStream, CompletionStream, ProviderApi, UpstreamError,
    UpstreamErrorKind,
};
use crate::api::types::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    EmbeddingRequest, EmbeddingResponse, StreamOptions,
};

#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    up: UpstreamSettings,
    /// `base_url` joined with each path, parsed once (`None`: not a valid URL, so each
    /// call fails in the client as it would with the string).
    urls: std::sync::Arc<[Option<Uri>; 3]>,
}

const PATHS: [&str; 3] = ["/chat/completions", "/completions", "/embeddings"];

impl OpenAiProvider {
    pub fn new(up: UpstreamSettings) -> Self {
        let urls = PATHS.map(|p| Uri::try_from(up.url(p)).ok());
        OpenAiProvider {
            up,
            urls: std::sync::Arc::new(urls),
        }
    }

    fn request(&self, path: usize, body: Bytes) -> RequestBuilder {
        let rb = match &self.urls[path] {
            Some(url) => self.up.post(url.clone()),
            None => self.up.post(self.up.url(PATHS[path])),
        };
        let rb = rb
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        match &self.up.api_key {
            Some(key) => rb.bearer_auth(key),
            None => rb,
        }
    }

    async fn stream<T>(
        &self,
        path: usize,
        body: Bytes,
    ) -> Result<BoxStream<'static, Result<T, UpstreamError>>, UpstreamError>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let resp = self.up.send(self.request(path, body)).await?;
        Ok(sse_stream(self.up.clone(), resp))
    }
}

const CHAT: usize = 0;
const COMPLETIONS: usize = 1;
const EMBEDDINGS: usize = 2;

/// What [`encode`] needs to know of a request: its fields as the client sent them.
trait Forward: Serialize {
    fn model(&self) -> &str;
    fn stream(&self) -> Option<bool> {
        None
    }
    fn stream_options(&self) -> Option<&StreamOptions> {
        None
    }
}

impl Forward for ChatCompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }
    fn stream(&self) -> Option<bool> {
        self.stream
    }
    fn stream_options(&self) -> Option<&StreamOptions> {
        self.stream_options.as_ref()
    }
}

impl Forward for CompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }
    fn stream(&self) -> Option<bool> {
        self.stream
    }
    fn stream_options(&self) -> Option<&StreamOptions> {
        self.stream_options.as_ref()
    }
}

impl Forward for EmbeddingRequest {
    fn model(&self) -> &str {
        &self.model
    }
}

/// The upstream body: the same bytes as `serde_json` of [`body_for`], made without the
/// intermediate JSON value where the request allows it.
fn encode<T: Forward>(req: &T, model: &str, stream: bool) -> Result<Bytes, UpstreamError> {
    let encode_error = |e: serde_json::Error| {
        UpstreamError::new(UpstreamErrorKind::InvalidResponse, "openai", e.to_string())
    };
    if let Some(body) = encode_direct(req, model, stream).map_err(encode_error)? {
        return Ok(Bytes::from(body));
    }
    let body = body_for(req, model, stream)?;
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(encode_error)
}

/// `{"model":` opens every request's JSON: `model` is each request type's first field.
const MODEL_KEY: &[u8] = br#"{"model":"#;

/// [`encode`] straight from the typed request: serialized once, the upstream model name
/// spliced in place of the client's, and `stream_options` appended for a stream that did
/// not send it. `None` for the forms this cannot produce (a plain call with `stream` or
/// `stream_options` set, a stream whose `stream_options` is there without
/// `include_usage: true`), which go through [`body_for`].
fn encode_direct<T: Forward>(
    req: &T,
    model: &str,
    stream: bool,
) -> Result<Option<Vec<u8>>, serde_json::Error> {
    let add_usage = match (stream, req.stream(), req.stream_options()) {
        (false, None, None) => false,
        (true, Some(true), None) => true,
        (true, Some(true), Some(o)) if o.include_usage == Some(true) => false,
        _ => return Ok(None),
    };
    let json = serde_json::to_vec(req)?;
    if !add_usage && model == req.model() {
        return Ok(Some(json));
    }
    let old = serde_json::to_vec(req.model())?;
    let head = MODEL_KEY.len() + old.len();
    if !json.starts_with(MODEL_KEY)
        || json.get(MODEL_KEY.len()..head) != Some(old.as_slice())
        || json.last() != Some(&b'}')
    {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(json.len() + model.len() + 48);
    out.extend_from_slice(MODEL_KEY);
    serde_json::to_writer(&mut out, model)?;
    let rest = &json[head..];
    if add_usage {
        out.extend_from_slice(&rest[..rest.len() - 1]);
        out.extend_from_slice(br#","stream_options":{"include_usage":true}}"#);
    } else {
        out.extend_from_slice(rest);
    }
    Ok(Some(out))
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

/// The upstream's SSE events in order, each a non-empty `data` payload, ending on
/// `data: [DONE]`: a transport error, or an end without `[DONE]` (`StreamInterrupted`),
/// is yielded last. `data` that is an error object, or that `decode` refuses, ends the
/// stream with an error (see [`super::http::event_error`]).
fn decode_events<T, F>(
    up: UpstreamSettings,
    resp: Response,
    decode: F,
) -> BoxStream<'static, Result<T, UpstreamError>>
where
    T: Send + 'static,
    F: Fn(String) -> Result<T, (String, serde_json::Error)> + Send + 'static,
{
    let mut events = up.events(resp);
    async_stream::stream! {
        let mut done = false;
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => { yield Err(e); return; }
            };
            let mut data = ev.data;
            let trimmed = data.trim();
            if trimmed.is_empty() {
                continue;
            }
            if trimmed == "[DONE]" {
                done = true;
                break;
            }
            if trimmed.len() != data.len() {
                data = trimmed.to_string();
            }
            // One parse on the hot path. Only an event that is not a chunk is looked at
            // again, to tell an error event apart.
            match decode(data) {
                Ok(item) => yield Ok(item),
                Err((data, err)) => {
                    yield Err(super::http::event_error(&up.name, &data, &err));
                    return;
                }
            }
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

/// Decodes an OpenAI-style SSE stream of `T` objects ending in `data: [DONE]`.
pub(crate) fn sse_stream<T>(
    up: UpstreamSettings,
    resp: Response,
) -> BoxStream<'static, Result<T, UpstreamError>>
where
    T: DeserializeOwned + Send + 'static,
{
    decode_events(up, resp, |data| {
        serde_json::from_str::<T>(&data).map_err(|e| (data, e))
    })
}

/// An OpenAI chat stream as the upstream's own chunks, each checked ([`RawChunk`]).
fn raw_chunk_stream(up: UpstreamSettings, resp: Response) -> ChatChunkStream {
    decode_events(up, resp, |data| {
        let json = Bytes::from(data);
        match RawChunk::parse(json.clone()) {
            Ok(c) => Ok(ChatChunk::Raw(c)),
            Err(e) => Err((String::from_utf8_lossy(&json).into_owned(), e)),
        }
    })
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
        let body = encode(req, model, false)?;
        self.up.call_json(self.request(CHAT, body)).await
    }

    async fn chat_answer(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatAnswer, UpstreamError> {
        let body = encode(req, model, false)?;
        let bytes = self.up.call_bytes(self.request(CHAT, body)).await?;
        match RawAnswer::parse(bytes.clone()) {
            Ok(a) => Ok(ChatAnswer::Raw(a)),
            // The typed parse says which field is wrong.
            Err(e) => Err(match self.up.parse::<ChatCompletionResponse>(&bytes) {
                Err(typed) => typed,
                Ok(_) => UpstreamError::new(
                    UpstreamErrorKind::InvalidResponse,
                    &self.up.name,
                    format!("unparseable response: {e}"),
                ),
            }),
        }
    }

    async fn chat_chunks(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatChunkStream, UpstreamError> {
        let resp = self
            .up
            .send(self.request(CHAT, encode(req, model, true)?))
            .await?;
        Ok(raw_chunk_stream(self.up.clone(), resp))
    }

    async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChunkStream, UpstreamError> {
        self.stream(CHAT, encode(req, model, true)?).await
    }

    async fn completion(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionResponse, UpstreamError> {
        let body = encode(req, model, false)?;
        self.up.call_json(self.request(COMPLETIONS, body)).await
    }

    async fn completion_stream(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionStream, UpstreamError> {
        self.stream(COMPLETIONS, encode(req, model, true)?).await
    }

    async fn embeddings(
        &self,
        req: &EmbeddingRequest,
        model: &str,
    ) -> Result<EmbeddingResponse, UpstreamError> {
        let body = encode(req, model, false)?;
        self.up.call_json(self.request(EMBEDDINGS, body)).await
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

    #[test]
    fn direct_encoding_gives_the_bytes_of_the_json_value_route() {
        let chat = |extra: Value| -> ChatCompletionRequest {
            let mut v = json!({
                "model": "alias \"quoted\" é", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.2, "reasoning_effort": "low"
            });
            if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
                o.extend(e);
            }
            serde_json::from_value(v).unwrap()
        };
        let cases = [
            json!({}),
            json!({"stream": true}),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
            json!({"stream": true, "stream_options": {"include_usage": false}}),
            json!({"stream": false}),
            json!({"stream_options": {"include_usage": true}}),
        ];
        for extra in cases {
            let req = chat(extra.clone());
            for (model, stream) in [
                ("gpt-4o-mini", false),
                ("gpt-4o-mini", true),
                ("alias \"quoted\" é", false),
            ] {
                let want = serde_json::to_vec(&body_for(&req, model, stream).unwrap()).unwrap();
                let got = encode(&req, model, stream).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                    "{extra} {model} {stream}"
                );
            }
        }
        // The common forms take the direct route.
        let plain = chat(json!({}));
        assert!(encode_direct(&plain, "gpt-4o-mini", false)
            .unwrap()
            .is_some());
        let stream = chat(json!({"stream": true}));
        assert!(encode_direct(&stream, "gpt-4o-mini", true)
            .unwrap()
            .is_some());
        let embed: EmbeddingRequest =
            serde_json::from_value(json!({"model": "e", "input": "x"})).unwrap();
        assert_eq!(
            encode(&embed, "text-embedding-3-small", false).unwrap(),
            serde_json::to_vec(&body_for(&embed, "text-embedding-3-small", false).unwrap())
                .unwrap()
        );
    }
}
