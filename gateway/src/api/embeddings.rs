//! `POST /v1/embeddings`: routed to targets whose provider offers embeddings, answered
//! in the encoding the client asked for (`float` by default, or `base64`, which the
//! official SDKs request) whatever the provider sent.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;

use super::json::ApiJson;
use super::respond::{Call, RequestId};
use super::types::{EmbeddingInput, EmbeddingRequest, EncodingFormat, Usage};
use super::{respond, validate};
use crate::error::ApiError;
use crate::governance::model::Principal;
use crate::providers::{ProviderApi, UpstreamError, UpstreamErrorKind};
use crate::routing::catalog::estimate_text_tokens;
use crate::routing::execute::{self, RequestFacts};
use crate::state::AppState;

pub async fn embeddings(
    State(state): State<AppState>,
    Extension(principal): Extension<std::sync::Arc<Principal>>,
    RequestId(request_id): RequestId,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Response {
    let mut call = Call::new(state, principal, request_id);
    let result = handle(&mut call, req).await;
    call.finish(result).await
}

pub const ROUTE: &str = "/v1/embeddings";

async fn handle(call: &mut Call, req: EmbeddingRequest) -> Result<respond::Served, ApiError> {
    let mut req = req;
    validate::embeddings(&req)?;
    let state = call.state.clone();
    let filter = super::access::filter(&call.principal);
    let fallbacks = validate::take_fallbacks(&mut req.extra, &state.routes, filter.as_ref())?;
    let route = super::access::resolve(&state.routes, &req.model, filter.as_ref())?;
    call.model.clone_from(&route.name);
    if !route
        .targets
        .iter()
        .any(|(t, _)| t.provider.capabilities().embeddings)
    {
        return Err(ApiError::Unsupported {
            message: format!("Model `{}` does not offer embeddings.", req.model),
        });
    }
    let format = req.encoding_format.unwrap_or(EncodingFormat::Float);
    let facts = RequestFacts {
        prompt_tokens: input_tokens(&req.input),
        output_cap: Some(0),
        stream: false,
        fallbacks,
        filter,
    };
    call.admit(ROUTE, &route, &facts).await?;
    let req = &req;
    let served = execute::unary(&state.routes, &route, &facts, |t| async move {
        if !t.provider.capabilities().embeddings {
            return Err(crate::providers::unsupported(
                &t.target.provider,
                "embeddings",
            ));
        }
        t.provider.embeddings(req, &t.target.model).await
    })
    .await?;
    let mut body = served.value;
    for d in &mut body.data {
        let v = std::mem::replace(
            &mut d.embedding,
            super::types::EmbeddingVector::Float(Vec::new()),
        );
        d.embedding = v.into_format(format).map_err(|m| {
            ApiError::Upstream(UpstreamError::new(
                UpstreamErrorKind::InvalidResponse,
                &served.by.target.target.provider,
                m,
            ))
        })?;
    }
    state.metrics.tokens(
        &route.name,
        &served.by.target.label,
        body.usage.prompt_tokens,
        0,
    );
    let usage = Usage::new(body.usage.prompt_tokens, 0);
    Ok(respond::Served::json(
        Json(&body).into_response(),
        served.by,
        Some(usage),
    ))
}

/// Input tokens: estimated for text, exact for token ids.
fn input_tokens(input: &EmbeddingInput) -> u64 {
    match input {
        EmbeddingInput::Text(t) => estimate_text_tokens(t),
        EmbeddingInput::Texts(ts) => ts.iter().map(|t| estimate_text_tokens(t)).sum(),
        EmbeddingInput::Tokens(t) => t.len() as u64,
        EmbeddingInput::TokenLists(ts) => ts.iter().map(|t| t.len() as u64).sum(),
    }
}
