//! Routing end to end: the real binary in front of several OpenAI-kind mocks (`p1`,
//! `p2`, `p3`), showing failover, retries, the circuit breaker, 429 cooldowns, every
//! strategy, caps, stream failover, and request-level and context-window fallbacks.
//!
//! Each test writes its own `[routing]`, `[[models]]` and `[[catalog]]` sections with
//! short cooldowns and timeouts, and waits on conditions by polling `GET /v1/models`
//! with a deadline rather than sleeping.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use airlock_e2e::gateway::{wait_until, HttpReply};
use airlock_e2e::mock::{closed_port_url, Fault, MockUpstream, ProviderKind};
use airlock_e2e::sse::SseTranscript;
use airlock_e2e::stack::{chat, chat_stream};
use airlock_e2e::{ConfigBuilder, Gateway};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

/// How long a test waits for a condition it polls.
const PATIENCE: Duration = Duration::from_secs(5);

/// `n` OpenAI-kind mocks; `providers` names them `p1`, `p2`, ...
async fn mocks(n: usize) -> Vec<MockUpstream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(MockUpstream::openai().await);
    }
    out
}

/// A config with one provider per mock, `p1` to `pN`.
fn providers(mocks: &[MockUpstream]) -> ConfigBuilder {
    mocks
        .iter()
        .enumerate()
        .fold(ConfigBuilder::new(), |b, (i, m)| {
            b.provider(&format!("p{}", i + 1), m)
        })
}

/// Starts a gateway from `builder` plus raw TOML (`[routing]`, `[[models]]`,
/// `[[catalog]]`) appended after its providers.
async fn start(builder: ConfigBuilder, routing_toml: &str) -> Gateway {
    let toml = format!("{}\n{routing_toml}", builder.toml());
    let env = builder.env_vars();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Gateway::start(&toml, &env).await
}

/// `n` mocks and a gateway routing over them as `routing_toml` says.
async fn rig(n: usize, routing_toml: &str) -> (Vec<MockUpstream>, Gateway) {
    let m = mocks(n).await;
    let gw = start(providers(&m), routing_toml).await;
    (m, gw)
}

/// `x-airlock-target`: the `provider/model` that answered.
fn served_by(r: &HttpReply) -> &str {
    r.header("x-airlock-target").unwrap_or("<none>")
}

fn attempts(r: &HttpReply) -> Option<&str> {
    r.header("x-airlock-attempts")
}

fn route(r: &HttpReply) -> &str {
    r.header("x-airlock-route").unwrap_or("<none>")
}

/// A chat request to `model` that must succeed; returns the reply.
async fn ask(gw: &Gateway, model: &str) -> HttpReply {
    let reply = gw.post_json(CHAT, &chat(model, "route me")).await;
    reply.expect_status(200);
    reply
}

/// A chat request to `model` that must be answered by `target` after `tries` attempts.
async fn ask_expecting(gw: &Gateway, model: &str, target: &str, tries: u32) -> HttpReply {
    let reply = ask(gw, model).await;
    assert_eq!(
        served_by(&reply),
        target,
        "route: {}; body {}",
        route(&reply),
        reply.text
    );
    assert_eq!(
        attempts(&reply),
        Some(tries.to_string().as_str()),
        "x-airlock-attempts; route: {}",
        route(&reply)
    );
    reply
}

/// `availability` of target `label` as `GET /v1/models` reports it.
async fn availability(gw: &Gateway, label: &str) -> Value {
    let list = gw.get("/v1/models").await.expect_status(200);
    list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == label))
        .map(|m| m["availability"].clone())
        .unwrap_or_else(|| panic!("target {label} is not listed in /v1/models: {list}"))
}

/// `availability.circuit` of target `label`.
async fn circuit(gw: &Gateway, label: &str) -> String {
    availability(gw, label).await["circuit"]
        .as_str()
        .unwrap_or("<missing>")
        .to_string()
}

/// Polls `GET /v1/models` until target `label`'s availability satisfies `ok`.
async fn await_availability(gw: &Gateway, label: &str, what: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let a = availability(gw, label).await;
        if ok(&a) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{label} never became {what} within {PATIENCE:?}; last availability {a}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chat body whose prompt is estimated at roughly `tokens` tokens (4 ASCII chars each).
fn long_chat(model: &str, tokens: usize) -> Value {
    chat(model, &"word ".repeat(tokens * 4 / 5))
}

/// Priority over two targets, `p1/gpt-4o` first.
const PRIORITY_PAIR: &str = r#"
[[models]]
name = "m"
targets = ["p1/gpt-4o", "p2/gpt-4o-mini"]
"#;

// ---------------------------------------------------------------------------------
// Priority failover and retries

#[tokio::test]
async fn priority_fails_over_on_5xx() {
    let (m, gw) = rig(2, PRIORITY_PAIR).await;
    m[0].fail_always(Fault::Status(503));
    let reply = ask_expecting(&gw, "m", "p2/gpt-4o-mini", 2).await;
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "You said: route me"
    );
    assert_eq!(m[0].request_count(), 1);
    assert_eq!(m[1].request_count(), 1);
    assert_eq!(m[1].last_request().body_json()["model"], "gpt-4o-mini");
}

#[tokio::test]
async fn priority_fails_over_on_first_byte_timeout() {
    let m = mocks(2).await;
    let gw = start(
        providers(&m).upstream("first_byte_timeout", "0.5"),
        PRIORITY_PAIR,
    )
    .await;
    m[0].fail_always(Fault::DelayFirstByte(Duration::from_secs(5)));
    let t0 = Instant::now();
    ask_expecting(&gw, "m", "p2/gpt-4o-mini", 2).await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "waited {:?} for a target past its first_byte_timeout of 0.5 s",
        t0.elapsed()
    );
    assert_eq!(m[0].request_count(), 1);
}

#[tokio::test]
async fn priority_fails_over_on_refused_connection() {
    let dead = closed_port_url("/v1").await;
    let live = MockUpstream::openai().await;
    let builder = ConfigBuilder::new()
        .provider_at("p1", ProviderKind::OpenAi, &dead, Some("sk-nobody-home"))
        .provider("p2", &live);
    let gw = start(builder, PRIORITY_PAIR).await;
    ask_expecting(&gw, "m", "p2/gpt-4o-mini", 2).await;
    assert_eq!(live.request_count(), 1);
}

#[tokio::test]
async fn upstream_400_is_neither_retried_nor_failed_over() {
    let (m, gw) = rig(
        2,
        r#"
[[models]]
name = "m"
targets = ["p1/gpt-4o", "p2/gpt-4o-mini"]
num_retries = 2
retry_backoff = 0.01
"#,
    )
    .await;
    m[0].fail_always(Fault::Status(400));
    let reply = gw.post_json(CHAT, &chat("m", "rejected")).await;
    reply.expect_error(400, "upstream_rejected_request");
    assert_eq!(m[0].request_count(), 1, "a 400 must not be retried");
    assert_eq!(m[1].request_count(), 0, "a 400 must not fail over");
}

#[tokio::test]
async fn retries_stay_on_the_same_target() {
    let (m, gw) = rig(
        2,
        r#"
[[models]]
name = "m"
targets = ["p1/gpt-4o", "p2/gpt-4o-mini"]
num_retries = 2
retry_backoff = 0.01
"#,
    )
    .await;
    m[0].fail_next(Fault::Status(500));
    m[0].fail_next(Fault::Status(502));
    ask_expecting(&gw, "m", "p1/gpt-4o", 3).await;
    assert_eq!(m[0].request_count(), 3);
    assert_eq!(m[1].request_count(), 0, "retries come before failover");
}

// ---------------------------------------------------------------------------------
// Circuit breaker and 429 cooldowns

#[tokio::test]
async fn breaker_opens_then_probes_after_cooldown_and_closes() {
    let (m, gw) = rig(
        2,
        &format!("[routing]\nconsecutive_failures = 3\ncooldown = 1\n{PRIORITY_PAIR}"),
    )
    .await;
    let (p1, p2) = (&m[0], &m[1]);
    p1.fail_always(Fault::Status(500));
    for _ in 0..3 {
        ask_expecting(&gw, "m", "p2/gpt-4o-mini", 2).await;
    }
    assert_eq!(p1.request_count(), 3);
    assert_eq!(circuit(&gw, "p1/gpt-4o").await, "open");

    // Open: p1 is skipped without a call and the route says why.
    let reply = ask_expecting(&gw, "m", "p2/gpt-4o-mini", 1).await;
    assert_eq!(p1.request_count(), 3, "an open circuit must not be called");
    assert_eq!(
        route(&reply),
        "priority; p2/gpt-4o-mini, p1/gpt-4o(unavailable)"
    );

    // After the cooldown one probe goes to p1; it fails, so the circuit re-opens at once.
    await_availability(&gw, "p1/gpt-4o", "half-open", |a| {
        a["circuit"] == "half_open"
    })
    .await;
    ask_expecting(&gw, "m", "p2/gpt-4o-mini", 2).await;
    assert_eq!(p1.request_count(), 4, "exactly one probe");
    assert_eq!(circuit(&gw, "p1/gpt-4o").await, "open");
    ask_expecting(&gw, "m", "p2/gpt-4o-mini", 1).await;
    assert_eq!(p1.request_count(), 4);

    // Healed: the next probe succeeds. While it is in flight nobody else gets p1.
    p1.heal();
    p1.fail_next(Fault::DelayFirstByte(Duration::from_millis(500)));
    await_availability(&gw, "p1/gpt-4o", "half-open", |a| {
        a["circuit"] == "half_open"
    })
    .await;
    let p2_before = p2.request_count();
    let (probe, bystander) = tokio::join!(ask(&gw, "m"), async {
        assert!(
            wait_until(PATIENCE, || p1.request_count() == 5).await,
            "the probe never reached p1"
        );
        ask(&gw, "m").await
    });
    assert_eq!(served_by(&probe), "p1/gpt-4o", "route: {}", route(&probe));
    assert_eq!(
        served_by(&bystander),
        "p2/gpt-4o-mini",
        "only the probe may go to a half-open target; route: {}",
        route(&bystander)
    );
    assert_eq!(p1.request_count(), 5);
    assert_eq!(p2.request_count(), p2_before + 1);
    assert_eq!(circuit(&gw, "p1/gpt-4o").await, "closed");

    // Closed again: priority sends traffic back to p1.
    for _ in 0..3 {
        ask_expecting(&gw, "m", "p1/gpt-4o", 1).await;
    }
    assert_eq!(p2.request_count(), p2_before + 1);
}

#[tokio::test]
async fn rate_limited_target_cools_down_for_retry_after() {
    let (m, gw) = rig(
        2,
        &format!(
            r#"{PRIORITY_PAIR}
[[models]]
name = "solo"
targets = ["p1/gpt-4o"]
"#
        ),
    )
    .await;
    let (p1, p2) = (&m[0], &m[1]);
    // The mock's 429 carries `Retry-After: 1`.
    p1.fail_next(Fault::Status(429));
    let t0 = Instant::now();
    ask_expecting(&gw, "m", "p2/gpt-4o-mini", 2).await;
    assert_eq!(p1.request_count(), 1);

    // Cooling down: p1 is not called, p2 serves.
    let reply = ask_expecting(&gw, "m", "p2/gpt-4o-mini", 1).await;
    assert_eq!(p1.request_count(), 1, "a cooling target must not be called");
    assert_eq!(
        route(&reply),
        "priority; p2/gpt-4o-mini, p1/gpt-4o(unavailable)"
    );

    // With no other target, the client is told to come back later.
    let reply = gw.post_json(CHAT, &chat("solo", "anyone?")).await;
    let err = reply.expect_error(429, "upstream_rate_limited");
    let retry_after: u64 = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {}", reply.text))
        .parse()
        .expect("Retry-After is whole seconds");
    assert_eq!(retry_after, 1, "{err}");
    assert_eq!(p1.request_count(), 1);
    assert_eq!(p2.request_count(), 2);

    // After the Retry-After, p1 is back.
    await_availability(&gw, "p1/gpt-4o", "available", |a| a["available"] == true).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(950),
        "the cooldown ended after {:?}, before Retry-After: 1",
        t0.elapsed()
    );
    ask_expecting(&gw, "m", "p1/gpt-4o", 1).await;
    ask_expecting(&gw, "solo", "p1/gpt-4o", 1).await;
    assert_eq!(p1.request_count(), 3);
}

// ---------------------------------------------------------------------------------
// Strategies

#[tokio::test]
async fn cost_picks_the_cheapest_healthy_target() {
    // Catalog prices (USD per Mtok in/out): claude-sonnet-4-5 3/15, gpt-4o 2.5/10,
    // gpt-4o-mini 0.15/0.6. Config order is dearest first.
    let (m, gw) = rig(
        3,
        r#"
[[models]]
name = "m"
strategy = "cost"
targets = ["p1/claude-sonnet-4-5", "p2/gpt-4o", "p3/gpt-4o-mini"]
"#,
    )
    .await;
    let reply = ask_expecting(&gw, "m", "p3/gpt-4o-mini", 1).await;
    let r = route(&reply);
    let order: Vec<&str> = r
        .strip_prefix("cost; ")
        .unwrap_or_else(|| panic!("route header {r:?}"))
        .split(", ")
        .map(|c| c.split('=').next().unwrap_or(""))
        .collect();
    assert_eq!(
        order,
        ["p3/gpt-4o-mini", "p2/gpt-4o", "p1/claude-sonnet-4-5"],
        "{r}"
    );

    m[2].fail_always(Fault::Status(500));
    ask_expecting(&gw, "m", "p2/gpt-4o", 2).await;
    assert_eq!(m[0].request_count(), 0, "the dearest was never needed");
    assert_eq!(m[1].request_count(), 1);
    assert_eq!(m[2].request_count(), 2);
}

#[tokio::test]
async fn latency_prefers_the_fast_target_once_measured() {
    let (m, gw) = rig(
        2,
        r#"
[[models]]
name = "m"
strategy = "latency"
targets = ["p1/gpt-4o", "p2/gpt-4o-mini"]
"#,
    )
    .await;
    m[0].fail_always(Fault::DelayFirstByte(Duration::from_millis(400)));
    // Unmeasured targets go first (config order breaks the tie), so both get measured.
    ask_expecting(&gw, "m", "p1/gpt-4o", 1).await;
    ask_expecting(&gw, "m", "p2/gpt-4o-mini", 1).await;
    for _ in 0..6 {
        let reply = ask_expecting(&gw, "m", "p2/gpt-4o-mini", 1).await;
        assert!(route(&reply).starts_with("latency; p2/gpt-4o-mini="));
    }
    assert_eq!(m[0].request_count(), 1, "the slow target was used once");
}

#[tokio::test]
async fn weighted_follows_the_weights() {
    let (m, gw) = rig(
        2,
        r#"
[[models]]
name = "m"
strategy = "weighted"
targets = [{ target = "p1/gpt-4o", weight = 1 }, { target = "p2/gpt-4o-mini", weight = 4 }]
"#,
    )
    .await;
    const N: usize = 100;
    let mut heavy = 0;
    for _ in 0..N {
        let reply = ask(&gw, "m").await;
        if served_by(&reply) == "p2/gpt-4o-mini" {
            heavy += 1;
        }
    }
    // Expected 80 of 100 (sd 4); an unweighted pick gives 50 (sd 5), priority 0 or 100.
    assert!(
        (65..=95).contains(&heavy),
        "weight-4 target served {heavy} of {N}"
    );
    assert_eq!(m[0].request_count() + m[1].request_count(), N);
    assert_eq!(m[1].request_count(), heavy);
}

#[tokio::test]
async fn hybrid_avoids_a_cheap_target_over_the_latency_budget() {
    let (m, gw) = rig(
        2,
        r#"
[[catalog]]
name = "cheap-slow"
input_per_mtok = 0.1
output_per_mtok = 0.2

[[catalog]]
name = "pricey-fast"
input_per_mtok = 10.0
output_per_mtok = 30.0

[[models]]
name = "m"
strategy = "hybrid"
targets = ["p1/cheap-slow", "p2/pricey-fast"]
max_latency_ms = 300
"#,
    )
    .await;
    m[0].fail_always(Fault::DelayFirstByte(Duration::from_millis(700)));
    // Nothing measured yet: cost decides.
    ask_expecting(&gw, "m", "p1/cheap-slow", 1).await;
    // p1 took 700 ms > 300 ms: from now on the pricier fast target wins.
    for _ in 0..5 {
        let reply = ask_expecting(&gw, "m", "p2/pricey-fast", 1).await;
        assert!(
            route(&reply).starts_with("hybrid; p2/pricey-fast="),
            "{}",
            route(&reply)
        );
    }
    assert_eq!(m[0].request_count(), 1);
}

// ---------------------------------------------------------------------------------
// Caps

#[tokio::test]
async fn max_parallel_spills_over_and_traffic_returns() {
    let (m, gw) = rig(
        2,
        r#"
[[models]]
name = "m"
targets = [{ target = "p1/gpt-4o", max_parallel = 1 }, "p2/gpt-4o-mini"]
"#,
    )
    .await;
    let (p1, p2) = (&m[0], &m[1]);
    p1.fail_next(Fault::DelayFirstByte(Duration::from_millis(800)));
    let (slow, spilled) = tokio::join!(ask(&gw, "m"), async {
        assert!(
            wait_until(PATIENCE, || p1.request_count() == 1).await,
            "the slow request never reached p1"
        );
        ask(&gw, "m").await
    });
    assert_eq!(served_by(&slow), "p1/gpt-4o");
    assert_eq!(
        served_by(&spilled),
        "p2/gpt-4o-mini",
        "route: {}",
        route(&spilled)
    );
    assert_eq!(
        route(&spilled),
        "priority; p2/gpt-4o-mini, p1/gpt-4o(unavailable)"
    );
    assert_eq!(attempts(&spilled), Some("1"));
    assert_eq!(p1.request_count(), 1, "p1 was full: no second call");

    // Drained: p1 takes traffic again.
    for _ in 0..2 {
        ask_expecting(&gw, "m", "p1/gpt-4o", 1).await;
    }
    assert_eq!(p2.request_count(), 1);
}

// ---------------------------------------------------------------------------------
// Nothing left

#[tokio::test]
async fn all_targets_failing_is_502_listing_every_attempt() {
    let (m, gw) = rig(2, PRIORITY_PAIR).await;
    m[0].fail_always(Fault::Status(503));
    m[1].fail_always(Fault::Status(500));
    let reply = gw.post_json(CHAT, &chat("m", "nobody home")).await;
    let err = reply.expect_error(502, "upstream_error");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("Attempts: p1/gpt-4o: upstream_error; p2/gpt-4o-mini: upstream_error."),
        "{msg}"
    );
    assert_eq!(attempts(&reply), Some("2"));
    assert_eq!((m[0].request_count(), m[1].request_count()), (1, 1));
}

#[tokio::test]
async fn all_circuits_open_is_503_no_healthy_target() {
    let (m, gw) = rig(
        2,
        &format!("[routing]\nconsecutive_failures = 1\ncooldown = 30\n{PRIORITY_PAIR}"),
    )
    .await;
    m[0].fail_always(Fault::Status(500));
    m[1].fail_always(Fault::Status(500));
    gw.post_json(CHAT, &chat("m", "break both"))
        .await
        .expect_error(502, "upstream_error");
    assert_eq!(circuit(&gw, "p1/gpt-4o").await, "open");
    assert_eq!(circuit(&gw, "p2/gpt-4o-mini").await, "open");

    let reply = gw.post_json(CHAT, &chat("m", "anyone?")).await;
    let err = reply.expect_error(503, "no_healthy_target");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("p1/gpt-4o: skipped (circuit open")
            && msg.contains("p2/gpt-4o-mini: skipped (circuit open"),
        "{msg}"
    );
    assert_eq!(attempts(&reply), Some("0"));
    assert_eq!(
        (m[0].request_count(), m[1].request_count()),
        (1, 1),
        "open circuits must not be called"
    );
}

// ---------------------------------------------------------------------------------
// Streams

/// Streams `model` and expects a clean stream from `target` after `tries` attempts;
/// returns how long the response head took.
async fn stream_expecting(gw: &Gateway, model: &str, target: &str, tries: &str) -> Duration {
    let t0 = Instant::now();
    let resp = gw
        .post_stream(CHAT, &chat_stream(model, "stream me", false))
        .await;
    let head_after = t0.elapsed();
    assert_eq!(resp.status().as_u16(), 200);
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(
        header("x-airlock-target").as_deref(),
        Some(target),
        "the head came after {head_after:?}"
    );
    assert_eq!(header("x-airlock-attempts").as_deref(), Some(tries));
    let t = SseTranscript::read(resp).await;
    assert!(t.errors().is_empty(), "{t}");
    assert!(t.done_is_last(), "{t}");
    assert_eq!(t.text(), "You said: stream me", "{t}");
    head_after
}

#[tokio::test]
async fn stream_failing_before_its_first_chunk_fails_over() {
    let (m, gw) = rig(2, PRIORITY_PAIR).await;
    m[0].fail_next(Fault::Status(500));
    stream_expecting(&gw, "m", "p2/gpt-4o-mini", "2").await;
    assert_eq!(m[0].request_count(), 1);
}

#[tokio::test]
async fn stream_stalling_past_ttft_timeout_fails_over() {
    let (m, gw) = rig(
        2,
        &format!("[routing]\nttft_timeout = 0.5\n{PRIORITY_PAIR}"),
    )
    .await;
    // Accepted (200 and headers), then silent before the first event.
    m[0].fail_next(Fault::DelayFirstEvent(Duration::from_secs(3)));
    let head_after = stream_expecting(&gw, "m", "p2/gpt-4o-mini", "2").await;
    assert!(
        head_after < Duration::from_secs(2),
        "waited {head_after:?} on a stream past ttft_timeout = 0.5 s"
    );
    assert_eq!(m[0].request_count(), 1);
}

#[tokio::test]
async fn stream_whose_head_is_late_past_ttft_timeout_fails_over() {
    // The first chunk is late because the response head is: ttft_timeout still bounds
    // the wait (first_byte_timeout stays at its 60 s default).
    let (m, gw) = rig(
        2,
        &format!("[routing]\nttft_timeout = 0.5\n{PRIORITY_PAIR}"),
    )
    .await;
    m[0].fail_next(Fault::DelayFirstByte(Duration::from_secs(3)));
    let head_after = stream_expecting(&gw, "m", "p2/gpt-4o-mini", "2").await;
    assert!(
        head_after < Duration::from_secs(2),
        "waited {head_after:?} on a stream past ttft_timeout = 0.5 s"
    );
}

#[tokio::test]
async fn stream_cut_after_its_first_chunk_ends_with_an_error_event() {
    let (m, gw) = rig(2, PRIORITY_PAIR).await;
    m[0].fail_next(Fault::CutAfter(3));
    let resp = gw
        .post_stream(
            CHAT,
            &chat_stream("m", "this answer breaks off half way", false),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("x-airlock-target")
            .and_then(|v| v.to_str().ok()),
        Some("p1/gpt-4o")
    );
    let t = SseTranscript::read(resp).await;
    assert!(!t.timed_out, "{t}");
    let errors = t.errors();
    assert_eq!(errors.len(), 1, "exactly one error event: {t}");
    assert_eq!(
        errors[0]["error"]["code"], "upstream_stream_interrupted",
        "{t}"
    );
    assert!(
        t.events
            .last()
            .and_then(|e| e.json())
            .is_some_and(|v| v.get("error").is_some()),
        "the error event is the last event: {t}"
    );
    assert!(!t.has_done(), "no [DONE] after a broken stream: {t}");
    assert!(!t.text().is_empty(), "the first chunks came through: {t}");
    assert_eq!(
        m[1].request_count(),
        0,
        "no failover once bytes reached the client"
    );
}

// ---------------------------------------------------------------------------------
// Fallbacks

#[tokio::test]
async fn request_fallbacks_are_used_and_not_forwarded() {
    let (m, gw) = rig(
        2,
        r#"
[[models]]
name = "m"
targets = ["p1/gpt-4o"]

[[models]]
name = "backup"
targets = ["p2/gpt-4o-mini"]
"#,
    )
    .await;
    m[0].fail_always(Fault::Status(500));
    for key in ["fallbacks", "models"] {
        let mut body = chat("m", "fall back");
        body[key] = json!(["backup"]);
        let reply = gw.post_json(CHAT, &body).await;
        reply.expect_status(200);
        assert_eq!(served_by(&reply), "p2/gpt-4o-mini", "{key}");
        assert_eq!(attempts(&reply), Some("2"), "{key}");
        let sent = m[1].last_request();
        let sent = sent.body_json();
        assert!(
            sent.get("fallbacks").is_none() && sent.get("models").is_none(),
            "`{key}` was forwarded upstream: {sent}"
        );
        assert_eq!(sent["model"], "gpt-4o-mini");
    }

    let mut body = chat("m", "fall back");
    body["fallbacks"] = json!(["no-such-model"]);
    let reply = gw.post_json(CHAT, &body).await;
    let err = reply.expect_error(400, "model_not_found");
    assert_eq!(err["param"], "fallbacks[0]", "{}", reply.text);
    assert_eq!(
        m[0].request_count(),
        2,
        "a bad fallback list is refused up front"
    );
    assert_eq!(m[1].request_count(), 2);
}

/// OpenAI's answer to a prompt longer than the model's context window.
fn context_length_exceeded() -> Fault {
    Fault::Replay {
        status: 400,
        content_type: "application/json".to_string(),
        body: json!({"error": {
            "message": "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }})
        .to_string(),
    }
}

#[tokio::test]
async fn context_overflow_from_upstream_moves_to_context_window_fallback() {
    let (m, gw) = rig(
        2,
        r#"
[[models]]
name = "small"
targets = ["p1/gpt-4o"]
context_window_fallbacks = ["big"]

[[models]]
name = "big"
targets = ["p2/gpt-4o-mini"]
"#,
    )
    .await;
    m[0].fail_next(context_length_exceeded());
    ask_expecting(&gw, "small", "p2/gpt-4o-mini", 2).await;
    assert_eq!(m[0].request_count(), 1, "a context overflow is not retried");
    assert_eq!(m[1].request_count(), 1);
}

#[tokio::test]
async fn prompt_too_large_for_catalog_context_window_skips_the_target() {
    let (m, gw) = rig(
        2,
        r#"
[[catalog]]
name = "tiny-model"
context_window = 1000

[[models]]
name = "tiny"
targets = ["p1/tiny-model"]
context_window_fallbacks = ["big"]

[[models]]
name = "tiny-only"
targets = ["p1/tiny-model"]

[[models]]
name = "big"
targets = ["p2/gpt-4o-mini"]
"#,
    )
    .await;
    // A short prompt fits.
    ask_expecting(&gw, "tiny", "p1/tiny-model", 1).await;
    assert_eq!(m[0].request_count(), 1);

    // About 2000 tokens: p1 is skipped without a call, the fallback serves.
    let reply = gw.post_json(CHAT, &long_chat("tiny", 2000)).await;
    reply.expect_status(200);
    assert_eq!(served_by(&reply), "p2/gpt-4o-mini");
    assert_eq!(attempts(&reply), Some("1"));
    assert_eq!(
        m[0].request_count(),
        1,
        "a target too small must not be called"
    );

    // With nowhere else to go it is the client's error.
    let reply = gw.post_json(CHAT, &long_chat("tiny-only", 2000)).await;
    reply.expect_error(400, "context_length_exceeded");
    assert_eq!(m[0].request_count(), 1);
    assert_eq!(m[1].request_count(), 1);
}
