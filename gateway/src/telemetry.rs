//! Metrics (Prometheus text format) and logs (tracing).
//!
//! Invariants: label values come only from configuration (route, configured model and
//! target names, status class), never from raw client input, so cardinality stays
//! bounded: a model name the gateway does not know is recorded as `unknown`. Secrets
//! never reach a label or a log field.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::config::LogFormat;
use crate::error::ErrorCode;
use crate::governance::model::Principal;
use crate::ledger::{Op, RequestAudit};
use crate::state::AppState;

/// Latency buckets in seconds: fine near a millisecond (gateway overhead) up to minutes
/// (long generations).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    tokens: IntCounterVec,
    in_flight: IntGauge,
    budget_warnings: prometheus::IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let labels = &["route", "model", "target", "status"];
        let requests = IntCounterVec::new(
            Opts::new(
                "airlock_requests_total",
                "Requests answered, by route, model, target and status",
            ),
            labels,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "airlock_request_duration_seconds",
                "Time from request to the last byte of the response (streams included)",
            )
            .buckets(BUCKETS.to_vec()),
            labels,
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "airlock_tokens_total",
                "Tokens reported by upstreams, by kind (prompt or completion)",
            ),
            &["model", "target", "kind"],
        )?;
        let in_flight = IntGauge::new("airlock_requests_in_flight", "Requests being served now")?;
        let budget_warnings = prometheus::IntCounter::new(
            "airlock_budget_soft_threshold_total",
            "Requests answered while a budget was above its soft threshold",
        )?;
        registry.register(Box::new(budget_warnings.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            duration,
            tokens,
            in_flight,
            budget_warnings,
        })
    }

    pub fn observe(&self, route: &str, model: &str, target: &str, status: &str, seconds: f64) {
        let l = [route, model, target, status];
        self.requests.with_label_values(&l).inc();
        self.duration.with_label_values(&l).observe(seconds);
    }

    pub fn tokens(&self, model: &str, target: &str, prompt: u64, completion: u64) {
        self.tokens
            .with_label_values(&[model, target, "prompt"])
            .inc_by(prompt);
        self.tokens
            .with_label_values(&[model, target, "completion"])
            .inc_by(completion);
    }

    /// Counts a request answered above a soft budget threshold.
    pub fn budget_warning(&self) {
        self.budget_warnings.inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding to a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Marks a response whose request already has its audit record (model routes write it
/// with their settlement); [`observe`] writes one for every other request.
#[derive(Debug, Clone, Copy)]
pub struct Audited;

/// What a handler learned about a request, for the access log and metrics. Handlers
/// put it in the response extensions; streaming handlers set `deferred` and record the
/// outcome themselves when the stream ends.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub model: String,
    pub target: String,
    /// The routing decision (`x-airlock-route`) and attempts, for the log line.
    pub route: String,
    pub attempts: u32,
    pub deferred: bool,
}

/// Outermost handler-side layer: the request id, the body read deadline, the
/// in-flight gauge, the access log line, metrics.
///
/// Request ids are the gateway's own: a client-sent `x-airlock-request-id` is replaced
/// (it would let the client choose what the audit log records), and every response
/// carries the id.
pub async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = crate::api::new_request_id();
    req.headers_mut().insert(crate::api::REQUEST_ID, id.clone());
    let timeout = state.config.server.body_read_timeout;
    let req = req.map(|body| crate::api::json::with_read_deadline(body, timeout));
    // Cheap clones (reference-counted), not new strings: this runs for every request.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = uri.path();
    let request_id = id.to_str().unwrap_or("");
    state.metrics.in_flight.inc();
    let mut resp = next.run(req).await;
    state.metrics.in_flight.dec();
    resp.headers_mut()
        .insert(crate::api::REQUEST_ID, id.clone());
    audit(&state, &mut resp, route, path, request_id, start).await;
    // Nothing outside reads it after this layer.
    let info = resp
        .extensions_mut()
        .remove::<RequestInfo>()
        .unwrap_or_default();
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    tracing::info!(
        target: "airlock::access",
        %method, path, status, request_id,
        model = info.model, upstream = info.target,
        attempts = info.attempts, route = info.route,
        ms = elapsed.as_secs_f64() * 1000.0,
        streamed = info.deferred,
        "request"
    );
    if !info.deferred {
        state.metrics.observe(
            route,
            label(&info.model),
            label(&info.target),
            resp.status().as_str(),
            elapsed.as_secs_f64(),
        );
    }
    resp
}

/// Writes the audit record of every request a model route did not record itself, and
/// of every administrative change, durably before the response leaves.
async fn audit(
    state: &AppState,
    resp: &mut Response,
    route: &str,
    path: &str,
    request_id: &str,
    start: Instant,
) {
    let ledger = &state.governance.ledger;
    if let Some(change) = resp.extensions_mut().remove::<crate::admin::AdminChange>() {
        if let Err(e) = ledger.submit(vec![Op::Audit(change.into())]).await {
            tracing::error!(error = %e, "cannot write the audit record of an admin change");
        }
        return;
    }
    if resp.extensions().get::<Audited>().is_some()
        || crate::auth::is_open(path, state.config.server.metrics_open)
    {
        return;
    }
    let p = resp.extensions().get::<std::sync::Arc<Principal>>();
    let info = resp.extensions().get::<RequestInfo>();
    let audit = RequestAudit {
        request_id: request_id.to_string(),
        key_id: p.map_or_else(|| "-".to_string(), |p| p.key_id.clone()),
        user_id: p.and_then(|p| p.user_id.clone()),
        team_id: p.and_then(|p| p.team_id.clone()),
        org_id: p.map(|p| p.org_id.clone()).unwrap_or_default(),
        route: route.to_string(),
        model: info.map(|i| i.model.clone()).unwrap_or_default(),
        target: None,
        attempts: info.map_or(0, |i| i.attempts),
        latency_ms: start.elapsed().as_millis() as u64,
        status: resp.status().as_u16(),
        error_code: resp
            .extensions()
            .get::<ErrorCode>()
            .map(|c| c.0.to_string()),
        ..RequestAudit::default()
    };
    state.governance.audit_unadmitted(audit).await;
}

fn label(s: &str) -> &str {
    if s.is_empty() {
        "none"
    } else {
        s
    }
}

/// `GET /metrics`.
pub async fn metrics_handler(State(state): State<AppState>) -> Response {
    let mut resp = state.metrics.render().into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Installs the global tracing subscriber (stderr; `RUST_LOG` filters, default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new().unwrap();
        m.observe("/v1/chat/completions", "gpt", "oai/gpt", "200", 0.01);
        m.tokens("gpt", "oai/gpt", 5, 7);
        let text = m.render();
        assert!(text.contains(
            "airlock_requests_total{model=\"gpt\",route=\"/v1/chat/completions\",status=\"200\",target=\"oai/gpt\"} 1"
        ), "{text}");
        assert!(text.contains(
            "airlock_tokens_total{kind=\"completion\",model=\"gpt\",target=\"oai/gpt\"} 7"
        ));
    }
}
