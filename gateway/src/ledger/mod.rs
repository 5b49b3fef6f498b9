//! The ledger: budget balances, open reservations, usage counters and the audit log,
//! all durable through one writer with group commit.
//!
//! See `SPEC.md` beside this file for the on-disk layout.
//!
//! Invariants:
//! - One writer task owns all writes. Callers submit a batch of [`Op`]s and get an answer
//!   only after the batch (together with every other batch collected in the same round)
//!   was applied atomically to the `ledger` tree and `flush`ed: durable when acknowledged.
//! - Audit records carry our own contiguous sequence numbers (never sled's `generate_id`)
//!   and a SHA-256 chain: `hash = sha256(prev_hash || canonical record without hash)`.
//! - A reservation is open from `OpenReservation` until `CloseReservation`; at `open`,
//!   reservations left open by a crash are charged in full and noted in the audit log.
//! - No sled transactions: a single tree's `apply_batch` is atomic.

use serde::{Deserialize, Serialize};

/// One change to budget balances: an amount against one budget window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// `<scope key>|<period>|<window start>`, e.g. `team:t_1|monthly|2026-11`.
    pub budget_key: String,
    pub micros: u64,
    pub tokens: u64,
}

/// Spent so far in one budget window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetBalance {
    pub spent_micros: u64,
    pub spent_tokens: u64,
}

/// A worst-case amount held against budgets while a request runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: u64,
    pub request_id: String,
    pub key_id: String,
    pub charges: Vec<Charge>,
    pub opened_at: i64,
}

/// What an audit record says. The writer adds `seq`, `ts`, `prev_hash`, `hash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditEvent {
    /// One API request.
    Request(RequestAudit),
    /// One administrative change: who, what, before and after.
    Admin {
        actor_key_id: String,
        action: String,
        target: String,
        #[serde(default)]
        before: Option<serde_json::Value>,
        #[serde(default)]
        after: Option<serde_json::Value>,
    },
    /// A reservation found open at start (a crash) and charged in full.
    ReservationRecovered { reservation: Reservation },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestAudit {
    pub request_id: String,
    pub key_id: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    pub org_id: String,
    pub route: String,
    pub model: String,
    #[serde(default)]
    pub target: Option<String>,
    pub attempts: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: u64,
    pub latency_ms: u64,
    pub status: u16,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub routing: Option<String>,
    /// Policy decisions taken (e.g. `allow:openai/*`, `budget:team:t_1 reserved 1200`).
    #[serde(default)]
    pub policy: Vec<String>,
    /// Only when the team opted in.
    #[serde(default)]
    pub content: Option<serde_json::Value>,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// Unix milliseconds.
    pub ts: i64,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// Usage counters for one day and one combination of dimensions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounters {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: u64,
    pub latency_ms_sum: u64,
}

/// The dimensions usage is counted by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UsageKey {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub key_id: String,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub org_id: String,
    pub model: String,
    pub target: Option<String>,
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Holds `charges` (adds nothing to balances yet).
    OpenReservation(Reservation),
    /// Releases reservation `id` and adds `actual` to balances.
    CloseReservation {
        id: u64,
        actual: Vec<Charge>,
    },
    /// Adds to balances without a reservation.
    Charge(Vec<Charge>),
    Audit(AuditEvent),
    Usage {
        key: UsageKey,
        delta: UsageCounters,
    },
}
