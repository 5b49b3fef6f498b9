//! Money budgets (`max_budget_micros`) and token quotas (`token_quota`) per scope and
//! period, with a soft threshold (`soft_budget_micros`): the in-memory authority of
//! spent + reserved per budget window, loaded at start from the ledger's balances and
//! kept durable through a [`Journal`] (the ledger in production).
//!
//! A request reserves its worst case ([`Budgets::reserve`]) before it runs and settles
//! its actual cost ([`ReservationHandle::settle`]) when it is done.
//!
//! Invariants:
//! - Budget window keys are `<scope key>|<period>|<window start>` ([`window_key`]), the
//!   window start in UTC: `YYYY-MM-DD` (daily), ISO week `YYYY-Www` (weekly), `YYYY-MM`
//!   (monthly), `total`. Labels of one period sort in time order.
//! - All or nothing: a reservation locks the shards of all its windows in ascending
//!   index order (each once), checks `spent + reserved + worst <= limit` for money and
//!   tokens in every window, and only then adds `worst` to `reserved` in every window.
//!   A refused request changes nothing.
//! - Durable before use, in blocks: each window keeps a durable hold in the journal
//!   (`Op::Hold`), which a crash leaves to be charged in full at the next start. A
//!   reservation that takes `reserved` above the window's hold raises the hold to
//!   `reserved` plus `hold_ahead` times its own worst case (capped at what the limit
//!   leaves), and [`Budgets::reserve`] returns a handle only once the last hold write
//!   queued for each of its windows is acknowledged; a reservation that fits under the
//!   hold and finds nothing pending waits for nothing. So the reserved amounts of
//!   admitted requests never exceed the durable hold: a crash charges at least what was
//!   in flight, and at most that plus the headroom (the pre-block design charged each
//!   reservation's worst case exactly, at one durable write per request; `hold_ahead`
//!   0 gives that back: every admission waits for a write of `hold = reserved`).
//!   Hold writes are queued under the window's lock, so they reach the journal in the
//!   order of the values; every value queued is at least `reserved` at that moment.
//!   When settlements leave a hold more than twice the headroom above `reserved`, it
//!   is lowered to `reserved` plus the headroom; a window pruned from memory, and
//!   every window at [`Budgets::release_holds`] (clean shutdown), gives its hold back
//!   down to what is still reserved. If the journal fails, or the `reserve` future is
//!   dropped while waiting, the in-memory hold is released; a failed hold write makes
//!   the next reservation write the hold again.
//! - Every handle ends exactly once: settled with the actual amounts, or, when dropped
//!   unsettled, settled with its worst case (conservative; logged), its charge queued
//!   to the journal at once (also without an async runtime).
//! - Settlement records what was actually used even above the worst case. Spending can
//!   therefore exceed a limit, but only by what requests in flight used beyond their
//!   own reservations: once `spent >= limit`, no reservation with a non-zero worst case
//!   is admitted. A zero worst case is admitted while `spent + reserved <= limit`.
//! - Bounded memory: windows of past periods with nothing reserved are pruned (a shard
//!   at most once an hour during reservation, or by [`Budgets::prune`]) once they ended
//!   more than an hour before `now`; their history stays in the ledger. `total`
//!   windows are kept.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use serde::Serialize;

use super::model::{Period, Principal, Scope};
use crate::ledger::{BudgetBalance, Charge, Op, Reservation, StoredHold};

/// Number of independently locked shards of budget windows.
const SHARDS: usize = 64;
const MS_PER_DAY: i64 = 86_400_000;
/// A shard is pruned at most this often.
const PRUNE_EVERY_MS: i64 = 3_600_000;
/// A window is kept this long after it ended (late requests with a slightly old `now`).
const PRUNE_GRACE_MS: i64 = 3_600_000;

/// Where holds and charges are made durable: the ledger in production,
/// [`MemoryJournal`] in tests and benchmarks. Both calls queue their write when called
/// (not when the future is first polled), in call order.
pub trait Journal: Send + Sync + 'static {
    /// Sets the durable hold of window `budget_key` (charged in full if a crash leaves
    /// it) to `micros` / `tokens`, unless a hold of a higher `version` is already
    /// stored. Durable when it resolves `Ok`.
    fn hold(
        &self,
        budget_key: &str,
        micros: u64,
        tokens: u64,
        version: u64,
    ) -> BoxFuture<'static, Result<(), String>>;
    /// Records `ops` (`Op::Charge` and `Op::Hold`) in one batch. Durable when it
    /// resolves `Ok`.
    fn record(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(), String>>;
}

/// The default [`Budgets::load_with`] `hold_ahead`: a window's durable hold runs this
/// many worst cases (of the request that raised it) ahead of what is reserved.
pub const HOLD_AHEAD: u64 = 16;

/// A budget a request would go over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} of {budget_key} exceeded: limit {limit}, spent {spent}, reserved {reserved}, requested {requested}")]
pub struct BudgetExceeded {
    pub scope: Scope,
    pub budget_key: String,
    /// `"budget"` (micro-USD) or `"token_quota"` (tokens); the amounts are in that unit.
    pub kind: &'static str,
    pub limit: u64,
    /// Settled in the window.
    pub spent: u64,
    /// Held by requests in flight.
    pub reserved: u64,
    /// This request's worst case.
    pub requested: u64,
}

/// Why [`Budgets::reserve`] gave no handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(transparent)]
    Exceeded(#[from] BudgetExceeded),
    /// The journal refused or failed; the hold was rolled back.
    #[error("the budget reservation could not be made durable: {0}")]
    Journal(String),
}

/// One budget window as reported to the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetStatus {
    pub budget_key: String,
    /// The limits last applied to the window (`None` for a window only loaded from the
    /// ledger since start and not used since, or a level without that limit).
    pub limit_micros: Option<u64>,
    pub soft_budget_micros: Option<u64>,
    pub token_quota: Option<u64>,
    pub spent_micros: u64,
    pub reserved_micros: u64,
    pub spent_tokens: u64,
    pub reserved_tokens: u64,
}

/// The outcome of settling a reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    /// What to submit to the ledger (with the audit record): the actual charges. Empty
    /// when nothing was reserved, or when [`ReservationHandle::settle_via_journal`]
    /// already made them durable.
    pub ops: Vec<Op>,
    /// The actual amount charged to each window.
    pub charges: Vec<Charge>,
    /// One line per window whose soft threshold this settlement crossed.
    pub warnings: Vec<String>,
    /// Whether any window is above its soft threshold after this settlement.
    pub soft_exceeded: bool,
}

// ---------------------------------------------------------------------------------
// Window keys

/// The period's name in budget keys (its serde name).
pub fn period_name(period: Period) -> &'static str {
    match period {
        Period::Daily => "daily",
        Period::Weekly => "weekly",
        Period::Monthly => "monthly",
        Period::Total => "total",
    }
}

fn parse_period(s: &str) -> Option<Period> {
    match s {
        "daily" => Some(Period::Daily),
        "weekly" => Some(Period::Weekly),
        "monthly" => Some(Period::Monthly),
        "total" => Some(Period::Total),
        _ => None,
    }
}

/// Civil date (year, month 1-12, day 1-31) of a day counted from 1970-01-01 (proleptic
/// Gregorian; H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days from 1970-01-01 to January 1st of `year`.
fn days_to_jan_1(year: i64) -> i64 {
    let y = year - 1;
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    // March-based day of year of January 1st is 306.
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + 306;
    era * 146_097 + doe - 719_468
}

/// The label of the window of `period` that contains `now_ms` (Unix ms, UTC).
pub fn window_start(period: Period, now_ms: i64) -> String {
    let mut label = String::with_capacity(10);
    // Writing to a `String` cannot fail.
    let _ = write_window_start(&mut label, period, now_ms);
    label
}

fn write_window_start(out: &mut impl fmt::Write, period: Period, now_ms: i64) -> fmt::Result {
    let days = now_ms.div_euclid(MS_PER_DAY);
    match period {
        Period::Daily => {
            let (y, m, d) = civil_from_days(days);
            write!(out, "{y:04}-{m:02}-{d:02}")
        }
        Period::Weekly => {
            // ISO 8601: weeks start on Monday; week 1 holds the year's first Thursday.
            let monday_based = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday
            let thursday = days - monday_based + 3;
            let (year, _, _) = civil_from_days(thursday);
            let week = (thursday - days_to_jan_1(year)) / 7 + 1;
            write!(out, "{year:04}-W{week:02}")
        }
        Period::Monthly => {
            let (y, m, _) = civil_from_days(days);
            write!(out, "{y:04}-{m:02}")
        }
        Period::Total => out.write_str("total"),
    }
}

/// `<scope key>|<period>|<window start>`, e.g. `team:t_1|monthly|2026-11`.
pub fn window_key(scope: &Scope, period: Period, now_ms: i64) -> String {
    // `Scope::as_key`, written in place: this runs for every budgeted request.
    let (kind, id) = match scope {
        Scope::Key(id) => ("key", id),
        Scope::User(id) => ("user", id),
        Scope::Team(id) => ("team", id),
        Scope::Org(id) => ("org", id),
    };
    let mut key = String::with_capacity(kind.len() + id.len() + 22);
    // Writing to a `String` cannot fail.
    let _ = write!(key, "{kind}:{id}|{}|", period_name(period));
    let _ = write_window_start(&mut key, period, now_ms);
    key
}

// ---------------------------------------------------------------------------------
// State

/// The limits of one window for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Budget {
    micros: Option<u64>,
    tokens: Option<u64>,
    soft: Option<u64>,
}

fn tighter(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Budget {
    fn tighter(self, o: Budget) -> Budget {
        Budget {
            micros: tighter(self.micros, o.micros),
            tokens: tighter(self.tokens, o.tokens),
            soft: tighter(self.soft, o.soft),
        }
    }
}

/// The answer to a hold write, shared by every reservation that waits for it.
type HoldAnswer = Shared<BoxFuture<'static, Result<(), String>>>;

/// A window's durable hold: the last value given out (queued, or in a settlement's
/// ops), its version (the journal keeps the highest version it is given), and the last
/// raise's version and answer, with the highest raise version known durable.
#[derive(Clone, Default)]
struct DurableHold {
    micros: u64,
    tokens: u64,
    version: u64,
    raised: u64,
    acked: u64,
    last: Option<HoldAnswer>,
}

impl fmt::Debug for DurableHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableHold")
            .field("micros", &self.micros)
            .field("tokens", &self.tokens)
            .field("version", &self.version)
            .field("raised", &self.raised)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
struct Window {
    spent_micros: u64,
    spent_tokens: u64,
    reserved_micros: u64,
    reserved_tokens: u64,
    /// The limits last applied (for status).
    budget: Budget,
    hold: DurableHold,
}

impl Window {
    const EMPTY: Window = Window {
        spent_micros: 0,
        spent_tokens: 0,
        reserved_micros: 0,
        reserved_tokens: 0,
        budget: Budget {
            micros: None,
            tokens: None,
            soft: None,
        },
        hold: DurableHold {
            micros: 0,
            tokens: 0,
            version: 0,
            raised: 0,
            acked: 0,
            last: None,
        },
    };

    /// The next version of the hold, set to `micros` / `tokens`.
    fn next_hold(&mut self, micros: u64, tokens: u64) -> u64 {
        self.hold.micros = micros;
        self.hold.tokens = tokens;
        self.hold.version += 1;
        self.hold.version
    }

    /// Queues a write of the durable hold now (under the window's shard lock) and keeps
    /// its answer for the reservations that must see it durable.
    fn raise_hold(&mut self, journal: &dyn Journal, key: &str, micros: u64, tokens: u64) {
        let version = self.next_hold(micros, tokens);
        self.hold.raised = version;
        self.hold.last = Some(journal.hold(key, micros, tokens, version).shared());
    }

    /// `reserved` plus `ahead`, capped at what the limit leaves (never below
    /// `reserved`): a crash then charges a window at most up to its limit, or what was
    /// actually in flight.
    fn hold_target(&self, ahead_micros: u64, ahead_tokens: u64) -> (u64, u64) {
        let cap = |reserved: u64, ahead: u64, limit: Option<u64>, spent: u64| {
            let want = reserved.saturating_add(ahead);
            match limit {
                Some(l) => want.min(reserved.max(l.saturating_sub(spent))),
                None => want,
            }
        };
        (
            cap(
                self.reserved_micros,
                ahead_micros,
                self.budget.micros,
                self.spent_micros,
            ),
            cap(
                self.reserved_tokens,
                ahead_tokens,
                self.budget.tokens,
                self.spent_tokens,
            ),
        )
    }

    /// A hold write this reservation must see durable before it may proceed: the last
    /// raise, if it is not known durable yet. (A lowering never needs waiting for: until
    /// it is durable, a higher value is.)
    fn pending_raise(&self) -> Option<(u64, HoldAnswer)> {
        match &self.hold.last {
            Some(last) if self.hold.raised > self.hold.acked => {
                Some((self.hold.raised, last.clone()))
            }
            _ => None,
        }
    }

    fn status(&self, key: &str) -> BudgetStatus {
        BudgetStatus {
            budget_key: key.to_owned(),
            limit_micros: self.budget.micros,
            soft_budget_micros: self.budget.soft,
            token_quota: self.budget.tokens,
            spent_micros: self.spent_micros,
            reserved_micros: self.reserved_micros,
            spent_tokens: self.spent_tokens,
            reserved_tokens: self.reserved_tokens,
        }
    }
}

#[derive(Debug)]
struct Shard {
    windows: HashMap<String, Window>,
    pruned_at_ms: i64,
}

impl Shard {
    /// Drops windows that ended more than the grace period ago and hold nothing; a
    /// durable hold left on one is given back through `journal`.
    fn prune(&mut self, now_ms: i64, journal: &dyn Journal) {
        let horizon = now_ms.saturating_sub(PRUNE_GRACE_MS);
        let oldest_kept = |p: Period| -> Option<String> {
            (p != Period::Total).then(|| window_start(p, horizon))
        };
        let kept = [
            (Period::Daily, oldest_kept(Period::Daily)),
            (Period::Weekly, oldest_kept(Period::Weekly)),
            (Period::Monthly, oldest_kept(Period::Monthly)),
        ];
        self.windows.retain(|key, w| {
            if w.reserved_micros > 0 || w.reserved_tokens > 0 {
                return true;
            }
            let mut parts = key.rsplitn(3, '|');
            let (Some(label), Some(period)) = (parts.next(), parts.next()) else {
                return true;
            };
            let Some(period) = parse_period(period) else {
                return true;
            };
            let keep = match kept.iter().find(|(p, _)| *p == period) {
                Some((_, Some(oldest))) => label >= oldest.as_str(),
                _ => true,
            };
            if !keep && (w.hold.micros > 0 || w.hold.tokens > 0) {
                // Queued now; nobody needs to wait for it.
                drop(journal.hold(key, 0, 0, w.hold.version + 1));
            }
            keep
        });
        self.pruned_at_ms = now_ms;
    }
}

/// FNV-1a: picks a shard. Cheaper than the maps' SipHash, and skew could only slow a
/// shard down (the maps inside keep SipHash).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    journal: Arc<dyn Journal>,
    /// Worst cases a durable hold is kept ahead of what is reserved (module docs).
    hold_ahead: u64,
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

impl Inner {
    fn shard_of(&self, key: &str) -> usize {
        (fnv1a(key.as_bytes()) % self.shards.len() as u64) as usize
    }

    /// The shard, recovering from a poisoned lock: every critical section leaves the
    /// windows consistent between statements.
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

    /// Moves each hold from reserved to spent with the given amounts (the hold's own
    /// worst case when `actual` is `None`).
    fn settle(&self, held: &[Held], actual: Option<(u64, u64)>) -> Settlement {
        let mut s = Settlement {
            ops: Vec::new(),
            charges: Vec::with_capacity(held.len()),
            warnings: Vec::new(),
            soft_exceeded: false,
        };
        let mut lowered = Vec::new();
        let mut locked = self.lock_all(held.iter().map(|h| h.shard));
        for h in held {
            let (micros, tokens) = actual.unwrap_or((h.micros, h.tokens));
            if let Some(shard) = locked.get(h.shard) {
                let w = match shard.windows.get_mut(&h.key) {
                    Some(w) => w,
                    None => shard.windows.entry(h.key.clone()).or_default(),
                };
                w.reserved_micros = w.reserved_micros.saturating_sub(h.micros);
                w.reserved_tokens = w.reserved_tokens.saturating_sub(h.tokens);
                let before = w.spent_micros;
                w.spent_micros = w.spent_micros.saturating_add(micros);
                w.spent_tokens = w.spent_tokens.saturating_add(tokens);
                lowered.extend(self.lower_hold(w, h));
                if let Some(soft) = h.budget.soft {
                    if w.spent_micros > soft {
                        s.soft_exceeded = true;
                        if before <= soft {
                            s.warnings.push(format!(
                                "{}: spent {} micro-USD, above the soft budget of {soft}",
                                h.key, w.spent_micros
                            ));
                        }
                    }
                }
            }
            s.charges.push(Charge {
                budget_key: h.key.clone(),
                micros,
                tokens,
            });
        }
        if !held.is_empty() {
            s.ops.push(Op::Charge(s.charges.clone()));
            s.ops.extend(lowered);
        }
        s
    }

    /// After `h` left window `w` (locked) and its charge was added to `spent`: the op
    /// that lowers the durable hold, to go in the same batch as the charge, when the
    /// hold is more than twice the headroom above `reserved` (with `hold_ahead` 0: above
    /// `reserved` at all), or above what the limit leaves after `spent`: to `reserved`
    /// plus the headroom, capped by the limit.
    fn lower_hold(&self, w: &mut Window, h: &Held) -> Option<Op> {
        let ahead_m = h.micros.saturating_mul(self.hold_ahead);
        let ahead_t = h.tokens.saturating_mul(self.hold_ahead);
        let (cap_m, cap_t) = w.hold_target(u64::MAX, u64::MAX);
        let slack_m = w.hold.micros.saturating_sub(w.reserved_micros);
        let slack_t = w.hold.tokens.saturating_sub(w.reserved_tokens);
        let too_much = |slack: u64, ahead: u64| slack > 0 && slack > ahead.saturating_mul(2);
        if too_much(slack_m, ahead_m)
            || too_much(slack_t, ahead_t)
            || w.hold.micros > cap_m
            || w.hold.tokens > cap_t
        {
            let (m, t) = w.hold_target(ahead_m, ahead_t);
            let (micros, tokens) = (m.min(w.hold.micros), t.min(w.hold.tokens));
            let version = w.next_hold(micros, tokens);
            return Some(Op::Hold {
                budget_key: h.key.clone(),
                micros,
                tokens,
                version,
            });
        }
        None
    }

    /// Gives holds back without charging anything.
    fn release(&self, held: &[Held]) {
        let mut locked = self.lock_all(held.iter().map(|h| h.shard));
        for h in held {
            if let Some(w) = locked.get(h.shard).and_then(|s| s.windows.get_mut(&h.key)) {
                w.reserved_micros = w.reserved_micros.saturating_sub(h.micros);
                w.reserved_tokens = w.reserved_tokens.saturating_sub(h.tokens);
            }
        }
    }

    /// Queues `ops` to the journal now and, where there is a runtime, logs their
    /// failure from a background task.
    fn record_in_background(&self, ops: Vec<Op>, why: &'static str) {
        let charge = self.journal.record(ops);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn(async move {
                if let Err(e) = charge.await {
                    tracing::error!(error = %e, "recording a budget charge ({why}) failed");
                }
            }));
        }
    }
}

/// The money budgets and token quotas of every scope. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<Inner>,
}

impl fmt::Debug for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budgets")
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

/// A hold write a reservation waits for: shard, window key, ticket, answer.
type HoldWait = (usize, String, u64, HoldAnswer);

/// What one reservation holds in one window.
#[derive(Debug, Clone)]
struct Held {
    key: String,
    shard: usize,
    scope: Scope,
    budget: Budget,
    micros: u64,
    tokens: u64,
}

/// A reservation between the in-memory hold and the journal's acknowledgement of its
/// windows' durable holds: dropped while armed (journal failure, or the `reserve`
/// future dropped), it gives the in-memory hold back.
struct Pending {
    inner: Arc<Inner>,
    held: Vec<Held>,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.inner.release(&self.held);
        }
    }
}

/// A request's hold on its budgets. End it with [`ReservationHandle::settle`] (or
/// [`ReservationHandle::settle_via_journal`]); dropped unsettled it is charged its
/// worst case.
pub struct ReservationHandle {
    inner: Arc<Inner>,
    held: Vec<Held>,
    soft_exceeded: bool,
    done: bool,
}

impl fmt::Debug for ReservationHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservationHandle")
            .field("held", &self.held)
            .field("soft_exceeded", &self.soft_exceeded)
            .finish_non_exhaustive()
    }
}

impl ReservationHandle {
    /// Whether some budget applies to the request (something is held).
    pub fn holds_anything(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether, counting this request's worst case and everything else reserved, some
    /// window may end above its soft threshold (`spent + reserved > soft`).
    pub fn soft_exceeded(&self) -> bool {
        self.soft_exceeded
    }

    /// The worst case held in each window (for the audit record's policy notes).
    pub fn charges(&self) -> Vec<Charge> {
        self.held
            .iter()
            .map(|h| Charge {
                budget_key: h.key.clone(),
                micros: h.micros,
                tokens: h.tokens,
            })
            .collect()
    }

    /// How many more tokens this request may produce under the tightest budget, given
    /// what it has already used (`used_micros`, `used_tokens`, e.g. its prompt) and the
    /// price of one more token. Its own hold counts as available to it, other requests'
    /// holds do not; a `micros_per_token` of 0 leaves money budgets out. `None` when no
    /// budget limits it. Read live: two calls may differ as other requests settle.
    pub fn remaining_tokens(
        &self,
        used_micros: u64,
        used_tokens: u64,
        micros_per_token: u64,
    ) -> Option<u64> {
        let mut left: Option<u64> = None;
        for h in &self.held {
            let shard = self.inner.lock(h.shard);
            let w = shard.windows.get(&h.key).unwrap_or(&Window::EMPTY);
            if let Some(quota) = h.budget.tokens {
                let others = w.reserved_tokens.saturating_sub(h.tokens);
                let n = quota
                    .saturating_sub(w.spent_tokens)
                    .saturating_sub(others)
                    .saturating_sub(used_tokens);
                left = tighter(left, Some(n));
            }
            if let (Some(limit), true) = (h.budget.micros, micros_per_token > 0) {
                let others = w.reserved_micros.saturating_sub(h.micros);
                let money = limit
                    .saturating_sub(w.spent_micros)
                    .saturating_sub(others)
                    .saturating_sub(used_micros);
                left = tighter(left, Some(money / micros_per_token));
            }
        }
        left
    }

    /// Moves the hold to spent with the actual amounts (charged to every window the
    /// request reserved in, even above the worst case) and returns the ledger ops to
    /// submit durably together with the audit record: the charges, and the lowering of
    /// a window's durable hold where it is due.
    pub fn settle(mut self, actual_micros: u64, actual_tokens: u64) -> Settlement {
        self.done = true;
        self.inner
            .settle(&self.held, Some((actual_micros, actual_tokens)))
    }

    /// [`ReservationHandle::settle`], then makes its ops durable through the journal;
    /// the returned settlement has no ops left to submit.
    pub async fn settle_via_journal(
        self,
        actual_micros: u64,
        actual_tokens: u64,
    ) -> Result<Settlement, String> {
        let journal = self.inner.journal.clone();
        let mut s = self.settle(actual_micros, actual_tokens);
        if !s.ops.is_empty() {
            journal.record(std::mem::take(&mut s.ops)).await?;
        }
        Ok(s)
    }
}

impl Drop for ReservationHandle {
    fn drop(&mut self) {
        if self.done || self.held.is_empty() {
            return;
        }
        let s = self.inner.settle(&self.held, None);
        tracing::warn!("budget reservation dropped unsettled; charging its worst case");
        self.inner.record_in_background(s.ops, "dropped unsettled");
    }
}

impl Budgets {
    /// The budgets as the ledger left them: `balances` are the spent amounts per window
    /// (holds and reservations left by the last stop already charged in full by the
    /// ledger), with the default [`HOLD_AHEAD`].
    pub fn load(journal: Arc<dyn Journal>, balances: Vec<(String, BudgetBalance)>) -> Self {
        Self::load_with(journal, balances, HOLD_AHEAD)
    }

    /// [`Budgets::load`] with durable holds kept `hold_ahead` worst cases ahead of what
    /// is reserved (0: every admission waits for a durable write of its own).
    pub fn load_with(
        journal: Arc<dyn Journal>,
        balances: Vec<(String, BudgetBalance)>,
        hold_ahead: u64,
    ) -> Self {
        let inner = Inner {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        windows: HashMap::new(),
                        pruned_at_ms: i64::MIN,
                    })
                })
                .collect(),
            journal,
            hold_ahead,
        };
        for (key, b) in balances {
            let mut shard = inner.lock(inner.shard_of(&key));
            let w = shard.windows.entry(key).or_default();
            w.spent_micros = w.spent_micros.saturating_add(b.spent_micros);
            w.spent_tokens = w.spent_tokens.saturating_add(b.spent_tokens);
        }
        Budgets {
            inner: Arc::new(inner),
        }
    }

    /// Reserves the worst case of a request (`worst_micros`, `worst_tokens` = prompt +
    /// the most completion it may produce) in the current window of every scope of
    /// `principal` that has a money budget, token quota or soft threshold, all or
    /// nothing, and makes the reservation durable before returning. The most specific
    /// scope's refusal is reported. A scope listed twice gets the tighter limits.
    pub async fn reserve(
        &self,
        principal: &Principal,
        worst_micros: u64,
        worst_tokens: u64,
        now_ms: i64,
    ) -> Result<ReservationHandle, BudgetError> {
        let (held, soft_exceeded, waits) =
            self.hold(principal, worst_micros, worst_tokens, now_ms)?;
        let mut pending = Pending {
            inner: self.inner.clone(),
            held,
            armed: true,
        };
        let mut failed = None;
        for (shard, key, ticket, answer) in waits {
            let outcome = answer.await;
            let mut locked = self.inner.lock(shard);
            let Some(w) = locked.windows.get_mut(&key) else {
                continue;
            };
            match outcome {
                Ok(()) => w.hold.acked = w.hold.acked.max(ticket),
                Err(e) => {
                    if w.hold.raised == ticket {
                        // What is durable is unknown: the next reservation writes again.
                        w.hold.micros = 0;
                        w.hold.tokens = 0;
                    }
                    failed = Some(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(BudgetError::Journal(e));
        }
        pending.armed = false;
        Ok(ReservationHandle {
            inner: self.inner.clone(),
            held: std::mem::take(&mut pending.held),
            soft_exceeded,
            done: false,
        })
    }

    /// The in-memory part of [`Budgets::reserve`].
    fn hold(
        &self,
        principal: &Principal,
        worst_micros: u64,
        worst_tokens: u64,
        now_ms: i64,
    ) -> Result<(Vec<Held>, bool, Vec<HoldWait>), BudgetExceeded> {
        let inner = &self.inner;
        let mut held: Vec<Held> = Vec::with_capacity(principal.limits.len());
        for (scope, l) in &principal.limits {
            let budget = Budget {
                micros: l.max_budget_micros,
                tokens: l.token_quota,
                soft: l.soft_budget_micros,
            };
            if budget == Budget::default() {
                continue;
            }
            let key = window_key(scope, l.budget_duration, now_ms);
            match held.iter_mut().find(|h| h.key == key) {
                Some(h) => h.budget = h.budget.tighter(budget),
                None => held.push(Held {
                    shard: inner.shard_of(&key),
                    key,
                    scope: scope.clone(),
                    budget,
                    micros: worst_micros,
                    tokens: worst_tokens,
                }),
            }
        }
        if held.is_empty() {
            return Ok((held, false, Vec::new()));
        }
        let mut locked = inner.lock_all(held.iter().map(|h| h.shard));

        for h in &held {
            let Some(shard) = locked.get(h.shard) else {
                continue;
            };
            let w = shard.windows.get(&h.key).unwrap_or(&Window::EMPTY);
            let refuse = |kind, limit, spent, reserved, requested| BudgetExceeded {
                scope: h.scope.clone(),
                budget_key: h.key.clone(),
                kind,
                limit,
                spent,
                reserved,
                requested,
            };
            if let Some(limit) = h.budget.micros {
                let total = w
                    .spent_micros
                    .saturating_add(w.reserved_micros)
                    .saturating_add(worst_micros);
                if total > limit {
                    return Err(refuse(
                        "budget",
                        limit,
                        w.spent_micros,
                        w.reserved_micros,
                        worst_micros,
                    ));
                }
            }
            if let Some(quota) = h.budget.tokens {
                let total = w
                    .spent_tokens
                    .saturating_add(w.reserved_tokens)
                    .saturating_add(worst_tokens);
                if total > quota {
                    return Err(refuse(
                        "token_quota",
                        quota,
                        w.spent_tokens,
                        w.reserved_tokens,
                        worst_tokens,
                    ));
                }
            }
        }

        let mut soft_exceeded = false;
        let mut waits = Vec::new();
        let journal = inner.journal.as_ref();
        let ahead_m = worst_micros.saturating_mul(inner.hold_ahead);
        let ahead_t = worst_tokens.saturating_mul(inner.hold_ahead);
        for h in &held {
            let Some(shard) = locked.get(h.shard) else {
                continue;
            };
            let w = match shard.windows.get_mut(&h.key) {
                Some(w) => w,
                None => shard.windows.entry(h.key.clone()).or_default(),
            };
            w.reserved_micros = w.reserved_micros.saturating_add(worst_micros);
            w.reserved_tokens = w.reserved_tokens.saturating_add(worst_tokens);
            w.budget = h.budget;
            if let Some(soft) = h.budget.soft {
                soft_exceeded |= w.spent_micros.saturating_add(w.reserved_micros) > soft;
            }
            if w.reserved_micros > w.hold.micros || w.reserved_tokens > w.hold.tokens {
                let (m, t) = w.hold_target(ahead_m, ahead_t);
                let (m, t) = (m.max(w.hold.micros), t.max(w.hold.tokens));
                w.raise_hold(journal, &h.key, m, t);
            }
            if let Some((ticket, answer)) = w.pending_raise() {
                waits.push((h.shard, h.key.clone(), ticket, answer));
            }
        }
        for (_, shard) in &mut locked.0 {
            if now_ms >= shard.pruned_at_ms.saturating_add(PRUNE_EVERY_MS) {
                shard.prune(now_ms, journal);
            }
        }
        Ok((held, soft_exceeded, waits))
    }

    /// Every window of `scope` in memory (of `period` when given), sorted by key: the
    /// current ones and those not yet pruned. Older history is in the ledger.
    pub fn status(&self, scope: &Scope, period: Option<Period>) -> Vec<BudgetStatus> {
        let mut prefix = scope.as_key();
        prefix.push('|');
        if let Some(p) = period {
            prefix.push_str(period_name(p));
            prefix.push('|');
        }
        let mut out: Vec<BudgetStatus> = (0..self.inner.shards.len())
            .flat_map(|i| {
                let shard = self.inner.lock(i);
                shard
                    .windows
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, w)| w.status(k))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| a.budget_key.cmp(&b.budget_key));
        out
    }

    /// The current window of `scope` under `limits` (as configured now), also when
    /// nothing was spent in it yet; `None` when `limits` set no budget, quota or soft
    /// threshold.
    pub fn current(
        &self,
        scope: &Scope,
        limits: &super::model::Limits,
        now_ms: i64,
    ) -> Option<BudgetStatus> {
        let budget = Budget {
            micros: limits.max_budget_micros,
            tokens: limits.token_quota,
            soft: limits.soft_budget_micros,
        };
        if budget == Budget::default() {
            return None;
        }
        let key = window_key(scope, limits.budget_duration, now_ms);
        let shard = self.inner.lock(self.inner.shard_of(&key));
        let w = shard.windows.get(&key).unwrap_or(&Window::EMPTY);
        Some(
            Window {
                budget,
                ..w.clone()
            }
            .status(&key),
        )
    }

    /// Drops windows that ended more than an hour before `now_ms` and hold nothing
    /// (reservation also does it, a shard at most once an hour).
    pub fn prune(&self, now_ms: i64) {
        for i in 0..self.inner.shards.len() {
            self.inner
                .lock(i)
                .prune(now_ms, self.inner.journal.as_ref());
        }
    }

    /// Lowers every window's durable hold to what is still reserved (nothing, once
    /// requests are drained) and waits until that is durable: for a clean shutdown, so
    /// that the next start charges nothing for requests that were not in flight.
    pub async fn release_holds(&self) -> Result<(), String> {
        let mut answers = Vec::new();
        for i in 0..self.inner.shards.len() {
            let mut shard = self.inner.lock(i);
            for (key, w) in shard.windows.iter_mut() {
                if w.hold.micros > w.reserved_micros || w.hold.tokens > w.reserved_tokens {
                    let (m, t) = (w.reserved_micros, w.reserved_tokens);
                    w.raise_hold(self.inner.journal.as_ref(), key, m, t);
                    answers.extend(w.hold.last.clone());
                }
            }
        }
        for a in answers {
            a.await?;
        }
        Ok(())
    }

    /// Number of windows in memory.
    pub fn windows(&self) -> usize {
        (0..self.inner.shards.len())
            .map(|i| self.inner.lock(i).windows.len())
            .sum()
    }
}

// ---------------------------------------------------------------------------------
// In-memory journal

/// A [`Journal`] in memory, with the ledger's semantics for reservations and balances
/// and a switch to make it fail. For tests and benchmarks. Like the ledger's, its
/// futures do nothing until polled.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    shared: Arc<MemoryShared>,
}

#[derive(Debug, Default)]
struct MemoryShared {
    failing: AtomicBool,
    state: Mutex<MemoryLedger>,
}

#[derive(Debug, Default)]
struct MemoryLedger {
    open: BTreeMap<u64, Reservation>,
    balances: BTreeMap<String, BudgetBalance>,
    holds: BTreeMap<String, StoredHold>,
}

impl MemoryShared {
    fn lock(&self) -> MutexGuard<'_, MemoryLedger> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn apply(&self, ops: &[Op]) -> Result<(), String> {
        if self.failing.load(Ordering::SeqCst) {
            return Err("journal unavailable".to_owned());
        }
        let mut st = self.lock();
        for op in ops {
            let charges = match op {
                Op::OpenReservation(r) => {
                    st.open.insert(r.id, r.clone());
                    continue;
                }
                Op::CloseReservation { id, actual } => {
                    if st.open.remove(id).is_none() {
                        continue;
                    }
                    actual
                }
                Op::Charge(c) => c,
                Op::Hold {
                    budget_key,
                    micros,
                    tokens,
                    version,
                } => {
                    let h = st.holds.entry(budget_key.clone()).or_default();
                    h.apply(*micros, *tokens, *version);
                    continue;
                }
                Op::Audit(_) | Op::Usage { .. } => continue,
            };
            for c in charges {
                let b = st.balances.entry(c.budget_key.clone()).or_default();
                b.spent_micros = b.spent_micros.saturating_add(c.micros);
                b.spent_tokens = b.spent_tokens.saturating_add(c.tokens);
            }
        }
        Ok(())
    }
}

impl MemoryJournal {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, every operation fails and changes nothing.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// Applies a batch at once, as the ledger would (reservations, holds and charges;
    /// other ops are accepted and ignored).
    pub fn apply(&self, ops: &[Op]) -> Result<(), String> {
        self.shared.apply(ops)
    }

    /// Balances per window, sorted by key.
    pub fn balances(&self) -> Vec<(String, BudgetBalance)> {
        self.shared
            .lock()
            .balances
            .iter()
            .map(|(k, b)| (k.clone(), b.clone()))
            .collect()
    }

    /// Reservations opened and not closed, by id.
    pub fn open_reservations(&self) -> Vec<Reservation> {
        self.shared.lock().open.values().cloned().collect()
    }

    /// Non-zero holds per window (micros, tokens), sorted by key.
    pub fn holds(&self) -> Vec<(String, (u64, u64))> {
        let st = self.shared.lock();
        st.holds
            .iter()
            .filter(|(_, h)| h.micros > 0 || h.tokens > 0)
            .map(|(k, h)| (k.clone(), (h.micros, h.tokens)))
            .collect()
    }

    /// What a crash now would leave charged per window: balances plus holds (as the
    /// ledger's recovery charges them), sorted by key.
    pub fn after_crash(&self) -> Vec<(String, BudgetBalance)> {
        let st = self.shared.lock();
        let mut out = st.balances.clone();
        for (k, h) in &st.holds {
            let b = out.entry(k.clone()).or_default();
            b.spent_micros = b.spent_micros.saturating_add(h.micros);
            b.spent_tokens = b.spent_tokens.saturating_add(h.tokens);
        }
        out.into_iter().collect()
    }
}

/// Applied when called (the ledger queues when called), answered when polled.
impl Journal for MemoryJournal {
    fn hold(
        &self,
        budget_key: &str,
        micros: u64,
        tokens: u64,
        version: u64,
    ) -> BoxFuture<'static, Result<(), String>> {
        let done = self.shared.apply(&[Op::Hold {
            budget_key: budget_key.to_owned(),
            micros,
            tokens,
            version,
        }]);
        Box::pin(futures::future::ready(done))
    }

    fn record(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(futures::future::ready(self.shared.apply(&ops)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::governance::model::{Limits, Role};

    /// 2026-11-30T12:00:00Z.
    const NOW: i64 = 1_796_083_199_000 - 12 * 3_600_000 + 1000;

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

    fn money(micros: u64, period: Period) -> Limits {
        Limits {
            max_budget_micros: Some(micros),
            budget_duration: period,
            ..Limits::default()
        }
    }

    fn key(k: &str) -> Scope {
        Scope::Key(k.into())
    }

    fn team() -> Scope {
        Scope::Team("t1".into())
    }

    fn budgets() -> (Budgets, Arc<MemoryJournal>) {
        let j = Arc::new(MemoryJournal::new());
        (Budgets::load(j.clone(), Vec::new()), j)
    }

    /// The one window of `scope` (panics if there is not exactly one).
    fn only(b: &Budgets, scope: &Scope) -> BudgetStatus {
        let mut s = b.status(scope, None);
        assert_eq!(s.len(), 1, "{s:?}");
        s.remove(0)
    }

    #[test]
    fn window_keys_change_at_utc_boundaries() {
        let s = 1000i64;
        let cases = [
            // (last ms of a window, period, label before, label after)
            (1_796_083_199_999, Period::Daily, "2026-11-30", "2026-12-01"),
            (1_796_083_199_999, Period::Monthly, "2026-11", "2026-12"),
            (
                1_709_251_199 * s + 999,
                Period::Daily,
                "2024-02-29",
                "2024-03-01",
            ),
            (
                1_709_251_199 * s + 999,
                Period::Monthly,
                "2024-02",
                "2024-03",
            ),
            // Sunday -> Monday; ISO years differ from calendar years around New Year.
            (
                1_609_718_399 * s + 999,
                Period::Weekly,
                "2020-W53",
                "2021-W01",
            ),
            (
                1_735_516_799 * s + 999,
                Period::Weekly,
                "2024-W52",
                "2025-W01",
            ),
            (
                1_798_761_599 * s + 999,
                Period::Daily,
                "2026-12-31",
                "2027-01-01",
            ),
            (
                1_798_761_599 * s + 999,
                Period::Monthly,
                "2026-12",
                "2027-01",
            ),
            (1_798_761_599 * s + 999, Period::Total, "total", "total"),
            (-1, Period::Daily, "1969-12-31", "1970-01-01"),
        ];
        for (last, period, before, after) in cases {
            assert_eq!(window_start(period, last), before, "{period:?} {last}");
            assert_eq!(window_start(period, last + 1), after, "{period:?} {last}");
        }
        // 2027-01-01 is a Friday: still in ISO week 53 of 2026; the Thursday before
        // that week's Monday is in week 52.
        assert_eq!(window_start(Period::Weekly, 1_798_761_600 * s), "2026-W53");
        assert_eq!(
            window_start(Period::Weekly, 1_798_761_600 * s - 4 * MS_PER_DAY),
            "2026-W53"
        );
        assert_eq!(
            window_start(Period::Weekly, 1_798_761_600 * s - 5 * MS_PER_DAY),
            "2026-W52"
        );
        assert_eq!(
            window_key(&team(), Period::Monthly, NOW),
            "team:t1|monthly|2026-11"
        );
        for scope in [
            key("a"),
            Scope::User("u".into()),
            team(),
            Scope::Org("o".into()),
        ] {
            let k = window_key(&scope, Period::Weekly, NOW);
            assert_eq!(k, format!("{}|weekly|2026-W49", scope.as_key()));
        }
        // Every day of 400 years round-trips, and labels sort in time order.
        let mut prev = String::new();
        for d in (-146_097i64..146_097).step_by(13) {
            let (y, m, dd) = civil_from_days(d);
            assert!((1..=12).contains(&m) && (1..=31).contains(&dd));
            assert!(days_to_jan_1(y) <= d && d < days_to_jan_1(y + 1));
            let label = window_start(Period::Daily, d * MS_PER_DAY);
            if d >= 0 {
                assert!(label > prev, "{label} after {prev}");
                prev = label;
            }
        }
    }

    #[tokio::test]
    async fn a_new_window_starts_empty() {
        let (b, _) = budgets();
        for period in [Period::Daily, Period::Weekly, Period::Monthly] {
            let p = principal("k", money(1000, period), Limits::default());
            // 2026-11-30 is a Monday, so the next day is in the same week.
            let (next, key_now, key_next) = match period {
                Period::Daily => (NOW + MS_PER_DAY, "2026-11-30", "2026-12-01"),
                Period::Weekly => (NOW + 7 * MS_PER_DAY, "2026-W49", "2026-W50"),
                _ => (NOW + MS_PER_DAY, "2026-11", "2026-12"),
            };
            b.reserve(&p, 1000, 0, NOW).await.unwrap().settle(1000, 0);
            let e = b.reserve(&p, 1, 0, NOW).await.unwrap_err();
            assert!(
                matches!(e, BudgetError::Exceeded(ref x) if x.kind == "budget"),
                "{e}"
            );
            let h = b.reserve(&p, 1000, 0, next).await.unwrap();
            let s = b.status(&key("k"), Some(period));
            let keys: Vec<_> = s.iter().map(|s| s.budget_key.as_str()).collect();
            let name = period_name(period);
            assert_eq!(
                keys,
                [
                    format!("key:k|{name}|{key_now}"),
                    format!("key:k|{name}|{key_next}")
                ]
            );
            assert_eq!((s[1].spent_micros, s[1].reserved_micros), (0, 1000));
            h.settle(0, 0);
        }
    }

    #[tokio::test]
    async fn settle_moves_the_hold_to_spent_and_returns_the_ops() {
        let (b, j) = budgets();
        let key_limits = Limits {
            token_quota: Some(10_000),
            ..money(1_000_000, Period::Monthly)
        };
        let p = principal("k", key_limits, money(5_000_000, Period::Total));
        let h = b.reserve(&p, 3000, 500, NOW).await.unwrap();
        assert!(h.holds_anything());
        assert!(!h.soft_exceeded());
        // Each window's durable hold covers the worst case and HOLD_AHEAD more of it;
        // both limits leave room for all of it.
        assert_eq!(
            j.holds(),
            vec![
                ("key:k|monthly|2026-11".to_owned(), (3000 * 17, 500 * 17)),
                ("team:t1|total|total".to_owned(), (3000 * 17, 500 * 17)),
            ]
        );
        assert_eq!(
            h.charges()
                .iter()
                .map(|c| c.budget_key.as_str())
                .collect::<Vec<_>>(),
            ["key:k|monthly|2026-11", "team:t1|total|total"]
        );
        let st = only(&b, &key("k"));
        assert_eq!(
            (
                st.reserved_micros,
                st.reserved_tokens,
                st.limit_micros,
                st.token_quota
            ),
            (3000, 500, Some(1_000_000), Some(10_000))
        );

        let s = h.settle(1200, 321);
        let actual = vec![
            Charge {
                budget_key: "key:k|monthly|2026-11".into(),
                micros: 1200,
                tokens: 321,
            },
            Charge {
                budget_key: "team:t1|total|total".into(),
                micros: 1200,
                tokens: 321,
            },
        ];
        assert_eq!(s.charges, actual);
        assert_eq!(s.ops, vec![Op::Charge(actual)]);
        assert!(s.warnings.is_empty() && !s.soft_exceeded);
        for scope in [key("k"), team()] {
            let st = only(&b, &scope);
            assert_eq!(
                (
                    st.spent_micros,
                    st.reserved_micros,
                    st.spent_tokens,
                    st.reserved_tokens
                ),
                (1200, 0, 321, 0)
            );
        }
        // The caller submits the ops with its audit record.
        j.apply(&s.ops).unwrap();
        assert_eq!(j.balances().len(), 2);
        // Nothing reserved, the holds stay (within twice the headroom): the next
        // request waits for no write.
        assert_eq!(j.holds().len(), 2);

        // Through the journal directly: nothing left to submit.
        let h = b.reserve(&p, 10, 1, NOW).await.unwrap();
        let s = h.settle_via_journal(10, 1).await.unwrap();
        assert!(s.ops.is_empty());
        assert_eq!(j.balances()[0].1.spent_micros, 1210);
        // A clean shutdown gives every hold back.
        b.release_holds().await.unwrap();
        assert!(j.holds().is_empty());
    }

    #[tokio::test]
    async fn a_principal_without_budgets_reserves_nothing() {
        let (b, j) = budgets();
        let p = principal("k", Limits::default(), Limits::default());
        let h = b.reserve(&p, 1000, 10, NOW).await.unwrap();
        assert_eq!(
            (h.holds_anything(), h.remaining_tokens(0, 0, 1)),
            (false, None)
        );
        let s = h.settle(5, 5);
        assert_eq!(s.ops.len(), 0);
        assert!(j.holds().is_empty() && b.windows() == 0);
    }

    #[tokio::test]
    async fn a_refusal_by_the_team_leaves_the_key_untouched() {
        let (b, j) = budgets();
        let key_limits = Limits {
            token_quota: Some(1_000_000),
            ..money(1_000_000, Period::Daily)
        };
        let p = principal("k", key_limits, money(2500, Period::Monthly));
        let h = b.reserve(&p, 2000, 100, NOW).await.unwrap();
        let before = b.status(&key("k"), None);
        let e = b.reserve(&p, 1000, 100, NOW).await.unwrap_err();
        let BudgetError::Exceeded(e) = e else {
            panic!("{e}")
        };
        assert_eq!(
            e,
            BudgetExceeded {
                scope: team(),
                budget_key: "team:t1|monthly|2026-11".into(),
                kind: "budget",
                limit: 2500,
                spent: 0,
                reserved: 2000,
                requested: 1000
            }
        );
        assert_eq!(b.status(&key("k"), None), before);
        assert_eq!(j.holds().len(), 2, "the refusal wrote no hold");
        // The most specific refusal is reported; token quotas are checked too.
        let p = principal(
            "k",
            Limits {
                token_quota: Some(150),
                ..Limits::default()
            },
            money(1, Period::Daily),
        );
        let BudgetError::Exceeded(e) = b.reserve(&p, 1000, 200, NOW).await.unwrap_err() else {
            panic!()
        };
        assert_eq!(
            (e.kind, e.scope, e.limit, e.spent, e.reserved, e.requested),
            ("token_quota", key("k"), 150, 0, 0, 200)
        );
        drop(h.settle(0, 0));
    }

    #[tokio::test]
    async fn a_scope_listed_twice_is_held_once_with_the_tighter_limit() {
        let (b, _) = budgets();
        let mut p = principal("k", money(5000, Period::Daily), Limits::default());
        p.limits.push((key("k"), money(1500, Period::Daily)));
        let h = b.reserve(&p, 1000, 0, NOW).await.unwrap();
        assert_eq!(h.charges().len(), 1);
        assert_eq!(only(&b, &key("k")).reserved_micros, 1000);
        assert!(b.reserve(&p, 1000, 0, NOW).await.is_err());
        h.settle(1000, 0);
    }

    #[tokio::test]
    async fn journal_failure_rolls_back_the_hold() {
        let (b, j) = budgets();
        let p = principal("k", money(1000, Period::Daily), money(1000, Period::Daily));
        j.set_failing(true);
        let e = b.reserve(&p, 1000, 10, NOW).await.unwrap_err();
        assert!(matches!(e, BudgetError::Journal(_)), "{e}");
        for scope in [key("k"), team()] {
            let st = only(&b, &scope);
            assert_eq!((st.reserved_micros, st.reserved_tokens), (0, 0));
        }
        j.set_failing(false);
        let h = b.reserve(&p, 1000, 10, NOW).await.unwrap();
        assert_eq!(only(&b, &team()).reserved_micros, 1000);
        h.settle(1, 1);
    }

    /// A journal whose hold writes never resolve; it records the holds it is sent.
    #[derive(Default)]
    struct Stuck {
        holds: Mutex<Vec<(String, u64, u64)>>,
    }

    impl Journal for Stuck {
        fn hold(
            &self,
            key: &str,
            micros: u64,
            tokens: u64,
            _: u64,
        ) -> BoxFuture<'static, Result<(), String>> {
            self.holds
                .lock()
                .unwrap()
                .push((key.to_owned(), micros, tokens));
            Box::pin(futures::future::pending())
        }
        fn record(&self, _: Vec<Op>) -> BoxFuture<'static, Result<(), String>> {
            Box::pin(futures::future::ready(Ok(())))
        }
    }

    #[tokio::test]
    async fn a_reserve_dropped_while_waiting_for_the_journal_gives_the_hold_back() {
        let j = Arc::new(Stuck::default());
        let b = Budgets::load(j.clone(), Vec::new());
        let p = principal("k", money(10_000, Period::Daily), Limits::default());
        let mut f = Box::pin(b.reserve(&p, 1000, 0, NOW));
        assert!(futures::poll!(&mut f).is_pending());
        assert_eq!(only(&b, &key("k")).reserved_micros, 1000);
        // The hold asked for: the worst case and 16 more, capped at the limit.
        let want = vec![("key:k|daily|2026-11-30".to_owned(), 10_000, 0)];
        assert_eq!(*j.holds.lock().unwrap(), want);
        // A second request fits under the queued hold but must wait for it too.
        let mut g = Box::pin(b.reserve(&p, 1000, 0, NOW));
        assert!(futures::poll!(&mut g).is_pending());
        assert_eq!(j.holds.lock().unwrap().len(), 1, "no second write");
        drop(f);
        drop(g);
        assert_eq!(only(&b, &key("k")).reserved_micros, 0);
    }

    /// The exact mode: with `hold_ahead` 0 every admission writes `hold = reserved`,
    /// and every settlement lowers it again.
    #[tokio::test]
    async fn hold_ahead_zero_holds_exactly_what_is_reserved() {
        let j = Arc::new(MemoryJournal::new());
        let b = Budgets::load_with(j.clone(), Vec::new(), 0);
        let p = principal("k", money(10_000, Period::Daily), Limits::default());
        let h1 = b.reserve(&p, 1000, 10, NOW).await.unwrap();
        let h2 = b.reserve(&p, 300, 3, NOW).await.unwrap();
        let k = "key:k|daily|2026-11-30".to_owned();
        assert_eq!(j.holds(), vec![(k.clone(), (1300, 13))]);
        j.apply(&h1.settle(200, 2).ops).unwrap();
        assert_eq!(j.holds(), vec![(k.clone(), (300, 3))]);
        // A crash now charges what was settled and the worst case still in flight.
        let crash = j.after_crash();
        assert_eq!(
            crash,
            vec![(
                k,
                BudgetBalance {
                    spent_micros: 500,
                    spent_tokens: 5
                }
            )]
        );
        j.apply(&h2.settle(300, 3).ops).unwrap();
        assert!(j.holds().is_empty());
    }

    /// Holds follow a surge up and come back down (hysteresis) once it is over.
    #[tokio::test]
    async fn holds_grow_in_blocks_and_shrink_after_a_surge() {
        let (b, j) = budgets();
        let p = principal("k", money(1_000_000_000, Period::Daily), Limits::default());
        let k = "key:k|daily|2026-11-30".to_owned();
        let hold = |j: &MemoryJournal| j.holds().first().map(|(_, h)| h.0).unwrap_or(0);
        let mut handles = Vec::new();
        for i in 0..40u64 {
            handles.push(b.reserve(&p, 100, 0, NOW).await.unwrap());
            let reserved = 100 * (i + 1);
            assert!(hold(&j) >= reserved, "the hold covers every admission");
            assert!(hold(&j) <= reserved + 100 * HOLD_AHEAD);
        }
        // 40 admissions, and the hold was written only when exceeded: 1 + 40 / 17 times.
        assert_eq!(hold(&j), 100 * (35 + HOLD_AHEAD));
        for h in handles.drain(..) {
            j.apply(&h.settle(50, 0).ops).unwrap();
            assert!(hold(&j) >= only(&b, &key("k")).reserved_micros);
        }
        // Drained: the hold came down to at most twice the headroom.
        assert!(hold(&j) <= 2 * 100 * HOLD_AHEAD, "{}", hold(&j));
        let crash = j.after_crash();
        assert_eq!(crash[0].0, k);
        assert_eq!(crash[0].1.spent_micros, 40 * 50 + hold(&j));
    }

    #[tokio::test]
    async fn a_dropped_handle_settles_the_worst_case() {
        let (b, j) = budgets();
        let p = principal(
            "k",
            money(10_000, Period::Daily),
            money(10_000, Period::Daily),
        );
        let h = b.reserve(&p, 4000, 40, NOW).await.unwrap();
        drop(h);
        for scope in [key("k"), team()] {
            let st = only(&b, &scope);
            assert_eq!(
                (st.spent_micros, st.reserved_micros, st.spent_tokens),
                (4000, 0, 40)
            );
        }
        let balances = j.balances();
        assert_eq!(balances.len(), 2);
        assert!(balances
            .iter()
            .all(|(_, b)| (b.spent_micros, b.spent_tokens) == (4000, 40)));
    }

    #[test]
    fn a_handle_dropped_without_a_runtime_is_charged_all_the_same() {
        let (b, j) = budgets();
        let p = principal("k", money(10_000, Period::Daily), Limits::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let h = rt.block_on(b.reserve(&p, 4000, 40, NOW)).unwrap();
        drop(rt);
        drop(h);
        assert_eq!(only(&b, &key("k")).spent_micros, 4000);
        // Queued to the journal at drop, with no runtime to wait on it.
        assert_eq!(j.balances()[0].1.spent_micros, 4000);
    }

    #[tokio::test]
    async fn the_soft_threshold_warns_once_crossed() {
        let (b, _) = budgets();
        let limits = Limits {
            soft_budget_micros: Some(2500),
            ..money(10_000, Period::Monthly)
        };
        let p = principal("k", limits, Limits::default());
        let mut flags = Vec::new();
        for _ in 0..4 {
            let h = b.reserve(&p, 1000, 0, NOW).await.unwrap();
            let reserved_flag = h.soft_exceeded();
            let s = h.settle(1000, 0);
            flags.push((reserved_flag, s.soft_exceeded, s.warnings));
        }
        assert_eq!(flags[0], (false, false, vec![]));
        assert_eq!(flags[1], (false, false, vec![]));
        assert_eq!(
            flags[2],
            (
                true,
                true,
                vec![
                    "key:k|monthly|2026-11: spent 3000 micro-USD, above the soft budget of 2500"
                        .to_owned()
                ]
            )
        );
        assert_eq!(flags[3], (true, true, vec![]));
        // A soft threshold alone tracks spending without limiting it.
        let p = principal(
            "s",
            Limits {
                soft_budget_micros: Some(1),
                ..Limits::default()
            },
            Limits::default(),
        );
        let h = b.reserve(&p, 1_000_000, 0, NOW).await.unwrap();
        assert!(h.soft_exceeded());
        assert_eq!(h.settle(5, 0).warnings.len(), 1);
        assert_eq!(only(&b, &key("s")).soft_budget_micros, Some(1));
    }

    #[tokio::test]
    async fn spending_beyond_the_worst_case_is_recorded_and_stops_new_requests() {
        let (b, _) = budgets();
        let p = principal("k", money(1000, Period::Daily), Limits::default());
        let h = b.reserve(&p, 600, 0, NOW).await.unwrap();
        h.settle(1300, 0);
        assert_eq!(only(&b, &key("k")).spent_micros, 1300);
        let e = b.reserve(&p, 1, 0, NOW).await.unwrap_err();
        assert!(
            matches!(e, BudgetError::Exceeded(ref x) if x.spent == 1300),
            "{e}"
        );
        // A zero worst case is admitted only while not over the limit.
        assert!(b.reserve(&p, 0, 0, NOW).await.is_err());
    }

    #[tokio::test]
    async fn remaining_tokens_is_the_tightest_headroom() {
        let (b, _) = budgets();
        let key_limits = Limits {
            token_quota: Some(1000),
            ..Limits::default()
        };
        let p = principal("k", key_limits, money(10_000, Period::Daily));
        let other = b.reserve(&p, 2000, 300, NOW).await.unwrap();
        let h = b.reserve(&p, 1000, 100, NOW).await.unwrap();
        // Tokens: 1000 - 300 (other's hold) - 50 used = 650. Money: 10_000 - 2000 -
        // 400 used = 7600 at 20 per token = 380.
        assert_eq!(h.remaining_tokens(400, 50, 20), Some(380));
        assert_eq!(h.remaining_tokens(400, 50, 0), Some(650));
        other.settle(1000, 100);
        assert_eq!(h.remaining_tokens(400, 50, 0), Some(850));
        // Money: 10_000 - 1000 spent - 400 used = 8600 at 20 = 430.
        assert_eq!(h.remaining_tokens(400, 50, 20), Some(430));
        assert_eq!(h.remaining_tokens(400, 50, 1), Some(850));
        h.settle(0, 0);
    }

    #[tokio::test]
    async fn load_starts_from_the_ledger_balances_and_prune_drops_old_windows() {
        let bal = |m, t| BudgetBalance {
            spent_micros: m,
            spent_tokens: t,
        };
        let j = Arc::new(MemoryJournal::new());
        let b = Budgets::load(
            j,
            vec![
                ("key:k|daily|2026-11-29".into(), bal(5, 5)),
                ("key:k|daily|2026-11-30".into(), bal(900, 9)),
                ("key:k|weekly|2026-W48".into(), bal(1, 1)),
                ("key:k|total|total".into(), bal(7, 7)),
                ("team:t1|monthly|2026-10".into(), bal(3, 3)),
                ("garbage".into(), bal(1, 1)),
            ],
        );
        assert_eq!(b.status(&key("k"), None).len(), 4);
        let p = principal("k", money(1000, Period::Daily), Limits::default());
        let e = b.reserve(&p, 101, 0, NOW).await.unwrap_err();
        assert!(matches!(e, BudgetError::Exceeded(ref x) if x.spent == 900));
        let limits = money(1000, Period::Daily);
        let cur = b.current(&key("k"), &limits, NOW).unwrap();
        assert_eq!((cur.spent_micros, cur.limit_micros), (900, Some(1000)));
        assert_eq!(b.current(&key("k"), &Limits::default(), NOW), None);
        let fresh = b.current(&key("k"), &limits, NOW + MS_PER_DAY).unwrap();
        assert_eq!(
            (fresh.budget_key.as_str(), fresh.spent_micros),
            ("key:k|daily|2026-12-01", 0)
        );

        // A hold keeps yesterday's window past the grace hour; total and garbage stay.
        let h = b.reserve(&p, 100, 0, NOW).await.unwrap();
        let tomorrow = NOW + 12 * 3_600_000 + 1;
        b.prune(tomorrow);
        let keys = |b: &Budgets| -> Vec<String> {
            b.status(&key("k"), None)
                .into_iter()
                .map(|s| s.budget_key)
                .collect()
        };
        assert_eq!(keys(&b), ["key:k|daily|2026-11-30", "key:k|total|total"]);
        assert_eq!(
            b.windows(),
            3,
            "and the unparsable key; last month's team window is gone"
        );
        h.settle(100, 0);
        // Settled, the window is kept until it ended an hour ago.
        b.prune(tomorrow + 3_600_000 - 10_000);
        assert_eq!(keys(&b), ["key:k|daily|2026-11-30", "key:k|total|total"]);
        b.prune(tomorrow + 3_600_000);
        assert_eq!(keys(&b), ["key:k|total|total"]);
    }

    #[test]
    fn handles_and_futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Budgets>();
        assert_send_sync::<ReservationHandle>();
        let (b, _) = budgets();
        let p = principal("k", Limits::default(), Limits::default());
        let f = b.reserve(&p, 0, 0, NOW);
        assert_send(&f);
        assert!(format!("{b:?}").contains("Budgets"));
    }

    /// [`MemoryJournal`] behind a random delay, so reservations interleave.
    struct Jitter {
        inner: Arc<MemoryJournal>,
        calls: AtomicU64,
        seed: u64,
    }

    impl Jitter {
        fn delay(&self) -> Duration {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let mut rng = StdRng::seed_from_u64(self.seed ^ n.wrapping_mul(0x9e37_79b9));
            Duration::from_micros(rng.random_range(0..1500))
        }
    }

    /// Applied when called (queued in call order, as the ledger does), answered after
    /// the delay.
    impl Journal for Jitter {
        fn hold(
            &self,
            key: &str,
            micros: u64,
            tokens: u64,
            version: u64,
        ) -> BoxFuture<'static, Result<(), String>> {
            let d = self.delay();
            let done = self.inner.hold(key, micros, tokens, version);
            Box::pin(async move {
                tokio::time::sleep(d).await;
                done.await
            })
        }
        fn record(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(), String>> {
            let d = self.delay();
            let done = self.inner.record(ops);
            Box::pin(async move {
                tokio::time::sleep(d).await;
                done.await
            })
        }
    }

    /// `n` concurrent reservations of 1,000 micros, key `k{i % keys}`, with random
    /// yields and sleeps around each step; returns the handles that got in.
    async fn race(
        b: &Budgets,
        seed: u64,
        n: u64,
        keys: u64,
        key_limits: Limits,
        team_limits: Limits,
    ) -> Vec<ReservationHandle> {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (b, key_limits, team_limits) =
                    (b.clone(), key_limits.clone(), team_limits.clone());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed * 100_000 + i);
                    let p = principal(&format!("k{}", i % keys), key_limits, team_limits);
                    match rng.random_range(0..3) {
                        0 => tokio::task::yield_now().await,
                        1 => {
                            let d = Duration::from_micros(rng.random_range(0..2000));
                            tokio::time::sleep(d).await;
                        }
                        _ => {}
                    }
                    let r = b.reserve(&p, 1000, 10, NOW).await;
                    tokio::task::yield_now().await;
                    r.ok()
                })
            })
            .collect();
        let mut admitted = Vec::new();
        for t in tasks {
            if let Some(h) = t.await.unwrap() {
                admitted.push(h);
            }
        }
        admitted
    }

    fn assert_window(b: &Budgets, scope: &Scope, spent: u64, reserved: u64) {
        let st = only(b, scope);
        assert_eq!(
            (
                st.spent_micros,
                st.reserved_micros,
                st.spent_tokens,
                st.reserved_tokens
            ),
            (spent, reserved, spent / 100, reserved / 100),
            "{scope:?}"
        );
    }

    /// THE race: 1,000 concurrent reservations against a budget of exactly 100 of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_race_admits_exactly_the_budget() {
        for seed in [1u64, 2, 3, 42, 4242] {
            let mem = Arc::new(MemoryJournal::new());
            let j = Jitter {
                inner: mem.clone(),
                calls: AtomicU64::new(0),
                seed,
            };
            let b = Budgets::load(Arc::new(j), Vec::new());
            let limits = money(100_000, Period::Monthly);
            let admitted = race(&b, seed, 1000, 1, limits.clone(), Limits::default()).await;
            assert_eq!(admitted.len(), 100, "seed {seed}");
            assert_window(&b, &key("k0"), 0, 100_000);
            // The durable hold covers everything admitted, and never passes the limit.
            let holds = mem.holds();
            assert_eq!(holds.len(), 1);
            assert_eq!(holds[0].1 .0, 100_000, "capped at the limit");
            assert!(holds[0].1 .1 >= 1000, "tokens have no quota: not capped");

            // Settle concurrently at half the worst case; submit the ops like the caller.
            let settles: Vec<_> = admitted
                .into_iter()
                .map(|h| {
                    let mem = mem.clone();
                    tokio::spawn(async move {
                        tokio::task::yield_now().await;
                        let s = h.settle(500, 5);
                        mem.apply(&s.ops).unwrap();
                    })
                })
                .collect();
            for s in settles {
                s.await.unwrap();
            }
            assert_window(&b, &key("k0"), 50_000, 0);
            assert!(mem
                .holds()
                .iter()
                .all(|(_, (m, _))| *m <= 2 * 1000 * HOLD_AHEAD));
            assert_eq!(
                mem.balances(),
                vec![(
                    "key:k0|monthly|2026-11".to_owned(),
                    BudgetBalance {
                        spent_micros: 50_000,
                        spent_tokens: 500
                    }
                )]
            );
            // Half the budget is left: exactly 50 more.
            let again = race(&b, seed + 1, 1000, 1, limits, Limits::default()).await;
            assert_eq!(again.len(), 50, "seed {seed}");
            assert_window(&b, &key("k0"), 50_000, 50_000);
        }
    }

    /// The race at two levels: ten keys of one team, each key allowing 15 requests, the
    /// team 100 (the tighter one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_race_at_two_levels_admits_exactly_the_team_budget() {
        for seed in [5u64, 6, 77] {
            let mem = Arc::new(MemoryJournal::new());
            let j = Jitter {
                inner: mem.clone(),
                calls: AtomicU64::new(0),
                seed,
            };
            let b = Budgets::load(Arc::new(j), Vec::new());
            let key_limits = money(15_000, Period::Daily);
            let team_limits = money(100_000, Period::Monthly);
            let admitted = race(&b, seed, 1000, 10, key_limits, team_limits).await;
            assert_eq!(admitted.len(), 100, "seed {seed}");
            assert_window(&b, &team(), 0, 100_000);
            let mut per_key = 0;
            for k in 0..10 {
                let st = only(&b, &key(&format!("k{k}")));
                assert!(st.reserved_micros <= 15_000, "seed {seed}: {st:?}");
                per_key += st.reserved_micros;
            }
            assert_eq!(per_key, 100_000, "seed {seed}: keys and team agree");

            for h in admitted {
                mem.apply(&h.settle(500, 5).ops).unwrap();
            }
            assert_window(&b, &team(), 50_000, 0);
            let spent: u64 = (0..10)
                .map(|k| only(&b, &key(&format!("k{k}"))).spent_micros)
                .sum();
            assert_eq!(spent, 50_000);
            // The ledger agrees with memory, window by window.
            for (k, bal) in mem.balances() {
                let scope = if k.starts_with("team:") {
                    team()
                } else {
                    key(k.split(['|', ':']).nth(1).unwrap())
                };
                let st = only(&b, &scope);
                assert_eq!(st.budget_key, k);
                assert_eq!(
                    (st.spent_micros, st.spent_tokens),
                    (bal.spent_micros, bal.spent_tokens)
                );
            }
            // A crash now would charge at most what the holds leave, within each limit.
            for (k, bal) in mem.after_crash() {
                let limit = if k.starts_with("team:") {
                    100_000
                } else {
                    15_000
                };
                assert!(bal.spent_micros <= limit, "{k}: {bal:?}");
            }
        }
    }
}
