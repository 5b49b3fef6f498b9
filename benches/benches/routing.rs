//! The routing decision for a route of five targets, per strategy: resolving the model
//! name, gathering each target's health and price, ranking, and building the
//! `x-airlock-route` text. The bar (issue "Routing"): under 10 microseconds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a broken fixture should stop it

use std::hint::black_box;
use std::time::Instant;

use airlock::routing::RequestFacts;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn routing_decision(c: &mut Criterion) {
    let routes = airlock_benches::five_target_routes().unwrap();
    let facts = RequestFacts {
        prompt_tokens: 1200,
        output_cap: Some(256),
        stream: false,
        fallbacks: Vec::new(),
        filter: None,
    };
    // Give latency-aware strategies something to rank.
    for route in ["latency", "hybrid"] {
        let r = routes.resolve(route).unwrap();
        for (i, (t, _)) in r.targets.iter().enumerate() {
            let p = t.health.admit(Instant::now(), 0).unwrap();
            let ms = 50 + 40 * i as u64;
            t.health.success(
                p,
                Instant::now(),
                std::time::Duration::from_millis(ms),
                None,
                None,
            );
        }
    }
    let mut g = c.benchmark_group("routing_decision_5_targets");
    g.throughput(Throughput::Elements(1));
    for strategy in ["priority", "weighted", "cost", "latency", "hybrid"] {
        g.bench_function(strategy, |b| {
            b.iter(|| {
                let route = routes.resolve(black_box(strategy)).unwrap();
                black_box(routes.rank(&route, black_box(&facts)))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, routing_decision);
criterion_main!(benches);
