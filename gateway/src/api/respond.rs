//! The common tail of every model route: response headers that say what happened
//! (`x-airlock-target`, `x-airlock-attempts`) and the [`RequestInfo`] the access log
//! and metrics read.

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::routing::Target;
use crate::telemetry::RequestInfo;

/// A successful answer with what served it.
pub struct Served {
    resp: Response,
    target: String,
    attempts: u32,
    streamed: bool,
}

impl Served {
    pub fn json(resp: Response, target: &Target, attempts: u32) -> Self {
        Served {
            resp,
            target: target.label.clone(),
            attempts,
            streamed: false,
        }
    }

    pub fn stream(resp: Response, target: &Target, attempts: u32) -> Self {
        Served {
            resp,
            target: target.label.clone(),
            attempts,
            streamed: true,
        }
    }
}

/// Builds the final response, success or error, labelled with the route's model name.
pub fn finish(result: Result<Served, ApiError>, model: String) -> Response {
    match result {
        Ok(s) => {
            let mut resp = s.resp;
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&s.target) {
                h.insert("x-airlock-target", v);
            }
            h.insert("x-airlock-attempts", HeaderValue::from(s.attempts));
            resp.extensions_mut().insert(RequestInfo {
                model,
                target: s.target,
                deferred: s.streamed,
            });
            resp
        }
        Err(e) => {
            let mut resp = e.into_response();
            resp.extensions_mut().insert(RequestInfo {
                model,
                target: String::new(),
                deferred: false,
            });
            resp
        }
    }
}
