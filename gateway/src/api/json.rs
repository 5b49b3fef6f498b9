//! `ApiJson<T>`: the JSON body extractor every route uses, so that every way a body can
//! be wrong becomes an [`ApiError`] with a stable code and the path of the bad field.
//!
//! | problem                          | status | code                          |
//! |----------------------------------|--------|-------------------------------|
//! | Content-Type not JSON            | 415    | `unsupported_media_type`      |
//! | body over `server.max_body_bytes`| 413    | `request_too_large`           |
//! | body unreadable (timeout, reset) | 400    | `invalid_body`                |
//! | not JSON                         | 400    | `invalid_json`                |
//! | required field absent            | 400    | `missing_required_parameter`  |
//! | field of the wrong type          | 400    | `invalid_type`                |
//! | field with a bad value           | 400    | `invalid_value`               |

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use hyper::body::{Frame, SizeHint};
use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;

#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(CONTENT_TYPE)) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::invalid(
                    "invalid_body",
                    None,
                    format!("Could not read the request body: {rej}"),
                )
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// `body` with a read deadline of `timeout` from now (`server.body_read_timeout`):
/// past it, the next read fails, which [`ApiJson`] answers with `invalid_body`.
///
/// The timer is armed only when a read would wait: a body that has already arrived
/// with the request head (most JSON requests) costs no timer at all.
pub fn with_read_deadline(body: Body, timeout: Duration) -> Body {
    Body::new(ReadDeadline {
        inner: body,
        deadline: Instant::now() + timeout,
        timeout,
        timer: None,
    })
}

struct ReadDeadline {
    inner: Body,
    deadline: Instant,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

/// The error a body read gets past its deadline.
#[derive(Debug)]
struct ReadTimedOut(Duration);

impl std::fmt::Display for ReadTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the body did not arrive within {:?}", self.0)
    }
}

impl std::error::Error for ReadTimedOut {}

impl hyper::body::Body for ReadDeadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(ReadTimedOut(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The configured body limit, put in request extensions so rejections can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

fn is_json(v: Option<&axum::http::HeaderValue>) -> bool {
    let Some(ct) = v.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses a body, mapping serde's error to our codes with the field path as `param`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut *de);
    let err = match result {
        // Text after the JSON value makes the whole body invalid, not ignorable.
        Ok(v) => {
            return de.end().map(|()| v).map_err(|e| {
                ApiError::invalid(
                    "invalid_json",
                    None,
                    format!("The request body is not valid JSON: {e}"),
                )
            });
        }
        Err(e) => e,
    };
    let path = err.path().to_string();
    let inner = err.into_inner();
    use serde_json::error::Category;
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => Err(ApiError::invalid(
            "invalid_json",
            None,
            format!("The request body is not valid JSON: {inner}"),
        )),
        // A type error found before a syntax error later in the body: the body is not
        // JSON at all, which is the more useful thing to say (checked on this error
        // path only, so valid requests are parsed once).
        Category::Data if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() => {
            Err(ApiError::invalid(
                "invalid_json",
                None,
                "The request body is not valid JSON.".to_string(),
            ))
        }
        Category::Data => {
            let msg = strip_position(&inner.to_string());
            let param = if path == "." { None } else { Some(path) };
            if let Some(field) = msg
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
            {
                let full = match &param {
                    Some(p) => format!("{p}.{field}"),
                    None => field.to_string(),
                };
                return Err(ApiError::invalid(
                    "missing_required_parameter",
                    Some(full.clone()),
                    format!("Missing required parameter: '{full}'."),
                ));
            }
            let code = if msg.starts_with("invalid value") || msg.starts_with("unknown variant") {
                "invalid_value"
            } else {
                "invalid_type"
            };
            let message = match &param {
                Some(p) => format!("Invalid '{p}': {msg}."),
                None => format!("Invalid request body: {msg}."),
            };
            Err(ApiError::invalid(code, param, message))
        }
    }
}

/// serde_json appends " at line L column C"; the path already says where.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::ChatCompletionRequest;

    fn code_and_param(body: &str) -> (String, Option<String>) {
        match parse::<ChatCompletionRequest>(body.as_bytes()) {
            Ok(_) => ("ok".into(), None),
            Err(ApiError::InvalidRequest { code, param, .. }) => (code.to_string(), param),
            Err(other) => (other.code().to_string(), None),
        }
    }

    #[test]
    fn each_kind_of_bad_body_has_its_code_and_path() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("{", "invalid_json", None),
            ("nope", "invalid_json", None),
            (r#"{"model":"m","messages":[]} x"#, "invalid_json", None),
            (r#"{"model":"m"} x"#, "invalid_json", None),
            ("[]", "invalid_type", None),
            (
                r#"{"messages":[]}"#,
                "missing_required_parameter",
                Some("model"),
            ),
            (
                r#"{"model":"m"}"#,
                "missing_required_parameter",
                Some("messages"),
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                "missing_required_parameter",
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                "invalid_value",
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":7}]}"#,
                "invalid_type",
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[],"temperature":"hot"}"#,
                "invalid_type",
                Some("temperature"),
            ),
            (
                r#"{"model":"m","messages":[],"max_tokens":-1}"#,
                "invalid_value",
                Some("max_tokens"),
            ),
            (
                r#"{"model":5,"messages":[]}"#,
                "invalid_type",
                Some("model"),
            ),
            (
                r#"{"model":"m","messages":[],"tools":[{"type":"function"}]}"#,
                "missing_required_parameter",
                Some("tools[0].function"),
            ),
            (r#"{"model":"m","messages":[]}"#, "ok", None),
        ];
        for (body, code, param) in cases {
            let (c, p) = code_and_param(body);
            assert_eq!((c.as_str(), p.as_deref()), (*code, *param), "body {body}");
        }
    }

    #[test]
    fn json_content_types() {
        use axum::http::HeaderValue;
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/merge-patch+json",
        ] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }
}
