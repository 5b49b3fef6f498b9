//! [`Ledger`], the handle everything else holds: opening (with crash recovery),
//! submitting batches to the writer, reservation ids, and reads.
//!
//! Invariants:
//! - Reads go straight to the tree; every write goes through the writer thread.
//! - `submit` queues its batch when called, not when first polled: dropping the future
//!   does not cancel the write (side effects survive client disconnects).
//! - Reservation ids below `Shared::ids_end` are durably reserved (`m/next_reservation`);
//!   an id is handed out only below it, asking the writer for the next block of 1024
//!   ahead of time (at half a block left) and waiting for it only if it is not there yet.
//! - Dropping the last handle closes the queue and joins the writer thread, which first
//!   commits everything queued.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use sled::IVec;

use super::keys::{self, NEXT_RESERVATION, TREE};
use super::writer::{read_reservations, Msg, Reply, Shared, Writer};
use super::{
    usage, AuditEvent, AuditRecord, BudgetBalance, Charge, LedgerError, Op, Reservation,
    StoredHold, UsageCounters, UsageKey,
};
use crate::store::{Store, StoreError};

/// Reservation ids are reserved durably this many at a time.
const ID_BLOCK: u64 = 1024;

/// How the ledger runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerOptions {
    /// Ops per group-commit round (a single larger batch still commits whole, alone).
    pub max_batch: usize,
    /// Audit records older than this are deleted (checked at open, then hourly or every
    /// `retention` if shorter); `None` keeps them forever.
    pub retention: Option<Duration>,
    /// How long a round waits for more batches before it commits, when submissions come
    /// fast enough that one more is due within it (the round before held several, at
    /// most `linger` apart on average); zero never waits.
    pub linger: Duration,
}

/// The default [`LedgerOptions::linger`].
pub const LINGER: Duration = Duration::from_micros(200);

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            max_batch: 4096,
            retention: None,
            linger: LINGER,
        }
    }
}

/// What [`Ledger::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Reservations a crash left open, now charged in full (each with a
    /// `ReservationRecovered` audit record).
    pub reservations: Vec<Reservation>,
    /// Budget window holds a crash left, now charged in full (each with a
    /// `HoldRecovered` audit record).
    pub holds: Vec<Charge>,
    /// The last audit seq after recovery (0 for an empty log).
    pub last_seq: u64,
}

/// Every budget window hold stored in `tree`, by key order: the keys, and the non-zero
/// holds as charges.
fn read_holds(tree: &sled::Tree) -> Result<(Vec<IVec>, Vec<Charge>), LedgerError> {
    let (mut keys_found, mut out) = (Vec::new(), Vec::new());
    for item in tree.scan_prefix(keys::HOLD) {
        let (k, v) = item?;
        let hold: StoredHold = keys::decode(&k, &v)?;
        if hold.micros > 0 || hold.tokens > 0 {
            let budget_key = String::from_utf8_lossy(&k[keys::HOLD.len()..]).into_owned();
            out.push(Charge {
                budget_key,
                micros: hold.micros,
                tokens: hold.tokens,
            });
        }
        keys_found.push(k);
    }
    Ok((keys_found, out))
}

/// The ledger handle; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Tree,
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Held while waiting for the writer to extend the id block.
    extending: Mutex<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("rounds", &self.rounds())
            .field(
                "next_reservation",
                &self.inner.next_id.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the queue (the only sender lives here), then wait for the writer to drain.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the ledger writer thread panicked");
            }
        }
    }
}

impl Ledger {
    /// Opens the `ledger` tree of `store`, charges reservations a crash left open (in
    /// full, each deleted and noted in the audit log, all in one durable batch), applies
    /// retention, reserves a block of reservation ids, and starts the writer thread.
    pub fn open(store: &Store, opts: LedgerOptions) -> Result<(Ledger, Recovered), LedgerError> {
        let tree = store.tree(TREE).map_err(|e| match e {
            StoreError::Io(e) => LedgerError::Store(e),
            other => LedgerError::Store(sled::Error::Unsupported(other.to_string())),
        })?;
        let shared = Arc::new(Shared::default());
        let mut writer = Writer::new(
            tree.clone(),
            opts.max_batch,
            opts.retention,
            opts.linger,
            shared.clone(),
        )?;

        let reservations = read_reservations(&tree)?;
        let (hold_keys, holds) = read_holds(&tree)?;
        if !reservations.is_empty() || !holds.is_empty() {
            let mut ops: Vec<Op> = reservations
                .iter()
                .flat_map(|r| {
                    [
                        Op::CloseReservation {
                            id: r.id,
                            actual: r.charges.clone(),
                        },
                        Op::Audit(AuditEvent::ReservationRecovered {
                            reservation: r.clone(),
                        }),
                    ]
                })
                .collect();
            for h in &holds {
                ops.push(Op::Charge(vec![h.clone()]));
                ops.push(Op::Audit(AuditEvent::HoldRecovered { hold: h.clone() }));
            }
            // The holds go in the same durable batch as their charges: a crash during
            // recovery leaves both or neither.
            for outcome in writer.commit_with(vec![ops], &hold_keys)? {
                outcome?;
            }
            tracing::warn!(
                reservations = reservations.len(),
                holds = holds.len(),
                "charged budget reservations and holds left by an unclean stop in full"
            );
        }
        writer.retain();

        // Skip whatever the last run may have handed out, and reserve the next block.
        let first_id = keys::read_u64(&tree, NEXT_RESERVATION)?.unwrap_or(1).max(1);
        let ids_end = first_id.saturating_add(ID_BLOCK);
        tree.insert(NEXT_RESERVATION, &ids_end.to_be_bytes())?;
        tree.flush()?;
        shared.ids_end.store(ids_end, Ordering::Release);

        let last_seq = writer.last_seq();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("airlock-ledger".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LedgerError::Spawn(e.to_string()))?;
        let ledger = Ledger {
            inner: Arc::new(Inner {
                tree,
                tx,
                shared,
                next_id: AtomicU64::new(first_id),
                extending: Mutex::new(()),
                thread: Some(thread),
            }),
        };
        Ok((
            ledger,
            Recovered {
                reservations,
                holds,
                last_seq,
            },
        ))
    }

    /// Submits a batch; resolves once it is durable (committed in one `apply_batch` with
    /// every batch of its round, then flushed). Returns the audit seqs given to the batch's
    /// `Audit` ops, in order. The batch is queued by this call itself: dropping the future
    /// only drops the answer.
    pub fn submit(
        &self,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<Vec<u64>, LedgerError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self
            .inner
            .tx
            .send(Msg::Submit {
                ops,
                reply: Reply::Async(tx),
            })
            .is_ok();
        async move {
            if !queued {
                return Err(LedgerError::WriterGone);
            }
            rx.await.map_err(|_| LedgerError::WriterGone)?
        }
    }

    /// [`Ledger::submit`], blocking the calling thread until durable (for the CLI and for
    /// settlement from non-async contexts; never call it on an async worker in a hot path).
    pub fn submit_blocking(&self, ops: Vec<Op>) -> Result<Vec<u64>, LedgerError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner
            .tx
            .send(Msg::Submit {
                ops,
                reply: Reply::Blocking(tx),
            })
            .map_err(|_| LedgerError::WriterGone)?;
        rx.recv().map_err(|_| LedgerError::WriterGone)?
    }

    /// Deletes audit records with `ts < cutoff_ms` now (what retention does on its own
    /// schedule), on the writer thread; returns how many were deleted.
    pub fn prune_audit_before(
        &self,
        cutoff_ms: i64,
    ) -> impl Future<Output = Result<u64, LedgerError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self
            .inner
            .tx
            .send(Msg::Prune {
                cutoff_ms,
                reply: Reply::Async(tx),
            })
            .is_ok();
        async move {
            if !queued {
                return Err(LedgerError::WriterGone);
            }
            rx.await.map_err(|_| LedgerError::WriterGone)?
        }
    }

    /// The next reservation id: our own counter, unique across restarts (see the module
    /// docs). Normally a single atomic add; once per 1024 ids it asks the writer to
    /// reserve the next block, and blocks only if that block is not durable yet.
    pub fn next_reservation_id(&self) -> u64 {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let end = inner.shared.ids_end.load(Ordering::Acquire);
        if id.saturating_add(ID_BLOCK / 2) == end {
            // Half a block left: reserve the next one in the background.
            drop(inner.tx.send(Msg::ExtendIds {
                end: end.saturating_add(ID_BLOCK),
                reply: None,
            }));
        }
        if id < end {
            return id;
        }
        let _one_at_a_time = inner
            .extending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while id >= inner.shared.ids_end.load(Ordering::Acquire) {
            let (tx, rx) = mpsc::sync_channel(1);
            let asked = inner.tx.send(Msg::ExtendIds {
                end: id.saturating_add(ID_BLOCK),
                reply: Some(tx),
            });
            let answer = match asked {
                Ok(()) => rx.recv().unwrap_or(Err(LedgerError::WriterGone)),
                Err(_) => Err(LedgerError::WriterGone),
            };
            if let Err(e) = answer {
                // Still unique in this process; only a crash before the next durable
                // extension could hand it out again.
                tracing::error!(error = %e, id, "reservation id handed out without a durable high-water mark");
                break;
            }
        }
        id
    }

    /// Durable write rounds committed since open (each one `apply_batch` + `flush`).
    pub fn rounds(&self) -> u64 {
        self.inner.shared.rounds.load(Ordering::Relaxed)
    }

    /// A budget window's balance as stored (zero when absent). The in-memory authority is
    /// the governance budget module, which loads these at start.
    pub fn balance(&self, budget_key: &str) -> Result<BudgetBalance, LedgerError> {
        let k = keys::balance(budget_key);
        match self.inner.tree.get(&k)? {
            Some(v) => keys::decode(&k, &v),
            None => Ok(BudgetBalance::default()),
        }
    }

    /// Every balance whose budget key starts with `prefix`, in key order.
    pub fn balances_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, BudgetBalance)>, LedgerError> {
        let mut out = Vec::new();
        for item in self.inner.tree.scan_prefix(keys::balance(prefix)) {
            let (k, v) = item?;
            let name = k
                .strip_prefix(keys::BALANCE)
                .and_then(|n| std::str::from_utf8(n).ok())
                .ok_or_else(|| LedgerError::Corrupt {
                    key: keys::display(&k),
                    reason: "the budget key is not UTF-8".into(),
                })?;
            out.push((name.to_owned(), keys::decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Reservations open now, by id.
    /// The ledger tree, for [`super::verify`] and [`super::export`].
    pub fn tree(&self) -> &sled::Tree {
        &self.inner.tree
    }

    pub fn open_reservations(&self) -> Result<Vec<Reservation>, LedgerError> {
        read_reservations(&self.inner.tree)
    }

    /// Usage rows with `from_day <= day <= to_day` (`YYYY-MM-DD`), for analytics.
    pub fn usage(
        &self,
        from_day: &str,
        to_day: &str,
    ) -> Result<Vec<(UsageKey, UsageCounters)>, LedgerError> {
        usage::range(&self.inner.tree, from_day, to_day)
    }

    /// Audit records with `seq >= from`, in order.
    pub fn audit_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<AuditRecord, LedgerError>> + '_ {
        self.inner
            .tree
            .range(keys::audit(from)..keys::audit(u64::MAX))
            .map(|item| {
                let (k, v) = item?;
                keys::decode(&k, &v)
            })
    }

    #[cfg(test)]
    pub(crate) fn fail_next_flush(&self) {
        self.inner
            .shared
            .fail_next_flush
            .store(true, Ordering::Relaxed);
    }
}
