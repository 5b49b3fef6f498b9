//! The per-request policy path: what a principal may use, limits, budget reservation
//! before any upstream call, and settlement with the audit record after it.
//!
//! Invariants:
//! - Admission is all or nothing: a request refused by one check holds nothing (its
//!   limit guard and reservation are released by drop).
//! - The worst-case cost (prompt estimate x the dearest candidate's input price + the
//!   output cap x its output price) is reserved before the first upstream byte, covered
//!   by its budget windows' durable holds (see `budget`).
//! - Settlement (actual cost, usage counters, the audit record) is one ledger batch,
//!   durable before the response (or the final `[DONE]`) reaches the client; if the
//!   client goes away, settlement still happens (detached).

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;

use super::budget::{BudgetError, BudgetExceeded, Budgets, Journal, ReservationHandle};
use super::limits::{LimitExceeded, LimitGuard, Limiter};
use super::model::{Principal, Scope, MICROS_PER_USD};
use crate::api::types::Usage;
use crate::error::ApiError;
use crate::ledger::{AuditEvent, Ledger, Op, RequestAudit, UsageCounters, UsageKey};
use crate::routing::catalog::ModelInfo;
use crate::routing::{ModelRoute, RequestFacts, Target};

/// Cost in micro-USD of `prompt` input and `completion` output tokens at a catalog price
/// (USD per million tokens), rounded up so budgets never under-count.
pub fn cost_micros(info: Option<&ModelInfo>, prompt: u64, completion: u64) -> u64 {
    let Some(i) = info else { return 0 };
    // USD/Mtok x tokens = micro-USD: the factors of a million cancel.
    let c = i.input_per_mtok * prompt as f64 + i.output_per_mtok * completion as f64;
    if c.is_finite() && c > 0.0 {
        c.ceil() as u64
    } else {
        0
    }
}

/// The budget journal over the real ledger (whose `submit` queues when called).
#[derive(Debug, Clone)]
pub struct LedgerJournal(pub Ledger);

impl Journal for LedgerJournal {
    fn hold(
        &self,
        budget_key: &str,
        micros: u64,
        tokens: u64,
        version: u64,
    ) -> BoxFuture<'static, Result<(), String>> {
        let done = self.0.submit(vec![Op::Hold {
            budget_key: budget_key.to_owned(),
            micros,
            tokens,
            version,
        }]);
        Box::pin(async move { done.await.map(drop).map_err(|e| e.to_string()) })
    }

    fn record(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(), String>> {
        let done = self.0.submit(ops);
        Box::pin(async move { done.await.map(drop).map_err(|e| e.to_string()) })
    }
}

/// Everything the policy path needs, held in the application state.
#[derive(Debug, Clone)]
pub struct Governance {
    pub limiter: Limiter,
    pub budgets: Budgets,
    pub ledger: Ledger,
    pub default_max_output_tokens: u64,
    /// Whether requests get audit records and usage counters (see `GovernanceConfig`).
    pub record_requests: bool,
}

/// Why a request was refused by policy.
fn limit_error(e: LimitExceeded) -> ApiError {
    ApiError::RateLimited {
        message: format!(
            "Rate limit reached: {} of {} {}.",
            e.limit,
            scope_name(&e.scope),
            scope_id(&e.scope)
        ),
        code: "rate_limit_exceeded",
        retry_after: e.retry_after,
    }
}

fn budget_error(e: BudgetExceeded) -> ApiError {
    ApiError::RateLimited {
        message: format!(
            "Budget exhausted: the {} of {} {} would be exceeded by this request.",
            if e.kind == "token_quota" {
                "token quota"
            } else {
                "budget"
            },
            scope_name(&e.scope),
            scope_id(&e.scope)
        ),
        code: if e.kind == "token_quota" {
            "token_quota_exceeded"
        } else {
            "budget_exceeded"
        },
        retry_after: None,
    }
}

fn scope_name(s: &Scope) -> &'static str {
    match s {
        Scope::Key(_) => "key",
        Scope::User(_) => "user",
        Scope::Team(_) => "team",
        Scope::Org(_) => "org",
    }
}

fn scope_id(s: &Scope) -> &str {
    match s {
        Scope::Key(id) | Scope::User(id) | Scope::Team(id) | Scope::Org(id) => id,
    }
}

/// An admitted request: holds its limit guard and budget reservation until settled.
#[derive(Debug)]
pub struct Admission {
    gov: Governance,
    principal: Arc<Principal>,
    request_id: String,
    route: &'static str,
    model: String,
    started: Instant,
    guard: Option<LimitGuard>,
    reservation: Option<ReservationHandle>,
    pub policy: Vec<String>,
    /// A soft budget threshold is crossed: the response carries a warning.
    pub soft_warning: bool,
}

/// How the request ended, for settlement and the audit record.
#[derive(Debug, Default)]
pub struct Outcome<'a> {
    pub target: Option<&'a Target>,
    pub usage: Option<&'a Usage>,
    pub status: u16,
    pub error_code: Option<String>,
    pub attempts: u32,
    pub routing: Option<String>,
    /// Request and response text; recorded only when the caller's team opted in.
    pub content: Option<serde_json::Value>,
}

impl Governance {
    /// Opens the ledger (charging reservations a crash left open) and loads budgets.
    pub fn open(
        store: &crate::store::Store,
        cfg: &crate::config::GovernanceConfig,
    ) -> Result<Governance, String> {
        let (ledger, recovered) = Ledger::open(
            store,
            crate::ledger::LedgerOptions {
                retention: cfg.audit_retention,
                ..crate::ledger::LedgerOptions::default()
            },
        )
        .map_err(|e| format!("cannot open the ledger: {e}"))?;
        if !recovered.reservations.is_empty() || !recovered.holds.is_empty() {
            tracing::warn!(
                reservations = recovered.reservations.len(),
                holds = recovered.holds.len(),
                "charged budget reservations and holds left by an earlier crash in full"
            );
        }
        let balances = ledger
            .balances_with_prefix("")
            .map_err(|e| format!("cannot read budget balances: {e}"))?;
        let budgets = Budgets::load_with(
            std::sync::Arc::new(LedgerJournal(ledger.clone())),
            balances,
            cfg.budget_hold_ahead,
        );
        Ok(Governance {
            limiter: Limiter::new(),
            budgets,
            ledger,
            default_max_output_tokens: cfg.default_max_output_tokens,
            record_requests: cfg.record_requests,
        })
    }

    /// Records a request that was never admitted (refused at the edge, invalid,
    /// unauthenticated), durably.
    pub async fn audit_unadmitted(&self, audit: RequestAudit) {
        if !self.record_requests {
            return;
        }
        if let Err(e) = self
            .ledger
            .submit(vec![Op::Audit(AuditEvent::Request(audit))])
            .await
        {
            tracing::error!(error = %e, "cannot write an audit record");
        }
    }

    /// Admits a request for `route` (already filtered by the allow-list): limits, then
    /// the worst-case reservation. `targets` are the candidates, for pricing.
    pub async fn admit(
        &self,
        principal: &Arc<Principal>,
        request_id: &str,
        route_label: &'static str,
        route: &ModelRoute,
        facts: &RequestFacts,
    ) -> Result<Admission, ApiError> {
        let mut policy = Vec::new();
        if !principal.allow.is_empty() {
            let labels: Vec<&str> = route
                .targets
                .iter()
                .map(|(t, _)| t.label.as_str())
                .collect();
            policy.push(format!("allow-list: {}", labels.join(", ")));
        }
        let guard = self
            .limiter
            .admit(principal, Instant::now(), facts.need())
            .map_err(limit_error)?;
        let worst_output = |t: &Target| {
            facts.output_cap.unwrap_or_else(|| {
                t.info
                    .as_ref()
                    .map(|i| u64::from(i.max_output))
                    .filter(|m| *m > 0)
                    .unwrap_or(self.default_max_output_tokens)
            })
        };
        let (worst_micros, worst_tokens) = route
            .targets
            .iter()
            .map(|(t, _)| {
                let out = worst_output(t);
                (
                    cost_micros(t.info.as_ref(), facts.prompt_tokens, out),
                    facts.prompt_tokens.saturating_add(out),
                )
            })
            .fold((0, 0), |(m, k), (a, b)| (m.max(a), k.max(b)));
        let reservation = self
            .budgets
            .reserve(principal, worst_micros, worst_tokens, now_ms())
            .await
            .map_err(|e| match e {
                BudgetError::Exceeded(b) => budget_error(b),
                BudgetError::Journal(msg) => {
                    ApiError::Internal(format!("cannot record the reservation: {msg}"))
                }
            })?;
        let soft = reservation.soft_exceeded();
        if worst_micros > 0 || worst_tokens > 0 {
            policy.push(format!(
                "reserved {worst_micros} micro-USD / {worst_tokens} tokens"
            ));
        }
        Ok(Admission {
            gov: self.clone(),
            principal: principal.clone(),
            request_id: request_id.to_string(),
            route: route_label,
            model: route.name.clone(),
            started: Instant::now(),
            guard: Some(guard),
            reservation: Some(reservation),
            policy,
            soft_warning: soft,
        })
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn day(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Admission {
    /// The ledger batch for this request's end: settlement, usage, audit.
    fn ops(&mut self, o: &Outcome<'_>) -> Vec<Op> {
        let (prompt, completion) = o
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens))
            .unwrap_or((0, 0));
        let cost = cost_micros(o.target.and_then(|t| t.info.as_ref()), prompt, completion);
        if let Some(g) = self.guard.take() {
            g.finish(prompt + completion);
        }
        let mut ops = Vec::new();
        if let Some(r) = self.reservation.take() {
            let settlement = r.settle(cost, prompt + completion);
            ops.extend(settlement.ops);
        }
        if !self.gov.record_requests {
            return ops;
        }
        let now = now_ms();
        let target = o.target.map(|t| t.label.clone());
        ops.push(Op::Usage {
            key: UsageKey {
                day: day(now),
                key_id: self.principal.key_id.clone(),
                user_id: self.principal.user_id.clone(),
                team_id: self.principal.team_id.clone(),
                org_id: self.principal.org_id.clone(),
                model: self.model.clone(),
                target: target.clone(),
            },
            delta: UsageCounters {
                requests: 1,
                errors: u64::from(o.status >= 400),
                prompt_tokens: prompt,
                completion_tokens: completion,
                cost_micros: cost,
                latency_ms_sum: self.started.elapsed().as_millis() as u64,
            },
        });
        ops.push(Op::Audit(AuditEvent::Request(RequestAudit {
            request_id: self.request_id.clone(),
            key_id: self.principal.key_id.clone(),
            user_id: self.principal.user_id.clone(),
            team_id: self.principal.team_id.clone(),
            org_id: self.principal.org_id.clone(),
            route: self.route.to_string(),
            model: self.model.clone(),
            target,
            attempts: o.attempts,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_micros: cost,
            latency_ms: self.started.elapsed().as_millis() as u64,
            status: o.status,
            error_code: o.error_code.clone(),
            routing: o.routing.clone(),
            policy: std::mem::take(&mut self.policy),
            content: if self.principal.log_content {
                o.content.clone()
            } else {
                None
            },
        })));
        ops
    }

    /// Settles and audits durably; returns once the ledger acknowledged.
    pub async fn finish(mut self, o: Outcome<'_>) -> Result<(), ApiError> {
        let ops = self.ops(&o);
        if ops.is_empty() {
            return Ok(());
        }
        self.gov
            .ledger
            .submit(ops)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::Internal(format!("cannot record the request: {e}")))
    }

    /// Whether the caller's team opted in to content in audit records.
    pub fn logs_content(&self) -> bool {
        self.principal.log_content
    }

    /// Settles in the background (the client went away; nobody waits).
    pub fn finish_detached(mut self, o: Outcome<'_>) {
        let ops = self.ops(&o);
        if ops.is_empty() {
            return;
        }
        let ledger = self.gov.ledger.clone();
        tokio::spawn(async move {
            if let Err(e) = ledger.submit(ops).await {
                tracing::error!(error = %e, "cannot record a request whose client went away");
            }
        });
    }
}

/// Micro-USD to USD, for messages and headers.
pub fn usd(micros: u64) -> f64 {
    micros as f64 / MICROS_PER_USD as f64
}
