//! Phase two for routing: `[routing]` defaults and `[[models]]` (virtual models with
//! their targets, strategy and failure policy).
//!
//! Invariants of the validated types: every target names a configured provider; weights
//! are positive; a target's caps (`rpm`, `tpm`, `max_parallel`) are set in at most one
//! place, because they describe the upstream, which several models may share; fallback
//! lists name configured models or direct `provider/model` targets, never the model
//! itself.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

use super::{seconds, Problems, TargetRef};

/// How a virtual model orders its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Config order; the first healthy target wins.
    Priority,
    /// Random by weight among healthy targets.
    Weighted,
    /// Cheapest expected cost first (catalog prices).
    Cost,
    /// Lowest observed latency first (EWMA; time to first token for streams).
    Latency,
    /// One score over cost, latency, health and queue wait.
    Hybrid,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::Weighted => "weighted",
            Strategy::Cost => "cost",
            Strategy::Latency => "latency",
            Strategy::Hybrid => "hybrid",
        }
    }

    fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "priority" => Strategy::Priority,
            "weighted" | "simple-shuffle" => Strategy::Weighted,
            "cost" | "cost-based-routing" => Strategy::Cost,
            "latency" | "latency-based-routing" => Strategy::Latency,
            "hybrid" => Strategy::Hybrid,
            _ => return None,
        })
    }
}

/// Weights of the hybrid score's terms (each term is normalized to 0..1 first).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HybridWeights {
    pub cost: f64,
    pub latency: f64,
    pub health: f64,
    pub queue: f64,
}

impl Default for HybridWeights {
    fn default() -> Self {
        HybridWeights {
            cost: 1.0,
            latency: 1.0,
            health: 2.0,
            queue: 1.0,
        }
    }
}

/// One target of a virtual model.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    pub target: TargetRef,
    pub weight: f64,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_parallel: Option<u32>,
}

/// Retries, deadlines and fallbacks of one virtual model.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    /// Extra attempts on the same target after a retryable failure.
    pub num_retries: u32,
    /// Base of the exponential backoff between retries (full jitter).
    pub retry_backoff: Duration,
    /// Deadline for the whole request across all attempts.
    pub timeout: Option<Duration>,
    /// For streams: the first chunk must arrive within this, or the next target is tried.
    pub ttft_timeout: Option<Duration>,
    pub fallbacks: Vec<String>,
    pub context_window_fallbacks: Vec<String>,
    pub content_policy_fallbacks: Vec<String>,
    /// Hybrid and local-first: targets predicted slower than this are avoided.
    pub max_latency: Option<Duration>,
    pub weights: HybridWeights,
    /// Local targets first; external ones only while the local queue would break
    /// `max_latency`.
    pub local_first: bool,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub strategy: Strategy,
    pub targets: Vec<TargetConfig>,
    pub policy: RoutePolicy,
}

/// `[routing]`: defaults for every model, and the circuit-breaker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingDefaults {
    pub num_retries: u32,
    pub retry_backoff: Duration,
    pub timeout: Option<Duration>,
    pub ttft_timeout: Option<Duration>,
    pub consecutive_failures: u32,
    pub error_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub cooldown: Duration,
    pub rate_limit_cooldown: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub num_retries: Option<u32>,
    /// Seconds.
    pub retry_backoff: Option<f64>,
    /// Seconds.
    pub timeout: Option<f64>,
    /// Seconds.
    pub ttft_timeout: Option<f64>,
    pub consecutive_failures: Option<u32>,
    pub error_rate: Option<f64>,
    pub min_requests: Option<u32>,
    /// Seconds.
    pub window: Option<f64>,
    /// Seconds.
    pub cooldown: Option<f64>,
    /// Seconds.
    pub rate_limit_cooldown: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: Option<String>,
    pub strategy: Option<String>,
    /// Each a `"provider/model"` string or a table `{ target, weight, rpm, tpm, max_parallel }`.
    pub targets: Option<Vec<toml::Value>>,
    pub num_retries: Option<u32>,
    pub retry_backoff: Option<f64>,
    pub timeout: Option<f64>,
    pub ttft_timeout: Option<f64>,
    pub fallbacks: Option<Vec<String>>,
    pub context_window_fallbacks: Option<Vec<String>>,
    pub content_policy_fallbacks: Option<Vec<String>>,
    pub max_latency_ms: Option<f64>,
    pub weights: Option<RawWeights>,
    pub local_first: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeights {
    pub cost: Option<f64>,
    pub latency: Option<f64>,
    pub health: Option<f64>,
    pub queue: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetTable {
    target: String,
    weight: Option<f64>,
    rpm: Option<u32>,
    tpm: Option<u64>,
    max_parallel: Option<u32>,
}

fn optional_seconds(
    v: Option<f64>,
    default: Option<Duration>,
    path: &str,
    p: &mut Problems,
) -> Option<Duration> {
    match v {
        None => default,
        Some(_) => Some(seconds(v, Duration::ZERO, path, p)),
    }
}

pub(super) fn routing_defaults(raw: RawRouting, p: &mut Problems) -> RoutingDefaults {
    let error_rate = raw.error_rate.unwrap_or(0.5);
    if !(error_rate > 0.0 && error_rate <= 1.0) {
        p.add(
            "routing.error_rate",
            format_args!("{error_rate} is not a fraction in (0, 1]"),
        );
    }
    let at_least_one = |v: Option<u32>, d: u32, path: &str, p: &mut Problems| match v {
        Some(0) => {
            p.add(path, "0 is not allowed; it must be at least 1");
            d
        }
        Some(n) => n,
        None => d,
    };
    RoutingDefaults {
        num_retries: raw.num_retries.unwrap_or(0),
        retry_backoff: seconds(
            raw.retry_backoff,
            Duration::from_millis(250),
            "routing.retry_backoff",
            p,
        ),
        timeout: optional_seconds(raw.timeout, None, "routing.timeout", p),
        ttft_timeout: optional_seconds(raw.ttft_timeout, None, "routing.ttft_timeout", p),
        consecutive_failures: at_least_one(
            raw.consecutive_failures,
            5,
            "routing.consecutive_failures",
            p,
        ),
        error_rate,
        min_requests: at_least_one(raw.min_requests, 20, "routing.min_requests", p),
        window: seconds(raw.window, Duration::from_secs(60), "routing.window", p),
        cooldown: seconds(raw.cooldown, Duration::from_secs(30), "routing.cooldown", p),
        rate_limit_cooldown: seconds(
            raw.rate_limit_cooldown,
            Duration::from_secs(10),
            "routing.rate_limit_cooldown",
            p,
        ),
    }
}

fn target(
    v: &toml::Value,
    path: &str,
    providers: &HashSet<&str>,
    p: &mut Problems,
) -> Option<TargetConfig> {
    let table = match v {
        toml::Value::String(s) => RawTargetTable {
            target: s.clone(),
            weight: None,
            rpm: None,
            tpm: None,
            max_parallel: None,
        },
        toml::Value::Table(_) => match v.clone().try_into::<RawTargetTable>() {
            Ok(t) => t,
            Err(e) => {
                p.add(path, e.to_string().trim_end());
                return None;
            }
        },
        other => {
            p.add(
                path,
                format_args!(
                    "expected \"provider/model\" or {{ target = \"provider/model\", weight = .. }}, got {}",
                    other.type_str()
                ),
            );
            return None;
        }
    };
    let t = &table.target;
    let tr = match TargetRef::parse(t) {
        None => {
            p.add(
                path,
                format_args!("{t:?} is not of the form \"provider/model\""),
            );
            return None;
        }
        Some(tr) if !providers.contains(tr.provider.as_str()) => {
            p.add(
                path,
                format_args!(
                    "{t:?} names provider {:?}, which is not configured",
                    tr.provider
                ),
            );
            return None;
        }
        Some(tr) => tr,
    };
    let weight = table.weight.unwrap_or(1.0);
    if !(weight.is_finite() && weight > 0.0) {
        p.add(
            &format!("{path}.weight"),
            format_args!("{weight} must be a positive number"),
        );
    }
    for (name, v) in [
        ("rpm", table.rpm.map(u64::from)),
        ("tpm", table.tpm),
        ("max_parallel", table.max_parallel.map(u64::from)),
    ] {
        if v == Some(0) {
            p.add(
                &format!("{path}.{name}"),
                "0 is not allowed; leave it out for no cap",
            );
        }
    }
    Some(TargetConfig {
        target: tr,
        weight,
        rpm: table.rpm,
        tpm: table.tpm,
        max_parallel: table.max_parallel,
    })
}

/// Validates `[[models]]` against the providers and the routing defaults.
pub(super) fn models(
    raw: Vec<RawModel>,
    providers: &HashSet<&str>,
    d: &RoutingDefaults,
    p: &mut Problems,
) -> Vec<ModelConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut caps_at: HashMap<String, String> = HashMap::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("models[{i}].{f}");
        let Some(name) = r.name else {
            p.add(&at("name"), "is required");
            continue;
        };
        if name.trim().is_empty() || name.len() > 256 {
            p.add(
                &at("name"),
                format_args!("{name:?} must be 1-256 characters"),
            );
        } else if !seen.insert(name.clone()) {
            p.add(&at("name"), format_args!("{name:?} is defined twice"));
        }
        let strategy = match r.strategy.as_deref() {
            None => Strategy::Priority,
            Some(s) => Strategy::parse(s).unwrap_or_else(|| {
                p.add(
                    &at("strategy"),
                    format_args!("{s:?} is not one of \"priority\", \"weighted\", \"cost\", \"latency\", \"hybrid\""),
                );
                Strategy::Priority
            }),
        };
        let targets_raw = r.targets.unwrap_or_default();
        if targets_raw.is_empty() {
            p.add(&at("targets"), "needs at least one \"provider/model\"");
        }
        let mut targets = Vec::new();
        for (j, v) in targets_raw.iter().enumerate() {
            let path = at(&format!("targets[{j}]"));
            if let Some(t) = target(v, &path, providers, p) {
                if t.rpm.is_some() || t.tpm.is_some() || t.max_parallel.is_some() {
                    let label = t.target.to_string();
                    if let Some(first) = caps_at.get(&label) {
                        p.add(
                            &path,
                            format_args!("caps for {label:?} are already set at {first}; set a target's caps once"),
                        );
                    } else {
                        caps_at.insert(label, path.clone());
                    }
                }
                if targets.iter().any(|x: &TargetConfig| x.target == t.target) {
                    p.add(
                        &path,
                        format_args!("{:?} is listed twice", t.target.to_string()),
                    );
                }
                targets.push(t);
            }
        }
        let w = r.weights.unwrap_or_default();
        let dw = HybridWeights::default();
        let weights = HybridWeights {
            cost: w.cost.unwrap_or(dw.cost),
            latency: w.latency.unwrap_or(dw.latency),
            health: w.health.unwrap_or(dw.health),
            queue: w.queue.unwrap_or(dw.queue),
        };
        for (k, v) in [
            ("cost", weights.cost),
            ("latency", weights.latency),
            ("health", weights.health),
            ("queue", weights.queue),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                p.add(
                    &at(&format!("weights.{k}")),
                    format_args!("{v} must be a number >= 0"),
                );
            }
        }
        let max_latency = match r.max_latency_ms {
            None => None,
            Some(ms) if ms.is_finite() && ms > 0.0 => Some(Duration::from_secs_f64(ms / 1000.0)),
            Some(ms) => {
                p.add(
                    &at("max_latency_ms"),
                    format_args!("{ms} must be a positive number of milliseconds"),
                );
                None
            }
        };
        let local_first = r.local_first.unwrap_or(false);
        if local_first
            && !targets
                .iter()
                .any(|t: &TargetConfig| t.target.provider == "local")
        {
            p.add(&at("local_first"), "needs at least one local/... target");
        }
        out.push(ModelConfig {
            name,
            strategy,
            targets,
            policy: RoutePolicy {
                num_retries: r.num_retries.unwrap_or(d.num_retries),
                retry_backoff: r
                    .retry_backoff
                    .map(|_| seconds(r.retry_backoff, d.retry_backoff, &at("retry_backoff"), p))
                    .unwrap_or(d.retry_backoff),
                timeout: optional_seconds(r.timeout, d.timeout, &at("timeout"), p),
                ttft_timeout: optional_seconds(
                    r.ttft_timeout,
                    d.ttft_timeout,
                    &at("ttft_timeout"),
                    p,
                ),
                fallbacks: r.fallbacks.unwrap_or_default(),
                context_window_fallbacks: r.context_window_fallbacks.unwrap_or_default(),
                content_policy_fallbacks: r.content_policy_fallbacks.unwrap_or_default(),
                max_latency,
                weights,
                local_first,
            },
        });
    }
    // Fallbacks may name models defined later, so they are checked once all are known.
    let names: HashSet<String> = out.iter().map(|m| m.name.clone()).collect();
    for (i, m) in out.iter().enumerate() {
        for (field, list) in [
            ("fallbacks", &m.policy.fallbacks),
            (
                "context_window_fallbacks",
                &m.policy.context_window_fallbacks,
            ),
            (
                "content_policy_fallbacks",
                &m.policy.content_policy_fallbacks,
            ),
        ] {
            for (j, f) in list.iter().enumerate() {
                let path = format!("models[{i}].{field}[{j}]");
                if *f == m.name {
                    p.add(&path, format_args!("{f:?} is the model itself"));
                } else if !names.contains(f)
                    && !TargetRef::parse(f).is_some_and(|t| providers.contains(t.provider.as_str()))
                {
                    p.add(
                        &path,
                        format_args!(
                            "{f:?} is neither a configured model nor a provider/model target"
                        ),
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, SecretPolicy, Strategy};
    use std::time::Duration;

    const PROVIDERS: &str = r#"
[[providers]]
name = "a"
kind = "openai"
[[providers]]
name = "b"
kind = "anthropic"
"#;

    fn parse(models: &str) -> Result<Config, Vec<String>> {
        Config::parse(
            &format!("{PROVIDERS}\n{models}"),
            &[("X", "y")],
            SecretPolicy::Ignore,
        )
        .map_err(|e| e.problems)
    }

    #[test]
    fn targets_take_strings_or_tables_and_policies_inherit_defaults() {
        let cfg = parse(
            r#"
[routing]
num_retries = 2
ttft_timeout = 3
cooldown = 5

[[models]]
name = "smart"
strategy = "weighted"
targets = ["a/gpt-4o", { target = "b/claude-sonnet-4-5", weight = 3, rpm = 60, max_parallel = 4 }]
fallbacks = ["cheap"]
timeout = 20

[[models]]
name = "cheap"
strategy = "cost"
targets = ["a/gpt-4o-mini"]
num_retries = 0
"#,
        )
        .unwrap();
        let smart = &cfg.models[0];
        assert_eq!(smart.strategy, Strategy::Weighted);
        assert_eq!(smart.targets[1].weight, 3.0);
        assert_eq!(smart.targets[1].rpm, Some(60));
        assert_eq!(smart.targets[1].max_parallel, Some(4));
        assert_eq!(smart.policy.num_retries, 2);
        assert_eq!(smart.policy.ttft_timeout, Some(Duration::from_secs(3)));
        assert_eq!(smart.policy.timeout, Some(Duration::from_secs(20)));
        assert_eq!(smart.policy.fallbacks, vec!["cheap"]);
        assert_eq!(cfg.models[1].policy.num_retries, 0);
        assert_eq!(cfg.routing.cooldown, Duration::from_secs(5));
        assert_eq!(cfg.routing.consecutive_failures, 5);
    }

    #[test]
    fn routing_mistakes_are_named() {
        let problems = parse(
            r#"
[routing]
error_rate = 1.5

[[models]]
name = "m"
strategy = "fastest"
targets = [{ target = "a/x", weight = -1, rpm = 0 }, { target = "a/y", colour = "red" }, 7]
fallbacks = ["m", "nowhere"]

[[models]]
name = "n"
targets = [{ target = "a/x", rpm = 10 }]
"#,
        )
        .unwrap_err()
        .join("\n");
        for needle in [
            "routing.error_rate: 1.5",
            "models[0].strategy: \"fastest\"",
            "models[0].targets[0].weight: -1",
            "models[0].targets[0].rpm: 0 is not allowed",
            "models[0].targets[1]: unknown field `colour`",
            "models[0].targets[2]: expected \"provider/model\"",
            "models[0].fallbacks[0]: \"m\" is the model itself",
            "models[0].fallbacks[1]: \"nowhere\" is neither",
            "models[1].targets[0]: caps for \"a/x\" are already set at models[0].targets[0]",
        ] {
            assert!(
                problems.contains(needle),
                "missing {needle:?} in\n{problems}"
            );
        }
    }
}
