//! Ledger tests against a real sled store in a temporary directory: durability when
//! acknowledged, group commit, reservations and crash recovery, the hash chain under
//! tampering, retention, export, usage, reservation ids, and failed rounds.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::writer::now_ms;
use super::*;
use crate::store::Store;

fn open(dir: &Path) -> (Store, Ledger, Recovered) {
    open_with(dir, LedgerOptions::default())
}

fn open_with(dir: &Path, opts: LedgerOptions) -> (Store, Ledger, Recovered) {
    let store = open_store(dir);
    let (ledger, recovered) = Ledger::open(&store, opts).unwrap();
    (store, ledger, recovered)
}

/// Opens the store, waiting for the lock of a previous opener to go: sled's own I/O
/// threads may hold the database file for a moment after its last handle is dropped.
fn open_store(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Err(crate::store::StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other.unwrap(),
        }
    }
}

fn request(i: u64, key: &str, team: Option<&str>, model: &str) -> AuditEvent {
    AuditEvent::Request(RequestAudit {
        request_id: format!("req_{i}"),
        key_id: key.into(),
        team_id: team.map(Into::into),
        org_id: "o_1".into(),
        route: "/v1/chat/completions".into(),
        model: model.into(),
        target: Some("openai/gpt-4o-mini".into()),
        attempts: 1,
        prompt_tokens: 10 + i,
        completion_tokens: 20,
        cost_micros: 1_000 + i,
        latency_ms: 42,
        status: 200,
        policy: vec!["allow:openai/*".into()],
        ..RequestAudit::default()
    })
}

fn admin(actor: &str) -> AuditEvent {
    AuditEvent::Admin {
        actor_key_id: actor.into(),
        action: "key.update".into(),
        target: "ak_9".into(),
        // Unsorted keys, floats, nesting: the canonical form must survive a round trip.
        before: Some(json!({"z": 1, "a": [1.5, -0.25, 1e-7], "m": {"y": null, "b": true}})),
        after: Some(json!({"rpm_limit": 60, "note": "caf\u{e9} \"quoted\""})),
    }
}

fn charge(budget_key: &str, micros: u64, tokens: u64) -> Charge {
    Charge {
        budget_key: budget_key.into(),
        micros,
        tokens,
    }
}

fn reservation(id: u64, charges: Vec<Charge>) -> Reservation {
    Reservation {
        id,
        request_id: format!("req_r{id}"),
        key_id: "ak_1".into(),
        charges,
        opened_at: 1_700_000_000_000,
    }
}

fn usage_key(day: &str, model: &str) -> UsageKey {
    UsageKey {
        day: day.into(),
        key_id: "ak_1".into(),
        user_id: Some("u_1".into()),
        team_id: Some("t_1".into()),
        org_id: "o_1".into(),
        model: model.into(),
        target: None,
    }
}

fn counters(requests: u64, cost: u64) -> UsageCounters {
    UsageCounters {
        requests,
        errors: 0,
        prompt_tokens: 10 * requests,
        completion_tokens: 20 * requests,
        cost_micros: cost,
        latency_ms_sum: 5 * requests,
    }
}

fn records(ledger: &Ledger) -> Vec<AuditRecord> {
    ledger.audit_from(0).collect::<Result<_, _>>().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Waits until the wall clock has passed `ts` (so later records get a later timestamp).
fn clock_past(ts: i64) {
    while now_ms() <= ts {
        std::thread::yield_now();
    }
}

/// Opens a copy of the data directory in `src`, lets `tamper` edit its ledger tree, and
/// verifies it.
fn verify_tampered(src: &Path, tamper: impl FnOnce(&sled::Tree)) -> VerifyReport {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(src, copy.path());
    let store = open_store(copy.path());
    let tree = store.tree("ledger").unwrap();
    tamper(&tree);
    verify(&tree)
}

fn bad_seq(report: &VerifyReport) -> (u64, &str) {
    let (seq, why) = report.first_bad.as_ref().expect("a broken chain");
    (*seq, why.as_str())
}

#[test]
fn acknowledged_batches_are_on_disk_without_any_further_flush() {
    let dir = tempfile::tempdir().unwrap();
    let crash_image = tempfile::tempdir().unwrap();
    {
        let (_store, ledger, _) = open(dir.path());
        let seqs = ledger
            .submit_blocking(vec![
                Op::Charge(vec![charge("team:t_1|monthly|2026-11", 1_500, 30)]),
                Op::Audit(request(1, "ak_1", Some("t_1"), "gpt-4o-mini")),
                Op::Usage {
                    key: usage_key("2026-11-03", "gpt-4o-mini"),
                    delta: counters(1, 1_500),
                },
            ])
            .unwrap();
        assert_eq!(seqs, vec![1]);
        // What a crash right now would leave: the files as they are, copied while open.
        copy_dir(dir.path(), crash_image.path());
    }
    for path in [crash_image.path(), dir.path()] {
        let (_store, ledger, recovered) = open(path);
        assert_eq!(recovered.last_seq, 1);
        assert!(recovered.reservations.is_empty());
        assert_eq!(
            ledger.balance("team:t_1|monthly|2026-11").unwrap(),
            BudgetBalance {
                spent_micros: 1_500,
                spent_tokens: 30
            }
        );
        let recs = records(&ledger);
        assert_eq!(recs.len(), 1);
        assert_eq!(
            recs[0].event,
            request(1, "ak_1", Some("t_1"), "gpt-4o-mini")
        );
        assert_eq!(recs[0].prev_hash, GENESIS_HASH);
        let rows = ledger.usage("2026-11-03", "2026-11-03").unwrap();
        assert_eq!(
            rows,
            vec![(usage_key("2026-11-03", "gpt-4o-mini"), counters(1, 1_500))]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_share_rounds_and_get_contiguous_seqs() {
    const N: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, _) = open(dir.path());
    let rounds_before = ledger.rounds();
    // Every task waits at the gate, so the submits really are concurrent.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let closed = gate.clone().write_owned().await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let ledger = ledger.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _open = gate.read().await;
            ledger
                .submit(vec![
                    Op::Charge(vec![charge("key:ak_1|total|0", 1, 1)]),
                    Op::Audit(request(i, "ak_1", None, "m")),
                ])
                .await
        }));
    }
    drop(closed);
    let mut seqs = Vec::new();
    for t in tasks {
        let got = t.await.unwrap().unwrap();
        assert_eq!(got.len(), 1);
        seqs.extend(got);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    let rounds = ledger.rounds() - rounds_before;
    assert!(rounds * 10 <= N, "{rounds} rounds for {N} submits");
    assert_eq!(
        ledger.balance("key:ak_1|total|0").unwrap(),
        BudgetBalance {
            spent_micros: N,
            spent_tokens: N
        }
    );
    assert!(verify(&store.tree("ledger").unwrap()).is_ok());
}

#[tokio::test]
async fn a_closed_reservation_charges_the_actual_amount() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, ledger, _) = open(dir.path());
    let id = ledger.next_reservation_id();
    let held = vec![charge("team:t_1|daily|2026-11-03", 5_000, 500)];
    ledger
        .submit(vec![Op::OpenReservation(reservation(id, held))])
        .await
        .unwrap();
    assert_eq!(ledger.open_reservations().unwrap().len(), 1);
    assert_eq!(
        ledger.balance("team:t_1|daily|2026-11-03").unwrap(),
        BudgetBalance::default(),
        "holding adds nothing to the balance"
    );
    ledger
        .submit(vec![Op::CloseReservation {
            id,
            actual: vec![charge("team:t_1|daily|2026-11-03", 1_200, 120)],
        }])
        .await
        .unwrap();
    assert!(ledger.open_reservations().unwrap().is_empty());
    assert_eq!(
        ledger.balance("team:t_1|daily|2026-11-03").unwrap(),
        BudgetBalance {
            spent_micros: 1_200,
            spent_tokens: 120
        }
    );
}

#[test]
fn an_open_reservation_found_at_start_is_charged_in_full_once() {
    let dir = tempfile::tempdir().unwrap();
    let held = vec![
        charge("team:t_1|monthly|2026-11", 5_000, 500),
        charge("key:ak_1|total|0", 5_000, 500),
    ];
    let id = {
        let (_store, ledger, _) = open(dir.path());
        let id = ledger.next_reservation_id();
        ledger
            .submit_blocking(vec![
                Op::Audit(request(1, "ak_1", Some("t_1"), "m")),
                Op::OpenReservation(reservation(id, held.clone())),
            ])
            .unwrap();
        id
        // Dropped without closing: what a crash leaves.
    };
    let (_store, ledger, recovered) = open(dir.path());
    assert_eq!(recovered.reservations, vec![reservation(id, held.clone())]);
    assert_eq!(recovered.last_seq, 2);
    for c in &held {
        assert_eq!(
            ledger.balance(&c.budget_key).unwrap(),
            BudgetBalance {
                spent_micros: 5_000,
                spent_tokens: 500
            }
        );
    }
    assert!(ledger.open_reservations().unwrap().is_empty());
    let recs = records(&ledger);
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[1].event,
        AuditEvent::ReservationRecovered {
            reservation: reservation(id, held.clone())
        }
    );

    // The request finishing late must not charge the window a second time.
    ledger
        .submit_blocking(vec![Op::CloseReservation {
            id,
            actual: vec![charge("team:t_1|monthly|2026-11", 700, 70)],
        }])
        .unwrap();
    assert_eq!(
        ledger
            .balance("team:t_1|monthly|2026-11")
            .unwrap()
            .spent_micros,
        5_000
    );
    drop(ledger);
    drop(_store);
    // Nothing is left to recover a second time.
    let (_store, _ledger, again) = open(dir.path());
    assert!(again.reservations.is_empty());
    assert_eq!(again.last_seq, 2);
}

#[test]
fn reads_in_a_round_see_earlier_ops_of_the_same_round() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, ledger, _) = open(dir.path());
    let b = "org:o_1|total|0";
    ledger
        .submit_blocking(vec![
            Op::Charge(vec![charge(b, 10, 1)]),
            Op::OpenReservation(reservation(7, vec![charge(b, 100, 10)])),
            Op::Charge(vec![charge(b, 10, 1)]),
            Op::CloseReservation {
                id: 7,
                actual: vec![charge(b, 30, 3)],
            },
            Op::CloseReservation {
                id: 7,
                actual: vec![charge(b, 30, 3)],
            },
            Op::Usage {
                key: usage_key("2026-11-03", "m"),
                delta: counters(1, 10),
            },
            Op::Usage {
                key: usage_key("2026-11-03", "m"),
                delta: counters(2, 20),
            },
        ])
        .unwrap();
    assert_eq!(
        ledger.balance(b).unwrap(),
        BudgetBalance {
            spent_micros: 50,
            spent_tokens: 5
        }
    );
    assert!(ledger.open_reservations().unwrap().is_empty());
    assert_eq!(
        ledger.usage("2026-11-03", "2026-11-03").unwrap(),
        vec![(usage_key("2026-11-03", "m"), counters(3, 30))]
    );
}

#[test]
fn the_chain_verifies_and_names_the_first_tampered_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, ledger, _) = open(dir.path());
        for i in 1..=10 {
            let event = if i % 3 == 0 {
                admin("ak_admin")
            } else {
                request(i, "ak_1", Some("t_1"), "m")
            };
            ledger.submit_blocking(vec![Op::Audit(event)]).unwrap();
        }
        let report = verify(&store.tree("ledger").unwrap());
        assert_eq!(
            report,
            VerifyReport {
                records: 10,
                first_bad: None
            }
        );
        assert_eq!(
            report.to_string(),
            "audit chain intact: 10 records verified"
        );
    }
    let key = |seq: u64| [b"a/".as_slice(), &seq.to_be_bytes()].concat();

    // One field edited in place.
    let r = verify_tampered(dir.path(), |t| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&t.get(key(4)).unwrap().unwrap()).unwrap();
        v["cost_micros"] = json!(1);
        t.insert(key(4), serde_json::to_vec(&v).unwrap()).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 4, "{r}");
    assert!(bad_seq(&r).1.starts_with("altered"), "{r}");
    assert_eq!(r.records, 3);
    assert!(r.to_string().contains("broken at seq 4"), "{r}");

    // An admin record's JSON value edited (nested).
    let r = verify_tampered(dir.path(), |t| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&t.get(key(6)).unwrap().unwrap()).unwrap();
        v["after"]["rpm_limit"] = json!(6000);
        t.insert(key(6), serde_json::to_vec(&v).unwrap()).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 6, "{r}");
    assert!(bad_seq(&r).1.starts_with("altered"), "{r}");

    // A field added: serde would ignore it, the hash would still match.
    let r = verify_tampered(dir.path(), |t| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&t.get(key(2)).unwrap().unwrap()).unwrap();
        v["approved_by"] = json!("someone");
        t.insert(key(2), serde_json::to_vec(&v).unwrap()).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 2, "{r}");
    assert!(bad_seq(&r).1.starts_with("altered"), "{r}");

    // One record deleted.
    let r = verify_tampered(dir.path(), |t| {
        t.remove(key(5)).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 5, "{r}");
    assert!(bad_seq(&r).1.starts_with("missing"), "{r}");

    // Two records swapped.
    let r = verify_tampered(dir.path(), |t| {
        let a = t.get(key(3)).unwrap().unwrap();
        let b = t.get(key(7)).unwrap().unwrap();
        t.insert(key(3), b).unwrap();
        t.insert(key(7), a).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 3, "{r}");
    assert!(bad_seq(&r).1.starts_with("out of order"), "{r}");

    // Two records swapped with their seq fields rewritten to match their new keys.
    let r = verify_tampered(dir.path(), |t| {
        let mut a: serde_json::Value =
            serde_json::from_slice(&t.get(key(8)).unwrap().unwrap()).unwrap();
        let mut b: serde_json::Value =
            serde_json::from_slice(&t.get(key(9)).unwrap().unwrap()).unwrap();
        a["seq"] = json!(9);
        b["seq"] = json!(8);
        t.insert(key(8), serde_json::to_vec(&b).unwrap()).unwrap();
        t.insert(key(9), serde_json::to_vec(&a).unwrap()).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 8, "{r}");

    // The last record removed.
    let r = verify_tampered(dir.path(), |t| {
        t.remove(key(10)).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 10, "{r}");
    assert!(bad_seq(&r).1.starts_with("missing"), "{r}");

    // The last record's bytes cut short.
    let r = verify_tampered(dir.path(), |t| {
        let v = t.get(key(10)).unwrap().unwrap();
        t.insert(key(10), &v[..v.len() / 2]).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 10, "{r}");
    assert!(bad_seq(&r).1.starts_with("altered"), "{r}");

    // The original is untouched by all this.
    let (store, _ledger, _) = open(dir.path());
    assert!(verify(&store.tree("ledger").unwrap()).is_ok());
}

#[test]
fn a_sealed_record_is_stored_as_its_own_serialization_with_a_good_hash() {
    let mut content = request(7, "ak_1", Some("t_1"), "smart");
    if let AuditEvent::Request(r) = &mut content {
        r.content = Some(json!({"prompt": "say \"hash\":\"\"}", "z": ["\u{1F600}", "\n"]}));
        r.error_code = Some("upstream_error".into());
    }
    let events = [
        request(1, "ak_1", None, "smart"),
        content,
        admin("ak_admin"),
        AuditEvent::ReservationRecovered {
            reservation: reservation(3, vec![charge("team:t_1|monthly|2026-11", 5, 6)]),
        },
        AuditEvent::HoldRecovered {
            hold: charge("org:o_1|total|0", 7, 8),
        },
    ];
    let mut prev = audit::GENESIS_HASH.to_string();
    for (i, event) in events.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let (record, bytes) = audit::seal(seq, 1_700_000_000_000, event, prev.clone()).unwrap();
        // The spliced bytes are exactly what serializing the sealed record gives.
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            String::from_utf8(keys::encode(&record).unwrap()).unwrap()
        );
        // And the hash is the chain hash of the canonical form (hash "").
        let mut canonical = record.clone();
        canonical.hash = String::new();
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, prev.as_bytes());
        sha2::Digest::update(&mut h, keys::encode(&canonical).unwrap());
        assert_eq!(record.hash, hex::encode(sha2::Digest::finalize(h)));
        assert_eq!(record.prev_hash, prev);
        prev = record.hash;
    }
}

#[test]
fn an_empty_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _ledger, _) = open(dir.path());
    assert_eq!(
        verify(&store.tree("ledger").unwrap()),
        VerifyReport {
            records: 0,
            first_bad: None
        }
    );
}

#[tokio::test]
async fn retention_deletes_old_records_and_verify_starts_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, _) = open(dir.path());
    let old: Vec<Op> = (1..=3)
        .map(|i| Op::Audit(request(i, "ak_1", None, "m")))
        .collect();
    ledger.submit(old).await.unwrap();
    clock_past(records(&ledger)[2].ts);
    let new: Vec<Op> = (4..=6)
        .map(|i| Op::Audit(request(i, "ak_1", None, "m")))
        .collect();
    ledger.submit(new).await.unwrap();
    let cutoff = records(&ledger)[3].ts;

    assert_eq!(ledger.prune_audit_before(cutoff).await.unwrap(), 3);
    let left: Vec<u64> = records(&ledger).iter().map(|r| r.seq).collect();
    assert_eq!(left, vec![4, 5, 6]);
    assert_eq!(ledger.prune_audit_before(cutoff).await.unwrap(), 0);
    let tree = store.tree("ledger").unwrap();
    assert_eq!(
        verify(&tree),
        VerifyReport {
            records: 3,
            first_bad: None
        }
    );
    // The chain goes on from where it was.
    ledger
        .submit(vec![Op::Audit(request(7, "ak_1", None, "m"))])
        .await
        .unwrap();
    assert_eq!(verify(&tree).records, 4);
    drop(tree);
    drop(ledger);
    drop(store);

    // Tampering after the checkpoint is still caught.
    let r = verify_tampered(dir.path(), |t| {
        let k = [b"a/".as_slice(), &5u64.to_be_bytes()].concat();
        let mut v: serde_json::Value =
            serde_json::from_slice(&t.get(&k).unwrap().unwrap()).unwrap();
        v["status"] = json!(500);
        t.insert(k, serde_json::to_vec(&v).unwrap()).unwrap();
    });
    assert_eq!(bad_seq(&r).0, 5, "{r}");
    assert!(bad_seq(&r).1.starts_with("altered"), "{r}");
    // So is the first retained record being removed.
    let r = verify_tampered(dir.path(), |t| {
        t.remove([b"a/".as_slice(), &4u64.to_be_bytes()].concat())
            .unwrap();
    });
    assert_eq!(bad_seq(&r).0, 4, "{r}");
    assert!(bad_seq(&r).1.starts_with("missing"), "{r}");
}

#[test]
fn retention_at_open_can_empty_the_log_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let last_ts = {
        let (_store, ledger, _) = open(dir.path());
        ledger
            .submit_blocking(vec![
                Op::Audit(request(1, "ak_1", None, "m")),
                Op::Audit(request(2, "ak_1", None, "m")),
            ])
            .unwrap();
        records(&ledger)[1].ts
    };
    clock_past(last_ts + 1);
    let opts = LedgerOptions {
        retention: Some(Duration::from_millis(1)),
        ..LedgerOptions::default()
    };
    let (store, ledger, recovered) = open_with(dir.path(), opts);
    assert_eq!(recovered.last_seq, 2);
    assert!(records(&ledger).is_empty());
    let tree = store.tree("ledger").unwrap();
    assert_eq!(verify(&tree).records, 0);
    assert!(verify(&tree).is_ok());
    let seqs = ledger
        .submit_blocking(vec![Op::Audit(request(3, "ak_1", None, "m"))])
        .unwrap();
    assert_eq!(seqs, vec![3]);
    assert_eq!(
        verify(&tree),
        VerifyReport {
            records: 1,
            first_bad: None
        }
    );
}

#[test]
fn retention_stops_at_a_broken_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, _) = open(dir.path());
    let ops = (1..=4)
        .map(|i| Op::Audit(request(i, "ak_1", None, "m")))
        .collect();
    ledger.submit_blocking(ops).unwrap();
    let tree = store.tree("ledger").unwrap();
    let k = [b"a/".as_slice(), &3u64.to_be_bytes()].concat();
    let mut v: serde_json::Value = serde_json::from_slice(&tree.get(&k).unwrap().unwrap()).unwrap();
    v["model"] = json!("other");
    tree.insert(&k, serde_json::to_vec(&v).unwrap()).unwrap();
    let deleted = audit::prune(&tree, i64::MAX, 1).unwrap();
    assert_eq!(
        deleted, 2,
        "records 1 and 2 go, the altered 3 stays as evidence"
    );
    let r = verify(&tree);
    assert_eq!(bad_seq(&r).0, 3, "{r}");
}

#[test]
fn export_writes_jsonl_filtered_by_time_key_team_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, _) = open(dir.path());
    ledger
        .submit_blocking(vec![
            Op::Audit(request(1, "ak_1", Some("t_1"), "gpt-4o-mini")),
            Op::Audit(admin("ak_1")),
        ])
        .unwrap();
    clock_past(records(&ledger)[1].ts);
    ledger
        .submit_blocking(vec![
            Op::Audit(request(2, "ak_2", Some("t_2"), "claude-3-5-haiku")),
            Op::Audit(request(3, "ak_2", None, "gpt-4o-mini")),
        ])
        .unwrap();
    let t2 = records(&ledger)[2].ts;
    let tree = store.tree("ledger").unwrap();

    let run = |filter: ExportFilter| -> (u64, Vec<serde_json::Value>) {
        let mut out = Vec::new();
        let n = export(&tree, &filter, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        let lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(lines.len() as u64, n);
        (n, lines)
    };
    let seqs = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };

    let (n, all) = run(ExportFilter::default());
    assert_eq!(n, 4);
    let first = all[0].as_object().unwrap();
    let fields: Vec<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(&fields[..3], ["seq", "ts", "kind"]);
    assert_eq!(&fields[fields.len() - 2..], ["prev_hash", "hash"]);
    assert_eq!(first["kind"], "request");
    assert_eq!(first["model"], "gpt-4o-mini");
    assert_eq!(all[1]["kind"], "admin");

    let by_key = run(ExportFilter {
        key_id: Some("ak_1".into()),
        ..ExportFilter::default()
    });
    assert_eq!(
        seqs(&by_key.1),
        vec![1, 2],
        "the request and the admin change"
    );
    let by_team = run(ExportFilter {
        team_id: Some("t_2".into()),
        ..ExportFilter::default()
    });
    assert_eq!(seqs(&by_team.1), vec![3]);
    let by_model = run(ExportFilter {
        model: Some("gpt-4o-mini".into()),
        ..ExportFilter::default()
    });
    assert_eq!(seqs(&by_model.1), vec![1, 4]);
    let since = run(ExportFilter {
        from_ts: Some(t2),
        ..ExportFilter::default()
    });
    assert_eq!(seqs(&since.1), vec![3, 4]);
    let until = run(ExportFilter {
        to_ts: Some(t2),
        ..ExportFilter::default()
    });
    assert_eq!(seqs(&until.1), vec![1, 2]);
    let both = run(ExportFilter {
        from_ts: Some(t2),
        key_id: Some("ak_2".into()),
        model: Some("gpt-4o-mini".into()),
        ..ExportFilter::default()
    });
    assert_eq!(seqs(&both.1), vec![4]);
}

#[tokio::test]
async fn usage_adds_up_across_rounds_and_reads_by_day_range() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, ledger, _) = open(dir.path());
    let usage = |day: &str, model: &str, n: u64| Op::Usage {
        key: usage_key(day, model),
        delta: counters(n, 100 * n),
    };
    ledger
        .submit(vec![
            usage("2026-10-31", "a", 1),
            usage("2026-11-01", "a", 1),
        ])
        .await
        .unwrap();
    ledger
        .submit(vec![
            usage("2026-11-01", "a", 2),
            usage("2026-11-01", "b", 1),
        ])
        .await
        .unwrap();
    let mut no_team = usage_key("2026-11-02", "a");
    no_team.team_id = None;
    ledger
        .submit(vec![
            usage("2026-11-02", "a", 4),
            Op::Usage {
                key: no_team.clone(),
                delta: counters(1, 1),
            },
        ])
        .await
        .unwrap();

    let nov1 = ledger.usage("2026-11-01", "2026-11-01").unwrap();
    assert_eq!(
        nov1,
        vec![
            (usage_key("2026-11-01", "a"), counters(3, 300)),
            (usage_key("2026-11-01", "b"), counters(1, 100)),
        ]
    );
    let range = ledger.usage("2026-11-01", "2026-11-02").unwrap();
    assert_eq!(range.len(), 4);
    assert!(range.iter().all(|(k, _)| k.day.as_str() >= "2026-11-01"));
    assert!(range.contains(&(no_team, counters(1, 1))));
    assert_eq!(ledger.usage("2026-10-01", "2026-12-31").unwrap().len(), 5);
    assert!(ledger.usage("2026-11-02", "2026-11-01").unwrap().is_empty());
    assert!(ledger.usage("2026-12-01", "2026-12-31").unwrap().is_empty());
}

#[tokio::test]
async fn a_refused_batch_does_not_spoil_the_rest_of_its_round() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, _) = open(dir.path());
    store
        .tree("ledger")
        .unwrap()
        .insert("b/broken", b"not json".as_slice())
        .unwrap();
    let bad_day = ledger.submit(vec![
        Op::Charge(vec![charge("ok", 1, 1)]),
        Op::Usage {
            key: usage_key("Nov 3", "m"),
            delta: counters(1, 1),
        },
    ]);
    let corrupt = ledger.submit(vec![
        Op::Audit(request(1, "ak_1", None, "m")),
        Op::Charge(vec![charge("broken", 1, 1)]),
    ]);
    let good = ledger.submit(vec![
        Op::Audit(request(2, "ak_1", None, "m")),
        Op::Charge(vec![charge("ok", 5, 5)]),
    ]);
    let (bad_day, corrupt, good) = tokio::join!(bad_day, corrupt, good);
    assert!(
        matches!(bad_day, Err(LedgerError::InvalidOp(_))),
        "{bad_day:?}"
    );
    match corrupt {
        Err(LedgerError::Corrupt { key, .. }) => assert_eq!(key, "b/broken"),
        other => panic!("{other:?}"),
    }
    assert_eq!(good.unwrap(), vec![1], "the refused batch took no seq");
    assert_eq!(ledger.balance("ok").unwrap().spent_micros, 5);
    assert_eq!(records(&ledger).len(), 1);
    assert!(verify(&store.tree("ledger").unwrap()).is_ok());
}

#[tokio::test]
async fn a_failed_flush_refuses_the_round_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, _) = open(dir.path());
    ledger
        .submit(vec![
            Op::Audit(request(1, "ak_1", None, "m")),
            Op::Charge(vec![charge("k", 10, 1)]),
            Op::OpenReservation(reservation(1, vec![charge("k", 100, 10)])),
        ])
        .await
        .unwrap();
    ledger.fail_next_flush();
    let failed = ledger
        .submit(vec![
            Op::Audit(request(2, "ak_1", None, "m")),
            Op::Charge(vec![charge("k", 10, 1)]),
            Op::CloseReservation {
                id: 1,
                actual: vec![charge("k", 50, 5)],
            },
            Op::Usage {
                key: usage_key("2026-11-03", "m"),
                delta: counters(1, 1),
            },
        ])
        .await;
    assert!(matches!(failed, Err(LedgerError::Store(_))), "{failed:?}");
    // Everything the failed round touched is as it was.
    assert_eq!(ledger.balance("k").unwrap().spent_micros, 10);
    assert_eq!(ledger.open_reservations().unwrap().len(), 1);
    assert!(ledger.usage("2026-11-03", "2026-11-03").unwrap().is_empty());
    assert_eq!(records(&ledger).len(), 1);
    // And the next round continues from the durable head.
    let seqs = ledger
        .submit(vec![Op::Audit(request(3, "ak_1", None, "m"))])
        .await
        .unwrap();
    assert_eq!(seqs, vec![2]);
    assert!(verify(&store.tree("ledger").unwrap()).is_ok());
}

#[test]
fn reservation_ids_are_unique_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = HashSet::new();
    let mut last = 0;
    for _ in 0..3 {
        let (_store, ledger, _) = open(dir.path());
        // Crosses several 1024-id blocks, from several threads.
        let ids: Vec<u64> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let ledger = ledger.clone();
                    s.spawn(move || {
                        (0..700)
                            .map(|_| ledger.next_reservation_id())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert!(ids.iter().all(|id| *id > last), "a restart never goes back");
        for id in &ids {
            assert!(seen.insert(*id), "id {id} handed out twice");
        }
        last = *ids.iter().max().unwrap();
    }
    assert_eq!(seen.len(), 3 * 4 * 700);
}

#[tokio::test]
async fn dropping_the_last_handle_finishes_queued_work() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_store, ledger, _) = open(dir.path());
        for i in 0..50 {
            // Queued and never awaited.
            drop(ledger.submit(vec![Op::Audit(request(i, "ak_1", None, "m"))]));
        }
    }
    let (_store, ledger, recovered) = open(dir.path());
    assert_eq!(recovered.last_seq, 50);
    assert_eq!(records(&ledger).len(), 50);
}

#[test]
fn a_batch_larger_than_max_batch_commits_whole() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LedgerOptions {
        max_batch: 4,
        ..LedgerOptions::default()
    };
    let (_store, ledger, _) = open_with(dir.path(), opts);
    let ops = (0..10)
        .map(|i| Op::Audit(request(i, "ak_1", None, "m")))
        .collect();
    assert_eq!(
        ledger.submit_blocking(ops).unwrap(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        ledger.submit_blocking(Vec::new()).unwrap(),
        Vec::<u64>::new()
    );
}

#[test]
fn reservations_opened_together_close_one_by_one_and_the_rest_recover_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let held = |i: u64| vec![charge("team:t_1|monthly|2026-11", 1_000 * i, 100 * i)];
    let ids = {
        let (_store, ledger, _) = open(dir.path());
        let ids: Vec<u64> = (0..4).map(|_| ledger.next_reservation_id()).collect();
        // One round: the four become one stored group.
        ledger
            .submit_blocking(
                ids.iter()
                    .zip(1..)
                    .map(|(&id, i)| Op::OpenReservation(reservation(id, held(i))))
                    .collect(),
            )
            .unwrap();
        assert_eq!(ledger.tree().scan_prefix(b"r/").count(), 1);
        // Two close in later rounds, one of them together with a new opening.
        ledger
            .submit_blocking(vec![Op::CloseReservation {
                id: ids[0],
                actual: vec![charge("team:t_1|monthly|2026-11", 7, 1)],
            }])
            .unwrap();
        let late = ledger.next_reservation_id();
        ledger
            .submit_blocking(vec![
                Op::CloseReservation {
                    id: ids[2],
                    actual: vec![charge("team:t_1|monthly|2026-11", 5, 1)],
                },
                Op::OpenReservation(reservation(late, held(10))),
                Op::CloseReservation {
                    id: late,
                    actual: vec![charge("team:t_1|monthly|2026-11", 3, 1)],
                },
            ])
            .unwrap();
        // Closing one twice charges it once.
        ledger
            .submit_blocking(vec![Op::CloseReservation {
                id: ids[0],
                actual: vec![charge("team:t_1|monthly|2026-11", 1_000_000, 1)],
            }])
            .unwrap();
        let mut open: Vec<u64> = ledger
            .open_reservations()
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        open.sort_unstable();
        assert_eq!(open, vec![ids[1], ids[3]]);
        ids
        // Dropped with two still open: what a crash leaves.
    };
    let (_store, ledger, recovered) = open(dir.path());
    let mut got: Vec<u64> = recovered.reservations.iter().map(|r| r.id).collect();
    got.sort_unstable();
    assert_eq!(got, vec![ids[1], ids[3]]);
    // Settled: 7 + 5 + 3; recovered in full: 2,000 + 4,000.
    assert_eq!(
        ledger.balance("team:t_1|monthly|2026-11").unwrap(),
        BudgetBalance {
            spent_micros: 7 + 5 + 3 + 2_000 + 4_000,
            spent_tokens: 3 + 200 + 400
        }
    );
    assert!(ledger.open_reservations().unwrap().is_empty());
    assert_eq!(ledger.tree().scan_prefix(b"r/").count(), 0);
}

#[test]
fn a_reservation_stored_alone_by_an_older_version_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let held = vec![charge("key:ak_1|total|0", 900, 9)];
    {
        let store = open_store(dir.path());
        let tree = store.tree("ledger").unwrap();
        tree.insert(
            super::keys::reservation(77),
            serde_json::to_vec(&reservation(77, held.clone())).unwrap(),
        )
        .unwrap();
        tree.flush().unwrap();
    }
    let (_store, ledger, recovered) = open(dir.path());
    assert_eq!(recovered.reservations, vec![reservation(77, held)]);
    assert_eq!(
        ledger.balance("key:ak_1|total|0").unwrap().spent_micros,
        900
    );
}

fn hold(key: &str, micros: u64, tokens: u64, version: u64) -> Op {
    Op::Hold {
        budget_key: key.into(),
        micros,
        tokens,
        version,
    }
}

#[test]
fn a_hold_keeps_its_highest_version_and_adds_nothing_to_the_balance() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, _) = open(dir.path());
    let k = "team:t_1|daily|2026-11-03";
    ledger.submit_blocking(vec![hold(k, 900, 90, 2)]).unwrap();
    // An older version submitted late (a settlement's lowering) changes nothing...
    ledger.submit_blocking(vec![hold(k, 100, 10, 1)]).unwrap();
    // ...a newer one replaces it, also in the same batch as a charge.
    ledger
        .submit_blocking(vec![
            Op::Charge(vec![charge(k, 50, 5)]),
            hold(k, 300, 30, 3),
            hold(k, 999, 99, 2),
        ])
        .unwrap();
    let tree = store.tree("ledger").unwrap();
    let stored: StoredHold =
        serde_json::from_slice(&tree.get(keys::hold(k)).unwrap().unwrap()).unwrap();
    assert_eq!(
        stored,
        StoredHold {
            micros: 300,
            tokens: 30,
            version: 3
        }
    );
    assert_eq!(
        ledger.balance(k).unwrap(),
        BudgetBalance {
            spent_micros: 50,
            spent_tokens: 5
        }
    );
}

#[test]
fn holds_found_at_start_are_charged_in_full_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = ("team:t_1|monthly|2026-11", "key:ak_1|total|total");
    {
        let (_store, ledger, _) = open(dir.path());
        ledger
            .submit_blocking(vec![
                Op::Charge(vec![charge(k1, 10, 1)]),
                hold(k1, 5_000, 500, 4),
                hold(k2, 0, 0, 7),
            ])
            .unwrap();
        // Dropped with the holds in place: what a crash leaves.
    }
    let (store, ledger, recovered) = open(dir.path());
    assert_eq!(recovered.holds, vec![charge(k1, 5_000, 500)]);
    assert_eq!(
        ledger.balance(k1).unwrap(),
        BudgetBalance {
            spent_micros: 5_010,
            spent_tokens: 501
        }
    );
    assert_eq!(ledger.balance(k2).unwrap(), BudgetBalance::default());
    let tree = store.tree("ledger").unwrap();
    assert_eq!(
        tree.scan_prefix(keys::HOLD).count(),
        0,
        "every hold removed"
    );
    let recs = records(&ledger);
    assert_eq!(
        recs.last().unwrap().event,
        AuditEvent::HoldRecovered {
            hold: charge(k1, 5_000, 500)
        }
    );
    assert!(verify(&tree).is_ok());
    drop((tree, ledger, store));
    // Charged once: a second start finds nothing.
    let (_store, ledger, recovered) = open(dir.path());
    assert!(recovered.holds.is_empty());
    assert_eq!(ledger.balance(k1).unwrap().spent_micros, 5_010);
}
