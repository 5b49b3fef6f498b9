//! Real provider bytes through the gateway: the mocks replay the recorded fixtures in
//! `tests/fixtures/{anthropic,gemini}/` (parallel tool calls, thinking blocks, thought
//! signatures, streams that end without their end marker, error events mid-stream)
//! and the client must get well-formed OpenAI answers.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use airlock_e2e::mock::{fixture, ProviderKind};
use airlock_e2e::sse::SseTranscript;
use airlock_e2e::stack::{chat, chat_stream, weather_tools, wiring, Stack};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn args(arguments: &str) -> Value {
    serde_json::from_str(arguments)
        .unwrap_or_else(|e| panic!("tool arguments are not JSON ({e}): {arguments:?}"))
}

#[tokio::test]
async fn anthropic_stream_with_two_tool_uses() {
    let stack = Stack::start().await;
    stack
        .anthropic
        .fail_next(fixture("anthropic", "stream_tool_use.sse"));
    let mut body = chat_stream("claude", "Weather in Paris and Tokyo?", true);
    body["tools"] = weather_tools();
    let t = SseTranscript::read(stack.gateway.post_stream(CHAT, &body).await).await;
    assert!(t.done_is_last(), "{t}");
    assert_eq!(t.text(), "I'll check the weather in both cities.", "{t}");
    let calls = t.tool_calls();
    assert_eq!(
        calls.len(),
        2,
        "tool_use blocks 1 and 2 become tool calls 0 and 1: {t}"
    );
    assert_eq!(calls[0].id, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "{t}");
    assert_eq!(calls[0].name, "get_weather");
    assert_eq!(
        args(&calls[0].arguments),
        json!({"location": "Paris, France", "unit": "celsius"})
    );
    assert_eq!(calls[1].id, "toolu_01Y8j3bMCXrjgLMzGZSTxLUb", "{t}");
    assert_eq!(
        args(&calls[1].arguments),
        json!({"location": "Tokyo, Japan"})
    );
    assert_eq!(t.finish_reason().as_deref(), Some("tool_calls"), "{t}");
    let usage = t.usage_chunks();
    assert_eq!(usage.len(), 1, "{t}");
    assert_eq!(usage[0]["usage"]["prompt_tokens"], 472, "{t}");
    assert_eq!(usage[0]["usage"]["completion_tokens"], 118, "{t}");
}

#[tokio::test]
async fn anthropic_tool_use_after_thinking() {
    let stack = Stack::start().await;
    stack
        .anthropic
        .fail_next(fixture("anthropic", "tool_use_response.json"));
    let mut body = chat("claude", "Weather in San Francisco?");
    body["tools"] = weather_tools();
    let resp = stack
        .gateway
        .post_json(CHAT, &body)
        .await
        .expect_status(200);
    let msg = &resp["choices"][0]["message"];
    assert_eq!(
        msg["content"], "I'll check the current weather in San Francisco for you.",
        "the text block is the content (the thinking block is not): {resp}"
    );
    let calls = msg["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{resp}"));
    assert_eq!(calls.len(), 1, "{resp}");
    assert_eq!(calls[0]["id"], "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(
        args(calls[0]["function"]["arguments"].as_str().unwrap_or("")),
        json!({"location": "San Francisco, CA", "unit": "celsius"})
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(resp["usage"]["prompt_tokens"], 472, "{resp}");
    assert_eq!(resp["usage"]["completion_tokens"], 89, "{resp}");
}

#[tokio::test]
async fn gemini_two_function_calls() {
    let stack = Stack::start().await;
    stack
        .gemini
        .fail_next(fixture("gemini", "generate_function_call.json"));
    let mut body = chat("gemini", "Weather and time in Paris?");
    body["tools"] = weather_tools();
    let resp = stack
        .gateway
        .post_json(CHAT, &body)
        .await
        .expect_status(200);
    let calls = resp["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{resp}"))
        .clone();
    assert_eq!(calls.len(), 2, "{resp}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(
        args(calls[0]["function"]["arguments"].as_str().unwrap_or("")),
        json!({"city": "Paris", "unit": "celsius"})
    );
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_eq!(
        args(calls[1]["function"]["arguments"].as_str().unwrap_or("")),
        json!({"timezone": "Europe/Paris"})
    );
    let ids: Vec<&str> = calls.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids.len(), 2, "every call has an id: {resp}");
    assert_ne!(ids[0], ids[1], "ids are distinct: {resp}");
    assert_eq!(resp["choices"][0]["finish_reason"], "tool_calls", "{resp}");
    assert_eq!(resp["usage"]["prompt_tokens"], 96, "{resp}");
    // OpenAI counts reasoning in completion_tokens: 31 candidates + 60 thoughts.
    assert_eq!(resp["usage"]["completion_tokens"], 91, "{resp}");
    assert_eq!(resp["usage"]["total_tokens"], 187, "{resp}");

    // Both results go back, each to its function, in one user turn.
    let msg = resp["choices"][0]["message"].clone();
    let follow = json!({"model": "gemini", "tools": weather_tools(), "messages": [
        {"role": "user", "content": "Weather and time in Paris?"},
        msg,
        {"role": "tool", "tool_call_id": ids[0], "content": "sunny"},
        {"role": "tool", "tool_call_id": ids[1], "content": "noon"}
    ]});
    let resp2 = stack
        .gateway
        .post_json(CHAT, &follow)
        .await
        .expect_status(200);
    let text = resp2["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("sunny") && text.contains("noon"), "{resp2}");
    let up = stack.gemini.last_request().body_json().clone();
    let contents = up["contents"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = contents
        .last()
        .and_then(|c| c["parts"].as_array())
        .map(|p| {
            p.iter()
                .filter_map(|p| {
                    p.get("functionResponse")
                        .or_else(|| p.get("function_response"))
                })
                .filter_map(|r| r["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, ["get_weather", "get_time"], "{up}");
}

#[tokio::test]
async fn gemini_stream_two_function_calls() {
    let stack = Stack::start().await;
    stack
        .gemini
        .fail_next(fixture("gemini", "stream_function_call.sse"));
    let mut body = chat_stream("gemini", "Weather in Paris and London?", false);
    body["tools"] = weather_tools();
    let t = SseTranscript::read(stack.gateway.post_stream(CHAT, &body).await).await;
    assert!(t.done_is_last(), "{t}");
    let calls = t.tool_calls();
    assert_eq!(
        calls.len(),
        2,
        "two chunks, one call each, become calls 0 and 1: {t}"
    );
    assert_eq!(args(&calls[0].arguments), json!({"city": "Paris"}));
    assert_eq!(args(&calls[1].arguments), json!({"city": "London"}));
    assert!(!calls[0].id.is_empty() && calls[0].id != calls[1].id, "{t}");
    assert_eq!(t.finish_reason().as_deref(), Some("tool_calls"), "{t}");
}

/// A recorded stream that stops without its end marker, or with an error event.
async fn broken_recorded_stream(kind: ProviderKind, name: &str, expect_code: Option<&str>) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let provider = match kind {
        ProviderKind::Anthropic => "anthropic",
        _ => "gemini",
    };
    stack.mock(kind).fail_next(fixture(provider, name));
    let resp = stack
        .gateway
        .post_stream(CHAT, &chat_stream(w.model, "tell me a story", false))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let t = SseTranscript::read(resp).await;
    assert!(
        !t.text().is_empty(),
        "the text before the break came through: {t}"
    );
    let errors = t.errors();
    assert_eq!(errors.len(), 1, "{name}: one error event: {t}");
    let code = errors[0]["error"]["code"].as_str().unwrap_or("");
    match expect_code {
        Some(c) => assert_eq!(code, c, "{name}: {t}"),
        None => assert!(code.starts_with("upstream_"), "{name}: code {code:?}: {t}"),
    }
    assert!(
        !t.has_done(),
        "{name}: no [DONE] for an unfinished stream: {t}"
    );
}

#[tokio::test]
async fn anthropic_truncated_stream() {
    broken_recorded_stream(
        ProviderKind::Anthropic,
        "stream_truncated.sse",
        Some("upstream_stream_interrupted"),
    )
    .await;
}

#[tokio::test]
async fn gemini_truncated_stream() {
    broken_recorded_stream(
        ProviderKind::Gemini,
        "stream_truncated.sse",
        Some("upstream_stream_interrupted"),
    )
    .await;
}

#[tokio::test]
async fn anthropic_error_event_stream() {
    broken_recorded_stream(ProviderKind::Anthropic, "stream_error.sse", None).await;
}

#[tokio::test]
async fn gemini_error_event_stream() {
    broken_recorded_stream(ProviderKind::Gemini, "stream_error.sse", None).await;
}
