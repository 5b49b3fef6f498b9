//! Request parsing and response serialization: the per-request JSON work the gateway
//! adds on top of proxying.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a broken fixture should stop it

use std::hint::black_box;

use airlock::api::types::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
use airlock::providers::raw::RawChunk;
use airlock::providers::ChatChunk;
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

const CHUNK: &str = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":" answer"},"logprobs":null,"finish_reason":null}],"usage":null}"#;

criterion_group!(benches, parse);
criterion_main!(benches);
