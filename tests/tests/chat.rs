//! `POST /v1/chat/completions` through each provider kind: plain, streamed, with tools
//! and a tool-result turn; what reaches the upstream in its own format, and what comes
//! back in OpenAI's.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use airlock_e2e::mock::anthropic::TOOL_PREAMBLE;
use airlock_e2e::mock::{Fault, ProviderKind, RecordedRequest};
use airlock_e2e::sse::SseTranscript;
use airlock_e2e::stack::{chat, chat_stream, weather_tools, wiring, Stack};
use serde_json::{json, Value};

airlock_e2e::per_provider!(
    plain_chat,
    multi_turn_roles,
    max_tokens_cut,
    streamed_chat,
    streamed_chat_with_usage,
    tool_call_round_trip,
    streamed_tool_call,
    tool_choice_names_function,
    direct_target_model,
    fragmented_unicode_stream,
    common_params_map,
);

/// Text of the whole message list a mock received, per format.
fn upstream_messages(kind: ProviderKind, rec: &RecordedRequest) -> Vec<Value> {
    let body = rec.body_json();
    let key = match kind {
        ProviderKind::Gemini => "contents",
        _ => "messages",
    };
    body[key]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("upstream body has no {key}: {body}"))
}

/// The role names the upstream saw, in order.
fn upstream_roles(kind: ProviderKind, rec: &RecordedRequest) -> Vec<String> {
    upstream_messages(kind, rec)
        .iter()
        .map(|m| m["role"].as_str().unwrap_or("(none)").to_string())
        .collect()
}

fn assert_usage_matches(usage: &Value, mock_usage: airlock_e2e::mock::Usage, ctx: &str) {
    assert_eq!(
        usage["prompt_tokens"], mock_usage.prompt,
        "prompt_tokens ({ctx}): {usage}"
    );
    assert_eq!(
        usage["completion_tokens"], mock_usage.completion,
        "completion_tokens ({ctx}): {usage}"
    );
    assert_eq!(
        usage["total_tokens"],
        mock_usage.total(),
        "total_tokens ({ctx}): {usage}"
    );
}

async fn plain_chat(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let body = json!({
        "model": w.model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "temperature": 0.5,
        "max_tokens": 50,
    });
    let reply = stack.gateway.post_json("/v1/chat/completions", &body).await;
    let resp = reply.expect_status(200);
    assert_eq!(reply.header("x-airlock-target"), Some(w.target().as_str()));
    assert!(reply
        .header("x-airlock-request-id")
        .is_some_and(|v| !v.is_empty()));
    assert_eq!(resp["object"], "chat.completion", "{resp}");
    assert!(resp["id"].as_str().is_some_and(|s| !s.is_empty()), "{resp}");
    assert!(resp["created"].is_u64(), "{resp}");
    assert!(resp["model"].is_string(), "{resp}");
    let choice = &resp["choices"][0];
    assert_eq!(choice["index"], 0, "{resp}");
    assert_eq!(choice["message"]["role"], "assistant", "{resp}");
    assert_eq!(
        choice["message"]["content"], "You said: What is the capital of France?",
        "{resp}"
    );
    assert_eq!(choice["finish_reason"], "stop", "{resp}");
    let mock = stack.mock(kind);
    assert_eq!(mock.request_count(), 1);
    assert_usage_matches(&resp["usage"], mock.last_usage(), "plain");

    let rec = mock.last_request();
    let up = rec.body_json();
    match kind {
        ProviderKind::OpenAi => {
            assert_eq!(rec.path, "/v1/chat/completions");
            assert_eq!(
                rec.header("authorization"),
                Some(format!("Bearer {}", mock.api_key()).as_str())
            );
            assert_eq!(up["model"], "gpt-4o-mini", "{up}");
            assert_eq!(up["temperature"], 0.5, "{up}");
            let max = up
                .get("max_tokens")
                .or_else(|| up.get("max_completion_tokens"));
            assert_eq!(max, Some(&json!(50)), "{up}");
            assert_eq!(upstream_roles(kind, &rec), ["system", "user"]);
        }
        ProviderKind::Anthropic => {
            assert_eq!(rec.path, "/v1/messages");
            assert_eq!(rec.header("x-api-key"), Some(mock.api_key()));
            assert!(
                rec.header("anthropic-version").is_some(),
                "anthropic-version header missing"
            );
            assert_eq!(up["model"], "claude-3-5-haiku-latest", "{up}");
            assert_eq!(up["max_tokens"], 50, "{up}");
            assert_eq!(up["temperature"], 0.5, "{up}");
            assert!(
                up["system"].to_string().contains("Be brief."),
                "system prompt not in `system`: {up}"
            );
            assert_eq!(upstream_roles(kind, &rec), ["user"]);
        }
        ProviderKind::Gemini => {
            assert_eq!(rec.path, "/v1beta/models/gemini-2.0-flash:generateContent");
            assert_eq!(rec.header("x-goog-api-key"), Some(mock.api_key()));
            let sys = up
                .get("systemInstruction")
                .or_else(|| up.get("system_instruction"));
            assert!(
                sys.is_some_and(|s| s.to_string().contains("Be brief.")),
                "system prompt not in systemInstruction: {up}"
            );
            let cfg = up
                .get("generationConfig")
                .or_else(|| up.get("generation_config"))
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                cfg.get("maxOutputTokens")
                    .or_else(|| cfg.get("max_output_tokens")),
                Some(&json!(50)),
                "{up}"
            );
            assert_eq!(cfg["temperature"], 0.5, "{up}");
            assert_eq!(upstream_roles(kind, &rec), ["user"]);
        }
    }
}

async fn multi_turn_roles(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let body = json!({"model": w.model, "messages": [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]}
    ]});
    let resp = stack
        .gateway
        .post_json("/v1/chat/completions", &body)
        .await
        .expect_status(200);
    assert_eq!(
        resp["choices"][0]["message"]["content"], "You said: What is my name?",
        "{resp}"
    );
    let rec = stack.mock(kind).last_request();
    let expected: &[&str] = match kind {
        ProviderKind::Gemini => &["user", "model", "user"],
        _ => &["user", "assistant", "user"],
    };
    assert_eq!(upstream_roles(kind, &rec), expected, "{}", rec.body_json());
    let all = rec.body_json().to_string();
    for text in ["My name is Ada.", "Hello Ada.", "What is my name?"] {
        assert!(
            all.contains(text),
            "{text:?} did not reach the upstream: {all}"
        );
    }
}

async fn max_tokens_cut(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let mut body = chat(w.model, "tell me a long story please");
    body["max_tokens"] = json!(2);
    let resp = stack
        .gateway
        .post_json("/v1/chat/completions", &body)
        .await
        .expect_status(200);
    assert_eq!(
        resp["choices"][0]["message"]["content"], "You said:",
        "{resp}"
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "length", "{resp}");
    assert_eq!(resp["usage"]["completion_tokens"], 2, "{resp}");
}

async fn streamed_chat(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let resp = stack
        .gateway
        .post_stream(
            "/v1/chat/completions",
            &chat_stream(w.model, "stream me five words now", false),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("x-airlock-target")
            .and_then(|v| v.to_str().ok()),
        Some(w.target().as_str())
    );
    assert!(resp.headers().contains_key("x-airlock-request-id"));
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
    let t = SseTranscript::read(resp).await;
    assert!(t.transport_error.is_none() && !t.timed_out, "{t}");
    assert!(t.done_is_last(), "[DONE] must be the last event, once: {t}");
    assert!(t.errors().is_empty(), "{t}");
    assert_eq!(t.text(), "You said: stream me five words now", "{t}");
    assert_eq!(t.finish_reason().as_deref(), Some("stop"), "{t}");
    let chunks = t.chunks();
    assert_eq!(
        chunks.len(),
        t.payloads().len(),
        "every payload is a chat.completion.chunk: {t}"
    );
    assert!(chunks.len() >= 3, "the text arrives in several chunks: {t}");
    let ids: std::collections::HashSet<String> =
        chunks.iter().map(|c| c["id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "all chunks share one id: {t}");
    assert!(
        t.usage_chunks().is_empty(),
        "no usage chunk without include_usage: {t}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())),
        "no empty-choices chunk without include_usage: {t}"
    );
    let first_role = chunks.iter().find_map(|c| {
        c.pointer("/choices/0/delta/role")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    assert_eq!(first_role.as_deref(), Some("assistant"), "{t}");

    let rec = stack.mock(kind).last_request();
    let up = rec.body_json();
    match kind {
        ProviderKind::OpenAi => {
            assert_eq!(up["stream"], true, "{up}");
            assert_eq!(
                up["stream_options"]["include_usage"], true,
                "the gateway always asks for usage: {up}"
            );
        }
        ProviderKind::Anthropic => assert_eq!(up["stream"], true, "{up}"),
        ProviderKind::Gemini => {
            assert_eq!(
                rec.path,
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
            );
            assert!(
                rec.query
                    .as_deref()
                    .unwrap_or("")
                    .split('&')
                    .any(|kv| kv == "alt=sse"),
                "query {:?}",
                rec.query
            );
        }
    }
}

async fn streamed_chat_with_usage(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let resp = stack
        .gateway
        .post_stream(
            "/v1/chat/completions",
            &chat_stream(w.model, "count these tokens", true),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let t = SseTranscript::read(resp).await;
    assert!(t.done_is_last(), "{t}");
    assert_eq!(t.text(), "You said: count these tokens", "{t}");
    let usage = t.usage_chunks();
    assert_eq!(usage.len(), 1, "exactly one usage chunk: {t}");
    assert_eq!(
        usage[0]["choices"],
        json!([]),
        "the usage chunk has empty choices: {t}"
    );
    assert_usage_matches(&usage[0]["usage"], stack.mock(kind).last_usage(), "stream");
    let payloads = t.payloads();
    assert_eq!(
        payloads.last(),
        Some(&usage[0]),
        "the usage chunk comes last before [DONE]: {t}"
    );
}

async fn tool_call_round_trip(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let mock = stack.mock(kind);
    let question = "What is the weather in Paris?";
    let mut body = chat(w.model, question);
    body["tools"] = weather_tools();
    let resp = stack
        .gateway
        .post_json("/v1/chat/completions", &body)
        .await
        .expect_status(200);
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{resp}");
    let msg = &choice["message"];
    assert_eq!(msg["role"], "assistant", "{resp}");
    let calls = msg["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {resp}"));
    assert_eq!(calls.len(), 1, "{resp}");
    let call = &calls[0];
    let id = call["id"]
        .as_str()
        .unwrap_or_else(|| panic!("tool call without id: {resp}"))
        .to_string();
    assert!(!id.is_empty());
    assert_eq!(call["type"], "function", "{resp}");
    assert_eq!(call["function"]["name"], "get_weather", "{resp}");
    let args_text = call["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("arguments must be a JSON string: {resp}"));
    let args: Value = serde_json::from_str(args_text)
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {args_text}"));
    assert_eq!(args, json!({"query": question}));
    if kind == ProviderKind::Anthropic {
        assert_eq!(
            msg["content"], TOOL_PREAMBLE,
            "text before tool_use must survive: {resp}"
        );
    }
    assert!(
        resp["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{resp}"
    );

    // The tool definitions reached the upstream in its format.
    let first = mock.last_request();
    let up = first.body_json();
    match kind {
        ProviderKind::OpenAi => assert_eq!(up["tools"], weather_tools(), "{up}"),
        ProviderKind::Anthropic => {
            assert_eq!(up["tools"][0]["name"], "get_weather", "{up}");
            assert_eq!(
                up["tools"][0]["input_schema"],
                weather_tools()[0]["function"]["parameters"],
                "{up}"
            );
            assert_eq!(
                up["tools"][0]["description"], "Current weather for a place",
                "{up}"
            );
        }
        ProviderKind::Gemini => {
            let decls: Vec<Value> = up["tools"]
                .as_array()
                .unwrap_or_else(|| panic!("no tools: {up}"))
                .iter()
                .flat_map(|t| {
                    t.get("functionDeclarations")
                        .or_else(|| t.get("function_declarations"))
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .collect();
            let names: Vec<&str> = decls.iter().filter_map(|d| d["name"].as_str()).collect();
            assert_eq!(names, ["get_weather", "get_time"], "{up}");
            // Either the OpenAPI-subset `parameters` or the full `parametersJsonSchema`.
            let params = [
                "parameters",
                "parametersJsonSchema",
                "parameters_json_schema",
            ]
            .iter()
            .find_map(|k| decls[0].get(*k));
            assert_eq!(
                params,
                Some(&weather_tools()[0]["function"]["parameters"]),
                "{up}"
            );
        }
    }

    // Second turn: the tool result goes back.
    let body2 = json!({
        "model": w.model,
        "tools": weather_tools(),
        "messages": [
            {"role": "user", "content": question},
            msg,
            {"role": "tool", "tool_call_id": id, "content": "sunny, 21 C"}
        ]
    });
    let resp2 = stack
        .gateway
        .post_json("/v1/chat/completions", &body2)
        .await
        .expect_status(200);
    let text = resp2["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.starts_with("Tool result:") && text.contains("sunny, 21 C"),
        "{resp2}"
    );
    assert_eq!(resp2["choices"][0]["finish_reason"], "stop", "{resp2}");

    let rec = mock.last_request();
    let msgs = upstream_messages(kind, &rec);
    match kind {
        ProviderKind::OpenAi => {
            assert_eq!(msgs[1]["tool_calls"][0]["id"], id.as_str(), "{msgs:?}");
            assert_eq!(msgs[2]["role"], "tool");
            assert_eq!(msgs[2]["tool_call_id"], id.as_str());
            assert_eq!(msgs[2]["content"], "sunny, 21 C");
        }
        ProviderKind::Anthropic => {
            assert_eq!(msgs.len(), 3, "{msgs:?}");
            assert_eq!(msgs[1]["role"], "assistant");
            let tool_use = msgs[1]["content"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["type"] == "tool_use"))
                .unwrap_or_else(|| panic!("no tool_use block in the assistant turn: {msgs:?}"));
            assert_eq!(tool_use["id"], id.as_str());
            assert_eq!(tool_use["name"], "get_weather");
            assert_eq!(tool_use["input"], json!({"query": question}));
            assert_eq!(msgs[2]["role"], "user");
            let result = msgs[2]["content"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["type"] == "tool_result"))
                .unwrap_or_else(|| panic!("no tool_result block in the user turn: {msgs:?}"));
            assert_eq!(result["tool_use_id"], id.as_str());
            assert!(
                result["content"].to_string().contains("sunny, 21 C"),
                "{result}"
            );
        }
        ProviderKind::Gemini => {
            assert_eq!(msgs.len(), 3, "{msgs:?}");
            assert_eq!(msgs[1]["role"], "model");
            let call = msgs[1]["parts"]
                .as_array()
                .and_then(|p| {
                    p.iter()
                        .find_map(|p| p.get("functionCall").or_else(|| p.get("function_call")))
                })
                .unwrap_or_else(|| panic!("no functionCall in the model turn: {msgs:?}"));
            assert_eq!(call["name"], "get_weather");
            assert_eq!(call["args"], json!({"query": question}));
            let fr = msgs[2]["parts"]
                .as_array()
                .and_then(|p| {
                    p.iter().find_map(|p| {
                        p.get("functionResponse")
                            .or_else(|| p.get("function_response"))
                    })
                })
                .unwrap_or_else(|| panic!("no functionResponse in the last turn: {msgs:?}"));
            assert_eq!(
                fr["name"], "get_weather",
                "the result is mapped back to the function by name"
            );
            assert!(fr["response"].is_object(), "{fr}");
            assert!(fr["response"].to_string().contains("sunny, 21 C"), "{fr}");
        }
    }
}

async fn streamed_tool_call(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let mut body = chat_stream(w.model, "Weather in Oslo?", false);
    body["tools"] = weather_tools();
    let resp = stack
        .gateway
        .post_stream("/v1/chat/completions", &body)
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let t = SseTranscript::read(resp).await;
    assert!(t.done_is_last(), "{t}");
    let calls = t.tool_calls();
    assert_eq!(calls.len(), 1, "{t}");
    assert!(!calls[0].id.is_empty(), "{t}");
    assert_eq!(calls[0].name, "get_weather", "{t}");
    let args: Value = serde_json::from_str(&calls[0].arguments).unwrap_or_else(|e| {
        panic!(
            "reassembled arguments are not JSON ({e}): {:?}\n{t}",
            calls[0].arguments
        )
    });
    assert_eq!(args, json!({"query": "Weather in Oslo?"}));
    assert_eq!(t.finish_reason().as_deref(), Some("tool_calls"), "{t}");
    for c in t.chunks() {
        for tc in c
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            assert!(
                tc["index"].is_u64(),
                "every tool_calls delta has an index: {t}"
            );
        }
    }
}

async fn tool_choice_names_function(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let mut body = chat(w.model, "What time is it in Lima?");
    body["tools"] = weather_tools();
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let resp = stack
        .gateway
        .post_json("/v1/chat/completions", &body)
        .await
        .expect_status(200);
    assert_eq!(
        resp["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_time",
        "{resp}"
    );
}

async fn direct_target_model(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let target = w.target();
    let reply = stack
        .gateway
        .post_json("/v1/chat/completions", &chat(&target, "direct please"))
        .await;
    let resp = reply.expect_status(200);
    assert_eq!(reply.header("x-airlock-target"), Some(target.as_str()));
    assert_eq!(
        resp["choices"][0]["message"]["content"], "You said: direct please",
        "{resp}"
    );
    let up = stack.mock(kind).last_request();
    match kind {
        ProviderKind::Gemini => assert_eq!(
            up.path,
            format!("/v1beta/models/{}:generateContent", w.upstream_model)
        ),
        _ => assert_eq!(up.body_json()["model"], w.upstream_model),
    }
}

#[tokio::test]
async fn model_name_with_slash_routes() {
    let stack = Stack::start().await;
    let reply = stack
        .gateway
        .post_json("/v1/chat/completions", &chat("team/chat", "slash"))
        .await;
    reply.expect_status(200);
    assert_eq!(reply.header("x-airlock-target"), Some("oai/gpt-4o-mini"));
}

#[tokio::test]
async fn n_choices_openai() {
    let stack = Stack::start().await;
    let mut body = chat("gpt", "twice");
    body["n"] = json!(2);
    let resp = stack
        .gateway
        .post_json("/v1/chat/completions", &body)
        .await
        .expect_status(200);
    let choices = resp["choices"]
        .as_array()
        .unwrap_or_else(|| panic!("{resp}"));
    assert_eq!(choices.len(), 2, "{resp}");
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(stack.openai.last_request().body_json()["n"], 2);
}

async fn fragmented_unicode_stream(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    // Upstream events arrive in 7-byte pieces: events and multi-byte characters split.
    stack.mock(kind).fail_next(Fault::Fragmented);
    let text = "héllo wörld 世界 🚀 naïve café";
    let resp = stack
        .gateway
        .post_stream("/v1/chat/completions", &chat_stream(w.model, text, true))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let t = SseTranscript::read(resp).await;
    assert!(t.done_is_last(), "{t}");
    assert!(t.errors().is_empty(), "{t}");
    assert_eq!(t.text(), format!("You said: {text}"), "{t}");
    assert_eq!(t.usage_chunks().len(), 1, "{t}");
}

async fn common_params_map(kind: ProviderKind) {
    let stack = Stack::start().await;
    let w = wiring(kind);
    let mut body = chat(w.model, "params please");
    body["stop"] = json!(["END"]);
    body["top_p"] = json!(0.9);
    body["user"] = json!("user-42");
    let reply = stack.gateway.post_json("/v1/chat/completions", &body).await;
    reply.expect_status(200);
    let up = stack.mock(kind).last_request().body_json().clone();
    match kind {
        ProviderKind::OpenAi => {
            assert_eq!(up["stop"], json!(["END"]), "{up}");
            assert_eq!(up["top_p"], 0.9, "{up}");
        }
        ProviderKind::Anthropic => {
            assert_eq!(up["stop_sequences"], json!(["END"]), "{up}");
            assert_eq!(up["top_p"], 0.9, "{up}");
        }
        ProviderKind::Gemini => {
            let cfg = up
                .get("generationConfig")
                .or_else(|| up.get("generation_config"))
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                cfg.get("stopSequences")
                    .or_else(|| cfg.get("stop_sequences")),
                Some(&json!(["END"])),
                "{up}"
            );
            assert_eq!(
                cfg.get("topP").or_else(|| cfg.get("top_p")),
                Some(&json!(0.9)),
                "{up}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_all_succeed() {
    let stack = std::sync::Arc::new(Stack::start().await);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let stack = stack.clone();
        tasks.push(tokio::spawn(async move {
            let model = ["gpt", "claude", "gemini"][i % 3];
            let text = format!("request number {i}");
            if i % 2 == 0 {
                let resp = stack
                    .gateway
                    .post_json("/v1/chat/completions", &chat(model, &text))
                    .await
                    .expect_status(200);
                assert_eq!(
                    resp["choices"][0]["message"]["content"],
                    format!("You said: {text}")
                );
            } else {
                let resp = stack
                    .gateway
                    .post_stream("/v1/chat/completions", &chat_stream(model, &text, false))
                    .await;
                let t = SseTranscript::read(resp).await;
                assert!(t.done_is_last(), "{t}");
                assert_eq!(t.text(), format!("You said: {text}"), "{t}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(stack.upstream_requests(), 24);
}
