//! `POST /v1/completions` (legacy text completions).
//!
//! OpenAI-compatible targets serve it natively. For providers without it (Anthropic,
//! Gemini) the prompt becomes one user message of a chat request and the answer is
//! turned back into `text_completion` objects, streamed or not. Only a single text
//! prompt can be mapped; lists of prompts or token ids need a native target.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures::StreamExt;
use serde_json::Map;

use super::json::ApiJson;
use super::respond::{Call, RequestId};
use super::sse::{self, StreamLabels};
use super::types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    CompletionChoice, CompletionRequest, CompletionResponse, MessageContent, Prompt, Role,
};
use super::{respond, validate};
use crate::error::ApiError;
use crate::governance::model::Principal;
use crate::providers::{CompletionStream, ProviderApi};
use crate::routing::catalog::estimate_text_tokens;
use crate::routing::execute::{self, RequestFacts};
use crate::state::AppState;

pub const ROUTE: &str = "/v1/completions";

pub async fn completions(
    State(state): State<AppState>,
    Extension(principal): Extension<std::sync::Arc<Principal>>,
    RequestId(request_id): RequestId,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Response {
    let mut call = Call::new(state, principal, request_id);
    let result = handle(&mut call, req).await;
    call.finish(result).await
}

async fn handle(call: &mut Call, req: CompletionRequest) -> Result<respond::Served, ApiError> {
    let mut req = req;
    validate::completion(&req)?;
    let state = call.state.clone();
    let filter = super::access::filter(&call.principal);
    let fallbacks = validate::take_fallbacks(&mut req.extra, &state.routes, filter.as_ref())?;
    let route = super::access::resolve(&state.routes, &req.model, filter.as_ref())?;
    call.model.clone_from(&route.name);
    let needs_mapping = route
        .targets
        .iter()
        .any(|(t, _)| !t.provider.capabilities().legacy_completions);
    let chat_form = if needs_mapping {
        Some(to_chat(&req)?)
    } else {
        None
    };
    let facts = RequestFacts {
        prompt_tokens: prompt_tokens(&req.prompt),
        output_cap: req.max_tokens.map(u64::from),
        stream: req.is_stream(),
        fallbacks,
        filter,
    };
    call.admit(ROUTE, &route, &facts).await?;
    let (req, chat_form, routes) = (&req, &chat_form, &state.routes);
    if req.is_stream() {
        let served = execute::stream(routes, &route, &facts, |t| async move {
            match (t.provider.capabilities().legacy_completions, chat_form) {
                (false, Some(chat)) => {
                    let s = t.provider.chat_stream(chat, &t.target.model).await?;
                    Ok(chat_stream_to_completion(s))
                }
                _ => t.provider.completion_stream(req, &t.target.model).await,
            }
        })
        .await?;
        let labels = StreamLabels {
            route: ROUTE,
            model: route.name.clone(),
            by: served.by.clone(),
            start: call.start,
        };
        let soft_warning = call.admission.as_ref().is_some_and(|a| a.soft_warning);
        let resp = sse::respond(
            state.clone(),
            labels,
            served.value,
            req.wants_stream_usage(),
            call.admission.take(),
        );
        let mut out = respond::Served::stream(resp, served.by);
        out.soft_warning = soft_warning;
        Ok(out)
    } else {
        let served = execute::unary(routes, &route, &facts, |t| async move {
            match (t.provider.capabilities().legacy_completions, chat_form) {
                (false, Some(chat)) => t
                    .provider
                    .chat(chat, &t.target.model)
                    .await
                    .map(chat_to_completion),
                _ => t.provider.completion(req, &t.target.model).await,
            }
        })
        .await?;
        if let Some(u) = &served.value.usage {
            state.metrics.tokens(
                &route.name,
                &served.by.target.label,
                u.prompt_tokens,
                u.completion_tokens,
            );
        }
        Ok(respond::Served::json(
            Json(&served.value).into_response(),
            served.by,
            served.value.usage.clone(),
        ))
    }
}

/// Prompt tokens: estimated for text, exact for token ids.
fn prompt_tokens(p: &Prompt) -> u64 {
    match p {
        Prompt::Text(t) => estimate_text_tokens(t),
        Prompt::Texts(ts) => ts.iter().map(|t| estimate_text_tokens(t)).sum(),
        Prompt::Tokens(t) => t.len() as u64,
        Prompt::TokenLists(ts) => ts.iter().map(|t| t.len() as u64).sum(),
    }
}

/// The chat request equivalent to a single-prompt completion request.
fn to_chat(req: &CompletionRequest) -> Result<ChatCompletionRequest, ApiError> {
    let prompt = match &req.prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Texts(t) if t.len() == 1 => t[0].clone(),
        _ => {
            return Err(ApiError::Unsupported {
                message: "This model serves legacy completions through chat, which takes a single text prompt; send one string as 'prompt'.".into(),
            })
        }
    };
    if req.echo == Some(true) || req.suffix.is_some() || req.logprobs.is_some() {
        return Err(ApiError::Unsupported {
            message:
                "'echo', 'suffix' and 'logprobs' need a target with native legacy completions."
                    .into(),
        });
    }
    Ok(ChatCompletionRequest {
        model: req.model.clone(),
        messages: vec![ChatMessage {
            role: Role::User,
            content: Some(MessageContent::Text(prompt)),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            refusal: None,
            extra: Map::new(),
        }],
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: req.max_tokens,
        max_completion_tokens: None,
        n: req.n,
        stop: req.stop.clone(),
        stream: req.stream,
        stream_options: req.stream_options.clone(),
        seed: req.seed,
        user: req.user.clone(),
        tools: None,
        tool_choice: None,
        parallel_tool_calls: None,
        response_format: None,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        logit_bias: req.logit_bias.clone(),
        logprobs: None,
        top_logprobs: None,
        extra: Map::new(),
    })
}

fn chat_to_completion(r: ChatCompletionResponse) -> CompletionResponse {
    CompletionResponse {
        id: r.id,
        object: CompletionResponse::object(),
        created: r.created,
        model: r.model,
        choices: r
            .choices
            .into_iter()
            .map(|c| CompletionChoice {
                index: c.index,
                text: c.message.content.unwrap_or_default(),
                logprobs: None,
                finish_reason: c.finish_reason,
            })
            .collect(),
        usage: r.usage,
        system_fingerprint: r.system_fingerprint,
        extra: Map::new(),
    }
}

fn chunk_to_completion(c: ChatCompletionChunk) -> Option<CompletionResponse> {
    let choices: Vec<_> = c
        .choices
        .into_iter()
        .filter(|ch| ch.delta.content.is_some() || ch.finish_reason.is_some())
        .map(|ch| CompletionChoice {
            index: ch.index,
            text: ch.delta.content.unwrap_or_default(),
            logprobs: None,
            finish_reason: ch.finish_reason,
        })
        .collect();
    if choices.is_empty() && c.usage.is_none() {
        return None;
    }
    Some(CompletionResponse {
        id: c.id,
        object: CompletionResponse::object(),
        created: c.created,
        model: c.model,
        choices,
        usage: c.usage,
        system_fingerprint: c.system_fingerprint,
        extra: Map::new(),
    })
}

fn chat_stream_to_completion(s: crate::providers::ChunkStream) -> CompletionStream {
    s.filter_map(|item| async move {
        match item {
            Ok(c) => chunk_to_completion(c).map(Ok),
            Err(e) => Some(Err(e)),
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn single_prompts_map_to_chat_and_lists_do_not() {
        let req: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "Say hi", "max_tokens": 5, "stop": "\n"
        }))
        .unwrap();
        let chat = to_chat(&req).unwrap();
        assert_eq!(chat.messages[0].text(), "Say hi");
        assert_eq!(chat.max_tokens, Some(5));
        assert_eq!(chat.stop.unwrap().0, vec!["\n"]);
        let req: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": ["a", "b"]})).unwrap();
        assert_eq!(to_chat(&req).unwrap_err().code(), "unsupported_operation");
    }

    #[test]
    fn chat_answers_become_text_completions() {
        let r: ChatCompletionResponse = serde_json::from_value(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        }))
        .unwrap();
        let c = serde_json::to_value(chat_to_completion(r)).unwrap();
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], "hi");
        assert_eq!(c["usage"]["total_tokens"], 3);
    }
}
