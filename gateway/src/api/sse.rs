//! Writing streams to the client as server-sent events, and recording their outcome.
//!
//! Invariants:
//! - A stream that completes ends with `data: [DONE]`; one that fails ends with a
//!   `data: {"error":{...}}` event and no `[DONE]`, so no client mistakes a broken
//!   answer for a whole one.
//! - Usage-only chunks reach the client only if it asked (`stream_options.include_usage`);
//!   usage is always recorded in metrics.
//! - The outcome (ok, error code, or `client_closed`) is recorded exactly once, when the
//!   stream ends or when the client goes away and the body is dropped.
//! - Events that are ready together go out together ([`Coalesce`]): a burst of upstream
//!   chunks costs one write to the client, not one each; an event is never held back
//!   waiting for one that is not there yet.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::Serialize;

use super::types::{CompletionResponse, Usage};
use crate::error::ApiError;
use crate::governance::policy::{Admission, Outcome};
use crate::providers::{ChatChunk, UpstreamError};
use crate::routing::ServedBy;
use crate::state::AppState;

/// What the SSE writer needs to know about a streamed item.
pub trait StreamItem: Send + 'static {
    fn usage(&self) -> Option<&Usage>;
    /// True for the final chunk that carries only usage.
    fn is_usage_only(&self) -> bool;
    fn strip_usage(&mut self);
    /// The item as one SSE event (`data: <json>\n\n`).
    fn event(&self) -> Bytes;
}

impl StreamItem for ChatChunk {
    fn usage(&self) -> Option<&Usage> {
        ChatChunk::usage(self)
    }
    fn is_usage_only(&self) -> bool {
        ChatChunk::is_usage_only(self)
    }
    fn strip_usage(&mut self) {
        ChatChunk::strip_usage(self);
    }
    fn event(&self) -> Bytes {
        match self {
            ChatChunk::Typed(c) => event(c),
            // The upstream's own JSON, framed as it came.
            ChatChunk::Raw(c) => frame(&c.json),
        }
    }
}

impl StreamItem for CompletionResponse {
    fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }
    fn is_usage_only(&self) -> bool {
        self.choices.is_empty() && self.usage.is_some()
    }
    fn strip_usage(&mut self) {
        self.usage = None;
    }
    fn event(&self) -> Bytes {
        event(self)
    }
}

/// Records a stream's outcome once, on completion or on drop: metrics, and the
/// settlement and audit record of its admission.
struct StreamRecord {
    state: AppState,
    route: &'static str,
    model: String,
    target: String,
    by: ServedBy,
    start: Instant,
    status: Option<String>,
    usage: Option<Usage>,
    admission: Option<Admission>,
}

impl StreamRecord {
    fn outcome(&self, status: u16, error_code: Option<String>) -> Outcome<'_> {
        Outcome {
            target: Some(&self.by.target),
            usage: self.usage.as_ref(),
            status,
            error_code,
            attempts: self.by.attempts,
            routing: Some(self.by.route.clone()),
            content: None,
        }
    }

    fn set_usage(&mut self, u: &Usage) {
        self.usage = Some(u.clone());
    }

    fn finish(&mut self, status: &str) {
        self.status = Some(status.to_string());
    }
}

impl Drop for StreamRecord {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            // The client went away mid-stream: settle what was used, in the background.
            a.finish_detached(self.outcome(499, Some("client_closed".into())));
        }
        let status = self
            .status
            .take()
            .unwrap_or_else(|| "client_closed".to_string());
        if let Some(u) = &self.usage {
            self.state.metrics.tokens(
                &self.model,
                &self.target,
                u.prompt_tokens,
                u.completion_tokens,
            );
        }
        self.state.metrics.observe(
            self.route,
            &self.model,
            &self.target,
            &status,
            self.start.elapsed().as_secs_f64(),
        );
        tracing::debug!(route = self.route, model = %self.model, target = %self.target, status, "stream ended");
    }
}

/// Where a stream is going and where it came from, for the outcome record.
pub struct StreamLabels {
    pub route: &'static str,
    pub model: String,
    pub by: ServedBy,
    pub start: Instant,
}

fn event<T: Serialize>(item: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    match serde_json::to_writer(&mut buf, item) {
        Ok(()) => {
            buf.extend_from_slice(b"\n\n");
            Bytes::from(buf)
        }
        Err(e) => {
            let err = ApiError::Internal(format!("cannot serialize a stream event: {e}"));
            event(&err.body())
        }
    }
}

/// `data: <json>\n\n` around JSON that is already serialized.
fn frame(json: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(json.len() + 8);
    buf.extend_from_slice(b"data: ");
    buf.extend_from_slice(json);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// Turns a provider stream into an SSE response body.
pub fn respond<T: StreamItem>(
    state: AppState,
    labels: StreamLabels,
    mut stream: BoxStream<'static, Result<T, UpstreamError>>,
    include_usage: bool,
    admission: Option<Admission>,
) -> Response {
    let soft_warning = admission.as_ref().is_some_and(|a| a.soft_warning);
    let mut outcome = StreamRecord {
        state,
        route: labels.route,
        model: labels.model,
        target: labels.by.target.label.clone(),
        by: labels.by,
        start: labels.start,
        status: None,
        usage: None,
        admission,
    };
    let body = async_stream::stream! {
        while let Some(item) = stream.next().await {
            match item {
                Ok(mut chunk) => {
                    if let Some(u) = chunk.usage() {
                        outcome.set_usage(u);
                    }
                    if !include_usage {
                        if chunk.is_usage_only() {
                            continue;
                        }
                        chunk.strip_usage();
                    }
                    yield Ok::<Bytes, std::convert::Infallible>(chunk.event());
                }
                Err(e) => {
                    let err = ApiError::Upstream(e);
                    tracing::warn!(code = err.code(), error = %err, "stream failed after it started");
                    if let Some(a) = outcome.admission.take() {
                        let o = outcome.outcome(err.status().as_u16(), Some(err.code().to_string()));
                        if let Err(le) = a.finish(o).await {
                            tracing::error!(error = %le, "cannot record a failed stream");
                        }
                    }
                    outcome.finish(err.code());
                    yield Ok(event(&err.body()));
                    return;
                }
            }
        }
        // [DONE] only once the settlement and audit record are durable.
        if let Some(a) = outcome.admission.take() {
            if let Err(e) = a.finish(outcome.outcome(200, None)).await {
                outcome.finish(e.code());
                yield Ok(event(&e.body()));
                return;
            }
        }
        outcome.finish("200");
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    let mut resp = Response::new(Body::from_stream(Coalesce::new(Box::pin(body))));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if soft_warning {
        h.insert(
            "x-airlock-budget-warning",
            HeaderValue::from_static("soft budget threshold exceeded"),
        );
    }
    resp
}

/// A body stream that joins the events ready at the same time into one frame.
///
/// hyper writes to the socket whenever the body has nothing ready, and an upstream
/// stream hands over one event at a time (hyper's client connection task refills a
/// one-slot channel in between, which takes it two scheduler turns here), so without
/// this every event of a burst would be its own write and its own wake-up of the client.
/// Once an event is in hand, a poll that finds nothing new gives the other tasks a turn
/// (it wakes itself and returns `Pending`), up to [`TURNS`] turns in a row; when they
/// bring nothing, the frame goes out. Frames are capped at [`MAX_FRAME`].
pub struct Coalesce<S> {
    inner: S,
    held: Vec<Bytes>,
    len: usize,
    /// Turns given away since the last event arrived.
    turns: u8,
    done: bool,
}

/// Scheduler turns an event in hand waits for the next one (measured: the minimum at
/// which a burst of upstream chunks goes out in one write).
const TURNS: u8 = 2;

/// Largest joined frame.
const MAX_FRAME: usize = 64 * 1024;

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Coalesce {
            inner,
            held: Vec::new(),
            len: 0,
            turns: 0,
            done: false,
        }
    }

    fn take(&mut self) -> Bytes {
        self.len = 0;
        if self.held.len() == 1 {
            return self.held.pop().unwrap_or_default();
        }
        let mut buf = Vec::with_capacity(self.held.iter().map(Bytes::len).sum());
        for b in self.held.drain(..) {
            buf.extend_from_slice(&b);
        }
        Bytes::from(buf)
    }
}

impl<S> Stream for Coalesce<S>
where
    S: Stream<Item = Result<Bytes, std::convert::Infallible>> + Unpin,
{
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready((!this.held.is_empty()).then(|| Ok(this.take())));
            }
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    this.len += b.len();
                    this.held.push(b);
                    this.turns = 0;
                    if this.len >= MAX_FRAME {
                        return Poll::Ready(Some(Ok(this.take())));
                    }
                }
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => this.done = true,
                Poll::Pending if this.held.is_empty() => return Poll::Pending,
                Poll::Pending if this.turns < TURNS => {
                    this.turns += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Ready(Some(Ok(this.take()))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_events_go_out_together_and_none_waits_for_a_later_one() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok);
        let mut body = Coalesce::new(events);
        for e in ["a", "b", "c"] {
            tx.send(Bytes::from(e)).unwrap();
        }
        assert_eq!(body.next().await.unwrap().unwrap(), "abc");
        // Nothing else is coming yet: the next event is not held back.
        tx.send(Bytes::from("d")).unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), "d");
        tx.send(Bytes::from("e")).unwrap();
        drop(tx);
        assert_eq!(body.next().await.unwrap().unwrap(), "e");
        assert!(body.next().await.is_none());
    }
}
