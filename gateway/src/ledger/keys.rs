//! Key layout of the `ledger` tree (the table in the [`super`] docs) and the decoding
//! of stored values.
//!
//! Invariants: numeric key parts are u64 big-endian so that byte order is numeric
//! order (`a/` iterates in seq order, `r/` in id order); every decoding failure names the
//! key it came from.

use serde::de::DeserializeOwned;

use super::LedgerError;

/// The sled tree the ledger lives in.
pub(crate) const TREE: &str = "ledger";

pub(crate) const BALANCE: &[u8] = b"b/";
pub(crate) const RESERVATION: &[u8] = b"r/";
pub(crate) const HOLD: &[u8] = b"h/";
pub(crate) const AUDIT: &[u8] = b"a/";
pub(crate) const USAGE: &[u8] = b"u/";

pub(crate) const LAST_SEQ: &[u8] = b"m/last_seq";
pub(crate) const LAST_HASH: &[u8] = b"m/last_hash";
pub(crate) const NEXT_RESERVATION: &[u8] = b"m/next_reservation";
pub(crate) const RETAINED_FROM: &[u8] = b"m/retained_from";
pub(crate) const RETAINED_HASH: &[u8] = b"m/retained_hash";

fn prefixed(prefix: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + tail.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(tail);
    k
}

pub(crate) fn balance(budget_key: &str) -> Vec<u8> {
    prefixed(BALANCE, budget_key.as_bytes())
}

pub(crate) fn hold(budget_key: &str) -> Vec<u8> {
    prefixed(HOLD, budget_key.as_bytes())
}

pub(crate) fn reservation(id: u64) -> Vec<u8> {
    prefixed(RESERVATION, &id.to_be_bytes())
}

pub(crate) fn audit(seq: u64) -> Vec<u8> {
    prefixed(AUDIT, &seq.to_be_bytes())
}

/// The number in an `a/` or `r/` key, if the key has that shape.
pub(crate) fn number_in(prefix: &[u8], key: &[u8]) -> Option<u64> {
    let tail = key.strip_prefix(prefix)?;
    <[u8; 8]>::try_from(tail).ok().map(u64::from_be_bytes)
}

/// A key as people read it: `a/42`, `r/7`, `b/team:t_1|monthly|2026-11`.
pub(crate) fn display(key: &[u8]) -> String {
    for prefix in [AUDIT, RESERVATION] {
        if let Some(n) = number_in(prefix, key) {
            return format!("{}{n}", String::from_utf8_lossy(prefix));
        }
    }
    String::from_utf8_lossy(key).into_owned()
}

/// Parses a stored JSON value, naming `key` when it cannot.
pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, LedgerError> {
    serde_json::from_slice(bytes).map_err(|e| LedgerError::Corrupt {
        key: display(key),
        reason: e.to_string(),
    })
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, LedgerError> {
    serde_json::to_vec(value).map_err(|e| LedgerError::Encode(e.to_string()))
}

/// A u64 meta value (`m/...`), `None` when absent.
pub(crate) fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>, LedgerError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(|b| Some(u64::from_be_bytes(b)))
            .map_err(|_| LedgerError::Corrupt {
                key: display(key),
                reason: format!("expected 8 bytes, found {}", v.len()),
            }),
    }
}

/// A hash meta value (`m/last_hash`, `m/retained_hash`), `None` when absent.
pub(crate) fn read_hash(tree: &sled::Tree, key: &[u8]) -> Result<Option<String>, LedgerError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => match std::str::from_utf8(&v) {
            Ok(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(Some(s.to_owned()))
            }
            _ => Err(LedgerError::Corrupt {
                key: display(key),
                reason: "expected 64 hex characters".to_owned(),
            }),
        },
    }
}
