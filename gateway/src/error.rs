//! The gateway's one error type and its one mapping to HTTP.
//!
//! Every failure a client can see is an [`ApiError`]. It becomes a response only in
//! [`ApiError::into_response`], with OpenAI's body shape
//! `{"error":{"message","type","code","param"}}`. Invariants:
//! - `code` strings are stable API: clients and tests match on them; add, never rename.
//! - A client's mistake is a 4xx naming the field and the problem; only Airlock's own
//!   faults are 5xx, and their bodies are generic: the detail is logged, never sent.
//! - Upstream failures keep their class ([`UpstreamErrorKind`]) so the status says whose
//!   fault it was (429 stays 429, a provider outage is 502, a timeout 504).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::providers::{UpstreamError, UpstreamErrorKind};

/// The `code` of an error response, for the audit record and logs.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// Why a route produced no answer: the attempts made and the last upstream error.
#[derive(Debug)]
pub struct RouteFailure {
    pub model: String,
    pub attempts: u32,
    /// One line per candidate tried or skipped, in order.
    pub log: Vec<String>,
    pub last: Option<UpstreamError>,
    /// Nothing was sent because the request fits no candidate's context window.
    pub context_exceeded: bool,
    /// Every candidate was skipped because it is cooling down after a 429.
    pub rate_limited: bool,
    /// When the first unavailable candidate may take requests again.
    pub retry_after: Option<std::time::Duration>,
}

impl RouteFailure {
    pub fn summary(&self) -> String {
        let head = match (&self.last, self.context_exceeded) {
            (Some(e), _) => e.public_message(),
            (None, true) => format!(
                "The request does not fit the context window of any target of `{}`.",
                self.model
            ),
            (None, false) if self.rate_limited => format!(
                "Every target of `{}` is rate limited; retry after the Retry-After delay.",
                self.model
            ),
            (None, false) => format!("No target of `{}` can take requests now.", self.model),
        };
        format!("{head} Attempts: {}.", self.log.join("; "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or breaks a documented bound.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        code: &'static str,
        param: Option<String>,
    },
    #[error("{message}")]
    Unauthorized { message: String },
    /// Authenticated, but this principal may not do or use this.
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    /// A rate limit, token quota or budget of the caller's key, user, team or org.
    #[error("{message}")]
    RateLimited {
        message: String,
        code: &'static str,
        retry_after: Option<std::time::Duration>,
    },
    #[error("The model `{model}` does not exist or you do not have access to it.")]
    ModelNotFound { model: String },
    #[error("Invalid URL ({method} {path})")]
    UnknownRoute { method: String, path: String },
    #[error("Method {method} is not allowed for {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("Request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// The operation exists but not for this target (e.g. embeddings on Anthropic).
    #[error("{message}")]
    Unsupported { message: String },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Every candidate of a route failed or was unavailable.
    #[error("{}", .0.summary())]
    RouteFailed(Box<RouteFailure>),
    /// A bug or an environment failure inside Airlock; the detail is logged only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(code: &'static str, param: impl Into<Option<String>>, message: String) -> Self {
        ApiError::InvalidRequest {
            message,
            code,
            param: param.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::Unsupported { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ModelNotFound { .. } | ApiError::UnknownRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Upstream(e) => e.client_status(),
            ApiError::RouteFailed(f) => match (&f.last, f.context_exceeded) {
                (Some(e), _) => e.client_status(),
                (None, true) => StatusCode::BAD_REQUEST,
                (None, false) if f.rate_limited => StatusCode::TOO_MANY_REQUESTS,
                (None, false) => StatusCode::SERVICE_UNAVAILABLE,
            },
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { code, .. } => code,
            ApiError::Unauthorized { .. } => "invalid_api_key",
            ApiError::Forbidden { code, .. } | ApiError::RateLimited { code, .. } => code,
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::UnknownRoute { .. } => "unknown_url",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "request_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unsupported { .. } => "unsupported_operation",
            ApiError::Upstream(e) => e.code(),
            ApiError::RouteFailed(f) => match (&f.last, f.context_exceeded) {
                (Some(e), _) => e.code(),
                (None, true) => "context_length_exceeded",
                (None, false) if f.rate_limited => "upstream_rate_limited",
                (None, false) => "no_healthy_target",
            },
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn error_type(&self) -> &'static str {
        let upstream = match self {
            ApiError::Upstream(e) => Some(e.kind),
            ApiError::RouteFailed(f) => f.last.as_ref().map(|e| e.kind),
            _ => None,
        };
        match self {
            ApiError::Unauthorized { .. } => "authentication_error",
            ApiError::Forbidden { .. } => "permission_error",
            ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::RouteFailed(f) if f.context_exceeded => "invalid_request_error",
            ApiError::RouteFailed(f) if f.rate_limited => "rate_limit_error",
            ApiError::Upstream(_) | ApiError::RouteFailed(_) => match upstream {
                Some(UpstreamErrorKind::RateLimited | UpstreamErrorKind::Overloaded) => {
                    "rate_limit_error"
                }
                Some(
                    UpstreamErrorKind::BadRequest
                    | UpstreamErrorKind::InvalidRequest
                    | UpstreamErrorKind::ModelNotFound
                    | UpstreamErrorKind::ContextWindowExceeded
                    | UpstreamErrorKind::ContentPolicy,
                ) => "invalid_request_error",
                _ => "upstream_error",
            },
            ApiError::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// The message a client may see.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "The server had an error while processing your request.".into()
            }
            ApiError::Upstream(e) => e.public_message(),
            ApiError::RouteFailed(f) => f.summary(),
            other => other.to_string(),
        }
    }

    /// The OpenAI-shaped error object, also used for SSE error events.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.public_message(),
                "type": self.error_type(),
                "code": self.code(),
                "param": self.param(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Upstream attempts are logged where they fail (routing); our own faults here,
        // once, since their bodies say nothing.
        if let ApiError::Internal(detail) = &self {
            tracing::error!(detail = %detail, "internal error");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        resp.extensions_mut().insert(ErrorCode(self.code()));
        let retry_after = match &self {
            ApiError::Upstream(e) => e.retry_after,
            ApiError::RateLimited { retry_after, .. } => *retry_after,
            ApiError::RouteFailed(f) => f
                .last
                .as_ref()
                .and_then(|e| e.retry_after)
                .or(f.retry_after),
            _ => None,
        };
        if let Some(d) = retry_after {
            let secs = d.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let ApiError::Unauthorized { .. } = &self {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak() {
        let e = ApiError::Internal("sled: disk full at /secret/path".into());
        let body = e.body().to_string();
        assert!(!body.contains("/secret/path"));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.code(), "internal_error");
    }

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::invalid(
            "invalid_value",
            Some("temperature".to_string()),
            "bad".into(),
        );
        let b = e.body();
        assert_eq!(b["error"]["code"], "invalid_value");
        assert_eq!(b["error"]["param"], "temperature");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["message"], "bad");
    }
}
