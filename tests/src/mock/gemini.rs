//! The Gemini API mock: `POST /v1beta/models/{model}:{method}` for `generateContent`,
//! `streamGenerateContent` (SSE with `?alt=sse`, else a streamed JSON array, as the
//! real API), `embedContent` and `batchEmbedContents`.
//!
//! Strict like the real API: the key comes in `x-goog-api-key` (or `?key=`), missing ->
//! 403 `PERMISSION_DENIED`, wrong -> 400 `INVALID_ARGUMENT`; unknown top-level or
//! `generationConfig` fields are rejected ("Unknown name"); roles are `user`, `model`
//! (or `function`); every content has parts; a `functionResponse` turn must follow a
//! model turn whose `functionCall` names it; batch embedding requests name
//! `models/{model}` of the URL. Function calls carry no id (Gemini has none), so the
//! gateway must make ids up and map results back by name.
//!
//! SSE frames end with `\r\n\r\n` like Google's. The finish reason rides on the last
//! content chunk, and every chunk carries `usageMetadata`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};

use super::{
    count_words, error_response, fake_embedding, limit_words, parse_body, reply_text, respond,
    stream_pieces, tool_result_reply, MockState, Reply, Usage,
};

const TOP_KEYS: &[&str] = &[
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
    "safetySettings",
    "cachedContent",
    "labels",
];

const GENERATION_KEYS: &[&str] = &[
    "temperature",
    "topP",
    "topK",
    "candidateCount",
    "maxOutputTokens",
    "stopSequences",
    "presencePenalty",
    "frequencyPenalty",
    "seed",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
];

pub(crate) fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1beta/models/{*rest}", post(dispatch))
        .fallback(|| async { error_response(404, error_body(404, "Not Found")) })
        .with_state(state)
}

/// The error body Google sends for `status`.
pub fn error_body(status: u16, message: &str) -> Value {
    let s = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    };
    json!({"error": {"code": status, "message": message, "status": s}})
}

fn bad(message: &str) -> Response<Body> {
    error_response(400, error_body(400, message))
}

/// `snake_case` -> `camelCase`, as protobuf JSON accepts both.
fn camel(k: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in k.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.push(c.to_ascii_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn field<'a>(v: &'a Value, camel_name: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    obj.iter()
        .find(|(k, _)| camel(k) == camel_name)
        .map(|(_, v)| v)
}

/// Every string leaf of a JSON value, joined by spaces.
fn string_leaves(v: &Value) -> String {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            Value::Number(n) => out.push(n.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out.join(" ")
}

fn parts_text(content: &Value) -> String {
    field(content, "parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        Some(t.to_string())
                    } else {
                        field(p, "functionResponse")
                            .map(|r| string_leaves(field(r, "response").unwrap_or(&Value::Null)))
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn function_parts<'a>(content: &'a Value, kind: &str) -> Vec<&'a Value> {
    field(content, "parts")
        .and_then(Value::as_array)
        .map(|parts| parts.iter().filter_map(|p| field(p, kind)).collect())
        .unwrap_or_default()
}

fn validate(req: &Value) -> Result<(), Response<Body>> {
    let Some(obj) = req.as_object() else {
        return Err(bad("Invalid JSON payload received. Expected an object."));
    };
    for k in obj.keys() {
        if !TOP_KEYS.contains(&camel(k).as_str()) {
            return Err(bad(&format!(
                "Invalid JSON payload received. Unknown name \"{k}\": Cannot find field."
            )));
        }
    }
    if let Some(cfg) = field(req, "generationConfig") {
        let Some(cfg) = cfg.as_object() else {
            return Err(bad("generation_config must be an object"));
        };
        for k in cfg.keys() {
            if !GENERATION_KEYS.contains(&camel(k).as_str()) {
                return Err(bad(&format!(
                    "Invalid JSON payload received. Unknown name \"{k}\" at 'generation_config': Cannot find field."
                )));
            }
        }
    }
    if let Some(sys) = field(req, "systemInstruction") {
        if !field(sys, "parts").is_some_and(Value::is_array) {
            return Err(bad("system_instruction: parts is required"));
        }
    }
    if let Some(tools) = field(req, "tools") {
        for t in tools.as_array().map(Vec::as_slice).unwrap_or(&[]) {
            for d in field(t, "functionDeclarations")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                if !d.get("name").is_some_and(Value::is_string) {
                    return Err(bad("tools[0].function_declarations[0].name: required"));
                }
            }
        }
    }
    let Some(contents) = field(req, "contents").and_then(Value::as_array) else {
        return Err(bad(
            "* GenerateContentRequest.contents: contents is not specified",
        ));
    };
    if contents.is_empty() {
        return Err(bad(
            "* GenerateContentRequest.contents: contents is not specified",
        ));
    }
    for (i, c) in contents.iter().enumerate() {
        match c.get("role").and_then(Value::as_str) {
            None | Some("user" | "model" | "function") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "Please use a valid role: user, model. (contents[{i}].role = {other:?})"
                )))
            }
        }
        let parts = field(c, "parts").and_then(Value::as_array);
        if parts.is_none_or(|p| p.is_empty()) {
            return Err(bad(&format!(
                "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            )));
        }
        for p in parts.map(Vec::as_slice).unwrap_or(&[]) {
            let known = [
                "text",
                "inlineData",
                "fileData",
                "functionCall",
                "functionResponse",
                "thought",
                "thoughtSignature",
            ];
            if !p.as_object().is_some_and(|o| {
                !o.is_empty() && o.keys().all(|k| known.contains(&camel(k).as_str()))
            }) {
                return Err(bad(&format!("contents[{i}].parts: invalid part {p}")));
            }
        }
        let responses = function_parts(c, "functionResponse");
        if !responses.is_empty() {
            let calls: Vec<&str> = if i > 0 && contents[i - 1]["role"] == "model" {
                function_parts(&contents[i - 1], "functionCall")
                    .iter()
                    .filter_map(|f| f["name"].as_str())
                    .collect()
            } else {
                Vec::new()
            };
            for r in responses {
                let name = r.get("name").and_then(Value::as_str).unwrap_or("");
                if !calls.contains(&name) || !field(r, "response").is_some_and(Value::is_object) {
                    return Err(bad(
                        "Please ensure that function response turn comes immediately after a function call turn. \
                         And the number of function response parts should be equal to number of function call parts of the function call turn.",
                    ));
                }
            }
        }
    }
    Ok(())
}

async fn dispatch(
    State(st): State<Arc<MockState>>,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let fault = st.take_fault(&headers);
    let query = query.unwrap_or_default();
    let query_key = query.split('&').find_map(|kv| kv.strip_prefix("key="));
    let key = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .or(query_key);
    match key {
        None => return error_response(
            403,
            error_body(
                403,
                "Method doesn't allow unregistered callers (callers without established identity).",
            ),
        ),
        Some(k) if k != st.api_key() => {
            return error_response(
                400,
                error_body(400, "API key not valid. Please pass a valid API key."),
            )
        }
        Some(_) => {}
    }
    let Some((model, method)) = rest.rsplit_once(':') else {
        return error_response(404, error_body(404, &format!("models/{rest} is not found")));
    };
    let model = model.to_string();
    let req = match parse_body(&body, error_body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let sse = query.split('&').any(|kv| kv == "alt=sse");
    match method {
        "generateContent" => generate(&st, fault, &model, &req, None).await,
        "streamGenerateContent" => generate(&st, fault, &model, &req, Some(sse)).await,
        "embedContent" => embed_one(&st, fault, &req).await,
        "batchEmbedContents" => embed_batch(&st, fault, &model, &req).await,
        other => error_response(
            404,
            error_body(404, &format!("method {other} is not found")),
        ),
    }
}

/// `stream`: `None` for a plain reply, `Some(sse)` for a stream.
async fn generate(
    st: &MockState,
    fault: Option<super::Fault>,
    model: &str,
    req: &Value,
    stream: Option<bool>,
) -> Response<Body> {
    if let Err(r) = validate(req) {
        return r;
    }
    let contents = field(req, "contents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let cfg = field(req, "generationConfig")
        .cloned()
        .unwrap_or(Value::Null);
    let max = field(&cfg, "maxOutputTokens").and_then(Value::as_u64);
    let candidates = field(&cfg, "candidateCount")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1);
    let declarations: Vec<Value> = field(req, "tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| field(t, "functionDeclarations").and_then(Value::as_array))
                .flatten()
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let calling = field(req, "toolConfig").and_then(|c| field(c, "functionCallingConfig"));
    let mode = calling
        .and_then(|c| field(c, "mode"))
        .and_then(Value::as_str)
        .unwrap_or("AUTO");
    let allowed = calling
        .and_then(|c| field(c, "allowedFunctionNames"))
        .and_then(|a| a.get(0))
        .and_then(Value::as_str);

    let mut prompt = field(req, "systemInstruction")
        .map(|s| count_words(&parts_text(s)))
        .unwrap_or(0);
    prompt += contents
        .iter()
        .map(|c| count_words(&parts_text(c)))
        .sum::<u64>();
    let last = contents.last().cloned().unwrap_or(Value::Null);
    let last_user = contents
        .iter()
        .rev()
        .find(|c| {
            c.get("role").and_then(Value::as_str).unwrap_or("user") == "user"
                && function_parts(c, "functionResponse").is_empty()
        })
        .map(parts_text)
        .unwrap_or_default();

    // (parts of the answer, finishReason, output words)
    let (parts, finish, output) = if !function_parts(&last, "functionResponse").is_empty() {
        let (text, cut) = limit_words(&tool_result_reply(&parts_text(&last)), max);
        let n = count_words(&text);
        (
            vec![json!({"text": text})],
            if cut { "MAX_TOKENS" } else { "STOP" },
            n,
        )
    } else if !declarations.is_empty() && mode != "NONE" {
        let name = allowed
            .or_else(|| declarations[0]["name"].as_str())
            .unwrap_or("tool");
        let args = json!({"query": last_user});
        let n = count_words(&args.to_string());
        (
            vec![json!({"functionCall": {"name": name, "args": args}})],
            "STOP",
            n,
        )
    } else {
        let (text, cut) = limit_words(&reply_text(&last_user), max);
        let n = count_words(&text);
        (
            vec![json!({"text": text})],
            if cut { "MAX_TOKENS" } else { "STOP" },
            n,
        )
    };
    let output_all = output * candidates;
    st.record_usage(Usage {
        prompt,
        completion: output_all,
    });
    let usage = json!({"promptTokenCount": prompt, "candidatesTokenCount": output_all, "totalTokenCount": prompt + output_all});
    let response_id = format!("mock-{}", st.next_id());

    let reply = match stream {
        None => {
            let cands: Vec<Value> = (0..candidates)
                .map(|i| json!({"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": i}))
                .collect();
            Reply::Json(
                json!({"candidates": cands, "usageMetadata": usage, "modelVersion": model, "responseId": response_id}),
            )
        }
        Some(sse) => {
            let mut chunks: Vec<Value> = Vec::new();
            let text = parts[0].get("text").and_then(Value::as_str);
            let pieces: Vec<Value> = match text {
                Some(t) => stream_pieces(t)
                    .into_iter()
                    .map(|p| json!({"text": p}))
                    .collect(),
                None => parts.clone(),
            };
            let n = pieces.len();
            for (k, piece) in pieces.into_iter().enumerate() {
                let last_chunk = k + 1 == n;
                let cands: Vec<Value> = (0..candidates)
                    .map(|i| {
                        let mut c = json!({"content": {"parts": [piece.clone()], "role": "model"}, "index": i});
                        if last_chunk {
                            c["finishReason"] = json!(finish);
                        }
                        c
                    })
                    .collect();
                let usage_now = if last_chunk {
                    usage.clone()
                } else {
                    json!({"promptTokenCount": prompt, "totalTokenCount": prompt})
                };
                chunks.push(json!({"candidates": cands, "usageMetadata": usage_now, "modelVersion": model, "responseId": response_id}));
            }
            if sse {
                Reply::Sse(
                    chunks
                        .iter()
                        .map(|c| format!("data: {c}\r\n\r\n"))
                        .collect(),
                )
            } else {
                Reply::JsonArrayStream(chunks)
            }
        }
    };
    respond(fault, reply, error_body).await
}

fn text_to_embed(content: Option<&Value>) -> Option<String> {
    let parts = content
        .and_then(|c| field(c, "parts"))
        .and_then(Value::as_array)?;
    let texts: Vec<&str> = parts
        .iter()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    if texts.is_empty() {
        None
    } else {
        Some(texts.join(" "))
    }
}

fn embedding_values(text: &str, dims: Option<u64>) -> Vec<f32> {
    let mut v = fake_embedding(text);
    if let Some(d) = dims {
        v.truncate(d as usize);
    }
    v
}

async fn embed_one(st: &MockState, fault: Option<super::Fault>, req: &Value) -> Response<Body> {
    let Some(text) = text_to_embed(req.get("content")) else {
        return bad("* EmbedContentRequest.content: content is not specified");
    };
    st.record_usage(Usage {
        prompt: count_words(&text),
        completion: 0,
    });
    let dims = field(req, "outputDimensionality").and_then(Value::as_u64);
    respond(
        fault,
        Reply::Json(json!({"embedding": {"values": embedding_values(&text, dims)}})),
        error_body,
    )
    .await
}

async fn embed_batch(
    st: &MockState,
    fault: Option<super::Fault>,
    model: &str,
    req: &Value,
) -> Response<Body> {
    let Some(requests) = req
        .get("requests")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
    else {
        return bad("* BatchEmbedContentsRequest.requests: requests is not specified");
    };
    let want = format!("models/{model}");
    let mut out = Vec::new();
    let mut words = 0;
    for (i, r) in requests.iter().enumerate() {
        if r.get("model").and_then(Value::as_str) != Some(want.as_str()) {
            return bad(&format!(
                "* BatchEmbedContentsRequest.requests[{i}].model: unexpected model name format or model mismatch (want {want:?})"
            ));
        }
        let Some(text) = text_to_embed(r.get("content")) else {
            return bad(&format!(
                "* BatchEmbedContentsRequest.requests[{i}].content: content is not specified"
            ));
        };
        words += count_words(&text);
        let dims = field(r, "outputDimensionality").and_then(Value::as_u64);
        out.push(json!({"values": embedding_values(&text, dims)}));
    }
    st.record_usage(Usage {
        prompt: words,
        completion: 0,
    });
    respond(fault, Reply::Json(json!({"embeddings": out})), error_body).await
}
