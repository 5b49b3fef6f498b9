//! Governance: who may call (keys, users, teams, orgs, roles), what they may use
//! (allow-lists), and how much (rate limits, token quotas, money budgets).

pub mod access;
pub mod budget;
pub mod directory;
pub mod keys;
pub mod limits;
pub mod model;
pub mod policy;
