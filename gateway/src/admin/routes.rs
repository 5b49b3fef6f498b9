//! The admin handlers: parse, decide with [`can`], call the directory, answer, and
//! hand the change to the audit log through an [`AdminChange`] response extension.
//!
//! Invariant: a handler never returns an entity it has not checked with
//! `can(principal, Read, …)`, and never changes one without `can(principal, action, …)`
//! on both its stored and its resulting form (see the module header of `admin`).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Actor, AdminChange, AdminError, AdminState};
use crate::api::json::ApiJson;
use crate::error::ApiError;
use crate::governance::access::{can, Action, Kind, Resource};
use crate::governance::directory::{
    now_ms, DirectoryError, KeyPatch, KeyView, NewKey, NewOrg, NewTeam, NewUser, OrgPatch,
    TeamPatch, UserPatch,
};
use crate::governance::model::{Org, Principal, Role, Scope, Team, User};

type Answer = Result<Response, AdminError>;

fn org_res(o: &Org) -> Resource<'_> {
    Resource::Org { id: &o.id }
}

fn team_res(t: &Team) -> Resource<'_> {
    Resource::Team {
        id: &t.id,
        org_id: &t.org_id,
    }
}

fn user_res(u: &User) -> Resource<'_> {
    Resource::User {
        org_id: &u.org_id,
        team_id: u.team_id.as_deref(),
        role: u.role,
    }
}

fn key_res(k: &KeyView, user_role: Option<Role>) -> Resource<'_> {
    Resource::Key {
        org_id: &k.org_id,
        team_id: k.team_id.as_deref(),
        user_role,
        role: k.role,
    }
}

/// 403 unless the role may do `action` on some entity of `kind`.
fn gate(p: &Principal, action: Action, kind: Kind) -> Result<(), AdminError> {
    if can(p, action, &Resource::Collection(kind)) {
        Ok(())
    } else {
        Err(AdminError::Forbidden)
    }
}

/// The decision on one stored entity: hidden (404) unless readable, then 403 unless
/// `action` is allowed on it and on every resulting form in `after`.
fn decide(
    p: &Principal,
    action: Action,
    kind: &'static str,
    id: &str,
    stored: &Resource<'_>,
    after: &[Resource<'_>],
) -> Result<(), DirectoryError> {
    if !can(p, Action::Read, stored) {
        return Err(DirectoryError::NotFound {
            kind,
            id: id.to_string(),
        });
    }
    if !can(p, action, stored) || after.iter().any(|r| !can(p, action, r)) {
        return Err(DirectoryError::Forbidden);
    }
    Ok(())
}

fn allow_create(p: &Principal, new: &Resource<'_>) -> Result<(), DirectoryError> {
    if can(p, Action::Create, new) {
        Ok(())
    } else {
        Err(DirectoryError::Forbidden)
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, AdminError> {
    serde_json::to_value(v).map_err(|e| ApiError::Internal(format!("encode: {e}")).into())
}

/// Not found (or not visible). The id is echoed, cut to 64 characters.
fn hidden(kind: &'static str, id: &str) -> AdminError {
    AdminError::NotFound {
        kind,
        id: id.chars().take(64).collect(),
    }
}

/// The `{id}` of a path; a path that does not decode names nothing.
fn path_id(
    p: Result<Path<String>, PathRejection>,
    kind: &'static str,
) -> Result<String, AdminError> {
    p.map(|Path(id)| id).map_err(|_| hidden(kind, "?"))
}

pub(super) fn query<T: Default>(q: Result<Query<T>, QueryRejection>) -> Result<T, AdminError> {
    match q {
        Ok(Query(v)) => Ok(v),
        Err(e) => Err(ApiError::invalid(
            "invalid_value",
            None,
            format!("Invalid query: {}", e.body_text()),
        )
        .into()),
    }
}

fn list(data: Vec<Value>) -> Response {
    Json(json!({ "object": "list", "data": data })).into_response()
}

struct Change<'a> {
    actor: &'a Principal,
    action: &'static str,
    target: Scope,
    before: Option<Value>,
    after: Option<Value>,
}

impl Change<'_> {
    /// The answer: `status`, `body`, and the change in the extensions.
    fn answer(self, status: StatusCode, body: Value) -> Response {
        let change = AdminChange {
            actor_key_id: self.actor.key_id.clone(),
            action: self.action,
            target: self.target.as_key(),
            before: self.before,
            after: self.after,
        };
        (status, Extension(change), Json(body)).into_response()
    }
}

fn deleted(id: &str) -> Value {
    json!({ "id": id, "deleted": true })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoFilter {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TeamFilter {
    org_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UserFilter {
    org_id: Option<String>,
    team_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyFilter {
    org_id: Option<String>,
    team_id: Option<String>,
    user_id: Option<String>,
}

fn matches(filter: &Option<String>, value: Option<&str>) -> bool {
    filter.as_deref().is_none_or(|f| Some(f) == value)
}

// ---- me ----

pub(super) async fn me(State(s): State<AdminState>, Actor(p): Actor) -> Answer {
    if !can(&p, Action::Read, &Resource::Me) {
        return Err(AdminError::Forbidden);
    }
    let key = s.directory.get_key(&p.key_id);
    let limits: Vec<Value> = p
        .limits
        .iter()
        .map(|(scope, limits)| {
            let mut v = to_json(scope)?;
            if let Value::Object(m) = &mut v {
                m.insert("limits".into(), to_json(limits)?);
            }
            Ok(v)
        })
        .collect::<Result<_, AdminError>>()?;
    Ok(Json(json!({
        "key_id": p.key_id,
        "org_id": p.org_id,
        "team_id": p.team_id,
        "user_id": p.user_id,
        "role": p.role,
        "allow": p.allow,
        "limits": limits,
        "log_content": p.log_content,
        "key": key,
    }))
    .into_response())
}

// ---- orgs ----

pub(super) async fn list_orgs(
    State(s): State<AdminState>,
    Actor(p): Actor,
    q: Result<Query<NoFilter>, QueryRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::Org)?;
    query(q)?;
    let data = s
        .directory
        .list_orgs()
        .iter()
        .filter(|o| can(&p, Action::Read, &org_res(o)))
        .map(to_json)
        .collect::<Result<_, _>>()?;
    Ok(list(data))
}

pub(super) async fn get_org(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::Org)?;
    let id = path_id(id, "org")?;
    match s.directory.get_org(&id) {
        Some(o) if can(&p, Action::Read, &org_res(&o)) => Ok(Json(to_json(&o)?).into_response()),
        _ => Err(hidden("org", &id)),
    }
}

pub(super) async fn create_org(
    State(s): State<AdminState>,
    Actor(p): Actor,
    body: Result<ApiJson<NewOrg>, ApiError>,
) -> Answer {
    gate(&p, Action::Create, Kind::Org)?;
    let ApiJson(new) = body?;
    let org = s
        .directory
        .create_org(new, now_ms(), |o| allow_create(&p, &org_res(o)))?;
    let after = to_json(&org)?;
    Ok(Change {
        actor: &p,
        action: "org.create",
        target: Scope::Org(org.id),
        before: None,
        after: Some(after.clone()),
    }
    .answer(StatusCode::CREATED, after))
}

pub(super) async fn update_org(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<OrgPatch>, ApiError>,
) -> Answer {
    gate(&p, Action::Update, Kind::Org)?;
    let ApiJson(patch) = body?;
    let id = path_id(id, "org")?;
    let u = s.directory.update_org(&id, patch, |b, a| {
        decide(&p, Action::Update, "org", &id, &org_res(b), &[org_res(a)])
    })?;
    let after = to_json(&u.after)?;
    Ok(Change {
        actor: &p,
        action: "org.update",
        target: Scope::Org(id),
        before: Some(to_json(&u.before)?),
        after: Some(after.clone()),
    }
    .answer(StatusCode::OK, after))
}

pub(super) async fn delete_org(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Delete, Kind::Org)?;
    let id = path_id(id, "org")?;
    let before = s.directory.delete_org(&id, |b| {
        decide(&p, Action::Delete, "org", &id, &org_res(b), &[])
    })?;
    Ok(Change {
        actor: &p,
        action: "org.delete",
        target: Scope::Org(id.clone()),
        before: Some(to_json(&before)?),
        after: None,
    }
    .answer(StatusCode::OK, deleted(&id)))
}

// ---- teams ----

pub(super) async fn list_teams(
    State(s): State<AdminState>,
    Actor(p): Actor,
    q: Result<Query<TeamFilter>, QueryRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::Team)?;
    let f = query(q)?;
    let data = s
        .directory
        .list_teams()
        .iter()
        .filter(|t| matches(&f.org_id, Some(&t.org_id)))
        .filter(|t| can(&p, Action::Read, &team_res(t)))
        .map(to_json)
        .collect::<Result<_, _>>()?;
    Ok(list(data))
}

pub(super) async fn get_team(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::Team)?;
    let id = path_id(id, "team")?;
    match s.directory.get_team(&id) {
        Some(t) if can(&p, Action::Read, &team_res(&t)) => Ok(Json(to_json(&t)?).into_response()),
        _ => Err(hidden("team", &id)),
    }
}

pub(super) async fn create_team(
    State(s): State<AdminState>,
    Actor(p): Actor,
    body: Result<ApiJson<NewTeam>, ApiError>,
) -> Answer {
    gate(&p, Action::Create, Kind::Team)?;
    let ApiJson(new) = body?;
    let team = s
        .directory
        .create_team(new, now_ms(), |t| allow_create(&p, &team_res(t)))?;
    let after = to_json(&team)?;
    Ok(Change {
        actor: &p,
        action: "team.create",
        target: Scope::Team(team.id),
        before: None,
        after: Some(after.clone()),
    }
    .answer(StatusCode::CREATED, after))
}

pub(super) async fn update_team(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<TeamPatch>, ApiError>,
) -> Answer {
    gate(&p, Action::Update, Kind::Team)?;
    let ApiJson(patch) = body?;
    let id = path_id(id, "team")?;
    let u = s.directory.update_team(&id, patch, |b, a| {
        decide(
            &p,
            Action::Update,
            "team",
            &id,
            &team_res(b),
            &[team_res(a)],
        )
    })?;
    let after = to_json(&u.after)?;
    Ok(Change {
        actor: &p,
        action: "team.update",
        target: Scope::Team(id),
        before: Some(to_json(&u.before)?),
        after: Some(after.clone()),
    }
    .answer(StatusCode::OK, after))
}

pub(super) async fn delete_team(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Delete, Kind::Team)?;
    let id = path_id(id, "team")?;
    let before = s.directory.delete_team(&id, |b| {
        decide(&p, Action::Delete, "team", &id, &team_res(b), &[])
    })?;
    Ok(Change {
        actor: &p,
        action: "team.delete",
        target: Scope::Team(id.clone()),
        before: Some(to_json(&before)?),
        after: None,
    }
    .answer(StatusCode::OK, deleted(&id)))
}

// ---- users ----

pub(super) async fn list_users(
    State(s): State<AdminState>,
    Actor(p): Actor,
    q: Result<Query<UserFilter>, QueryRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::User)?;
    let f = query(q)?;
    let data = s
        .directory
        .list_users()
        .iter()
        .filter(|u| matches(&f.org_id, Some(&u.org_id)))
        .filter(|u| matches(&f.team_id, u.team_id.as_deref()))
        .filter(|u| can(&p, Action::Read, &user_res(u)))
        .map(to_json)
        .collect::<Result<_, _>>()?;
    Ok(list(data))
}

pub(super) async fn get_user(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::User)?;
    let id = path_id(id, "user")?;
    match s.directory.get_user(&id) {
        Some(u) if can(&p, Action::Read, &user_res(&u)) => Ok(Json(to_json(&u)?).into_response()),
        _ => Err(hidden("user", &id)),
    }
}

pub(super) async fn create_user(
    State(s): State<AdminState>,
    Actor(p): Actor,
    body: Result<ApiJson<NewUser>, ApiError>,
) -> Answer {
    gate(&p, Action::Create, Kind::User)?;
    let ApiJson(new) = body?;
    let user = s
        .directory
        .create_user(new, now_ms(), |u| allow_create(&p, &user_res(u)))?;
    let after = to_json(&user)?;
    Ok(Change {
        actor: &p,
        action: "user.create",
        target: Scope::User(user.id),
        before: None,
        after: Some(after.clone()),
    }
    .answer(StatusCode::CREATED, after))
}

pub(super) async fn update_user(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<UserPatch>, ApiError>,
) -> Answer {
    gate(&p, Action::Update, Kind::User)?;
    let ApiJson(patch) = body?;
    let id = path_id(id, "user")?;
    let u = s.directory.update_user(&id, patch, |b, a| {
        decide(
            &p,
            Action::Update,
            "user",
            &id,
            &user_res(b),
            &[user_res(a)],
        )
    })?;
    let after = to_json(&u.after)?;
    Ok(Change {
        actor: &p,
        action: "user.update",
        target: Scope::User(id),
        before: Some(to_json(&u.before)?),
        after: Some(after.clone()),
    }
    .answer(StatusCode::OK, after))
}

pub(super) async fn delete_user(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Delete, Kind::User)?;
    let id = path_id(id, "user")?;
    let before = s.directory.delete_user(&id, |b| {
        decide(&p, Action::Delete, "user", &id, &user_res(b), &[])
    })?;
    Ok(Change {
        actor: &p,
        action: "user.delete",
        target: Scope::User(id.clone()),
        before: Some(to_json(&before)?),
        after: None,
    }
    .answer(StatusCode::OK, deleted(&id)))
}

// ---- keys ----

pub(super) async fn list_keys(
    State(s): State<AdminState>,
    Actor(p): Actor,
    q: Result<Query<KeyFilter>, QueryRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::Key)?;
    let f = query(q)?;
    let d = &s.directory;
    let data = d
        .list_keys()
        .iter()
        .filter(|k| matches(&f.org_id, Some(&k.org_id)))
        .filter(|k| matches(&f.team_id, k.team_id.as_deref()))
        .filter(|k| matches(&f.user_id, k.user_id.as_deref()))
        .filter(|k| {
            let role = d.user_role(k.user_id.as_deref());
            can(&p, Action::Read, &key_res(k, role))
        })
        .map(to_json)
        .collect::<Result<_, _>>()?;
    Ok(list(data))
}

pub(super) async fn get_key(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Read, Kind::Key)?;
    let id = path_id(id, "key")?;
    let d = &s.directory;
    match d.get_key(&id) {
        Some(k)
            if can(
                &p,
                Action::Read,
                &key_res(&k, d.user_role(k.user_id.as_deref())),
            ) =>
        {
            Ok(Json(to_json(&k)?).into_response())
        }
        _ => Err(hidden("key", &id)),
    }
}

/// The answer holds the full key in `key`: the only time it is ever shown.
pub(super) async fn create_key(
    State(s): State<AdminState>,
    Actor(p): Actor,
    body: Result<ApiJson<NewKey>, ApiError>,
) -> Answer {
    gate(&p, Action::Create, Kind::Key)?;
    let ApiJson(new) = body?;
    let created = s
        .directory
        .create_key(new, now_ms(), |k, ur| allow_create(&p, &key_res(k, ur)))?;
    let after = to_json(&created.view)?;
    let mut body = after.clone();
    if let Value::Object(m) = &mut body {
        m.insert(
            "key".into(),
            Value::String(created.key.expose().to_string()),
        );
    }
    Ok(Change {
        actor: &p,
        action: "key.create",
        target: Scope::Key(created.view.id),
        before: None,
        after: Some(after),
    }
    .answer(StatusCode::CREATED, body))
}

pub(super) async fn update_key(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<KeyPatch>, ApiError>,
) -> Answer {
    gate(&p, Action::Update, Kind::Key)?;
    let ApiJson(patch) = body?;
    let id = path_id(id, "key")?;
    let u = s.directory.update_key(&id, patch, |b, a, ur| {
        decide(
            &p,
            Action::Update,
            "key",
            &id,
            &key_res(b, ur),
            &[key_res(a, ur)],
        )
    })?;
    let after = to_json(&u.after)?;
    Ok(Change {
        actor: &p,
        action: "key.update",
        target: Scope::Key(id),
        before: Some(to_json(&u.before)?),
        after: Some(after.clone()),
    }
    .answer(StatusCode::OK, after))
}

pub(super) async fn revoke_key(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Update, Kind::Key)?;
    let id = path_id(id, "key")?;
    let u = s.directory.revoke_key(&id, now_ms(), |b, ur| {
        decide(&p, Action::Update, "key", &id, &key_res(b, ur), &[])
    })?;
    let after = to_json(&u.after)?;
    Ok(Change {
        actor: &p,
        action: "key.revoke",
        target: Scope::Key(id),
        before: Some(to_json(&u.before)?),
        after: Some(after.clone()),
    }
    .answer(StatusCode::OK, after))
}

pub(super) async fn delete_key(
    State(s): State<AdminState>,
    Actor(p): Actor,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    gate(&p, Action::Delete, Kind::Key)?;
    let id = path_id(id, "key")?;
    let before = s.directory.delete_key(&id, |b, ur| {
        decide(&p, Action::Delete, "key", &id, &key_res(b, ur), &[])
    })?;
    Ok(Change {
        actor: &p,
        action: "key.delete",
        target: Scope::Key(id.clone()),
        before: Some(to_json(&before)?),
        after: None,
    }
    .answer(StatusCode::OK, deleted(&id)))
}
