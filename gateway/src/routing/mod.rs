//! Routing: from the model name a client sends to an ordered list of targets, and the
//! failover loop that tries them.
//!
//! A name resolves, in this order, to: a configured model (its targets in config
//! order), or a direct `provider/model` naming a configured provider. Anything else is
//! `model_not_found`. Invariants: failover moves to the next target only on a retryable
//! upstream error and only before any byte reached the client (the loop runs before a
//! response exists, and a stream counts as started once the provider accepted it); a
//! client error (4xx from the provider) is returned at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, TargetRef};
use crate::error::ApiError;
use crate::providers::{Provider, UpstreamError};

/// One candidate: the provider adapter and the model name it knows.
#[derive(Debug, Clone)]
pub struct Target {
    pub provider: Arc<Provider>,
    pub target: TargetRef,
    /// `provider/model`, as reported in `x-airlock-target` and metrics.
    pub label: String,
}

/// The resolved route for one request.
#[derive(Debug, Clone)]
pub struct Route {
    /// The configured model name, or the direct target; a bounded label for metrics.
    pub name: String,
    pub targets: Vec<Target>,
}

#[derive(Debug)]
pub struct Routes {
    providers: HashMap<String, Arc<Provider>>,
    models: HashMap<String, Vec<TargetRef>>,
    /// Configured model names in config order, for listing.
    order: Vec<String>,
}

impl Routes {
    pub fn new(cfg: &Config, client: &reqwest::Client) -> Routes {
        let providers = cfg
            .providers
            .iter()
            .map(|p| (p.name.clone(), Arc::new(Provider::new(p, client.clone()))))
            .collect();
        let models = cfg
            .models
            .iter()
            .map(|m| (m.name.clone(), m.targets.clone()))
            .collect();
        let order = cfg.models.iter().map(|m| m.name.clone()).collect();
        Routes {
            providers,
            models,
            order,
        }
    }

    fn target(&self, t: &TargetRef) -> Option<Target> {
        self.providers.get(&t.provider).map(|p| Target {
            provider: p.clone(),
            target: t.clone(),
            label: t.to_string(),
        })
    }

    pub fn resolve(&self, model: &str) -> Result<Route, ApiError> {
        if let Some(targets) = self.models.get(model) {
            return Ok(Route {
                name: model.to_string(),
                targets: targets.iter().filter_map(|t| self.target(t)).collect(),
            });
        }
        if let Some(t) = TargetRef::parse(model).and_then(|t| self.target(&t)) {
            return Ok(Route {
                name: t.label.clone(),
                targets: vec![t],
            });
        }
        Err(ApiError::ModelNotFound {
            model: model.to_string(),
        })
    }

    /// Configured model names (config order) with their targets.
    pub fn models(&self) -> impl Iterator<Item = (&str, &[TargetRef])> {
        self.order
            .iter()
            .filter_map(|n| self.models.get(n).map(|t| (n.as_str(), t.as_slice())))
    }

    pub fn provider_names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }
}

/// The outcome of a successful failover loop.
#[derive(Debug)]
pub struct Served<T> {
    pub value: T,
    pub by: ServedBy,
}

/// Which target answered, after how many attempts, and how long the gateway waited on
/// upstreams in all (for streams: until the response head), so the rest is overhead.
#[derive(Debug, Clone)]
pub struct ServedBy {
    pub target: Target,
    pub attempts: u32,
    pub upstream: Duration,
}

/// Tries each target in order until one succeeds or a non-retryable error occurs.
pub async fn failover<T, F, Fut>(route: &Route, mut call: F) -> Result<Served<T>, ApiError>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let mut attempts = 0;
    let mut upstream = Duration::ZERO;
    let mut last: Option<UpstreamError> = None;
    for target in &route.targets {
        attempts += 1;
        let started = Instant::now();
        let result = call(target.clone()).await;
        upstream += started.elapsed();
        match result {
            Ok(value) => {
                return Ok(Served {
                    value,
                    by: ServedBy {
                        target: target.clone(),
                        attempts,
                        upstream,
                    },
                })
            }
            Err(e) => {
                tracing::warn!(target = %target.label, code = e.code(), error = %e, attempt = attempts, "upstream attempt failed");
                let retry = e.retryable();
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(match last {
        Some(e) => ApiError::Upstream(e),
        None => ApiError::Internal(format!("route {} has no usable target", route.name)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SecretPolicy};
    use crate::providers::http::build_client;
    use crate::providers::UpstreamErrorKind;

    fn routes() -> Routes {
        let cfg = Config::parse(
            r#"
[[providers]]
name = "a"
kind = "openai"
[[providers]]
name = "b"
kind = "anthropic"
[[models]]
name = "smart"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
"#,
            &[("X", "y")],
            SecretPolicy::Ignore,
        )
        .unwrap();
        Routes::new(&cfg, &build_client(&cfg.upstream).unwrap())
    }

    #[test]
    fn resolves_aliases_then_direct_targets() {
        let r = routes();
        let route = r.resolve("smart").unwrap();
        let labels: Vec<_> = route.targets.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels, ["a/gpt-4o", "b/claude-sonnet-4-5"]);
        let route = r.resolve("b/claude-haiku").unwrap();
        assert_eq!(route.name, "b/claude-haiku");
        assert_eq!(route.targets[0].target.model, "claude-haiku");
        assert!(matches!(
            r.resolve("c/x"),
            Err(ApiError::ModelNotFound { .. })
        ));
        assert!(matches!(
            r.resolve("gpt-5"),
            Err(ApiError::ModelNotFound { .. })
        ));
    }

    #[tokio::test]
    async fn fails_over_on_retryable_errors_only() {
        let r = routes();
        let route = r.resolve("smart").unwrap();
        let served = failover(&route, |t| async move {
            if t.target.provider == "a" {
                Err(UpstreamError::new(UpstreamErrorKind::Server, "a", "503"))
            } else {
                Ok(t.label)
            }
        })
        .await
        .unwrap();
        assert_eq!(served.value, "b/claude-sonnet-4-5");
        assert_eq!(served.by.attempts, 2);
        assert_eq!(served.by.target.label, "b/claude-sonnet-4-5");

        let mut calls = 0;
        let err = failover(&route, |_| {
            calls += 1;
            async {
                Err::<(), _>(UpstreamError::new(
                    UpstreamErrorKind::BadRequest,
                    "a",
                    "bad",
                ))
            }
        })
        .await
        .unwrap_err();
        assert_eq!(calls, 1, "a client error is not retried elsewhere");
        assert_eq!(err.code(), "upstream_rejected_request");
    }
}
