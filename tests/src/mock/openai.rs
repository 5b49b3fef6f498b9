//! The OpenAI-compatible mock: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/models`.
//!
//! Checks what the real API checks and a gateway could get wrong: `Authorization:
//! Bearer <key>`, a model, a non-empty `messages` list with known roles, every `tool`
//! message answering a `tool_calls` id of the assistant turn before it, and
//! `stream_options` only together with `stream: true`. Streams follow the real framing:
//! a role chunk, content (or tool-call argument) deltas, a finish chunk, then, only when
//! `stream_options.include_usage` is true, a chunk with empty `choices` and `usage`, and
//! `data: [DONE]`; with `include_usage` every earlier chunk has `"usage": null`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Response, Uri};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};

use super::{
    count_words, embedding_to_base64, error_response, fake_embedding, header_is, json_ok,
    limit_words, parse_body, reply_text, respond, split_in, stream_pieces, text_of,
    tool_result_reply, MockState, Reply, Usage,
};

const CREATED: u64 = 1_700_000_000;

pub(crate) fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .with_state(state)
}

/// The error body OpenAI sends for `status`.
pub fn error_body(status: u16, message: &str) -> Value {
    let (ty, code) = match status {
        401 => ("invalid_request_error", json!("invalid_api_key")),
        404 => ("invalid_request_error", json!("model_not_found")),
        429 => ("requests", json!("rate_limit_exceeded")),
        s if s >= 500 => ("server_error", Value::Null),
        _ => ("invalid_request_error", Value::Null),
    };
    json!({"error": {"message": message, "type": ty, "param": null, "code": code}})
}

fn bad_request(message: &str, param: Option<&str>) -> Response<Body> {
    error_response(
        400,
        json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}}),
    )
}

async fn not_found(method: Method, uri: Uri) -> Response<Body> {
    error_response(
        404,
        error_body(404, &format!("Invalid URL ({method} {})", uri.path())),
    )
}

fn check_auth(st: &MockState, headers: &HeaderMap) -> Result<(), Response<Body>> {
    if header_is(
        headers,
        "authorization",
        &format!("Bearer {}", st.api_key()),
    ) {
        Ok(())
    } else {
        Err(error_response(
            401,
            error_body(401, "Incorrect API key provided."),
        ))
    }
}

fn check_stream_options(req: &Value) -> Result<bool, Response<Body>> {
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if req.get("stream_options").is_some_and(|v| !v.is_null()) && !stream {
        return Err(bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
        ));
    }
    Ok(stream)
}

fn include_usage(req: &Value) -> bool {
    req.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn max_tokens(req: &Value) -> Option<u64> {
    req.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| req.get("max_tokens").and_then(Value::as_u64))
}

/// What the assistant turn will be.
enum Answer {
    Text {
        text: String,
        cut: bool,
    },
    Tool {
        id: String,
        name: String,
        arguments: String,
    },
}

fn validate_messages(messages: &[Value]) -> Result<(), Response<Body>> {
    if messages.is_empty() {
        return Err(bad_request(
            "[] is too short - 'messages'",
            Some("messages"),
        ));
    }
    let mut open_calls: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        match role {
            "system" | "developer" | "user" => open_calls.clear(),
            "assistant" => {
                open_calls.clear();
                if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                    for c in calls {
                        let args = c.pointer("/function/arguments");
                        if c.get("id").and_then(Value::as_str).is_none()
                            || c.pointer("/function/name").and_then(Value::as_str).is_none()
                            || !args.is_some_and(Value::is_string)
                        {
                            return Err(bad_request(
                                "tool_calls entries need id, function.name and function.arguments (a string)",
                                Some(&format!("messages.[{i}].tool_calls")),
                            ));
                        }
                        open_calls.push(c["id"].as_str().unwrap_or_default().to_string());
                    }
                }
            }
            "tool" => {
                let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
                if !open_calls.iter().any(|c| c == id) {
                    return Err(bad_request(
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
                        Some(&format!("messages.[{i}].role")),
                    ));
                }
            }
            other => {
                return Err(bad_request(
                    &format!("Invalid value: '{other}'. Supported values are: 'system', 'assistant', 'user', 'tool', 'function' and 'developer'."),
                    Some(&format!("messages[{i}].role")),
                ))
            }
        }
    }
    Ok(())
}

async fn chat(State(st): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response<Body> {
    let fault = st.take_fault(&headers);
    if let Err(r) = check_auth(&st, &headers) {
        return r;
    }
    let req = match parse_body(&body, error_body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_string) else {
        return bad_request("you must provide a model parameter", None);
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return bad_request("Missing required parameter: 'messages'.", Some("messages"));
    };
    if let Err(r) = validate_messages(messages) {
        return r;
    }
    let stream = match check_stream_options(&req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for t in &tools {
        if t.get("type").and_then(Value::as_str) != Some("function")
            || t.pointer("/function/name")
                .and_then(Value::as_str)
                .is_none()
        {
            return bad_request(
                "tools entries must be {type: function, function: {name, ...}}",
                Some("tools"),
            );
        }
    }
    let n = req.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);

    let prompt_words: u64 = messages
        .iter()
        .map(|m| count_words(&text_of(&m["content"])))
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let tool_choice_none = req.get("tool_choice").and_then(Value::as_str) == Some("none");
    let id_n = st.next_id();
    let answer = if last["role"] == "tool" {
        let (text, cut) = limit_words(
            &tool_result_reply(&text_of(&last["content"])),
            max_tokens(&req),
        );
        Answer::Text { text, cut }
    } else if !tools.is_empty() && !tool_choice_none {
        let name = req
            .pointer("/tool_choice/function/name")
            .and_then(Value::as_str)
            .or_else(|| tools[0].pointer("/function/name").and_then(Value::as_str))
            .unwrap_or("tool")
            .to_string();
        Answer::Tool {
            id: format!("call_mock_{id_n}"),
            name,
            arguments: json!({"query": last_user}).to_string(),
        }
    } else {
        let (text, cut) = limit_words(&reply_text(&last_user), max_tokens(&req));
        Answer::Text { text, cut }
    };
    let completion = match &answer {
        Answer::Text { text, .. } => count_words(text),
        Answer::Tool { arguments, .. } => count_words(arguments),
    };
    let usage = Usage {
        prompt: prompt_words,
        completion: st.completion_tokens(completion * n, max_tokens(&req)),
    };
    st.record_usage(usage);
    let usage_json = json!({
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.total(),
    });
    let id = format!("chatcmpl-mock-{id_n}");

    let reply = if stream {
        let with_usage = include_usage(&req);
        let chunk = |choices: Value| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED,
                "model": model, "system_fingerprint": "fp_mock", "choices": choices,
            });
            if with_usage {
                c["usage"] = Value::Null;
            }
            format!("data: {c}\n\n")
        };
        let mut frames = Vec::new();
        for i in 0..n {
            match &answer {
                Answer::Text { text, cut } => {
                    frames.push(chunk(json!([{"index": i, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}])));
                    for p in stream_pieces(text) {
                        frames.push(chunk(json!([{"index": i, "delta": {"content": p}, "logprobs": null, "finish_reason": null}])));
                    }
                    let finish = if *cut { "length" } else { "stop" };
                    frames.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}])));
                }
                Answer::Tool {
                    id: call_id,
                    name,
                    arguments,
                } => {
                    frames.push(chunk(json!([{"index": i, "delta": {"role": "assistant", "content": null, "tool_calls": [
                        {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                    ]}, "logprobs": null, "finish_reason": null}])));
                    for p in split_in(arguments, 3) {
                        frames.push(chunk(json!([{"index": i, "delta": {"tool_calls": [
                            {"index": 0, "function": {"arguments": p}}
                        ]}, "logprobs": null, "finish_reason": null}])));
                    }
                    frames.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}])));
                }
            }
        }
        if with_usage {
            let c = json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED,
                "model": model, "system_fingerprint": "fp_mock", "choices": [], "usage": usage_json,
            });
            frames.push(format!("data: {c}\n\n"));
        }
        frames.push("data: [DONE]\n\n".to_string());
        Reply::Sse(frames)
    } else {
        let choices: Vec<Value> = (0..n)
            .map(|i| match &answer {
                Answer::Text { text, cut } => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": if *cut { "length" } else { "stop" },
                }),
                Answer::Tool { id: call_id, name, arguments } => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                    ]},
                    "logprobs": null,
                    "finish_reason": "tool_calls",
                }),
            })
            .collect();
        Reply::Json(json!({
            "id": id, "object": "chat.completion", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock", "choices": choices, "usage": usage_json,
        }))
    };
    respond(fault, reply, error_body).await
}

async fn completions(
    State(st): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let fault = st.take_fault(&headers);
    if let Err(r) = check_auth(&st, &headers) {
        return r;
    }
    let req = match parse_body(&body, error_body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_string) else {
        return bad_request("you must provide a model parameter", None);
    };
    let prompt = match req.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && !items.is_empty() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        _ => return bad_request("Missing or invalid 'prompt'.", Some("prompt")),
    };
    let stream = match check_stream_options(&req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    // The legacy endpoint's default max_tokens is 16.
    let max = req.get("max_tokens").and_then(Value::as_u64).or(Some(16));
    let (text, cut) = limit_words(&reply_text(&prompt), max);
    let usage = Usage {
        prompt: count_words(&prompt),
        completion: count_words(&text),
    };
    st.record_usage(usage);
    let usage_json = json!({
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.total(),
    });
    let id = format!("cmpl-mock-{}", st.next_id());
    let finish = if cut { "length" } else { "stop" };
    let reply = if stream {
        let with_usage = include_usage(&req);
        let mut frames = Vec::new();
        let pieces = stream_pieces(&text);
        let last = pieces.len().saturating_sub(1);
        for (i, p) in pieces.iter().enumerate() {
            let mut c = json!({
                "id": id, "object": "text_completion", "created": CREATED, "model": model,
                "choices": [{"text": p, "index": 0, "logprobs": null,
                             "finish_reason": if i == last { Value::from(finish) } else { Value::Null }}],
            });
            if with_usage {
                c["usage"] = Value::Null;
            }
            frames.push(format!("data: {c}\n\n"));
        }
        if with_usage {
            let c = json!({"id": id, "object": "text_completion", "created": CREATED, "model": model,
                           "choices": [], "usage": usage_json});
            frames.push(format!("data: {c}\n\n"));
        }
        frames.push("data: [DONE]\n\n".to_string());
        Reply::Sse(frames)
    } else {
        Reply::Json(json!({
            "id": id, "object": "text_completion", "created": CREATED, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
            "usage": usage_json,
        }))
    };
    respond(fault, reply, error_body).await
}

async fn embeddings(
    State(st): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let fault = st.take_fault(&headers);
    if let Err(r) = check_auth(&st, &headers) {
        return r;
    }
    let req = match parse_body(&body, error_body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_string) else {
        return bad_request("you must provide a model parameter", None);
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_string) {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            } else if items.iter().all(Value::is_u64) {
                vec![tokens_text(items)]
            } else if items.iter().all(Value::is_array) {
                items
                    .iter()
                    .map(|t| tokens_text(t.as_array().map(Vec::as_slice).unwrap_or(&[])))
                    .collect()
            } else {
                return bad_request(
                    "'input' must be a string, an array of strings or of tokens",
                    Some("input"),
                );
            }
        }
        _ => return bad_request("'input' is required and must not be empty", Some("input")),
    };
    let base64 = match req.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return bad_request(
                &format!("Invalid value: '{other}'. Supported values are: 'float' and 'base64'."),
                Some("encoding_format"),
            )
        }
    };
    let dims = req
        .get("dimensions")
        .and_then(Value::as_u64)
        .map(|d| d as usize);
    let prompt: u64 = inputs.iter().map(|s| count_words(s)).sum();
    st.record_usage(Usage {
        prompt,
        completion: 0,
    });
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let mut v = fake_embedding(text);
            if let Some(d) = dims {
                v.truncate(d);
            }
            let embedding = if base64 {
                json!(embedding_to_base64(&v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let reply = Reply::Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }));
    respond(fault, reply, error_body).await
}

/// Token-id input stands for the text `t1 t2 ...`.
fn tokens_text(tokens: &[Value]) -> String {
    tokens
        .iter()
        .map(|t| format!("t{t}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn models(State(st): State<Arc<MockState>>, headers: HeaderMap) -> Response<Body> {
    if let Err(r) = check_auth(&st, &headers) {
        return r;
    }
    json_ok(json!({"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "mock"},
        {"id": "text-embedding-3-small", "object": "model", "created": CREATED, "owned_by": "mock"},
    ]}))
}
