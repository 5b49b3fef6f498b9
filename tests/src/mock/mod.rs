//! Mock upstreams: in-process HTTP servers speaking each provider's wire format.
//!
//! A [`MockUpstream`] binds 127.0.0.1:0, records every request it receives (method,
//! path, query, headers, body) before routing it, checks credentials and the request
//! shape the way the real provider does (answering with that provider's error format),
//! and answers deterministically from the input so a test can tell what went through:
//!
//! - text: `You said: <last user text>`, cut to `max_tokens` words (finish = length);
//! - with tools: a call to the first tool with arguments `{"query": <last user text>}`;
//! - after a tool result: `Tool result: <result text>`;
//! - embeddings: [`fake_embedding`] of each input;
//! - usage: prompt = words in all input text, completion = words in the reply,
//!   recorded per reply ([`MockUpstream::usages`]).
//!
//! Faults ([`Fault`]) are taken per request in this order: an `x-mock-fault` header on
//! the request (see [`Fault::parse`]), then the queue filled by
//! [`MockUpstream::fail_next`], then the sticky fault set by
//! [`MockUpstream::fail_always`]. Requests are recorded whatever the fault.
//! [`Fault::Replay`] (built by [`fixture`]) answers a valid request with recorded
//! provider bytes from `tests/fixtures/<provider>/`.
//!
//! The server is hyper's connection loop around an axum `Router`, so that a handler can
//! ask for the connection to be dropped without an answer ([`Fault::DropConnection`]):
//! the service then fails and hyper closes the socket.

// Handlers return an early `Response` as their `Err`; its size does not matter here.
#![allow(clippy::result_large_err)]

pub mod anthropic;
pub mod content;
pub mod gemini;
pub mod openai;

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceExt;

pub use content::{
    count_words, embedding_from_base64, embedding_to_base64, fake_embedding, limit_words,
    reply_text, split_in, stream_pieces, tool_result_reply, EMBEDDING_DIMS,
};

/// Which wire format a mock speaks (and the gateway's `kind` for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    /// The config's `kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }
}

/// A misbehaviour injected into one reply (or all, when sticky).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and the provider's error body; 429 carries
    /// `Retry-After: 1`.
    Status(u16),
    /// Wait this long before sending anything.
    DelayFirstByte(Duration),
    /// Close the connection without answering.
    DropConnection,
    /// Streams: send this many events, then break the connection. JSON: send half the
    /// body, then break the connection.
    CutAfter(usize),
    /// Streams: wait this long before each event after the first.
    SlowStream(Duration),
    /// Send the response head at once, then wait this long before the first event of a
    /// stream (JSON: before the body), as an upstream that accepted the request but is
    /// slow to produce its first token.
    DelayFirstEvent(Duration),
    /// 200 with a body (or a stream event) that is not valid JSON.
    MalformedJson,
    /// Streams: send every event in 7-byte pieces, each its own write, so events and
    /// multi-byte characters are split across reads.
    Fragmented,
    /// Answer with exactly these bytes (e.g. a recorded fixture from
    /// `tests/fixtures/<provider>/`), after the request passed the mock's checks.
    Replay {
        status: u16,
        content_type: String,
        body: String,
    },
    /// Anthropic streams: after this many events send `event: error` (overloaded) and
    /// end the stream, as the real API does when it fails mid-stream.
    StreamErrorEventAfter(usize),
}

impl Fault {
    /// Parses the `x-mock-fault` header: `status=503`, `delay_ms=500`, `drop`, `cut=3`,
    /// `slow_ms=200`, `first_event_ms=500`, `malformed`, `error_event=2`, `fragmented`.
    pub fn parse(s: &str) -> Option<Fault> {
        let (k, v) = s.split_once('=').unwrap_or((s, ""));
        let num = || v.trim().parse::<u64>().ok();
        Some(match k.trim() {
            "status" => Fault::Status(u16::try_from(num()?).ok()?),
            "delay_ms" => Fault::DelayFirstByte(Duration::from_millis(num()?)),
            "drop" => Fault::DropConnection,
            "cut" => Fault::CutAfter(usize::try_from(num()?).ok()?),
            "slow_ms" => Fault::SlowStream(Duration::from_millis(num()?)),
            "first_event_ms" => Fault::DelayFirstEvent(Duration::from_millis(num()?)),
            "malformed" => Fault::MalformedJson,
            "error_event" => Fault::StreamErrorEventAfter(usize::try_from(num()?).ok()?),
            "fragmented" => Fault::Fragmented,
            _ => return None,
        })
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<Value>,
}

impl RecordedRequest {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The JSON body; panics if the body was not JSON.
    pub fn body_json(&self) -> &Value {
        self.json.as_ref().unwrap_or_else(|| {
            panic!(
                "{} {} had a non-JSON body: {:?}",
                self.method, self.path, self.body
            )
        })
    }
}

/// Token counts a mock reported in one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}

/// State shared by a mock's handlers.
pub struct MockState {
    kind: ProviderKind,
    api_key: String,
    requests: Mutex<Vec<RecordedRequest>>,
    queued: Mutex<VecDeque<Fault>>,
    sticky: Mutex<Option<Fault>>,
    usages: Mutex<Vec<Usage>>,
    counter: AtomicU64,
    completion_is_max_tokens: AtomicBool,
}

impl fmt::Debug for MockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockState")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl MockState {
    /// The fault for the request now being handled.
    pub(crate) fn take_fault(&self, headers: &HeaderMap) -> Option<Fault> {
        if let Some(f) = headers
            .get("x-mock-fault")
            .and_then(|v| v.to_str().ok())
            .and_then(Fault::parse)
        {
            return Some(f);
        }
        if let Some(f) = self.queued.lock().unwrap().pop_front() {
            return Some(f);
        }
        self.sticky.lock().unwrap().clone()
    }

    pub(crate) fn api_key(&self) -> &str {
        &self.api_key
    }

    /// A fresh number for ids (`chatcmpl-mock-3`, `toolu_mock_3`).
    pub(crate) fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn record_usage(&self, usage: Usage) {
        self.usages.lock().unwrap().push(usage);
    }

    /// The completion tokens to report: the request's `max_tokens` when
    /// [`MockUpstream::report_max_tokens_as_completion`] is on and the request set one,
    /// else `words` (the words of the reply, the default).
    pub(crate) fn completion_tokens(&self, words: u64, max_tokens: Option<u64>) -> u64 {
        match max_tokens {
            Some(m) if self.completion_is_max_tokens.load(Ordering::Relaxed) => m,
            _ => words,
        }
    }
}

/// A running mock upstream; dropping it stops accepting connections.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<MockState>,
    task: JoinHandle<()>,
}

impl fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockUpstream")
            .field("kind", &self.state.kind)
            .field("addr", &self.addr)
            .finish()
    }
}

/// The key each mock demands unless built with another.
pub const OPENAI_KEY: &str = "sk-mock-openai-key";
pub const ANTHROPIC_KEY: &str = "sk-ant-mock-key";
pub const GEMINI_KEY: &str = "gemini-mock-key";

impl MockUpstream {
    /// An OpenAI-compatible upstream (`/v1/...`).
    pub async fn openai() -> MockUpstream {
        Self::start(ProviderKind::OpenAi, OPENAI_KEY).await
    }

    /// An Anthropic Messages API upstream (`/v1/messages`).
    pub async fn anthropic() -> MockUpstream {
        Self::start(ProviderKind::Anthropic, ANTHROPIC_KEY).await
    }

    /// A Gemini upstream (`/v1beta/models/{model}:{method}`).
    pub async fn gemini() -> MockUpstream {
        Self::start(ProviderKind::Gemini, GEMINI_KEY).await
    }

    /// A mock of `kind` that demands `api_key`.
    pub async fn start(kind: ProviderKind, api_key: &str) -> MockUpstream {
        let state = Arc::new(MockState {
            kind,
            api_key: api_key.to_string(),
            requests: Mutex::new(Vec::new()),
            queued: Mutex::new(VecDeque::new()),
            sticky: Mutex::new(None),
            usages: Mutex::new(Vec::new()),
            counter: AtomicU64::new(0),
            completion_is_max_tokens: AtomicBool::new(false),
        });
        let router = match kind {
            ProviderKind::OpenAi => openai::router(state.clone()),
            ProviderKind::Anthropic => anthropic::router(state.clone()),
            ProviderKind::Gemini => gemini::router(state.clone()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        let task = tokio::spawn(serve(listener, router, state.clone()));
        MockUpstream { addr, state, task }
    }

    pub fn kind(&self) -> ProviderKind {
        self.state.kind
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL a provider entry uses: `http://ADDR/v1` (OpenAI, Anthropic) or
    /// `http://ADDR/v1beta` (Gemini).
    pub fn base_url(&self) -> String {
        match self.state.kind {
            ProviderKind::OpenAi | ProviderKind::Anthropic => format!("http://{}/v1", self.addr),
            ProviderKind::Gemini => format!("http://{}/v1beta", self.addr),
        }
    }

    /// The key this mock demands.
    pub fn api_key(&self) -> &str {
        &self.state.api_key
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// The latest request; panics if none arrived.
    pub fn last_request(&self) -> RecordedRequest {
        self.state
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_else(|| panic!("{:?} mock received no request", self.state.kind))
    }

    /// Usage reported in each reply so far.
    pub fn usages(&self) -> Vec<Usage> {
        self.state.usages.lock().unwrap().clone()
    }

    /// Usage of the latest reply; panics if none.
    pub fn last_usage(&self) -> Usage {
        *self
            .state
            .usages
            .lock()
            .unwrap()
            .last()
            .expect("mock sent no reply with usage")
    }

    /// OpenAI chat: when on, every reply reports `completion_tokens` equal to the
    /// request's `max_tokens` (or `max_completion_tokens`) when it sets one, whatever the
    /// text, so a test can make each request cost exactly its worst case. Off by default.
    pub fn report_max_tokens_as_completion(&self, on: bool) {
        self.state
            .completion_is_max_tokens
            .store(on, Ordering::Relaxed);
    }

    /// Inject `fault` into the next request only (faults queue up in order).
    pub fn fail_next(&self, fault: Fault) {
        self.state.queued.lock().unwrap().push_back(fault);
    }

    /// Inject `fault` into every request until [`MockUpstream::heal`].
    pub fn fail_always(&self, fault: Fault) {
        *self.state.sticky.lock().unwrap() = Some(fault);
    }

    /// Clear queued and sticky faults.
    pub fn heal(&self) {
        self.state.queued.lock().unwrap().clear();
        *self.state.sticky.lock().unwrap() = None;
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A recorded fixture, `tests/fixtures/<provider>/<name>`, as a [`Fault::Replay`] with
/// status 200 (content type from the extension: `.sse` or `.json`).
pub fn fixture(provider: &str, name: &str) -> Fault {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(provider)
        .join(name);
    let body = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    let content_type = if name.ends_with(".sse") {
        "text/event-stream"
    } else {
        "application/json"
    };
    Fault::Replay {
        status: 200,
        content_type: content_type.to_string(),
        body,
    }
}

/// A URL on 127.0.0.1 where nothing listens (bound then released), with `suffix` as
/// the path (`/v1`, `/v1beta`).
pub async fn closed_port_url(suffix: &str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}{suffix}")
}

/// Marker extension: the handler wants the connection closed without an answer.
#[derive(Debug, Clone, Copy)]
struct DropConnection;

#[derive(Debug)]
struct Dropped;

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock dropped the connection on purpose")
    }
}

impl std::error::Error for Dropped {}

async fn serve(listener: TcpListener, router: Router, state: Arc<MockState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let router = router.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: axum::http::Request<Incoming>| {
                let router = router.clone();
                let state = state.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let bytes = axum::body::to_bytes(Body::new(body), usize::MAX)
                        .await
                        .unwrap_or_default();
                    state.requests.lock().unwrap().push(RecordedRequest {
                        method: parts.method.to_string(),
                        path: parts.uri.path().to_string(),
                        query: parts.uri.query().map(str::to_string),
                        headers: parts.headers.clone(),
                        json: serde_json::from_slice(&bytes).ok(),
                        body: bytes.clone(),
                    });
                    let req = axum::http::Request::from_parts(parts, Body::from(bytes));
                    let resp = match router.oneshot(req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    if resp.extensions().get::<DropConnection>().is_some() {
                        return Err(Dropped);
                    }
                    Ok::<_, Dropped>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------
// Replies shared by the provider modules.

/// What a handler wants to send when nothing goes wrong.
pub(crate) enum Reply {
    Json(Value),
    /// Pre-rendered SSE frames (each ends with its blank line).
    Sse(Vec<String>),
    /// Non-SSE streamed JSON (Gemini's `streamGenerateContent` without `alt=sse`).
    JsonArrayStream(Vec<Value>),
}

/// Builds a provider's error body for a status and message.
pub(crate) type ErrorBody = fn(u16, &str) -> Value;

/// An error response in the provider's format.
pub(crate) fn error_response(status: u16, body: Value) -> Response<Body> {
    let mut resp = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json");
    if status == 429 {
        resp = resp.header("retry-after", "1");
    }
    resp.body(Body::from(body.to_string())).unwrap()
}

/// Sends `reply`, bent by `fault`.
pub(crate) async fn respond(
    fault: Option<Fault>,
    reply: Reply,
    error_body: ErrorBody,
) -> Response<Body> {
    let mut cut = None;
    let mut slow = None;
    let mut first_event = None;
    let mut error_event = None;
    let mut fragmented = false;
    match fault {
        Some(Fault::Status(code)) => {
            return error_response(code, error_body(code, "mock upstream fault injected"))
        }
        Some(Fault::DelayFirstByte(d)) => tokio::time::sleep(d).await,
        Some(Fault::DropConnection) => {
            let mut resp = Response::new(Body::empty());
            resp.extensions_mut().insert(DropConnection);
            return resp;
        }
        Some(Fault::CutAfter(n)) => cut = Some(n),
        Some(Fault::SlowStream(d)) => slow = Some(d),
        Some(Fault::DelayFirstEvent(d)) => first_event = Some(d),
        Some(Fault::MalformedJson) => return malformed(reply),
        Some(Fault::StreamErrorEventAfter(n)) => error_event = Some(n),
        Some(Fault::Fragmented) => fragmented = true,
        Some(Fault::Replay {
            status,
            content_type,
            body,
        }) => {
            return Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
                .header("content-type", content_type)
                .body(Body::from(body))
                .unwrap()
        }
        None => {}
    }
    match reply {
        Reply::Json(v) => {
            let text = v.to_string();
            match cut {
                Some(_) => {
                    let half = Bytes::from(text.as_bytes()[..text.len() / 2].to_vec());
                    let stream = async_stream::stream! {
                        yield Ok::<Bytes, std::io::Error>(half);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        yield Err(std::io::Error::other("mock cut the body"));
                    };
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Body::from_stream(stream))
                        .unwrap()
                }
                None => match first_event {
                    Some(d) => {
                        let stream = async_stream::stream! {
                            tokio::time::sleep(d).await;
                            yield Ok::<Bytes, std::io::Error>(Bytes::from(text));
                        };
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    None => Response::builder()
                        .header("content-type", "application/json")
                        .body(Body::from(text))
                        .unwrap(),
                },
            }
        }
        Reply::Sse(frames) if fragmented => fragment_frames(frames, "text/event-stream"),
        Reply::Sse(frames) => stream_frames(
            frames,
            "text/event-stream",
            StreamFaults {
                cut,
                slow,
                first_event,
                error_event,
            },
        ),
        Reply::JsonArrayStream(items) => {
            let mut frames = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let sep = if i == 0 { "[" } else { ",\r\n" };
                frames.push(format!("{sep}{item}"));
            }
            frames.push("]".to_string());
            stream_frames(
                frames,
                "application/json",
                StreamFaults {
                    cut,
                    slow,
                    first_event,
                    error_event: None,
                },
            )
        }
    }
}

/// How [`stream_frames`] bends a stream (all off by default).
#[derive(Debug, Clone, Copy, Default)]
struct StreamFaults {
    cut: Option<usize>,
    slow: Option<Duration>,
    first_event: Option<Duration>,
    error_event: Option<usize>,
}

fn stream_frames(frames: Vec<String>, content_type: &str, faults: StreamFaults) -> Response<Body> {
    let StreamFaults {
        cut,
        slow,
        first_event,
        error_event,
    } = faults;
    let stream = async_stream::stream! {
        if let Some(d) = first_event {
            tokio::time::sleep(d).await;
        }
        for (i, frame) in frames.into_iter().enumerate() {
            if cut == Some(i) {
                // Let what was sent reach the peer first, as when a real upstream dies.
                tokio::time::sleep(Duration::from_millis(50)).await;
                yield Err(std::io::Error::other("mock cut the stream"));
                return;
            }
            if error_event == Some(i) {
                let err = serde_json::json!({
                    "type": "error",
                    "error": {"type": "overloaded_error", "message": "Overloaded"}
                });
                yield Ok(Bytes::from(format!("event: error\ndata: {err}\n\n")));
                return;
            }
            if i > 0 {
                if let Some(d) = slow {
                    tokio::time::sleep(d).await;
                }
            }
            yield Ok::<Bytes, std::io::Error>(Bytes::from(frame));
        }
    };
    Response::builder()
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn fragment_frames(frames: Vec<String>, content_type: &str) -> Response<Body> {
    let bytes: Vec<u8> = frames.concat().into_bytes();
    let stream = async_stream::stream! {
        for piece in bytes.chunks(7) {
            yield Ok::<Bytes, std::io::Error>(Bytes::copy_from_slice(piece));
            // A pause makes each piece its own write on the socket.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    Response::builder()
        .header("content-type", content_type)
        .body(Body::from_stream(stream))
        .unwrap()
}

fn malformed(reply: Reply) -> Response<Body> {
    match reply {
        Reply::Json(_) => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(
                "{\"id\": \"broken\", \"choices\": [{\"message\": ",
            ))
            .unwrap(),
        Reply::Sse(mut frames) => {
            // Keep the first event, then one that is not JSON, then the rest.
            let at = frames.len().min(1);
            frames.insert(at, "data: {\"choices\": [{\"delta\": \n\n".to_string());
            stream_frames(frames, "text/event-stream", StreamFaults::default())
        }
        Reply::JsonArrayStream(_) => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from("[{\"candidates\": "))
            .unwrap(),
    }
}

// ---------------------------------------------------------------------------------
// Request helpers shared by the provider modules.

/// A JSON value's text: a string as is, an array of `{text}` parts joined, else "".
pub(crate) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Returns a header value if it equals `expected` (constant-time is not a concern here).
pub(crate) fn header_is(headers: &HeaderMap, name: &str, expected: &str) -> bool {
    headers.get(name).and_then(|v| v.to_str().ok()) == Some(expected)
}

/// Parses a JSON body or yields the provider's 400.
pub(crate) fn parse_body(body: &Bytes, error_body: ErrorBody) -> Result<Value, Response<Body>> {
    serde_json::from_slice::<Value>(body)
        .map_err(|e| error_response(400, error_body(400, &format!("invalid JSON body: {e}"))))
}

/// A 200 JSON response without faults (for listings).
pub(crate) fn json_ok(v: Value) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}
