//! Running a request against a route: candidates in strategy order, admission through
//! each target's health, retries with backoff, a total deadline, a time-to-first-token
//! deadline for streams, and fallbacks by error class.
//!
//! Invariants:
//! - Everything here happens before the response exists, so failover never follows a
//!   byte sent to the client; a stream counts as started only once its first chunk
//!   arrived (a stream that fails or stalls before it fails over).
//! - A client error from a provider (400/404/422 that is neither a context overflow nor
//!   a content-policy refusal) is returned at once: never retried, never failed over.
//! - Every admitted attempt settles its health permit exactly once: success, failure,
//!   rate-limited or neutral; a stream settles when it ends (or neutrally when the
//!   client goes away and drops it).
//! - Fallback stages run at most once per kind (generic, context window, content
//!   policy) and never revisit a model already tried, so the loop always ends.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;

use super::health::{Permit, Unavailable};
use super::{ModelRoute, Routes, Target};
use crate::api::types::{
    ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, EmbeddingResponse,
};
use crate::error::{ApiError, RouteFailure};
use crate::providers::{ChatAnswer, ChatChunk, UpstreamError, UpstreamErrorKind};

/// What routing needs to know about the request itself.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// Prompt tokens, exact or estimated.
    pub prompt_tokens: u64,
    /// The output cap the request set (`max_tokens`...), if any.
    pub output_cap: Option<u64>,
    pub stream: bool,
    /// Request-level fallbacks (`fallbacks` / `models` in the body), tried before the
    /// route's configured ones.
    pub fallbacks: Vec<String>,
    /// The caller's allow-lists, applied to fallback stages too.
    pub filter: Option<super::TargetFilter>,
}

/// Output tokens assumed for cost ranking when the request sets no cap.
pub const EXPECTED_OUTPUT: u64 = 256;

impl RequestFacts {
    /// Tokens the request may occupy: prompt plus its output cap (for context-window
    /// checks and tpm accounting; an uncapped output counts as 0 here because the
    /// provider caps it to what fits).
    pub fn need(&self) -> u64 {
        self.prompt_tokens
            .saturating_add(self.output_cap.unwrap_or(0))
    }

    /// Output tokens to price the request at.
    pub fn priced_output(&self) -> u64 {
        self.output_cap.unwrap_or(EXPECTED_OUTPUT)
    }
}

/// Which target answered and how it went, for headers, logs and metrics.
#[derive(Debug, Clone)]
pub struct ServedBy {
    pub target: Target,
    pub attempts: u32,
    /// Time spent waiting on upstreams (streams: until the first chunk).
    pub upstream: Duration,
    /// `x-airlock-route`: the strategy and the candidates in order with their scores.
    pub route: String,
}

#[derive(Debug)]
pub struct Served<T> {
    pub value: T,
    pub by: ServedBy,
}

/// Responses that report how many tokens they used (to correct the tpm estimate).
pub trait TokenCount {
    fn tokens(&self) -> Option<u64>;
}

impl TokenCount for ChatCompletionResponse {
    fn tokens(&self) -> Option<u64> {
        self.usage.as_ref().map(|u| u.total_tokens)
    }
}

impl TokenCount for CompletionResponse {
    fn tokens(&self) -> Option<u64> {
        self.usage.as_ref().map(|u| u.total_tokens)
    }
}

impl TokenCount for EmbeddingResponse {
    fn tokens(&self) -> Option<u64> {
        Some(self.usage.total_tokens)
    }
}

impl TokenCount for ChatChunk {
    fn tokens(&self) -> Option<u64> {
        self.total_tokens()
    }
}

impl TokenCount for ChatAnswer {
    fn tokens(&self) -> Option<u64> {
        self.usage().map(|u| u.total_tokens)
    }
}

impl TokenCount for ChatCompletionChunk {
    fn tokens(&self) -> Option<u64> {
        self.usage.as_ref().map(|u| u.total_tokens)
    }
}

/// How a stage of candidates ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StageEnd {
    Exhausted,
    ContextWindow,
    ContentPolicy,
}

struct Won<T> {
    value: T,
    permit: Permit,
    target: Target,
    took: Duration,
}

/// Runs a non-streaming call.
pub async fn unary<T, F, Fut>(
    routes: &Routes,
    route: &Arc<ModelRoute>,
    facts: &RequestFacts,
    call: F,
) -> Result<Served<T>, ApiError>
where
    T: TokenCount,
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let (won, by) = run(routes, route, facts, call).await?;
    won.target.health.success(
        won.permit,
        Instant::now(),
        won.took,
        None,
        won.value.tokens(),
    );
    Ok(Served {
        value: won.value,
        by,
    })
}

/// Runs a streaming call: the attempt succeeds only once the first chunk arrived
/// (within `ttft_timeout` when set); the returned stream settles the target's health
/// when it ends.
pub async fn stream<C, F, Fut>(
    routes: &Routes,
    route: &Arc<ModelRoute>,
    facts: &RequestFacts,
    mut call: F,
) -> Result<Served<BoxStream<'static, Result<C, UpstreamError>>>, ApiError>
where
    C: TokenCount + Send + 'static,
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Result<BoxStream<'static, Result<C, UpstreamError>>, UpstreamError>>,
{
    let ttft = route.policy.ttft_timeout;
    let (won, by) = run(routes, route, facts, |t| {
        let started = call(t.clone());
        async move {
            // The deadline covers the response head and the first chunk together: a
            // provider slow to answer at all is as stalled as one slow to speak.
            let first_chunk = async {
                let mut s = started.await?;
                let first = s.next().await;
                Ok::<_, UpstreamError>((first, s))
            };
            let (first, s) = match ttft {
                Some(limit) => tokio::time::timeout(limit, first_chunk)
                    .await
                    .map_err(|_| {
                        UpstreamError::new(
                            UpstreamErrorKind::Timeout,
                            &t.target.provider,
                            format!("no first token within {limit:?}"),
                        )
                    })??,
                None => first_chunk.await?,
            };
            match first {
                Some(Ok(c)) => Ok((c, s)),
                Some(Err(e)) => Err(e),
                None => Err(UpstreamError::new(
                    UpstreamErrorKind::StreamInterrupted,
                    &t.target.provider,
                    "the stream ended before its first chunk",
                )),
            }
        }
    })
    .await?;
    let Won {
        value: (first, rest),
        permit,
        target,
        took,
    } = won;
    Ok(Served {
        value: track(rest, first, permit, target, took),
        by,
    })
}

/// Passes a started stream through, settling the target's health when it ends.
fn track<C: TokenCount + Send + 'static>(
    mut rest: BoxStream<'static, Result<C, UpstreamError>>,
    first: C,
    permit: Permit,
    target: Target,
    ttft: Duration,
) -> BoxStream<'static, Result<C, UpstreamError>> {
    let started = Instant::now()
        .checked_sub(ttft)
        .unwrap_or_else(Instant::now);
    async_stream::stream! {
        let mut permit = Some(permit);
        let mut tokens = first.tokens();
        yield Ok(first);
        while let Some(item) = rest.next().await {
            match &item {
                Ok(c) => {
                    if let Some(t) = c.tokens() {
                        tokens = Some(t);
                    }
                }
                Err(e) => {
                    if let Some(p) = permit.take() {
                        target.health.record_error(p, Instant::now(), e);
                    }
                    yield item;
                    return;
                }
            }
            yield item;
        }
        if let Some(p) = permit.take() {
            target.health.success(p, Instant::now(), started.elapsed(), Some(ttft), tokens);
        }
    }
    .boxed()
}

/// Full-jitter exponential backoff: uniform in [0, base * 2^retry], capped at 10 s.
fn backoff(base: Duration, retry: u32) -> Duration {
    let cap = base
        .saturating_mul(1u32 << retry.min(16))
        .min(Duration::from_secs(10));
    cap.mul_f64(rand::random::<f64>())
}

fn skip_reason(u: &Unavailable) -> String {
    match u {
        Unavailable::CircuitOpen { retry_in } => {
            format!("circuit open, retry in {}s", retry_in.as_secs().max(1))
        }
        Unavailable::ProbeInFlight => "circuit half-open, probe in flight".into(),
        Unavailable::Cooldown { retry_in } => {
            format!(
                "rate-limit cooldown, retry in {}s",
                retry_in.as_secs().max(1)
            )
        }
        Unavailable::RpmCap => "rpm cap reached".into(),
        Unavailable::TpmCap => "tpm cap reached".into(),
        Unavailable::ParallelCap => "max_parallel reached".into(),
    }
}

fn retry_in(u: &Unavailable) -> Option<Duration> {
    match u {
        Unavailable::CircuitOpen { retry_in } | Unavailable::Cooldown { retry_in } => {
            Some(*retry_in)
        }
        _ => None,
    }
}

/// The loop over stages, candidates and retries. Returns the winning attempt with its
/// permit still to settle.
async fn run<T, F, Fut>(
    routes: &Routes,
    primary: &Arc<ModelRoute>,
    facts: &RequestFacts,
    mut attempt: F,
) -> Result<(Won<T>, ServedBy), ApiError>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let start = Instant::now();
    let deadline = primary.policy.timeout.map(|t| start + t);
    let mut stages: VecDeque<Arc<ModelRoute>> = VecDeque::from([primary.clone()]);
    let mut tried: HashSet<String> = HashSet::from([primary.name.clone()]);
    let (mut used_generic, mut used_context, mut used_policy) = (false, false, false);
    let mut log: Vec<String> = Vec::new();
    let mut last: Option<UpstreamError> = None;
    let mut soonest_retry: Option<Duration> = None;
    let mut context_skips = 0usize;
    let (mut cooldown_skips, mut other_skips) = (0usize, 0usize);
    let mut attempts = 0u32;
    let mut upstream = Duration::ZERO;
    let mut route_header = String::new();
    let need = facts.need();

    while let Some(stage) = stages.pop_front() {
        let (candidates, described) = routes.rank(&stage, facts);
        if route_header.is_empty() {
            route_header = described;
        }
        let mut end = StageEnd::Exhausted;
        'targets: for cand in candidates {
            if let Some(info) = &cand.info {
                let window = u64::from(info.context_window);
                if window > 0 && need > window {
                    log.push(format!(
                        "{}: skipped (needs {need} tokens, context window {window})",
                        cand.label
                    ));
                    context_skips += 1;
                    end = StageEnd::ContextWindow;
                    continue;
                }
            }
            let mut retry = 0;
            loop {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    last = Some(UpstreamError::new(
                        UpstreamErrorKind::Timeout,
                        &cand.target.provider,
                        "the route's total deadline passed",
                    ));
                    log.push(format!("{}: deadline passed", cand.label));
                    stages.clear();
                    break 'targets;
                }
                let permit = match cand.health.admit(now, need) {
                    Ok(p) => p,
                    Err(u) => {
                        log.push(format!("{}: skipped ({})", cand.label, skip_reason(&u)));
                        if let Some(r) = retry_in(&u) {
                            soonest_retry = Some(soonest_retry.map_or(r, |s| s.min(r)));
                        }
                        if matches!(u, Unavailable::Cooldown { .. }) {
                            cooldown_skips += 1;
                        } else {
                            other_skips += 1;
                        }
                        continue 'targets;
                    }
                };
                attempts += 1;
                let t0 = Instant::now();
                let call = attempt(cand.clone());
                let result = match deadline {
                    Some(d) => tokio::time::timeout_at(d.into(), call)
                        .await
                        .unwrap_or_else(|_| {
                            Err(UpstreamError::new(
                                UpstreamErrorKind::Timeout,
                                &cand.target.provider,
                                "the route's total deadline passed",
                            ))
                        }),
                    None => call.await,
                };
                let took = t0.elapsed();
                upstream += took;
                let e = match result {
                    Ok(value) => {
                        let by = ServedBy {
                            target: cand.clone(),
                            attempts,
                            upstream,
                            route: route_header,
                        };
                        return Ok((
                            Won {
                                value,
                                permit,
                                target: cand,
                                took,
                            },
                            by,
                        ));
                    }
                    Err(e) => e,
                };
                log.push(format!("{}: {}", cand.label, e.code()));
                tracing::warn!(target = %cand.label, code = e.code(), error = %e, attempt = attempts, "upstream attempt failed");
                let now = Instant::now();
                cand.health.record_error(permit, now, &e);
                match e.kind {
                    UpstreamErrorKind::RateLimited
                    | UpstreamErrorKind::Auth
                    | UpstreamErrorKind::Overloaded
                    | UpstreamErrorKind::ModelChanged
                    | UpstreamErrorKind::ModelLoadFailed => {
                        last = Some(e);
                        continue 'targets;
                    }
                    UpstreamErrorKind::Connect
                    | UpstreamErrorKind::Timeout
                    | UpstreamErrorKind::Server
                    | UpstreamErrorKind::InvalidResponse
                    | UpstreamErrorKind::StreamInterrupted => {
                        last = Some(e);
                        if retry < stage.policy.num_retries {
                            let mut pause = backoff(stage.policy.retry_backoff, retry);
                            if let Some(d) = deadline {
                                pause = pause.min(d.saturating_duration_since(now));
                            }
                            tokio::time::sleep(pause).await;
                            retry += 1;
                            continue;
                        }
                        continue 'targets;
                    }
                    UpstreamErrorKind::ContextWindowExceeded => {
                        last = Some(e);
                        end = StageEnd::ContextWindow;
                        break 'targets;
                    }
                    UpstreamErrorKind::ContentPolicy => {
                        last = Some(e);
                        end = StageEnd::ContentPolicy;
                        break 'targets;
                    }
                    UpstreamErrorKind::BadRequest
                    | UpstreamErrorKind::StreamError
                    | UpstreamErrorKind::InvalidRequest
                    | UpstreamErrorKind::ModelNotFound => {
                        return Err(ApiError::Upstream(e));
                    }
                }
            }
        }
        let next: Vec<String> = match end {
            StageEnd::ContextWindow if !used_context => {
                used_context = true;
                primary.policy.context_window_fallbacks.clone()
            }
            StageEnd::ContentPolicy if !used_policy => {
                used_policy = true;
                primary.policy.content_policy_fallbacks.clone()
            }
            StageEnd::Exhausted if !used_generic => {
                used_generic = true;
                facts
                    .fallbacks
                    .iter()
                    .chain(primary.policy.fallbacks.iter())
                    .cloned()
                    .collect()
            }
            _ => Vec::new(),
        };
        for name in next {
            if tried.insert(name.clone()) {
                match routes
                    .resolve(&name)
                    .map(|r| super::restrict(r, facts.filter.as_ref()))
                {
                    Ok(Some(r)) => stages.push_back(r),
                    Ok(None) => log.push(format!("{name}: fallback not allowed")),
                    Err(_) => log.push(format!("{name}: fallback not found")),
                }
            }
        }
    }
    let context_only = last.is_none() && context_skips > 0;
    let rate_limited = last.is_none() && cooldown_skips > 0 && other_skips == 0;
    Err(ApiError::RouteFailed(Box::new(RouteFailure {
        model: primary.name.clone(),
        attempts,
        log,
        last,
        context_exceeded: context_only,
        rate_limited,
        retry_after: soonest_retry,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        for retry in 0..20 {
            let b = backoff(base, retry);
            let cap = base
                .saturating_mul(1 << retry.min(16))
                .min(Duration::from_secs(10));
            assert!(b <= cap, "retry {retry}: {b:?} > {cap:?}");
        }
        assert!(backoff(base, 30) <= Duration::from_secs(10));
    }
}
