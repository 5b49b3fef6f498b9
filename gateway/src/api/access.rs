//! Applying the caller's allow-lists to a request's routes.
//!
//! Invariant: a model the caller may not use answers exactly like a model that does not
//! exist (`model_not_found`), so allow-lists do not reveal what else is configured.

use std::sync::Arc;

use crate::error::ApiError;
use crate::governance::access::target_allowed;
use crate::governance::model::Principal;
use crate::routing::{restrict, ModelRoute, Routes, TargetFilter};

/// The caller's target filter; `None` when nothing restricts it.
pub fn filter(p: &Principal) -> Option<TargetFilter> {
    if p.allow.is_empty() {
        return None;
    }
    let p = p.clone();
    Some(TargetFilter(Arc::new(move |model, label| {
        target_allowed(&p, model, label)
    })))
}

/// Resolves `model` and keeps only the targets the caller may use.
pub fn resolve(
    routes: &Routes,
    model: &str,
    filter: Option<&TargetFilter>,
) -> Result<Arc<ModelRoute>, ApiError> {
    let route = routes.resolve(model)?;
    restrict(route, filter).ok_or_else(|| ApiError::ModelNotFound {
        model: model.to_string(),
    })
}
