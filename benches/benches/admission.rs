//! The admission path of a request without I/O, for a principal with limits at key,
//! team and org level: the rate limiter (rpm, tpm, parallel: admit + finish) and the
//! budgets (money and token quota: reserve against the in-memory journal + settle, the
//! settlement's ops applied to that journal as the ledger would). Single-threaded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a broken fixture should stop it

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use airlock::governance::budget::{Budgets, MemoryJournal};
use airlock::governance::limits::Limiter;
use airlock::governance::model::{Limits, Period, Principal, Role, Scope};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::executor::block_on;

/// 2026-11-30T12:00:00Z.
const NOW_MS: i64 = 1_796_040_000_000;

/// Limits that never refuse over a benchmark's run but are all checked.
fn limits(period: Period) -> Limits {
    Limits {
        rpm_limit: Some(u32::MAX),
        tpm_limit: Some(u64::MAX / 4),
        max_parallel_requests: Some(1000),
        max_budget_micros: Some(u64::MAX / 4),
        token_quota: Some(u64::MAX / 4),
        budget_duration: period,
        soft_budget_micros: None,
    }
}

fn principal() -> Principal {
    Principal {
        key_id: "ak_bench".into(),
        org_id: "org_1".into(),
        team_id: Some("team_1".into()),
        user_id: None,
        role: Role::Member,
        allow: Vec::new(),
        limits: vec![
            (Scope::Key("ak_bench".into()), limits(Period::Daily)),
            (Scope::Team("team_1".into()), limits(Period::Monthly)),
            (Scope::Org("org_1".into()), limits(Period::Total)),
        ],
        log_content: false,
    }
}

fn admission(c: &mut Criterion) {
    let p = principal();
    let limiter = Limiter::new();
    let journal = Arc::new(MemoryJournal::new());
    let budgets = Budgets::load(journal.clone(), Vec::new());

    let mut g = c.benchmark_group("admission_3_levels");
    g.throughput(Throughput::Elements(1));
    g.bench_function("limiter_admit_finish", |b| {
        b.iter(|| {
            let guard = limiter.admit(black_box(&p), Instant::now(), 1456).unwrap();
            guard.finish(black_box(1200));
        })
    });
    g.bench_function("budget_reserve_settle", |b| {
        b.iter(|| {
            let h = block_on(budgets.reserve(black_box(&p), 3000, 1456, NOW_MS)).unwrap();
            let s = h.settle(black_box(1500), 1200);
            journal.apply(&s.ops).unwrap();
        })
    });
    g.bench_function("limiter_and_budget", |b| {
        b.iter(|| {
            let guard = limiter.admit(black_box(&p), Instant::now(), 1456).unwrap();
            let h = block_on(budgets.reserve(black_box(&p), 3000, 1456, NOW_MS)).unwrap();
            let s = h.settle(black_box(1500), 1200);
            journal.apply(&s.ops).unwrap();
            guard.finish(1200);
        })
    });
    g.finish();
    assert!(journal.holds().len() <= 3, "holds stay within the headroom");
}

criterion_group!(benches, admission);
criterion_main!(benches);
