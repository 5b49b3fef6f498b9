//! Ledger throughput: concurrent submitters, each submitting one request's worth of ops
//! (close its reservation, append its audit record, add its usage), on a real sled store
//! in a temporary directory. Every submit waits until durable (group commit: one
//! `apply_batch` + `flush` per round), so this measures what the fsync rate allows.
//! Throughput is in ops (3 per request); the reservations closed are opened beforehand,
//! outside the timed part.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a broken fixture should stop it

use std::time::{Duration, Instant};

use airlock::ledger::{
    AuditEvent, Charge, Ledger, LedgerOptions, Op, RequestAudit, Reservation, UsageCounters,
    UsageKey,
};
use airlock::store::Store;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const OPS_PER_REQUEST: u64 = 3;

fn charges(micros: u64, tokens: u64) -> Vec<Charge> {
    [
        "key:ak_bench|total|0",
        "team:t_bench|monthly|2026-11",
        "org:o_bench|monthly|2026-11",
    ]
    .iter()
    .map(|k| Charge {
        budget_key: (*k).to_owned(),
        micros,
        tokens,
    })
    .collect()
}

fn request_ops(id: u64) -> Vec<Op> {
    let audit = RequestAudit {
        request_id: format!("req_{id:016x}"),
        key_id: "ak_bench".into(),
        user_id: Some("u_bench".into()),
        team_id: Some("t_bench".into()),
        org_id: "o_bench".into(),
        route: "/v1/chat/completions".into(),
        model: "smart".into(),
        target: Some("openai/gpt-4o-mini".into()),
        attempts: 1,
        prompt_tokens: 61,
        completion_tokens: 12,
        cost_micros: 17,
        latency_ms: 230,
        status: 200,
        error_code: None,
        routing: Some("priority: openai/gpt-4o-mini".into()),
        policy: vec![
            "allow:openai/*".into(),
            "budget:team:t_bench reserved 1200".into(),
        ],
        content: None,
    };
    let usage = UsageKey {
        day: "2026-11-25".into(),
        key_id: "ak_bench".into(),
        user_id: Some("u_bench".into()),
        team_id: Some("t_bench".into()),
        org_id: "o_bench".into(),
        model: "smart".into(),
        target: Some(format!("openai/gpt-4o-mini-{}", id % 4)),
    };
    vec![
        Op::CloseReservation {
            id,
            actual: charges(17, 73),
        },
        Op::Audit(AuditEvent::Request(audit)),
        Op::Usage {
            key: usage,
            delta: UsageCounters {
                requests: 1,
                errors: 0,
                prompt_tokens: 61,
                completion_tokens: 12,
                cost_micros: 17,
                latency_ms_sum: 230,
            },
        },
    ]
}

fn ledger_throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (ledger, _) = Ledger::open(&store, LedgerOptions::default()).unwrap();

    let mut g = c.benchmark_group("ledger_submit");
    for submitters in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(submitters * OPS_PER_REQUEST));
        g.bench_with_input(
            BenchmarkId::new("concurrent_requests", submitters),
            &submitters,
            |b, &n| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut timed = Duration::ZERO;
                        for _ in 0..iters {
                            // Untimed: the reservations these requests will close.
                            let ids: Vec<u64> =
                                (0..n).map(|_| ledger.next_reservation_id()).collect();
                            let open = ids
                                .iter()
                                .map(|&id| {
                                    Op::OpenReservation(Reservation {
                                        id,
                                        request_id: format!("req_{id:016x}"),
                                        key_id: "ak_bench".into(),
                                        charges: charges(1_200, 4_096),
                                        opened_at: 1_764_000_000_000,
                                    })
                                })
                                .collect();
                            ledger.submit(open).await.unwrap();

                            let start = Instant::now();
                            let tasks: Vec<_> = ids
                                .into_iter()
                                .map(|id| {
                                    let ledger = ledger.clone();
                                    tokio::spawn(
                                        async move { ledger.submit(request_ops(id)).await },
                                    )
                                })
                                .collect();
                            for t in tasks {
                                t.await.unwrap().unwrap();
                            }
                            timed += start.elapsed();
                        }
                        timed
                    })
                })
            },
        );
    }
    g.finish();
    eprintln!(
        "ledger: {} durable rounds committed during the run",
        ledger.rounds()
    );
}

criterion_group!(benches, ledger_throughput);
criterion_main!(benches);
