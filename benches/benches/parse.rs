//! Request parsing and response serialization: the per-request JSON work the gateway
//! adds on top of proxying.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a broken fixture should stop it

use std::hint::black_box;

use airlock::api::sse::StreamItem;
use airlock::api::types::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
use airlock::providers::raw::RawChunk;
use airlock::providers::{anthropic, gemini, ChatChunk};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const RESPONSE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"About 2.1 million people live in Paris proper."},"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":61,"completion_tokens":12,"total_tokens":73}}"#;

fn parse(c: &mut Criterion) {
    let body = airlock_benches::CHAT_REQUEST.as_bytes();
    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_and_validate_chat_request", |b| {
        b.iter(|| {
            let req: ChatCompletionRequest = airlock::api::json::parse(black_box(body)).unwrap();
            airlock::api::validate::chat(&req).unwrap();
            black_box(req)
        })
    });
    let resp: ChatCompletionResponse = serde_json::from_str(RESPONSE).unwrap();
    g.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    g.bench_function("parse_upstream_chat_response", |b| {
        b.iter(|| {
            black_box(serde_json::from_str::<ChatCompletionResponse>(black_box(RESPONSE)).unwrap())
        })
    });
    g.bench_function("serialize_chat_response", |b| {
        b.iter(|| black_box(serde_json::to_vec(black_box(&resp)).unwrap()))
    });
    g.finish();

    // A streamed chunk as OpenAI sends it once usage is asked for (the gateway always
    // asks), passed to a client that did not ask: `"usage":null` must go.
    let mut g = c.benchmark_group("sse_chunk");
    g.throughput(Throughput::Bytes(CHUNK.len() as u64));
    g.bench_function("check_and_cut_null_usage", |b| {
        b.iter(|| {
            let raw = RawChunk::parse(Bytes::from_static(black_box(CHUNK.as_bytes()))).unwrap();
            let mut chunk = ChatChunk::Raw(raw);
            chunk.strip_usage();
            black_box(chunk)
        })
    });
    // What the same chunk cost before: checked, then parsed as the typed chunk and
    // serialized again without `usage`.
    g.bench_function("check_and_reserialize_without_usage", |b| {
        b.iter(|| {
            let raw = RawChunk::parse(Bytes::from_static(black_box(CHUNK.as_bytes()))).unwrap();
            let mut typed: ChatCompletionChunk = serde_json::from_slice(&raw.json).unwrap();
            typed.usage = None;
            black_box(serde_json::to_vec(&typed).unwrap())
        })
    });
    g.finish();
}

/// Whole streams as each provider sends them, translated to the OpenAI chunks a client
/// gets and written as its SSE events (`data: ...\n\n`): what the gateway does per
/// upstream event once the bytes are split into events. Anthropic and Gemini replay
/// the recorded streams the end-to-end tests use; OpenAI's is the same chunk shape
/// as above (role, content, finish, usage), passed to a client that did not ask for
/// usage.
fn stream_translation(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse_stream_to_client");
    let openai: Vec<Bytes> = OPENAI_STREAM
        .iter()
        .map(|d| Bytes::from_static(d.as_bytes()))
        .collect();
    g.throughput(Throughput::Elements(openai.len() as u64));
    g.bench_function("openai_6_events", |b| {
        b.iter(|| {
            let mut out = 0;
            for data in &openai {
                out += client_bytes(ChatChunk::Raw(RawChunk::parse(data.clone()).unwrap()));
            }
            black_box(out)
        })
    });
    let events = sse_events(ANTHROPIC_STREAM);
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function(format!("anthropic_{}_events", events.len()), |b| {
        b.iter(|| {
            let mut t = anthropic::StreamTranslator::new("anthropic", "claude-sonnet-4");
            let mut out = 0;
            for (event, data) in &events {
                for item in t.event(event, data) {
                    out += client_bytes(ChatChunk::Typed(item.unwrap()));
                }
            }
            black_box(out)
        })
    });
    let events = sse_events(GEMINI_STREAM);
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function(format!("gemini_{}_events", events.len()), |b| {
        b.iter(|| {
            let mut t = gemini::StreamTranslator::new("gemini", "gemini-2.0-flash");
            let mut out = 0;
            for (_, data) in &events {
                for item in t.event(data) {
                    out += client_bytes(ChatChunk::Typed(item.unwrap()));
                }
            }
            black_box(out)
        })
    });
    g.finish();
}

/// The bytes of a chunk's SSE event for a client that did not ask for usage, as the
/// gateway's SSE writer sends it: a usage-only chunk is not sent, usage is cut from
/// the others.
fn client_bytes(mut chunk: ChatChunk) -> usize {
    if chunk.is_usage_only() {
        return 0;
    }
    chunk.strip_usage();
    chunk.event().len()
}

/// `(event name, data)` of each event of an SSE recording (the name is empty where the
/// event has none); lines end in LF or CRLF (Gemini sends CRLF).
fn sse_events(text: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let (mut event, mut data) = (String::new(), None);
    for line in text.lines().chain([""]) {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push((std::mem::take(&mut event), d));
            }
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v.to_string());
        }
    }
    events
}

const ANTHROPIC_STREAM: &str = include_str!("../../tests/fixtures/anthropic/stream_text.sse");
const GEMINI_STREAM: &str = include_str!("../../tests/fixtures/gemini/stream_text.sse");

const OPENAI_STREAM: [&str; 6] = [
    r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"! I'm doing well"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":", thanks for asking."},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
    r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[],"usage":{"prompt_tokens":21,"completion_tokens":7,"total_tokens":28}}"#,
];

const CHUNK: &str = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":" answer"},"logprobs":null,"finish_reason":null}],"usage":null}"#;

criterion_group!(benches, parse, stream_translation);
criterion_main!(benches);
