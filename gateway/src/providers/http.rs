//! The one shared upstream HTTP client and the helpers every adapter sends through.
//!
//! Invariants:
//! - [`build_client`] is the only place the upstream [`Client`] is built, so connection
//!   pooling and the connect timeout hold for every provider.
//! - Each call has a first-byte deadline (until response headers arrive) and a total
//!   deadline (until the body, or the whole stream, is read).
//! - A non-2xx answer becomes an [`UpstreamError`] classified by status, carrying the
//!   provider's own message and any `Retry-After` hint; the body read is bounded.

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures::stream::BoxStream;
use futures::StreamExt;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Uri;
use serde::de::DeserializeOwned;

pub use super::client::{Client, Error, RequestBuilder, Response};
use super::{UpstreamError, UpstreamErrorKind};
use crate::config::{ProviderConfig, ProviderKind, UpstreamDefaults};

/// The Anthropic API version sent when config names none.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Largest error body read from an upstream, to keep a hostile upstream from costing memory.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Builds the process-wide upstream client. Clone it: clones share the pool.
pub fn build_client(defaults: &UpstreamDefaults) -> Client {
    Client::new(
        defaults.connect_timeout,
        defaults.pool_max_idle_per_host,
        Duration::from_secs(90),
    )
}

/// Everything an adapter needs to call its provider.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub name: String,
    /// Base URL without a trailing slash.
    pub base_url: String,
    pub api_key: Option<String>,
    pub headers: HeaderMap,
    pub client: Client,
    pub first_byte_timeout: Duration,
    pub timeout: Duration,
}

impl UpstreamSettings {
    pub fn from_config(cfg: &ProviderConfig, client: Client) -> Self {
        let mut headers = HeaderMap::new();
        if cfg.kind == ProviderKind::Anthropic {
            let version = cfg.api_version.as_deref().unwrap_or(ANTHROPIC_VERSION);
            if let Ok(v) = HeaderValue::from_str(version) {
                headers.insert("anthropic-version", v);
            }
        }
        for (k, v) in &cfg.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
        UpstreamSettings {
            name: cfg.name.clone(),
            base_url: cfg.base_url.trim_end_matches('/').to_string(),
            api_key: cfg.api_key.clone(),
            headers,
            client,
            first_byte_timeout: cfg.first_byte_timeout,
            timeout: cfg.timeout,
        }
    }

    /// `base_url` joined with `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// A POST with the configured extra headers and both deadlines applied.
    pub fn post<U>(&self, url: U) -> RequestBuilder
    where
        Uri: TryFrom<U>,
        <Uri as TryFrom<U>>::Error: Into<http::Error>,
    {
        self.client
            .post(url)
            .headers(self.headers.clone())
            .timeout(self.timeout)
            .first_byte_timeout(self.first_byte_timeout)
    }

    /// Sends and waits for the response head within the first-byte deadline. A non-2xx
    /// status becomes an error built from the body.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response, UpstreamError> {
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.status_error(resp).await)
    }

    /// Sends a JSON body and parses a JSON answer.
    pub async fn call_json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
    ) -> Result<T, UpstreamError> {
        let bytes = self.call_bytes(req).await?;
        self.parse(&bytes)
    }

    /// Sends and reads the whole body of a successful answer.
    pub async fn call_bytes(&self, req: RequestBuilder) -> Result<Bytes, UpstreamError> {
        let resp = self.send(req).await?;
        resp.bytes().await.map_err(|e| self.transport_error(&e))
    }

    /// Parses a provider's JSON body, naming the path of the first bad field.
    pub fn parse<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, UpstreamError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| {
            UpstreamError::new(
                UpstreamErrorKind::InvalidResponse,
                &self.name,
                format!("unparseable response at `{}`: {}", e.path(), e.inner()),
            )
        })
    }

    /// Decodes an SSE response into events; transport errors become stream errors.
    pub fn events(&self, resp: Response) -> BoxStream<'static, Result<Event, UpstreamError>> {
        let name = self.name.clone();
        resp.bytes_stream()
            .eventsource()
            .map(move |r| {
                r.map_err(|e| {
                    UpstreamError::new(
                        UpstreamErrorKind::StreamInterrupted,
                        &name,
                        format!("stream broke off: {e}"),
                    )
                })
            })
            .boxed()
    }

    pub fn transport_error(&self, e: &Error) -> UpstreamError {
        let kind = if e.is_timeout() {
            UpstreamErrorKind::Timeout
        } else if e.is_connect() {
            UpstreamErrorKind::Connect
        } else {
            UpstreamErrorKind::Server
        };
        // The chain can include the URL; our URLs carry no secrets (keys go in headers,
        // Gemini's in `x-goog-api-key`), so it is safe to log.
        UpstreamError::new(kind, &self.name, error_chain(e))
    }

    async fn status_error(&self, resp: Response) -> UpstreamError {
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let body = read_bounded(resp).await;
        let kind = match status {
            429 => UpstreamErrorKind::RateLimited,
            401 | 403 if !is_content_policy(&body) => UpstreamErrorKind::Auth,
            400..=499 => classify_client_error(&body),
            _ => UpstreamErrorKind::Server,
        };
        let mut err = UpstreamError::new(kind, &self.name, error_message(&body, status));
        err.status = Some(status);
        err.retry_after = retry_after;
        err
    }
}

async fn read_bounded(mut resp: Response) -> Bytes {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    Bytes::from(buf)
}

/// Why a stream event could not be used: the provider's error event, not JSON, or not
/// the expected object (`err`).
pub fn event_error(provider: &str, data: &str, err: &serde_json::Error) -> UpstreamError {
    match serde_json::from_str::<serde_json::Value>(data) {
        Err(e) => UpstreamError::new(
            UpstreamErrorKind::InvalidResponse,
            provider,
            format!("stream event is not JSON: {e}"),
        ),
        Ok(v) if v.get("error").is_some_and(|e| !e.is_null()) => UpstreamError::new(
            UpstreamErrorKind::StreamError,
            provider,
            error_message(data.as_bytes(), 200),
        ),
        Ok(_) => UpstreamError::new(
            UpstreamErrorKind::InvalidResponse,
            provider,
            format!("unparseable stream event: {err}"),
        ),
    }
}

/// The provider's own error message: `error.message` in OpenAI, Anthropic and Gemini
/// bodies (Gemini sometimes wraps it in an array), else the start of the body.
pub fn error_message(body: &[u8], status: u16) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let obj = if v.is_array() { &v[0] } else { &v };
        if let Some(m) = obj["error"]["message"].as_str() {
            return m.to_string();
        }
        if let Some(m) = obj["error"].as_str() {
            return m.to_string();
        }
        if let Some(m) = obj["message"].as_str() {
            return m.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        let cut: String = text.chars().take(300).collect();
        format!("HTTP {status}: {cut}")
    }
}

/// Context overflow and content-policy refusals are 4xx like any client error, but
/// routing treats them differently (fallbacks), so they are told apart here by the
/// codes and phrases OpenAI, Anthropic, Gemini, Mistral and vLLM use.
fn classify_client_error(body: &[u8]) -> UpstreamErrorKind {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    const CONTEXT: &[&str] = &[
        "context_length_exceeded",
        "maximum context length",
        "context window",
        "prompt is too long",
        "input is too long",
        "exceeds the maximum number of tokens",
        "too many tokens",
        "reduce the length of the messages",
    ];
    if CONTEXT.iter().any(|m| text.contains(m)) {
        UpstreamErrorKind::ContextWindowExceeded
    } else if is_content_policy(body) {
        UpstreamErrorKind::ContentPolicy
    } else {
        UpstreamErrorKind::BadRequest
    }
}

fn is_content_policy(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    [
        "content_policy_violation",
        "content_filter",
        "content policy",
        "safety system",
        "responsibleaipolicyviolation",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// `retry-after-ms` (OpenAI) or `retry-after` in seconds.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        if let Ok(d) = Duration::try_from_secs_f64(ms / 1000.0) {
            return Some(d);
        }
    }
    get("retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_from_each_provider_shape() {
        let openai =
            br#"{"error":{"message":"Invalid 'temperature'","type":"invalid_request_error"}}"#;
        assert_eq!(error_message(openai, 400), "Invalid 'temperature'");
        let anthropic =
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: required"}}"#;
        assert_eq!(error_message(anthropic, 400), "max_tokens: required");
        let gemini = br#"[{"error":{"code":400,"message":"API key not valid","status":"INVALID_ARGUMENT"}}]"#;
        assert_eq!(error_message(gemini, 400), "API key not valid");
        assert_eq!(error_message(b"", 502), "HTTP 502");
        assert_eq!(error_message(b"Bad Gateway", 502), "HTTP 502: Bad Gateway");
    }

    #[test]
    fn context_overflow_and_content_policy_are_told_apart() {
        let openai = br#"{"error":{"message":"This model's maximum context length is 128000 tokens.","code":"context_length_exceeded"}}"#;
        assert_eq!(
            classify_client_error(openai),
            UpstreamErrorKind::ContextWindowExceeded
        );
        let anthropic = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;
        assert_eq!(
            classify_client_error(anthropic),
            UpstreamErrorKind::ContextWindowExceeded
        );
        let policy = br#"{"error":{"message":"Your request was rejected as a result of our safety system.","code":"content_policy_violation"}}"#;
        assert_eq!(
            classify_client_error(policy),
            UpstreamErrorKind::ContentPolicy
        );
        let plain = br#"{"error":{"message":"Invalid value for 'temperature'"}}"#;
        assert_eq!(classify_client_error(plain), UpstreamErrorKind::BadRequest);
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        for hostile in ["1e20", "-5", "NaN", "inf"] {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from_static(hostile));
            assert_eq!(retry_after(&h), None, "{hostile}");
        }
    }
}
