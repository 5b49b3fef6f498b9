//! Airlock: one OpenAI-compatible API over external providers and local models.
//!
//! The library holds everything a client or operator touches; `main.rs` only calls
//! [`cli::main`]. Module map: [`api`] (routes, middleware stack, wire types), [`auth`],
//! [`config`], [`error`], [`providers`], [`routing`], [`server`] (accept loop,
//! timeouts, shutdown), [`state`], [`store`], [`telemetry`] (metrics and logs).

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod governance;
pub mod ledger;
pub mod local;
pub mod providers;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
