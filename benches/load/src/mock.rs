//! A fast mock OpenAI upstream: `POST .../chat/completions` answers a canned, realistic
//! `chat.completion` (or, when the body asks for `"stream":true`, an SSE stream of
//! `chat.completion.chunk` events ending in `data: [DONE]`), `GET .../models` a model
//! list, anything else 404. Every answer is precomputed; the per-request work is reading
//! the body and one byte search, so the mock is never the bottleneck.
//!
//! Delay: a path that starts with `/d<ms>/` (e.g. `/d50/v1/chat/completions`) waits that
//! many milliseconds before the response head; `--delay-ms` sets a default for every
//! other path. Pointing a gateway provider's `base_url` at `http://HOST/d50/v1` makes
//! that provider slow without any header or body support from the gateway.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Options of `airlock-load mock`.
#[derive(Debug, Clone)]
pub struct MockOptions {
    pub listen: String,
    /// Content chunks per SSE answer (plus a role chunk, a finish chunk and, when asked,
    /// a usage chunk; then, as OpenAI does, every other chunk ends with `"usage":null`).
    pub chunks: usize,
    /// Default delay before the response head, for paths without a `/d<ms>/` prefix.
    pub delay_ms: u64,
}

struct Canned {
    json: Bytes,
    sse: Vec<Bytes>,
    /// `sse` as OpenAI sends it when usage is asked for: `"usage":null` in every chunk.
    sse_null_usage: Vec<Bytes>,
    sse_usage: Bytes,
    models: Bytes,
    not_found: Bytes,
}

const MODEL: &str = "gpt-4o-mini-2024-07-18";
const CREATED: u64 = 1_732_500_000;
const ANSWER: &str = "Prince Hamlet of Denmark learns from his father's ghost that his uncle \
Claudius murdered the king to seize the throne and marry Queen Gertrude. Feigning madness \
while he tests the truth of the ghost's story, Hamlet hesitates, stages a play to catch the \
king's conscience, and kills Polonius by mistake, setting off a chain of revenge that ends \
with nearly every principal character dead.";

fn canned(chunks: usize) -> anyhow::Result<Canned> {
    let json_body = json!({
        "id": "chatcmpl-AbCdEf0123456789bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": ANSWER, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": 31,
            "completion_tokens": 74,
            "total_tokens": 105,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        },
        "service_tier": "default",
        "system_fingerprint": "fp_0123456789"
    });
    let chunk = |delta: serde_json::Value, finish: Option<&str>| -> anyhow::Result<Bytes> {
        let v = json!({
            "id": "chatcmpl-AbCdEf0123456789bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": "fp_0123456789",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        Ok(Bytes::from(format!(
            "data: {}\n\n",
            serde_json::to_string(&v)?
        )))
    };
    // OpenAI's order puts `usage` last (json! sorts keys, so it lands last here too).
    let null_usage = |frame: &Bytes| -> Bytes {
        let text = String::from_utf8_lossy(frame);
        let json = text.trim_start_matches("data: ").trim_end();
        let cut = json.strip_suffix('}').unwrap_or(json);
        Bytes::from(format!("data: {cut},\"usage\":null}}\n\n"))
    };
    let words: Vec<&str> = ANSWER.split(' ').collect();
    let mut sse = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    )?];
    for i in 0..chunks {
        let word = words.get(i % words.len()).copied().unwrap_or("word");
        let text = if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        };
        sse.push(chunk(json!({"content": text}), None)?);
    }
    sse.push(chunk(json!({}), Some("stop"))?);
    let usage = json!({
        "id": "chatcmpl-AbCdEf0123456789bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_0123456789",
        "choices": [],
        "usage": {"prompt_tokens": 31, "completion_tokens": chunks, "total_tokens": 31 + chunks}
    });
    let models = json!({
        "object": "list",
        "data": [{"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "mock"}]
    });
    let not_found = json!({"error": {"message": "no such route on the mock", "type": "invalid_request_error",
        "code": "unknown_url", "param": null}});
    Ok(Canned {
        json: Bytes::from(serde_json::to_vec(&json_body)?),
        sse_null_usage: sse.iter().map(null_usage).collect(),
        sse,
        sse_usage: Bytes::from(format!("data: {}\n\n", serde_json::to_string(&usage)?)),
        models: Bytes::from(serde_json::to_vec(&models)?),
        not_found: Bytes::from(serde_json::to_vec(&not_found)?),
    })
}

/// A body that hands out precomputed frames one by one, so each SSE event goes out as its
/// own chunk of the chunked encoding, as a real upstream's would.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

type MockBody = Either<Full<Bytes>, Chunks>;

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// `/d50/v1/...` -> (Some(50), "/v1/...").
fn split_delay(path: &str) -> (Option<u64>, &str) {
    if let Some(rest) = path.strip_prefix("/d") {
        if let Some(slash) = rest.find('/') {
            if let Ok(ms) = rest[..slash].parse::<u64>() {
                return (Some(ms), &rest[slash..]);
            }
        }
    }
    (None, path)
}

async fn handle(
    req: Request<Incoming>,
    canned: Arc<Canned>,
    default_delay: u64,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    // Read the whole body, as a real upstream would; a broken body is answered 400.
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(simple(StatusCode::BAD_REQUEST, canned.not_found.clone())),
    };
    let (delay, path) = split_delay(parts.uri.path());
    let delay = delay.unwrap_or(default_delay);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if parts.method == Method::POST && path.ends_with("/chat/completions") {
        let stream = contains(&body, b"\"stream\":true") || contains(&body, b"\"stream\": true");
        if stream {
            let usage = contains(&body, b"\"include_usage\":true")
                || contains(&body, b"\"include_usage\": true");
            let mut frames: VecDeque<Bytes> = if usage {
                canned.sse_null_usage.iter().cloned().collect()
            } else {
                canned.sse.iter().cloned().collect()
            };
            if usage {
                frames.push_back(canned.sse_usage.clone());
            }
            frames.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            let mut resp = Response::new(Either::Right(Chunks(frames)));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            return Ok(resp);
        }
        return Ok(simple(StatusCode::OK, canned.json.clone()));
    }
    if parts.method == Method::GET && path.ends_with("/models") {
        return Ok(simple(StatusCode::OK, canned.models.clone()));
    }
    Ok(simple(StatusCode::NOT_FOUND, canned.not_found.clone()))
}

fn simple(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut resp = Response::new(Either::Left(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Serves until the process is killed. Prints `mock listening on http://ADDR` once bound.
pub async fn serve(opts: MockOptions) -> anyhow::Result<()> {
    let canned = Arc::new(canned(opts.chunks)?);
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    println!("mock listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("mock: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let canned = canned.clone();
        let delay = opts.delay_ms;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, canned.clone(), delay));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_prefix_is_split_off() {
        assert_eq!(
            split_delay("/d50/v1/chat/completions"),
            (Some(50), "/v1/chat/completions")
        );
        assert_eq!(
            split_delay("/v1/chat/completions"),
            (None, "/v1/chat/completions")
        );
        assert_eq!(split_delay("/dx/v1"), (None, "/dx/v1"));
    }

    #[test]
    fn canned_answers_are_valid_json() -> anyhow::Result<()> {
        let c = canned(5)?;
        let v: serde_json::Value = serde_json::from_slice(&c.json)?;
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(c.sse.len(), 7);
        for frame in &c.sse {
            let s = std::str::from_utf8(frame)?;
            let data = s
                .strip_prefix("data: ")
                .and_then(|s| s.strip_suffix("\n\n"));
            let v: serde_json::Value = serde_json::from_str(data.unwrap_or(""))?;
            assert_eq!(v["object"], "chat.completion.chunk");
        }
        Ok(())
    }
}
