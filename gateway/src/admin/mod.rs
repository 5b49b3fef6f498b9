//! The admin API: orgs, teams, users and keys under `/admin`, JSON in and out.
//!
//! [`router`] is meant to be nested at [`PREFIX`] inside the authenticated application
//! router; it expects the caller's [`Principal`] in the request extensions (put there by
//! the auth middleware) and answers 401 without one (fail closed).
//!
//! | route                              | methods              |
//! |------------------------------------|----------------------|
//! | `/admin/me`                        | GET                  |
//! | `/admin/orgs`, `/admin/orgs/{id}`  | GET POST, GET PATCH DELETE |
//! | `/admin/teams[?org_id=]`, `/{id}`  | same                 |
//! | `/admin/users[?org_id=&team_id=]`, `/{id}` | same         |
//! | `/admin/keys[?org_id=&team_id=&user_id=]`, `/{id}` | same; `POST /{id}/revoke` |
//! | `/admin/models`, `/admin/models/{name}` | GET POST, GET DELETE (local models) |
//!
//! Invariants:
//! - Every handler decides with [`crate::governance::access::can`]: first a gate on the
//!   kind (403: the role may never do this), then on the entity as stored and, for
//!   writes, as it would be stored (inside the directory's writer lock). An entity the
//!   caller may not read is 404, the same as a missing one; one it may read but not
//!   change is 403. Lists hold only what the caller may read.
//! - Only the routes above exist: any other path (trailing slash, doubled slash, other
//!   case, encoded characters) is the fallback's 404; `{id}` is matched against stored
//!   ids only, so `..%2F` is just an unknown id.
//! - A full key appears once, in the answer to `POST /admin/keys`; no answer and no
//!   [`AdminChange`] ever holds a key hash.
//! - Every successful change puts an [`AdminChange`] in the response extensions
//!   (actor, action, target, before, after) for the audit log.
//! - Directory writes fsync before answering; they run inline (admin writes are rare
//!   and short), so a change is complete even if the client goes away mid-request.

mod error;
pub mod ledger;
pub mod models;
mod routes;

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;
use axum::http::Method;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

pub use error::AdminError;

use crate::error::ApiError;
use crate::governance::directory::Directory;
use crate::governance::model::Principal;
use crate::ledger::AuditEvent;

/// Where [`router`] is nested.
pub const PREFIX: &str = "/admin";

/// State of the admin routes.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub directory: Directory,
    /// Budgets, usage and the audit log (`None` in tests of the directory routes only).
    pub governance: Option<crate::governance::policy::Governance>,
    /// Registered local models (`None` in tests of the directory routes only).
    pub local: Option<crate::local::LocalModels>,
}

/// One administrative change, for the audit log. Found in the response extensions of
/// every successful `POST`, `PATCH` and `DELETE`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminChange {
    /// The acting principal's key id (`master` for the master key).
    pub actor_key_id: String,
    /// `<kind>.<verb>`: `org.create`, `team.update`, `user.delete`, `key.revoke`...
    pub action: &'static str,
    /// The entity as a scope key: `org:org_…`, `team:team_…`, `user:user_…`, `key:ak_…`.
    pub target: String,
    /// The entity before the change (`None` for a create).
    pub before: Option<serde_json::Value>,
    /// The entity after the change (`None` for a delete). Keys appear without hash.
    pub after: Option<serde_json::Value>,
}

impl From<AdminChange> for AuditEvent {
    fn from(c: AdminChange) -> Self {
        AuditEvent::Admin {
            actor_key_id: c.actor_key_id,
            action: c.action.to_string(),
            target: c.target,
            before: c.before,
            after: c.after,
        }
    }
}

/// The authenticated caller, from the request extensions; 401 when absent.
#[derive(Debug, Clone)]
pub struct Actor(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AdminError> {
        parts
            .extensions
            .get::<std::sync::Arc<Principal>>()
            .map(|p| Actor(Principal::clone(p)))
            .ok_or_else(AdminError::unauthorized)
    }
}

/// The admin routes, to nest at [`PREFIX`] inside the authenticated router.
pub fn router<S>(state: AdminState) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    use routes::*;
    Router::new()
        .route("/me", get(me))
        .route("/orgs", get(list_orgs).post(create_org))
        .route(
            "/orgs/{id}",
            get(get_org).patch(update_org).delete(delete_org),
        )
        .route("/teams", get(list_teams).post(create_team))
        .route(
            "/teams/{id}",
            get(get_team).patch(update_team).delete(delete_team),
        )
        .route("/users", get(list_users).post(create_user))
        .route(
            "/users/{id}",
            get(get_user).patch(update_user).delete(delete_user),
        )
        .route("/keys", get(list_keys).post(create_key))
        .route(
            "/keys/{id}",
            get(get_key).patch(update_key).delete(delete_key),
        )
        .route("/keys/{id}/revoke", post(revoke_key))
        .route("/budgets", get(ledger::budgets))
        .route("/usage", get(ledger::usage))
        .route("/audit", get(ledger::audit))
        .route("/audit/verify", get(ledger::verify))
        .route("/audit/export", get(ledger::export))
        .route("/models", get(models::list).post(models::register))
        .route("/models/{name}", get(models::show).delete(models::remove))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
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

#[cfg(test)]
mod tests;
