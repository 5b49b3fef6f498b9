//! Governance end to end: the real binary with keys, teams and budgets made through the
//! admin API, in front of OpenAI-kind mocks.
//!
//! - budget and rate-limit races: 1,000 concurrent requests against a budget that allows
//!   exactly 100 of them (and an `rpm_limit` of 100): exactly 100 admitted, ever;
//! - crash durability: `kill -9` under load, then the audit log (CLI `audit verify` and
//!   `audit export`) holds every answer a client received, and the budget holds what was
//!   spent, never above its limit;
//! - the audit chain after normal traffic and after restarts; export filters;
//! - access: missing, malformed, wrong, revoked and expired keys; roles on `/admin`;
//!   path variants of admin routes;
//! - model allow-lists; no secret in logs, audit export, error bodies or `/metrics`;
//! - soft budgets and token quotas;
//! - the ledger's admin routes: admins only, OpenAI-shaped errors for bad queries.
//!
//! Prices: every test routes model `budget` to `p1/budget-model`, which the config's
//! `[[catalog]]` prices at 0 per input token and 1 USD per million output tokens, and
//! the mock reports `completion_tokens` equal to the request's `max_tokens`
//! ([`MockUpstream::report_max_tokens_as_completion`]). A request with `max_tokens =
//! 1000` therefore reserves exactly 1000 micro-USD (its worst case) and costs exactly
//! 1000 micro-USD, whatever its prompt.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_e2e::gateway::{
    assert_error_shape, error_shape_problem, http_client, run_airlock, HttpReply,
    DEFAULT_MASTER_KEY,
};
use airlock_e2e::mock::{Fault, MockUpstream, ProviderKind, OPENAI_KEY};
use airlock_e2e::{ConfigBuilder, Gateway};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
/// The client model name every test calls; it costs exactly [`COST`] per request.
const MODEL: &str = "budget";
/// `max_tokens` of every priced request.
const MAX_TOKENS: u64 = 1000;
/// Worst case and actual cost of one priced request, in micro-USD.
const COST: u64 = 1000;

/// The `[[models]]` and `[[catalog]]` sections of every test (providers `p1`, `p2`).
const MODELS_TOML: &str = r#"
[[models]]
name = "budget"
targets = ["p1/budget-model"]

[[models]]
name = "other"
targets = ["p2/other-model"]

[[catalog]]
name = "budget-model"
input_per_mtok = 0.0
output_per_mtok = 1.0
context_window = 100000
max_output = 4096

[[catalog]]
name = "other-model"
input_per_mtok = 0.0
output_per_mtok = 1.0
context_window = 100000
max_output = 4096
"#;

// ---------------------------------------------------------------------------------
// Setup

/// Two OpenAI-kind mocks (`p1`, `p2`) reporting `completion_tokens = max_tokens`.
struct Rig {
    p1: MockUpstream,
    p2: MockUpstream,
    toml: String,
    env: Vec<(String, String)>,
}

impl Rig {
    async fn new() -> Rig {
        Self::with_provider_key(OPENAI_KEY).await
    }

    /// As [`Rig::new`], the mocks demanding `provider_key`.
    async fn with_provider_key(provider_key: &str) -> Rig {
        let p1 = MockUpstream::start(ProviderKind::OpenAi, provider_key).await;
        let p2 = MockUpstream::start(ProviderKind::OpenAi, provider_key).await;
        p1.report_max_tokens_as_completion(true);
        p2.report_max_tokens_as_completion(true);
        let b = ConfigBuilder::new().provider("p1", &p1).provider("p2", &p2);
        let toml = format!("{}\n{MODELS_TOML}", b.toml());
        Rig {
            p1,
            p2,
            toml,
            env: b.env_vars(),
        }
    }

    fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    /// A gateway with its own temp data dir.
    async fn start(&self) -> Gateway {
        self.start_env(&[]).await
    }

    async fn start_env(&self, extra: &[(&str, &str)]) -> Gateway {
        let env = self.env(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Gateway::start(&self.toml, &env).await
    }

    /// A gateway on `data_dir` (kept across restarts).
    async fn start_on(&self, data_dir: &Path) -> Gateway {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let dir = data_dir.to_string_lossy().into_owned();
        Gateway::start_with_args(&self.toml, &env, &["--data-dir", &dir]).await
    }
}

/// A priced chat body: worst case and actual cost exactly [`COST`].
fn priced(text: &str) -> Value {
    json!({
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": text}],
    })
}

fn priced_stream(text: &str) -> Value {
    let mut b = priced(text);
    b["stream"] = json!(true);
    b
}

// ---------------------------------------------------------------------------------
// Admin API (as the master key)

async fn admin_post(gw: &Gateway, path: &str, body: Value) -> Value {
    gw.post_json(path, &body).await.expect_status(201)
}

async fn admin_patch(gw: &Gateway, path: &str, body: &Value) -> HttpReply {
    let resp = gw.client().patch(gw.url(path)).json(body).send().await;
    HttpReply::read(resp.unwrap_or_else(|e| panic!("PATCH {path}: {e}\n{}", gw.stderr()))).await
}

async fn new_org(gw: &Gateway, name: &str) -> String {
    let o = admin_post(gw, "/admin/orgs", json!({ "name": name })).await;
    o["id"].as_str().expect("org id").to_string()
}

async fn new_team(gw: &Gateway, org_id: &str, name: &str, limits: Value) -> String {
    let t = admin_post(
        gw,
        "/admin/teams",
        json!({ "org_id": org_id, "name": name, "limits": limits }),
    )
    .await;
    t["id"].as_str().expect("team id").to_string()
}

async fn new_user(gw: &Gateway, team_id: &str, name: &str, role: &str) -> String {
    let u = admin_post(
        gw,
        "/admin/users",
        json!({ "team_id": team_id, "name": name, "role": role }),
    )
    .await;
    u["id"].as_str().expect("user id").to_string()
}

/// A key made by the master key from `body`: `(public id, full key)`.
async fn new_key(gw: &Gateway, body: Value) -> (String, String) {
    key_from(&admin_post(gw, "/admin/keys", body).await)
}

fn key_from(created: &Value) -> (String, String) {
    let id = created["id"].as_str().expect("key id").to_string();
    let key = created["key"]
        .as_str()
        .unwrap_or_else(|| panic!("POST /admin/keys answered without `key`: {created}"))
        .to_string();
    assert!(
        key.contains(&id),
        "the full key {key:?} should embed its public id {id}"
    );
    (id, key)
}

/// An org with one team (with `team_limits`) and a service key of that team (with
/// `key_limits`): `(team id, key id, full key)`.
async fn team_key(gw: &Gateway, team_limits: Value, key_limits: Value) -> (String, String, String) {
    let org = new_org(gw, "acme").await;
    let team = new_team(gw, &org, "research", team_limits).await;
    let (id, key) = new_key(
        gw,
        json!({ "name": "svc", "team_id": team, "limits": key_limits }),
    )
    .await;
    (team, id, key)
}

/// `GET /admin/budgets?scope=SCOPE` -> `data`, with the route missing reported as such.
async fn budgets(gw: &Gateway, scope: &str) -> Vec<Value> {
    let path = format!("/admin/budgets?scope={scope}");
    let r = gw.get(&path).await;
    assert_eq!(
        r.status, 200,
        "GET {path} (as the master key): expected 200 with the budget windows, got {} {}",
        r.status, r.text
    );
    let body = r.json();
    assert_eq!(body["object"], "list", "GET {path}: {body}");
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("GET {path}: no `data` list in {body}"))
        .clone()
}

/// The one budget window of `scope` (the tests use `budget_duration = total`).
async fn budget_window(gw: &Gateway, scope: &str) -> Value {
    let data = budgets(gw, scope).await;
    let mine: Vec<&Value> = data
        .iter()
        .filter(|w| {
            w["budget_key"]
                .as_str()
                .is_some_and(|k| k.starts_with(&format!("{scope}|")))
        })
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "GET /admin/budgets?scope={scope}: expected exactly one window of {scope}, got {data:?}"
    );
    mine[0].clone()
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` is not an unsigned integer in {v}"))
}

// ---------------------------------------------------------------------------------
// Calling models with a key

async fn send(client: &reqwest::Client, gw: &Gateway, path: &str, body: &Value) -> HttpReply {
    let resp = client.post(gw.url(path)).json(body).send().await;
    HttpReply::read(resp.unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", gw.stderr()))).await
}

async fn get_as(client: &reqwest::Client, gw: &Gateway, path: &str) -> HttpReply {
    let resp = client.get(gw.url(path)).send().await;
    HttpReply::read(resp.unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", gw.stderr()))).await
}

/// A request with a raw `Authorization` header value (or none).
async fn with_auth(gw: &Gateway, auth: Option<&str>, path: &str, body: &Value) -> HttpReply {
    let mut req = gw.anon_client().post(gw.url(path)).json(body);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    HttpReply::read(req.send().await.expect("send")).await
}

/// A 200 chat answer with usage `completion_tokens = MAX_TOKENS`.
fn assert_priced_ok(r: &HttpReply) {
    let body = r.expect_status(200);
    assert_eq!(
        body["usage"]["completion_tokens"], MAX_TOKENS,
        "usage of a priced request: {body}"
    );
    assert!(
        r.header("x-airlock-request-id").is_some(),
        "every answer names its request id"
    );
}

// ---------------------------------------------------------------------------------
// Small utilities

/// splitmix64: a seeded generator for jitter and kill moments.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD` (UTC) of `days` after today.
fn utc_day(offset_days: i64) -> String {
    let z = now_ms().div_euclid(86_400_000) + offset_days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `airlock audit verify --data-dir DIR`: asserts exit 0 and `audit log OK: N records`;
/// returns N.
async fn audit_verify(data_dir: &Path) -> u64 {
    let dir = data_dir.to_string_lossy().into_owned();
    let out = run_airlock(&["audit", "verify", "--data-dir", &dir], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "`airlock audit verify --data-dir {dir}`: expected exit 0, got {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let n = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("audit log OK: ")
                .and_then(|r| r.strip_suffix(" records"))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or_else(|| {
            panic!("`airlock audit verify`: expected `audit log OK: N records`, got stdout {stdout:?} stderr {stderr:?}")
        });
    n
}

/// `airlock audit export --data-dir DIR ARGS...`: asserts exit 0; returns the raw
/// lines and the records parsed from them.
async fn audit_export(data_dir: &Path, args: &[&str]) -> (Vec<String>, Vec<Value>) {
    let dir = data_dir.to_string_lossy().into_owned();
    let mut all = vec!["audit", "export", "--data-dir", dir.as_str()];
    all.extend_from_slice(args);
    let out = run_airlock(&all, &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`airlock {}`: expected exit 0, got {:?}\nstderr: {}",
        all.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let records = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("audit export line is not JSON ({e}): {l}"))
        })
        .collect();
    (lines, records)
}

fn request_records(records: &[Value]) -> impl Iterator<Item = &Value> {
    records.iter().filter(|r| r["kind"] == "request")
}

/// Stops `gw` with SIGTERM and asserts a clean exit.
async fn stop_clean(gw: &mut Gateway) {
    let status = gw.stop().await;
    assert!(
        status.success(),
        "airlock should exit 0 on SIGTERM, got {status}\n{}",
        gw.stderr()
    );
}

// ---------------------------------------------------------------------------------
// 1. Budget race

/// Fires `n` requests at once (each after a seeded jitter of up to 20 ms) with `key`;
/// returns every reply.
async fn storm(gw: &Gateway, key: &str, n: usize, seed: u64, body: Value) -> Vec<HttpReply> {
    let client = http_client(Some(key));
    let url = gw.url(CHAT);
    let mut rng = Rng(seed);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let jitter = Duration::from_micros(rng.below(20_000));
        let client = client.clone();
        let url = url.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(jitter).await;
            let resp = client.post(url).json(&body).send().await;
            match resp {
                Ok(r) => Ok(HttpReply::read(r).await),
                Err(e) => Err(e.to_string()),
            }
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        match t.await.expect("request task") {
            Ok(r) => out.push(r),
            Err(e) => panic!(
                "a request of the storm failed at the transport: {e}\n{}",
                gw.stderr()
            ),
        }
    }
    out
}

/// Counts replies by `(status, error code)`.
fn tally(replies: &[HttpReply]) -> BTreeMap<(u16, String), usize> {
    let mut t = BTreeMap::new();
    for r in replies {
        let code = r.error_code().unwrap_or_default();
        *t.entry((r.status, code)).or_insert(0) += 1;
    }
    t
}

async fn budget_race(seed: u64) {
    let rig = Rig::new().await;
    let gw = rig.start().await;
    let limit = 100 * COST;
    let (team, key_id, key) = team_key(
        &gw,
        json!({ "max_budget_micros": limit, "budget_duration": "total" }),
        json!({}),
    )
    .await;

    let started = Instant::now();
    let replies = storm(&gw, &key, 1000, seed, priced("race for the budget")).await;
    let t = tally(&replies);
    let ok = t.get(&(200, String::new())).copied().unwrap_or(0);
    let refused = t
        .get(&(429, "budget_exceeded".to_string()))
        .copied()
        .unwrap_or(0);
    assert!(
        ok == 100 && refused == 900,
        "seed {seed}: a budget of {limit} micro-USD at {COST} per request admits exactly \
         100 of 1000 concurrent requests and refuses 900 with 429 budget_exceeded; got {t:?} \
         in {:?}",
        started.elapsed()
    );
    for r in &replies {
        if r.status == 200 {
            assert_priced_ok(r);
        } else {
            r.expect_error(429, "budget_exceeded");
        }
    }
    assert_eq!(
        rig.p1.request_count(),
        100,
        "seed {seed}: only admitted requests reach the upstream"
    );

    let w = budget_window(&gw, &format!("team:{team}")).await;
    assert_eq!(num(&w, "limit_micros"), limit, "team window {w}");
    assert_eq!(
        num(&w, "spent_micros"),
        100 * COST,
        "seed {seed}: the team spent exactly 100 requests' worth: {w}"
    );
    assert_eq!(num(&w, "reserved_micros"), 0, "nothing is in flight: {w}");

    // Usage by team for today: what the 100 admitted requests cost.
    let path = format!(
        "/admin/usage?from={}&to={}&group_by=team",
        utc_day(-1),
        utc_day(1)
    );
    let usage = gw.get(&path).await;
    assert_eq!(usage.status, 200, "GET {path}: {}", usage.text);
    let usage = usage.json();
    let rows: Vec<&Value> = usage["data"]
        .as_array()
        .unwrap_or_else(|| panic!("GET {path}: no `data` list in {usage}"))
        .iter()
        .filter(|r| r.to_string().contains(&team))
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "GET {path}: one row for team {team}: {usage}"
    );
    let row = rows[0];
    assert_eq!(num(row, "cost_micros"), 100 * COST, "usage row {row}");
    assert_eq!(
        num(row, "completion_tokens"),
        100 * MAX_TOKENS,
        "usage row {row}"
    );
    assert_eq!(
        num(row, "requests") - num(row, "errors"),
        100,
        "usage row: successful requests {row}"
    );
    // The key has no limits of its own: its listing holds no spending of the team's.
    for w in budgets(&gw, &format!("key:{key_id}")).await {
        assert!(
            w["budget_key"]
                .as_str()
                .is_some_and(|k| k.starts_with(&format!("key:{key_id}|"))),
            "GET /admin/budgets?scope=key:{key_id} lists only that key's windows: {w}"
        );
        assert_eq!(
            w["spent_micros"], 0,
            "the key has no budget of its own: {w}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_race_admits_exactly_what_the_budget_allows_seed_1() {
    budget_race(0x5eed_0001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_race_admits_exactly_what_the_budget_allows_seed_2() {
    budget_race(0xdead_beef_cafe).await;
}

// ---------------------------------------------------------------------------------
// 2. Rate-limit race

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_race_admits_exactly_the_limit() {
    let rig = Rig::new().await;
    let gw = rig.start().await;
    let (_team, _key_id, key) = team_key(&gw, json!({}), json!({ "rpm_limit": 100 })).await;

    let replies = storm(&gw, &key, 1000, 0x7a7e, priced("race for the rate")).await;
    let t = tally(&replies);
    let ok = t.get(&(200, String::new())).copied().unwrap_or(0);
    let refused = t
        .get(&(429, "rate_limit_exceeded".to_string()))
        .copied()
        .unwrap_or(0);
    assert!(
        ok == 100 && refused == 900,
        "rpm_limit = 100 admits exactly 100 of 1000 concurrent requests and refuses 900 \
         with 429 rate_limit_exceeded; got {t:?}"
    );
    for r in replies.iter().filter(|r| r.status == 429) {
        r.expect_error(429, "rate_limit_exceeded");
        let retry = r.header("retry-after").unwrap_or_else(|| {
            panic!(
                "a rate-limit refusal carries Retry-After; headers {:?}",
                r.headers
            )
        });
        let secs: u64 = retry
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After should be whole seconds, got {retry:?}"));
        assert!(
            (1..=60).contains(&secs),
            "Retry-After within the 60 s window, got {secs}"
        );
    }
    assert_eq!(
        rig.p1.request_count(),
        100,
        "only admitted requests go upstream"
    );
}

// ---------------------------------------------------------------------------------
// 3. Crash durability

/// What the load clients saw.
#[derive(Debug, Default)]
struct Delivered {
    /// Request ids whose answer was fully received (200 and the whole body, or `[DONE]`).
    ids: Vec<String>,
    /// Replies by status (0: transport error).
    statuses: BTreeMap<u16, usize>,
}

/// One request; `Some(request id)` when its answer was fully delivered.
async fn one_request(
    client: &reqwest::Client,
    url: &str,
    stream: bool,
    n: u64,
) -> Result<(u16, Option<String>), String> {
    let text = format!("crash load {n}");
    let body = if stream {
        priced_stream(&text)
    } else {
        priced(&text)
    };
    let mut resp = client
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-airlock-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if status != 200 {
        let _ = resp.bytes().await;
        return Ok((status, None));
    }
    let id = id.ok_or("a 200 without x-airlock-request-id")?;
    if stream {
        let mut seen = String::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    seen.push_str(&String::from_utf8_lossy(&c));
                    if seen.contains("data: [DONE]") {
                        return Ok((200, Some(id)));
                    }
                }
                Ok(None) | Err(_) => return Ok((200, None)),
            }
        }
    } else {
        match resp.bytes().await {
            Ok(b) => {
                let v: Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
                let full = v["choices"].is_array() && v["usage"].is_object();
                Ok((200, full.then_some(id)))
            }
            Err(_) => Ok((200, None)),
        }
    }
}

/// 8 clients looping requests (every third one streamed) until the gateway dies.
async fn load_until_killed(gw: &mut Gateway, key: &str, kill_after: Duration) -> Delivered {
    let out = Arc::new(Mutex::new(Delivered::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = http_client(Some(key));
    let url = gw.url(CHAT);
    let mut tasks = Vec::new();
    for c in 0..8u64 {
        let client = client.clone();
        let url = url.clone();
        let out = out.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let stream = (n + c).is_multiple_of(3);
                let r = one_request(&client, &url, stream, c * 1_000_000 + n).await;
                n += 1;
                let mut o = out.lock().unwrap();
                match r {
                    Ok((status, id)) => {
                        *o.statuses.entry(status).or_insert(0) += 1;
                        o.ids.extend(id);
                    }
                    Err(_) => {
                        *o.statuses.entry(0).or_insert(0) += 1;
                        // After the kill every request fails at the transport.
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(kill_after).await;
    let pid = gw.pid().to_string();
    stop.store(true, Ordering::SeqCst);
    let status = tokio::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .await
        .expect("run kill -9");
    assert!(status.success(), "kill -9 {pid}: {status}");
    assert!(
        gw.wait_exit(Duration::from_secs(10)).await.is_some(),
        "the gateway should be gone after kill -9"
    );
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("load clients stop once the gateway is gone")
            .expect("load client task");
    }
    let mut o = out.lock().unwrap();
    std::mem::take(&mut *o)
}

/// The crash cycle, three times on ONE data dir that accumulates: each cycle loads the
/// gateway, kills it with SIGKILL 100-600 ms in, restarts it (recovery), stops it
/// gracefully, checks the audit log with the CLI, and checks the budget through a third
/// start, which the next cycle's load does not reuse (each cycle starts afresh on the
/// same dir). Checks, cumulative over the cycles:
/// - `audit verify` passes;
/// - every delivered request id has its request record, status 200, cost [`COST`];
/// - spent >= delivered x [`COST`], spent <= the limit, nothing reserved after restart,
///   and spent = the sum of request costs + the reservations recovered after crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_delivered_request() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(42);
    eprintln!("crash test seed: {seed}");
    let mut rng = Rng(seed);
    let rig = Rig::new().await;
    // Short streams so that some are in flight at the kill.
    rig.p1
        .fail_always(Fault::SlowStream(Duration::from_millis(5)));
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let limit = 350 * COST;

    let mut key: Option<(String, String)> = None;
    let mut delivered: HashSet<String> = HashSet::new();
    for cycle in 1..=3 {
        let mut gw = rig.start_on(&data).await;
        let (key_id, full) = match &key {
            Some(k) => k.clone(),
            None => {
                let (_t, id, full) = team_key(
                    &gw,
                    json!({}),
                    json!({ "max_budget_micros": limit, "budget_duration": "total" }),
                )
                .await;
                key = Some((id.clone(), full.clone()));
                (id, full)
            }
        };
        let kill_after = Duration::from_millis(100 + rng.below(501));
        let d = load_until_killed(&mut gw, &full, kill_after).await;
        eprintln!(
            "cycle {cycle}: killed after {kill_after:?}; {} delivered; replies {:?}",
            d.ids.len(),
            d.statuses
        );
        let unexpected: Vec<_> = d
            .statuses
            .keys()
            .filter(|s| ![0, 200, 429].contains(*s))
            .collect();
        assert!(
            unexpected.is_empty(),
            "cycle {cycle}: only 200, 429 (budget) or a broken connection expected, got {:?}\n{}",
            d.statuses,
            gw.stderr()
        );
        let before = delivered.len();
        let fresh = d.ids.len();
        delivered.extend(d.ids);
        assert_eq!(
            delivered.len(),
            before + fresh,
            "cycle {cycle}: every delivered answer has its own request id"
        );
        drop(gw);

        // Restart: recovery charges what the crash left open, before the first request;
        // then a clean stop.
        let mut gw = rig.start_on(&data).await;
        let w = budget_window(&gw, &format!("key:{key_id}")).await;
        assert_eq!(
            num(&w, "reserved_micros"),
            0,
            "cycle {cycle}: recovery leaves nothing reserved: {w}"
        );
        assert!(num(&w, "spent_micros") <= limit, "cycle {cycle}: {w}");
        stop_clean(&mut gw).await;
        drop(gw);

        let verified = audit_verify(&data).await;
        let (_lines, records) = audit_export(&data, &[]).await;
        assert_eq!(
            verified as usize,
            records.len(),
            "cycle {cycle}: `audit verify` counts every exported record"
        );
        let mut by_id: BTreeMap<&str, &Value> = BTreeMap::new();
        for r in request_records(&records) {
            if let Some(id) = r["request_id"].as_str() {
                by_id.insert(id, r);
            }
        }
        let missing: Vec<&String> = delivered
            .iter()
            .filter(|id| !by_id.get(id.as_str()).is_some_and(|r| r["status"] == 200))
            .collect();
        assert!(
            missing.is_empty(),
            "cycle {cycle}: {} of {} delivered answers have no audit record with status 200: {:?}",
            missing.len(),
            delivered.len(),
            missing
                .iter()
                .take(5)
                .map(|id| (id, by_id.get(id.as_str())))
                .collect::<Vec<_>>()
        );
        for id in &delivered {
            let r = by_id[id.as_str()];
            assert_eq!(r["cost_micros"], COST, "cost of a delivered request: {r}");
            assert_eq!(r["key_id"], key_id.as_str(), "key of {r}");
        }
        // What the budget must hold: every request's cost plus every recovered
        // reservation, charged in full.
        let billed: u64 = request_records(&records)
            .filter(|r| r["key_id"] == key_id.as_str())
            .map(|r| r["cost_micros"].as_u64().unwrap_or(0))
            .sum();
        let prefix = format!("key:{key_id}|");
        // Recovery charges each window's durable hold (older stores: each open
        // reservation) in full.
        let recovered_charges: Vec<Value> = records
            .iter()
            .flat_map(|r| match r["kind"].as_str() {
                Some("reservation_recovered") => r
                    .pointer("/reservation/charges")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                Some("hold_recovered") => vec![r["hold"].clone()],
                _ => Vec::new(),
            })
            .filter(|c| {
                c["budget_key"]
                    .as_str()
                    .is_some_and(|k| k.starts_with(&prefix))
            })
            .collect();
        let recovered: u64 = recovered_charges
            .iter()
            .map(|c| c["micros"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            recovered_charges.len() <= cycle,
            "cycle {cycle}: at most one recovered hold per crash for the key's window (clean \
             stops give holds back): {recovered_charges:?}"
        );

        let mut gw = rig.start_on(&data).await;
        let w = budget_window(&gw, &format!("key:{key_id}")).await;
        let spent = num(&w, "spent_micros");
        eprintln!(
            "cycle {cycle}: spent {spent}, billed {billed}, recovered {recovered}, delivered {}",
            delivered.len()
        );
        assert!(
            spent >= delivered.len() as u64 * COST,
            "cycle {cycle}: spent {spent} must cover the {} delivered answers at {COST} each: {w}",
            delivered.len()
        );
        assert!(
            spent <= limit,
            "cycle {cycle}: spent {spent} must never exceed the limit {limit}: {w}"
        );
        assert_eq!(
            num(&w, "reserved_micros"),
            0,
            "nothing in flight after a restart: {w}"
        );
        assert_eq!(
            spent,
            billed + recovered,
            "cycle {cycle}: spent = request costs in the audit log ({billed}) + recovered \
             holds ({recovered})"
        );
        stop_clean(&mut gw).await;
    }
    assert!(
        !delivered.is_empty(),
        "the load delivered nothing in three cycles: the test proved nothing"
    );
}

/// A supervisor may stop the gateway as soon as it announced its address: SIGTERM
/// then must be the graceful stop (exit 0), not the default action of the signal.
#[tokio::test]
async fn sigterm_right_after_the_address_line_is_a_clean_stop() {
    let rig = Rig::new().await;
    for attempt in 1..=5 {
        // A shell already waiting to send the signal: no fork between the address line
        // and SIGTERM (the builtin `kill`), as a supervisor reacting at once would be.
        let mut killer = tokio::process::Command::new("sh")
            .args(["-c", "read pid; kill -TERM \"$pid\""])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut stdin = killer.stdin.take().expect("sh stdin");
        let mut gw = rig.start().await;
        tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{}\n", gw.pid()).as_bytes())
            .await
            .expect("hand the pid to sh");
        drop(stdin);
        assert!(killer.wait().await.expect("sh").success(), "kill -TERM");
        let status = gw
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("the gateway exits within 30 s of SIGTERM");
        assert!(
            status.success(),
            "attempt {attempt}: SIGTERM sent right after `airlock listening on ...` should \
             stop the gateway gracefully with exit 0, got {status} (the signal handler is \
             not yet installed when the address is announced)\n{}",
            gw.stderr()
        );
    }
}

// ---------------------------------------------------------------------------------
// 4. Audit chain after traffic and restarts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_verifies_after_traffic_and_restart() {
    let rig = Rig::new().await;
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");

    let mut gw = rig.start_on(&data).await;
    let (_team, key_id, key) = team_key(&gw, json!({}), json!({})).await;
    let (other_id, other_key) = {
        let org = new_org(&gw, "other").await;
        new_key(&gw, json!({ "name": "o", "org_id": org })).await
    };
    let c = http_client(Some(&key));
    for i in 0..5 {
        assert_priced_ok(&send(&c, &gw, CHAT, &priced(&format!("hello {i}"))).await);
    }
    // Failures get records too.
    send(
        &c,
        &gw,
        CHAT,
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await
    .expect_error(404, "model_not_found");
    rig.p1.fail_next(Fault::Status(500));
    let failed = send(&c, &gw, CHAT, &priced("upstream fails")).await;
    assert!(
        failed.status >= 500,
        "upstream 500 passes as a 5xx: {}",
        failed.text
    );
    let oc = http_client(Some(&other_key));
    assert_priced_ok(
        &send(
            &oc,
            &gw,
            CHAT,
            &json!({
                "model": "other", "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": "other model"}]
            }),
        )
        .await,
    );

    let live = gw.get("/admin/audit/verify").await;
    assert_eq!(
        live.status, 200,
        "GET /admin/audit/verify (master key) on an intact log: {}",
        live.text
    );
    let live = live.json();
    assert!(
        live["ok"] == true && live["records"].as_u64().is_some_and(|n| n > 0),
        "GET /admin/audit/verify on an intact log: {live}"
    );
    stop_clean(&mut gw).await;
    drop(gw);

    let first = audit_verify(&data).await;
    let (_, records) = audit_export(&data, &[]).await;
    assert_eq!(first as usize, records.len(), "verify and export agree");
    let mine = request_records(&records)
        .filter(|r| r["key_id"] == key_id.as_str())
        .count();
    assert!(
        mine >= 7,
        "all 7 requests of the key are audited, found {mine}"
    );
    let seqs: Vec<u64> = records.iter().map(|r| num(r, "seq")).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "export is in sequence order without gaps: {seqs:?}"
    );

    // Export filters.
    let (_, by_key) = audit_export(&data, &["--key", &key_id]).await;
    assert!(
        !by_key.is_empty() && by_key.iter().all(|r| r["key_id"] == key_id.as_str()),
        "--key {key_id} exports only that key's records: {by_key:?}"
    );
    assert_eq!(
        by_key.len(),
        mine,
        "--key exports all of that key's request records"
    );
    let (_, by_model) = audit_export(&data, &["--model", "other"]).await;
    assert!(
        !by_model.is_empty()
            && by_model
                .iter()
                .all(|r| r["model"] == "other" && r["key_id"] == other_id.as_str()),
        "--model other exports only requests for `other`: {by_model:?}"
    );
    let last_ts = records
        .iter()
        .map(|r| r["ts"].as_i64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let (_, later) = audit_export(&data, &["--from", &(last_ts + 1).to_string()]).await;
    assert!(
        later.is_empty(),
        "--from after the last record exports nothing: {later:?}"
    );

    // Restart, more traffic, verify again.
    let mut gw = rig.start_on(&data).await;
    for i in 0..3 {
        assert_priced_ok(&send(&c, &gw, CHAT, &priced(&format!("again {i}"))).await);
    }
    stop_clean(&mut gw).await;
    drop(gw);
    let second = audit_verify(&data).await;
    assert!(
        second >= first + 3,
        "the chain continues across a restart: {first} records, then {second}"
    );
}

// ---------------------------------------------------------------------------------
// 5. Access

/// A 401 in OpenAI's shape that names no key.
fn assert_unauthorized(r: &HttpReply, what: &str) {
    assert_eq!(
        r.status, 401,
        "{what}: expected 401, got {} {}",
        r.status, r.text
    );
    let body = r.json();
    assert_error_shape(&body);
    assert_eq!(body["error"]["code"], "invalid_api_key", "{what}: {body}");
}

#[tokio::test]
async fn access_is_refused_to_bad_keys_and_roles() {
    let rig = Rig::new().await;
    let gw = rig.start().await;
    let org = new_org(&gw, "acme").await;
    let team_a = new_team(&gw, &org, "a", json!({})).await;
    let team_b = new_team(&gw, &org, "b", json!({})).await;
    let (id_a, key_a) = new_key(&gw, json!({ "name": "a", "team_id": team_a })).await;
    let (id_b, key_b) = new_key(&gw, json!({ "name": "b", "team_id": team_b })).await;
    let body = priced("access");

    // The good key works.
    assert_priced_ok(&send(&http_client(Some(&key_a)), &gw, CHAT, &body).await);

    // Missing, malformed, wrong secret.
    assert_unauthorized(&with_auth(&gw, None, CHAT, &body).await, "no Authorization");
    assert_unauthorized(
        &with_auth(&gw, Some("Bearer"), CHAT, &body).await,
        "Bearer without a key",
    );
    assert_unauthorized(
        &with_auth(&gw, Some(&format!("Basic {key_a}")), CHAT, &body).await,
        "the right key under another scheme",
    );
    for bad in [
        "sk-airlock-garbage".to_string(),
        format!("{key_a}x"),
        key_a[..key_a.len() - 1].to_string(),
        key_a.to_uppercase(),
        key_a.replace("sk-airlock-", "sk-"),
    ] {
        assert_unauthorized(
            &send(&http_client(Some(&bad)), &gw, CHAT, &body).await,
            &format!("malformed key {bad:?}"),
        );
    }
    // Key A's public id with key B's (well-formed, wrong) secret.
    let secret_b = key_b.split_once('.').expect("key has a secret").1;
    let wrong = format!("sk-airlock-{id_a}.{secret_b}");
    assert_ne!(wrong, key_a);
    assert_unauthorized(
        &send(&http_client(Some(&wrong)), &gw, CHAT, &body).await,
        "right public id, wrong secret",
    );
    // Every refusal of a presented key reads the same: it never says which part was
    // wrong (an unknown id, a wrong secret, a revoked or expired key).
    let message = |r: &HttpReply| r.json()["error"]["message"].clone();
    let refusal = message(&send(&http_client(Some(&wrong)), &gw, CHAT, &body).await);
    let unknown = format!("sk-airlock-ak_000000000000.{secret_b}");
    for k in ["sk-airlock-garbage", unknown.as_str()] {
        let r = send(&http_client(Some(k)), &gw, CHAT, &body).await;
        assert_unauthorized(&r, &format!("key {k:?}"));
        assert_eq!(message(&r), refusal, "refusal of {k:?} vs a wrong secret");
    }

    // Revoked: refused on the very next request.
    let (rid, rkey) = new_key(&gw, json!({ "name": "r", "team_id": team_a })).await;
    let rc = http_client(Some(&rkey));
    assert_priced_ok(&send(&rc, &gw, CHAT, &body).await);
    gw.post_json(&format!("/admin/keys/{rid}/revoke"), &json!({}))
        .await
        .expect_status(200);
    let revoked = send(&rc, &gw, CHAT, &body).await;
    assert_unauthorized(&revoked, "revoked key");
    assert_eq!(
        message(&revoked),
        refusal,
        "a revoked key's refusal says no more"
    );
    assert_unauthorized(
        &get_as(&rc, &gw, "/v1/models").await,
        "revoked key on /v1/models",
    );

    // Expired: a past expiry is refused at creation; an expiry moved into the past
    // ends the key at once.
    let past = gw
        .post_json(
            "/admin/keys",
            &json!({ "name": "p", "team_id": team_a, "expires_at": now_ms() - 1000 }),
        )
        .await;
    assert_eq!(past.status, 400, "a key born expired: {}", past.text);
    assert!(past.json().get("key").is_none() && !past.text.contains("sk-airlock-"));
    let (eid, ekey) = new_key(
        &gw,
        json!({ "name": "e", "team_id": team_a, "expires_at": now_ms() + 3_600_000 }),
    )
    .await;
    let ec = http_client(Some(&ekey));
    assert_priced_ok(&send(&ec, &gw, CHAT, &body).await);
    admin_patch(
        &gw,
        &format!("/admin/keys/{eid}"),
        &json!({ "expires_at": now_ms() - 1000 }),
    )
    .await
    .expect_status(200);
    let expired = send(&ec, &gw, CHAT, &body).await;
    assert_unauthorized(&expired, "expired key");
    assert_eq!(
        message(&expired),
        refusal,
        "an expired key's refusal says no more"
    );

    // A member key on the admin API: 403 for every key route and method.
    let member = http_client(Some(&key_a));
    for path in ["/admin/keys", "/admin/orgs", "/admin/teams", "/admin/users"] {
        get_as(&member, &gw, path)
            .await
            .expect_error(403, "forbidden");
    }
    send(
        &member,
        &gw,
        "/admin/keys",
        &json!({ "name": "x", "team_id": team_a }),
    )
    .await
    .expect_error(403, "forbidden");
    let r = member
        .delete(gw.url(&format!("/admin/keys/{id_a}")))
        .send()
        .await
        .expect("send");
    let r = HttpReply::read(r).await;
    assert!(
        matches!(r.status, 403 | 404),
        "member deleting a key: {} {}",
        r.status,
        r.text
    );
    assert_error_shape(&r.json());
    // Path variants never reach a handler for a member, nor answer 200.
    for path in [
        "/admin/keys/",
        "/admin//keys",
        "/ADMIN/keys",
        "/Admin/Keys",
        "/admin/keys%2F",
        "/admin/%6beys",
        "//admin/keys",
        "/admin/keys;x",
        "/admin/keys/..",
        "/admin/audit/verify/",
        "/ADMIN/audit",
        "/admin//usage",
        "/admin/budgets/",
    ] {
        let g = get_as(&member, &gw, path).await;
        assert!(
            matches!(g.status, 401 | 403 | 404 | 405),
            "member GET {path}: expected a refusal, got {} {}",
            g.status,
            g.text
        );
        assert_error_shape(&g.json());
        let p = send(
            &member,
            &gw,
            path,
            &json!({ "name": "x", "team_id": team_a }),
        )
        .await;
        assert!(
            matches!(p.status, 401 | 403 | 404 | 405),
            "member POST {path}: expected a refusal, got {} {}",
            p.status,
            p.text
        );
        assert!(
            !p.text.contains("sk-airlock-"),
            "member POST {path} made a key: {}",
            p.text
        );
    }

    // A team admin: may make keys in its own team, not in another.
    let admin_user = new_user(&gw, &team_a, "lead", "team_admin").await;
    let (_, ta_key) = new_key(&gw, json!({ "name": "lead", "user_id": admin_user })).await;
    let ta = http_client(Some(&ta_key));
    let own = send(
        &ta,
        &gw,
        "/admin/keys",
        &json!({ "name": "mine", "team_id": team_a }),
    )
    .await;
    let own = own.expect_status(201);
    assert!(
        own["key"].is_string(),
        "team admin creates a key in its own team: {own}"
    );
    let keys_in_b_before = gw
        .get(&format!("/admin/keys?team_id={team_b}"))
        .await
        .json()["data"]
        .as_array()
        .map(Vec::len);
    let user_b = new_user(&gw, &team_b, "bob", "member").await;
    for attempt in [
        json!({ "name": "theirs", "team_id": team_b }),
        json!({ "name": "theirs", "user_id": user_b }),
        json!({ "name": "org-wide", "org_id": org }),
    ] {
        let r = send(&ta, &gw, "/admin/keys", &attempt).await;
        assert!(
            matches!(r.status, 403 | 404),
            "team admin creating {attempt}: expected 403/404, got {} {}",
            r.status,
            r.text
        );
        let b = r.json();
        assert_error_shape(&b);
        assert!(
            b.get("key").is_none() && !r.text.contains("sk-airlock-"),
            "a refusal carries no key: {}",
            r.text
        );
    }
    let keys_in_b_after = gw
        .get(&format!("/admin/keys?team_id={team_b}"))
        .await
        .json()["data"]
        .as_array()
        .map(Vec::len);
    assert_eq!(
        keys_in_b_before, keys_in_b_after,
        "no key was created in team b"
    );
    // And it cannot see team b's keys.
    let listed = get_as(&ta, &gw, "/admin/keys").await.expect_status(200);
    assert!(
        listed["data"]
            .as_array()
            .is_some_and(|d| d.iter().all(|k| k["team_id"] == team_a.as_str())),
        "a team admin lists only its team's keys: {listed}"
    );
    get_as(&ta, &gw, &format!("/admin/keys/{id_b}"))
        .await
        .expect_error(404, "not_found");
}

// ---------------------------------------------------------------------------------
// 6. Allow-lists

#[tokio::test]
async fn model_allow_list_limits_calls_and_listing() {
    let rig = Rig::new().await;
    let gw = rig.start().await;
    let org = new_org(&gw, "acme").await;
    let (_, key) = new_key(
        &gw,
        json!({ "name": "p1 only", "org_id": org, "models": ["p1/*"] }),
    )
    .await;
    let c = http_client(Some(&key));

    assert_priced_ok(&send(&c, &gw, CHAT, &priced("allowed")).await);
    let denied = send(
        &c,
        &gw,
        CHAT,
        &json!({
            "model": "other", "max_tokens": 10, "messages": [{"role": "user", "content": "no"}]
        }),
    )
    .await;
    denied.expect_error(404, "model_not_found");
    let direct = send(&c, &gw, CHAT, &json!({
        "model": "p2/other-model", "max_tokens": 10, "messages": [{"role": "user", "content": "no"}]
    }))
    .await;
    direct.expect_error(404, "model_not_found");
    assert_eq!(rig.p2.request_count(), 0, "nothing reached p2");

    let list = get_as(&c, &gw, "/v1/models").await.expect_status(200);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"budget"),
        "the allowed model is listed: {ids:?}"
    );
    assert!(
        ids.iter()
            .all(|id| *id == "budget" || id.starts_with("p1/")),
        "only p1 models are listed: {ids:?}"
    );
    get_as(&c, &gw, "/v1/models/other")
        .await
        .expect_error(404, "model_not_found");
    // The master key still sees everything.
    let all = gw.get("/v1/models").await.expect_status(200).to_string();
    assert!(
        all.contains("\"other\"") && all.contains("p2/other-model"),
        "{all}"
    );
}

// ---------------------------------------------------------------------------------
// 7. No secret leaks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_audit_errors_or_metrics() {
    const PROVIDER_SECRET: &str = "sk-proj-CANARY-provider-secret-7f3a9c1e";
    let rig = Rig::with_provider_key(PROVIDER_SECRET).await;
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let mut gw = {
        // Debug logs too: a secret must not appear at any level.
        let env = rig.env(&[("RUST_LOG", "debug")]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let dir = data.to_string_lossy().into_owned();
        Gateway::start_with_args(&rig.toml, &env, &["--data-dir", &dir]).await
    };
    let (team, id1, key1) = team_key(
        &gw,
        json!({}),
        json!({ "max_budget_micros": 2 * COST, "budget_duration": "total" }),
    )
    .await;
    let (_, key2) = new_key(&gw, json!({ "name": "second", "team_id": team })).await;
    let (id3, key3) = new_key(&gw, json!({ "name": "revoked", "team_id": team })).await;
    gw.post_json(&format!("/admin/keys/{id3}/revoke"), &json!({}))
        .await
        .expect_status(200);
    let secrets: Vec<String> = [&key1, &key2, &key3]
        .iter()
        .flat_map(|k| {
            let secret = k.split_once('.').expect("secret").1.to_string();
            [k.to_string(), secret]
        })
        .chain([PROVIDER_SECRET.to_string(), DEFAULT_MASTER_KEY.to_string()])
        .collect();
    let leaks = |what: &str, text: &str| {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{what} contains the secret {s:?}:\n{text}"
            );
        }
    };

    let mut bodies: Vec<(String, HttpReply)> = Vec::new();
    let c1 = http_client(Some(&key1));
    let c2 = http_client(Some(&key2));
    bodies.push(("ok".into(), send(&c1, &gw, CHAT, &priced("one")).await));
    bodies.push((
        "ok stream".into(),
        send(&c1, &gw, CHAT, &priced_stream("two")).await,
    ));
    bodies.push((
        "budget".into(),
        send(&c1, &gw, CHAT, &priced("three")).await,
    ));
    assert_eq!(bodies[2].1.error_code().as_deref(), Some("budget_exceeded"));
    bodies.push((
        "revoked".into(),
        send(&http_client(Some(&key3)), &gw, CHAT, &priced("x")).await,
    ));
    bodies.push((
        "key with junk".into(),
        send(
            &http_client(Some(&format!("{key2}junk"))),
            &gw,
            CHAT,
            &priced("x"),
        )
        .await,
    ));
    bodies.push((
        "key in the model name".into(),
        send(
            &c2,
            &gw,
            CHAT,
            &json!({"model": key2, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await,
    ));
    bodies.push((
        "bad body".into(),
        send(
            &c2,
            &gw,
            CHAT,
            &json!({"model": MODEL, "messages": "not a list"}),
        )
        .await,
    ));
    rig.p1.fail_next(Fault::Status(401));
    bodies.push((
        "upstream 401".into(),
        send(&c2, &gw, CHAT, &priced("x")).await,
    ));
    rig.p1.fail_next(Fault::Status(500));
    bodies.push((
        "upstream 500".into(),
        send(&c2, &gw, CHAT, &priced("x")).await,
    ));
    bodies.push((
        "admin forbidden".into(),
        get_as(&c2, &gw, "/admin/keys").await,
    ));
    bodies.push(("admin list".into(), gw.get("/admin/keys").await));
    bodies.push((
        "admin get".into(),
        gw.get(&format!("/admin/keys/{id1}")).await,
    ));
    bodies.push(("me".into(), get_as(&c2, &gw, "/admin/me").await));
    for (what, r) in &bodies {
        if what == "key in the model name" {
            // Echoing a client's own input back to it is no leak; where it is written
            // down (logs, audit, metrics) is checked below.
            continue;
        }
        leaks(&format!("reply `{what}` ({})", r.status), &r.text);
        leaks(&format!("headers of `{what}`"), &format!("{:?}", r.headers));
    }
    for path in ["/admin/audit/export", "/admin/audit?limit=1000"] {
        let r = gw.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text);
        leaks(&format!("GET {path}"), &r.text);
    }
    let metrics = gw.get("/metrics").await;
    assert_eq!(metrics.status, 200, "{}", metrics.text);
    leaks("/metrics", &metrics.text);
    assert!(rig.p1.request_count() > 0);
    for r in rig.p1.requests() {
        assert_ne!(
            r.header("authorization"),
            Some(format!("Bearer {key2}").as_str()),
            "the client's key is never forwarded upstream"
        );
    }

    stop_clean(&mut gw).await;
    leaks("the gateway's stderr", &gw.stderr());
    leaks("the gateway's stdout", &gw.stdout_rest());
    drop(gw);
    let (lines, _) = audit_export(&data, &[]).await;
    assert!(!lines.is_empty());
    for l in &lines {
        leaks("an audit export line", l);
    }
}

// ---------------------------------------------------------------------------------
// 8. Soft budget and token quota

#[tokio::test]
async fn soft_budget_adds_a_warning_header() {
    let rig = Rig::new().await;
    let gw = rig.start().await;
    let (_team, key_id, key) = team_key(
        &gw,
        json!({}),
        json!({
            "soft_budget_micros": 2500,
            "max_budget_micros": 6 * COST,
            "budget_duration": "total"
        }),
    )
    .await;
    let c = http_client(Some(&key));
    // Spent + this request's worst case: 1000, 2000 (under 2500), then 3000, 4000.
    for i in 1..=4u64 {
        let r = send(&c, &gw, CHAT, &priced(&format!("soft {i}"))).await;
        assert_priced_ok(&r);
        assert_eq!(
            r.header("x-airlock-budget-warning").is_some(),
            i * COST > 2500,
            "request {i}: x-airlock-budget-warning once spent + reserved passes the soft \
             budget of 2500 (spent before it: {}); headers {:?}",
            (i - 1) * COST,
            r.headers
        );
    }
    // Streams too (the header goes with the response head, before the first event).
    let resp = c
        .post(gw.url(CHAT))
        .json(&priced_stream("streamed"))
        .send()
        .await
        .expect("send");
    let streamed = HttpReply::read(resp).await;
    assert_eq!(streamed.status, 200, "{}", streamed.text);
    assert!(streamed.text.contains("data: [DONE]"), "{}", streamed.text);
    let stream_warned = streamed.header("x-airlock-budget-warning").is_some();
    // The last request the budget allows; then the hard limit.
    let r = send(&c, &gw, CHAT, &priced("last")).await;
    assert_priced_ok(&r);
    assert!(r.header("x-airlock-budget-warning").is_some());
    send(&c, &gw, CHAT, &priced("over"))
        .await
        .expect_error(429, "budget_exceeded");
    let w = budget_window(&gw, &format!("key:{key_id}")).await;
    assert_eq!(num(&w, "spent_micros"), 6 * COST, "{w}");
    assert_eq!(num(&w, "limit_micros"), 6 * COST, "{w}");
    assert!(
        stream_warned,
        "a streamed request past the soft budget (spent 4000 of soft 2500) carries \
         x-airlock-budget-warning like a JSON one; headers {:?}",
        streamed.headers
    );
}

#[tokio::test]
async fn token_quota_refuses_with_its_own_code() {
    let rig = Rig::new().await;
    let gw = rig.start().await;
    // The first request's worst case (prompt + 1000) fits in 1500; the second's cannot
    // fit beside the first's 1000+ tokens.
    let (_t, qid, qkey) = team_key(
        &gw,
        json!({}),
        json!({ "token_quota": 1500, "budget_duration": "total" }),
    )
    .await;
    let q = http_client(Some(&qkey));
    assert_priced_ok(&send(&q, &gw, CHAT, &priced("quota")).await);
    send(&q, &gw, CHAT, &priced("quota again"))
        .await
        .expect_error(429, "token_quota_exceeded");
    assert_eq!(
        rig.p1.request_count(),
        1,
        "the refused request never went upstream"
    );
    let w = budget_window(&gw, &format!("key:{qid}")).await;
    assert_eq!(w["token_quota"], 1500, "{w}");
    let spent = num(&w, "spent_tokens");
    assert!(
        (MAX_TOKENS + 1..=MAX_TOKENS + 10).contains(&spent),
        "spent tokens = prompt (a few words) + {MAX_TOKENS}: {w}"
    );
    assert_eq!(num(&w, "reserved_tokens"), 0, "{w}");
}

// ---------------------------------------------------------------------------------
// The ledger's admin routes: who may read them, and bad queries

#[tokio::test]
async fn ledger_routes_are_for_admins_and_refuse_bad_queries() {
    let rig = Rig::new().await;
    let gw = rig.start().await;
    let (team, key_id, key) = team_key(
        &gw,
        json!({}),
        json!({ "max_budget_micros": 10 * COST, "budget_duration": "total" }),
    )
    .await;
    let member = http_client(Some(&key));
    assert_priced_ok(&send(&member, &gw, CHAT, &priced("one")).await);
    let lead = new_user(&gw, &team, "lead", "team_admin").await;
    let (_, lead_key) = new_key(&gw, json!({ "name": "lead", "user_id": lead })).await;
    let lead = http_client(Some(&lead_key));

    let routes = [
        format!("/admin/budgets?scope=key:{key_id}"),
        format!("/admin/budgets?scope=team:{team}"),
        "/admin/usage?group_by=key".to_string(),
        "/admin/audit".to_string(),
        "/admin/audit/verify".to_string(),
        "/admin/audit/export".to_string(),
    ];
    for path in &routes {
        let ok = gw.get(path).await;
        assert_eq!(ok.status, 200, "master key GET {path}: {}", ok.text);
        for (who, c) in [("member", &member), ("team admin", &lead)] {
            let r = get_as(c, &gw, path).await;
            assert_eq!(
                r.status, 403,
                "{who} GET {path}: expected 403, got {} {}",
                r.status, r.text
            );
            assert_error_shape(&r.json());
            assert!(
                !r.text.contains(&key_id) || path.contains(&key_id),
                "a refusal shows no data: {}",
                r.text
            );
        }
    }

    // Bad queries: 400 (404 for an unknown scope id) in OpenAI's error shape. Every
    // case is tried; the failures are reported together.
    let mut problems = Vec::new();
    for (path, status) in [
        ("/admin/budgets", 400),
        ("/admin/budgets?scope=bogus", 400),
        ("/admin/budgets?scope=key:", 400),
        ("/admin/budgets?scope=key:ak_000000000000", 404),
        ("/admin/budgets?scope=team:x&extra=1", 400),
        ("/admin/usage?group_by=nonsense", 400),
        ("/admin/usage?from=yesterday", 400),
        ("/admin/audit?from_seq=-1", 400),
        ("/admin/audit/export?from_ts=soon", 400),
    ] {
        let r = gw.get(path).await;
        let shape = serde_json::from_str::<Value>(&r.text)
            .map_err(|e| format!("not JSON ({e})"))
            .and_then(|b| error_shape_problem(&b).map_or(Ok(()), Err));
        if r.status != status || shape.is_err() {
            problems.push(format!(
                "GET {path} (master key): expected {status} with an OpenAI error body, got {} {:?}{}",
                r.status,
                r.text,
                shape.err().map(|e| format!(" ({e})")).unwrap_or_default()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
