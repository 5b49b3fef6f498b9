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
use crate::providers::http::build_client;
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
    pub master_key: MasterKey,
    pub started: Instant,
    /// Start time in Unix seconds, reported as `created` of configured models.
    pub started_unix: i64,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }

    /// Builds the state from a validated config, an open store and the master key.
    pub fn build(config: Config, store: Store, master_key: &str) -> Result<AppState, String> {
        let client = build_client(&config.upstream)?;
        let mut catalog = Catalog::builtin()?;
        catalog.apply(&config.catalog)?;
        let metrics = Metrics::new().map_err(|e| format!("cannot set up metrics: {e}"))?;
        Ok(AppState::new(Inner {
            routes: Routes::new(&config, &client, catalog),
            metrics,
            store,
            master_key: MasterKey::new(master_key),
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
