//! Router tests: the whole application driven with `oneshot`, no socket. They cover the
//! edge (auth, request ids, body limits, content types, routing of unknown paths) and
//! every client mistake's status and code; upstream behaviour is covered end to end in
//! the `airlock-e2e` crate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate: failing loudly is the point

use airlock::api::router;
use airlock::config::{Config, SecretPolicy};
use airlock::state::AppState;
use airlock::store::Store;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const KEY: &str = "sk-test-0123456789abcdef";

const CONFIG: &str = r#"
[server]
max_body_bytes = 4096

[[providers]]
name = "oai"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "http://127.0.0.1:9/v1"

[[models]]
name = "gpt"
targets = ["oai/gpt-4o-mini"]

[[models]]
name = "sonnet"
targets = ["claude/claude-sonnet-4-5"]
"#;

struct App {
    state: AppState,
    _dir: tempfile::TempDir,
}

fn app_with(text: &str) -> App {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(text, &[("X", "y")], SecretPolicy::Require).unwrap();
    let store = Store::open(dir.path()).unwrap();
    App {
        state: AppState::build(cfg, store, Some(KEY)).unwrap(),
        _dir: dir,
    }
}

fn app() -> App {
    app_with(CONFIG)
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
    text: String,
}

async fn call(app: &App, req: Request<Body>) -> Reply {
    let resp = router(app.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

fn json_post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::empty())
        .unwrap()
}

/// Name, request, expected status, code and param.
type Case = (
    &'static str,
    Request<Body>,
    u16,
    &'static str,
    Option<&'static str>,
);

#[tokio::test]
async fn every_client_mistake_gets_its_status_and_code() {
    let app = app();
    let chat = "/v1/chat/completions";
    let ok_msgs = r#"[{"role":"user","content":"hi"}]"#;
    let big = format!(
        r#"{{"model":"gpt","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    let cases: Vec<Case> = vec![
        (
            "no key",
            Request::get("/v1/models").body(Body::empty()).unwrap(),
            401,
            "invalid_api_key",
            None,
        ),
        (
            "wrong key",
            Request::get("/v1/models")
                .header("authorization", "Bearer sk-wrong-0123456789")
                .body(Body::empty())
                .unwrap(),
            401,
            "invalid_api_key",
            None,
        ),
        (
            "basic auth instead of bearer",
            Request::get("/v1/models")
                .header("authorization", format!("Basic {KEY}"))
                .body(Body::empty())
                .unwrap(),
            401,
            "invalid_api_key",
            None,
        ),
        (
            "unknown route without key is still 401",
            Request::get("/v1/nothing").body(Body::empty()).unwrap(),
            401,
            "invalid_api_key",
            None,
        ),
        (
            "malformed json",
            json_post(chat, "{\"model\":"),
            400,
            "invalid_json",
            None,
        ),
        (
            "wrong type",
            json_post(chat, r#"{"model":"gpt","messages":"hi"}"#),
            400,
            "invalid_type",
            Some("messages"),
        ),
        (
            "wrong nested type",
            json_post(
                chat,
                r#"{"model":"gpt","messages":[{"role":"user","content":{"a":1}}]}"#,
            ),
            400,
            "invalid_type",
            Some("messages[0].content"),
        ),
        (
            "missing model",
            json_post(chat, &format!(r#"{{"messages":{ok_msgs}}}"#)),
            400,
            "missing_required_parameter",
            Some("model"),
        ),
        (
            "missing messages",
            json_post(chat, r#"{"model":"gpt"}"#),
            400,
            "missing_required_parameter",
            Some("messages"),
        ),
        (
            "temperature out of range",
            json_post(
                chat,
                &format!(r#"{{"model":"gpt","messages":{ok_msgs},"temperature":3}}"#),
            ),
            400,
            "invalid_value",
            Some("temperature"),
        ),
        (
            "unknown role",
            json_post(
                chat,
                r#"{"model":"gpt","messages":[{"role":"robot","content":"x"}]}"#,
            ),
            400,
            "invalid_value",
            Some("messages[0].role"),
        ),
        (
            "unknown model",
            json_post(
                chat,
                &format!(r#"{{"model":"gpt-9","messages":{ok_msgs}}}"#),
            ),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            "unknown provider in a direct target",
            json_post(
                chat,
                &format!(r#"{{"model":"nope/gpt","messages":{ok_msgs}}}"#),
            ),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            "body too large",
            json_post(chat, &big),
            413,
            "request_too_large",
            None,
        ),
        (
            "form content type",
            Request::post(chat)
                .header("authorization", format!("Bearer {KEY}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from("model=gpt"))
                .unwrap(),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "no content type",
            Request::post(chat)
                .header("authorization", format!("Bearer {KEY}"))
                .body(Body::from("{}"))
                .unwrap(),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "unknown route",
            get("/v1/assistants"),
            404,
            "unknown_url",
            None,
        ),
        ("wrong method", get(chat), 405, "method_not_allowed", None),
        (
            "embeddings on a provider without them",
            json_post("/v1/embeddings", r#"{"model":"sonnet","input":"hi"}"#),
            400,
            "unsupported_operation",
            None,
        ),
        (
            "empty embeddings input",
            json_post("/v1/embeddings", r#"{"model":"gpt","input":[]}"#),
            400,
            "invalid_value",
            Some("input"),
        ),
        (
            "several prompts to a chat-only provider",
            json_post(
                "/v1/completions",
                r#"{"model":"sonnet","prompt":["a","b"]}"#,
            ),
            400,
            "unsupported_operation",
            None,
        ),
        (
            "completion prompt of the wrong type",
            json_post(
                "/v1/completions",
                r#"{"model":"gpt","prompt":{"text":"a"}}"#,
            ),
            400,
            "invalid_type",
            Some("prompt"),
        ),
        (
            "unknown model id",
            get("/v1/models/gpt-9"),
            404,
            "model_not_found",
            Some("model"),
        ),
    ];
    for (name, req, status, code, param) in cases {
        let r = call(&app, req).await;
        assert_eq!(r.status.as_u16(), status, "{name}: {}", r.text);
        assert_eq!(r.body["error"]["code"], code, "{name}: {}", r.text);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(r.body["error"]["type"].is_string(), "{name}");
        assert_eq!(
            r.body["error"]["param"].as_str(),
            param,
            "{name}: {}",
            r.text
        );
        assert!(
            r.headers.contains_key("x-airlock-request-id"),
            "{name}: no request id"
        );
    }
}

#[tokio::test]
async fn models_are_listed_and_retrieved_with_slashes_in_ids() {
    let app = app();
    let r = call(&app, get("/v1/models")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["object"], "list");
    let ids: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "gpt",
            "sonnet",
            "claude/claude-sonnet-4-5",
            "oai/gpt-4o-mini"
        ]
    );
    assert_eq!(r.body["data"][0]["strategy"], "priority");
    assert_eq!(r.body["data"][0]["targets"][0]["target"], "oai/gpt-4o-mini");
    assert_eq!(r.body["data"][0]["targets"][0]["circuit"], "closed");
    assert_eq!(r.body["data"][3]["pricing"]["input_per_mtok"], json!(0.15));
    assert_eq!(r.body["data"][3]["context_window"], json!(128000));
    assert_eq!(r.body["data"][3]["capabilities"]["tools"], json!(true));
    assert_eq!(r.body["data"][3]["availability"]["circuit"], "closed");
    let r = call(&app, get("/v1/models/oai/gpt-4o-mini")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["id"], "oai/gpt-4o-mini");
    assert_eq!(r.body["owned_by"], "oai");
    assert_eq!(r.body["object"], "model");
}

#[tokio::test]
async fn health_and_ready_are_open_and_metrics_is_not_unless_configured() {
    let app = app();
    for path in ["/health", "/ready"] {
        let r = call(&app, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    let r = call(&app, Request::get("/ready").body(Body::empty()).unwrap()).await;
    assert_eq!(r.body["checks"]["store"], "ok");
    let r = call(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&app, get("/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);

    let open = app_with(&CONFIG.replace(
        "max_body_bytes = 4096",
        "max_body_bytes = 4096\nmetrics_open = true",
    ));
    let r = call(&open, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_requests_by_route_model_and_status() {
    let app = app();
    let _ = call(
        &app,
        json_post(
            "/v1/chat/completions",
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
        ),
    )
    .await;
    let _ = call(
        &app,
        json_post(
            "/v1/chat/completions",
            r#"{"model":"gpt","messages":[{"role":"user","content":"x"}],"temperature":9}"#,
        ),
    )
    .await;
    let r = call(&app, get("/metrics")).await;
    assert!(
        r.text.contains(r#"airlock_requests_total{model="none",route="/v1/chat/completions",status="404",target="none"} 1"#),
        "{}",
        r.text
    );
    assert!(
        r.text.contains(r#"airlock_requests_total{model="none",route="/v1/chat/completions",status="400",target="none"} 1"#),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_naming_the_provider_not_the_address() {
    let app = app();
    let r = call(
        &app,
        json_post(
            "/v1/chat/completions",
            r#"{"model":"gpt","messages":[{"role":"user","content":"x"}]}"#,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "upstream_unavailable");
    assert!(
        !r.text.contains("127.0.0.1"),
        "addresses stay in the log: {}",
        r.text
    );
}

#[tokio::test]
async fn a_body_that_stalls_past_body_read_timeout_is_invalid_body() {
    let app = app_with(&CONFIG.replace(
        "max_body_bytes = 4096",
        "max_body_bytes = 4096\nbody_read_timeout = 0.3",
    ));
    // The first half of a valid body, then nothing (the client stalls).
    let first: Result<axum::body::Bytes, std::io::Error> =
        Ok(axum::body::Bytes::from_static(br#"{"model":"gpt","#));
    let stalled =
        futures::StreamExt::chain(futures::stream::iter([first]), futures::stream::pending());
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Body::from_stream(stalled))
        .unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), call(&app, req))
        .await
        .expect("a stalled body was waited on past body_read_timeout");
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "invalid_body", "{}", r.text);
    assert!(r.text.contains("did not arrive within 300ms"), "{}", r.text);
    assert!(r.headers.contains_key("x-airlock-request-id"));
}

#[tokio::test]
async fn request_ids_are_the_gateways_own_and_new_for_each_request() {
    let app = app();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut req = get("/v1/models");
        req.headers_mut()
            .insert("x-airlock-request-id", "client-chosen".parse().unwrap());
        let r = call(&app, req).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let id = r.headers["x-airlock-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert_ne!(id, "client-chosen");
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        assert!(seen.insert(id), "ids repeat");
    }
}
