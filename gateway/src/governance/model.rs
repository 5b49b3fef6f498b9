//! Governance entities as stored: organizations, teams, users, API keys, their roles
//! and limits. Field names follow LiteLLM's (`models`, `max_budget`, `budget_duration`,
//! `rpm_limit`, `tpm_limit`, `max_parallel_requests`, `soft_budget`) so migrating is easy.
//!
//! Invariants:
//! - `models: None` means "this level does not restrict"; `Some(vec![])` allows nothing.
//!   The effective allow-list of a request is the intersection over key, user, team, org.
//! - Money is integer micro-USD (`1 USD = 1_000_000`), never floats, so sums are exact.
//! - A key stores only the SHA-256 of its secret (hex); the full key is shown once.
//! - Times are Unix milliseconds.

use serde::{Deserialize, Serialize};

/// Micro-USD per USD.
pub const MICROS_PER_USD: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read-only: audit, usage, config.
    Auditor,
    /// Manages its own team's users, keys and budgets.
    TeamAdmin,
    /// Calls models.
    Member,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    /// Never resets.
    #[default]
    Total,
}

/// Limits that can be set on a key, user, team or org. Every field is optional; an
/// absent field sets no limit at that level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_requests: Option<u32>,
    /// Money budget per `budget_duration`, in micro-USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_micros: Option<u64>,
    /// Token quota (prompt + completion) per `budget_duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_quota: Option<u64>,
    #[serde(default)]
    pub budget_duration: Period,
    /// Soft threshold in micro-USD: above it responses carry a warning header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_budget_micros: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Team {
    pub id: String,
    pub org_id: String,
    pub name: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    /// Opt-in: audit records of this team's requests may include prompt and completion text.
    #[serde(default)]
    pub log_content: bool,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub org_id: String,
    #[serde(default)]
    pub team_id: Option<String>,
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public id, also the key's visible prefix (`ak_...`).
    pub id: String,
    /// SHA-256 of the secret part, hex.
    pub secret_hash: String,
    pub name: String,
    pub org_id: String,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    /// The key's role; never above its user's role.
    pub role: Role,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    #[serde(default)]
    pub last_used_at: Option<i64>,
}

/// A level that limits and budgets apply to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(tag = "scope", content = "id", rename_all = "snake_case")]
pub enum Scope {
    Key(String),
    User(String),
    Team(String),
    Org(String),
}

impl Scope {
    /// Stable text form used in ledger keys: `key:ak_x`, `team:t_y`...
    pub fn as_key(&self) -> String {
        match self {
            Scope::Key(id) => format!("key:{id}"),
            Scope::User(id) => format!("user:{id}"),
            Scope::Team(id) => format!("team:{id}"),
            Scope::Org(id) => format!("org:{id}"),
        }
    }
}

/// Who is calling, resolved from a key at authentication.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub key_id: String,
    pub org_id: String,
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    pub role: Role,
    /// Allow-lists from key, user, team and org (each `None` = unrestricted); a model is
    /// allowed when every present list matches it.
    pub allow: Vec<Vec<String>>,
    /// The limits of each level, most specific first.
    pub limits: Vec<(Scope, Limits)>,
    /// Whether audit records may include request and response text (team opt-in).
    pub log_content: bool,
}
