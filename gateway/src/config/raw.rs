//! Phase one of config parsing: the TOML file exactly as written.
//!
//! Every struct denies unknown keys and every field is optional, so a typo is an error
//! naming the key and a missing key is resolved to a default in phase two
//! ([`super::Config::from_raw`]). Nothing here is interpreted.

use std::collections::BTreeMap;

use serde::Deserialize;

pub use super::routing::{RawModel, RawRouting};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<RawServer>,
    pub upstream: Option<RawUpstream>,
    pub routing: Option<RawRouting>,
    pub governance: Option<RawGovernance>,
    pub providers: Option<Vec<RawProvider>>,
    pub models: Option<Vec<RawModel>>,
    /// Catalog additions and overrides (prices, context windows, capabilities).
    pub catalog: Option<Vec<crate::routing::catalog::CatalogOverride>>,
    pub local: Option<RawLocal>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    pub master_key_env: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub max_connections: Option<u64>,
    /// Seconds.
    pub header_read_timeout: Option<f64>,
    /// Seconds.
    pub body_read_timeout: Option<f64>,
    /// Seconds.
    pub shutdown_grace: Option<f64>,
    pub metrics_open: Option<bool>,
    pub log_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Seconds.
    pub connect_timeout: Option<f64>,
    /// Seconds.
    pub first_byte_timeout: Option<f64>,
    /// Seconds.
    pub timeout: Option<f64>,
    pub pool_max_idle_per_host: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    /// Seconds.
    pub timeout: Option<f64>,
    /// Seconds.
    pub first_byte_timeout: Option<f64>,
    /// Anthropic only: the `anthropic-version` header.
    pub api_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGovernance {
    pub admin_key_env: Option<String>,
    /// Days; absent = keep audit records forever.
    pub audit_retention_days: Option<u64>,
    pub default_max_output_tokens: Option<u64>,
    /// Worst cases a budget window's durable hold runs ahead of what is reserved.
    pub budget_hold_ahead: Option<u64>,
    /// false: no per-request audit records or usage counters (bare proxying).
    pub record_requests: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocal {
    /// MiB of weights loaded at once; absent = no cap.
    pub memory_budget_mb: Option<u64>,
    /// Seconds a model stays loaded unused; negative = never unloaded.
    pub keep_alive: Option<f64>,
    pub queue_capacity: Option<u64>,
    /// Requests one chat model runs at once.
    pub max_batch: Option<u64>,
    /// Registered models to load at start (and keep loaded).
    pub preload: Option<Vec<String>>,
    /// `cpu`, or `cuda` / `cuda:N` with the `cuda` build feature.
    pub device: Option<String>,
    /// Models registered at start when missing (or registered from another path).
    pub models: Option<Vec<RawLocalModel>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocalModel {
    pub name: Option<String>,
    pub path: Option<String>,
    pub preload: Option<bool>,
}
