//! Authentication: every route needs a bearer key unless it is on the open list.
//!
//! Keys are the directory's (`sk-airlock-ak_...`), checked by
//! [`crate::governance::directory::Directory::authenticate`]; the configured master key
//! (`server.master_key_env`, when set) keeps working as a bootstrap
//! admin. The authenticated [`crate::governance::model::Principal`] goes into the request
//! extensions for handlers. Invariants: only SHA-256 digests of keys are held in memory;
//! comparisons are constant-time; the open list is explicit ([`is_open`]); a refusal
//! never says which part of the key was wrong.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::governance::directory::{master_principal, now_ms};
use crate::state::AppState;

/// The digest of the accepted key.
#[derive(Clone)]
pub struct MasterKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    pub fn new(key: &str) -> Self {
        MasterKey {
            digest: Sha256::digest(key.as_bytes()).into(),
        }
    }

    pub fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }
}

/// Routes reachable without a key.
pub fn is_open(path: &str, metrics_open: bool) -> bool {
    matches!(path, "/health" | "/ready") || (metrics_open && path == "/metrics")
}

/// The bearer token of a request, if it sent one.
fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware wrapping the whole router, fallback included.
pub async fn authenticate(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if is_open(req.uri().path(), state.config.server.metrics_open) {
        return Ok(next.run(req).await);
    }
    let principal = match bearer(&req) {
        None => {
            return Err(ApiError::Unauthorized {
                message: "Missing API key: send it as `Authorization: Bearer <key>`.".into(),
            })
        }
        Some(k) if state.master_key.as_ref().is_some_and(|m| m.matches(k)) => {
            std::sync::Arc::new(master_principal())
        }
        Some(k) => {
            let now = now_ms();
            match state.directory.authenticate(k, now) {
                Ok(p) => {
                    state.directory.touch_last_used(&p.key_id, now);
                    p
                }
                Err(e) => {
                    tracing::info!(reason = e.label(), "authentication refused");
                    return Err(e.into());
                }
            }
        }
    };
    // Shared, not copied: the handler, the admission and the audit layer all read it.
    let mut req = req;
    req.extensions_mut().insert(principal.clone());
    let mut resp = next.run(req).await;
    // For the audit record written by the outer layer.
    resp.extensions_mut().insert(principal);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_exactly() {
        let k = MasterKey::new("sk-airlock-abc");
        assert!(k.matches("sk-airlock-abc"));
        assert!(!k.matches("sk-airlock-abd"));
        assert!(!k.matches(""));
        assert!(!format!("{k:?}").contains("abc"));
    }

    #[test]
    fn open_list_is_explicit() {
        assert!(is_open("/health", false));
        assert!(is_open("/ready", false));
        assert!(!is_open("/metrics", false));
        assert!(is_open("/metrics", true));
        assert!(!is_open("/v1/models", true));
        assert!(!is_open("/health/", false));
    }
}
