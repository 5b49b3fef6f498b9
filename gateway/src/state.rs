//! Shared application state: a cheap clone handed to every handler.
//!
//! Invariant: built once at start from a validated [`Config`]; everything inside is
//! immutable or internally synchronized, so handlers never lock it.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use crate::api::types::unix_now;
use crate::auth::MasterKey;
use crate::config::Config;
use crate::governance::directory::Directory;
use crate::governance::policy::Governance;
use crate::local::LocalModels;
use crate::providers::http::build_client;
use crate::providers::local::LocalProvider;
use crate::providers::Provider;
use crate::routing::catalog::Catalog;
use crate::routing::Routes;
use crate::store::Store;
use crate::telemetry::Metrics;

#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub config: Config,
    pub routes: Routes,
    pub metrics: Metrics,
    pub store: Store,
    /// The configured bootstrap admin key (`server.master_key_env`), if set.
    pub master_key: Option<MasterKey>,
    pub directory: Directory,
    pub governance: Governance,
    /// Registered local models and the pool serving them.
    pub local: LocalModels,
    pub started: Instant,
    /// Start time in Unix seconds, reported as `created` of configured models.
    pub started_unix: i64,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }

    /// Builds the state from a validated config and an open store.
    /// `master_key` overrides the configured `server.master_key_env` value (tests).
    pub fn build(
        config: Config,
        store: Store,
        master_key: Option<&str>,
    ) -> Result<AppState, String> {
        let client = build_client(&config.upstream);
        let mut catalog = Catalog::builtin()?;
        catalog.apply(&config.catalog)?;
        let metrics = Metrics::new().map_err(|e| format!("cannot set up metrics: {e}"))?;
        let directory =
            Directory::open(&store).map_err(|e| format!("cannot open the key directory: {e}"))?;
        let governance = Governance::open(&store, &config.governance)?;
        let local = LocalModels::open(&store, &config.local)?;
        let provider = Provider::Local(LocalProvider::new(
            local.pool.clone(),
            config.governance.default_max_output_tokens,
        ));
        Ok(AppState::new(Inner {
            routes: Routes::with_local(&config, &client, catalog, Some(provider)),
            local,
            metrics,
            store,
            master_key: master_key
                .or(config.server.master_key.as_deref())
                .map(MasterKey::new),
            directory,
            governance,
            started: Instant::now(),
            started_unix: unix_now(),
            config,
        }))
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
