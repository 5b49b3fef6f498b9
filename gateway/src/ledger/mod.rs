//! The ledger: budget balances, open reservations, usage counters and the audit log,
//! all durable through one writer with group commit.
//!
//! # On-disk layout
//!
//! One sled tree named `ledger` holds everything, under key prefixes, so that a whole
//! group-commit round is one `Tree::apply_batch` (atomic) followed by one `flush`:
//!
//! | key | value |
//! |---|---|
//! | `b/<budget_key>` | [`BudgetBalance`] JSON |
//! | `h/<budget_key>` | the window's durable hold: [`StoredHold`] JSON |
//! | `r/<group, u64 big-endian>` | JSON array of the [`Reservation`]s opened in one round and still open (an older store: one [`Reservation`] object under `r/<id>`) |
//! | `a/<seq, u64 big-endian>` | [`AuditRecord`] JSON (its canonical form, hash filled in) |
//! | `u/<day YYYY-MM-DD>/<JSON of the other UsageKey fields>` | [`UsageCounters`] JSON |
//! | `m/last_seq`, `m/retained_from`, `m/next_reservation` | u64 big-endian |
//! | `m/last_hash`, `m/retained_hash` | 64 lowercase hex characters |
//!
//! A `budget_key` is `<scope key>|<period>|<window start>`, e.g. `team:t_1|monthly|2026-11`.
//! The usage key's JSON has the fields `key_id, user_id, team_id, org_id, model, target`
//! in that order (`usage`).
//!
//! # Invariants
//!
//! - One writer thread owns all writes (`writer`). Callers submit a batch of [`Op`]s and
//!   get an answer only after the batch, together with every other batch collected in the
//!   same round, was applied atomically to the `ledger` tree and `flush`ed: durable when
//!   acknowledged. A batch is all-or-nothing: if one of its ops cannot be applied (a
//!   corrupt stored record, an invalid usage day) the whole batch is refused and the
//!   other batches of the round still commit. A failed store write fails every batch of
//!   the round and the writer's view rolls back to the last durable state.
//! - Audit records carry our own contiguous sequence numbers starting at 1 (never sled's
//!   `generate_id`), timestamps that never decrease along the sequence, and a SHA-256
//!   chain (`audit`): `hash = hex(sha256(prev_hash_hex || canonical_json))`, where
//!   `canonical_json` is `serde_json` of the [`AuditRecord`] with `hash` set to `""`
//!   (field order fixed by the struct), and the first record's `prev_hash` is 64 zeros.
//!   `m/last_seq` and `m/last_hash` are written in the same batch as the records, so a
//!   record removed from the end is detected too.
//! - Retention deletes the oldest records and, in the same batch, records the checkpoint
//!   `m/retained_from` (the first kept seq) and `m/retained_hash` (the hash of the last
//!   deleted record); [`verify`] starts from it. Retention only deletes records the chain
//!   vouches for, so it never erases the evidence of tampering.
//! - Reservations opened in the same round are stored together, as one group; a round
//!   that closes some of a group's reservations rewrites the group with the rest, or
//!   removes it when none is left, in the same batch as the settlement. So a round
//!   writes one `r/` key for everything it opens and one per group it closes in, not
//!   one insert and one delete per request; what is open on disk is exactly what was open
//!   after the last durable round, as before. The writer keeps the groups in memory (it
//!   is their only writer) and reads none of them from the tree during a round.
//! - A reservation is open from `OpenReservation` until `CloseReservation`; at
//!   [`Ledger::open`], reservations left open by a crash are charged in full, deleted, and
//!   noted with one `ReservationRecovered` audit record each, all in one durable batch.
//!   Closing an id that is not open (most often: recovery already charged it in full)
//!   changes no balance, so nothing is charged twice; it is logged at warn and succeeds.
//! - A budget window's hold (`Op::Hold`, set by the governance budgets ahead of what
//!   requests in flight have reserved; see `governance::budget`) is a single value,
//!   replaced by each `Hold` op of a higher version than the stored one (a zero hold
//!   stays stored, to keep its version). At [`Ledger::open`], every hold is removed;
//!   holds
//!   a crash left are charged in full to their windows' balances, removed and noted with
//!   one `HoldRecovered` audit record each, in the same batch as the reservations'.
//! - Reservation ids come from our own counter: `m/next_reservation` is a durable
//!   high-water mark reserved 1024 ids at a time, and a restart starts at the mark, so
//!   ids are unique across restarts (unused ids of the last block are skipped).
//! - No sled transactions: a single tree's `apply_batch` is atomic.
//!
//! # Lifecycle
//!
//! [`Ledger`] is a cheap clone. Dropping the last handle closes the writer's queue; the
//! drop waits until the writer has committed everything queued before it and let go of
//! the tree. (sled's own I/O threads may hold the database file lock a moment longer, so
//! reopening the store in the same process should retry on `StoreError::Locked`.)
//!
//! # Module map
//!
//! `handle` (the [`Ledger`] API, open and recovery, reservation ids), `writer` (the
//! writer thread and group commit), `audit` (hash chain, [`verify`], [`export`],
//! retention), `usage` (usage keys and counters), `keys` (tree layout), `tests`.

mod audit;
mod handle;
mod keys;
mod usage;
mod writer;

#[cfg(test)]
mod tests;

pub use audit::{export, verify, ExportFilter, VerifyReport, GENESIS_HASH};
pub use handle::{Ledger, LedgerOptions, Recovered};

/// The name of the ledger's sled tree, for readers that open the store directly (CLI).
pub const TREE_NAME: &str = keys::TREE;

/// Usage rows with `from_day <= day <= to_day` read straight from a tree (CLI).
pub fn read_usage(
    tree: &sled::Tree,
    from_day: &str,
    to_day: &str,
) -> Result<Vec<(UsageKey, UsageCounters)>, LedgerError> {
    usage::range(tree, from_day, to_day)
}

use serde::{Deserialize, Serialize};

/// Why a ledger call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger store I/O failed: {0}")]
    Store(#[from] sled::Error),
    #[error("the ledger writer has stopped")]
    WriterGone,
    #[error("corrupt ledger record under `{key}`: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid ledger operation: {0}")]
    InvalidOp(String),
    #[error("cannot encode a ledger record: {0}")]
    Encode(String),
    #[error("cannot write the export: {0}")]
    Export(String),
    #[error("cannot start the ledger writer thread: {0}")]
    Spawn(String),
}

/// One change to budget balances: an amount against one budget window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// `<scope key>|<period>|<window start>`, e.g. `team:t_1|monthly|2026-11`.
    pub budget_key: String,
    pub micros: u64,
    pub tokens: u64,
}

/// A budget window's durable hold as stored (`h/<budget_key>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredHold {
    pub micros: u64,
    pub tokens: u64,
    pub version: u64,
}

impl StoredHold {
    /// Applies an `Op::Hold`: takes its amounts only if its version is newer.
    pub fn apply(&mut self, micros: u64, tokens: u64, version: u64) {
        if version > self.version {
            *self = StoredHold {
                micros,
                tokens,
                version,
            };
        }
    }
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
    /// A budget window's hold found at start (a crash) and charged in full.
    HoldRecovered { hold: Charge },
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
    /// Sets the durable hold of window `budget_key` to `micros` / `tokens`, unless the
    /// stored hold has a higher `version` (holds can be submitted out of order). A hold
    /// adds nothing to balances unless a crash leaves it.
    Hold {
        budget_key: String,
        micros: u64,
        tokens: u64,
        version: u64,
    },
    Audit(AuditEvent),
    Usage {
        key: UsageKey,
        delta: UsageCounters,
    },
}
