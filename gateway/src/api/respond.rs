//! The common tail of every model route: response headers that say what happened
//! (`x-airlock-target`, `x-airlock-attempts`, `x-airlock-overhead-ms`) and the [`RequestInfo`] the access log
//! and metrics read.

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use std::time::Instant;

use crate::routing::ServedBy;
use crate::telemetry::RequestInfo;

/// A successful answer with what served it.
pub struct Served {
    resp: Response,
    by: ServedBy,
    streamed: bool,
}

impl Served {
    pub fn json(resp: Response, by: ServedBy) -> Self {
        Served {
            resp,
            by,
            streamed: false,
        }
    }

    pub fn stream(resp: Response, by: ServedBy) -> Self {
        Served {
            resp,
            by,
            streamed: true,
        }
    }
}

/// Builds the final response, success or error, labelled with the route's model name.
/// `start` is when the handler began, for `x-airlock-overhead-ms` (time not spent
/// waiting on upstreams; for streams, up to the response head).
pub fn finish(result: Result<Served, ApiError>, model: String, start: Instant) -> Response {
    match result {
        Ok(s) => {
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
    }
}
