//! Ordering a virtual model's targets by its strategy. Pure: the caller gathers each
//! candidate's facts (weight, expected cost, observed latency, health) and gets back
//! the order to try them in, with a score per candidate for `x-airlock-route`.
//!
//! Invariants: every candidate appears exactly once in the result; candidates that are
//! unavailable right now (open circuit, cooldown, saturated caps) come after every
//! available one, in their strategy order, so they are tried only if nothing else
//! works; ties keep config order, so results are deterministic except for `weighted`.

use std::cmp::Ordering;
use std::time::Duration;

use crate::config::{HybridWeights, Strategy};

/// What the strategy knows about one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub weight: f64,
    /// Expected cost of this request in USD; `None` when the catalog has no price.
    pub cost: Option<f64>,
    /// Observed latency (time to first token for streams); `None` before any sample.
    pub latency: Option<Duration>,
    /// Recent error rate, 0..1.
    pub error_rate: f64,
    /// Predicted queue wait (local targets); `None` for external targets.
    pub queue_wait: Option<Duration>,
    pub available: bool,
}

/// The order to try candidates in (indices into the input) and each one's score.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    pub order: Vec<usize>,
    /// Per input index: the number the strategy sorted by (lower is better), if any.
    pub scores: Vec<Option<f64>>,
}

/// Ranks candidates. `unit` is a uniform random draw in (0, 1] per call, injected so
/// tests are deterministic (`weighted` uses it).
pub fn rank(
    strategy: Strategy,
    facts: &[Facts],
    weights: &HybridWeights,
    max_latency: Option<Duration>,
    unit: &mut dyn FnMut() -> f64,
) -> Ranking {
    let scores: Vec<Option<f64>> = match strategy {
        Strategy::Priority => facts.iter().map(|_| None).collect(),
        // Efraimidis-Spirakis: key u^(1/w), larger first; stored negated so lower is better.
        Strategy::Weighted => facts
            .iter()
            .map(|f| Some(-unit().powf(1.0 / f.weight.max(f64::MIN_POSITIVE))))
            .collect(),
        Strategy::Cost => facts.iter().map(|f| f.cost).collect(),
        // Unmeasured targets rank first so they get measured.
        Strategy::Latency => facts
            .iter()
            .map(|f| Some(f.latency.map_or(0.0, |d| d.as_secs_f64() * 1000.0)))
            .collect(),
        Strategy::Hybrid => hybrid(facts, weights, max_latency),
    };
    let mut order: Vec<usize> = (0..facts.len()).collect();
    order.sort_by(|&a, &b| {
        let avail = facts[b].available.cmp(&facts[a].available);
        avail
            .then_with(|| compare(scores[a], scores[b]))
            .then(a.cmp(&b))
    });
    Ranking { order, scores }
}

/// Known scores ascending, unknown ones after them.
fn compare(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// Each term normalized by the largest value among candidates (so 0..1), then weighted:
/// cost, latency, error rate, and queue wait. A candidate whose predicted latency
/// (observed latency plus queue wait) exceeds `max_latency` gets a penalty larger than
/// any sum of terms, so it is used only when every candidate breaks the budget.
fn hybrid(facts: &[Facts], w: &HybridWeights, max_latency: Option<Duration>) -> Vec<Option<f64>> {
    let max_of = |f: &dyn Fn(&Facts) -> f64| facts.iter().map(f).fold(0.0_f64, f64::max);
    let cost = |f: &Facts| f.cost.unwrap_or(0.0);
    let latency = |f: &Facts| f.latency.map_or(0.0, |d| d.as_secs_f64());
    let queue = |f: &Facts| f.queue_wait.map_or(0.0, |d| d.as_secs_f64());
    let (max_cost, max_latency_seen, max_queue) = (max_of(&cost), max_of(&latency), max_of(&queue));
    let norm = |v: f64, max: f64| if max > 0.0 { v / max } else { 0.0 };
    let penalty = 1.0 + w.cost + w.latency + w.health + w.queue;
    facts
        .iter()
        .map(|f| {
            let mut s = w.cost * norm(cost(f), max_cost)
                + w.latency * norm(latency(f), max_latency_seen)
                + w.health * f.error_rate
                + w.queue * norm(queue(f), max_queue);
            if let Some(budget) = max_latency {
                if latency(f) + queue(f) > budget.as_secs_f64() {
                    s += penalty;
                }
            }
            Some(s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(cost: Option<f64>, latency_ms: Option<u64>, available: bool) -> Facts {
        Facts {
            weight: 1.0,
            cost,
            latency: latency_ms.map(Duration::from_millis),
            error_rate: 0.0,
            queue_wait: None,
            available,
        }
    }

    fn order(strategy: Strategy, f: &[Facts]) -> Vec<usize> {
        let mut draws = [0.5, 0.5, 0.5, 0.5, 0.5].into_iter();
        rank(strategy, f, &HybridWeights::default(), None, &mut || {
            draws.next().unwrap_or(0.5)
        })
        .order
    }

    #[test]
    fn priority_keeps_config_order_but_puts_unavailable_last() {
        let f = [
            facts(None, None, false),
            facts(None, None, true),
            facts(None, None, true),
        ];
        assert_eq!(order(Strategy::Priority, &f), [1, 2, 0]);
    }

    #[test]
    fn cost_is_cheapest_first_with_unknown_prices_last() {
        let f = [
            facts(Some(0.003), None, true),
            facts(None, None, true),
            facts(Some(0.0001), None, true),
        ];
        assert_eq!(order(Strategy::Cost, &f), [2, 0, 1]);
        // An unavailable cheap target still comes after available ones.
        let f = [
            facts(Some(0.003), None, true),
            facts(Some(0.0001), None, false),
        ];
        assert_eq!(order(Strategy::Cost, &f), [0, 1]);
    }

    #[test]
    fn latency_is_fastest_first_and_explores_unmeasured_targets() {
        let f = [
            facts(None, Some(900), true),
            facts(None, Some(120), true),
            facts(None, None, true),
        ];
        assert_eq!(order(Strategy::Latency, &f), [2, 1, 0]);
    }

    #[test]
    fn weighted_follows_weights_in_proportion() {
        let f = [
            Facts {
                weight: 1.0,
                ..facts(None, None, true)
            },
            Facts {
                weight: 3.0,
                ..facts(None, None, true)
            },
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut unit = move || {
            // xorshift64*: a fixed-seed stream for a reproducible test.
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            ((seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
        };
        let firsts = (0..4000)
            .filter(|_| {
                rank(
                    Strategy::Weighted,
                    &f,
                    &HybridWeights::default(),
                    None,
                    &mut unit,
                )
                .order[0]
                    == 1
            })
            .count();
        // Expected 3000 of 4000; a broken sampler lands far outside this band.
        assert!(
            (2800..=3200).contains(&firsts),
            "weight-3 target first {firsts} times"
        );
    }

    #[test]
    fn hybrid_balances_cost_latency_and_health_within_the_budget() {
        // Cheap but slow and flaky vs pricier, fast and healthy.
        let cheap = Facts {
            error_rate: 0.5,
            ..facts(Some(0.0001), Some(2000), true)
        };
        let fast = facts(Some(0.0003), Some(200), true);
        let w = HybridWeights::default();
        let r = rank(
            Strategy::Hybrid,
            &[cheap.clone(), fast.clone()],
            &w,
            None,
            &mut || 0.5,
        );
        assert_eq!(r.order, [1, 0]);
        // With cost weighted heavily and health ignored, the cheap one wins.
        let w2 = HybridWeights {
            cost: 10.0,
            latency: 1.0,
            health: 0.0,
            queue: 0.0,
        };
        let r = rank(
            Strategy::Hybrid,
            &[cheap.clone(), fast.clone()],
            &w2,
            None,
            &mut || 0.5,
        );
        assert_eq!(r.order, [0, 1]);
        // A latency budget the cheap one breaks overrides the cost preference.
        let r = rank(
            Strategy::Hybrid,
            &[cheap, fast],
            &w2,
            Some(Duration::from_millis(500)),
            &mut || 0.5,
        );
        assert_eq!(r.order, [1, 0]);
    }

    #[test]
    fn hybrid_counts_queue_wait_of_local_targets() {
        let local_busy = Facts {
            queue_wait: Some(Duration::from_secs(3)),
            ..facts(Some(0.0), Some(100), true)
        };
        let external = facts(Some(0.0002), Some(400), true);
        let w = HybridWeights::default();
        let r = rank(
            Strategy::Hybrid,
            &[local_busy.clone(), external.clone()],
            &w,
            Some(Duration::from_secs(1)),
            &mut || 0.5,
        );
        assert_eq!(r.order, [1, 0], "a local queue over the budget spills over");
        let local_idle = Facts {
            queue_wait: Some(Duration::ZERO),
            ..local_busy
        };
        let r = rank(
            Strategy::Hybrid,
            &[local_idle, external],
            &w,
            Some(Duration::from_secs(1)),
            &mut || 0.5,
        );
        assert_eq!(r.order, [0, 1], "and comes back when it drains");
    }
}
