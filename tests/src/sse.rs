//! Reading `text/event-stream` responses from the gateway, event by event.
//!
//! [`SseReader`] turns a response body into events (`event:` name plus the joined
//! `data:` lines, split on blank lines, `\r\n` tolerated); a transport error ends the
//! stream and is kept, so a test can tell a clean end from a broken connection.
//! [`SseTranscript`] is a whole stream with the questions tests ask of an OpenAI stream:
//! the reassembled text, the tool calls, the usage chunk, error events, and whether
//! `data: [DONE]` came last.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use serde_json::Value;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.data).ok()
    }

    pub fn is_done(&self) -> bool {
        self.data == "[DONE]"
    }
}

/// Reads events from a streaming response.
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: BytesMut,
    ended: bool,
    /// The transport error that ended the body, if any.
    pub transport_error: Option<String>,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> SseReader {
        SseReader {
            body: resp.bytes_stream().boxed(),
            buf: BytesMut::new(),
            ended: false,
            transport_error: None,
        }
    }

    /// The next event; `None` at the end of the body (clean or broken).
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(ev) = self.take_event() {
                return Some(ev);
            }
            if self.ended {
                // A final event without its blank line still counts.
                if self.buf.iter().any(|b| !b.is_ascii_whitespace()) {
                    self.buf.extend_from_slice(b"\n\n");
                    continue;
                }
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    self.transport_error = Some(format!("{e:?}"));
                    self.ended = true;
                }
                None => self.ended = true,
            }
        }
    }

    /// As [`SseReader::next_event`], giving up (with `Err`) after `timeout`.
    pub async fn next_event_within(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<SseEvent>, String> {
        tokio::time::timeout(timeout, self.next_event())
            .await
            .map_err(|_| format!("no SSE event within {timeout:?}"))
    }

    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            let (block_end, consumed) = find_blank_line(&self.buf)?;
            let block = String::from_utf8_lossy(&self.buf[..block_end]).into_owned();
            let _ = self.buf.split_to(consumed);
            let mut event = None;
            let mut data: Vec<String> = Vec::new();
            for line in block.lines() {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.starts_with(':') {
                    continue; // comment / keep-alive
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = Some(value.to_string()),
                    "data" => data.push(value.to_string()),
                    _ => {}
                }
            }
            if event.is_none() && data.is_empty() {
                continue; // only comments
            }
            return Some(SseEvent {
                event,
                data: data.join("\n"),
            });
        }
    }

    /// Reads to the end (up to `timeout` in all).
    pub async fn collect(mut self, timeout: Duration) -> SseTranscript {
        let mut events = Vec::new();
        let res = tokio::time::timeout(timeout, async {
            while let Some(ev) = self.next_event().await {
                events.push(ev);
            }
        })
        .await;
        SseTranscript {
            events,
            transport_error: self.transport_error,
            timed_out: res.is_err(),
        }
    }
}

/// Where the first blank line starts and ends: `(start, end)` of the terminator.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some((line_start, i + 1));
            }
            line_start = i + 1;
        }
    }
    None
}

/// A whole SSE response.
#[derive(Debug, Clone)]
pub struct SseTranscript {
    pub events: Vec<SseEvent>,
    pub transport_error: Option<String>,
    pub timed_out: bool,
}

/// A tool call reassembled from stream deltas.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamedToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl SseTranscript {
    /// Reads a streaming response to the end (30 s at most).
    pub async fn read(resp: reqwest::Response) -> SseTranscript {
        SseReader::new(resp).collect(Duration::from_secs(30)).await
    }

    /// The JSON payloads of all data events except `[DONE]`; panics on one that is not
    /// JSON.
    pub fn payloads(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| !e.is_done())
            .map(|e| {
                e.json()
                    .unwrap_or_else(|| panic!("SSE data is not JSON: {:?}\n{self}", e.data))
            })
            .collect()
    }

    /// Whether any event is `[DONE]`.
    pub fn has_done(&self) -> bool {
        self.events.iter().any(SseEvent::is_done)
    }

    /// Whether the last event is `[DONE]` and it appears once.
    pub fn done_is_last(&self) -> bool {
        self.events.last().is_some_and(SseEvent::is_done)
            && self.events.iter().filter(|e| e.is_done()).count() == 1
    }

    /// Payloads carrying an `error` object.
    pub fn errors(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter_map(SseEvent::json)
            .filter(|v| v.get("error").is_some_and(Value::is_object))
            .collect()
    }

    /// Chat chunks (payloads whose object is `chat.completion.chunk`).
    pub fn chunks(&self) -> Vec<Value> {
        self.payloads()
            .into_iter()
            .filter(|v| v["object"] == "chat.completion.chunk")
            .collect()
    }

    /// `choices[index].delta.content` of every chunk, concatenated.
    pub fn text_of_choice(&self, index: u64) -> String {
        let mut out = String::new();
        for c in self.payloads() {
            for choice in c["choices"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if choice["index"].as_u64().unwrap_or(0) == index {
                    if let Some(t) = choice.pointer("/delta/content").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                    // Legacy completions stream `text`.
                    if let Some(t) = choice.get("text").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
            }
        }
        out
    }

    /// The text of choice 0.
    pub fn text(&self) -> String {
        self.text_of_choice(0)
    }

    /// The last non-null `finish_reason` of choice 0.
    pub fn finish_reason(&self) -> Option<String> {
        self.payloads()
            .iter()
            .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
            .filter(|ch| ch["index"].as_u64().unwrap_or(0) == 0)
            .filter_map(|ch| ch["finish_reason"].as_str().map(str::to_string))
            .next_back()
    }

    /// Payloads with an object `usage`.
    pub fn usage_chunks(&self) -> Vec<Value> {
        self.payloads()
            .into_iter()
            .filter(|v| v["usage"].is_object())
            .collect()
    }

    /// Tool calls of choice 0, reassembled by `index`.
    pub fn tool_calls(&self) -> Vec<StreamedToolCall> {
        let mut calls: BTreeMap<u64, StreamedToolCall> = BTreeMap::new();
        for c in self.payloads() {
            for choice in c["choices"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if choice["index"].as_u64().unwrap_or(0) != 0 {
                    continue;
                }
                for tc in choice
                    .pointer("/delta/tool_calls")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                {
                    let idx = tc["index"].as_u64().unwrap_or(0);
                    let entry = calls.entry(idx).or_default();
                    if let Some(id) = tc["id"].as_str() {
                        entry.id.push_str(id);
                    }
                    if let Some(n) = tc.pointer("/function/name").and_then(Value::as_str) {
                        entry.name.push_str(n);
                    }
                    if let Some(a) = tc.pointer("/function/arguments").and_then(Value::as_str) {
                        entry.arguments.push_str(a);
                    }
                }
            }
        }
        calls.into_values().collect()
    }
}

impl std::fmt::Display for SseTranscript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "--- SSE transcript ({} events) ---", self.events.len())?;
        for e in &self.events {
            if let Some(name) = &e.event {
                writeln!(f, "event: {name}")?;
            }
            writeln!(f, "data: {}", e.data)?;
        }
        if let Some(err) = &self.transport_error {
            writeln!(f, "(transport error: {err})")?;
        }
        if self.timed_out {
            writeln!(f, "(timed out)")?;
        }
        write!(f, "--- end ---")
    }
}
