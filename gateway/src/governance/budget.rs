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
//! - Durable before use: [`Budgets::reserve`] returns a handle only after the journal
//!   acknowledged the reservation. If the journal fails, or the `reserve` future is
//!   dropped while waiting for it, the in-memory hold is released and a zero-charge
//!   close of the reservation id is sent in the background (so the ledger's close must
//!   be a no-op for an id it does not hold open).
//! - Every handle ends exactly once: settled with the actual amounts, or, when dropped
//!   unsettled, settled with its worst case (conservative; logged). The ledger does
//!   the same to reservations left open by a crash, so a lost close costs the same.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;
use serde::Serialize;

use super::model::{Period, Principal, Scope};
use crate::ledger::{BudgetBalance, Charge, Op, Reservation};

/// Number of independently locked shards of budget windows.
const SHARDS: usize = 64;
const MS_PER_DAY: i64 = 86_400_000;
/// A shard is pruned at most this often.
const PRUNE_EVERY_MS: i64 = 3_600_000;
/// A window is kept this long after it ended (late requests with a slightly old `now`).
const PRUNE_GRACE_MS: i64 = 3_600_000;

/// Where reservations are made durable: the ledger in production, [`MemoryJournal`] in
/// tests and benchmarks.
pub trait Journal: Send + Sync + 'static {
    /// Holds `r.charges` until the reservation is closed. Durable when it resolves `Ok`.
    fn open_reservation(&self, r: Reservation) -> BoxFuture<'static, Result<(), String>>;
    /// Releases reservation `id` and adds `actual` to the balances. Must be a no-op for
    /// an id that is not open. Durable when it resolves `Ok`.
    fn close_reservation(
        &self,
        id: u64,
        actual: Vec<Charge>,
    ) -> BoxFuture<'static, Result<(), String>>;
    /// A reservation id never handed out before (also across restarts).
    fn next_reservation_id(&self) -> u64;
}

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
    /// `None` when no budget applied to the request (nothing was reserved).
    pub reservation_id: Option<u64>,
    /// What to submit to the ledger (with the audit record): the close of the
    /// reservation with the actual charges. Empty when nothing was reserved, or when
    /// [`ReservationHandle::settle_via_journal`] already made it durable.
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

#[derive(Debug, Clone, Default)]
struct Window {
    spent_micros: u64,
    spent_tokens: u64,
    reserved_micros: u64,
    reserved_tokens: u64,
    /// The limits last applied (for status).
    budget: Budget,
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
    };

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
    fn prune(&mut self, now_ms: i64) {
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
            match kept.iter().find(|(p, _)| *p == period) {
                Some((_, Some(oldest))) => label >= oldest.as_str(),
                _ => true,
            }
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
            reservation_id: None,
            ops: Vec::new(),
            charges: Vec::with_capacity(held.len()),
            warnings: Vec::new(),
            soft_exceeded: false,
        };
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
        s
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

    /// Sends a close of reservation `id` without waiting for it. Without a runtime the
    /// reservation stays open in the ledger, which charges it in full at the next start.
    fn close_in_background(&self, id: u64, actual: Vec<Charge>, why: &'static str) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let close = self.journal.close_reservation(id, actual);
                drop(rt.spawn(async move {
                    if let Err(e) = close.await {
                        tracing::error!(
                            reservation = id,
                            error = %e,
                            "closing a budget reservation ({why}) failed; the ledger charges it in full at next start"
                        );
                    }
                }));
            }
            Err(_) => tracing::error!(
                reservation = id,
                "no runtime to close a budget reservation ({why}); the ledger charges it in full at next start"
            ),
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

/// A reservation between the in-memory hold and the journal's acknowledgement: dropped
/// while armed (journal failure, or the `reserve` future dropped), it gives the hold
/// back and closes the reservation at zero in the background.
struct Pending {
    inner: Arc<Inner>,
    id: u64,
    held: Vec<Held>,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.inner.release(&self.held);
            self.inner
                .close_in_background(self.id, Vec::new(), "reservation abandoned");
        }
    }
}

/// A request's hold on its budgets. End it with [`ReservationHandle::settle`] (or
/// [`ReservationHandle::settle_via_journal`]); dropped unsettled it is charged its
/// worst case.
pub struct ReservationHandle {
    inner: Arc<Inner>,
    id: Option<u64>,
    held: Vec<Held>,
    soft_exceeded: bool,
    done: bool,
}

impl fmt::Debug for ReservationHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservationHandle")
            .field("id", &self.id)
            .field("held", &self.held)
            .field("soft_exceeded", &self.soft_exceeded)
            .finish_non_exhaustive()
    }
}

impl ReservationHandle {
    /// The ledger reservation id; `None` when no budget applies to the request.
    pub fn id(&self) -> Option<u64> {
        self.id
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
    /// submit durably together with the audit record. Until they are submitted the
    /// ledger keeps the reservation open (charged in full after a crash).
    pub fn settle(mut self, actual_micros: u64, actual_tokens: u64) -> Settlement {
        self.done = true;
        let mut s = self
            .inner
            .settle(&self.held, Some((actual_micros, actual_tokens)));
        s.reservation_id = self.id;
        if let Some(id) = self.id {
            s.ops.push(Op::CloseReservation {
                id,
                actual: s.charges.clone(),
            });
        }
        s
    }

    /// [`ReservationHandle::settle`], then makes it durable through the journal; the
    /// returned settlement has no ops left to submit. On a journal error the in-memory
    /// state is settled and the ledger keeps the reservation open (charged in full at
    /// next start).
    pub async fn settle_via_journal(
        self,
        actual_micros: u64,
        actual_tokens: u64,
    ) -> Result<Settlement, String> {
        let journal = self.inner.journal.clone();
        let mut s = self.settle(actual_micros, actual_tokens);
        if let Some(id) = s.reservation_id {
            s.ops.clear();
            journal.close_reservation(id, s.charges.clone()).await?;
        }
        Ok(s)
    }
}

impl Drop for ReservationHandle {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let s = self.inner.settle(&self.held, None);
        if let Some(id) = self.id {
            tracing::warn!(
                reservation = id,
                "budget reservation dropped unsettled; charging its worst case"
            );
            self.inner
                .close_in_background(id, s.charges, "dropped unsettled");
        }
    }
}

impl Budgets {
    /// The budgets as the ledger left them: `balances` are the spent amounts per window
    /// (reservations open at the last stop already charged in full by the ledger).
    pub fn load(journal: Arc<dyn Journal>, balances: Vec<(String, BudgetBalance)>) -> Self {
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
        request_id: &str,
        worst_micros: u64,
        worst_tokens: u64,
        now_ms: i64,
    ) -> Result<ReservationHandle, BudgetError> {
        let (held, soft_exceeded) = self.hold(principal, worst_micros, worst_tokens, now_ms)?;
        if held.is_empty() {
            return Ok(ReservationHandle {
                inner: self.inner.clone(),
                id: None,
                held,
                soft_exceeded,
                done: false,
            });
        }
        let id = self.inner.journal.next_reservation_id();
        let reservation = Reservation {
            id,
            request_id: request_id.to_owned(),
            key_id: principal.key_id.clone(),
            charges: held
                .iter()
                .map(|h| Charge {
                    budget_key: h.key.clone(),
                    micros: h.micros,
                    tokens: h.tokens,
                })
                .collect(),
            opened_at: now_ms,
        };
        let mut pending = Pending {
            inner: self.inner.clone(),
            id,
            held,
            armed: true,
        };
        self.inner
            .journal
            .open_reservation(reservation)
            .await
            .map_err(BudgetError::Journal)?;
        pending.armed = false;
        Ok(ReservationHandle {
            inner: self.inner.clone(),
            id: Some(id),
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
    ) -> Result<(Vec<Held>, bool), BudgetExceeded> {
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
            return Ok((held, false));
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
        }
        for (_, shard) in &mut locked.0 {
            if now_ms >= shard.pruned_at_ms.saturating_add(PRUNE_EVERY_MS) {
                shard.prune(now_ms);
            }
        }
        Ok((held, soft_exceeded))
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
            self.inner.lock(i).prune(now_ms);
        }
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
    next_id: AtomicU64,
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

    /// Applies a batch at once, as the ledger would (reservations and charges; other
    /// ops are accepted and ignored).
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
}

impl Journal for MemoryJournal {
    fn open_reservation(&self, r: Reservation) -> BoxFuture<'static, Result<(), String>> {
        let shared = self.shared.clone();
        Box::pin(async move { shared.apply(&[Op::OpenReservation(r)]) })
    }

    fn close_reservation(
        &self,
        id: u64,
        actual: Vec<Charge>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let shared = self.shared.clone();
        Box::pin(async move { shared.apply(&[Op::CloseReservation { id, actual }]) })
    }

    fn next_reservation_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[cfg(test)]
mod tests {
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
            b.reserve(&p, "r1", 1000, 0, NOW)
                .await
                .unwrap()
                .settle(1000, 0);
            let e = b.reserve(&p, "r2", 1, 0, NOW).await.unwrap_err();
            assert!(
                matches!(e, BudgetError::Exceeded(ref x) if x.kind == "budget"),
                "{e}"
            );
            let h = b.reserve(&p, "r3", 1000, 0, next).await.unwrap();
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
        let h = b.reserve(&p, "req-1", 3000, 500, NOW).await.unwrap();
        assert_eq!(h.id(), Some(1));
        assert!(!h.soft_exceeded());
        let open = j.open_reservations();
        assert_eq!(open.len(), 1);
        assert_eq!(
            (
                open[0].request_id.as_str(),
                open[0].key_id.as_str(),
                open[0].opened_at
            ),
            ("req-1", "k", NOW)
        );
        assert_eq!(open[0].charges, h.charges());
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
        assert_eq!(s.reservation_id, Some(1));
        assert_eq!(s.charges, actual);
        assert_eq!(s.ops, vec![Op::CloseReservation { id: 1, actual }]);
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
        assert!(j.open_reservations().is_empty());
        assert_eq!(j.balances().len(), 2);

        // Through the journal directly: nothing left to submit.
        let h = b.reserve(&p, "req-2", 10, 1, NOW).await.unwrap();
        let s = h.settle_via_journal(10, 1).await.unwrap();
        assert!(s.ops.is_empty());
        assert!(j.open_reservations().is_empty());
        assert_eq!(j.balances()[0].1.spent_micros, 1210);
    }

    #[tokio::test]
    async fn a_principal_without_budgets_reserves_nothing() {
        let (b, j) = budgets();
        let p = principal("k", Limits::default(), Limits::default());
        let h = b.reserve(&p, "r", 1000, 10, NOW).await.unwrap();
        assert_eq!((h.id(), h.remaining_tokens(0, 0, 1)), (None, None));
        let s = h.settle(5, 5);
        assert_eq!((s.reservation_id, s.ops.len()), (None, 0));
        assert!(j.open_reservations().is_empty() && b.windows() == 0);
    }

    #[tokio::test]
    async fn a_refusal_by_the_team_leaves_the_key_untouched() {
        let (b, j) = budgets();
        let key_limits = Limits {
            token_quota: Some(1_000_000),
            ..money(1_000_000, Period::Daily)
        };
        let p = principal("k", key_limits, money(2500, Period::Monthly));
        let h = b.reserve(&p, "r1", 2000, 100, NOW).await.unwrap();
        let before = b.status(&key("k"), None);
        let e = b.reserve(&p, "r2", 1000, 100, NOW).await.unwrap_err();
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
        assert_eq!(j.open_reservations().len(), 1);
        // The most specific refusal is reported; token quotas are checked too.
        let p = principal(
            "k",
            Limits {
                token_quota: Some(150),
                ..Limits::default()
            },
            money(1, Period::Daily),
        );
        let BudgetError::Exceeded(e) = b.reserve(&p, "r3", 1000, 200, NOW).await.unwrap_err()
        else {
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
        let h = b.reserve(&p, "r", 1000, 0, NOW).await.unwrap();
        assert_eq!(h.charges().len(), 1);
        assert_eq!(only(&b, &key("k")).reserved_micros, 1000);
        assert!(b.reserve(&p, "r", 1000, 0, NOW).await.is_err());
        h.settle(1000, 0);
    }

    #[tokio::test]
    async fn journal_failure_rolls_back_the_hold() {
        let (b, j) = budgets();
        let p = principal("k", money(1000, Period::Daily), money(1000, Period::Daily));
        j.set_failing(true);
        let e = b.reserve(&p, "r", 1000, 10, NOW).await.unwrap_err();
        assert!(matches!(e, BudgetError::Journal(_)), "{e}");
        for scope in [key("k"), team()] {
            let st = only(&b, &scope);
            assert_eq!((st.reserved_micros, st.reserved_tokens), (0, 0));
        }
        j.set_failing(false);
        let h = b.reserve(&p, "r", 1000, 10, NOW).await.unwrap();
        assert_eq!(only(&b, &team()).reserved_micros, 1000);
        h.settle(1, 1);
    }

    /// A journal whose opens never resolve; it records the closes it is sent.
    #[derive(Default)]
    struct Stuck {
        closes: Mutex<Vec<(u64, Vec<Charge>)>>,
    }

    impl Journal for Stuck {
        fn open_reservation(&self, _: Reservation) -> BoxFuture<'static, Result<(), String>> {
            Box::pin(futures::future::pending())
        }
        fn close_reservation(
            &self,
            id: u64,
            actual: Vec<Charge>,
        ) -> BoxFuture<'static, Result<(), String>> {
            self.closes.lock().unwrap().push((id, actual));
            Box::pin(futures::future::ready(Ok(())))
        }
        fn next_reservation_id(&self) -> u64 {
            77
        }
    }

    #[tokio::test]
    async fn a_reserve_dropped_while_waiting_for_the_journal_gives_the_hold_back() {
        let j = Arc::new(Stuck::default());
        let b = Budgets::load(j.clone(), Vec::new());
        let p = principal("k", money(1000, Period::Daily), Limits::default());
        let mut f = Box::pin(b.reserve(&p, "r", 1000, 0, NOW));
        assert!(futures::poll!(&mut f).is_pending());
        assert_eq!(only(&b, &key("k")).reserved_micros, 1000);
        drop(f);
        assert_eq!(only(&b, &key("k")).reserved_micros, 0);
        // The zero close is built at once and sent from a background task.
        assert_eq!(*j.closes.lock().unwrap(), vec![(77, Vec::new())]);
    }

    /// Waits (polling, bounded) until `cond` holds.
    async fn until(mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_handle_settles_the_worst_case() {
        let (b, j) = budgets();
        let p = principal(
            "k",
            money(10_000, Period::Daily),
            money(10_000, Period::Daily),
        );
        let h = b.reserve(&p, "r", 4000, 40, NOW).await.unwrap();
        drop(h);
        for scope in [key("k"), team()] {
            let st = only(&b, &scope);
            assert_eq!(
                (st.spent_micros, st.reserved_micros, st.spent_tokens),
                (4000, 0, 40)
            );
        }
        until(|| j.open_reservations().is_empty()).await;
        let balances = j.balances();
        assert_eq!(balances.len(), 2);
        assert!(balances
            .iter()
            .all(|(_, b)| (b.spent_micros, b.spent_tokens) == (4000, 40)));
    }

    #[test]
    fn a_handle_dropped_without_a_runtime_stays_open_in_the_ledger() {
        let (b, j) = budgets();
        let p = principal("k", money(10_000, Period::Daily), Limits::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let h = rt.block_on(b.reserve(&p, "r", 4000, 40, NOW)).unwrap();
        drop(rt);
        drop(h);
        assert_eq!(only(&b, &key("k")).spent_micros, 4000);
        // The ledger charges it in full at the next start: the same worst case.
        assert_eq!(j.open_reservations().len(), 1);
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
            let h = b.reserve(&p, "r", 1000, 0, NOW).await.unwrap();
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
        let h = b.reserve(&p, "r", 1_000_000, 0, NOW).await.unwrap();
        assert!(h.soft_exceeded());
        assert_eq!(h.settle(5, 0).warnings.len(), 1);
        assert_eq!(only(&b, &key("s")).soft_budget_micros, Some(1));
    }

    #[tokio::test]
    async fn spending_beyond_the_worst_case_is_recorded_and_stops_new_requests() {
        let (b, _) = budgets();
        let p = principal("k", money(1000, Period::Daily), Limits::default());
        let h = b.reserve(&p, "r", 600, 0, NOW).await.unwrap();
        h.settle(1300, 0);
        assert_eq!(only(&b, &key("k")).spent_micros, 1300);
        let e = b.reserve(&p, "r", 1, 0, NOW).await.unwrap_err();
        assert!(
            matches!(e, BudgetError::Exceeded(ref x) if x.spent == 1300),
            "{e}"
        );
        // A zero worst case is admitted only while not over the limit.
        assert!(b.reserve(&p, "r", 0, 0, NOW).await.is_err());
    }

    #[tokio::test]
    async fn remaining_tokens_is_the_tightest_headroom() {
        let (b, _) = budgets();
        let key_limits = Limits {
            token_quota: Some(1000),
            ..Limits::default()
        };
        let p = principal("k", key_limits, money(10_000, Period::Daily));
        let other = b.reserve(&p, "other", 2000, 300, NOW).await.unwrap();
        let h = b.reserve(&p, "me", 1000, 100, NOW).await.unwrap();
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
        let e = b.reserve(&p, "r", 101, 0, NOW).await.unwrap_err();
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
        let h = b.reserve(&p, "r", 100, 0, NOW).await.unwrap();
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
        let f = b.reserve(&p, "r", 0, 0, NOW);
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

    impl Journal for Jitter {
        fn open_reservation(&self, r: Reservation) -> BoxFuture<'static, Result<(), String>> {
            let (d, j) = (self.delay(), self.inner.clone());
            Box::pin(async move {
                tokio::time::sleep(d).await;
                j.apply(&[Op::OpenReservation(r)])
            })
        }
        fn close_reservation(
            &self,
            id: u64,
            actual: Vec<Charge>,
        ) -> BoxFuture<'static, Result<(), String>> {
            let (d, j) = (self.delay(), self.inner.clone());
            Box::pin(async move {
                tokio::time::sleep(d).await;
                j.apply(&[Op::CloseReservation { id, actual }])
            })
        }
        fn next_reservation_id(&self) -> u64 {
            self.inner.next_reservation_id()
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
                    let r = b.reserve(&p, &format!("req-{i}"), 1000, 10, NOW).await;
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
            assert_eq!(mem.open_reservations().len(), 100);

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
            assert!(mem.open_reservations().is_empty());
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
            assert!(mem.open_reservations().is_empty());
        }
    }
}
