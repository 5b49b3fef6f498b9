//! Routing: from the model name a client sends to an ordered list of targets, and the
//! loop that tries them ([`execute`]).
//!
//! A name resolves, in this order, to: a configured (virtual) model with its strategy,
//! targets and policy; or a direct `provider/model` naming a configured provider, which
//! routes to that one target with the `[routing]` defaults. Anything else is
//! `model_not_found`.
//!
//! Invariants: a target (`provider/model`) has one [`TargetState`] however many models
//! use it, so its health, caps and latency are shared; direct targets get their state
//! on first use, up to [`MAX_DYNAMIC_TARGETS`] (past that they route untracked rather
//! than let clients grow memory without bound); the catalog is read-only after start.

pub mod catalog;
pub mod execute;
pub mod health;
pub mod strategy;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use catalog::{Catalog, ModelInfo};
use health::{BreakerConfig, Caps, TargetHealth};
use strategy::Facts;

pub use execute::{RequestFacts, Served, ServedBy};

use crate::config::{
    Config, ModelConfig, RoutePolicy, RoutingDefaults, Strategy, TargetRef, LOCAL_PROVIDER,
};
use crate::error::ApiError;
use crate::providers::Provider;

/// Direct `provider/model` targets tracked at most; beyond this they route untracked.
pub const MAX_DYNAMIC_TARGETS: usize = 1024;

/// One upstream target and everything known about it.
#[derive(Debug)]
pub struct TargetState {
    pub provider: Arc<Provider>,
    pub target: TargetRef,
    /// `provider/model`, as reported in `x-airlock-target` and metrics.
    pub label: String,
    pub health: TargetHealth,
    /// Catalog entry for the provider's model name, if known.
    pub info: Option<ModelInfo>,
}

/// A candidate handed to provider calls.
pub type Target = Arc<TargetState>;

impl TargetState {
    pub fn is_local(&self) -> bool {
        matches!(*self.provider, Provider::Local(_))
    }

    /// For a local target: the expected wait in its queue (requests ahead times the
    /// observed latency, 1 s per request before any is observed).
    pub fn queue_wait(&self) -> Option<std::time::Duration> {
        let Provider::Local(p) = &*self.provider else {
            return None;
        };
        let depth = p.pool().status(&self.target.model)?.queue_depth;
        let per = self
            .health
            .ewma_latency()
            .unwrap_or(std::time::Duration::from_secs(1));
        Some(per.saturating_mul(u32::try_from(depth).unwrap_or(u32::MAX)))
    }
}

/// Catalog facts for a target; local models are free and known only by their
/// manifests, so they get a zero-price entry.
fn target_info(catalog: &Catalog, t: &TargetRef) -> Option<ModelInfo> {
    if t.provider == LOCAL_PROVIDER {
        return Some(ModelInfo {
            name: t.model.clone(),
            family: LOCAL_PROVIDER.to_string(),
            mode: catalog::Mode::Chat,
            input_per_mtok: 0.0,
            output_per_mtok: 0.0,
            context_window: 0,
            max_output: 0,
            capabilities: catalog::Capabilities {
                streaming: true,
                ..Default::default()
            },
        });
    }
    catalog.lookup(&t.model).cloned()
}

/// Which targets a caller may use: `(model name as requested, target label) -> allowed`.
/// Governance builds it from the caller's allow-lists; routing applies it to the primary
/// route and to every fallback stage.
#[derive(Clone)]
pub struct TargetFilter(pub Arc<AllowFn>);

/// `(model name as requested, target label) -> allowed`.
pub type AllowFn = dyn Fn(&str, &str) -> bool + Send + Sync;

impl std::fmt::Debug for TargetFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TargetFilter")
    }
}

/// The route restricted to the targets `filter` allows; `None` when none is allowed.
pub fn restrict(route: Arc<ModelRoute>, filter: Option<&TargetFilter>) -> Option<Arc<ModelRoute>> {
    let Some(f) = filter else {
        return Some(route);
    };
    let allowed: Vec<(Target, f64)> = route
        .targets
        .iter()
        .filter(|(t, _)| (f.0)(&route.name, &t.label))
        .cloned()
        .collect();
    if allowed.is_empty() {
        None
    } else if allowed.len() == route.targets.len() {
        Some(route)
    } else {
        Some(Arc::new(ModelRoute {
            name: route.name.clone(),
            strategy: route.strategy,
            targets: allowed,
            policy: route.policy.clone(),
        }))
    }
}

/// A resolved virtual model: its targets (with weights), strategy and policy.
#[derive(Debug)]
pub struct ModelRoute {
    pub name: String,
    pub strategy: Strategy,
    pub targets: Vec<(Target, f64)>,
    pub policy: RoutePolicy,
}

#[derive(Debug)]
pub struct Routes {
    providers: HashMap<String, Arc<Provider>>,
    targets: RwLock<HashMap<String, Target>>,
    models: HashMap<String, Arc<ModelRoute>>,
    /// Configured model names in config order, for listing.
    order: Vec<String>,
    catalog: Catalog,
    defaults: RoutingDefaults,
    breaker: BreakerConfig,
}

fn breaker(d: &RoutingDefaults) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: d.consecutive_failures,
        error_rate: d.error_rate,
        min_requests: d.min_requests,
        window: d.window,
        cooldown: d.cooldown,
        rate_limit_cooldown: d.rate_limit_cooldown,
    }
}

fn default_policy(d: &RoutingDefaults) -> RoutePolicy {
    RoutePolicy {
        num_retries: d.num_retries,
        retry_backoff: d.retry_backoff,
        timeout: d.timeout,
        ttft_timeout: d.ttft_timeout,
        fallbacks: Vec::new(),
        context_window_fallbacks: Vec::new(),
        content_policy_fallbacks: Vec::new(),
        max_latency: None,
        weights: Default::default(),
        local_first: false,
    }
}

impl Routes {
    pub fn new(cfg: &Config, client: &crate::providers::http::Client, catalog: Catalog) -> Routes {
        Routes::with_local(cfg, client, catalog, None)
    }

    /// Like [`Routes::new`], with the `local` provider serving registered models.
    pub fn with_local(
        cfg: &Config,
        client: &crate::providers::http::Client,
        catalog: Catalog,
        local: Option<Provider>,
    ) -> Routes {
        let mut providers: HashMap<String, Arc<Provider>> = cfg
            .providers
            .iter()
            .map(|p| (p.name.clone(), Arc::new(Provider::new(p, client.clone()))))
            .collect();
        if let Some(l) = local {
            providers.insert(LOCAL_PROVIDER.to_string(), Arc::new(l));
        }
        let breaker = breaker(&cfg.routing);
        let mut targets: HashMap<String, Target> = HashMap::new();
        // Caps are set at most once per target (config validation), so the first
        // model that mentions a target with caps decides them.
        let mut caps: HashMap<String, Caps> = HashMap::new();
        for m in &cfg.models {
            for t in &m.targets {
                if t.rpm.is_some() || t.tpm.is_some() || t.max_parallel.is_some() {
                    caps.insert(
                        t.target.to_string(),
                        Caps {
                            rpm: t.rpm,
                            tpm: t.tpm,
                            max_parallel: t.max_parallel,
                        },
                    );
                }
            }
        }
        let mut make = |t: &TargetRef| -> Option<Target> {
            let label = t.to_string();
            if let Some(s) = targets.get(&label) {
                return Some(s.clone());
            }
            let provider = providers.get(&t.provider)?.clone();
            let state = Arc::new(TargetState {
                provider,
                target: t.clone(),
                health: TargetHealth::new(
                    breaker.clone(),
                    caps.get(&label).copied().unwrap_or_default(),
                ),
                info: target_info(&catalog, t),
                label: label.clone(),
            });
            targets.insert(label, state.clone());
            Some(state)
        };
        let models: HashMap<String, Arc<ModelRoute>> = cfg
            .models
            .iter()
            .map(|m: &ModelConfig| {
                let route = ModelRoute {
                    name: m.name.clone(),
                    strategy: m.strategy,
                    targets: m
                        .targets
                        .iter()
                        .filter_map(|t| make(&t.target).map(|s| (s, t.weight)))
                        .collect(),
                    policy: m.policy.clone(),
                };
                (m.name.clone(), Arc::new(route))
            })
            .collect();
        Routes {
            providers,
            targets: RwLock::new(targets),
            models,
            order: cfg.models.iter().map(|m| m.name.clone()).collect(),
            catalog,
            defaults: cfg.routing.clone(),
            breaker,
        }
    }

    /// The shared state of a direct target, created on first use.
    fn direct(&self, t: &TargetRef) -> Option<Target> {
        let label = t.to_string();
        if let Some(s) = self
            .targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&label)
        {
            return Some(s.clone());
        }
        let provider = self.providers.get(&t.provider)?.clone();
        let state = Arc::new(TargetState {
            provider,
            target: t.clone(),
            health: TargetHealth::new(self.breaker.clone(), Caps::default()),
            info: target_info(&self.catalog, t),
            label: label.clone(),
        });
        let mut map = self.targets.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&label) {
            return Some(s.clone());
        }
        if map.len() < MAX_DYNAMIC_TARGETS + self.models.len() * 8 {
            map.insert(label, state.clone());
        }
        Some(state)
    }

    pub fn resolve(&self, model: &str) -> Result<Arc<ModelRoute>, ApiError> {
        if let Some(r) = self.models.get(model) {
            return Ok(r.clone());
        }
        if let Some(t) = TargetRef::parse(model).and_then(|t| self.direct(&t)) {
            return Ok(Arc::new(ModelRoute {
                name: t.label.clone(),
                strategy: Strategy::Priority,
                targets: vec![(t, 1.0)],
                policy: default_policy(&self.defaults),
            }));
        }
        Err(ApiError::ModelNotFound {
            model: model.to_string(),
        })
    }

    /// Orders a route's targets for this request; also returns the `x-airlock-route`
    /// text: the strategy, then each candidate in order with its score.
    pub fn rank(&self, route: &ModelRoute, facts: &RequestFacts) -> (Vec<Target>, String) {
        let now = Instant::now();
        let need = facts.need();
        let gathered: Vec<Facts> = route
            .targets
            .iter()
            .map(|(t, weight)| {
                let snap = t.health.snapshot(now);
                Facts {
                    weight: *weight,
                    cost: t.info.as_ref().map(|i| {
                        catalog::expected_cost(i, facts.prompt_tokens, facts.priced_output())
                    }),
                    latency: if facts.stream {
                        t.health.ewma_ttft().or_else(|| t.health.ewma_latency())
                    } else {
                        t.health.ewma_latency()
                    },
                    error_rate: snap.error_rate,
                    queue_wait: t.queue_wait(),
                    available: t.health.check(now, need).is_ok(),
                }
            })
            .collect();
        let mut unit = || 1.0 - rand::random::<f64>();
        let ranking = strategy::rank(
            route.strategy,
            &gathered,
            &route.policy.weights,
            route.policy.max_latency,
            &mut unit,
        );
        let mut order = ranking.order;
        if route.policy.local_first {
            // Local targets with queue room first, in the strategy's order; spill-over
            // to the rest happens when they refuse (`model_overloaded`).
            order.sort_by_key(|&i| {
                let t = &route.targets[i].0;
                !(t.is_local() && gathered[i].available)
            });
        }
        let mut header = String::from(route.strategy.as_str());
        if route.policy.local_first {
            header.push_str("+local_first");
        }
        let mut ordered = Vec::with_capacity(order.len());
        for (n, &i) in order.iter().enumerate() {
            let (t, _) = &route.targets[i];
            let sep = if n == 0 { "; " } else { ", " };
            let _ = match (ranking.scores[i], route.strategy) {
                (_, Strategy::Priority) => write!(header, "{sep}{}", t.label),
                (Some(_), Strategy::Weighted) => {
                    write!(header, "{sep}{}(w={})", t.label, gathered[i].weight)
                }
                (Some(s), Strategy::Cost) => write!(header, "{sep}{}=${s:.6}", t.label),
                (Some(s), Strategy::Latency) => write!(header, "{sep}{}={s:.0}ms", t.label),
                (Some(s), _) => write!(header, "{sep}{}={s:.3}", t.label),
                (None, _) => write!(header, "{sep}{}=?", t.label),
            };
            if !gathered[i].available {
                header.push_str("(unavailable)");
            }
            ordered.push(t.clone());
        }
        (ordered, header)
    }

    /// Configured model routes, in config order.
    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelRoute>> {
        self.order.iter().filter_map(|n| self.models.get(n))
    }

    /// Every tracked target (configured and direct ones used so far), by label.
    pub fn targets(&self) -> Vec<Target> {
        let mut v: Vec<Target> = self
            .targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.label.cmp(&b.label));
        v
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }
}

#[cfg(test)]
mod tests;
