//! Rate limits per governance scope (key, user, team, org): requests per minute
//! (`rpm_limit`), tokens per minute (`tpm_limit`) and requests in flight
//! (`max_parallel_requests`). Pure bookkeeping in memory: nothing here sleeps, spawns,
//! does I/O or reads the clock; [`Limiter::admit`] takes `now`.
//!
//! Invariants:
//! - All or nothing: [`Limiter::admit`] locks every shard holding one of the principal's
//!   limited scopes, checks every scope, and only then counts the request in every scope.
//!   A refused request is counted nowhere. Shards are locked in ascending index order,
//!   each at most once, so concurrent admissions cannot deadlock; release paths lock
//!   one shard at a time.
//! - `in_flight` of a scope is exactly the number of live [`LimitGuard`]s that hold a
//!   parallel slot in it (taken under the shard lock, given back when the guard drops).
//! - A scope's state is only tracked for the caps set on it at admission: tokens are
//!   booked where a `tpm_limit` is set, a parallel slot held where
//!   `max_parallel_requests` is set. A cap added while requests are in flight sees only
//!   the requests admitted after it.
//! - Bounded memory: a scope with nothing in flight and no admission in the last 60 s
//!   has an empty window and is evicted (exactly, nothing is lost) when its shard is
//!   swept, at most once a minute per shard during admission, or by [`Limiter::sweep`].
//!
//! Windows: a ring of 60 one-second buckets per scope, each tagged with its absolute
//! second (counted from the first `now` the limiter saw) and zeroed lazily when a write
//! finds an older tag. A request counts from the second it was admitted in for 60 whole
//! seconds. Tokens are booked at admission by the caller's estimate and corrected by
//! `actual - estimate` in the admission bucket by [`LimitGuard::finish`] (while that
//! bucket is still in the window). A request counts as at least one token, so a full
//! tpm window refuses even a request estimated at zero. A scope's seconds never go
//! backwards: a `now` older than the latest one it saw is booked in the latest second.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::model::{Limits, Principal, Scope};

/// rpm and tpm count the last this many seconds.
const WINDOW_SECS: u64 = 60;
/// Number of independently locked shards of scope state.
const SHARDS: usize = 64;
/// A shard is swept for idle scopes at most this often.
const SWEEP_EVERY_SECS: u64 = 60;

/// Why [`Limiter::admit`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{limit} of {} reached", scope.as_key())]
pub struct LimitExceeded {
    pub scope: Scope,
    /// `"rpm_limit"`, `"tpm_limit"` or `"max_parallel_requests"` (the LiteLLM field).
    pub limit: &'static str,
    /// When the window will have room for this request, if nothing else is admitted
    /// meanwhile. `None` when unknown (parallel slots free when requests finish) or
    /// never (a cap of 0, or a token estimate above the tpm cap itself).
    pub retry_after: Option<Duration>,
}

/// Requests and tokens of one scope in the current window, for the admin API and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeUsage {
    /// Requests admitted in the last 60 s (scopes with any cap).
    pub requests: u64,
    /// Tokens (estimated, then corrected) in the last 60 s (scopes with a tpm cap).
    pub tokens: u64,
    /// Parallel slots held (scopes with a parallel cap).
    pub in_flight: u32,
}

/// The caps of one scope for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Caps {
    rpm: Option<u32>,
    tpm: Option<u64>,
    parallel: Option<u32>,
}

fn tighter<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Caps {
    fn of(l: &Limits) -> Option<Caps> {
        let c = Caps {
            rpm: l.rpm_limit,
            tpm: l.tpm_limit,
            parallel: l.max_parallel_requests,
        };
        (c.rpm.is_some() || c.tpm.is_some() || c.parallel.is_some()).then_some(c)
    }

    fn tighter(self, o: Caps) -> Caps {
        Caps {
            rpm: tighter(self.rpm, o.rpm),
            tpm: tighter(self.tpm, o.tpm),
            parallel: tighter(self.parallel, o.parallel),
        }
    }
}

/// One second of a scope's window. `sec == u64::MAX` marks a bucket never written.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    sec: u64,
    requests: u32,
    tokens: u64,
}

impl Bucket {
    const UNUSED: Bucket = Bucket {
        sec: u64::MAX,
        requests: 0,
        tokens: 0,
    };
}

#[derive(Debug, Clone)]
struct ScopeState {
    /// The latest second booked; seconds never go backwards.
    head: u64,
    in_flight: u32,
    buckets: [Bucket; WINDOW_SECS as usize],
}

/// FNV-1a of `bytes` after `tag`: picks a shard. Cheaper than the maps' SipHash, and
/// skew could only slow a shard down (the maps inside keep SipHash).
fn fnv1a(tag: &[u8], bytes: &[u8]) -> u64 {
    tag.iter()
        .chain(bytes)
        .fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// A refusal before the longest-wait comparison.
struct Refusal {
    limit: &'static str,
    retry_after: Option<Duration>,
}

impl ScopeState {
    /// What a scope never seen looks like.
    const EMPTY: ScopeState = ScopeState {
        head: 0,
        in_flight: 0,
        buckets: [Bucket::UNUSED; WINDOW_SECS as usize],
    };

    /// The buckets of the 60 s window ending with `sec`, oldest first.
    fn window(&self, sec: u64) -> impl Iterator<Item = Bucket> + '_ {
        let lo = sec.saturating_sub(WINDOW_SECS - 1);
        (lo..=sec).filter_map(move |s| {
            let b = self.buckets[(s % WINDOW_SECS) as usize];
            (b.sec == s).then_some(b)
        })
    }

    /// Requests and tokens in the 60 s window ending with `sec`, in one pass over the
    /// ring (the hot path; [`ScopeState::window`] orders the buckets for the rest).
    fn totals(&self, sec: u64) -> (u64, u64) {
        let lo = sec.saturating_sub(WINDOW_SECS - 1);
        let (mut requests, mut tokens) = (0u64, 0u64);
        for b in &self.buckets {
            if b.sec >= lo && b.sec <= sec {
                requests += u64::from(b.requests);
                tokens = tokens.saturating_add(b.tokens);
            }
        }
        (requests, tokens)
    }

    /// How long until buckets holding at least `need` units (oldest first) have left
    /// the window; `None` if the whole window does not hold that many.
    fn wait_for(
        &self,
        sec: u64,
        elapsed: Duration,
        need: u64,
        units: impl Fn(&Bucket) -> u64,
    ) -> Option<Duration> {
        let mut dropped = 0u64;
        for b in self.window(sec) {
            dropped = dropped.saturating_add(units(&b));
            if dropped >= need {
                let frees_at = Duration::from_secs(b.sec.saturating_add(WINDOW_SECS));
                return Some(frees_at.saturating_sub(elapsed));
            }
        }
        None
    }

    /// Whether one more request of `est` tokens fits every cap, at second `sec`.
    fn check(&self, caps: Caps, sec: u64, elapsed: Duration, est: u64) -> Result<(), Refusal> {
        // Mirror `book`: the request would land in the head second if time went back.
        let sec = sec.max(self.head);
        let elapsed = elapsed.max(Duration::from_secs(sec));
        if let Some(max) = caps.parallel {
            if self.in_flight >= max {
                return Err(Refusal {
                    limit: "max_parallel_requests",
                    retry_after: None,
                });
            }
        }
        if caps.rpm.is_none() && caps.tpm.is_none() {
            return Ok(());
        }
        let (requests, tokens) = self.totals(sec);
        if let Some(rpm) = caps.rpm {
            let used = requests;
            if used >= u64::from(rpm) {
                let need = used + 1 - u64::from(rpm);
                return Err(Refusal {
                    limit: "rpm_limit",
                    retry_after: if rpm == 0 {
                        None
                    } else {
                        self.wait_for(sec, elapsed, need, |b| u64::from(b.requests))
                    },
                });
            }
        }
        if let Some(tpm) = caps.tpm {
            let est = est.max(1);
            let used = tokens;
            if used.saturating_add(est) > tpm {
                return Err(Refusal {
                    limit: "tpm_limit",
                    retry_after: if est > tpm {
                        None
                    } else {
                        let need = used.saturating_add(est) - tpm;
                        self.wait_for(sec, elapsed, need, |b| b.tokens)
                    },
                });
            }
        }
        Ok(())
    }

    /// Counts one admitted request; returns the second it was booked in.
    fn book(&mut self, caps: Caps, sec: u64, est: u64) -> u64 {
        self.head = self.head.max(sec);
        let sec = self.head;
        let b = &mut self.buckets[(sec % WINDOW_SECS) as usize];
        if b.sec != sec {
            *b = Bucket {
                sec,
                requests: 0,
                tokens: 0,
            };
        }
        b.requests = b.requests.saturating_add(1);
        if caps.tpm.is_some() {
            b.tokens = b.tokens.saturating_add(est);
        }
        if caps.parallel.is_some() {
            self.in_flight = self.in_flight.saturating_add(1);
        }
        sec
    }

    fn idle(&self, sec: u64) -> bool {
        self.in_flight == 0 && self.head.saturating_add(WINDOW_SECS) <= sec
    }
}

#[derive(Debug, Default)]
struct Shard {
    scopes: HashMap<Scope, ScopeState>,
    /// The second of the last sweep.
    swept_at: u64,
}

impl Shard {
    fn sweep(&mut self, sec: u64) {
        self.scopes.retain(|_, s| !s.idle(sec));
        self.swept_at = sec;
    }
}

/// Shards locked in ascending index order, each once.
struct Locked<'a>(Vec<(usize, MutexGuard<'a, Shard>)>);

impl Locked<'_> {
    fn get(&mut self, shard: usize) -> Option<&mut Shard> {
        self.0
            .iter_mut()
            .find(|(i, _)| *i == shard)
            .map(|(_, g)| &mut **g)
    }
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    /// Second 0: the first `now` the limiter saw.
    origin: OnceLock<Instant>,
}

impl Inner {
    /// A shard, recovering from a poisoned lock: every critical section leaves the state
    /// consistent between statements, so a panic elsewhere cannot corrupt it.
    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_all(&self, shards: impl Iterator<Item = usize>) -> Locked<'_> {
        let mut order: Vec<usize> = shards.collect();
        order.sort_unstable();
        order.dedup();
        Locked(order.into_iter().map(|i| (i, self.lock(i))).collect())
    }

    fn shard_of(&self, scope: &Scope) -> usize {
        let (tag, id): (&[u8], &str) = match scope {
            Scope::Key(id) => (b"k", id),
            Scope::User(id) => (b"u", id),
            Scope::Team(id) => (b"t", id),
            Scope::Org(id) => (b"o", id),
        };
        (fnv1a(tag, id.as_bytes()) % self.shards.len() as u64) as usize
    }

    /// Time since the origin, and its whole seconds.
    fn clock(&self, now: Instant) -> (Duration, u64) {
        let elapsed = now.saturating_duration_since(*self.origin.get_or_init(|| now));
        (elapsed, elapsed.as_secs())
    }
}

/// Per-scope rate limits shared by all requests. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// One limited scope of the request being admitted.
struct Wanted<'a> {
    scope: &'a Scope,
    shard: usize,
    caps: Caps,
}

/// A scope the guard must give something back to: a parallel slot, a tpm correction.
#[derive(Debug)]
struct Held {
    scope: Scope,
    shard: usize,
    /// The second the request was booked in.
    sec: u64,
    est: u64,
    tpm: bool,
    parallel: bool,
}

/// An admitted request's hold on its scopes' limits. Dropping it gives the parallel
/// slots back; [`LimitGuard::finish`] also corrects the tpm estimate.
pub struct LimitGuard {
    inner: Option<Arc<Inner>>,
    held: Vec<Held>,
}

impl fmt::Debug for LimitGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitGuard")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl LimitGuard {
    /// The request is done and used `actual_tokens` (prompt + completion): books the
    /// difference to the estimate in every tpm window that still holds the admission,
    /// and gives the parallel slots back.
    pub fn finish(mut self, actual_tokens: u64) {
        self.release(Some(actual_tokens));
    }

    fn release(&mut self, actual_tokens: Option<u64>) {
        let Some(inner) = self.inner.as_ref() else {
            return;
        };
        for h in self.held.drain(..) {
            let mut shard = inner.lock(h.shard);
            // Absent only when evicted: nothing in flight and the admission second has
            // left the window, so there is nothing to give back.
            let Some(st) = shard.scopes.get_mut(&h.scope) else {
                continue;
            };
            if h.parallel {
                st.in_flight = st.in_flight.saturating_sub(1);
            }
            if let (true, Some(actual)) = (h.tpm, actual_tokens) {
                let b = &mut st.buckets[(h.sec % WINDOW_SECS) as usize];
                if b.sec == h.sec {
                    b.tokens = b.tokens.saturating_sub(h.est).saturating_add(actual);
                }
            }
        }
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.release(None);
    }
}

impl Limiter {
    pub fn new() -> Self {
        Limiter {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                origin: OnceLock::new(),
            }),
        }
    }

    /// Admits a request of `principal` estimated at `est_tokens` (prompt + the most
    /// completion it may produce) if every scope's rpm, tpm and parallel caps have room,
    /// and counts it in all of them at once; otherwise counts it nowhere and reports the
    /// refusal with the longest wait (an unknown wait counts as longest; ties go to the
    /// most specific scope). A scope listed twice gets the tighter of each cap.
    pub fn admit(
        &self,
        principal: &Principal,
        now: Instant,
        est_tokens: u64,
    ) -> Result<LimitGuard, LimitExceeded> {
        let inner = &self.inner;
        let mut wanted: Vec<Wanted<'_>> = Vec::with_capacity(principal.limits.len());
        for (scope, limits) in &principal.limits {
            let Some(caps) = Caps::of(limits) else {
                continue;
            };
            match wanted.iter_mut().find(|w| w.scope == scope) {
                Some(w) => w.caps = w.caps.tighter(caps),
                None => wanted.push(Wanted {
                    scope,
                    shard: inner.shard_of(scope),
                    caps,
                }),
            }
        }
        if wanted.is_empty() {
            return Ok(LimitGuard {
                inner: None,
                held: Vec::new(),
            });
        }
        let (elapsed, sec) = inner.clock(now);

        let mut locked = inner.lock_all(wanted.iter().map(|w| w.shard));

        let mut refused: Option<LimitExceeded> = None;
        for w in &wanted {
            let Some(shard) = locked.get(w.shard) else {
                continue;
            };
            let st = shard.scopes.get(w.scope).unwrap_or(&ScopeState::EMPTY);
            if let Err(r) = st.check(w.caps, sec, elapsed, est_tokens) {
                let longer = match &refused {
                    None => true,
                    Some(prev) => match (prev.retry_after, r.retry_after) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(a), Some(b)) => b > a,
                    },
                };
                if longer {
                    refused = Some(LimitExceeded {
                        scope: w.scope.clone(),
                        limit: r.limit,
                        retry_after: r.retry_after,
                    });
                }
            }
        }
        if let Some(r) = refused {
            return Err(r);
        }

        let mut held = Vec::new();
        for w in &wanted {
            let Some(shard) = locked.get(w.shard) else {
                continue;
            };
            let st = match shard.scopes.get_mut(w.scope) {
                Some(st) => st,
                None => shard
                    .scopes
                    .entry(w.scope.clone())
                    .or_insert(ScopeState::EMPTY),
            };
            let booked = st.book(w.caps, sec, est_tokens);
            if w.caps.tpm.is_some() || w.caps.parallel.is_some() {
                held.push(Held {
                    scope: w.scope.clone(),
                    shard: w.shard,
                    sec: booked,
                    est: est_tokens,
                    tpm: w.caps.tpm.is_some(),
                    parallel: w.caps.parallel.is_some(),
                });
            }
        }
        for (_, shard) in &mut locked.0 {
            if sec >= shard.swept_at.saturating_add(SWEEP_EVERY_SECS) {
                shard.sweep(sec);
            }
        }
        drop(locked);
        Ok(LimitGuard {
            inner: Some(inner.clone()),
            held,
        })
    }

    /// What `scope` has used in the window ending at `now` (zeros for a scope not
    /// tracked).
    pub fn usage(&self, scope: &Scope, now: Instant) -> ScopeUsage {
        let (_, sec) = self.inner.clock(now);
        let shard = self.inner.lock(self.inner.shard_of(scope));
        let Some(st) = shard.scopes.get(scope) else {
            return ScopeUsage::default();
        };
        let (requests, tokens) = st.totals(sec.max(st.head));
        ScopeUsage {
            requests,
            tokens,
            in_flight: st.in_flight,
        }
    }

    /// Evicts every idle scope now (admission also does it, a shard at most once a
    /// minute).
    pub fn sweep(&self, now: Instant) {
        let (_, sec) = self.inner.clock(now);
        for i in 0..self.inner.shards.len() {
            self.inner.lock(i).sweep(sec);
        }
    }

    /// Number of scopes with state in memory.
    pub fn tracked_scopes(&self) -> usize {
        (0..self.inner.shards.len())
            .map(|i| self.inner.lock(i).scopes.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::governance::model::Role;

    const SEC: Duration = Duration::from_secs(1);

    fn principal(key: &str, key_limits: Limits, team_limits: Limits) -> Principal {
        Principal {
            key_id: key.into(),
            org_id: "o1".into(),
            team_id: Some("t1".into()),
            user_id: None,
            role: Role::Member,
            allow: Vec::new(),
            limits: vec![
                (Scope::Key(key.into()), key_limits),
                (Scope::Team("t1".into()), team_limits),
                (Scope::Org("o1".into()), Limits::default()),
            ],
            log_content: false,
        }
    }

    fn rpm(n: u32) -> Limits {
        Limits {
            rpm_limit: Some(n),
            ..Limits::default()
        }
    }

    fn tpm(n: u64) -> Limits {
        Limits {
            tpm_limit: Some(n),
            ..Limits::default()
        }
    }

    fn parallel(n: u32) -> Limits {
        Limits {
            max_parallel_requests: Some(n),
            ..Limits::default()
        }
    }

    fn key(k: &str) -> Scope {
        Scope::Key(k.into())
    }

    fn team() -> Scope {
        Scope::Team("t1".into())
    }

    #[test]
    fn no_limits_admits_without_tracking() {
        let l = Limiter::new();
        let p = principal("k", Limits::default(), Limits::default());
        let g = l.admit(&p, Instant::now(), 10).unwrap();
        assert!(g.held.is_empty());
        assert_eq!(l.tracked_scopes(), 0);
    }

    #[test]
    fn rpm_slides_over_sixty_seconds() {
        let l = Limiter::new();
        let p = principal("k", rpm(3), Limits::default());
        let t0 = Instant::now();
        for i in 0..3 {
            drop(l.admit(&p, t0 + SEC * i, 0).unwrap());
        }
        let e = l.admit(&p, t0 + SEC * 10, 0).unwrap_err();
        assert_eq!(e.limit, "rpm_limit");
        assert_eq!(e.scope, key("k"));
        // The first admission (second 0) leaves the window at second 60.
        assert_eq!(e.retry_after, Some(SEC * 50));
        let half = Duration::from_millis(500);
        let e = l.admit(&p, t0 + SEC * 59 + half, 0).unwrap_err();
        assert_eq!(e.retry_after, Some(half));
        assert!(l.admit(&p, t0 + SEC * 60, 0).is_ok());
        assert_eq!(l.usage(&key("k"), t0 + SEC * 60).requests, 3);
        assert!(l.admit(&p, t0 + SEC * 60, 0).is_err());
        assert!(l.admit(&p, t0 + SEC * 62, 0).is_ok());
    }

    #[test]
    fn rpm_zero_allows_nothing_ever() {
        let l = Limiter::new();
        let p = principal("k", rpm(0), Limits::default());
        let e = l.admit(&p, Instant::now(), 0).unwrap_err();
        assert_eq!((e.limit, e.retry_after), ("rpm_limit", None));
    }

    #[test]
    fn tpm_books_the_estimate_and_finish_corrects_it() {
        let l = Limiter::new();
        let p = principal("k", tpm(1000), Limits::default());
        let t0 = Instant::now();
        let g = l.admit(&p, t0, 800).unwrap();
        let e = l.admit(&p, t0, 300).unwrap_err();
        assert_eq!(e.limit, "tpm_limit");
        assert_eq!(e.retry_after, Some(SEC * 60));
        g.finish(100);
        assert_eq!(l.usage(&key("k"), t0).tokens, 100);
        let g = l.admit(&p, t0 + SEC, 900).unwrap();
        // Finishing above the estimate books the excess too.
        g.finish(950);
        assert_eq!(l.usage(&key("k"), t0 + SEC).tokens, 1050);
        // A full window refuses even a zero estimate; an estimate above the cap never fits.
        assert_eq!(l.admit(&p, t0 + SEC, 0).unwrap_err().limit, "tpm_limit");
        let e = l.admit(&p, t0 + SEC * 120, 1001).unwrap_err();
        assert_eq!(e.retry_after, None);
        assert!(l.admit(&p, t0 + SEC * 120, 1000).is_ok());
    }

    #[test]
    fn finish_after_the_window_changes_nothing() {
        let l = Limiter::new();
        let p = principal("k", tpm(1000), parallel(1));
        let t0 = Instant::now();
        let g = l.admit(&p, t0, 500).unwrap();
        drop(l.admit(&p, t0 + SEC * 70, 10));
        g.finish(900);
        assert_eq!(l.usage(&key("k"), t0 + SEC * 70).tokens, 0);
        assert_eq!(l.usage(&team(), t0 + SEC * 70).in_flight, 0);
    }

    #[test]
    fn parallel_slots_are_held_by_the_guard() {
        let l = Limiter::new();
        let p = principal("k", Limits::default(), parallel(2));
        let t0 = Instant::now();
        let a = l.admit(&p, t0, 0).unwrap();
        let b = l.admit(&p, t0, 0).unwrap();
        let e = l.admit(&p, t0, 0).unwrap_err();
        assert_eq!(e.scope, team());
        assert_eq!((e.limit, e.retry_after), ("max_parallel_requests", None));
        drop(a);
        let c = l.admit(&p, t0, 0).unwrap();
        assert_eq!(l.usage(&team(), t0).in_flight, 2);
        b.finish(5);
        drop(c);
        assert_eq!(l.usage(&team(), t0).in_flight, 0);
    }

    #[test]
    fn a_refusal_by_the_team_counts_nowhere() {
        let l = Limiter::new();
        let key_limits = Limits {
            rpm_limit: Some(100),
            tpm_limit: Some(10_000),
            max_parallel_requests: Some(10),
            ..Limits::default()
        };
        let p = principal("k", key_limits.clone(), rpm(1));
        let t0 = Instant::now();
        let g = l.admit(&p, t0, 100).unwrap();
        let before = l.usage(&key("k"), t0);
        assert_eq!(
            before,
            ScopeUsage {
                requests: 1,
                tokens: 100,
                in_flight: 1
            }
        );
        let e = l.admit(&p, t0, 100).unwrap_err();
        assert_eq!((e.scope, e.limit), (team(), "rpm_limit"));
        assert_eq!(l.usage(&key("k"), t0), before);
        assert_eq!(l.usage(&team(), t0).requests, 1);
        drop(g);
    }

    #[test]
    fn the_longest_wait_is_reported() {
        let l = Limiter::new();
        let t0 = Instant::now();
        // The key fills at second 0 (frees at 60), the team at second 10 (frees at 70).
        drop(
            l.admit(&principal("k", rpm(1), Limits::default()), t0, 0)
                .unwrap(),
        );
        let other = principal("other", Limits::default(), rpm(5));
        drop(l.admit(&other, t0 + SEC * 10, 0).unwrap());
        let p = principal("k", rpm(1), rpm(1));
        let e = l.admit(&p, t0 + SEC * 20, 0).unwrap_err();
        assert_eq!((e.scope, e.retry_after), (team(), Some(SEC * 50)));
        // An unknown wait counts as the longest.
        let p = principal("k", rpm(1), parallel(0));
        let e = l.admit(&p, t0 + SEC * 20, 0).unwrap_err();
        assert_eq!((e.scope, e.retry_after), (team(), None));
        // Equal waits go to the most specific scope.
        let l = Limiter::new();
        let p = principal("k", rpm(1), rpm(1));
        drop(l.admit(&p, t0, 0).unwrap());
        let e = l.admit(&p, t0 + SEC * 20, 0).unwrap_err();
        assert_eq!((e.scope, e.retry_after), (key("k"), Some(SEC * 40)));
    }

    #[test]
    fn a_scope_listed_twice_gets_the_tighter_caps() {
        let l = Limiter::new();
        let mut p = principal("k", rpm(5), Limits::default());
        p.limits.push((key("k"), rpm(1)));
        let t0 = Instant::now();
        assert!(l.admit(&p, t0, 0).is_ok());
        assert_eq!(l.admit(&p, t0, 0).unwrap_err().limit, "rpm_limit");
        assert_eq!(l.usage(&key("k"), t0).requests, 1);
    }

    #[test]
    fn time_going_backwards_books_in_the_latest_second() {
        let l = Limiter::new();
        let p = principal("k", rpm(2), Limits::default());
        let t0 = Instant::now();
        drop(l.admit(&p, t0, 0).unwrap()); // origin
        drop(l.admit(&p, t0 + SEC * 30, 0).unwrap());
        // An admission racing in with an older `now` is booked at second 30.
        let e = l.admit(&p, t0 + SEC * 5, 0).unwrap_err();
        assert_eq!(e.retry_after, Some(SEC * 30));
        assert_eq!(l.usage(&key("k"), t0 + SEC * 61).requests, 1);
    }

    #[test]
    fn idle_scopes_are_evicted() {
        let l = Limiter::new();
        let t0 = Instant::now();
        for i in 0..200 {
            let p = principal(&format!("k{i}"), rpm(10), Limits::default());
            drop(l.admit(&p, t0, 0).unwrap());
        }
        let busy = principal("busy", parallel(1), Limits::default());
        let held = l.admit(&busy, t0, 0).unwrap();
        assert_eq!(l.tracked_scopes(), 201);
        l.sweep(t0 + SEC * 59);
        assert_eq!(l.tracked_scopes(), 201);
        l.sweep(t0 + SEC * 60);
        assert_eq!(
            l.tracked_scopes(),
            1,
            "only the scope with a request in flight"
        );
        drop(held);
        // Admission sweeps the shards it locks.
        let late = principal("busy", parallel(1), Limits::default());
        let t1 = t0 + SEC * 200;
        drop(l.admit(&late, t1, 0).unwrap());
        l.sweep(t1 + SEC * 60);
        assert_eq!(l.tracked_scopes(), 0);
    }

    #[test]
    fn a_poisoned_shard_is_recovered() {
        let l = Limiter::new();
        let p = principal("k", rpm(5), Limits::default());
        let shard = l.inner.shard_of(&key("k"));
        let l2 = l.clone();
        let _ = std::thread::spawn(move || {
            let _g = l2.inner.lock(shard);
            panic!("poison");
        })
        .join();
        assert!(l.admit(&p, Instant::now(), 0).is_ok());
    }

    #[test]
    fn guards_and_limiter_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Limiter>();
        assert_send_sync::<LimitGuard>();
        let l = Limiter::new();
        let g = l
            .admit(
                &principal("k", parallel(1), Limits::default()),
                Instant::now(),
                0,
            )
            .unwrap();
        assert!(format!("{l:?} {g:?}").contains("LimitGuard"));
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_time()
            .build()
            .unwrap()
    }

    async fn jitter(rng: &mut StdRng) {
        match rng.random_range(0..4) {
            0 => {}
            1 => tokio::task::yield_now().await,
            _ => tokio::time::sleep(Duration::from_micros(rng.random_range(0..2000))).await,
        }
    }

    /// 1,000 concurrent admissions over ten keys of one team, rpm 100 on the team (the
    /// keys allow 1,000 each): exactly 100 get in, and the keys' counts add up to 100.
    #[test]
    fn rpm_race_admits_exactly_the_limit() {
        for seed in [1u64, 7, 42, 1234] {
            let l = Limiter::new();
            let t0 = Instant::now();
            let admitted = runtime().block_on(async {
                let tasks: Vec<_> = (0..1000u64)
                    .map(|i| {
                        let l = l.clone();
                        tokio::spawn(async move {
                            let mut rng = StdRng::seed_from_u64(seed * 10_000 + i);
                            let p = principal(&format!("k{}", i % 10), rpm(1000), rpm(100));
                            jitter(&mut rng).await;
                            let now = t0 + Duration::from_millis(rng.random_range(0..900));
                            let r = l.admit(&p, now, 0);
                            jitter(&mut rng).await;
                            r.is_ok()
                        })
                    })
                    .collect();
                let mut n = 0;
                for t in tasks {
                    n += usize::from(t.await.unwrap());
                }
                n
            });
            assert_eq!(admitted, 100, "seed {seed}");
            let now = t0 + SEC;
            assert_eq!(l.usage(&team(), now).requests, 100);
            let per_key: u64 = (0..10)
                .map(|k| l.usage(&key(&format!("k{k}")), now).requests)
                .sum();
            assert_eq!(per_key, 100, "seed {seed}: no partial counting");
        }
    }

    /// 1,000 tasks each try to hold one of 7 parallel slots for a while: the number of
    /// guards alive never exceeds 7, and all slots come back.
    #[test]
    fn parallel_race_never_exceeds_the_cap() {
        const N: u32 = 7;
        for seed in [3u64, 99] {
            let l = Limiter::new();
            let live = Arc::new(AtomicU32::new(0));
            let high = Arc::new(AtomicU32::new(0));
            let admitted = Arc::new(AtomicUsize::new(0));
            let t0 = Instant::now();
            runtime().block_on(async {
                let tasks: Vec<_> = (0..1000u64)
                    .map(|i| {
                        let (l, live, high, admitted) =
                            (l.clone(), live.clone(), high.clone(), admitted.clone());
                        tokio::spawn(async move {
                            let mut rng = StdRng::seed_from_u64(seed * 10_000 + i);
                            let p = principal(&format!("k{}", i % 10), parallel(3), parallel(N));
                            jitter(&mut rng).await;
                            if let Ok(g) = l.admit(&p, t0, 0) {
                                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                                high.fetch_max(now, Ordering::SeqCst);
                                admitted.fetch_add(1, Ordering::SeqCst);
                                jitter(&mut rng).await;
                                // Uncount before the slot is given back.
                                live.fetch_sub(1, Ordering::SeqCst);
                                if rng.random_bool(0.5) {
                                    g.finish(1);
                                } else {
                                    drop(g);
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            });
            let high = high.load(Ordering::SeqCst);
            assert!(high <= N && high > 0, "seed {seed}: high-water mark {high}");
            assert!(admitted.load(Ordering::SeqCst) >= N as usize);
            assert_eq!(l.usage(&team(), t0).in_flight, 0);
            for k in 0..10 {
                assert_eq!(l.usage(&key(&format!("k{k}")), t0).in_flight, 0);
            }
            // Every admission was counted in each of its scopes exactly once.
            let admitted = admitted.load(Ordering::SeqCst) as u64;
            assert_eq!(l.usage(&team(), t0).requests, admitted);
            let per_key: u64 = (0..10)
                .map(|k| l.usage(&key(&format!("k{k}")), t0).requests)
                .sum();
            assert_eq!(per_key, admitted);
        }
    }
}
