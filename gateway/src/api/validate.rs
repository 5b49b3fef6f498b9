//! Semantic checks on parsed requests: bounds and role rules serde cannot express.
//!
//! Each failure names the parameter, the bound and the value. Bounds follow OpenAI's
//! documented API so a request valid here is valid for OpenAI.

use super::types::{
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, Prompt, Role, StopSequences,
};
use crate::error::ApiError;
use crate::routing::{Routes, TargetFilter};

/// Removes the request-level fallback lists (`fallbacks`, LiteLLM style, and `models`,
/// OpenRouter style) from the fields forwarded upstream and returns them in order.
/// Each must name a model this gateway can route, so a typo fails loudly instead of
/// silently shrinking the fallback chain.
pub fn take_fallbacks(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    routes: &Routes,
    filter: Option<&TargetFilter>,
) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for key in ["models", "fallbacks"] {
        let Some(v) = extra.remove(key) else {
            continue;
        };
        let serde_json::Value::Array(items) = v else {
            return Err(ApiError::invalid(
                "invalid_type",
                Some(key.to_string()),
                format!("Invalid '{key}': expected an array of model names."),
            ));
        };
        for (i, item) in items.into_iter().enumerate() {
            let param = format!("{key}[{i}]");
            let serde_json::Value::String(name) = item else {
                return Err(ApiError::invalid(
                    "invalid_type",
                    Some(param.clone()),
                    format!("Invalid '{param}': expected a model name string."),
                ));
            };
            if super::access::resolve(routes, &name, filter).is_err() {
                return Err(ApiError::invalid(
                    "model_not_found",
                    Some(param),
                    format!("The fallback model `{name}` does not exist or you do not have access to it."),
                ));
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

fn bad(param: &str, msg: String) -> ApiError {
    ApiError::invalid("invalid_value", Some(param.to_string()), msg)
}

fn range(param: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(bad(
            param,
            format!("Invalid '{param}': {x} is out of range; it must be between {lo} and {hi}."),
        )),
        _ => Ok(()),
    }
}

fn at_least_one(param: &str, v: Option<u32>) -> Result<(), ApiError> {
    match v {
        Some(0) => Err(bad(
            param,
            format!("Invalid '{param}': 0 is too small; it must be at least 1."),
        )),
        _ => Ok(()),
    }
}

fn model(m: &str) -> Result<(), ApiError> {
    if m.trim().is_empty() {
        return Err(bad(
            "model",
            "Invalid 'model': it must not be empty.".into(),
        ));
    }
    Ok(())
}

fn stop(s: &Option<StopSequences>) -> Result<(), ApiError> {
    if let Some(StopSequences(list)) = s {
        if list.len() > 4 {
            return Err(bad(
                "stop",
                format!(
                    "Invalid 'stop': {} sequences given; at most 4 are allowed.",
                    list.len()
                ),
            ));
        }
        if list.iter().any(String::is_empty) {
            return Err(bad(
                "stop",
                "Invalid 'stop': sequences must not be empty.".into(),
            ));
        }
    }
    Ok(())
}

fn valid_function_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub fn chat(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    model(&req.model)?;
    if req.messages.is_empty() {
        return Err(bad(
            "messages",
            "Invalid 'messages': at least one message is required.".into(),
        ));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let p = |f: &str| format!("messages[{i}].{f}");
        match m.role {
            Role::Assistant => {
                if m.content.is_none()
                    && m.tool_calls.as_ref().is_none_or(Vec::is_empty)
                    && m.refusal.is_none()
                {
                    return Err(ApiError::invalid(
                        "missing_required_parameter",
                        Some(p("content")),
                        format!("Missing required parameter: '{}': an assistant message needs content or tool_calls.", p("content")),
                    ));
                }
            }
            Role::Tool => {
                if m.tool_call_id.as_deref().is_none_or(str::is_empty) {
                    return Err(ApiError::invalid(
                        "missing_required_parameter",
                        Some(p("tool_call_id")),
                        format!("Missing required parameter: '{}'.", p("tool_call_id")),
                    ));
                }
            }
            _ => {
                if m.content.is_none() {
                    return Err(ApiError::invalid(
                        "missing_required_parameter",
                        Some(p("content")),
                        format!("Missing required parameter: '{}'.", p("content")),
                    ));
                }
            }
        }
    }
    range("temperature", req.temperature, 0.0, 2.0)?;
    range("top_p", req.top_p, 0.0, 1.0)?;
    range("presence_penalty", req.presence_penalty, -2.0, 2.0)?;
    range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)?;
    at_least_one("max_tokens", req.max_tokens)?;
    at_least_one("max_completion_tokens", req.max_completion_tokens)?;
    at_least_one("n", req.n)?;
    if let Some(n) = req.n {
        if n > 128 {
            return Err(bad(
                "n",
                format!("Invalid 'n': {n} is too large; it must be at most 128."),
            ));
        }
    }
    if let Some(t) = req.top_logprobs {
        if t > 20 {
            return Err(bad(
                "top_logprobs",
                format!("Invalid 'top_logprobs': {t} is too large; it must be at most 20."),
            ));
        }
    }
    stop(&req.stop)?;
    if let Some(tools) = &req.tools {
        for (i, t) in tools.iter().enumerate() {
            if !valid_function_name(&t.function.name) {
                return Err(bad(
                    &format!("tools[{i}].function.name"),
                    format!("Invalid 'tools[{i}].function.name': {:?} must be 1-64 letters, digits, '_' or '-'.", t.function.name),
                ));
            }
        }
    }
    if req.stream_options.is_some() && !req.is_stream() {
        return Err(bad(
            "stream_options",
            "Invalid 'stream_options': it is only allowed when 'stream' is true.".into(),
        ));
    }
    Ok(())
}

pub fn completion(req: &CompletionRequest) -> Result<(), ApiError> {
    model(&req.model)?;
    range("temperature", req.temperature, 0.0, 2.0)?;
    range("top_p", req.top_p, 0.0, 1.0)?;
    range("presence_penalty", req.presence_penalty, -2.0, 2.0)?;
    range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)?;
    at_least_one("n", req.n)?;
    stop(&req.stop)?;
    let empty = match &req.prompt {
        Prompt::Texts(t) => t.is_empty(),
        Prompt::Tokens(t) => t.is_empty(),
        Prompt::TokenLists(t) => t.is_empty(),
        Prompt::Text(_) => false,
    };
    if empty {
        return Err(bad(
            "prompt",
            "Invalid 'prompt': it must not be an empty list.".into(),
        ));
    }
    if req.stream_options.is_some() && !req.is_stream() {
        return Err(bad(
            "stream_options",
            "Invalid 'stream_options': it is only allowed when 'stream' is true.".into(),
        ));
    }
    Ok(())
}

pub fn embeddings(req: &EmbeddingRequest) -> Result<(), ApiError> {
    model(&req.model)?;
    if req.input.is_empty() {
        return Err(bad(
            "input",
            "Invalid 'input': it must not be empty.".into(),
        ));
    }
    if req.input.len() > 2048 {
        return Err(bad(
            "input",
            format!(
                "Invalid 'input': {} items given; at most 2048 are allowed.",
                req.input.len()
            ),
        ));
    }
    if let Some(texts) = req.input.texts() {
        if texts.iter().any(|t| t.is_empty()) {
            return Err(bad(
                "input",
                "Invalid 'input': strings must not be empty.".into(),
            ));
        }
    }
    at_least_one("dimensions", req.dimensions)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat_err(v: serde_json::Value) -> Option<(String, Option<String>)> {
        let req: ChatCompletionRequest = serde_json::from_value(v).unwrap();
        chat(&req).err().map(|e| match e {
            ApiError::InvalidRequest { code, param, .. } => (code.to_string(), param),
            other => (other.code().to_string(), None),
        })
    }

    #[test]
    fn chat_bounds() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(chat_err(base()), None);
        let with = |k: &str, v: serde_json::Value| {
            let mut b = base();
            b[k] = v;
            chat_err(b)
        };
        let iv = |p: &str| Some(("invalid_value".to_string(), Some(p.to_string())));
        assert_eq!(with("temperature", json!(2.5)), iv("temperature"));
        assert_eq!(with("temperature", json!(2.0)), None);
        assert_eq!(with("top_p", json!(-0.1)), iv("top_p"));
        assert_eq!(with("n", json!(0)), iv("n"));
        assert_eq!(with("max_tokens", json!(0)), iv("max_tokens"));
        assert_eq!(with("stop", json!(["a", "b", "c", "d", "e"])), iv("stop"));
        assert_eq!(with("messages", json!([])), iv("messages"));
        assert_eq!(with("model", json!(" ")), iv("model"));
        assert_eq!(
            with("stream_options", json!({"include_usage": true})),
            iv("stream_options")
        );
        assert_eq!(
            with("messages", json!([{"role": "tool", "content": "42"}])),
            Some((
                "missing_required_parameter".into(),
                Some("messages[0].tool_call_id".into())
            ))
        );
        assert_eq!(
            with("messages", json!([{"role": "user"}])),
            Some((
                "missing_required_parameter".into(),
                Some("messages[0].content".into())
            ))
        );
        assert_eq!(
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "has space"}}])
            ),
            iv("tools[0].function.name")
        );
    }
}
