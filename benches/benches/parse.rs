//! Request parsing and response serialization: the per-request JSON work the gateway
//! adds on top of proxying.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a broken fixture should stop it

use std::hint::black_box;

use airlock::api::types::{ChatCompletionRequest, ChatCompletionResponse};
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
}

criterion_group!(benches, parse);
criterion_main!(benches);
