//! The HTTP API: routes, the middleware stack, and the OpenAI wire types.
//!
//! Layer order, outermost first: request id (set, then propagated to the response),
//! body read timeout, body size limit, access log and metrics ([`crate::telemetry`]),
//! authentication ([`crate::auth`]), then the route. Authentication wraps every route
//! and the fallback, so an unknown path without a key is a 401, not a 404.

pub mod access;
pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod health;
pub mod json;
pub mod models;
pub mod respond;
pub mod sse;
pub mod types;
pub mod validate;

use axum::extract::{DefaultBodyLimit, OriginalUri};
use axum::http::{HeaderName, Method};
use axum::routing::{get, post};
use axum::{middleware, Extension, Router};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId as TowerRequestId, SetRequestIdLayer,
};
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry;

pub const REQUEST_ID: &str = "x-airlock-request-id";

/// The whole application as a `Router`, ready to serve or to drive with `oneshot`.
pub fn router(state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
    let body_timeout = state.config.server.body_read_timeout;
    let request_id = HeaderName::from_static(REQUEST_ID);
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::retrieve))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(telemetry::metrics_handler))
        .nest(
            crate::admin::PREFIX,
            crate::admin::router(crate::admin::AdminState {
                directory: state.directory.clone(),
                governance: Some(state.governance.clone()),
                local: Some(state.local.clone()),
            }),
        )
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            telemetry::observe,
        ))
        .layer(Extension(json::BodyLimit(limit)))
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, NewRequestId))
        // Ids are the gateway's own: a client-sent one would let it choose what the
        // audit log records.
        .layer(middleware::map_request(
            |mut req: axum::extract::Request| async move {
                req.headers_mut().remove(REQUEST_ID);
                req
            },
        ))
        .with_state(state)
}

/// Request ids: random (version 4) UUIDs from the thread's CSPRNG, seeded from the OS
/// once, rather than one `getrandom` system call per request.
#[derive(Debug, Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<TowerRequestId> {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut buf = uuid::Uuid::encode_buffer();
        axum::http::HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
            .ok()
            .map(TowerRequestId::new)
    }
}

async fn unknown_route(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
