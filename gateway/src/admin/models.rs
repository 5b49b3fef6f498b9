//! `/admin/models`: register, list, show and remove local models.
//!
//! | route                   | methods      | who                          |
//! |-------------------------|--------------|------------------------------|
//! | `/admin/models`         | GET, POST    | GET: admin, auditor; POST: admin |
//! | `/admin/models/{name}`  | GET, DELETE  | GET: admin, auditor; DELETE: admin |
//!
//! Invariants: registration hashes the files on the blocking pool and answers only
//! after the manifest is durable; a removal is durable before the model stops being
//! served; both leave an [`AdminChange`] (`model.register`, `model.remove`) for the
//! audit log.

use std::path::PathBuf;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Actor, AdminChange, AdminError, AdminState};
use crate::api::json::ApiJson;
use crate::error::ApiError;
use crate::governance::model::Role;
use crate::local::{LocalModels, RegistryError};
use airlock_runtime::{ManifestError, ModelStatus};

/// `POST /admin/models` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewModel {
    /// A GGUF file or a model folder, on the server's file system.
    pub path: PathBuf,
    pub name: String,
    /// Replace a model already registered under this name.
    #[serde(default)]
    pub replace: bool,
}

fn local(state: &AdminState) -> Result<&LocalModels, AdminError> {
    state
        .local
        .as_ref()
        .ok_or_else(|| AdminError::Api(ApiError::Internal("local models are not set up".into())))
}

fn may_read(actor: &Actor) -> Result<(), AdminError> {
    match actor.0.role {
        Role::Admin | Role::Auditor => Ok(()),
        _ => Err(AdminError::Forbidden),
    }
}

fn may_write(actor: &Actor) -> Result<(), AdminError> {
    match actor.0.role {
        Role::Admin => Ok(()),
        _ => Err(AdminError::Forbidden),
    }
}

/// A model as the admin API shows it: the manifest plus its serving state.
pub fn view(s: &ModelStatus) -> Value {
    let mut v = serde_json::to_value(&s.manifest).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("id".into(), json!(format!("local/{}", s.manifest.name)));
        map.insert(
            "state".into(),
            json!(if s.loaded { "loaded" } else { "not_loaded" }),
        );
        map.insert("queue_depth".into(), json!(s.queue_depth));
        map.insert("context_length".into(), json!(s.context_length));
    }
    v
}

fn registry_error(e: RegistryError) -> AdminError {
    match e {
        RegistryError::Exists(_) => AdminError::Conflict(e.to_string()),
        RegistryError::NotFound(name) => AdminError::NotFound {
            kind: "model",
            id: name,
        },
        RegistryError::Manifest(ManifestError::InvalidName(_)) => AdminError::Api(
            ApiError::invalid("invalid_value", Some("name".into()), e.to_string()),
        ),
        RegistryError::Manifest(_) => AdminError::Api(ApiError::invalid(
            "invalid_model",
            Some("path".into()),
            e.to_string(),
        )),
        RegistryError::Store(m) => AdminError::Api(ApiError::Internal(m)),
    }
}

fn path_name(p: Result<Path<String>, PathRejection>) -> Result<String, AdminError> {
    p.map(|Path(n)| n).map_err(|e| {
        AdminError::Api(ApiError::invalid(
            "invalid_value",
            Some("name".into()),
            e.to_string(),
        ))
    })
}

pub(super) async fn list(
    State(s): State<AdminState>,
    actor: Actor,
) -> Result<Json<Value>, AdminError> {
    may_read(&actor)?;
    let data: Vec<Value> = local(&s)?.pool.list().iter().map(view).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(super) async fn show(
    State(s): State<AdminState>,
    actor: Actor,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, AdminError> {
    may_read(&actor)?;
    let name = path_name(name)?;
    local(&s)?
        .pool
        .status(&name)
        .map(|st| Json(view(&st)))
        .ok_or(AdminError::NotFound {
            kind: "model",
            id: name,
        })
}

pub(super) async fn register(
    State(s): State<AdminState>,
    actor: Actor,
    body: Result<ApiJson<NewModel>, ApiError>,
) -> Result<Response, AdminError> {
    may_write(&actor)?;
    let ApiJson(new) = body?;
    let models = local(&s)?.clone();
    let NewModel {
        path,
        name,
        replace,
    } = new;
    let before = models.pool.status(&name).map(|st| view(&st));
    let task_name = name.clone();
    let manifest = tokio::task::spawn_blocking(move || models.register(&path, &task_name, replace))
        .await
        .map_err(|e| AdminError::Api(ApiError::Internal(format!("registration task: {e}"))))?
        .map_err(registry_error)?;
    let after = local(&s)?
        .pool
        .status(&manifest.name)
        .map(|st| view(&st))
        .unwrap_or(Value::Null);
    let change = AdminChange {
        actor_key_id: actor.0.key_id.clone(),
        action: "model.register",
        target: format!("model:{name}"),
        before,
        after: Some(after.clone()),
    };
    Ok((StatusCode::CREATED, Extension(change), Json(after)).into_response())
}

pub(super) async fn remove(
    State(s): State<AdminState>,
    actor: Actor,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, AdminError> {
    may_write(&actor)?;
    let name = path_name(name)?;
    let models = local(&s)?;
    let before = models.pool.status(&name).map(|st| view(&st));
    models.remove(&name).map_err(registry_error)?;
    let change = AdminChange {
        actor_key_id: actor.0.key_id.clone(),
        action: "model.remove",
        target: format!("model:{name}"),
        before,
        after: None,
    };
    Ok((
        StatusCode::OK,
        Extension(change),
        Json(json!({"id": format!("local/{name}"), "deleted": true})),
    )
        .into_response())
}
