//! The Anthropic Messages API mock: `POST /v1/messages`, JSON and SSE.
//!
//! Strict like the real API, so that mapping mistakes in the gateway show up as 400s:
//! `x-api-key` and `anthropic-version` headers; `model`, `max_tokens` and a non-empty
//! `messages` required; roles only `user`/`assistant` (the system prompt goes in the
//! top-level `system`); top-level keys outside the API's list are rejected ("Extra
//! inputs are not permitted", so OpenAI-only fields must not leak through); tools need
//! `name` and `input_schema`; `tool_choice` is an object; `temperature` is within 0..=1;
//! every `tool_result` answers a `tool_use` id of the assistant turn just before it, and
//! every `tool_use` is answered in the next turn.
//!
//! A tool answer is a short text block followed by a `tool_use` block (index 1), as
//! Claude usually does. Streams send `message_start`, `content_block_start`, `ping`,
//! `content_block_delta` (`text_delta` or `input_json_delta`, the first of which is
//! empty), `content_block_stop`, `message_delta` (stop reason and output tokens) and
//! `message_stop`, each as `event: NAME` plus `data: JSON`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};

use super::{
    count_words, error_response, header_is, limit_words, parse_body, reply_text, respond, split_in,
    stream_pieces, text_of, tool_result_reply, MockState, Reply, Usage,
};

/// The text block Claude-like answers put before a tool call.
pub const TOOL_PREAMBLE: &str = "Let me look that up.";

const ALLOWED_KEYS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
];

pub(crate) fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .fallback(|| async { error_response(404, error_body(404, "Not Found")) })
        .with_state(state)
}

/// The error body Anthropic sends for `status`.
pub fn error_body(status: u16, message: &str) -> Value {
    let ty = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": ty, "message": message}})
}

fn bad(message: &str) -> Response<Body> {
    error_response(400, error_body(400, message))
}

/// The text of a message's `content`: a string, or the text of its text and
/// tool_result blocks.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                Some("tool_result") => text_of(b.get("content").unwrap_or(&Value::Null)),
                _ => String::new(),
            })
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn blocks_of<'a>(m: &'a Value, ty: &str) -> Vec<&'a Value> {
    m.get("content")
        .and_then(Value::as_array)
        .map(|b| b.iter().filter(|b| b["type"] == ty).collect())
        .unwrap_or_default()
}

fn validate(req: &Value) -> Result<(), Response<Body>> {
    let Some(obj) = req.as_object() else {
        return Err(bad("body must be a JSON object"));
    };
    for k in obj.keys() {
        if !ALLOWED_KEYS.contains(&k.as_str()) {
            return Err(bad(&format!("{k}: Extra inputs are not permitted")));
        }
    }
    if !req.get("model").is_some_and(Value::is_string) {
        return Err(bad("model: Field required"));
    }
    match req.get("max_tokens").and_then(Value::as_u64) {
        Some(n) if n >= 1 => {}
        Some(_) => {
            return Err(bad(
                "max_tokens: Input should be greater than or equal to 1",
            ))
        }
        None => return Err(bad("max_tokens: Field required")),
    }
    if let Some(t) = req.get("temperature") {
        match t.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => {}
            _ => return Err(bad("temperature: Input should be less than or equal to 1")),
        }
    }
    match req.get("system") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(blocks))
            if blocks
                .iter()
                .all(|b| b["type"] == "text" && b["text"].is_string()) => {}
        Some(_) => {
            return Err(bad(
                "system: Input should be a valid string or a list of text blocks",
            ))
        }
    }
    if let Some(tools) = req.get("tools") {
        let Some(tools) = tools.as_array() else {
            return Err(bad("tools: Input should be a valid list"));
        };
        for (i, t) in tools.iter().enumerate() {
            if !t.get("name").is_some_and(Value::is_string) {
                return Err(bad(&format!("tools.{i}.name: Field required")));
            }
            if !t.get("input_schema").is_some_and(Value::is_object) {
                return Err(bad(&format!("tools.{i}.input_schema: Field required")));
            }
        }
    }
    if let Some(tc) = req.get("tool_choice") {
        if !tc.get("type").is_some_and(Value::is_string) {
            return Err(bad("tool_choice: Input should be an object with a `type`"));
        }
    }
    if let Some(stops) = req.get("stop_sequences") {
        if !stops
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string))
        {
            return Err(bad("stop_sequences: Input should be a list of strings"));
        }
    }
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return Err(bad("messages: Field required"));
    };
    if messages.is_empty() {
        return Err(bad("messages: at least one message is required"));
    }
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(bad(&format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            )));
        }
        match m.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(blocks)) => {
                for (j, b) in blocks.iter().enumerate() {
                    let ty = b.get("type").and_then(Value::as_str).unwrap_or("");
                    let ok = match ty {
                        "text" => b["text"].is_string(),
                        "image" | "document" | "thinking" | "redacted_thinking" => true,
                        "tool_use" => {
                            b["id"].is_string() && b["name"].is_string() && b["input"].is_object()
                        }
                        "tool_result" => b["tool_use_id"].is_string(),
                        _ => false,
                    };
                    if !ok {
                        return Err(bad(&format!(
                            "messages.{i}.content.{j}: invalid content block {b}"
                        )));
                    }
                    if (ty == "tool_use" && role != "assistant")
                        || (ty == "tool_result" && role != "user")
                    {
                        return Err(bad(&format!(
                            "messages.{i}.content.{j}: {ty} is not allowed in a {role} turn"
                        )));
                    }
                }
            }
            _ => return Err(bad(&format!("messages.{i}.content: Field required"))),
        }
        // tool_result ids must answer the previous assistant turn's tool_use ids, all of them.
        let results: Vec<&str> = blocks_of(m, "tool_result")
            .iter()
            .filter_map(|b| b["tool_use_id"].as_str())
            .collect();
        let prev_uses: Vec<&str> = if i > 0 {
            blocks_of(&messages[i - 1], "tool_use")
                .iter()
                .filter_map(|b| b["id"].as_str())
                .collect()
        } else {
            Vec::new()
        };
        for r in &results {
            if !prev_uses.contains(r) {
                return Err(bad(&format!(
                    "messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: {r}. \
                     Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                )));
            }
        }
        if !prev_uses.is_empty() && prev_uses.iter().any(|u| !results.contains(u)) {
            return Err(bad(&format!(
                "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {prev_uses:?}"
            )));
        }
    }
    Ok(())
}

async fn messages(
    State(st): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let fault = st.take_fault(&headers);
    if !header_is(&headers, "x-api-key", st.api_key()) {
        return error_response(401, error_body(401, "invalid x-api-key"));
    }
    if headers.get("anthropic-version").is_none() {
        return bad("anthropic-version: header is required");
    }
    let req = match parse_body(&body, error_body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = validate(&req) {
        return r;
    }
    let model = req["model"].as_str().unwrap_or_default().to_string();
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let max_tokens = req["max_tokens"].as_u64();
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();

    let mut prompt = count_words(&text_of(req.get("system").unwrap_or(&Value::Null)));
    prompt += messages
        .iter()
        .map(|m| count_words(&content_text(&m["content"])))
        .sum::<u64>();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| content_text(&m["content"]))
        .unwrap_or_default();
    let id_n = st.next_id();
    let tool_choice_type = req
        .pointer("/tool_choice/type")
        .and_then(Value::as_str)
        .unwrap_or("auto");

    // (content blocks, stop_reason, output words)
    let results = blocks_of(&last, "tool_result");
    let (blocks, stop_reason, output) = if !results.is_empty() {
        let texts: Vec<String> = results
            .iter()
            .map(|b| text_of(b.get("content").unwrap_or(&Value::Null)))
            .collect();
        let (text, cut) = limit_words(&tool_result_reply(&texts.join(" ")), max_tokens);
        let n = count_words(&text);
        (
            vec![json!({"type": "text", "text": text})],
            if cut { "max_tokens" } else { "end_turn" },
            n,
        )
    } else if !tools.is_empty() && tool_choice_type != "none" {
        let name = if tool_choice_type == "tool" {
            req.pointer("/tool_choice/name")
                .and_then(Value::as_str)
                .unwrap_or("tool")
        } else {
            tools[0]["name"].as_str().unwrap_or("tool")
        };
        let input = json!({"query": last_user});
        let n = count_words(TOOL_PREAMBLE) + count_words(&input.to_string());
        (
            vec![
                json!({"type": "text", "text": TOOL_PREAMBLE}),
                json!({"type": "tool_use", "id": format!("toolu_mock_{id_n}"), "name": name, "input": input}),
            ],
            "tool_use",
            n,
        )
    } else {
        let (text, cut) = limit_words(&reply_text(&last_user), max_tokens);
        let n = count_words(&text);
        (
            vec![json!({"type": "text", "text": text})],
            if cut { "max_tokens" } else { "end_turn" },
            n,
        )
    };
    st.record_usage(Usage {
        prompt,
        completion: output,
    });
    let id = format!("msg_mock_{id_n}");

    let reply = if stream {
        let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let mut frames = vec![ev(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": prompt, "output_tokens": 1},
            }}),
        )];
        for (index, block) in blocks.iter().enumerate() {
            let start = if block["type"] == "tool_use" {
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}})
            } else {
                json!({"type": "text", "text": ""})
            };
            frames.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": start}),
            ));
            if index == 0 {
                frames.push(ev("ping", json!({"type": "ping"})));
            }
            if block["type"] == "tool_use" {
                let mut parts = vec![String::new()];
                parts.extend(split_in(&block["input"].to_string(), 3));
                for p in parts {
                    frames.push(ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": p}}),
                    ));
                }
            } else {
                for p in stream_pieces(block["text"].as_str().unwrap_or("")) {
                    frames.push(ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "text_delta", "text": p}}),
                    ));
                }
            }
            frames.push(ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
        frames.push(ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                   "usage": {"output_tokens": output}}),
        ));
        frames.push(ev("message_stop", json!({"type": "message_stop"})));
        Reply::Sse(frames)
    } else {
        Reply::Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": prompt, "output_tokens": output},
        }))
    };
    respond(fault, reply, error_body).await
}
