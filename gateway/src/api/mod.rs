//! The HTTP API: routes, the middleware stack, and the OpenAI wire types.
//!
//! Layer order, outermost first: body size limit, then [`crate::telemetry::observe`]
//! (the request id, set on the request and copied to the response; the body read
//! deadline; access log and metrics), authentication ([`crate::auth`]), then the
//! route. These are few on purpose: each tower layer costs every request a future and
//! a poll (tower-http's request-id and body-timeout layers, folded into `observe`,
//! were ~5 µs of CPU per proxied request). Authentication wraps every route
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
use axum::http::{HeaderValue, Method};
use axum::routing::{get, post};
use axum::{middleware, Extension, Router};

use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry;

pub const REQUEST_ID: &str = "x-airlock-request-id";

/// The whole application as a `Router`, ready to serve or to drive with `oneshot`.
pub fn router(state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
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
        .with_state(state)
}

/// A new request id: a random (version 4) UUID from the thread's CSPRNG, seeded from
/// the OS once, rather than one `getrandom` system call per request.
pub fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
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
