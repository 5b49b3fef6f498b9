//! Admin routes over the ledger: budgets, usage analytics and the audit log.
//!
//! | route | what |
//! |---|---|
//! | `GET /admin/budgets?scope=team:<id>` | the scope's budget windows: limit, spent, reserved |
//! | `GET /admin/usage?from=&to=&group_by=` | requests, errors, tokens, cost and latency by key, user, team, org, model, target or day |
//! | `GET /admin/audit?from_seq=&limit=` | audit records in order |
//! | `GET /admin/audit/verify` | walks the hash chain; names the first bad record |
//! | `GET /admin/audit/export?from_ts=&to_ts=&key_id=&team_id=&model=` | JSONL |
//!
//! Invariant: all of them are reads, allowed to admins and auditors only (the roles
//! that may read audit and usage); nothing here changes state.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::routes::query;
use super::{Actor, AdminState};
use crate::error::ApiError;
use crate::governance::access::{can, Action, Resource};
use crate::governance::model::{Limits, Scope};
use crate::governance::policy::Governance;
use crate::ledger::{ExportFilter, UsageCounters};

fn gate(actor: &Actor, what: Resource<'_>) -> Result<(), AdminError> {
    if can(&actor.0, Action::Read, &what) {
        Ok(())
    } else {
        Err(AdminError::Forbidden)
    }
}

fn governance(state: &AdminState) -> Result<&Governance, AdminError> {
    state
        .governance
        .as_ref()
        .ok_or_else(|| AdminError::Api(ApiError::Internal("the ledger is not available".into())))
}

fn bad(param: &str, message: String) -> AdminError {
    AdminError::Api(ApiError::invalid(
        "invalid_value",
        Some(param.to_string()),
        message,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetQuery {
    scope: Option<String>,
}

fn parse_scope(s: &str) -> Option<Scope> {
    let (kind, id) = s.split_once(':')?;
    let id = id.to_string();
    if id.is_empty() {
        return None;
    }
    Some(match kind {
        "key" => Scope::Key(id),
        "user" => Scope::User(id),
        "team" => Scope::Team(id),
        "org" => Scope::Org(id),
        _ => return None,
    })
}

fn limits_of(state: &AdminState, scope: &Scope) -> Option<Limits> {
    let d = &state.directory;
    match scope {
        Scope::Key(id) => d.get_key(id).map(|k| k.limits),
        Scope::User(id) => d.get_user(id).map(|u| u.limits),
        Scope::Team(id) => d.get_team(id).map(|t| t.limits),
        Scope::Org(id) => d.get_org(id).map(|o| o.limits),
    }
}

pub async fn budgets(
    State(state): State<AdminState>,
    actor: Actor,
    q: Result<Query<BudgetQuery>, QueryRejection>,
) -> Result<Json<Value>, AdminError> {
    gate(&actor, Resource::Usage)?;
    let q = query(q)?;
    let gov = governance(&state)?;
    let raw = q.scope.unwrap_or_default();
    let scope = parse_scope(&raw).ok_or_else(|| {
        bad(
            "scope",
            format!("Invalid 'scope': {raw:?} is not key:<id>, user:<id>, team:<id> or org:<id>."),
        )
    })?;
    let limits = limits_of(&state, &scope).ok_or_else(|| AdminError::NotFound {
        kind: "scope",
        id: raw.clone(),
    })?;
    let mut rows = gov.budgets.status(&scope, None);
    if let Some(cur) = gov
        .budgets
        .current(&scope, &limits, crate::governance::directory::now_ms())
    {
        rows.retain(|r| r.budget_key != cur.budget_key);
        rows.push(cur);
    }
    Ok(Json(json!({"object": "list", "scope": raw, "data": rows})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

fn valid_day(d: &str) -> bool {
    d.len() == 10
        && d.as_bytes().iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

pub async fn usage(
    State(state): State<AdminState>,
    actor: Actor,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Value>, AdminError> {
    gate(&actor, Resource::Usage)?;
    let q = query(q)?;
    let gov = governance(&state)?;
    let today = crate::governance::budget::window_start(
        crate::governance::model::Period::Daily,
        crate::governance::directory::now_ms(),
    );
    let from = q.from.unwrap_or_else(|| "0000-01-01".to_string());
    let to = q.to.unwrap_or(today);
    for (p, v) in [("from", &from), ("to", &to)] {
        if !valid_day(v) {
            return Err(bad(
                p,
                format!("Invalid '{p}': {v:?} is not a day like 2026-11-25."),
            ));
        }
    }
    let group_by = q.group_by.unwrap_or_else(|| "model".to_string());
    let rows = gov
        .ledger
        .usage(&from, &to)
        .map_err(|e| AdminError::Api(ApiError::Internal(e.to_string())))?;
    let data = group_usage(rows, &group_by).map_err(|m| bad("group_by", m))?;
    Ok(Json(
        json!({"object": "list", "from": from, "to": to, "group_by": group_by, "data": data}),
    ))
}

/// Sums usage rows by one dimension (`key`, `user`, `team`, `org`, `model`, `target`,
/// `day`) into JSON rows; shared by the admin API and `airlock usage`.
pub fn group_usage(
    rows: Vec<(crate::ledger::UsageKey, UsageCounters)>,
    group_by: &str,
) -> Result<Vec<Value>, String> {
    let mut groups: BTreeMap<String, UsageCounters> = BTreeMap::new();
    for (k, c) in rows {
        let key = match group_by {
            "key" => k.key_id,
            "user" => k.user_id.unwrap_or_default(),
            "team" => k.team_id.unwrap_or_default(),
            "org" => k.org_id,
            "model" => k.model,
            "target" => k.target.unwrap_or_default(),
            "day" => k.day,
            other => {
                return Err(format!(
                    "Invalid 'group_by': {other:?} is not one of key, user, team, org, model, target, day."
                ))
            }
        };
        groups.entry(key).or_default().add(&c);
    }
    Ok(groups
        .into_iter()
        .map(|(k, c)| {
            json!({
                group_by: k,
                "requests": c.requests,
                "errors": c.errors,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "cost_micros": c.cost_micros,
                "cost_usd": c.cost_micros as f64 / 1e6,
                "avg_latency_ms": c.latency_ms_sum.checked_div(c.requests).unwrap_or(0),
            })
        })
        .collect())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    from_seq: Option<u64>,
    limit: Option<usize>,
}

pub async fn audit(
    State(state): State<AdminState>,
    actor: Actor,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Value>, AdminError> {
    gate(&actor, Resource::Audit)?;
    let q = query(q)?;
    let gov = governance(&state)?;
    let limit = q.limit.unwrap_or(100).min(1000);
    let records = gov
        .ledger
        .audit_from(q.from_seq.unwrap_or(1))
        .take(limit)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AdminError::Api(ApiError::Internal(e.to_string())))?;
    Ok(Json(json!({"object": "list", "data": records})))
}

pub async fn verify(
    State(state): State<AdminState>,
    actor: Actor,
) -> Result<Json<Value>, AdminError> {
    gate(&actor, Resource::Audit)?;
    let gov = governance(&state)?;
    let report = crate::ledger::verify(gov.ledger.tree());
    Ok(Json(json!({
        "ok": report.first_bad.is_none(),
        "records": report.records,
        "first_bad": report.first_bad.as_ref().map(|(seq, why)| json!({"seq": seq, "reason": why})),
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    from_ts: Option<i64>,
    to_ts: Option<i64>,
    key_id: Option<String>,
    team_id: Option<String>,
    model: Option<String>,
}

pub async fn export(
    State(state): State<AdminState>,
    actor: Actor,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    gate(&actor, Resource::Audit)?;
    let q = query(q)?;
    let gov = governance(&state)?;
    let filter = ExportFilter {
        from_ts: q.from_ts,
        to_ts: q.to_ts,
        key_id: q.key_id,
        team_id: q.team_id,
        model: q.model,
    };
    let mut out = Vec::new();
    crate::ledger::export(gov.ledger.tree(), &filter, &mut out)
        .map_err(|e| AdminError::Api(ApiError::Internal(e.to_string())))?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}
