//! The single writer: a dedicated thread that owns every write to the `ledger` tree and
//! commits batches in rounds (group commit).
//!
//! A round: take the first queued message, drain whatever else is queued up to
//! `max_batch` ops (a batch bigger than that still goes alone, whole), apply every batch
//! in memory in queue order, build one `sled::Batch`, `apply_batch`, `flush`, then answer
//! every waiter of the round.
//!
//! Linger: when submissions come fast enough that at least one more is expected within
//! `linger` (the previous round's batches, over the time since that round started,
//! predict it), the writer sleeps `linger` after taking a round's first message and
//! before draining the queue, so the round takes in what the request tasks submit
//! meanwhile. At a low rate (two requests that happened to meet in one round, at
//! 1,000 req/s) it does not wait: a lone submitter's latency is its round alone. It sleeps rather than waiting on the queue so that those submissions
//! do not wake it one by one (on one core each wake-up is a context switch away from
//! the tasks that would submit more). Fewer, larger rounds mean fewer flushes and
//! wake-ups per request; the cost is up to `linger` more latency per round under load,
//! none for a lone submitter. Durability is unchanged: nothing is answered before its
//! round is flushed.
//!
//! Invariants:
//! - In-round reads see earlier ops of the same round: balances and usage rows are
//!   loaded once into an overlay and modified there; several usage deltas for one key
//!   become one write. Open reservations are not read from the tree at all: the writer
//!   holds the stored groups in memory ([`OpenReservations`], loaded at start) and
//!   takes in a round's changes to them only once the round is durable.
//! - A batch is all-or-nothing: everything it reads is loaded (and checked) before any of
//!   its ops is applied, so a corrupt record or an invalid op refuses that batch alone.
//! - `head` (last seq, hash, ts) only advances after the round is durable. When the
//!   store write fails, every waiter of the round gets the error and the writer keeps the
//!   old head; if `apply_batch` went through but `flush` failed, an undo batch restores
//!   every key the round touched to its value before the round. (A crash at that moment
//!   may still leave the round on disk: the waiters were told it failed, as with any
//!   database whose commit answer is lost.)
//! - Audit timestamps never decrease along the sequence (`ts = max(now, last ts)`).
//! - The thread ends once every sender is gone and the queue is empty; retention runs
//!   between rounds, at most once per `min(retention, 1 h)` (at least 1 s apart).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sled::IVec;

use super::keys::{self, LAST_HASH, LAST_SEQ, NEXT_RESERVATION};
use super::{
    audit, usage, BudgetBalance, Charge, LedgerError, Op, Reservation, StoredHold, UsageCounters,
};

/// Where an answer goes: an async waiter or a blocked thread.
pub(crate) enum Reply<T> {
    Async(tokio::sync::oneshot::Sender<Result<T, LedgerError>>),
    Blocking(SyncSender<Result<T, LedgerError>>),
}

impl<T> Reply<T> {
    fn send(self, answer: Result<T, LedgerError>) {
        // A waiter that went away (a dropped future) does not undo the write.
        match self {
            Reply::Async(tx) => drop(tx.send(answer)),
            Reply::Blocking(tx) => drop(tx.send(answer)),
        }
    }
}

pub(crate) enum Msg {
    Submit {
        ops: Vec<Op>,
        reply: Reply<Vec<u64>>,
    },
    /// Delete audit records with `ts < cutoff_ms` (retention).
    Prune { cutoff_ms: i64, reply: Reply<u64> },
    /// Make reservation ids below `end` durable (`m/next_reservation = end`).
    ExtendIds {
        end: u64,
        reply: Option<SyncSender<Result<(), LedgerError>>>,
    },
}

/// Counters shared between the writer and the handles.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Durable rounds committed.
    pub(crate) rounds: AtomicU64,
    /// Reservation ids below this are durably reserved.
    pub(crate) ids_end: AtomicU64,
    #[cfg(test)]
    pub(crate) fail_next_flush: std::sync::atomic::AtomicBool,
}

/// The durable head of the audit log.
#[derive(Debug, Clone)]
struct Head {
    last_seq: u64,
    last_hash: String,
    last_ts: i64,
}

impl Head {
    fn load(tree: &sled::Tree) -> Result<Head, LedgerError> {
        let last_seq = keys::read_u64(tree, LAST_SEQ)?.unwrap_or(0);
        let last_hash =
            keys::read_hash(tree, LAST_HASH)?.unwrap_or_else(|| audit::GENESIS_HASH.into());
        let key = keys::audit(last_seq);
        // Only keeps timestamps monotonic: an unreadable last record (verify's business)
        // must not stop the gateway from starting.
        let last_ts = match tree.get(&key)? {
            Some(v) => match keys::decode::<super::AuditRecord>(&key, &v) {
                Ok(r) => r.ts,
                Err(e) => {
                    tracing::error!(error = %e, "the last audit record is unreadable; run `airlock audit verify`");
                    0
                }
            },
            None => 0,
        };
        Ok(Head {
            last_seq,
            last_hash,
            last_ts,
        })
    }
}

pub(crate) struct Writer {
    tree: sled::Tree,
    head: Head,
    max_batch: usize,
    retention: Option<Duration>,
    linger: Duration,
    /// Batches in the last round committed, and when that round started.
    last_round: usize,
    last_start: Option<Instant>,
    /// The open reservations as stored (the writer is the only one to write `r/`).
    open: OpenReservations,
    shared: Arc<Shared>,
}

/// Open reservations, as the `r/` keys hold them: each key one group of reservations
/// opened in the same round, as a JSON array of those still open; the key's number is a
/// group number of its own (an older store has one reservation, an object, per key).
#[derive(Debug, Default)]
pub(crate) struct OpenReservations {
    /// Reservation id -> its group.
    at: HashMap<u64, u64>,
    groups: HashMap<u64, Group>,
    next_group: u64,
}

#[derive(Debug)]
struct Group {
    /// The value stored under `r/<group>` (for the undo batch).
    stored: IVec,
    open: Vec<Reservation>,
}

/// A stored `r/` value: a group (an array), or one reservation (an older store).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Stored {
    Group(Vec<Reservation>),
    One(Reservation),
}

impl Stored {
    fn into_vec(self) -> Vec<Reservation> {
        match self {
            Stored::Group(v) => v,
            Stored::One(r) => vec![r],
        }
    }
}

/// Every open reservation stored in `tree`, by key order.
pub(crate) fn read_reservations(tree: &sled::Tree) -> Result<Vec<Reservation>, LedgerError> {
    let mut out = Vec::new();
    for item in tree.scan_prefix(keys::RESERVATION) {
        let (k, v) = item?;
        out.extend(keys::decode::<Stored>(&k, &v)?.into_vec());
    }
    Ok(out)
}

impl OpenReservations {
    fn load(tree: &sled::Tree) -> Result<OpenReservations, LedgerError> {
        let mut open = OpenReservations {
            next_group: 1,
            ..OpenReservations::default()
        };
        for item in tree.scan_prefix(keys::RESERVATION) {
            let (k, v) = item?;
            let n = keys::number_in(keys::RESERVATION, &k).ok_or_else(|| LedgerError::Corrupt {
                key: keys::display(&k),
                reason: "not a reservation group key".into(),
            })?;
            let rs = keys::decode::<Stored>(&k, &v)?.into_vec();
            for r in &rs {
                open.at.insert(r.id, n);
            }
            open.groups.insert(
                n,
                Group {
                    stored: v,
                    open: rs,
                },
            );
            open.next_group = open.next_group.max(n.saturating_add(1));
        }
        Ok(open)
    }

    /// Whether `id` is open and not already closed by `closed` (this round's closes).
    fn group_of(&self, id: u64, closed: &HashMap<u64, Vec<u64>>) -> Option<u64> {
        let g = *self.at.get(&id)?;
        match closed.get(&g) {
            Some(ids) if ids.contains(&id) => None,
            _ => Some(g),
        }
    }

    /// Takes in a committed round's changes.
    fn apply(&mut self, change: GroupChanges) {
        for (g, after) in change.groups {
            if let Some(old) = self.groups.remove(&g) {
                for r in &old.open {
                    self.at.remove(&r.id);
                }
            }
            if let Some(group) = after {
                for r in &group.open {
                    self.at.insert(r.id, g);
                }
                self.groups.insert(g, group);
            }
        }
        self.next_group = change.next_group;
    }
}

/// What a round does to the reservation groups: each touched group's new content
/// (`None`: removed).
struct GroupChanges {
    groups: Vec<(u64, Option<Group>)>,
    next_group: u64,
}

impl Writer {
    pub(crate) fn new(
        tree: sled::Tree,
        max_batch: usize,
        retention: Option<Duration>,
        linger: Duration,
        shared: Arc<Shared>,
    ) -> Result<Writer, LedgerError> {
        Ok(Writer {
            head: Head::load(&tree)?,
            open: OpenReservations::load(&tree)?,
            tree,
            max_batch: max_batch.max(1),
            retention,
            linger,
            last_round: 0,
            last_start: None,
            shared,
        })
    }

    pub(crate) fn last_seq(&self) -> u64 {
        self.head.last_seq
    }

    /// The writer thread's loop; returns when every sender is gone and the queue is empty.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        let interval = self
            .retention
            .map(|r| r.clamp(Duration::from_secs(1), Duration::from_secs(3600)));
        let mut next_prune = interval.map(|i| Instant::now() + i);
        let mut pending: Option<Msg> = None;
        loop {
            if let (Some(at), Some(i)) = (next_prune, interval) {
                if Instant::now() >= at {
                    self.retain();
                    next_prune = Some(Instant::now() + i);
                }
            }
            let first = match pending.take() {
                Some(m) => m,
                None => {
                    let got = match next_prune {
                        Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match got {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            match first {
                Msg::Prune { cutoff_ms, reply } => reply.send(self.prune(cutoff_ms)),
                Msg::ExtendIds { end, reply } => {
                    let result = self.extend_ids(end);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "cannot reserve reservation ids durably");
                    }
                    if let Some(tx) = reply {
                        drop(tx.send(result));
                    }
                }
                Msg::Submit { ops, reply } => {
                    let start = Instant::now();
                    if self.should_linger(start) {
                        std::thread::sleep(self.linger);
                    }
                    let mut n = ops.len();
                    let mut batches = vec![(ops, reply)];
                    while n < self.max_batch {
                        match rx.try_recv() {
                            Ok(Msg::Submit { ops, reply }) if n + ops.len() <= self.max_batch => {
                                n += ops.len();
                                batches.push((ops, reply));
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                        }
                    }
                    self.last_round = batches.len();
                    self.last_start = Some(start);
                    let (ops, replies): (Vec<_>, Vec<_>) = batches.into_iter().unzip();
                    match self.commit(ops) {
                        Ok(outcomes) => {
                            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                                reply.send(outcome);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, batches = replies.len(), "ledger round failed; its batches were refused");
                            for reply in replies {
                                reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Whether a round starting at `now` lingers (see [`lingers`]).
    fn should_linger(&self, now: Instant) -> bool {
        self.last_start.is_some_and(|prev| {
            lingers(
                self.linger,
                self.last_round,
                now.saturating_duration_since(prev),
            )
        })
    }

    /// Applies `batches` as one durable round. `Ok` holds each batch's own outcome (its
    /// audit seqs, or why it alone was refused); `Err` means nothing was committed.
    pub(crate) fn commit(
        &mut self,
        batches: Vec<Vec<Op>>,
    ) -> Result<Vec<Result<Vec<u64>, LedgerError>>, LedgerError> {
        self.commit_with(batches, &[])
    }

    /// [`Writer::commit`], also removing the keys `remove` in the same batch (recovery).
    pub(crate) fn commit_with(
        &mut self,
        batches: Vec<Vec<Op>>,
        remove: &[IVec],
    ) -> Result<Vec<Result<Vec<u64>, LedgerError>>, LedgerError> {
        let mut round = Round::new(&self.tree, &self.open, self.head.clone(), now_ms());
        for k in remove {
            round.originals.push((k.to_vec(), self.tree.get(k)?));
            round.removed.push(k.to_vec());
        }
        let mut outcomes = Vec::with_capacity(batches.len());
        for ops in batches {
            match round.load(&ops) {
                Ok(()) => outcomes.push(Ok(round.apply(ops)?)),
                Err(e) => outcomes.push(Err(e)),
            }
        }
        let Some((batch, undo, head, groups)) = round.finish()? else {
            // Nothing to write: every earlier round is already durable.
            return Ok(outcomes);
        };
        self.tree.apply_batch(batch)?;
        if let Err(e) = self.flush() {
            if let Err(u) = self.tree.apply_batch(undo) {
                tracing::error!(error = %u, "cannot undo a ledger round whose flush failed");
            }
            return Err(e.into());
        }
        self.head = head;
        self.open.apply(groups);
        self.shared.rounds.fetch_add(1, Ordering::Relaxed);
        Ok(outcomes)
    }

    fn flush(&self) -> Result<(), sled::Error> {
        #[cfg(test)]
        if self.shared.fail_next_flush.swap(false, Ordering::Relaxed) {
            return Err(sled::Error::Io(std::io::Error::other(
                "injected flush failure",
            )));
        }
        self.tree.flush().map(drop)
    }

    /// Retention by the configured duration (logged, never fatal).
    pub(crate) fn retain(&mut self) {
        let Some(r) = self.retention else { return };
        let keep = i64::try_from(r.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(keep);
        match self.prune(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "audit retention deleted old records"),
            Err(e) => tracing::error!(error = %e, "audit retention failed"),
        }
    }

    fn prune(&mut self, cutoff_ms: i64) -> Result<u64, LedgerError> {
        audit::prune(&self.tree, cutoff_ms, self.max_batch)
    }

    fn extend_ids(&mut self, end: u64) -> Result<(), LedgerError> {
        if end <= self.shared.ids_end.load(Ordering::Acquire) {
            return Ok(());
        }
        self.tree.insert(NEXT_RESERVATION, &end.to_be_bytes())?;
        self.tree.flush()?;
        self.shared.ids_end.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }
}

/// Whether a round lingers, given that the round before held `last_round` batches and
/// started `since` ago: it held more than one, and at the rate they came (that many
/// in `since`) at least one more is due within `linger`.
fn lingers(linger: Duration, last_round: usize, since: Duration) -> bool {
    if linger.is_zero() || last_round < 2 {
        return false;
    }
    since <= linger.saturating_mul(u32::try_from(last_round).unwrap_or(u32::MAX))
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One round's in-memory view: what it read, what it changed, what to write.
struct Round<'t> {
    tree: &'t sled::Tree,
    /// The open reservations before the round.
    open: &'t OpenReservations,
    /// The durable head the round started from.
    start: Head,
    /// The head after the ops applied so far.
    head: Head,
    now: i64,
    balances: HashMap<String, BudgetBalance>,
    /// Opened in this round and still open: the round's new group.
    opened: Vec<Reservation>,
    /// Ids closed in this round, by the (earlier) group that held them.
    closed: HashMap<u64, Vec<u64>>,
    usage: HashMap<Vec<u8>, UsageCounters>,
    /// Budget window holds as the round leaves them (stored or set in it).
    holds: HashMap<String, StoredHold>,
    audit: Vec<(u64, Vec<u8>)>,
    /// Every key loaded, with its value before the round (for the undo batch).
    originals: Vec<(Vec<u8>, Option<IVec>)>,
    /// Keys the round removes.
    removed: Vec<Vec<u8>>,
}

impl<'t> Round<'t> {
    fn new(tree: &'t sled::Tree, open: &'t OpenReservations, head: Head, now: i64) -> Round<'t> {
        Round {
            tree,
            open,
            start: head.clone(),
            head,
            now,
            balances: HashMap::new(),
            opened: Vec::new(),
            closed: HashMap::new(),
            usage: HashMap::new(),
            holds: HashMap::new(),
            audit: Vec::new(),
            originals: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// Loads (and checks) everything `ops` will read; changes nothing visible.
    fn load(&mut self, ops: &[Op]) -> Result<(), LedgerError> {
        for op in ops {
            match op {
                Op::OpenReservation(_) => {}
                Op::CloseReservation { actual, .. } => self.load_balances(actual)?,
                Op::Charge(charges) => self.load_balances(charges)?,
                Op::Hold { budget_key, .. } => {
                    if !self.holds.contains_key(budget_key) {
                        let k = keys::hold(budget_key);
                        let old = self.tree.get(&k)?;
                        let stored = match &old {
                            Some(v) => keys::decode(&k, v)?,
                            None => StoredHold::default(),
                        };
                        self.originals.push((k, old));
                        self.holds.insert(budget_key.clone(), stored);
                    }
                }
                Op::Audit(_) => {}
                Op::Usage { key, .. } => {
                    let k = usage::key(key)?;
                    if !self.usage.contains_key(&k) {
                        let old = self.tree.get(&k)?;
                        let counters = match &old {
                            Some(v) => keys::decode(&k, v)?,
                            None => UsageCounters::default(),
                        };
                        self.originals.push((k.clone(), old));
                        self.usage.insert(k, counters);
                    }
                }
            }
        }
        Ok(())
    }

    fn load_balances(&mut self, charges: &[Charge]) -> Result<(), LedgerError> {
        for c in charges {
            if self.balances.contains_key(&c.budget_key) {
                continue;
            }
            let k = keys::balance(&c.budget_key);
            let old = self.tree.get(&k)?;
            let b = match &old {
                Some(v) => keys::decode(&k, v)?,
                None => BudgetBalance::default(),
            };
            self.originals.push((k, old));
            self.balances.insert(c.budget_key.clone(), b);
        }
        Ok(())
    }

    fn charge(&mut self, charges: &[Charge]) {
        for c in charges {
            // Loaded by `load`.
            if let Some(b) = self.balances.get_mut(&c.budget_key) {
                b.add(c);
            }
        }
    }

    /// Applies `ops` (loaded first); returns the seqs given to its audit records. An `Err`
    /// here (a record that cannot be encoded) fails the whole round.
    fn apply(&mut self, ops: Vec<Op>) -> Result<Vec<u64>, LedgerError> {
        let mut seqs = Vec::new();
        for op in ops {
            match op {
                Op::OpenReservation(r) => {
                    // Opening an open id again replaces it.
                    self.take_open(r.id);
                    self.opened.push(r);
                }
                Op::CloseReservation { id, actual } => {
                    if self.take_open(id) {
                        self.charge(&actual);
                    } else {
                        tracing::warn!(
                            reservation = id,
                            "closing a reservation that is not open (recovered at start?); not charging it again"
                        );
                    }
                }
                Op::Charge(charges) => self.charge(&charges),
                Op::Hold {
                    budget_key,
                    micros,
                    tokens,
                    version,
                } => {
                    // Loaded by `load`.
                    if let Some(h) = self.holds.get_mut(&budget_key) {
                        h.apply(micros, tokens, version);
                    }
                }
                Op::Audit(event) => {
                    let seq = self.head.last_seq + 1;
                    let ts = self.now.max(self.head.last_ts);
                    let prev = std::mem::take(&mut self.head.last_hash);
                    let (record, bytes) = audit::seal(seq, ts, event, prev)?;
                    self.head = Head {
                        last_seq: seq,
                        last_hash: record.hash,
                        last_ts: ts,
                    };
                    self.audit.push((seq, bytes));
                    seqs.push(seq);
                }
                Op::Usage { key, delta } => {
                    let k = usage::key(&key)?;
                    if let Some(c) = self.usage.get_mut(&k) {
                        c.add(&delta);
                    }
                }
            }
        }
        Ok(seqs)
    }

    /// Closes `id` if it is open (opened earlier in this round, or in an earlier round
    /// and not closed in this one); false if it is not open.
    fn take_open(&mut self, id: u64) -> bool {
        if let Some(i) = self.opened.iter().position(|r| r.id == id) {
            self.opened.remove(i);
            return true;
        }
        match self.open.group_of(id, &self.closed) {
            Some(g) => {
                self.closed.entry(g).or_default().push(id);
                true
            }
            None => false,
        }
    }

    /// The round's batch, its undo batch, the head after it and its changes to the
    /// reservation groups; `None` when it writes nothing.
    #[allow(clippy::type_complexity)]
    fn finish(self) -> Result<Option<(sled::Batch, sled::Batch, Head, GroupChanges)>, LedgerError> {
        if self.originals.is_empty()
            && self.audit.is_empty()
            && self.opened.is_empty()
            && self.closed.is_empty()
        {
            return Ok(None);
        }
        let mut batch = sled::Batch::default();
        let mut undo = sled::Batch::default();
        for (k, b) in &self.balances {
            batch.insert(keys::balance(k), keys::encode(b)?);
        }
        // Reservations: one write for the round's new group, one per earlier group it
        // closed something in (rewritten with what stays open, or removed).
        let mut groups = GroupChanges {
            groups: Vec::with_capacity(self.closed.len() + 1),
            next_group: self.open.next_group,
        };
        for (g, ids) in &self.closed {
            let k = keys::reservation(*g);
            let Some(before) = self.open.groups.get(g) else {
                continue;
            };
            undo.insert(k.clone(), before.stored.clone());
            let open: Vec<Reservation> = before
                .open
                .iter()
                .filter(|r| !ids.contains(&r.id))
                .cloned()
                .collect();
            if open.is_empty() {
                batch.remove(k);
                groups.groups.push((*g, None));
            } else {
                let stored = IVec::from(keys::encode(&open)?);
                batch.insert(k, stored.clone());
                groups.groups.push((*g, Some(Group { stored, open })));
            }
        }
        if !self.opened.is_empty() {
            let g = groups.next_group;
            groups.next_group = g.saturating_add(1);
            let k = keys::reservation(g);
            let stored = IVec::from(keys::encode(&self.opened)?);
            batch.insert(k.clone(), stored.clone());
            undo.remove(k);
            groups.groups.push((
                g,
                Some(Group {
                    stored,
                    open: self.opened,
                }),
            ));
        }
        for (k, c) in &self.usage {
            batch.insert(k.as_slice(), keys::encode(c)?);
        }
        for (k, h) in &self.holds {
            batch.insert(keys::hold(k), keys::encode(h)?);
        }
        for k in &self.removed {
            batch.remove(k.as_slice());
        }
        for (k, old) in self.originals {
            match old {
                Some(v) => undo.insert(k, v),
                None => undo.remove(k),
            }
        }
        if !self.audit.is_empty() {
            for (seq, bytes) in self.audit {
                batch.insert(keys::audit(seq), bytes);
                undo.remove(keys::audit(seq));
            }
            batch.insert(LAST_SEQ, &self.head.last_seq.to_be_bytes());
            batch.insert(LAST_HASH, self.head.last_hash.as_bytes());
            // The head before this round is what `m/` held (nothing while the log is empty).
            if self.start.last_seq == 0 {
                undo.remove(LAST_SEQ);
                undo.remove(LAST_HASH);
            } else {
                undo.insert(LAST_SEQ, &self.start.last_seq.to_be_bytes());
                undo.insert(LAST_HASH, self.start.last_hash.as_bytes());
            }
        }
        Ok(Some((batch, undo, self.head, groups)))
    }
}

#[cfg(test)]
mod pace {
    use super::lingers;
    use std::time::Duration;

    #[test]
    fn a_round_lingers_only_when_more_submissions_are_due_within_the_linger() {
        let us = Duration::from_micros;
        let linger = us(200);
        // 1,000 req/s: two requests that met in one round 1 ms ago.
        assert!(!lingers(linger, 2, us(1000)));
        // Closed loop: 20 batches in the round that started 1 ms ago.
        assert!(lingers(linger, 20, us(1000)));
        // 8,000 req/s: two batches 250 µs apart.
        assert!(lingers(linger, 2, us(250)));
        // A lone submitter never waits, nor does a zero linger.
        assert!(!lingers(linger, 1, us(10)));
        assert!(!lingers(Duration::ZERO, 50, us(10)));
    }
}
