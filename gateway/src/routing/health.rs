//! Per-target availability: the circuit breaker, the rate-limit cooldown after a 429,
//! the rpm/tpm/parallel caps, and latency EWMAs for ranking. Pure bookkeeping: nothing
//! here sleeps, spawns or reads the clock; every time-dependent method takes `now`.
//!
//! Invariants:
//! - Every admitted request holds a [`Permit`]; `in_flight` is exactly the number of live
//!   permits (incremented under the state lock in [`TargetHealth::admit`], decremented
//!   when the permit drops, whichever outcome method consumed it).
//! - At most one half-open probe is in flight. Only the probe's outcome moves a
//!   half-open circuit: success closes it, failure re-opens it for another `cooldown`,
//!   a 429 re-opens it for `max(retry_after, cooldown)`, a neutral outcome or a dropped
//!   permit frees the probe slot (the circuit stays half-open; the next admit probes).
//! - Outcomes of requests admitted before the circuit last opened are stale: they release
//!   their permit and feed the EWMAs and tpm correction, but never move the breaker
//!   (no consecutive-failure count, no window error, no circuit transition), so a slow
//!   tail of an old outage cannot re-open a circuit a good probe just closed.
//! - A 429 is not a breaker failure: it sets a cooldown and leaves the failure counts
//!   alone (it neither increments nor resets the consecutive failures).
//! - Closing a circuit clears the outcome counts of the error-rate window, so the errors
//!   that opened it cannot trip it again at once; rpm/tpm usage is kept.
//!
//! The sliding window is a ring of per-second buckets (granularity 1 s), allocated once,
//! each tagged with its absolute second; a bucket is zeroed lazily when a write finds an
//! older tag. Writes are O(1), reads O(buckets), no allocation after construction. The
//! ring holds `max(window, 60 s)` seconds (at most an hour):
//! - rpm and tpm always count the last 60 s, whatever `window` is (no scaling): a request
//!   counts from its admission for the 60 whole seconds starting with the one it was
//!   admitted in, i.e. between 59 and 60 s. Requests count when admitted, tokens by their
//!   estimate at admission, corrected by `actual - est` on success.
//! - The error rate counts completed outcomes (success, failure, neutral; not 429s nor
//!   dropped permits) over the last `window` seconds, rounded up to whole seconds.
//!
//! Seconds are counted from the first `now` a recording call sees, and never go
//! backwards: a `now` older than the latest one seen (threads racing to the lock) is
//! booked in the latest second.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::providers::{UpstreamError, UpstreamErrorKind};

/// Weight of a new sample in the latency EWMAs.
const EWMA_ALPHA: f64 = 0.2;
/// rpm and tpm are counted over this many seconds, whatever the breaker window.
const CAP_WINDOW_SECS: u64 = 60;
/// The error-rate window is clamped to this many seconds (the ring's size bound).
const MAX_WINDOW_SECS: u64 = 3600;
/// A provider's `Retry-After` is honoured up to this long; longer hints are clamped so a
/// bogus header cannot take a target out for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Any configured delay is clamped to this before it is added to an `Instant`, so the
/// addition cannot overflow.
const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);

/// Circuit-breaker settings for one target.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Open after this many consecutive failures (0 disables the rule).
    pub consecutive_failures: u32,
    /// Or when the error rate in the window is above this fraction ...
    pub error_rate: f64,
    /// ... over at least this many completed requests in the window.
    pub min_requests: u32,
    /// Sliding window of the error rate (whole seconds, 1 s to 1 h).
    pub window: Duration,
    /// Open -> half-open after this long.
    pub cooldown: Duration,
    /// Cooldown after a 429 without `Retry-After`.
    pub rate_limit_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            error_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
            rate_limit_cooldown: Duration::from_secs(10),
        }
    }
}

/// Operator-set limits for one target; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    /// Requests admitted in the last 60 s.
    pub rpm: Option<u32>,
    /// Tokens (estimated at admission, corrected on success) in the last 60 s.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_parallel: Option<u32>,
}

/// The breaker's state as reported. `Open` whose cooldown has elapsed reports as
/// `HalfOpen`: the next admitted request will be the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

/// Why a target cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The breaker is open; `retry_in` is when it (and any 429 cooldown) ends.
    CircuitOpen {
        retry_in: Duration,
    },
    /// Half-open, and the single probe is still out.
    ProbeInFlight,
    /// The provider answered 429; `retry_in` is what is left of the cooldown.
    Cooldown {
        retry_in: Duration,
    },
    RpmCap,
    TpmCap,
    ParallelCap,
}

/// A point-in-time view for the admin API and logs.
#[derive(Debug, Clone, Serialize)]
pub struct HealthSnapshot {
    pub circuit: Circuit,
    /// Whether a request with no token estimate would be admitted now.
    pub available: bool,
    pub consecutive_failures: u32,
    /// Completed outcomes (success, failure, neutral) in the error-rate window.
    pub requests_in_window: u32,
    pub errors_in_window: u32,
    /// `errors_in_window / requests_in_window`, 0 when there were none.
    pub error_rate: f64,
    pub in_flight: u32,
    pub ewma_latency_ms: Option<f64>,
    pub ewma_ttft_ms: Option<f64>,
    /// Time until the open circuit and the 429 cooldown both end; `None` when neither
    /// holds the target back.
    pub cooldown_remaining_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CircuitState {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

/// One second of the window. `sec == u64::MAX` marks a bucket never written.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    sec: u64,
    /// Requests admitted (rpm).
    admitted: u32,
    /// Tokens admitted, estimated then corrected (tpm).
    tokens: u64,
    /// Outcomes recorded: success, failure, neutral (error-rate denominator).
    completed: u32,
    /// Failures recorded (error-rate numerator).
    errors: u32,
}

impl Bucket {
    const UNUSED: Bucket = Bucket::at(u64::MAX);

    const fn at(sec: u64) -> Bucket {
        Bucket {
            sec,
            admitted: 0,
            tokens: 0,
            completed: 0,
            errors: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    admitted: u32,
    tokens: u64,
    completed: u32,
    errors: u32,
}

#[derive(Debug)]
struct State {
    circuit: CircuitState,
    /// Incremented each time the circuit opens; permits remember the value they saw.
    generation: u64,
    consecutive_failures: u32,
    rate_limited_until: Option<Instant>,
    /// The instant second 0 starts at: the first `now` a recording call saw.
    origin: Option<Instant>,
    /// The latest second recorded; seconds never go backwards.
    head: u64,
    buckets: Box<[Bucket]>,
    /// Seconds.
    ewma_latency: Option<f64>,
    ewma_ttft: Option<f64>,
}

impl State {
    /// The second `now` falls in, for a write: fixes the origin and advances the head.
    fn advance(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let sec = now.saturating_duration_since(origin).as_secs();
        if sec > self.head {
            self.head = sec;
        }
        self.head
    }

    /// The second `now` falls in, for a read (changes nothing).
    fn peek(&self, now: Instant) -> u64 {
        match self.origin {
            Some(origin) => now
                .saturating_duration_since(origin)
                .as_secs()
                .max(self.head),
            None => 0,
        }
    }

    /// The bucket of `sec`, zeroed first if it still holds an older second.
    fn bucket(&mut self, sec: u64) -> &mut Bucket {
        let n = self.buckets.len() as u64;
        let b = &mut self.buckets[(sec % n) as usize];
        if b.sec != sec {
            *b = Bucket::at(sec);
        }
        b
    }

    /// Sums over the `span` seconds ending with `sec`.
    fn totals(&self, sec: u64, span: u64) -> Totals {
        let lo = sec.saturating_sub(span.saturating_sub(1));
        let mut t = Totals::default();
        for b in self.buckets.iter().filter(|b| b.sec >= lo && b.sec <= sec) {
            t.admitted = t.admitted.saturating_add(b.admitted);
            t.tokens = t.tokens.saturating_add(b.tokens);
            t.completed = t.completed.saturating_add(b.completed);
            t.errors = t.errors.saturating_add(b.errors);
        }
        t
    }

    fn record_outcome(&mut self, now: Instant, error: bool) {
        let sec = self.advance(now);
        let b = self.bucket(sec);
        b.completed = b.completed.saturating_add(1);
        if error {
            b.errors = b.errors.saturating_add(1);
        }
    }

    fn open(&mut self, until: Instant) {
        self.circuit = CircuitState::Open { until };
        self.generation = self.generation.wrapping_add(1);
    }

    fn close(&mut self) {
        self.circuit = CircuitState::Closed;
        self.consecutive_failures = 0;
        for b in self.buckets.iter_mut() {
            b.completed = 0;
            b.errors = 0;
        }
    }

    /// The probe slot is free again; the circuit stays half-open.
    fn free_probe(&mut self) {
        if let CircuitState::HalfOpen { .. } = self.circuit {
            self.circuit = CircuitState::HalfOpen {
                probe_in_flight: false,
            };
        }
    }

    fn cooldown_left(&self, now: Instant) -> Duration {
        self.rate_limited_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }
}

fn ewma(old: Option<f64>, sample: Duration) -> f64 {
    let x = sample.as_secs_f64();
    match old {
        Some(v) => EWMA_ALPHA * x + (1.0 - EWMA_ALPHA) * v,
        None => x,
    }
}

/// EWMAs mix non-negative finite samples, so only a value past `Duration::MAX` can fail.
fn secs_to_duration(v: Option<f64>) -> Option<Duration> {
    v.map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
}

/// `now + d`, with `d` clamped so the addition cannot overflow.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(MAX_DELAY)).unwrap_or(now)
}

#[derive(Debug)]
struct Inner {
    breaker: BreakerConfig,
    caps: Caps,
    /// The error-rate window in whole seconds.
    window_secs: u64,
    state: Mutex<State>,
    in_flight: AtomicU32,
}

impl Inner {
    /// The state, recovering from a poisoned lock: every critical section leaves the
    /// state consistent between statements, so a panic elsewhere cannot corrupt it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What [`TargetHealth::admit`] would do.
struct Admission {
    probe: bool,
}

/// Availability tracking for one target. Internally synchronized: share it by
/// reference or `Arc`.
pub struct TargetHealth {
    inner: Arc<Inner>,
}

impl fmt::Debug for TargetHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("TargetHealth")
            .field("breaker", &self.inner.breaker)
            .field("caps", &self.inner.caps)
            .field("circuit", &st.circuit)
            .field("consecutive_failures", &st.consecutive_failures)
            .field("rate_limited_until", &st.rate_limited_until)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// Held while a request is in flight on the target; dropping it without recording counts
/// as neither success nor failure (client went away) but releases the parallel slot and,
/// if it was the half-open probe, frees the probe slot. Outcomes are recorded on the
/// target that issued the permit.
pub struct Permit {
    inner: Arc<Inner>,
    /// Holds the half-open probe slot (cleared once the outcome decided the circuit).
    probe: bool,
    est_tokens: u64,
    /// The second it was admitted in (its tokens live in that bucket).
    sec: u64,
    /// `State::generation` at admission.
    generation: u64,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("probe", &self.probe)
            .field("est_tokens", &self.est_tokens)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// Whether this request is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe {
            self.inner.lock().free_probe();
        }
        self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TargetHealth {
    pub fn new(breaker: BreakerConfig, caps: Caps) -> Self {
        let window_secs = breaker
            .window
            .as_secs()
            .saturating_add(u64::from(breaker.window.subsec_nanos() > 0))
            .clamp(1, MAX_WINDOW_SECS);
        let ring = window_secs.max(CAP_WINDOW_SECS) as usize;
        let state = State {
            circuit: CircuitState::Closed,
            generation: 0,
            consecutive_failures: 0,
            rate_limited_until: None,
            origin: None,
            head: 0,
            buckets: vec![Bucket::UNUSED; ring].into_boxed_slice(),
            ewma_latency: None,
            ewma_ttft: None,
        };
        TargetHealth {
            inner: Arc::new(Inner {
                breaker,
                caps,
                window_secs,
                state: Mutex::new(state),
                in_flight: AtomicU32::new(0),
            }),
        }
    }

    pub fn breaker(&self) -> &BreakerConfig {
        &self.inner.breaker
    }

    pub fn caps(&self) -> Caps {
        self.inner.caps
    }

    /// The one decision `check` and `admit` share. Order: circuit, probe slot, 429
    /// cooldown, parallel cap, rpm, tpm (token caps ignored when `est_tokens` is 0).
    fn evaluate(
        &self,
        st: &State,
        now: Instant,
        sec: u64,
        est_tokens: u64,
    ) -> Result<Admission, Unavailable> {
        let cooldown = st.cooldown_left(now);
        let probe = match st.circuit {
            CircuitState::Closed => false,
            CircuitState::Open { until } => {
                let left = until.saturating_duration_since(now);
                if !left.is_zero() {
                    return Err(Unavailable::CircuitOpen {
                        retry_in: left.max(cooldown),
                    });
                }
                true
            }
            CircuitState::HalfOpen { probe_in_flight } => {
                if probe_in_flight {
                    return Err(Unavailable::ProbeInFlight);
                }
                true
            }
        };
        if !cooldown.is_zero() {
            return Err(Unavailable::Cooldown { retry_in: cooldown });
        }
        let caps = &self.inner.caps;
        if let Some(max) = caps.max_parallel {
            if self.inner.in_flight.load(Ordering::Acquire) >= max {
                return Err(Unavailable::ParallelCap);
            }
        }
        let tpm = caps.tpm.filter(|_| est_tokens > 0);
        if caps.rpm.is_some() || tpm.is_some() {
            let used = st.totals(sec, CAP_WINDOW_SECS);
            if caps.rpm.is_some_and(|rpm| used.admitted >= rpm) {
                return Err(Unavailable::RpmCap);
            }
            if tpm.is_some_and(|tpm| used.tokens.saturating_add(est_tokens) > tpm) {
                return Err(Unavailable::TpmCap);
            }
        }
        Ok(Admission { probe })
    }

    /// Side-effect-free: would `admit` succeed now (ignoring token caps when
    /// `est_tokens` = 0)?
    pub fn check(&self, now: Instant, est_tokens: u64) -> Result<(), Unavailable> {
        let st = self.inner.lock();
        let sec = st.peek(now);
        self.evaluate(&st, now, sec, est_tokens).map(|_| ())
    }

    /// Takes a slot: counts the request against rpm and tpm (`est_tokens`) in the sliding
    /// window and against max_parallel. In state Open after the cooldown, the first
    /// caller becomes the single half-open probe (others get `ProbeInFlight` until the
    /// probe's outcome is recorded or its permit dropped).
    pub fn admit(&self, now: Instant, est_tokens: u64) -> Result<Permit, Unavailable> {
        let mut st = self.inner.lock();
        let sec = st.advance(now);
        let Admission { probe } = self.evaluate(&st, now, sec, est_tokens)?;
        if probe {
            st.circuit = CircuitState::HalfOpen {
                probe_in_flight: true,
            };
        }
        let b = st.bucket(sec);
        b.admitted = b.admitted.saturating_add(1);
        b.tokens = b.tokens.saturating_add(est_tokens);
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let generation = st.generation;
        drop(st);
        Ok(Permit {
            inner: self.inner.clone(),
            probe,
            est_tokens,
            sec,
            generation,
        })
    }

    /// Success: resets consecutive failures, closes a half-open circuit (when this was
    /// the probe), updates the EWMAs (alpha 0.2; the first sample initializes) of total
    /// latency and, when given, time to first token; corrects the tpm accounting by
    /// `actual_tokens - est_tokens` when actual is known and the admission is still in
    /// the window.
    pub fn success(
        &self,
        mut permit: Permit,
        now: Instant,
        total: Duration,
        ttft: Option<Duration>,
        actual_tokens: Option<u64>,
    ) {
        let inner = permit.inner.clone();
        let mut st = inner.lock();
        st.ewma_latency = Some(ewma(st.ewma_latency, total));
        if let Some(t) = ttft {
            st.ewma_ttft = Some(ewma(st.ewma_ttft, t));
        }
        if let Some(actual) = actual_tokens {
            let n = st.buckets.len() as u64;
            let b = &mut st.buckets[(permit.sec % n) as usize];
            if b.sec == permit.sec {
                b.tokens = b
                    .tokens
                    .saturating_sub(permit.est_tokens)
                    .saturating_add(actual);
            }
        }
        if permit.generation == st.generation {
            if permit.probe {
                st.close();
                permit.probe = false;
            }
            st.consecutive_failures = 0;
            st.record_outcome(now, false);
        }
        drop(st);
        drop(permit);
    }

    /// A failure that says something about the target (connect, timeout, 5xx, invalid
    /// response, interrupted stream): counts toward both breaker rules; a failed
    /// half-open probe re-opens the circuit for another cooldown.
    pub fn failure(&self, mut permit: Permit, now: Instant) {
        let inner = permit.inner.clone();
        let cfg = &inner.breaker;
        let mut st = inner.lock();
        if permit.generation == st.generation {
            st.consecutive_failures = st.consecutive_failures.saturating_add(1);
            st.record_outcome(now, true);
            if permit.probe {
                permit.probe = false;
                st.open(after(now, cfg.cooldown));
            } else if st.circuit == CircuitState::Closed {
                let by_count = cfg.consecutive_failures > 0
                    && st.consecutive_failures >= cfg.consecutive_failures;
                let trip = by_count || {
                    let w = st.totals(st.head, inner.window_secs);
                    w.completed > 0
                        && w.completed >= cfg.min_requests
                        && f64::from(w.errors) / f64::from(w.completed) > cfg.error_rate
                };
                if trip {
                    st.open(after(now, cfg.cooldown));
                }
            }
        }
        drop(st);
        drop(permit);
    }

    /// 429: the target is in cooldown until `now + retry_after` (clamped to
    /// [`MAX_RETRY_AFTER`]) or `rate_limit_cooldown`; an existing longer cooldown is
    /// kept. Not a breaker failure. A half-open probe that gets 429 goes back to Open for
    /// `max(retry_after, cooldown)`.
    pub fn rate_limited(&self, mut permit: Permit, now: Instant, retry_after: Option<Duration>) {
        let inner = permit.inner.clone();
        let cfg = &inner.breaker;
        let wait = retry_after
            .map_or(cfg.rate_limit_cooldown, |d| d.min(MAX_RETRY_AFTER))
            .min(MAX_DELAY);
        let until = after(now, wait);
        let mut st = inner.lock();
        st.rate_limited_until = Some(st.rate_limited_until.map_or(until, |u| u.max(until)));
        if permit.probe {
            permit.probe = false;
            st.open(after(now, wait.max(cfg.cooldown)));
        }
        drop(st);
        drop(permit);
    }

    /// Outcome neutral to health (the client's own error, e.g. 400): releases the
    /// permit, counts as a completed request for the error-rate denominator, not a
    /// failure. A neutral probe frees the probe slot; the circuit stays half-open.
    pub fn neutral(&self, permit: Permit, now: Instant) {
        let inner = permit.inner.clone();
        let mut st = inner.lock();
        if permit.generation == st.generation {
            st.record_outcome(now, false);
        }
        drop(st);
        // Dropping a probe's permit frees the probe slot; the circuit stays half-open.
        drop(permit);
    }

    /// Records an upstream error by its kind: connect, timeout, 5xx, invalid response,
    /// interrupted stream and refused credentials (the target is unusable until an
    /// operator acts) are failures; 429 is [`Self::rate_limited`] with the provider's
    /// hint; the provider rejecting the request itself (400/404/422, an error event in
    /// a stream) is neutral.
    pub fn record_error(&self, permit: Permit, now: Instant, err: &UpstreamError) {
        match err.kind {
            UpstreamErrorKind::RateLimited => self.rate_limited(permit, now, err.retry_after),
            UpstreamErrorKind::BadRequest
            | UpstreamErrorKind::StreamError
            | UpstreamErrorKind::ContextWindowExceeded
            | UpstreamErrorKind::ContentPolicy
            | UpstreamErrorKind::InvalidRequest
            | UpstreamErrorKind::ModelNotFound
            // A full local queue is momentary: the next request may fit; no cooldown.
            | UpstreamErrorKind::Overloaded => self.neutral(permit, now),
            UpstreamErrorKind::ModelChanged | UpstreamErrorKind::ModelLoadFailed => {
                self.failure(permit, now)
            }
            UpstreamErrorKind::Connect
            | UpstreamErrorKind::Timeout
            | UpstreamErrorKind::Server
            | UpstreamErrorKind::Auth
            | UpstreamErrorKind::InvalidResponse
            | UpstreamErrorKind::StreamInterrupted => self.failure(permit, now),
        }
    }

    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let st = self.inner.lock();
        let sec = st.peek(now);
        let available = self.evaluate(&st, now, sec, 0).is_ok();
        let (circuit, open_left) = match st.circuit {
            CircuitState::Closed => (Circuit::Closed, Duration::ZERO),
            CircuitState::Open { until } => {
                let left = until.saturating_duration_since(now);
                if left.is_zero() {
                    (Circuit::HalfOpen, left)
                } else {
                    (Circuit::Open, left)
                }
            }
            CircuitState::HalfOpen { .. } => (Circuit::HalfOpen, Duration::ZERO),
        };
        let w = st.totals(sec, self.inner.window_secs);
        let left = open_left.max(st.cooldown_left(now));
        HealthSnapshot {
            circuit,
            available,
            consecutive_failures: st.consecutive_failures,
            requests_in_window: w.completed,
            errors_in_window: w.errors,
            error_rate: if w.completed == 0 {
                0.0
            } else {
                f64::from(w.errors) / f64::from(w.completed)
            },
            in_flight: self.in_flight(),
            ewma_latency_ms: st.ewma_latency.map(|s| s * 1000.0),
            ewma_ttft_ms: st.ewma_ttft.map(|s| s * 1000.0),
            cooldown_remaining_ms: (!left.is_zero())
                .then(|| u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Current EWMA of total latency, for ranking (None until the first success).
    pub fn ewma_latency(&self) -> Option<Duration> {
        secs_to_duration(self.inner.lock().ewma_latency)
    }

    /// Current EWMA of time to first token (None until a success reported one).
    pub fn ewma_ttft(&self) -> Option<Duration> {
        secs_to_duration(self.inner.lock().ewma_ttft)
    }

    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::thread;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn breaker(consecutive: u32, rate: f64, min: u32) -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: consecutive,
            error_rate: rate,
            min_requests: min,
            ..BreakerConfig::default()
        }
    }

    fn health(consecutive: u32) -> TargetHealth {
        TargetHealth::new(breaker(consecutive, 1.0, u32::MAX), Caps::default())
    }

    fn fail(h: &TargetHealth, now: Instant) {
        let p = h.admit(now, 0).unwrap();
        h.failure(p, now);
    }

    fn ok(h: &TargetHealth, now: Instant) {
        let p = h.admit(now, 0).unwrap();
        h.success(p, now, 100 * MS, None, None);
    }

    /// Opens `h` (3 consecutive failures) at `t0`; returns the probe time.
    fn open3(h: &TargetHealth, t0: Instant) -> Instant {
        for _ in 0..3 {
            fail(h, t0);
        }
        assert_eq!(h.snapshot(t0).circuit, Circuit::Open);
        t0 + h.breaker().cooldown
    }

    /// Tokens and requests admitted in the cap window (test-only view).
    fn usage(h: &TargetHealth, now: Instant) -> (u32, u64) {
        let st = h.inner.lock();
        let t = st.totals(st.peek(now), CAP_WINDOW_SECS);
        (t.admitted, t.tokens)
    }

    #[test]
    fn defaults() {
        let c = BreakerConfig::default();
        assert_eq!(c.consecutive_failures, 5);
        assert_eq!(c.error_rate, 0.5);
        assert_eq!(c.min_requests, 20);
        assert_eq!(c.window, 60 * S);
        assert_eq!(c.cooldown, 30 * S);
        assert_eq!(c.rate_limit_cooldown, 10 * S);
        let h = TargetHealth::new(c, Caps::default());
        let t0 = Instant::now();
        assert_eq!(h.check(t0, 1_000_000), Ok(()));
        assert_eq!(h.ewma_latency(), None);
        assert_eq!(h.ewma_ttft(), None);
        assert_eq!(h.in_flight(), 0);
    }

    #[test]
    fn opens_after_n_consecutive_failures_and_not_before() {
        let h = health(3);
        let t0 = Instant::now();
        fail(&h, t0);
        fail(&h, t0);
        assert_eq!(h.check(t0, 0), Ok(()));
        assert_eq!(h.snapshot(t0).consecutive_failures, 2);
        // A success in between resets the count.
        ok(&h, t0);
        assert_eq!(h.snapshot(t0).consecutive_failures, 0);
        fail(&h, t0 + S);
        fail(&h, t0 + S);
        assert_eq!(h.snapshot(t0 + S).circuit, Circuit::Closed);
        fail(&h, t0 + S);
        assert_eq!(
            h.check(t0 + S, 0),
            Err(Unavailable::CircuitOpen { retry_in: 30 * S })
        );
        assert!(matches!(
            h.admit(t0 + S, 0),
            Err(Unavailable::CircuitOpen { .. })
        ));
        assert_eq!(
            h.check(t0 + 30 * S, 0),
            Err(Unavailable::CircuitOpen { retry_in: S })
        );
        assert_eq!(h.check(t0 + 31 * S, 0), Ok(()));
    }

    #[test]
    fn zero_consecutive_failures_disables_that_rule() {
        let h = health(0);
        let t0 = Instant::now();
        for _ in 0..100 {
            fail(&h, t0);
        }
        assert_eq!(h.snapshot(t0).circuit, Circuit::Closed);
    }

    #[test]
    fn opens_on_error_rate_only_with_min_requests() {
        let h = TargetHealth::new(breaker(100, 0.5, 10), Caps::default());
        let t0 = Instant::now();
        // 9 completed, 5 errors (56 %): under min_requests, stays closed.
        for i in 0..9 {
            if i % 2 == 0 {
                fail(&h, t0);
            } else {
                ok(&h, t0);
            }
        }
        let s = h.snapshot(t0);
        assert_eq!((s.requests_in_window, s.errors_in_window), (9, 5));
        assert_eq!(s.circuit, Circuit::Closed);
        // The 10th (6/10 = 60 % > 50 %) trips it.
        fail(&h, t0 + S);
        assert_eq!(h.snapshot(t0 + S).circuit, Circuit::Open);
    }

    #[test]
    fn error_rate_must_be_above_the_threshold() {
        let h = TargetHealth::new(breaker(100, 0.5, 10), Caps::default());
        let t0 = Instant::now();
        for _ in 0..5 {
            ok(&h, t0);
            fail(&h, t0);
        }
        let s = h.snapshot(t0);
        assert_eq!(s.error_rate, 0.5);
        assert_eq!(s.circuit, Circuit::Closed, "exactly 50 % is not above 50 %");
        fail(&h, t0);
        assert_eq!(h.snapshot(t0).circuit, Circuit::Open);
    }

    #[test]
    fn old_errors_leave_the_window() {
        let h = TargetHealth::new(breaker(100, 0.5, 4), Caps::default());
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&h, t0);
        }
        // 60 s later those three are gone: one more failure is 1 of 1 (< min 4).
        let t1 = t0 + 60 * S;
        assert_eq!(h.snapshot(t1).requests_in_window, 0);
        fail(&h, t1);
        let s = h.snapshot(t1);
        assert_eq!((s.requests_in_window, s.errors_in_window), (1, 1));
        assert_eq!(s.circuit, Circuit::Closed);
        // Still inside the window at +59 s: 3 + 1 would have tripped it.
        let h = TargetHealth::new(breaker(100, 0.5, 4), Caps::default());
        for _ in 0..3 {
            fail(&h, t0);
        }
        fail(&h, t0 + 59 * S);
        assert_eq!(h.snapshot(t0 + 59 * S).circuit, Circuit::Open);
    }

    #[test]
    fn error_window_follows_config() {
        let cfg = BreakerConfig {
            window: 10 * S,
            ..breaker(100, 0.5, 2)
        };
        let h = TargetHealth::new(cfg, Caps::default());
        let t0 = Instant::now();
        fail(&h, t0);
        assert_eq!(h.snapshot(t0 + 9 * S).requests_in_window, 1);
        assert_eq!(h.snapshot(t0 + 10 * S).requests_in_window, 0);
        fail(&h, t0 + 10 * S);
        assert_eq!(h.snapshot(t0 + 10 * S).circuit, Circuit::Closed);
    }

    #[test]
    fn neutral_counts_in_the_denominator_only() {
        let h = TargetHealth::new(breaker(100, 0.5, 10), Caps::default());
        let t0 = Instant::now();
        for _ in 0..4 {
            let p = h.admit(t0, 0).unwrap();
            h.neutral(p, t0);
        }
        assert_eq!(h.in_flight(), 0);
        for _ in 0..5 {
            fail(&h, t0);
        }
        let s = h.snapshot(t0);
        assert_eq!((s.requests_in_window, s.errors_in_window), (9, 5));
        assert_eq!(s.consecutive_failures, 5);
        assert_eq!(s.circuit, Circuit::Closed);
        // 6 errors of 10 completed: the neutral ones made the minimum.
        fail(&h, t0);
        assert_eq!(h.snapshot(t0).circuit, Circuit::Open);
    }

    #[test]
    fn neutral_does_not_reset_consecutive_failures() {
        let h = health(3);
        let t0 = Instant::now();
        fail(&h, t0);
        fail(&h, t0);
        let p = h.admit(t0, 0).unwrap();
        h.neutral(p, t0);
        fail(&h, t0);
        assert_eq!(h.snapshot(t0).circuit, Circuit::Open);
    }

    #[test]
    fn one_probe_after_cooldown_and_a_good_probe_closes() {
        let h = health(3);
        let t0 = Instant::now();
        let t1 = open3(&h, t0);
        assert!(matches!(
            h.admit(t1 - MS, 0),
            Err(Unavailable::CircuitOpen { .. })
        ));
        assert_eq!(h.snapshot(t1).circuit, Circuit::HalfOpen);
        assert_eq!(h.check(t1, 0), Ok(()));
        let probe = h.admit(t1, 0).unwrap();
        assert!(probe.is_probe());
        for _ in 0..3 {
            assert_eq!(h.admit(t1, 0).err(), Some(Unavailable::ProbeInFlight));
            assert_eq!(h.check(t1 + 5 * S, 0), Err(Unavailable::ProbeInFlight));
        }
        assert_eq!(h.in_flight(), 1);
        let s = h.snapshot(t1);
        assert_eq!(s.circuit, Circuit::HalfOpen);
        assert!(!s.available);
        h.success(probe, t1 + S, S, None, None);
        let s = h.snapshot(t1 + S);
        assert_eq!(s.circuit, Circuit::Closed);
        assert!(s.available);
        assert_eq!(s.consecutive_failures, 0);
        // Closing cleared the window's outcomes: only the probe's success is left.
        assert_eq!((s.requests_in_window, s.errors_in_window), (1, 0));
        let a = h.admit(t1 + S, 0).unwrap();
        let b = h.admit(t1 + S, 0).unwrap();
        assert!(!a.is_probe() && !b.is_probe());
    }

    #[test]
    fn closing_clears_the_error_window() {
        // Both rules armed: 3 consecutive, or > 50 % over 4 requests.
        let h = TargetHealth::new(breaker(3, 0.5, 4), Caps::default());
        let t0 = Instant::now();
        let t1 = open3(&h, t0);
        let probe = h.admit(t1, 0).unwrap();
        h.success(probe, t1, S, None, None);
        // Without the reset, 4 errors of 5 would re-open it at once.
        fail(&h, t1);
        fail(&h, t1);
        assert_eq!(h.snapshot(t1).errors_in_window, 2);
        assert_eq!(h.snapshot(t1).circuit, Circuit::Closed);
        fail(&h, t1);
        assert_eq!(h.snapshot(t1).circuit, Circuit::Open);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cooldown() {
        let h = health(3);
        let t0 = Instant::now();
        let t1 = open3(&h, t0);
        let probe = h.admit(t1, 0).unwrap();
        let t2 = t1 + 2 * S;
        h.failure(probe, t2);
        let s = h.snapshot(t2);
        assert_eq!(s.circuit, Circuit::Open);
        assert_eq!(s.consecutive_failures, 4);
        assert_eq!(s.cooldown_remaining_ms, Some(30_000));
        assert_eq!(
            h.check(t2, 0),
            Err(Unavailable::CircuitOpen { retry_in: 30 * S })
        );
        assert!(h.admit(t2 + 30 * S - MS, 0).is_err());
        let probe = h.admit(t2 + 30 * S, 0).unwrap();
        assert!(probe.is_probe());
        h.success(probe, t2 + 31 * S, S, None, None);
        assert_eq!(h.snapshot(t2 + 31 * S).circuit, Circuit::Closed);
    }

    #[test]
    fn a_dropped_probe_frees_the_probe_slot() {
        let h = health(3);
        let t0 = Instant::now();
        let t1 = open3(&h, t0);
        let probe = h.admit(t1, 0).unwrap();
        assert_eq!(h.check(t1, 0), Err(Unavailable::ProbeInFlight));
        drop(probe);
        assert_eq!(h.in_flight(), 0);
        let s = h.snapshot(t1);
        assert_eq!(s.circuit, Circuit::HalfOpen);
        assert!(s.available);
        assert_eq!(s.consecutive_failures, 3, "a drop is not an outcome");
        let probe = h.admit(t1, 0).unwrap();
        assert!(probe.is_probe());
        assert_eq!(h.admit(t1, 0).err(), Some(Unavailable::ProbeInFlight));
        h.success(probe, t1, S, None, None);
        assert_eq!(h.snapshot(t1).circuit, Circuit::Closed);
    }

    #[test]
    fn a_neutral_probe_frees_the_probe_slot() {
        let h = health(3);
        let t0 = Instant::now();
        let t1 = open3(&h, t0);
        let probe = h.admit(t1, 0).unwrap();
        h.neutral(probe, t1);
        assert_eq!(h.snapshot(t1).circuit, Circuit::HalfOpen);
        assert!(h.admit(t1, 0).unwrap().is_probe());
    }

    #[test]
    fn stale_outcomes_do_not_move_the_breaker() {
        let h = health(3);
        let t0 = Instant::now();
        // Three long requests admitted while closed, still out when the circuit opens.
        let old: Vec<_> = (0..4).map(|_| h.admit(t0, 0).unwrap()).collect();
        let t1 = open3(&h, t0);
        let probe = h.admit(t1, 0).unwrap();
        h.success(probe, t1, S, None, None);
        let mut old = old.into_iter();
        for p in old.by_ref().take(3) {
            h.failure(p, t1 + S);
        }
        let s = h.snapshot(t1 + S);
        assert_eq!(s.circuit, Circuit::Closed);
        assert_eq!(s.consecutive_failures, 0);
        assert_eq!(s.errors_in_window, 0);
        // A stale success neither counts nor closes anything, but feeds the EWMA.
        if let Some(p) = old.next() {
            h.success(p, t1 + S, 3 * S, None, None);
        }
        assert_eq!(h.snapshot(t1 + S).requests_in_window, 1);
        assert_eq!(h.in_flight(), 0);
        let ewma = h.ewma_latency().unwrap().as_secs_f64();
        assert!((ewma - (0.2 * 3.0 + 0.8 * 1.0)).abs() < 1e-9);
    }

    #[test]
    fn stale_success_does_not_close_a_half_open_circuit() {
        let h = health(3);
        let t0 = Instant::now();
        let old = h.admit(t0, 0).unwrap();
        let t1 = open3(&h, t0);
        let probe = h.admit(t1, 0).unwrap();
        h.success(old, t1, S, None, None);
        assert_eq!(h.check(t1, 0), Err(Unavailable::ProbeInFlight));
        h.failure(probe, t1);
        assert_eq!(h.snapshot(t1).circuit, Circuit::Open);
    }

    #[test]
    fn rate_limited_with_and_without_retry_after() {
        let h = health(1);
        let t0 = Instant::now();
        let p = h.admit(t0, 0).unwrap();
        h.rate_limited(p, t0, Some(20 * S));
        assert_eq!(h.in_flight(), 0);
        assert_eq!(
            h.check(t0 + 5 * S, 0),
            Err(Unavailable::Cooldown { retry_in: 15 * S })
        );
        assert_eq!(
            h.admit(t0 + 5 * S, 0).err(),
            Some(Unavailable::Cooldown { retry_in: 15 * S })
        );
        let s = h.snapshot(t0 + 5 * S);
        // Not a breaker failure, even with a threshold of one.
        assert_eq!(s.circuit, Circuit::Closed);
        assert_eq!(s.consecutive_failures, 0);
        assert_eq!((s.requests_in_window, s.errors_in_window), (0, 0));
        assert!(!s.available);
        assert_eq!(s.cooldown_remaining_ms, Some(15_000));
        assert_eq!(h.check(t0 + 20 * S, 0), Ok(()));

        // Without Retry-After: rate_limit_cooldown (10 s).
        let t1 = t0 + 20 * S;
        let p = h.admit(t1, 0).unwrap();
        h.rate_limited(p, t1, None);
        assert_eq!(
            h.check(t1, 0),
            Err(Unavailable::Cooldown { retry_in: 10 * S })
        );
        assert_eq!(h.check(t1 + 10 * S, 0), Ok(()));
        assert_eq!(h.snapshot(t1 + 10 * S).cooldown_remaining_ms, None);
    }

    #[test]
    fn rate_limit_keeps_the_longer_cooldown_and_clamps_hints() {
        let h = health(5);
        let t0 = Instant::now();
        let a = h.admit(t0, 0).unwrap();
        let b = h.admit(t0, 0).unwrap();
        h.rate_limited(a, t0, Some(30 * S));
        h.rate_limited(b, t0, Some(2 * S));
        assert_eq!(
            h.check(t0, 0),
            Err(Unavailable::Cooldown { retry_in: 30 * S })
        );
        let p = h.admit(t0 + 30 * S, 0).unwrap();
        h.rate_limited(p, t0 + 30 * S, Some(Duration::MAX));
        assert_eq!(
            h.check(t0 + 30 * S, 0),
            Err(Unavailable::Cooldown {
                retry_in: MAX_RETRY_AFTER
            })
        );
    }

    #[test]
    fn rate_limit_does_not_reset_consecutive_failures() {
        let h = health(3);
        let t0 = Instant::now();
        fail(&h, t0);
        fail(&h, t0);
        let p = h.admit(t0, 0).unwrap();
        h.rate_limited(p, t0, Some(S));
        assert_eq!(h.snapshot(t0).consecutive_failures, 2);
        fail(&h, t0 + S);
        assert_eq!(h.snapshot(t0 + S).circuit, Circuit::Open);
    }

    #[test]
    fn rate_limited_probe_reopens_for_the_longer_of_hint_and_cooldown() {
        let h = health(3);
        let t0 = Instant::now();
        let t1 = open3(&h, t0);
        let probe = h.admit(t1, 0).unwrap();
        h.rate_limited(probe, t1, Some(60 * S));
        assert_eq!(h.snapshot(t1).circuit, Circuit::Open);
        assert_eq!(
            h.check(t1, 0),
            Err(Unavailable::CircuitOpen { retry_in: 60 * S })
        );
        assert_eq!(h.snapshot(t1).consecutive_failures, 3);
        let t2 = t1 + 60 * S;
        let probe = h.admit(t2, 0).unwrap();
        assert!(probe.is_probe());
        h.rate_limited(probe, t2, Some(5 * S));
        // Open for the cooldown (30 s); the 5 s cooldown ended long before.
        assert_eq!(
            h.check(t2 + 5 * S, 0),
            Err(Unavailable::CircuitOpen { retry_in: 25 * S })
        );
        assert_eq!(h.snapshot(t2).cooldown_remaining_ms, Some(30_000));
        let probe = h.admit(t2 + 30 * S, 0).unwrap();
        assert!(probe.is_probe());
        h.rate_limited(probe, t2 + 30 * S, None);
        assert_eq!(
            h.check(t2 + 30 * S, 0),
            Err(Unavailable::CircuitOpen { retry_in: 30 * S })
        );
    }

    #[test]
    fn cooldown_during_an_open_circuit_extends_retry_in() {
        let h = health(1);
        let t0 = Instant::now();
        let a = h.admit(t0, 0).unwrap();
        fail(&h, t0);
        h.rate_limited(a, t0, Some(45 * S));
        assert_eq!(
            h.check(t0, 0),
            Err(Unavailable::CircuitOpen { retry_in: 45 * S })
        );
        assert_eq!(
            h.check(t0 + 30 * S, 0),
            Err(Unavailable::Cooldown { retry_in: 15 * S })
        );
        assert_eq!(h.snapshot(t0).cooldown_remaining_ms, Some(45_000));
    }

    #[test]
    fn rpm_cap_refuses_then_admits_after_the_window_slides() {
        let caps = Caps {
            rpm: Some(3),
            ..Caps::default()
        };
        let h = TargetHealth::new(BreakerConfig::default(), caps);
        let t0 = Instant::now();
        for i in 0..3 {
            drop(h.admit(t0 + 10 * i * S, 0).unwrap());
        }
        assert_eq!(h.admit(t0 + 30 * S, 0).err(), Some(Unavailable::RpmCap));
        assert_eq!(h.check(t0 + 30 * S, 0), Err(Unavailable::RpmCap));
        // The request of second 0 still counts during second 59 ...
        assert_eq!(h.check(t0 + 59 * S + 999 * MS, 0), Err(Unavailable::RpmCap));
        // ... and is gone at second 60.
        drop(h.admit(t0 + 60 * S, 0).unwrap());
        assert_eq!(h.admit(t0 + 60 * S, 0).err(), Some(Unavailable::RpmCap));
        drop(h.admit(t0 + 70 * S, 0).unwrap());
        assert_eq!(usage(&h, t0 + 70 * S).0, 3);
        // Refusals are not counted.
        assert_eq!(usage(&h, t0 + 200 * S).0, 0);
    }

    #[test]
    fn rpm_counts_the_last_60_s_whatever_the_window() {
        let cfg = BreakerConfig {
            window: 10 * S,
            ..BreakerConfig::default()
        };
        let caps = Caps {
            rpm: Some(1),
            ..Caps::default()
        };
        let h = TargetHealth::new(cfg, caps);
        let t0 = Instant::now();
        drop(h.admit(t0, 0).unwrap());
        assert_eq!(h.check(t0 + 30 * S, 0), Err(Unavailable::RpmCap));
        assert_eq!(h.check(t0 + 60 * S, 0), Ok(()));
    }

    #[test]
    fn tpm_cap_with_estimates_and_correction() {
        let caps = Caps {
            tpm: Some(1000),
            ..Caps::default()
        };
        let h = TargetHealth::new(BreakerConfig::default(), caps);
        let t0 = Instant::now();
        let a = h.admit(t0, 600).unwrap();
        assert_eq!(h.check(t0, 400), Ok(()));
        assert_eq!(h.check(t0, 401), Err(Unavailable::TpmCap));
        assert_eq!(h.admit(t0, 500).err(), Some(Unavailable::TpmCap));
        // The estimate was high: 600 -> 300.
        h.success(a, t0 + S, S, None, Some(300));
        assert_eq!(usage(&h, t0 + S), (1, 300));
        let b = h.admit(t0 + S, 500).unwrap();
        assert_eq!(usage(&h, t0 + S).1, 800);
        // The estimate was low: 500 -> 700, now over the cap.
        h.success(b, t0 + 2 * S, S, None, Some(700));
        assert_eq!(usage(&h, t0 + 2 * S).1, 1000);
        assert_eq!(h.check(t0 + 2 * S, 1), Err(Unavailable::TpmCap));
        // No estimate: token caps are ignored.
        assert_eq!(h.check(t0 + 2 * S, 0), Ok(()));
        // Both slide out with their admission seconds.
        assert_eq!(usage(&h, t0 + 60 * S).1, 700);
        assert_eq!(h.check(t0 + 60 * S, 300), Ok(()));
        assert_eq!(h.check(t0 + 61 * S, 1000), Ok(()));
        // A request larger than the whole cap is never admitted.
        assert_eq!(h.check(t0 + 200 * S, 1001), Err(Unavailable::TpmCap));
    }

    #[test]
    fn tpm_correction_after_the_admission_left_the_window_is_dropped() {
        let caps = Caps {
            tpm: Some(1000),
            ..Caps::default()
        };
        let h = TargetHealth::new(BreakerConfig::default(), caps);
        let t0 = Instant::now();
        let a = h.admit(t0, 100).unwrap();
        let b = h.admit(t0 + 70 * S, 100).unwrap();
        h.success(a, t0 + 80 * S, S, None, Some(900));
        assert_eq!(usage(&h, t0 + 80 * S).1, 100);
        // Without an actual count the estimate stands.
        h.success(b, t0 + 80 * S, S, None, None);
        assert_eq!(usage(&h, t0 + 80 * S).1, 100);
    }

    #[test]
    fn max_parallel_refuses_while_permits_are_held() {
        let caps = Caps {
            max_parallel: Some(2),
            ..Caps::default()
        };
        let h = TargetHealth::new(BreakerConfig::default(), caps);
        let t0 = Instant::now();
        let a = h.admit(t0, 0).unwrap();
        let b = h.admit(t0, 0).unwrap();
        assert_eq!(h.in_flight(), 2);
        assert_eq!(h.admit(t0, 0).err(), Some(Unavailable::ParallelCap));
        assert_eq!(h.check(t0, 0), Err(Unavailable::ParallelCap));
        drop(a);
        let c = h.admit(t0, 0).unwrap();
        assert_eq!(h.admit(t0, 0).err(), Some(Unavailable::ParallelCap));
        h.success(b, t0, S, None, None);
        h.failure(c, t0);
        assert_eq!(h.in_flight(), 0);
        assert_eq!(h.snapshot(t0).in_flight, 0);
        assert!(h.admit(t0, 0).is_ok());
    }

    #[test]
    fn ewma_arithmetic() {
        let h = health(5);
        let t0 = Instant::now();
        let p = h.admit(t0, 0).unwrap();
        h.success(p, t0, 100 * MS, None, None);
        assert_eq!(h.ewma_latency(), Some(100 * MS));
        assert_eq!(h.ewma_ttft(), None, "no TTFT sample yet");
        let p = h.admit(t0, 0).unwrap();
        h.success(p, t0, 200 * MS, Some(50 * MS), None);
        let close = |d: Option<Duration>, ms: f64| {
            let got = d.unwrap().as_secs_f64() * 1000.0;
            assert!((got - ms).abs() < 1e-6, "{got} != {ms}");
        };
        close(h.ewma_latency(), 120.0);
        close(h.ewma_ttft(), 50.0);
        let p = h.admit(t0, 0).unwrap();
        h.success(p, t0, 50 * MS, Some(100 * MS), None);
        close(h.ewma_latency(), 0.2 * 50.0 + 0.8 * 120.0);
        close(h.ewma_ttft(), 0.2 * 100.0 + 0.8 * 50.0);
        // Failures and neutral outcomes leave the EWMAs alone.
        fail(&h, t0);
        let p = h.admit(t0, 0).unwrap();
        h.neutral(p, t0);
        close(h.ewma_latency(), 106.0);
        let s = h.snapshot(t0);
        assert!((s.ewma_latency_ms.unwrap() - 106.0).abs() < 1e-6);
        assert!((s.ewma_ttft_ms.unwrap() - 60.0).abs() < 1e-6);
    }

    #[test]
    fn snapshot_fields() {
        let caps = Caps {
            rpm: Some(100),
            ..Caps::default()
        };
        let h = TargetHealth::new(breaker(5, 0.9, 100), caps);
        let t0 = Instant::now();
        let s = h.snapshot(t0);
        assert_eq!(s.circuit, Circuit::Closed);
        assert!(s.available);
        assert_eq!(s.consecutive_failures, 0);
        assert_eq!((s.requests_in_window, s.errors_in_window), (0, 0));
        assert_eq!(s.error_rate, 0.0);
        assert_eq!(s.in_flight, 0);
        assert_eq!((s.ewma_latency_ms, s.ewma_ttft_ms), (None, None));
        assert_eq!(s.cooldown_remaining_ms, None);

        ok(&h, t0);
        fail(&h, t0);
        fail(&h, t0 + S);
        let p = h.admit(t0 + S, 0).unwrap();
        h.neutral(p, t0 + S);
        let _held = h.admit(t0 + S, 0).unwrap();
        let s = h.snapshot(t0 + 2 * S);
        assert_eq!(s.circuit, Circuit::Closed);
        assert!(s.available);
        assert_eq!(s.consecutive_failures, 2);
        assert_eq!((s.requests_in_window, s.errors_in_window), (4, 2));
        assert_eq!(s.error_rate, 0.5);
        assert_eq!(s.in_flight, 1);
        assert_eq!(s.ewma_latency_ms, Some(100.0));
        assert_eq!(s.ewma_ttft_ms, None);
        assert_eq!(s.cooldown_remaining_ms, None);

        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["circuit"], "closed");
        assert_eq!(json["requests_in_window"], 4);
        assert_eq!(json["cooldown_remaining_ms"], serde_json::Value::Null);
        assert_eq!(
            serde_json::to_value(Circuit::HalfOpen).unwrap(),
            "half_open"
        );
        // The snapshot reads, never records.
        assert_eq!(usage(&h, t0 + 2 * S).0, 5);
    }

    #[test]
    fn check_is_side_effect_free() {
        let caps = Caps {
            rpm: Some(1),
            tpm: Some(10),
            max_parallel: Some(1),
        };
        let h = health(3);
        let t0 = Instant::now();
        let t1 = open3(&h, t0);
        for _ in 0..5 {
            assert_eq!(h.check(t1, 0), Ok(()));
        }
        assert!(h.admit(t1, 0).unwrap().is_probe());
        let h = TargetHealth::new(BreakerConfig::default(), caps);
        for _ in 0..5 {
            assert_eq!(h.check(t0, 10), Ok(()));
        }
        assert_eq!(h.in_flight(), 0);
        assert_eq!(usage(&h, t0), (0, 0));
        assert!(h.admit(t0, 10).is_ok());
    }

    #[test]
    fn record_error_maps_kinds() {
        let t0 = Instant::now();
        let err = |kind| UpstreamError::new(kind, "p", "x");
        for kind in [
            UpstreamErrorKind::Connect,
            UpstreamErrorKind::Timeout,
            UpstreamErrorKind::Server,
            UpstreamErrorKind::Auth,
            UpstreamErrorKind::InvalidResponse,
            UpstreamErrorKind::StreamInterrupted,
        ] {
            let h = health(1);
            let p = h.admit(t0, 0).unwrap();
            h.record_error(p, t0, &err(kind));
            assert_eq!(h.snapshot(t0).circuit, Circuit::Open, "{kind:?}");
        }
        for kind in [
            UpstreamErrorKind::BadRequest,
            UpstreamErrorKind::StreamError,
        ] {
            let h = health(1);
            let p = h.admit(t0, 0).unwrap();
            h.record_error(p, t0, &err(kind));
            let s = h.snapshot(t0);
            assert_eq!(s.circuit, Circuit::Closed, "{kind:?}");
            assert_eq!((s.requests_in_window, s.errors_in_window), (1, 0));
        }
        let h = health(1);
        let p = h.admit(t0, 0).unwrap();
        let mut e = err(UpstreamErrorKind::RateLimited);
        e.retry_after = Some(7 * S);
        h.record_error(p, t0, &e);
        assert_eq!(
            h.check(t0, 0),
            Err(Unavailable::Cooldown { retry_in: 7 * S })
        );
    }

    #[test]
    fn out_of_order_instants_are_booked_in_the_latest_second() {
        let caps = Caps {
            rpm: Some(2),
            ..Caps::default()
        };
        let h = TargetHealth::new(BreakerConfig::default(), caps);
        let t0 = Instant::now();
        drop(h.admit(t0 + 5 * S, 0).unwrap());
        // An earlier instant (a thread that lost the race to the lock) counts in second 5.
        drop(h.admit(t0 + 2 * S, 0).unwrap());
        assert_eq!(h.check(t0 + 64 * S, 0), Err(Unavailable::RpmCap));
        assert_eq!(h.check(t0 + 65 * S, 0), Ok(()));
        // An instant before the origin is second 0 (clamped to the head).
        assert_eq!(h.check(t0, 0), Err(Unavailable::RpmCap));
    }

    #[test]
    fn odd_configs_do_not_panic() {
        let cfg = BreakerConfig {
            consecutive_failures: 1,
            error_rate: 0.0,
            min_requests: 0,
            window: Duration::ZERO,
            cooldown: Duration::MAX,
            rate_limit_cooldown: Duration::MAX,
        };
        let caps = Caps {
            rpm: Some(0),
            tpm: Some(0),
            max_parallel: Some(0),
        };
        let h = TargetHealth::new(cfg.clone(), caps);
        let t0 = Instant::now();
        assert_eq!(h.admit(t0, 0).err(), Some(Unavailable::ParallelCap));
        let h = TargetHealth::new(cfg, Caps::default());
        let p = h.admit(t0, u64::MAX).unwrap();
        h.success(p, t0, Duration::MAX, Some(Duration::MAX), Some(u64::MAX));
        let p = h.admit(t0, u64::MAX).unwrap();
        h.rate_limited(p, t0, None);
        let p = h.admit(t0 + MAX_DELAY, 0).unwrap();
        h.failure(p, t0 + MAX_DELAY);
        let s = h.snapshot(t0 + MAX_DELAY);
        assert_eq!(s.circuit, Circuit::Open);
        assert_eq!(s.cooldown_remaining_ms, Some(MAX_DELAY.as_millis() as u64));
        assert!(h.ewma_latency().is_some());
    }

    #[test]
    fn permits_and_health_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TargetHealth>();
        assert_send_sync::<Permit>();
        let h = health(1);
        let p = h.admit(Instant::now(), 0).unwrap();
        assert!(format!("{h:?} {p:?}").contains("TargetHealth"));
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let h = Arc::new(health(3));
        let h2 = h.clone();
        let _ = thread::spawn(move || {
            let _guard = h2.inner.lock();
            panic!("poison");
        })
        .join();
        assert!(h.inner.state.is_poisoned());
        let t0 = Instant::now();
        fail(&h, t0);
        ok(&h, t0);
        assert_eq!(h.snapshot(t0).requests_in_window, 2);
    }

    #[test]
    fn concurrent_hammering_keeps_counts_consistent() {
        const THREADS: usize = 8;
        const ITERS: u32 = 2000;
        // The breaker never trips, so every outcome stays in the window.
        let caps = Caps {
            max_parallel: Some(3),
            ..Caps::default()
        };
        let h = Arc::new(TargetHealth::new(breaker(0, 1.0, 0), caps));
        let t0 = Instant::now();
        let start = Arc::new(Barrier::new(THREADS));
        let workers: Vec<_> = (0..THREADS)
            .map(|id| {
                let h = h.clone();
                let start = start.clone();
                thread::spawn(move || {
                    start.wait();
                    // [admitted, refused, ok, failed, neutral, dropped]
                    let mut n = [0u32; 6];
                    for i in 0..ITERS {
                        // Each thread's clock runs over ~2 s, interleaved with the others.
                        let now = t0 + MS * (i + id as u32);
                        match h.admit(now, 1) {
                            Ok(p) => {
                                n[0] += 1;
                                assert!(h.in_flight() <= 3);
                                match (i + id as u32) % 4 {
                                    0 => {
                                        h.success(p, now, MS, None, Some(2));
                                        n[2] += 1;
                                    }
                                    1 => {
                                        h.failure(p, now);
                                        n[3] += 1;
                                    }
                                    2 => {
                                        h.neutral(p, now);
                                        n[4] += 1;
                                    }
                                    _ => {
                                        drop(p);
                                        n[5] += 1;
                                    }
                                }
                            }
                            Err(e) => {
                                assert_eq!(e, Unavailable::ParallelCap);
                                n[1] += 1;
                            }
                        }
                    }
                    n
                })
            })
            .collect();
        let mut total = [0u32; 6];
        for w in workers {
            let n = w.join().unwrap();
            for (t, v) in total.iter_mut().zip(n) {
                *t += v;
            }
        }
        let [admitted, refused, oks, fails, neutrals, drops] = total;
        assert_eq!(admitted + refused, THREADS as u32 * ITERS);
        assert_eq!(admitted, oks + fails + neutrals + drops);
        assert_eq!(h.in_flight(), 0);
        let now = t0 + 3 * S;
        let s = h.snapshot(now);
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.requests_in_window, oks + fails + neutrals);
        assert_eq!(s.errors_in_window, fails);
        assert_eq!(s.circuit, Circuit::Closed);
        let (requests, tokens) = usage(&h, now);
        assert_eq!(requests, admitted);
        // One token estimated per request, corrected to two on success.
        assert_eq!(tokens, u64::from(admitted + oks));
    }

    #[test]
    fn exactly_one_probe_under_contention() {
        const THREADS: usize = 8;
        for round in 0..20u32 {
            let h = Arc::new(health(3));
            let t0 = Instant::now();
            let t1 = open3(&h, t0);
            let start = Arc::new(Barrier::new(THREADS));
            let workers: Vec<_> = (0..THREADS)
                .map(|_| {
                    let h = h.clone();
                    let start = start.clone();
                    thread::spawn(move || {
                        start.wait();
                        match h.admit(t1, 0) {
                            Ok(p) => {
                                assert!(p.is_probe());
                                // Hold it until every thread has tried.
                                Some(p)
                            }
                            Err(e) => {
                                assert_eq!(e, Unavailable::ProbeInFlight);
                                None
                            }
                        }
                    })
                })
                .collect();
            let probes: Vec<_> = workers
                .into_iter()
                .filter_map(|w| w.join().unwrap())
                .collect();
            assert_eq!(probes.len(), 1, "round {round}");
            assert_eq!(h.in_flight(), 1);
            for p in probes {
                if round % 2 == 0 {
                    h.success(p, t1, S, None, None);
                } else {
                    h.failure(p, t1);
                }
            }
            assert_eq!(h.in_flight(), 0);
            let expect = if round % 2 == 0 {
                Circuit::Closed
            } else {
                Circuit::Open
            };
            assert_eq!(h.snapshot(t1).circuit, expect);
        }
    }
}
