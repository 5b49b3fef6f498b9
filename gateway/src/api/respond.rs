//! The common tail of every model route: settlement and the audit record (durable
//! before the answer leaves), response headers that say what happened
//! (`x-airlock-target`, `x-airlock-attempts`, `x-airlock-route`,
//! `x-airlock-overhead-ms`, `x-airlock-budget-warning`), and the [`RequestInfo`] the
//! access log and metrics read.
//!
//! Invariant: a model route's answer is delivered only after its settlement and audit
//! record are durable; if the ledger cannot record it, the client gets a 500 instead of
//! an unrecorded answer.

use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

use super::types::Usage;
use crate::error::ApiError;
use crate::governance::policy::{Admission, Outcome};
use crate::routing::ServedBy;
use crate::telemetry::{Audited, RequestInfo};

/// The request id set by the edge (`x-airlock-request-id`).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestId(
            parts
                .headers
                .get(super::REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        ))
    }
}

/// One model-route call in progress: who asked, when, for which model, and its
/// admission once policy admitted it.
pub struct Call {
    pub state: crate::state::AppState,
    pub principal: std::sync::Arc<crate::governance::model::Principal>,
    pub request_id: String,
    pub start: Instant,
    /// The resolved model name (a bounded label), once known.
    pub model: String,
    pub admission: Option<Admission>,
}

impl Call {
    pub fn new(
        state: crate::state::AppState,
        principal: std::sync::Arc<crate::governance::model::Principal>,
        request_id: String,
    ) -> Self {
        Call {
            state,
            principal,
            request_id,
            start: Instant::now(),
            model: String::new(),
            admission: None,
        }
    }

    /// Applies limits and reserves the worst case for `route` (durable on return).
    pub async fn admit(
        &mut self,
        route_label: &'static str,
        route: &crate::routing::ModelRoute,
        facts: &crate::routing::RequestFacts,
    ) -> Result<(), ApiError> {
        let a = self
            .state
            .governance
            .admit(&self.principal, &self.request_id, route_label, route, facts)
            .await?;
        self.admission = Some(a);
        Ok(())
    }

    /// Whether this call's audit record may hold request and answer text.
    pub fn logs_content(&self) -> bool {
        self.admission.as_ref().is_some_and(Admission::logs_content)
    }

    pub async fn finish(self, result: Result<Served, ApiError>) -> Response {
        let metrics = self.state.metrics.clone();
        finish(result, self.model, self.start, self.admission, &metrics).await
    }
}

/// A successful answer with what served it.
pub struct Served {
    resp: Response,
    by: ServedBy,
    usage: Option<Usage>,
    streamed: bool,
    /// Request and answer, for teams that opted in to content in audit records.
    pub content: Option<serde_json::Value>,
    /// A stream's admission (moved into the stream) was above a soft threshold.
    pub soft_warning: bool,
}

impl Served {
    pub fn json(resp: Response, by: ServedBy, usage: Option<Usage>) -> Self {
        Served {
            resp,
            by,
            usage,
            streamed: false,
            content: None,
            soft_warning: false,
        }
    }

    /// A stream: settlement happens inside it (see [`super::sse`]).
    pub fn stream(resp: Response, by: ServedBy) -> Self {
        Served {
            resp,
            by,
            usage: None,
            streamed: true,
            content: None,
            soft_warning: false,
        }
    }
}

/// Builds the final response, success or error, labelled with the route's model name.
/// `start` is when the handler began, for `x-airlock-overhead-ms` (time not spent
/// waiting on upstreams; for streams, up to the first chunk).
pub async fn finish(
    result: Result<Served, ApiError>,
    model: String,
    start: Instant,
    admission: Option<Admission>,
    metrics: &crate::telemetry::Metrics,
) -> Response {
    let soft_warning = admission.as_ref().is_some_and(|a| a.soft_warning)
        || result.as_ref().is_ok_and(|s| s.soft_warning);
    let audited = admission.is_some() || result.as_ref().is_ok_and(|s| s.streamed);
    let mut resp = match result {
        Ok(s) => {
            if let Some(a) = admission {
                let outcome = Outcome {
                    target: Some(&s.by.target),
                    usage: s.usage.as_ref(),
                    status: s.resp.status().as_u16(),
                    error_code: None,
                    attempts: s.by.attempts,
                    routing: Some(s.by.route.clone()),
                    content: s.content.clone(),
                };
                if let Err(e) = a.finish(outcome).await {
                    return e.into_response();
                }
            }
            let mut resp = s.resp;
            let overhead = start.elapsed().saturating_sub(s.by.upstream);
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&s.by.target.label) {
                h.insert("x-airlock-target", v);
            }
            h.insert("x-airlock-attempts", HeaderValue::from(s.by.attempts));
            if let Ok(v) = HeaderValue::from_str(&s.by.route) {
                h.insert("x-airlock-route", v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", overhead.as_secs_f64() * 1000.0))
            {
                h.insert("x-airlock-overhead-ms", v);
            }
            resp.extensions_mut().insert(RequestInfo {
                model,
                target: s.by.target.label.clone(),
                route: s.by.route,
                attempts: s.by.attempts,
                deferred: s.streamed,
            });
            resp
        }
        Err(e) => {
            let attempts = match &e {
                ApiError::RouteFailed(f) => Some(f.attempts),
                _ => None,
            };
            if let Some(a) = admission {
                let outcome = Outcome {
                    status: e.status().as_u16(),
                    error_code: Some(e.code().to_string()),
                    attempts: attempts.unwrap_or(0),
                    ..Outcome::default()
                };
                if let Err(le) = a.finish(outcome).await {
                    tracing::error!(error = %le, "cannot record a failed request");
                }
            }
            let mut resp = e.into_response();
            if let Some(n) = attempts {
                resp.headers_mut()
                    .insert("x-airlock-attempts", HeaderValue::from(n));
            }
            resp.extensions_mut().insert(RequestInfo {
                model,
                attempts: attempts.unwrap_or(0),
                ..RequestInfo::default()
            });
            resp
        }
    };
    if soft_warning {
        metrics.budget_warning();
        resp.headers_mut().insert(
            "x-airlock-budget-warning",
            HeaderValue::from_static("soft budget threshold exceeded"),
        );
    }
    if audited {
        resp.extensions_mut().insert(Audited);
    }
    resp
}
