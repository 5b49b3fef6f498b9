//! The mock upstreams checked on their own, with direct HTTP calls and no gateway: if
//! these fail, the gateway tests cannot be trusted.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use airlock_e2e::gateway::http_client;
use airlock_e2e::mock::{embedding_from_base64, fake_embedding, Fault, MockUpstream};
use airlock_e2e::sse::SseTranscript;
use serde_json::{json, Value};

fn openai_client(mock: &MockUpstream) -> reqwest::Client {
    http_client(Some(mock.api_key()))
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let resp = client.post(url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn openai_chat_json_echoes_and_counts() {
    let mock = MockUpstream::openai().await;
    let client = openai_client(&mock);
    let (status, body) = post(
        &client,
        format!("{}/chat/completions", mock.base_url()),
        json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "You said: hello there"
    );
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(mock.last_usage().total(), 8);
    let rec = mock.last_request();
    assert_eq!(rec.path, "/v1/chat/completions");
    assert_eq!(
        rec.header("authorization"),
        Some("Bearer sk-mock-openai-key")
    );
    assert_eq!(rec.body_json()["model"], "gpt-4o-mini");

    // Wrong key: the provider's 401.
    let (status, body) = post(
        &http_client(Some("nope")),
        format!("{}/chat/completions", mock.base_url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");

    // stream_options without stream is refused, as by the real API.
    let (status, _) = post(
        &client,
        format!("{}/chat/completions", mock.base_url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn openai_stream_with_and_without_usage() {
    let mock = MockUpstream::openai().await;
    let client = openai_client(&mock);
    for include in [true, false] {
        let mut body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "one two three"}]});
        if include {
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp = client
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let t = SseTranscript::read(resp).await;
        assert!(t.done_is_last(), "{t}");
        assert_eq!(t.text(), "You said: one two three", "{t}");
        assert_eq!(t.finish_reason().as_deref(), Some("stop"));
        let usage = t.usage_chunks();
        if include {
            assert_eq!(usage.len(), 1, "{t}");
            assert_eq!(usage[0]["choices"], json!([]));
            assert_eq!(usage[0]["usage"]["prompt_tokens"], 3);
            assert_eq!(usage[0]["usage"]["completion_tokens"], 5);
        } else {
            assert!(usage.is_empty(), "{t}");
        }
    }
}

#[tokio::test]
async fn openai_tools_stream_and_tool_message_rules() {
    let mock = MockUpstream::openai().await;
    let client = openai_client(&mock);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let resp = client
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&json!({"model": "m", "stream": true, "tools": tools, "messages": [{"role": "user", "content": "Paris?"}]}))
        .send()
        .await
        .unwrap();
    let t = SseTranscript::read(resp).await;
    let calls = t.tool_calls();
    assert_eq!(calls.len(), 1, "{t}");
    assert_eq!(calls[0].name, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
    assert_eq!(args, json!({"query": "Paris?"}));
    assert_eq!(t.finish_reason().as_deref(), Some("tool_calls"));

    // A tool message without the assistant's tool_calls before it is refused.
    let (status, _) = post(
        &client,
        format!("{}/chat/completions", mock.base_url()),
        json!({"model": "m", "messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}
        ]}),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn openai_embeddings_float_and_base64() {
    let mock = MockUpstream::openai().await;
    let client = openai_client(&mock);
    let (status, body) = post(
        &client,
        format!("{}/embeddings", mock.base_url()),
        json!({"model": "e", "input": ["alpha", "beta"]}),
    )
    .await;
    assert_eq!(status, 200);
    let v: Vec<f32> = serde_json::from_value(body["data"][1]["embedding"].clone()).unwrap();
    assert_eq!(v, fake_embedding("beta"));
    let (_, body) = post(
        &client,
        format!("{}/embeddings", mock.base_url()),
        json!({"model": "e", "input": "alpha", "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(
        embedding_from_base64(body["data"][0]["embedding"].as_str().unwrap()),
        fake_embedding("alpha")
    );
    assert_ne!(fake_embedding("alpha"), fake_embedding("beta"));
}

#[tokio::test]
async fn faults_status_drop_delay_cut() {
    let mock = MockUpstream::openai().await;
    let client = openai_client(&mock);
    let url = format!("{}/chat/completions", mock.base_url());
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "a b c d"}]});

    mock.fail_next(Fault::Status(503));
    let resp = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    // One-shot: the next request is served.
    let resp = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    mock.fail_next(Fault::Status(429));
    let resp = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");

    mock.fail_next(Fault::DropConnection);
    let err = client.post(&url).json(&body).send().await;
    assert!(
        err.is_err(),
        "a dropped connection must be an error, got {err:?}"
    );

    mock.fail_next(Fault::DelayFirstByte(Duration::from_millis(300)));
    let start = Instant::now();
    let resp = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(start.elapsed() >= Duration::from_millis(300));

    // Header-driven fault.
    let resp = client
        .post(&url)
        .header("x-mock-fault", "status=502")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 502);

    mock.fail_next(Fault::CutAfter(2));
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let resp = client.post(&url).json(&stream_body).send().await.unwrap();
    let t = SseTranscript::read(resp).await;
    assert_eq!(t.events.len(), 2, "{t}");
    assert!(
        t.transport_error.is_some(),
        "a cut stream must end in a transport error: {t}"
    );
    assert!(!t.has_done());

    mock.fail_next(Fault::MalformedJson);
    let resp = client.post(&url).json(&body).send().await.unwrap();
    assert!(resp.json::<Value>().await.is_err());

    mock.fail_always(Fault::Status(500));
    for _ in 0..2 {
        let resp = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 500);
    }
    mock.heal();
    let resp = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(mock.request_count(), 11);
}

#[tokio::test]
async fn anthropic_json_stream_and_validation() {
    let mock = MockUpstream::anthropic().await;
    let client = airlock_e2e::gateway::http_client(None);
    let url = format!("{}/messages", mock.base_url());
    let send = |body: Value| {
        client
            .post(&url)
            .header("x-api-key", mock.api_key())
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let resp = send(
        json!({"model": "claude", "max_tokens": 100, "system": "be kind",
                           "messages": [{"role": "user", "content": "hi you"}]}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["content"][0]["text"], "You said: hi you");
    assert_eq!(body["usage"]["input_tokens"], 4);
    assert_eq!(body["stop_reason"], "end_turn");

    for bad in [
        json!({"model": "c", "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": "c", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "x"}]}),
        json!({"model": "c", "max_tokens": 5, "n": 1, "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": "c", "max_tokens": 5, "tools": [{"type": "function", "function": {"name": "f"}}], "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]}]}),
    ] {
        let resp = send(bad.clone()).await.unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["type"], "error");
    }

    let resp = send(json!({"model": "claude", "max_tokens": 100, "stream": true,
                           "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
                           "messages": [{"role": "user", "content": "Rome?"}]}))
    .await
    .unwrap();
    let t = SseTranscript::read(resp).await;
    let names: Vec<&str> = t.events.iter().filter_map(|e| e.event.as_deref()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{t}");
    assert_eq!(names.last(), Some(&"message_stop"), "{t}");
    for needed in [
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ] {
        assert!(names.contains(&needed), "missing {needed}: {t}");
    }
    let json_parts: String = t
        .payloads()
        .iter()
        .filter(|p| p["delta"]["type"] == "input_json_delta")
        .filter_map(|p| p["delta"]["partial_json"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_parts).unwrap(),
        json!({"query": "Rome?"})
    );
}

#[tokio::test]
async fn gemini_generate_stream_embed() {
    let mock = MockUpstream::gemini().await;
    let client = airlock_e2e::gateway::http_client(None);
    let base = mock.base_url();
    let send = |method: &str, body: Value| {
        client
            .post(format!("{base}/models/gemini-2.0-flash:{method}"))
            .header("x-goog-api-key", mock.api_key())
            .json(&body)
            .send()
    };
    let resp = send(
        "generateContent",
        json!({"systemInstruction": {"parts": [{"text": "short"}]},
               "contents": [{"role": "user", "parts": [{"text": "ciao bella"}]}]}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["candidates"][0]["content"]["parts"][0]["text"],
        "You said: ciao bella"
    );
    assert_eq!(body["usageMetadata"]["promptTokenCount"], 3);

    let resp = send(
        "generateContent",
        json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = send("generateContent", json!({"messages": []}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    let resp = send(
        "streamGenerateContent?alt=sse",
        json!({"contents": [{"role": "user", "parts": [{"text": "a b"}]}]}),
    )
    .await
    .unwrap();
    let t = SseTranscript::read(resp).await;
    let text: String = t
        .payloads()
        .iter()
        .filter_map(|p| {
            p["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "You said: a b");
    assert_eq!(mock.last_request().query.as_deref(), Some("alt=sse"));

    let resp = send(
        "batchEmbedContents",
        json!({"requests": [{"model": "models/gemini-2.0-flash", "content": {"parts": [{"text": "alpha"}]}}]}),
    )
    .await
    .unwrap();
    let body: Value = resp.json().await.unwrap();
    let v: Vec<f32> = serde_json::from_value(body["embeddings"][0]["values"].clone()).unwrap();
    assert_eq!(v, fake_embedding("alpha"));

    // Missing key: 403, as Google answers.
    let resp = client
        .post(format!("{base}/models/g:generateContent"))
        .json(&json!({"contents": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}
