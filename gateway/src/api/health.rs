//! `GET /health` (the process is alive) and `GET /ready` (config loaded, store open and
//! answering, every preloaded local model loaded). Both are open routes and cheap enough to poll every second.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let store = state.store.is_ready();
    let models = state.local.ready();
    let status = if store && models {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if store && models { "ready" } else { "not_ready" },
            "checks": {
                "config": "ok",
                "store": if store { "ok" } else { "unavailable" },
                "local_models": if models { "ok" } else { "loading" },
            },
            "uptime_seconds": state.started.elapsed().as_secs(),
        })),
    )
}
