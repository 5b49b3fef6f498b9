//! The other routes: embeddings (float and base64, OpenAI and Gemini), legacy
//! completions (OpenAI as is, Anthropic and Gemini mapped to chat), the model list,
//! health and readiness, Prometheus metrics, and the request-id header.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use airlock_e2e::gateway::HttpReply;
use airlock_e2e::mock::{embedding_from_base64, fake_embedding, EMBEDDING_DIMS};
use airlock_e2e::sse::SseTranscript;
use airlock_e2e::stack::{chat, chat_stream, Stack};
use serde_json::{json, Value};

/// The vector of `data[i]`, decoding base64 when it is a string.
fn vector(resp: &Value, i: usize) -> Vec<f32> {
    match &resp["data"][i]["embedding"] {
        Value::String(s) => embedding_from_base64(s),
        Value::Array(_) => serde_json::from_value(resp["data"][i]["embedding"].clone()).unwrap(),
        other => panic!("data[{i}].embedding is neither a list nor base64: {other}"),
    }
}

async fn embeddings_case(model: &str, format: Option<&str>) -> (Stack, Value) {
    let stack = Stack::start().await;
    let mut body = json!({"model": model, "input": ["alpha", "beta gamma"]});
    if let Some(f) = format {
        body["encoding_format"] = json!(f);
    }
    let reply = stack.gateway.post_json("/v1/embeddings", &body).await;
    let resp = reply.expect_status(200);
    assert!(
        reply.header("x-airlock-target").is_some(),
        "x-airlock-target missing"
    );
    assert_eq!(resp["object"], "list", "{resp}");
    let data = resp["data"].as_array().unwrap_or_else(|| panic!("{resp}"));
    assert_eq!(data.len(), 2, "{resp}");
    for (i, text) in ["alpha", "beta gamma"].iter().enumerate() {
        assert_eq!(data[i]["object"], "embedding", "{resp}");
        assert_eq!(data[i]["index"], i, "{resp}");
        match format {
            Some("base64") => assert!(data[i]["embedding"].is_string(), "base64 asked, got {resp}"),
            _ => assert!(
                data[i]["embedding"].is_array(),
                "floats expected, got {resp}"
            ),
        }
        assert_eq!(
            vector(&resp, i),
            fake_embedding(text),
            "embedding of {text:?}"
        );
    }
    assert!(resp["usage"]["prompt_tokens"].is_u64(), "{resp}");
    (stack, resp)
}

#[tokio::test]
async fn embeddings_openai_float() {
    let (stack, resp) = embeddings_case("embed", None).await;
    let rec = stack.openai.last_request();
    assert_eq!(rec.path, "/v1/embeddings");
    assert_eq!(rec.body_json()["model"], "text-embedding-3-small");
    assert_eq!(rec.body_json()["input"], json!(["alpha", "beta gamma"]));
    assert_eq!(resp["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn embeddings_openai_base64() {
    embeddings_case("embed", Some("base64")).await;
}

#[tokio::test]
async fn embeddings_openai_explicit_float() {
    embeddings_case("embed", Some("float")).await;
}

#[tokio::test]
async fn embeddings_gemini_float() {
    let (stack, _) = embeddings_case("gemini-embed", None).await;
    let rec = stack.gemini.last_request();
    assert_eq!(
        rec.path,
        "/v1beta/models/text-embedding-004:batchEmbedContents"
    );
    assert_eq!(rec.header("x-goog-api-key"), Some(stack.gemini.api_key()));
    let reqs = rec.body_json()["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(reqs.len(), 2, "{}", rec.body_json());
}

#[tokio::test]
async fn embeddings_gemini_base64() {
    embeddings_case("gemini-embed", Some("base64")).await;
}

#[tokio::test]
async fn embeddings_single_string_input() {
    let stack = Stack::start().await;
    for model in ["embed", "gemini-embed"] {
        let resp = stack
            .gateway
            .post_json(
                "/v1/embeddings",
                &json!({"model": model, "input": "just one"}),
            )
            .await
            .expect_status(200);
        assert_eq!(resp["data"].as_array().map(Vec::len), Some(1), "{resp}");
        assert_eq!(vector(&resp, 0), fake_embedding("just one"));
        assert_eq!(vector(&resp, 0).len(), EMBEDDING_DIMS);
    }
}

#[tokio::test]
async fn embeddings_anthropic_unsupported() {
    let stack = Stack::start().await;
    let reply = stack
        .gateway
        .post_json("/v1/embeddings", &json!({"model": "claude", "input": "x"}))
        .await;
    reply.expect_error(400, "unsupported_operation");
    assert_eq!(stack.anthropic.request_count(), 0);
}

#[tokio::test]
async fn completions_openai_passthrough() {
    let stack = Stack::start().await;
    let reply = stack
        .gateway
        .post_json(
            "/v1/completions",
            &json!({"model": "gpt", "prompt": "Say this is a test", "max_tokens": 20}),
        )
        .await;
    let resp = reply.expect_status(200);
    assert_eq!(reply.header("x-airlock-target"), Some("oai/gpt-4o-mini"));
    assert_eq!(resp["object"], "text_completion", "{resp}");
    assert_eq!(
        resp["choices"][0]["text"], "You said: Say this is a test",
        "{resp}"
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
    assert_eq!(
        resp["usage"]["total_tokens"],
        stack.openai.last_usage().total(),
        "{resp}"
    );
    let rec = stack.openai.last_request();
    assert_eq!(rec.path, "/v1/completions");
    assert_eq!(rec.body_json()["prompt"], "Say this is a test");
}

async fn completions_mapped(model: &str, upstream_path: &str, stack: &Stack) {
    let reply = stack
        .gateway
        .post_json(
            "/v1/completions",
            &json!({"model": model, "prompt": "Once upon a time", "max_tokens": 30}),
        )
        .await;
    let resp = reply.expect_status(200);
    assert_eq!(resp["object"], "text_completion", "{resp}");
    assert_eq!(
        resp["choices"][0]["text"], "You said: Once upon a time",
        "{resp}"
    );
    assert_eq!(resp["choices"][0]["index"], 0, "{resp}");
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
    assert!(
        resp["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{resp}"
    );
    let mock = if upstream_path.starts_with("/v1beta") {
        &stack.gemini
    } else {
        &stack.anthropic
    };
    let rec = mock.last_request();
    assert_eq!(rec.path, upstream_path);
    assert!(
        rec.body_json().to_string().contains("Once upon a time"),
        "{}",
        rec.body_json()
    );
    assert_eq!(
        resp["usage"]["prompt_tokens"],
        mock.last_usage().prompt,
        "{resp}"
    );
}

#[tokio::test]
async fn completions_anthropic_mapped_to_chat() {
    let stack = Stack::start().await;
    completions_mapped("claude", "/v1/messages", &stack).await;
    assert_eq!(stack.anthropic.last_request().body_json()["max_tokens"], 30);
}

#[tokio::test]
async fn completions_gemini_mapped_to_chat() {
    let stack = Stack::start().await;
    completions_mapped(
        "gemini",
        "/v1beta/models/gemini-2.0-flash:generateContent",
        &stack,
    )
    .await;
}

#[tokio::test]
async fn completions_openai_streamed() {
    let stack = Stack::start().await;
    let resp = stack
        .gateway
        .post_stream(
            "/v1/completions",
            &json!({"model": "gpt", "prompt": "one two", "stream": true}),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let t = SseTranscript::read(resp).await;
    assert!(t.done_is_last(), "{t}");
    assert_eq!(t.text(), "You said: one two", "{t}");
    assert!(
        t.payloads()
            .iter()
            .all(|p| p["object"] == "text_completion"),
        "{t}"
    );
    assert!(
        t.usage_chunks().is_empty(),
        "no usage chunk without include_usage: {t}"
    );
}

#[tokio::test]
async fn models_list_and_retrieve() {
    let stack = Stack::start().await;
    let resp = stack.gateway.get("/v1/models").await.expect_status(200);
    assert_eq!(resp["object"], "list", "{resp}");
    let data = resp["data"].as_array().unwrap_or_else(|| panic!("{resp}"));
    let ids: HashSet<&str> = data.iter().filter_map(|m| m["id"].as_str()).collect();
    for name in [
        "gpt",
        "claude",
        "gemini",
        "embed",
        "gemini-embed",
        "team/chat",
    ] {
        assert!(ids.contains(name), "{name} missing from /v1/models: {resp}");
    }
    for m in data {
        assert_eq!(m["object"], "model", "{m}");
        assert!(m["created"].is_u64(), "created must be an integer: {m}");
        assert!(m["owned_by"].is_string(), "owned_by must be a string: {m}");
    }
    // The list asks nothing of the upstreams.
    assert_eq!(stack.upstream_requests(), 0);

    for id in ["gpt", "team/chat"] {
        let m = stack
            .gateway
            .get(&format!("/v1/models/{id}"))
            .await
            .expect_status(200);
        assert_eq!(m["id"], id, "{m}");
        assert_eq!(m["object"], "model", "{m}");
    }
    // Percent-encoded slash, as SDKs that encode path segments send it.
    let m = stack
        .gateway
        .get("/v1/models/team%2Fchat")
        .await
        .expect_status(200);
    assert_eq!(m["id"], "team/chat", "{m}");

    stack
        .gateway
        .get("/v1/models/no-such-model")
        .await
        .expect_error(404, "model_not_found");
    stack
        .gateway
        .get("/v1/models/nope/deeper")
        .await
        .expect_error(404, "model_not_found");
}

#[tokio::test]
async fn health_and_ready_need_no_key() {
    let stack = Stack::start().await;
    let anon = stack.gateway.anon_client();
    for path in ["/health", "/ready"] {
        let resp = anon.get(stack.gateway.url(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        assert!(
            resp.headers().contains_key("x-airlock-request-id"),
            "{path}"
        );
    }
}

/// `(labels, value)` of every sample of `name` in Prometheus text.
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, v) = r.split_once('}')?;
                (labels.to_string(), v)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                return None;
            };
            Some((labels, value.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

fn has_label(labels: &str, key: &str, value: &str) -> bool {
    labels
        .split(',')
        .any(|kv| kv.trim() == format!("{key}=\"{value}\""))
}

#[tokio::test]
async fn metrics_count_requests() {
    let stack = Stack::start().await;
    let gw = &stack.gateway;
    for _ in 0..2 {
        gw.post_json("/v1/chat/completions", &chat("gpt", "count me"))
            .await
            .expect_status(200);
    }
    let t = SseTranscript::read(
        gw.post_stream(
            "/v1/chat/completions",
            &chat_stream("claude", "me too", false),
        )
        .await,
    )
    .await;
    assert!(t.done_is_last(), "{t}");
    gw.post_json("/v1/chat/completions", &chat("missing-model", "x"))
        .await
        .expect_error(404, "model_not_found");

    // Metrics need the key unless metrics_open.
    let anon = gw
        .anon_client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        HttpReply::read(anon).await.error_code().as_deref(),
        Some("invalid_api_key")
    );

    let reply = gw.get("/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let ct = reply.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain"),
        "Prometheus text content-type, got {ct:?}"
    );
    let all = samples(&reply.text, "airlock_requests_total");
    assert!(
        !all.is_empty(),
        "airlock_requests_total missing:\n{}",
        reply.text
    );
    for (labels, _) in &all {
        for key in ["route", "model", "target", "status"] {
            assert!(
                labels.contains(&format!("{key}=\"")),
                "label {key} missing in {{{labels}}}"
            );
        }
    }
    let find = |model: &str, target: &str, status: &str| -> f64 {
        all.iter()
            .filter(|(l, _)| has_label(l, "model", model) && has_label(l, "status", status))
            .filter(|(l, _)| has_label(l, "target", target))
            .filter(|(l, _)| l.contains("chat"))
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(
        find("gpt", "oai/gpt-4o-mini", "200"),
        2.0,
        "gpt 200s:\n{}",
        reply.text
    );
    assert_eq!(
        find("claude", "ant/claude-3-5-haiku-latest", "200"),
        1.0,
        "claude 200s:\n{}",
        reply.text
    );
    // An unknown model is counted too; its label value is the gateway's choice (client
    // input must not mint label values), so only route and status are checked.
    let not_found: f64 = all
        .iter()
        .filter(|(l, _)| has_label(l, "status", "404") && l.contains("chat"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(not_found, 1.0, "404 for the unknown model:\n{}", reply.text);

    // Counting goes on.
    gw.post_json("/v1/chat/completions", &chat("gpt", "again"))
        .await
        .expect_status(200);
    let again = gw.get("/metrics").await;
    let all = samples(&again.text, "airlock_requests_total");
    let gpt: f64 = all
        .iter()
        .filter(|(l, _)| {
            has_label(l, "model", "gpt") && has_label(l, "status", "200") && l.contains("chat")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(gpt, 3.0, "{}", again.text);
}

#[tokio::test]
async fn metrics_open_needs_no_key() {
    let stack = Stack::start_with(|b| b.server("metrics_open", "true")).await;
    let gw = &stack.gateway;
    let resp = gw
        .anon_client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap();
    let reply = HttpReply::read(resp).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    // Other routes still need the key.
    let resp = gw
        .anon_client()
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn every_response_has_a_request_id() {
    let stack = Stack::start().await;
    let gw = &stack.gateway;
    let anon = gw.anon_client();
    let mut replies: Vec<(String, HttpReply)> = Vec::new();
    replies.push((
        "chat 200".into(),
        gw.post_json("/v1/chat/completions", &chat("gpt", "id please"))
            .await,
    ));
    replies.push((
        "chat 404".into(),
        gw.post_json("/v1/chat/completions", &chat("nope", "x"))
            .await,
    ));
    replies.push((
        "chat 400".into(),
        gw.post_json("/v1/chat/completions", &json!({"model": "gpt"}))
            .await,
    ));
    replies.push(("unknown url".into(), gw.get("/v1/nothing-here").await));
    replies.push(("models".into(), gw.get("/v1/models").await));
    replies.push(("metrics".into(), gw.get("/metrics").await));
    replies.push((
        "no key".into(),
        HttpReply::read(anon.get(gw.url("/v1/models")).send().await.unwrap()).await,
    ));
    replies.push((
        "health".into(),
        HttpReply::read(anon.get(gw.url("/health")).send().await.unwrap()).await,
    ));
    replies.push((
        "wrong method".into(),
        HttpReply::read(
            gw.client()
                .get(gw.url("/v1/chat/completions"))
                .send()
                .await
                .unwrap(),
        )
        .await,
    ));
    replies.push((
        "bad json".into(),
        HttpReply::read(
            gw.client()
                .post(gw.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body("{")
                .send()
                .await
                .unwrap(),
        )
        .await,
    ));
    stack.openai.fail_next(airlock_e2e::Fault::Status(500));
    replies.push((
        "upstream 5xx".into(),
        gw.post_json("/v1/chat/completions", &chat("gpt", "x"))
            .await,
    ));
    let stream = gw
        .post_stream("/v1/chat/completions", &chat_stream("gpt", "x", false))
        .await;
    let stream_id = stream
        .headers()
        .get("x-airlock-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert!(
        stream_id.is_some(),
        "streamed response without x-airlock-request-id"
    );

    let mut seen = HashSet::new();
    for (what, r) in &replies {
        let id = r
            .header("x-airlock-request-id")
            .unwrap_or_else(|| panic!("{what}: no x-airlock-request-id (status {})", r.status));
        assert!(!id.is_empty(), "{what}: empty request id");
        assert!(
            seen.insert(id.to_string()),
            "{what}: request id {id} repeated"
        );
    }
    assert!(
        seen.insert(stream_id.unwrap_or_default()),
        "stream request id repeated"
    );
}
