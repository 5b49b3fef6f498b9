//! `airlock-runtime`: serving local models in-process.
//!
//! Owns, once it lands (see ARCHITECTURE.md): the registry of registered weights,
//! one engine thread per loaded model, bounded admission, continuous batching,
//! sampling and streaming. It never does HTTP, keys, budgets or provider logic. It
//! holds no code yet: the gateway core (external providers) is the first milestone.
