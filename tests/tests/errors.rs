//! Errors: a table of client mistakes (each -> status, stable code, param), the key
//! check, and how upstream failures of each provider kind come back to the client.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use airlock_e2e::gateway::{assert_error_shape, error_shape_problem, HttpReply};
use airlock_e2e::mock::{closed_port_url, Fault, MockUpstream, ProviderKind};
use airlock_e2e::sse::SseTranscript;
use airlock_e2e::stack::{chat, chat_stream, wiring, Stack};
use airlock_e2e::Gateway;
use reqwest::Method;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const EMB: &str = "/v1/embeddings";
const COMP: &str = "/v1/completions";
/// `max_body_bytes` of the gateway the table runs against.
const MAX_BODY: usize = 65_536;

#[derive(Debug, Clone)]
enum Auth {
    Master,
    None,
    Header(&'static str),
}

#[derive(Debug, Clone)]
enum Body {
    Empty,
    Json(Value),
    /// Raw text sent with `content-type: application/json`.
    Raw(String),
    /// Raw text with this content type (`None`: no content-type header).
    Typed(Option<&'static str>, String),
}

#[derive(Debug, Clone)]
struct Row {
    name: &'static str,
    method: Method,
    path: &'static str,
    auth: Auth,
    body: Body,
    status: u16,
    /// Acceptable codes (usually one).
    codes: &'static [&'static str],
    /// `Some(p)`: `error.param` must equal `p`.
    param: Option<&'static str>,
}

fn row(
    name: &'static str,
    path: &'static str,
    body: Body,
    status: u16,
    code: &'static [&'static str],
) -> Row {
    Row {
        name,
        method: Method::POST,
        path,
        auth: Auth::Master,
        body,
        status,
        codes: code,
        param: None,
    }
}

impl Row {
    fn param(mut self, p: &'static str) -> Row {
        self.param = Some(p);
        self
    }
    fn method(mut self, m: Method) -> Row {
        self.method = m;
        self.body = Body::Empty;
        self
    }
    fn auth(mut self, a: Auth) -> Row {
        self.auth = a;
        self
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn with(field: &str, value: Value) -> Body {
    let mut b = chat("gpt", "hi");
    b[field] = value;
    Body::Json(b)
}

fn table() -> Vec<Row> {
    use Body::{Json, Raw, Typed};
    let big = format!(
        "{{\"model\":\"gpt\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(MAX_BODY * 2)
    );
    vec![
        // Malformed JSON.
        row("truncated json", CHAT, Raw("{\"model\": ".into()), 400, &["invalid_json"]),
        row("empty json body", CHAT, Raw(String::new()), 400, &["invalid_json"]),
        row("trailing garbage", CHAT, Raw(format!("{} x", chat("gpt", "hi"))), 400, &["invalid_json"]),
        row("embeddings bad json", EMB, Raw("{".into()), 400, &["invalid_json"]),
        // Wrong types, with the field path.
        row("body is an array", CHAT, Json(json!([1, 2])), 400, &["invalid_type", "invalid_json"]),
        row("model is a number", CHAT, Json(json!({"model": 5, "messages": user("hi")})), 400, &["invalid_type"])
            .param("model"),
        row("messages is a string", CHAT, Json(json!({"model": "gpt", "messages": "hi"})), 400, &["invalid_type"])
            .param("messages"),
        row(
            "content is a number",
            CHAT,
            Json(json!({"model": "gpt", "messages": [{"role": "user", "content": 5}]})),
            400,
            &["invalid_type"],
        )
        .param("messages[0].content"),
        row(
            "second content is a bool",
            CHAT,
            Json(json!({"model": "gpt", "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": true}]})),
            400,
            &["invalid_type"],
        )
        .param("messages[1].content"),
        row("temperature is a string", CHAT, with("temperature", json!("hot")), 400, &["invalid_type"]).param("temperature"),
        row("stream is a string", CHAT, with("stream", json!("yes")), 400, &["invalid_type"]).param("stream"),
        row("n is fractional", CHAT, with("n", json!(1.5)), 400, &["invalid_type"]).param("n"),
        row("tools is a string", CHAT, with("tools", json!("x")), 400, &["invalid_type"]).param("tools"),
        row("embeddings input is a number", EMB, Json(json!({"model": "embed", "input": 5})), 400, &["invalid_type"])
            .param("input"),
        // Missing required fields.
        row("no model", CHAT, Json(json!({"messages": user("hi")})), 400, &["missing_required_parameter"]).param("model"),
        row("no messages", CHAT, Json(json!({"model": "gpt"})), 400, &["missing_required_parameter"]).param("messages"),
        row(
            "message without role",
            CHAT,
            Json(json!({"model": "gpt", "messages": [{"content": "hi"}]})),
            400,
            &["missing_required_parameter"],
        )
        .param("messages[0].role"),
        row("embeddings without input", EMB, Json(json!({"model": "embed"})), 400, &["missing_required_parameter"])
            .param("input"),
        row("embeddings without model", EMB, Json(json!({"input": "x"})), 400, &["missing_required_parameter"])
            .param("model"),
        row("completions without prompt", COMP, Json(json!({"model": "gpt"})), 400, &["missing_required_parameter"])
            .param("prompt"),
        // Out of range.
        row("temperature above 2", CHAT, with("temperature", json!(2.5)), 400, &["invalid_value"]).param("temperature"),
        row("temperature below 0", CHAT, with("temperature", json!(-0.1)), 400, &["invalid_value"]).param("temperature"),
        row("top_p above 1", CHAT, with("top_p", json!(1.5)), 400, &["invalid_value"]).param("top_p"),
        row("n is 0", CHAT, with("n", json!(0)), 400, &["invalid_value"]).param("n"),
        row("max_tokens is 0", CHAT, with("max_tokens", json!(0)), 400, &["invalid_value"]).param("max_tokens"),
        row("max_tokens negative", CHAT, with("max_tokens", json!(-5)), 400, &["invalid_value", "invalid_type"])
            .param("max_tokens"),
        row("messages empty", CHAT, Json(json!({"model": "gpt", "messages": []})), 400, &["invalid_value"])
            .param("messages"),
        row(
            "unknown role",
            CHAT,
            Json(json!({"model": "gpt", "messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            &["invalid_value", "invalid_type"],
        )
        .param("messages[0].role"),
        row(
            "completions temperature above 2",
            COMP,
            Json(json!({"model": "gpt", "prompt": "x", "temperature": 3})),
            400,
            &["invalid_value"],
        )
        .param("temperature"),
        // Unknown models.
        row("unknown model", CHAT, Json(chat("no-such-model", "hi")), 404, &["model_not_found"]),
        row("unknown provider in target", CHAT, Json(chat("nope/gpt-4o-mini", "hi")), 404, &["model_not_found"]),
        row("embeddings unknown model", EMB, Json(json!({"model": "nope", "input": "x"})), 404, &["model_not_found"]),
        row("completions unknown model", COMP, Json(json!({"model": "nope", "prompt": "x"})), 404, &["model_not_found"]),
        row("retrieve unknown model", "/v1/models/no-such-model", Body::Empty, 404, &["model_not_found"])
            .method(Method::GET),
        // Operation the provider lacks.
        row("embeddings on anthropic", EMB, Json(json!({"model": "claude", "input": "x"})), 400, &["unsupported_operation"]),
        // Size and media type.
        row("body too large", CHAT, Raw(big), 413, &["request_too_large"]),
        row("text/plain body", CHAT, Typed(Some("text/plain"), chat("gpt", "hi").to_string()), 415, &["unsupported_media_type"]),
        row(
            "form body",
            CHAT,
            Typed(Some("application/x-www-form-urlencoded"), "model=gpt".into()),
            415,
            &["unsupported_media_type"],
        ),
        row("no content-type", CHAT, Typed(None, chat("gpt", "hi").to_string()), 415, &["unsupported_media_type"]),
        // Routes and methods.
        row("unknown route GET", "/v1/nothing", Body::Empty, 404, &["unknown_url"]).method(Method::GET),
        row("unknown route POST", "/v1/chat/complete", Json(chat("gpt", "hi")), 404, &["unknown_url"]),
        row("GET on chat", CHAT, Body::Empty, 405, &["method_not_allowed"]).method(Method::GET),
        row("DELETE on models", "/v1/models", Body::Empty, 405, &["method_not_allowed"]).method(Method::DELETE),
        row("PUT on embeddings", EMB, Body::Empty, 405, &["method_not_allowed"]).method(Method::PUT),
        // Keys.
        row("no key", CHAT, Json(chat("gpt", "hi")), 401, &["invalid_api_key"]).auth(Auth::None),
        row("wrong key", CHAT, Json(chat("gpt", "hi")), 401, &["invalid_api_key"])
            .auth(Auth::Header("Bearer airlock-wrong-key-0123456789")),
        row("basic scheme", CHAT, Json(chat("gpt", "hi")), 401, &["invalid_api_key"])
            .auth(Auth::Header("Basic YWRtaW46YWRtaW4=")),
        row("empty bearer", CHAT, Json(chat("gpt", "hi")), 401, &["invalid_api_key"]).auth(Auth::Header("Bearer ")),
        row("no key on models", "/v1/models", Body::Empty, 401, &["invalid_api_key"])
            .method(Method::GET)
            .auth(Auth::None),
        row("no key and bad json", CHAT, Raw("{".into()), 401, &["invalid_api_key"]).auth(Auth::None),
    ]
}

async fn send(gw: &Gateway, r: &Row) -> HttpReply {
    let client = gw.anon_client();
    let mut req = client.request(r.method.clone(), gw.url(r.path));
    match &r.auth {
        Auth::Master => req = req.bearer_auth(gw.key()),
        Auth::None => {}
        Auth::Header(h) => req = req.header("authorization", *h),
    }
    req = match &r.body {
        Body::Empty => req,
        Body::Json(v) => req.json(v),
        Body::Raw(s) => req
            .header("content-type", "application/json")
            .body(s.clone()),
        Body::Typed(Some(ct), s) => req.header("content-type", *ct).body(s.clone()),
        Body::Typed(None, s) => req.body(s.clone()),
    };
    match req.send().await {
        Ok(resp) => HttpReply::read(resp).await,
        Err(e) => panic!("{}: request failed: {e}\n{}", r.name, gw.stderr()),
    }
}

#[tokio::test]
async fn client_mistakes_get_stable_4xx() {
    let mut stack = Stack::start_with(|b| b.server("max_body_bytes", &MAX_BODY.to_string())).await;
    let mut failures = Vec::new();
    for r in table() {
        let upstream_before = stack.upstream_requests();
        let reply = send(&stack.gateway, &r).await;
        let body: Option<Value> = serde_json::from_str(&reply.text).ok();
        let code = body
            .as_ref()
            .and_then(|b| b.pointer("/error/code"))
            .and_then(Value::as_str);
        let param = body
            .as_ref()
            .and_then(|b| b.pointer("/error/param"))
            .cloned();
        let mut problems = Vec::new();
        if reply.status >= 500 {
            problems.push("a client mistake must never be a 5xx".to_string());
        }
        if reply.status != r.status {
            problems.push(format!("status {} (want {})", reply.status, r.status));
        }
        if !code.is_some_and(|c| r.codes.contains(&c)) {
            problems.push(format!("code {code:?} (want one of {:?})", r.codes));
        }
        if let Some(p) = r.param {
            if param.as_ref().and_then(Value::as_str) != Some(p) {
                problems.push(format!("param {param:?} (want {p:?})"));
            }
        }
        match &body {
            Some(b) => problems.extend(error_shape_problem(b)),
            None => problems.push("body is not JSON".to_string()),
        }
        if reply.header("x-airlock-request-id").is_none() {
            problems.push("no x-airlock-request-id".to_string());
        }
        if stack.upstream_requests() != upstream_before {
            problems.push("the request reached an upstream".to_string());
        }
        if !problems.is_empty() {
            let shown: String = reply.text.chars().take(300).collect();
            failures.push(format!(
                "- {} ({} {}): {}\n    got: {shown}",
                r.name,
                r.method,
                r.path,
                problems.join("; ")
            ));
        }
    }
    assert!(
        stack.gateway.is_running(),
        "the gateway died during the table\n{}",
        stack.gateway.stderr()
    );
    let health = stack.gateway.get("/health").await;
    assert_eq!(health.status, 200, "still healthy after the table");
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn auth_no_header_wrong_key_right_key() {
    let stack = Stack::start().await;
    let gw = &stack.gateway;
    let anon = gw.anon_client();
    let body = chat("gpt", "auth me");

    let r = HttpReply::read(anon.post(gw.url(CHAT)).json(&body).send().await.unwrap()).await;
    r.expect_error(401, "invalid_api_key");
    let r = HttpReply::read(
        anon.post(gw.url(CHAT))
            .bearer_auth("sk-not-the-master-key-000000")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.expect_error(401, "invalid_api_key");
    // A prefix of the right key is still wrong.
    let prefix = &gw.key()[..gw.key().len() - 1];
    let r = HttpReply::read(
        anon.post(gw.url(CHAT))
            .bearer_auth(prefix)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.expect_error(401, "invalid_api_key");
    assert_eq!(
        stack.openai.request_count(),
        0,
        "refused requests must not reach the upstream"
    );

    let r = HttpReply::read(
        anon.post(gw.url(CHAT))
            .bearer_auth(gw.key())
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.expect_status(200);
    // The client's key is never forwarded upstream; the provider's is.
    let rec = stack.openai.last_request();
    assert_eq!(
        rec.header("authorization"),
        Some(format!("Bearer {}", stack.openai.api_key()).as_str())
    );
    assert!(
        !format!("{:?}", rec.headers).contains(gw.key()),
        "the master key leaked upstream"
    );
}

#[tokio::test]
async fn custom_master_key_env() {
    let oai = MockUpstream::openai().await;
    let toml = airlock_e2e::ConfigBuilder::new()
        .server("master_key_env", "\"MY_GATEWAY_KEY\"")
        .provider("oai", &oai)
        .model("gpt", &["oai/gpt-4o-mini"])
        .toml();
    let env = [
        ("MY_GATEWAY_KEY", "a-different-master-key-42"),
        ("AIRLOCK_TEST_KEY_OAI", oai.api_key()),
    ];
    let gw = Gateway::start(&toml, &env).await;
    let ok = gw
        .anon_client()
        .post(gw.url(CHAT))
        .bearer_auth("a-different-master-key-42")
        .json(&chat("gpt", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    // The harness's default key (set in AIRLOCK_MASTER_KEY) must not work here.
    let no = gw
        .anon_client()
        .post(gw.url(CHAT))
        .bearer_auth(airlock_e2e::gateway::DEFAULT_MASTER_KEY)
        .json(&chat("gpt", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(no.status().as_u16(), 401);
}

airlock_e2e::per_provider!(upstream_failures_map_to_codes);

async fn upstream_failures_map_to_codes(kind: ProviderKind) {
    let w = wiring(kind);
    let secret = "mock upstream fault injected";

    let cases: Vec<(Fault, u16, &[&str])> = vec![
        (Fault::Status(500), 502, &["upstream_error"]),
        (Fault::Status(503), 502, &["upstream_error"]),
        (Fault::Status(429), 429, &["upstream_rate_limited"]),
        (Fault::Status(400), 400, &["upstream_rejected_request"]),
        (
            Fault::DropConnection,
            502,
            &["upstream_unavailable", "upstream_error"],
        ),
        // Not a listed code; any `upstream_*` 502 is fine for an unparseable answer.
        (
            Fault::MalformedJson,
            502,
            &["upstream_error", "upstream_invalid_response"],
        ),
    ];
    // Each case gets its own gateway: failures open circuit breakers and a 429 starts a
    // cooldown, both of which would shape the next case's answer.
    for (fault, status, codes) in cases {
        let stack = Stack::start().await;
        let mock = stack.mock(kind);
        let gw = &stack.gateway;
        mock.fail_always(fault.clone());
        let reply = gw.post_json(CHAT, &chat(w.model, "fail please")).await;
        assert_eq!(reply.status, status, "{fault:?}: {}", reply.text);
        let code = reply.error_code();
        assert!(
            code.as_deref().is_some_and(|c| codes.contains(&c)),
            "{fault:?}: code {code:?}, want {codes:?}"
        );
        assert_error_shape(&reply.json());
        assert!(
            reply.header("x-airlock-request-id").is_some(),
            "{fault:?}: no request id"
        );
        if status >= 500 {
            assert!(
                !reply.text.contains(secret),
                "{fault:?}: 5xx body leaks the upstream's message: {}",
                reply.text
            );
        }
        if status == 429 {
            assert!(
                reply.header("retry-after").is_some(),
                "429 without Retry-After: {:?}",
                reply.headers
            );
        }
        let resp = gw
            .post_stream(CHAT, &chat_stream(w.model, "fail please", false))
            .await;
        if fault == Fault::MalformedJson {
            // The mock's stream starts well and then sends an event that is not JSON:
            // the client must hear of it as an error event, and get no [DONE].
            assert_eq!(resp.status().as_u16(), 200);
            let t = SseTranscript::read(resp).await;
            let errors = t.errors();
            assert_eq!(
                errors.len(),
                1,
                "one error event for a malformed upstream event: {t}"
            );
            let code = errors[0]
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("");
            assert!(
                code.starts_with("upstream_"),
                "error event code {code:?}: {t}"
            );
            assert!(!t.has_done(), "[DONE] after an upstream error: {t}");
            mock.heal();
            continue;
        }
        // The same on a streaming request: nothing was sent yet, so a plain JSON error.
        let reply = HttpReply::read(resp).await;
        assert_eq!(reply.status, status, "{fault:?} (stream): {}", reply.text);
        let code = reply.error_code();
        assert!(
            code.as_deref().is_some_and(|c| codes.contains(&c)),
            "{fault:?} (stream): code {code:?}"
        );
        mock.heal();
        if status != 429 && status < 500 {
            let reply = gw.post_json(CHAT, &chat(w.model, "healthy again")).await;
            reply.expect_status(200);
        }
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_unavailable() {
    let oai_url = closed_port_url("/v1").await;
    let gem_url = closed_port_url("/v1beta").await;
    let gw = airlock_e2e::ConfigBuilder::new()
        .provider_at("dead", ProviderKind::OpenAi, &oai_url, Some("k"))
        .provider_at("deadgem", ProviderKind::Gemini, &gem_url, Some("k"))
        .model("gpt", &["dead/gpt-4o-mini"])
        .model("gem", &["deadgem/gemini-2.0-flash"])
        .start()
        .await;
    for model in ["gpt", "gem"] {
        gw.post_json(CHAT, &chat(model, "anyone?"))
            .await
            .expect_error(502, "upstream_unavailable");
        let reply = HttpReply::read(
            gw.post_stream(CHAT, &chat_stream(model, "anyone?", false))
                .await,
        )
        .await;
        reply.expect_error(502, "upstream_unavailable");
    }
    let reply = gw
        .post_json(
            EMB,
            &json!({"model": "dead/text-embedding-3-small", "input": "x"}),
        )
        .await;
    reply.expect_error(502, "upstream_unavailable");
}

#[tokio::test]
async fn slow_first_byte_is_504_timeout() {
    let oai = MockUpstream::openai().await;
    let gw = airlock_e2e::ConfigBuilder::new()
        .upstream("first_byte_timeout", "1")
        .provider("oai", &oai)
        .model("gpt", &["oai/gpt-4o-mini"])
        .start()
        .await;
    oai.fail_always(Fault::DelayFirstByte(Duration::from_secs(4)));
    let start = Instant::now();
    gw.post_json(CHAT, &chat("gpt", "slow"))
        .await
        .expect_error(504, "upstream_timeout");
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the gateway waited {took:?}, longer than the upstream's delay"
    );
    assert!(
        took >= Duration::from_millis(900),
        "timed out after {took:?}, before first_byte_timeout = 1 s"
    );
}

#[tokio::test]
async fn auth_scheme_is_case_insensitive_and_charset_is_fine() {
    let stack = Stack::start().await;
    let gw = &stack.gateway;
    let anon = gw.anon_client();
    // RFC 9110 section 11.1: the auth scheme is case-insensitive.
    let resp = anon
        .post(gw.url(CHAT))
        .header("authorization", format!("bearer {}", gw.key()))
        .json(&chat("gpt", "lower-case scheme"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        HttpReply::read(resp).await.status,
        200,
        "`bearer` (lower case) must be accepted"
    );
    let resp = gw
        .client()
        .post(gw.url(CHAT))
        .header("content-type", "application/json; charset=utf-8")
        .body(chat("gpt", "with charset").to_string())
        .send()
        .await
        .unwrap();
    HttpReply::read(resp).await.expect_status(200);
}

#[tokio::test]
async fn upstream_auth_failure_is_not_the_clients_401() {
    // The provider's key is wrong: that is the operator's problem, not the client's.
    let oai = MockUpstream::openai().await;
    let gw = airlock_e2e::ConfigBuilder::new()
        .provider_at(
            "oai",
            ProviderKind::OpenAi,
            &oai.base_url(),
            Some("sk-wrong-provider-key"),
        )
        .model("gpt", &["oai/gpt-4o-mini"])
        .start()
        .await;
    let reply = gw.post_json(CHAT, &chat("gpt", "x")).await;
    assert_ne!(
        reply.status, 401,
        "an upstream 401 must not look like a bad gateway key: {}",
        reply.text
    );
    assert_ne!(
        reply.error_code().as_deref(),
        Some("invalid_api_key"),
        "{}",
        reply.text
    );
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(oai.request_count(), 1);
}
