//! `AdminError`: how the admin API refuses, in the same OpenAI-shaped body as
//! [`ApiError`] (`{"error":{"message","type","code","param"}}`).
//!
//! Kept beside `ApiError` rather than in it so this module stands alone; the new codes
//! are stable API like the others: `forbidden` (403), `not_found` (404), `conflict`
//! (409). Everything else (bad bodies, missing principal, internal faults) is an
//! [`ApiError`] and renders exactly as elsewhere, internal details logged, never sent.
//!
//! Invariant: an entity the caller may not see is `not_found` with the same message as
//! one that does not exist, so ids in other teams cannot be probed.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::governance::directory::{DirectoryError, AUTH_FAILED_MESSAGE};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("Your key's role does not allow this.")]
    Forbidden,
    #[error("The {kind} `{id}` does not exist.")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl AdminError {
    pub fn unauthorized() -> Self {
        AdminError::Api(ApiError::Unauthorized {
            message: AUTH_FAILED_MESSAGE.to_string(),
        })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Forbidden => StatusCode::FORBIDDEN,
            AdminError::NotFound { .. } => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Api(e) => e.status(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Forbidden => "forbidden",
            AdminError::NotFound { .. } => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Api(e) => e.code(),
        }
    }
}

impl From<DirectoryError> for AdminError {
    fn from(e: DirectoryError) -> Self {
        match e {
            DirectoryError::NotFound { kind, id } => AdminError::NotFound { kind, id },
            DirectoryError::Conflict(m) => AdminError::Conflict(m),
            DirectoryError::Forbidden => AdminError::Forbidden,
            DirectoryError::Invalid {
                code,
                param,
                message,
            } => AdminError::Api(ApiError::invalid(code, Some(param.to_string()), message)),
            other @ (DirectoryError::Store(_)
            | DirectoryError::Corrupt { .. }
            | DirectoryError::Encode(..)
            | DirectoryError::Bootstrap(_)) => {
                AdminError::Api(ApiError::Internal(other.to_string()))
            }
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let error_type = match &self {
            AdminError::Forbidden => "permission_error",
            AdminError::NotFound { .. } | AdminError::Conflict(_) => "invalid_request_error",
            AdminError::Api(_) => "",
        };
        match self {
            AdminError::Api(e) => e.into_response(),
            other => {
                let body = json!({
                    "error": {
                        "message": other.to_string(),
                        "type": error_type,
                        "code": other.code(),
                        "param": null,
                    }
                });
                (other.status(), axum::Json(body)).into_response()
            }
        }
    }
}
