//! Router tests: the admin router nested at `/admin` behind a small auth layer (the
//! directory's `authenticate`, as the real middleware will do), driven with `oneshot`
//! over a real sled store in a temporary directory.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::governance::directory::{now_ms, NewKey, NewOrg, NewTeam, NewUser, ADMIN_KEY_FILE};
use crate::governance::keys;
use crate::governance::model::{Limits, Role};

async fn test_auth(State(d): State<Directory>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    match d.authenticate(&token, now_ms()) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn app(d: &Directory) -> Router {
    Router::new()
        .nest(
            PREFIX,
            router(AdminState {
                governance: None,
                directory: d.clone(),
                local: None,
            }),
        )
        .layer(middleware::from_fn_with_state(d.clone(), test_auth))
}

struct World {
    _dir: tempfile::TempDir,
    d: Directory,
    app: Router,
    /// Tokens by role name: admin, auditor, team_admin, member.
    tokens: HashMap<&'static str, String>,
    /// Entity ids by fixture name.
    ids: HashMap<&'static str, String>,
}

struct Reply {
    status: StatusCode,
    body: Value,
    text: String,
    change: Option<AdminChange>,
}

impl World {
    async fn call(
        &self,
        method: &str,
        path: &str,
        who: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(who) = who {
            let token = self.tokens.get(who).map(String::as_str).unwrap_or(who);
            b = b.header("authorization", format!("Bearer {token}"));
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        }
        .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let change = resp.extensions().get::<AdminChange>().cloned();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            text,
            change,
        }
    }

    fn id(&self, name: &str) -> &str {
        &self.ids[name]
    }

    /// `{name}` placeholders replaced by fixture ids.
    fn fill(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (k, v) in &self.ids {
            out = out.replace(&format!("{{{k}}}"), v);
        }
        out
    }
}

/// Org `default` (bootstrap, with the admin), a spare org; teams t1, t2, t3 (empty);
/// an auditor; in t1 a team admin `ta1`, members `m1`, `m1b`, `esc` and an admin
/// `adm1`; in t2 members `u2`, `u2b`. Keys: each role's token, `k1` (of m1), `k2` (of
/// u2), `svc1` (t1 service key).
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let d = Directory::open(&store).unwrap();
    d.ensure_bootstrap(None, dir.path()).unwrap().unwrap();
    let admin_token = std::fs::read_to_string(dir.path().join(ADMIN_KEY_FILE))
        .unwrap()
        .trim()
        .to_string();
    let now = now_ms();
    let mut ids: HashMap<&'static str, String> = HashMap::new();
    let org = DEFAULT_ORG.to_string();
    ids.insert("org", org.clone());
    let spare = d
        .create_org(
            NewOrg {
                name: "spare".into(),
                ..NewOrg::default()
            },
            now,
            |_| Ok(()),
        )
        .unwrap();
    ids.insert("spare_org", spare.id);
    for t in ["t1", "t2", "t3"] {
        let team = d
            .create_team(
                NewTeam {
                    org_id: org.clone(),
                    name: t.into(),
                    ..NewTeam::default()
                },
                now,
                |_| Ok(()),
            )
            .unwrap();
        ids.insert(t, team.id);
    }
    let users: [(&'static str, Option<&str>, Role); 8] = [
        ("aud", None, Role::Auditor),
        ("ta1", Some("t1"), Role::TeamAdmin),
        ("m1", Some("t1"), Role::Member),
        ("m1b", Some("t1"), Role::Member),
        ("esc", Some("t1"), Role::Member),
        ("adm1", Some("t1"), Role::Admin),
        ("u2", Some("t2"), Role::Member),
        ("u2b", Some("t2"), Role::Member),
    ];
    for (name, team, role) in users {
        let u = d
            .create_user(
                NewUser {
                    org_id: Some(org.clone()),
                    team_id: team.map(|t| ids[t].clone()),
                    name: name.into(),
                    role,
                    models: None,
                    limits: Limits::default(),
                },
                now,
                |_| Ok(()),
            )
            .unwrap();
        ids.insert(name, u.id);
    }
    let key = |user: Option<&str>, team: Option<&str>| {
        d.create_key(
            NewKey {
                user_id: user.map(|u| ids[u].clone()),
                team_id: team.map(|t| ids[t].clone()),
                ..NewKey::default()
            },
            now,
            |_, _| Ok(()),
        )
        .unwrap()
    };
    let aud = key(Some("aud"), None);
    let ta = key(Some("ta1"), None);
    let member = key(Some("m1"), None);
    let k1 = key(Some("m1"), None);
    let k2 = key(Some("u2"), None);
    let svc1 = key(None, Some("t1"));
    let admin_key_id = keys::parse(&admin_token).unwrap().0.to_string();
    ids.insert("admin_key", admin_key_id);
    ids.insert("k1", k1.view.id);
    ids.insert("k2", k2.view.id);
    ids.insert("svc1", svc1.view.id);
    ids.insert("member_key", member.view.id.clone());
    let tokens = HashMap::from([
        ("admin", admin_token),
        ("auditor", aud.key.expose().to_string()),
        ("team_admin", ta.key.expose().to_string()),
        ("member", member.key.expose().to_string()),
    ]);
    World {
        app: app(&d),
        _dir: dir,
        d,
        tokens,
        ids,
    }
}

use crate::governance::directory::DEFAULT_ORG_ID as DEFAULT_ORG;

/// Method, path (with `{fixture}` placeholders), body, expected status for admin,
/// auditor, team_admin, member. Each row runs as member, auditor, team_admin, then
/// admin, on one shared world: a row that a team admin completes (a delete) leaves
/// nothing for the admin.
type Row = (&'static str, &'static str, Option<Value>, [u16; 4]);

#[tokio::test]
async fn the_access_matrix() {
    let w = world();
    let rows: Vec<Row> = vec![
        ("GET", "/admin/me", None, [200, 200, 200, 200]),
        ("GET", "/admin/orgs", None, [200, 200, 403, 403]),
        ("GET", "/admin/orgs/{org}", None, [200, 200, 403, 403]),
        ("GET", "/admin/orgs/org_nope", None, [404, 404, 403, 403]),
        ("GET", "/admin/teams", None, [200, 200, 200, 403]),
        ("GET", "/admin/teams/{t1}", None, [200, 200, 200, 403]),
        ("GET", "/admin/teams/{t2}", None, [200, 200, 404, 403]),
        ("GET", "/admin/users", None, [200, 200, 200, 403]),
        ("GET", "/admin/users/{m1}", None, [200, 200, 200, 403]),
        ("GET", "/admin/users/{adm1}", None, [200, 200, 200, 403]),
        ("GET", "/admin/users/{u2}", None, [200, 200, 404, 403]),
        ("GET", "/admin/users/{aud}", None, [200, 200, 404, 403]),
        ("GET", "/admin/keys", None, [200, 200, 200, 403]),
        ("GET", "/admin/keys/{k1}", None, [200, 200, 200, 403]),
        ("GET", "/admin/keys/{k2}", None, [200, 200, 404, 403]),
        ("GET", "/admin/keys/{admin_key}", None, [200, 200, 404, 403]),
        (
            "GET",
            "/admin/keys/ak_000000000000",
            None,
            [404, 404, 404, 403],
        ),
        // orgs: admins only
        (
            "POST",
            "/admin/orgs",
            Some(json!({"name": "new"})),
            [201, 403, 403, 403],
        ),
        (
            "PATCH",
            "/admin/orgs/{org}",
            Some(json!({"limits": {"rpm_limit": 5000}})),
            [200, 403, 403, 403],
        ),
        (
            "DELETE",
            "/admin/orgs/{spare_org}",
            None,
            [200, 403, 403, 403],
        ),
        ("DELETE", "/admin/orgs/{org}", None, [409, 403, 403, 403]),
        // teams: a team admin reads its own, changes none
        (
            "POST",
            "/admin/teams",
            Some(json!({"org_id": DEFAULT_ORG, "name": "x"})),
            [201, 403, 403, 403],
        ),
        (
            "PATCH",
            "/admin/teams/{t1}",
            Some(json!({"limits": {"max_budget_micros": 1}})),
            [200, 403, 403, 403],
        ),
        (
            "PATCH",
            "/admin/teams/{t2}",
            Some(json!({"name": "y"})),
            [200, 403, 403, 403],
        ),
        ("DELETE", "/admin/teams/{t3}", None, [200, 403, 403, 403]),
        ("DELETE", "/admin/teams/{t1}", None, [409, 403, 403, 403]),
        // users: a team admin manages its team's, up to team_admin
        (
            "POST",
            "/admin/users",
            Some(json!({"team_id": "{t1}", "name": "n"})),
            [201, 403, 201, 403],
        ),
        (
            "POST",
            "/admin/users",
            Some(json!({"team_id": "{t1}", "name": "n", "role": "team_admin"})),
            [201, 403, 201, 403],
        ),
        (
            "POST",
            "/admin/users",
            Some(json!({"team_id": "{t2}", "name": "n"})),
            [201, 403, 403, 403],
        ),
        (
            "POST",
            "/admin/users",
            Some(json!({"team_id": "{t1}", "name": "n", "role": "admin"})),
            [201, 403, 403, 403],
        ),
        (
            "POST",
            "/admin/users",
            Some(json!({"team_id": "{t1}", "name": "n", "role": "auditor"})),
            [201, 403, 403, 403],
        ),
        (
            "PATCH",
            "/admin/users/{m1}",
            Some(json!({"limits": {"rpm_limit": 7}})),
            [200, 403, 200, 403],
        ),
        (
            "PATCH",
            "/admin/users/{esc}",
            Some(json!({"role": "admin"})),
            [200, 403, 403, 403],
        ),
        (
            "PATCH",
            "/admin/users/{u2}",
            Some(json!({"name": "x"})),
            [200, 403, 404, 403],
        ),
        (
            "PATCH",
            "/admin/users/{adm1}",
            Some(json!({"name": "x"})),
            [200, 403, 403, 403],
        ),
        (
            "PATCH",
            "/admin/users/{m1b}",
            Some(json!({"team_id": "{t2}"})),
            [200, 403, 403, 403],
        ),
        ("DELETE", "/admin/users/{u2b}", None, [200, 403, 404, 403]),
        // m1b moved to t2 above by the admin (last): the team admin no longer sees it.
        ("DELETE", "/admin/users/{m1b}", None, [200, 403, 404, 403]),
        ("DELETE", "/admin/users/{m1}", None, [409, 403, 409, 403]),
        // keys
        (
            "POST",
            "/admin/keys",
            Some(json!({"user_id": "{m1}"})),
            [201, 403, 201, 403],
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"user_id": "{u2}"})),
            [201, 403, 403, 403],
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"team_id": "{t1}"})),
            [201, 403, 201, 403],
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"team_id": "{t1}", "role": "team_admin"})),
            [201, 403, 403, 403],
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"user_id": "{adm1}"})),
            [201, 403, 403, 403],
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"user_id": "{adm1}", "role": "member"})),
            [201, 403, 403, 403],
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"user_id": "{ta1}", "role": "admin"})),
            [400, 403, 400, 403],
        ),
        (
            "PATCH",
            "/admin/keys/{k1}",
            Some(json!({"name": "x"})),
            [200, 403, 200, 403],
        ),
        (
            "PATCH",
            "/admin/keys/{k1}",
            Some(json!({"role": "team_admin"})),
            [400, 403, 400, 403],
        ),
        (
            "PATCH",
            "/admin/keys/{svc1}",
            Some(json!({"role": "team_admin"})),
            [200, 403, 403, 403],
        ),
        (
            "PATCH",
            "/admin/keys/{k2}",
            Some(json!({"name": "x"})),
            [200, 403, 404, 403],
        ),
        (
            "POST",
            "/admin/keys/{k1}/revoke",
            None,
            [200, 403, 200, 403],
        ),
        (
            "POST",
            "/admin/keys/{k2}/revoke",
            None,
            [200, 403, 404, 403],
        ),
        (
            "POST",
            "/admin/keys/ak_000000000000/revoke",
            None,
            [404, 403, 404, 403],
        ),
        // The team admin deletes k1 first; the admin then finds nothing.
        ("DELETE", "/admin/keys/{k1}", None, [404, 403, 200, 403]),
        ("DELETE", "/admin/keys/{k2}", None, [200, 403, 404, 403]),
        // unknown routes and methods
        ("GET", "/admin/nope", None, [404, 404, 404, 404]),
        ("GET", "/admin", None, [404, 404, 404, 404]),
        ("PUT", "/admin/orgs", None, [405, 405, 405, 405]),
        // Last: an admin may even delete its own key.
        (
            "DELETE",
            "/admin/keys/{admin_key}",
            None,
            [200, 403, 404, 403],
        ),
    ];
    for (method, path, body, want) in &rows {
        for (who, i) in [
            ("member", 3),
            ("auditor", 1),
            ("team_admin", 2),
            ("admin", 0),
        ] {
            let path = w.fill(path);
            let body = body
                .as_ref()
                .map(|b| serde_json::from_str::<Value>(&w.fill(&b.to_string())).unwrap());
            let r = w.call(method, &path, Some(who), body.as_ref()).await;
            assert_eq!(
                r.status.as_u16(),
                want[i],
                "{who} {method} {path}: {}",
                r.text
            );
            if r.status.is_success() && *method != "GET" {
                let c = r.change.expect("every change is reported");
                let actor = keys::parse(&w.tokens[who]).unwrap().0;
                assert_eq!(c.actor_key_id, actor);
            } else {
                assert!(
                    r.change.is_none(),
                    "{who} {method} {path}: no change reported"
                );
            }
        }
    }
}

#[tokio::test]
async fn no_key_or_a_bad_key_is_401_everywhere() {
    let w = world();
    for path in ["/admin/me", "/admin/orgs", "/admin/keys/x", "/admin/nope"] {
        for who in [None, Some("sk-airlock-nope")] {
            let r = w.call("GET", path, who, None).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path} {who:?}");
            assert_eq!(r.body["error"]["code"], "invalid_api_key");
        }
    }
    // Without the auth layer (mis-wired), the router fails closed.
    let bare = router::<()>(AdminState {
        directory: w.d.clone(),
        governance: None,
        local: None,
    });
    let resp = bare
        .oneshot(Request::get("/me").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn path_variants_never_bypass_the_checks() {
    let w = world();
    let k2 = w.id("k2").to_string();
    let variants = [
        "/admin/keys/".to_string(),
        "/admin//keys".to_string(),
        "/admin/./keys".to_string(),
        "/admin/x/../keys".to_string(),
        "/admin/keys/..%2F".to_string(),
        "/admin/keys/..%2F..%2Fkeys".to_string(),
        "/admin/keys/%2E%2E".to_string(),
        "/admin/KEYS".to_string(),
        "/ADMIN/keys".to_string(),
        "/Admin/Keys".to_string(),
        "/admin/%6Beys".to_string(),
        "/admin/keys%2F".to_string(),
        format!("/admin/keys/{k2}/"),
        format!("/admin/keys//{k2}"),
        format!("/admin/keys/{}", k2.to_uppercase()),
        format!("/admin/keys/{k2}%00"),
        format!("/admin/keys/%20{k2}"),
    ];
    for path in &variants {
        for who in ["member", "team_admin", "auditor", "admin"] {
            let r = w.call("GET", path, Some(who), None).await;
            assert!(
                matches!(r.status.as_u16(), 403 | 404),
                "{who} GET {path}: {} {}",
                r.status,
                r.text
            );
            assert!(!r.text.contains("\"data\""), "{who} {path}: {}", r.text);
            if who != "admin" && who != "auditor" {
                assert!(
                    !r.text.contains(&k2) || r.status == StatusCode::NOT_FOUND,
                    "{who} {path}"
                );
            }
            let r = w.call("DELETE", path, Some(who), None).await;
            assert!(
                (403..=405).contains(&r.status.as_u16()),
                "{who} DELETE {path}"
            );
        }
    }
    assert!(w.d.get_key(&k2).is_some(), "nothing was deleted");
    // Query strings are not part of the route.
    let r = w.call("GET", "/admin/orgs?x=1", Some("member"), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_created_key_is_shown_once_and_never_again() {
    let w = world();
    let r = w
        .call(
            "POST",
            "/admin/keys",
            Some("admin"),
            Some(&json!({"user_id": w.id("m1"), "name": "ci"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let full = r.body["key"].as_str().unwrap().to_string();
    let id = r.body["id"].as_str().unwrap().to_string();
    let (pid, secret) = keys::parse(&full).unwrap();
    assert_eq!(pid, id);
    let hash = keys::hash_secret(secret);
    assert_eq!(r.body["role"], "member");
    assert!(r.body.get("secret_hash").is_none());
    // The audit record has the key without its secret or hash.
    let change = r.change.unwrap();
    assert_eq!(change.action, "key.create");
    assert_eq!(change.target, format!("key:{id}"));
    let change_text = serde_json::to_string(&change).unwrap();
    assert!(!change_text.contains(secret) && !change_text.contains(&hash));
    assert!(!format!("{change:?}").contains(secret));

    // It works at once.
    let p = w.d.authenticate(&full, now_ms()).unwrap();
    assert_eq!(p.user_id.as_deref(), Some(w.id("m1")));

    for (path, who) in [
        ("/admin/keys".to_string(), "admin"),
        (format!("/admin/keys/{id}"), "admin"),
        (format!("/admin/keys?user_id={}", w.id("m1")), "team_admin"),
    ] {
        let r = w.call("GET", &path, Some(who), None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(r.text.contains(&id), "{path} lists the key");
        for secret_text in [secret, hash.as_str(), "secret_hash", "\"key\":\"sk-"] {
            assert!(!r.text.contains(secret_text), "{path} leaks {secret_text}");
        }
    }
    // Its owner sees it through /admin/me, without the secret either.
    let tokens_owner = w.call("GET", "/admin/me", Some(full.as_str()), None).await;
    assert_eq!(tokens_owner.status, StatusCode::OK);
    assert_eq!(tokens_owner.body["key"]["id"], id.as_str());
    assert!(!tokens_owner.text.contains(secret));
}

#[tokio::test]
async fn revoking_over_http_takes_effect_on_the_next_request() {
    let w = world();
    let r = w.call("GET", "/admin/me", Some("member"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["role"], "member");
    let path = format!("/admin/keys/{}/revoke", w.id("member_key"));
    let r = w.call("POST", &path, Some("team_admin"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.body["revoked_at"].is_i64());
    let c = r.change.unwrap();
    assert_eq!(c.action, "key.revoke");
    assert_eq!(c.before.unwrap()["revoked_at"], Value::Null);
    assert!(c.after.unwrap()["revoked_at"].is_i64());
    let r = w.call("GET", "/admin/me", Some("member"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_team_admin_lists_only_its_team() {
    let w = world();
    let r = w
        .call("GET", "/admin/users", Some("team_admin"), None)
        .await;
    let teams: Vec<&Value> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| &u["team_id"])
        .collect();
    assert_eq!(teams.len(), 5, "ta1, m1, m1b, esc, adm1: {}", r.text);
    assert!(teams.iter().all(|t| *t == w.id("t1")));
    let r = w.call("GET", "/admin/keys", Some("team_admin"), None).await;
    let keys = r.body["data"].as_array().unwrap();
    assert_eq!(keys.len(), 4, "ta, member, k1, svc1: {}", r.text);
    assert!(keys.iter().all(|k| k["team_id"] == w.id("t1")));
    // Filters narrow within what it may see, never beyond.
    let r = w
        .call(
            "GET",
            &format!("/admin/keys?team_id={}", w.id("t2")),
            Some("team_admin"),
            None,
        )
        .await;
    assert_eq!(r.body["data"], json!([]));
    let r = w
        .call("GET", "/admin/teams", Some("team_admin"), None)
        .await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    // The admin sees everything; filters apply.
    let r = w
        .call(
            "GET",
            &format!("/admin/users?team_id={}", w.id("t2")),
            Some("admin"),
            None,
        )
        .await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 2);
    let r = w
        .call("GET", "/admin/users?tema_id=x", Some("admin"), None)
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "unknown filters are refused"
    );
}

#[tokio::test]
async fn changes_carry_before_and_after_for_the_audit_log() {
    let w = world();
    let path = format!("/admin/users/{}", w.id("m1"));
    let r = w
        .call(
            "PATCH",
            &path,
            Some("admin"),
            Some(&json!({"name": "renamed", "limits": {"rpm_limit": 3}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["name"], "renamed");
    let c = r.change.unwrap();
    assert_eq!(c.action, "user.update");
    assert_eq!(c.target, format!("user:{}", w.id("m1")));
    assert_eq!(c.before.as_ref().unwrap()["name"], "m1");
    assert_eq!(c.after.as_ref().unwrap()["limits"]["rpm_limit"], 3);
    let event: crate::ledger::AuditEvent = c.into();
    assert!(matches!(event, crate::ledger::AuditEvent::Admin { .. }));

    let r = w
        .call(
            "DELETE",
            &format!("/admin/teams/{}", w.id("t3")),
            Some("admin"),
            None,
        )
        .await;
    assert_eq!(r.body, json!({"id": w.id("t3"), "deleted": true}));
    let c = r.change.unwrap();
    assert_eq!((c.action, c.after), ("team.delete", None));
    assert_eq!(c.before.unwrap()["name"], "t3");
}

#[tokio::test]
async fn refusals_come_before_body_errors_and_have_our_shape() {
    let w = world();
    for who in ["member", "auditor"] {
        let req = Request::post("/admin/orgs")
            .header("authorization", format!("Bearer {}", w.tokens[who]))
            .header("content-type", "application/json")
            .body(Body::from("{not json"))
            .unwrap();
        let resp = w.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{who}");
        let body: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
        assert_eq!(body["error"]["type"], "permission_error");
    }
    let r = w
        .call(
            "POST",
            "/admin/orgs",
            Some("admin"),
            Some(&json!({"name": 5})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["param"], "name");
    let r = w
        .call(
            "POST",
            "/admin/orgs",
            Some("admin"),
            Some(&json!({"name": " "})),
        )
        .await;
    assert_eq!(r.body["error"]["code"], "invalid_value");
    let r = w
        .call("GET", "/admin/users/user_nope", Some("admin"), None)
        .await;
    assert_eq!(r.body["error"]["code"], "not_found");
    // The same answer for a missing id and one in another team.
    let a = w
        .call("GET", "/admin/users/user_nope", Some("team_admin"), None)
        .await;
    let b = w
        .call(
            "GET",
            &format!("/admin/users/{}", w.id("u2")),
            Some("team_admin"),
            None,
        )
        .await;
    assert_eq!(a.status, b.status);
    assert_eq!(a.body["error"]["code"], b.body["error"]["code"]);
    let r = w
        .call(
            "DELETE",
            &format!("/admin/teams/{}", w.id("t1")),
            Some("admin"),
            None,
        )
        .await;
    assert_eq!(r.body["error"]["code"], "conflict");
}

#[tokio::test]
async fn me_shows_the_principal_and_its_own_key() {
    let w = world();
    let r = w.call("GET", "/admin/me", Some("team_admin"), None).await;
    assert_eq!(r.body["role"], "team_admin");
    assert_eq!(r.body["team_id"], w.id("t1"));
    assert_eq!(r.body["user_id"], w.id("ta1"));
    assert_eq!(r.body["key"]["id"], r.body["key_id"]);
    assert_eq!(r.body["limits"][0]["scope"], "key");
    assert_eq!(r.body["limits"][3]["scope"], "org");
    assert!(r.body["key"].get("secret_hash").is_none());
}

#[test]
fn role_names_on_the_wire() {
    assert_eq!(serde_json::to_value(Role::TeamAdmin).unwrap(), "team_admin");
}
