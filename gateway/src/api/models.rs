//! `GET /v1/models` and `GET /v1/models/{id}`: configured model names and the concrete
//! `provider/model` targets behind them, in OpenAI's list shape so SDKs parse it.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Map, Value};

use super::types::ModelObject;
use crate::error::ApiError;
use crate::state::AppState;

fn catalogue(state: &AppState) -> Vec<ModelObject> {
    let created = state.started_unix;
    let mut out = Vec::new();
    let mut direct: Vec<String> = Vec::new();
    for (name, targets) in state.routes.models() {
        let labels: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        let mut extra = Map::new();
        extra.insert("targets".into(), json!(labels));
        out.push(ModelObject {
            id: name.to_string(),
            object: "model".into(),
            created,
            owned_by: "airlock".into(),
            extra,
        });
        for l in labels {
            if !direct.contains(&l) {
                direct.push(l);
            }
        }
    }
    for l in direct {
        if out.iter().any(|m| m.id == l) {
            continue;
        }
        let owner = l.split('/').next().unwrap_or("").to_string();
        out.push(ModelObject {
            id: l,
            object: "model".into(),
            created,
            owned_by: owner,
            extra: Map::new(),
        });
    }
    out
}

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": catalogue(&state)}))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    catalogue(&state)
        .into_iter()
        .find(|m| m.id == id)
        .map(Json)
        .ok_or(ApiError::ModelNotFound { model: id })
}
