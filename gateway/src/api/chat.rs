//! `POST /v1/chat/completions`: validate, route, call with failover, answer as JSON or SSE.
//!
//! Answers from OpenAI-compatible upstreams are forwarded as their own bytes (checked,
//! usage read: [`crate::providers::raw`]); other providers' are serialized from typed values.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;

use super::json::ApiJson;
use super::respond::{Call, RequestId};
use super::sse::{self, StreamLabels};
use super::types::ChatCompletionRequest;
use super::{respond, validate};
use crate::error::ApiError;
use crate::governance::model::Principal;
use crate::providers::{ChatAnswer, ProviderApi};
use crate::routing::catalog::estimate_chat_tokens;
use crate::routing::execute::{self, RequestFacts};
use crate::state::AppState;

pub const ROUTE: &str = "/v1/chat/completions";

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(principal): Extension<std::sync::Arc<Principal>>,
    RequestId(request_id): RequestId,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Response {
    let mut call = Call::new(state, principal, request_id);
    let result = handle(&mut call, req).await;
    call.finish(result).await
}

async fn handle(call: &mut Call, req: ChatCompletionRequest) -> Result<respond::Served, ApiError> {
    let mut req = req;
    validate::chat(&req)?;
    let state = call.state.clone();
    let filter = super::access::filter(&call.principal);
    let fallbacks = validate::take_fallbacks(&mut req.extra, &state.routes, filter.as_ref())?;
    let route = super::access::resolve(&state.routes, &req.model, filter.as_ref())?;
    call.model.clone_from(&route.name);
    let facts = RequestFacts {
        prompt_tokens: estimate_chat_tokens(&req),
        output_cap: req.max_output_tokens().map(u64::from),
        stream: req.is_stream(),
        fallbacks,
        filter,
    };
    call.admit(ROUTE, &route, &facts).await?;
    let req = &req;
    let routes = &state.routes;
    if req.is_stream() {
        let served = execute::stream(routes, &route, &facts, |t| async move {
            t.provider.chat_chunks(req, &t.target.model).await
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
            t.provider.chat_answer(req, &t.target.model).await
        })
        .await?;
        let usage = served.value.usage().cloned();
        if let Some(u) = &usage {
            state.metrics.tokens(
                &route.name,
                &served.by.target.label,
                u.prompt_tokens,
                u.completion_tokens,
            );
        }
        let resp = match served.value {
            ChatAnswer::Typed(answer) => Json(&answer).into_response(),
            // The upstream's own JSON, forwarded as it came.
            ChatAnswer::Raw(raw) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                raw.body,
            )
                .into_response(),
        };
        Ok(respond::Served::json(resp, served.by, usage))
    }
}
