//! `GET /v1/models` and `GET /v1/models/{id}`: configured (virtual) models and the
//! concrete `provider/model` targets behind them, in OpenAI's list shape so SDKs parse
//! it, limited to what the caller's allow-lists permit, and extended with what routing knows: strategy and targets, catalog price, context
//! window and capabilities, and live availability (circuit state, recent latency).

use std::time::Instant;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};

use super::types::ModelObject;
use crate::config::LOCAL_PROVIDER;
use crate::error::ApiError;
use crate::governance::model::Principal;
use crate::routing::{restrict, ModelRoute, Target};
use crate::state::AppState;

fn target_fields(t: &Target, now: Instant) -> Map<String, Value> {
    let mut extra = Map::new();
    if let Some(info) = &t.info {
        extra.insert(
            "pricing".into(),
            json!({
                "input_per_mtok": info.input_per_mtok,
                "output_per_mtok": info.output_per_mtok,
                "currency": "USD",
            }),
        );
        extra.insert("context_window".into(), json!(info.context_window));
        extra.insert("max_output_tokens".into(), json!(info.max_output));
        extra.insert("mode".into(), json!(info.mode));
        extra.insert("capabilities".into(), json!(info.capabilities));
    }
    extra.insert("availability".into(), json!(t.health.snapshot(now)));
    extra
}

fn virtual_fields(m: &ModelRoute, now: Instant) -> Map<String, Value> {
    let mut extra = Map::new();
    extra.insert("strategy".into(), json!(m.strategy.as_str()));
    let targets: Vec<Value> = m
        .targets
        .iter()
        .map(|(t, w)| {
            let snap = t.health.snapshot(now);
            json!({"target": t.label, "weight": w, "circuit": snap.circuit, "available": snap.available})
        })
        .collect();
    extra.insert("targets".into(), Value::Array(targets));
    extra.insert(
        "available".into(),
        json!(m
            .targets
            .iter()
            .any(|(t, _)| t.health.snapshot(now).available)),
    );
    extra
}

fn catalogue(state: &AppState, principal: &Principal) -> Vec<ModelObject> {
    let now = Instant::now();
    let created = state.started_unix;
    let filter = super::access::filter(principal);
    let mut out: Vec<ModelObject> = state
        .routes
        .models()
        .filter_map(|m| restrict(m.clone(), filter.as_ref()))
        .map(|m| ModelObject {
            id: m.name.clone(),
            object: "model".into(),
            created,
            owned_by: "airlock".into(),
            extra: virtual_fields(&m, now),
        })
        .collect();
    let targets = state.routes.targets();
    for status in state.local.pool.list() {
        let id = format!("{LOCAL_PROVIDER}/{}", status.manifest.name);
        if filter.as_ref().is_some_and(|f| !(f.0)(&id, &id)) || out.iter().any(|m| m.id == id) {
            continue;
        }
        let mut extra = Map::new();
        let m = &status.manifest;
        extra.insert(
            "local".into(),
            json!({
                "kind": m.kind.as_str(),
                "state": if status.loaded { "loaded" } else { "not_loaded" },
                "queue_depth": status.queue_depth,
                "context_length": status.context_length,
                "architecture": m.architecture,
                "format": m.format,
                "bytes": m.bytes,
            }),
        );
        extra.insert("context_window".into(), json!(status.context_length));
        extra.insert("mode".into(), json!(m.kind.as_str()));
        if let Some(t) = targets.iter().find(|t| t.label == id) {
            extra.insert("availability".into(), json!(t.health.snapshot(now)));
        }
        out.push(ModelObject {
            id,
            object: "model".into(),
            created: i64::try_from(m.registered_at).unwrap_or(created),
            owned_by: LOCAL_PROVIDER.into(),
            extra,
        });
    }
    for t in targets {
        let allowed = filter.as_ref().is_none_or(|f| (f.0)(&t.label, &t.label));
        if !allowed || out.iter().any(|m| m.id == t.label) || t.is_local() {
            continue;
        }
        out.push(ModelObject {
            id: t.label.clone(),
            object: "model".into(),
            created,
            owned_by: t.target.provider.clone(),
            extra: target_fields(&t, now),
        });
    }
    out
}

pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<std::sync::Arc<Principal>>,
) -> Json<Value> {
    Json(json!({"object": "list", "data": catalogue(&state, &principal)}))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Extension(principal): Extension<std::sync::Arc<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    catalogue(&state, &principal)
        .into_iter()
        .find(|m| m.id == id)
        .map(Json)
        .ok_or(ApiError::ModelNotFound { model: id })
}
