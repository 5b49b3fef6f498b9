//! Usage counters: the key encoding of a [`UsageKey`], adding counters, and day-range
//! reads.
//!
//! Invariants: a usage row's key is `u/<day>/<dims>` where `day` is `YYYY-MM-DD` (checked
//! on write, so the `/` after it is unambiguous) and `dims` is the JSON of the other
//! `UsageKey` fields in the fixed order `key_id, user_id, team_id, org_id, model,
//! target`. Equal keys therefore encode to equal bytes, and rows of a day are contiguous,
//! so a day range is one range scan. Counters only grow (saturating adds).

use serde::{Deserialize, Serialize};

use super::keys::{self, USAGE};
use super::{BudgetBalance, Charge, LedgerError, UsageCounters, UsageKey};

/// The `dims` part of a usage key, borrowed for encoding.
#[derive(Serialize)]
struct DimsRef<'a> {
    key_id: &'a str,
    user_id: Option<&'a str>,
    team_id: Option<&'a str>,
    org_id: &'a str,
    model: &'a str,
    target: Option<&'a str>,
}

/// The `dims` part of a usage key, owned for decoding.
#[derive(Deserialize)]
struct Dims {
    key_id: String,
    user_id: Option<String>,
    team_id: Option<String>,
    org_id: String,
    model: String,
    target: Option<String>,
}

impl UsageCounters {
    /// Adds `delta` field by field (saturating).
    pub fn add(&mut self, delta: &UsageCounters) {
        self.requests = self.requests.saturating_add(delta.requests);
        self.errors = self.errors.saturating_add(delta.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(delta.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(delta.completion_tokens);
        self.cost_micros = self.cost_micros.saturating_add(delta.cost_micros);
        self.latency_ms_sum = self.latency_ms_sum.saturating_add(delta.latency_ms_sum);
    }
}

impl BudgetBalance {
    /// Adds one charge (saturating).
    pub fn add(&mut self, charge: &Charge) {
        self.spent_micros = self.spent_micros.saturating_add(charge.micros);
        self.spent_tokens = self.spent_tokens.saturating_add(charge.tokens);
    }
}

/// Whether `day` has the shape `YYYY-MM-DD`.
pub fn is_day(day: &str) -> bool {
    let b = day.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// The tree key of a usage row; refuses a malformed day.
pub(crate) fn key(k: &UsageKey) -> Result<Vec<u8>, LedgerError> {
    if !is_day(&k.day) {
        return Err(LedgerError::InvalidOp(format!(
            "usage day `{}` is not YYYY-MM-DD",
            k.day
        )));
    }
    let dims = keys::encode(&DimsRef {
        key_id: &k.key_id,
        user_id: k.user_id.as_deref(),
        team_id: k.team_id.as_deref(),
        org_id: &k.org_id,
        model: &k.model,
        target: k.target.as_deref(),
    })?;
    let mut out = Vec::with_capacity(USAGE.len() + 11 + dims.len());
    out.extend_from_slice(USAGE);
    out.extend_from_slice(k.day.as_bytes());
    out.push(b'/');
    out.extend_from_slice(&dims);
    Ok(out)
}

/// The [`UsageKey`] a tree key encodes.
pub(crate) fn decode_key(key: &[u8]) -> Result<UsageKey, LedgerError> {
    let corrupt = |reason: &str| LedgerError::Corrupt {
        key: keys::display(key),
        reason: reason.to_owned(),
    };
    let rest = key
        .strip_prefix(USAGE)
        .ok_or_else(|| corrupt("not a usage key"))?;
    let (day, dims) = match (rest.get(..10), rest.get(10), rest.get(11..)) {
        (Some(day), Some(b'/'), Some(dims)) => (day, dims),
        _ => return Err(corrupt("expected u/<YYYY-MM-DD>/<dims>")),
    };
    let day = std::str::from_utf8(day)
        .ok()
        .filter(|d| is_day(d))
        .ok_or_else(|| corrupt("the day is not YYYY-MM-DD"))?;
    let d: Dims = keys::decode(key, dims)?;
    Ok(UsageKey {
        day: day.to_owned(),
        key_id: d.key_id,
        user_id: d.user_id,
        team_id: d.team_id,
        org_id: d.org_id,
        model: d.model,
        target: d.target,
    })
}

/// Every usage row with `from_day <= day <= to_day`, in key order.
pub(crate) fn range(
    tree: &sled::Tree,
    from_day: &str,
    to_day: &str,
) -> Result<Vec<(UsageKey, UsageCounters)>, LedgerError> {
    if from_day > to_day {
        return Ok(Vec::new());
    }
    let lo = [USAGE, from_day.as_bytes(), b"/"].concat();
    // `0` is the byte after `/`: every `u/<to_day>/...` key sorts below `u/<to_day>0`.
    let hi = [USAGE, to_day.as_bytes(), b"0"].concat();
    let mut rows = Vec::new();
    for item in tree.range(lo..hi) {
        let (k, v) = item?;
        rows.push((decode_key(&k)?, keys::decode(&k, &v)?));
    }
    Ok(rows)
}
