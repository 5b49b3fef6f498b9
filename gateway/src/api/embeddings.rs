//! `POST /v1/embeddings`: routed to targets whose provider offers embeddings, answered
//! in the encoding the client asked for (`float` by default, or `base64`, which the
//! official SDKs request) whatever the provider sent.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::json::ApiJson;
use super::types::{EmbeddingRequest, EncodingFormat};
use super::{respond, validate};
use crate::error::ApiError;
use crate::providers::{ProviderApi, UpstreamError, UpstreamErrorKind};
use crate::routing::failover;
use crate::state::AppState;

pub async fn embeddings(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Response {
    let start = std::time::Instant::now();
    let mut model = String::new();
    let result = handle(&state, req, &mut model).await;
    respond::finish(result, model, start)
}

async fn handle(
    state: &AppState,
    req: EmbeddingRequest,
    model: &mut String,
) -> Result<respond::Served, ApiError> {
    validate::embeddings(&req)?;
    let mut route = state.routes.resolve(&req.model)?;
    model.clone_from(&route.name);
    route
        .targets
        .retain(|t| t.provider.capabilities().embeddings);
    if route.targets.is_empty() {
        return Err(ApiError::Unsupported {
            message: format!("Model `{}` does not offer embeddings.", req.model),
        });
    }
    let format = req.encoding_format.unwrap_or(EncodingFormat::Float);
    let req = &req;
    let served = failover(&route, |t| async move {
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
    Ok(respond::Served::json(
        Json(&body).into_response(),
        served.by,
    ))
}
