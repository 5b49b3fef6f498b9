//! The audit log's hash chain: sealing a record, verifying the chain, JSONL export, and
//! retention.
//!
//! Canonical form: a record's canonical JSON is `serde_json::to_vec` of the
//! [`AuditRecord`] with `hash` set to `""`. Field order is the struct's: `seq`, `ts`, the
//! event's fields (`kind` first, then the variant's fields in declaration order),
//! `prev_hash`, `hash`. `hash = hex(sha256(prev_hash.as_bytes() || canonical))`, lowercase,
//! and the first record's `prev_hash` is [`GENESIS_HASH`]. The stored value is the same
//! JSON with `hash` filled in; parsing it and serializing again gives the same bytes
//! (JSON values inside keep their key order: the workspace enables serde_json's
//! `preserve_order`), which is what lets [`verify`] recompute hashes from parsed records.
//!
//! Invariants: [`verify`] and [`export`] only read, so they work on a store opened by the
//! CLI while no writer runs. Retention ([`prune`]) runs on the writer thread, deletes only
//! a prefix of the log that [`verify`] would accept, and writes the checkpoint in the same
//! batch as the deletions.

use std::fmt;
use std::io::Write;

use sha2::{Digest, Sha256};

use super::keys::{self, AUDIT, LAST_HASH, LAST_SEQ, RETAINED_FROM, RETAINED_HASH};
use super::{AuditEvent, AuditRecord, LedgerError};

/// The `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `hex(sha256(prev_hash || canonical))`.
fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical);
    hex::encode(h.finalize())
}

/// The hash `record` should carry, computed from its other fields (its `hash` field is
/// left as it was).
fn expected_hash(record: &mut AuditRecord) -> Result<String, LedgerError> {
    let stored = std::mem::take(&mut record.hash);
    let canonical = keys::encode(record);
    record.hash = stored;
    Ok(chain_hash(&record.prev_hash, &canonical?))
}

/// Builds the record that follows `prev_hash` and returns it with its stored bytes.
pub(crate) fn seal(
    seq: u64,
    ts: i64,
    event: AuditEvent,
    prev_hash: String,
) -> Result<(AuditRecord, Vec<u8>), LedgerError> {
    let mut record = AuditRecord {
        seq,
        ts,
        event,
        prev_hash,
        hash: String::new(),
    };
    let mut bytes = keys::encode(&record)?;
    record.hash = chain_hash(&record.prev_hash, &bytes);
    // `hash` is the last field and a hex string needs no escaping, so the stored form is
    // the canonical one with the hash spliced into its closing `"hash":""}`: one
    // serialization per record instead of two (the writer's hottest step).
    if bytes.ends_with(EMPTY_HASH_TAIL) {
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(record.hash.as_bytes());
        bytes.extend_from_slice(b"\"}");
    } else {
        bytes = keys::encode(&record)?;
    }
    Ok((record, bytes))
}

/// How a canonical record (hash `""`) ends.
const EMPTY_HASH_TAIL: &[u8] = b"\"hash\":\"\"}";

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked and found good (all of them when `first_bad` is `None`).
    pub records: u64,
    /// The first bad seq and what is wrong with it: `altered`, `missing` or
    /// `out of order`, followed by the detail.
    pub first_bad: Option<(u64, String)>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.first_bad {
            None => write!(f, "audit chain intact: {} records verified", self.records),
            Some((seq, why)) => write!(
                f,
                "audit chain broken at seq {seq}: {why} ({} records verified before it)",
                self.records
            ),
        }
    }
}

/// Where the retained log starts: the first seq expected and the hash it must follow.
struct Checkpoint {
    from: u64,
    hash: String,
}

impl Checkpoint {
    fn read(tree: &sled::Tree) -> Result<Checkpoint, LedgerError> {
        Ok(Checkpoint {
            from: keys::read_u64(tree, RETAINED_FROM)?.unwrap_or(1),
            hash: keys::read_hash(tree, RETAINED_HASH)?.unwrap_or_else(|| GENESIS_HASH.into()),
        })
    }
}

/// Walks records in key order and checks each against the one before.
struct Walker {
    checkpoint_from: u64,
    /// The seq the next record must have.
    next: u64,
    /// The hash the next record's `prev_hash` must equal.
    prev_hash: String,
    good: u64,
}

impl Walker {
    fn new(cp: Checkpoint) -> Walker {
        Walker {
            checkpoint_from: cp.from,
            next: cp.from,
            prev_hash: cp.hash,
            good: 0,
        }
    }

    /// Checks the record stored under `key`; on success it becomes the chain's head.
    fn check(&mut self, key: &[u8], value: &[u8]) -> Result<AuditRecord, (u64, String)> {
        let Some(at) = keys::number_in(AUDIT, key) else {
            return Err((
                self.next,
                format!("altered: malformed audit key `{}`", keys::display(key)),
            ));
        };
        if at < self.next {
            return Err((
                at,
                format!(
                    "out of order: seq {at} is stored before the retention checkpoint (seq {})",
                    self.checkpoint_from
                ),
            ));
        }
        if at > self.next {
            return Err((
                self.next,
                format!(
                    "missing: expected seq {}, the next record is seq {at}",
                    self.next
                ),
            ));
        }
        let mut record: AuditRecord = serde_json::from_slice(value)
            .map_err(|e| (at, format!("altered: the record cannot be read ({e})")))?;
        if record.seq != at {
            return Err((
                at,
                format!(
                    "out of order: the record stored as seq {at} says it is seq {}",
                    record.seq
                ),
            ));
        }
        let expected = expected_hash(&mut record).map_err(|e| {
            (
                at,
                format!("altered: the record cannot be re-encoded ({e})"),
            )
        })?;
        if expected != record.hash {
            return Err((
                at,
                "altered: its content does not match its hash".to_owned(),
            ));
        }
        // Fields serde would ignore (an added field) or a reformatted value leave the hash
        // intact; we only ever store the canonical bytes, so anything else is an edit.
        if keys::encode(&record).ok().as_deref() != Some(value) {
            return Err((
                at,
                "altered: the stored bytes are not the record's canonical form (a field was added or reformatted)".to_owned(),
            ));
        }
        if record.prev_hash != self.prev_hash {
            let before = if at == self.checkpoint_from {
                "the retention checkpoint".to_owned()
            } else {
                format!("seq {}", at.saturating_sub(1))
            };
            return Err((
                at,
                format!("out of order: its prev_hash does not match the hash of {before}"),
            ));
        }
        self.prev_hash.clone_from(&record.hash);
        self.next = at + 1;
        self.good += 1;
        Ok(record)
    }
}

/// Walks the whole chain from the retention checkpoint and reports the first record that
/// was altered (content or hash changed, unreadable), removed (a seq gap, or the log
/// ending before `m/last_seq`) or reordered (seq under the wrong key, `prev_hash` not the
/// previous record's hash).
pub fn verify(tree: &sled::Tree) -> VerifyReport {
    let mut walker = match Checkpoint::read(tree) {
        Ok(cp) => Walker::new(cp),
        Err(e) => {
            return VerifyReport {
                records: 0,
                first_bad: Some((0, format!("altered: the retention checkpoint: {e}"))),
            }
        }
    };
    let bad = |walker: &Walker, seq: u64, why: String| VerifyReport {
        records: walker.good,
        first_bad: Some((seq, why)),
    };
    for item in tree.scan_prefix(AUDIT) {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                let next = walker.next;
                return bad(
                    &walker,
                    next,
                    format!("missing: the store cannot read it ({e})"),
                );
            }
        };
        if let Err((seq, why)) = walker.check(&k, &v) {
            return bad(&walker, seq, why);
        }
    }
    let last = walker.next.saturating_sub(1);
    let (recorded_last, recorded_hash) = match (
        keys::read_u64(tree, LAST_SEQ),
        keys::read_hash(tree, LAST_HASH),
    ) {
        (Ok(s), Ok(h)) => (s.unwrap_or(0), h),
        (Err(e), _) | (_, Err(e)) => {
            return bad(&walker, last, format!("altered: the log's head: {e}"))
        }
    };
    if last < recorded_last {
        return bad(
            &walker,
            last + 1,
            format!(
                "missing: the log ends at seq {last} but its last record is seq {recorded_last}"
            ),
        );
    }
    if last > recorded_last {
        return bad(
            &walker,
            recorded_last + 1,
            format!("out of order: records follow the log's last seq {recorded_last}"),
        );
    }
    let head_ok = match &recorded_hash {
        Some(h) => *h == walker.prev_hash,
        None => last == 0 && walker.prev_hash == GENESIS_HASH,
    };
    if !head_ok {
        return bad(
            &walker,
            last,
            "altered: its hash is not the one the log recorded as its head".to_owned(),
        );
    }
    VerifyReport {
        records: walker.good,
        first_bad: None,
    }
}

/// Which records [`export`] writes; every present filter must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFilter {
    /// `ts >= from_ts` (Unix milliseconds).
    pub from_ts: Option<i64>,
    /// `ts < to_ts` (Unix milliseconds).
    pub to_ts: Option<i64>,
    /// The request's key, an admin change's actor, a recovered reservation's key.
    pub key_id: Option<String>,
    /// The request's team (only request records have one).
    pub team_id: Option<String>,
    /// The request's model (only request records have one).
    pub model: Option<String>,
}

impl ExportFilter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        let (key_id, team_id, model) = match &r.event {
            AuditEvent::Request(q) => (Some(&q.key_id), q.team_id.as_ref(), Some(&q.model)),
            AuditEvent::Admin { actor_key_id, .. } => (Some(actor_key_id), None, None),
            AuditEvent::ReservationRecovered { reservation } => {
                (Some(&reservation.key_id), None, None)
            }
            AuditEvent::HoldRecovered { .. } => (None, None, None),
        };
        let want = |filter: &Option<String>, have: Option<&String>| match filter {
            None => true,
            Some(f) => have == Some(f),
        };
        self.from_ts.is_none_or(|from| r.ts >= from)
            && self.to_ts.is_none_or(|to| r.ts < to)
            && want(&self.key_id, key_id)
            && want(&self.team_id, team_id)
            && want(&self.model, model)
    }
}

/// Writes the records that match `filter` as JSON lines (each the stored record, byte for
/// byte: `seq`, `ts`, `kind`, the event's fields, `prev_hash`, `hash`), in seq order. Fails on a record
/// that cannot be read, naming its key; does not check the chain (that is [`verify`]).
pub fn export(
    tree: &sled::Tree,
    filter: &ExportFilter,
    out: &mut dyn Write,
) -> Result<u64, LedgerError> {
    let mut written = 0;
    for item in tree.scan_prefix(AUDIT) {
        let (k, v) = item?;
        let record: AuditRecord = keys::decode(&k, &v)?;
        if !filter.matches(&record) {
            continue;
        }
        out.write_all(&v)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| LedgerError::Export(e.to_string()))?;
        written += 1;
    }
    out.flush()
        .map_err(|e| LedgerError::Export(e.to_string()))?;
    Ok(written)
}

/// Deletes the records with `ts < cutoff_ms` from the start of the retained log, at most
/// `chunk` per batch, each batch also moving the checkpoint, and flushes. Stops at the
/// first record the chain does not vouch for (logged): retention never erases evidence.
/// Returns how many records were deleted.
pub(crate) fn prune(tree: &sled::Tree, cutoff_ms: i64, chunk: usize) -> Result<u64, LedgerError> {
    let mut walker = Walker::new(Checkpoint::read(tree)?);
    let mut deleted = 0;
    loop {
        let mut batch = sled::Batch::default();
        let mut in_batch: u64 = 0;
        let mut stop = false;
        for item in tree.range(keys::audit(walker.next)..keys::audit(u64::MAX)) {
            let (k, v) = item?;
            let before = walker.prev_hash.clone();
            match walker.check(&k, &v) {
                Ok(record) if record.ts < cutoff_ms => batch.remove(k),
                Ok(_) => {
                    // Kept: undo the step so the checkpoint stays at the last deleted record.
                    walker.next = walker.next.saturating_sub(1);
                    walker.prev_hash = before;
                    stop = true;
                    break;
                }
                Err((seq, why)) => {
                    tracing::error!(seq, problem = %why, "audit retention stopped: the chain is broken here; run `airlock audit verify`");
                    stop = true;
                    break;
                }
            }
            in_batch += 1;
            if in_batch >= chunk.max(1) as u64 {
                break;
            }
        }
        if in_batch == 0 {
            return Ok(deleted);
        }
        batch.insert(RETAINED_FROM, &walker.next.to_be_bytes());
        batch.insert(RETAINED_HASH, walker.prev_hash.as_bytes());
        tree.apply_batch(batch)?;
        tree.flush()?;
        deleted += in_batch;
        if stop {
            return Ok(deleted);
        }
    }
}
