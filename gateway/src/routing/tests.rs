//! Routing tests with simulated upstream outcomes: the provider call is a closure that
//! answers per target, so every path of the execute loop is exercised without sockets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;

use super::execute::{self, RequestFacts, TokenCount};
use super::*;
use crate::config::SecretPolicy;
use crate::providers::http::build_client;
use crate::providers::{UpstreamError, UpstreamErrorKind};

#[derive(Debug, Clone, PartialEq)]
struct Answer(String);

impl TokenCount for Answer {
    fn tokens(&self) -> Option<u64> {
        Some(10)
    }
}

fn routes(models: &str) -> Routes {
    let text = format!(
        r#"
[routing]
consecutive_failures = 2
cooldown = 60

[[providers]]
name = "a"
kind = "openai"
[[providers]]
name = "b"
kind = "anthropic"
[[providers]]
name = "c"
kind = "gemini"
{models}"#
    );
    let cfg = Config::parse(&text, &[("X", "y")], SecretPolicy::Ignore).unwrap();
    let catalog = Catalog::builtin().unwrap();
    Routes::new(&cfg, &build_client(&cfg.upstream), catalog)
}

fn err(kind: UpstreamErrorKind, provider: &str) -> UpstreamError {
    let mut e = UpstreamError::new(kind, provider, "simulated");
    if kind == UpstreamErrorKind::RateLimited {
        e.retry_after = Some(Duration::from_secs(30));
    }
    e
}

/// Runs one unary request; `outcome` decides per target label.
async fn run(
    r: &Routes,
    model: &str,
    facts: &RequestFacts,
    outcome: impl Fn(&str) -> Result<(), UpstreamErrorKind>,
) -> (
    Result<execute::Served<Answer>, crate::error::ApiError>,
    Vec<String>,
) {
    let calls = Mutex::new(Vec::new());
    let route = r.resolve(model).unwrap();
    let result = execute::unary(r, &route, facts, |t| {
        calls.lock().unwrap().push(t.label.clone());
        let o = outcome(&t.label).map_err(|k| err(k, &t.target.provider));
        let label = t.label.clone();
        async move { o.map(|()| Answer(label)) }
    })
    .await;
    let calls = calls.into_inner().unwrap();
    (result, calls)
}

fn facts() -> RequestFacts {
    RequestFacts {
        prompt_tokens: 100,
        output_cap: Some(100),
        ..RequestFacts::default()
    }
}

#[tokio::test]
async fn priority_fails_over_on_5xx_timeout_and_refused_connections() {
    for kind in [
        UpstreamErrorKind::Server,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Connect,
    ] {
        let r = routes(
            r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5", "c/gemini-2.5-flash"]
"#,
        );
        let (res, calls) = run(&r, "m", &facts(), |l| {
            if l == "a/gpt-4o" {
                Err(kind)
            } else {
                Ok(())
            }
        })
        .await;
        let served = res.unwrap();
        assert_eq!(
            served.value,
            Answer("b/claude-sonnet-4-5".into()),
            "{kind:?}"
        );
        assert_eq!(served.by.attempts, 2);
        assert_eq!(calls, ["a/gpt-4o", "b/claude-sonnet-4-5"]);
        assert!(
            served.by.route.starts_with("priority; "),
            "{}",
            served.by.route
        );
    }
}

#[tokio::test]
async fn client_errors_are_neither_retried_nor_failed_over() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
num_retries = 3
"#,
    );
    let (res, calls) = run(&r, "m", &facts(), |_| Err(UpstreamErrorKind::BadRequest)).await;
    assert_eq!(res.unwrap_err().code(), "upstream_rejected_request");
    assert_eq!(calls, ["a/gpt-4o"]);
}

#[tokio::test]
async fn retries_stay_on_the_target_up_to_num_retries() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
num_retries = 2
retry_backoff = 0.001
"#,
    );
    let n = AtomicU32::new(0);
    let (res, calls) = run(&r, "m", &facts(), |l| {
        if l == "a/gpt-4o" && n.fetch_add(1, Ordering::SeqCst) < 1 {
            Err(UpstreamErrorKind::Server)
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(res.unwrap().value, Answer("a/gpt-4o".into()));
    assert_eq!(calls, ["a/gpt-4o", "a/gpt-4o"]);
    // A target that keeps failing gets 1 + num_retries attempts, then the next one is
    // tried (here the breaker, at 2 consecutive failures, also opens on the way).
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
num_retries = 1
retry_backoff = 0.001
"#,
    );
    let (res, calls) = run(&r, "m", &facts(), |l| {
        if l == "a/gpt-4o" {
            Err(UpstreamErrorKind::Server)
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(res.unwrap().by.attempts, 3);
    assert_eq!(calls, ["a/gpt-4o", "a/gpt-4o", "b/claude-sonnet-4-5"]);
}

#[tokio::test]
async fn the_breaker_opens_and_the_route_skips_the_target_until_cooldown() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
"#,
    );
    // consecutive_failures = 2: two failing requests open a/gpt-4o's circuit.
    for _ in 0..2 {
        let (res, _) = run(&r, "m", &facts(), |l| {
            if l == "a/gpt-4o" {
                Err(UpstreamErrorKind::Server)
            } else {
                Ok(())
            }
        })
        .await;
        assert!(res.is_ok());
    }
    let (res, calls) = run(&r, "m", &facts(), |_| Ok(())).await;
    let served = res.unwrap();
    assert_eq!(
        calls,
        ["b/claude-sonnet-4-5"],
        "the open circuit is not called"
    );
    assert!(
        served.by.route.contains("a/gpt-4o(unavailable)"),
        "{}",
        served.by.route
    );
}

#[tokio::test]
async fn all_targets_down_lists_the_attempts() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
"#,
    );
    let (res, _) = run(&r, "m", &facts(), |_| Err(UpstreamErrorKind::Server)).await;
    let e = res.unwrap_err();
    assert_eq!(e.status().as_u16(), 502);
    assert_eq!(e.code(), "upstream_error");
    let msg = e.public_message();
    assert!(
        msg.contains("a/gpt-4o: upstream_error")
            && msg.contains("b/claude-sonnet-4-5: upstream_error"),
        "{msg}"
    );
    // Both circuits are now open after one more round: nothing can take requests.
    let _ = run(&r, "m", &facts(), |_| Err(UpstreamErrorKind::Server)).await;
    let (res, calls) = run(&r, "m", &facts(), |_| Ok(())).await;
    let e = res.unwrap_err();
    assert!(calls.is_empty());
    assert_eq!(e.status().as_u16(), 503);
    assert_eq!(e.code(), "no_healthy_target");
    assert!(
        e.public_message().contains("circuit open"),
        "{}",
        e.public_message()
    );
}

#[tokio::test]
async fn rate_limited_targets_cool_down_without_counting_as_failures() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
"#,
    );
    let (res, calls) = run(&r, "m", &facts(), |l| {
        if l == "a/gpt-4o" {
            Err(UpstreamErrorKind::RateLimited)
        } else {
            Ok(())
        }
    })
    .await;
    assert!(res.is_ok());
    assert_eq!(calls.len(), 2);
    let (_, calls) = run(&r, "m", &facts(), |_| Ok(())).await;
    assert_eq!(calls, ["b/claude-sonnet-4-5"], "a/gpt-4o is cooling down");
    // With only the cooling target, the client learns when to come back.
    let (res, _) = run(&r, "a/gpt-4o", &facts(), |_| Ok(())).await;
    let e = res.unwrap_err();
    assert_eq!(
        (e.status().as_u16(), e.code()),
        (429, "upstream_rate_limited")
    );
    let resp = axum::response::IntoResponse::into_response(e);
    assert!(resp.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn cost_strategy_prefers_the_cheapest_target() {
    let r = routes(
        r#"
[[models]]
name = "m"
strategy = "cost"
targets = ["a/gpt-4o", "c/gemini-2.5-flash-lite", "b/claude-sonnet-4-5"]
"#,
    );
    let (res, calls) = run(&r, "m", &facts(), |_| Ok(())).await;
    assert_eq!(calls, ["c/gemini-2.5-flash-lite"]);
    let route = res.unwrap().by.route;
    assert!(
        route.starts_with("cost; c/gemini-2.5-flash-lite=$"),
        "{route}"
    );
}

#[tokio::test]
async fn latency_strategy_learns_the_fastest_target() {
    let r = routes(
        r#"
[[models]]
name = "m"
strategy = "latency"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
"#,
    );
    let route = r.resolve("m").unwrap();
    for _ in 0..3 {
        // a is slow, b is fast; both are measured.
        for (label, ms) in [("a/gpt-4o", 40u64), ("b/claude-sonnet-4-5", 1)] {
            let t = route
                .targets
                .iter()
                .find(|(t, _)| t.label == label)
                .unwrap()
                .0
                .clone();
            let permit = t.health.admit(Instant::now(), 0).unwrap();
            t.health.success(
                permit,
                Instant::now(),
                Duration::from_millis(ms),
                None,
                None,
            );
        }
    }
    let (_, calls) = run(&r, "m", &facts(), |_| Ok(())).await;
    assert_eq!(calls, ["b/claude-sonnet-4-5"]);
}

#[tokio::test]
async fn context_overflow_goes_to_a_larger_context_fallback() {
    let r = routes(
        r#"
[[models]]
name = "small"
targets = ["a/gpt-4o"]
context_window_fallbacks = ["big"]
[[models]]
name = "big"
targets = ["c/gemini-2.5-pro"]
"#,
    );
    // gpt-4o has a 128k window: 200k tokens do not fit, so it is skipped unasked.
    let huge = RequestFacts {
        prompt_tokens: 200_000,
        output_cap: Some(1000),
        ..RequestFacts::default()
    };
    let (res, calls) = run(&r, "small", &huge, |_| Ok(())).await;
    assert_eq!(calls, ["c/gemini-2.5-pro"]);
    assert_eq!(res.unwrap().value, Answer("c/gemini-2.5-pro".into()));
    // The provider's own overflow error also moves to the fallback.
    let (res, calls) = run(&r, "small", &facts(), |l| {
        if l == "a/gpt-4o" {
            Err(UpstreamErrorKind::ContextWindowExceeded)
        } else {
            Ok(())
        }
    })
    .await;
    assert!(res.is_ok());
    assert_eq!(calls, ["a/gpt-4o", "c/gemini-2.5-pro"]);
    // Without a fallback, a prompt that fits nowhere is the client's 400.
    let r2 = routes("[[models]]\nname = \"small\"\ntargets = [\"a/gpt-4o\"]\n");
    let (res, calls) = run(&r2, "small", &huge, |_| Ok(())).await;
    assert!(calls.is_empty());
    let e = res.unwrap_err();
    assert_eq!(
        (e.status().as_u16(), e.code()),
        (400, "context_length_exceeded")
    );
}

#[tokio::test]
async fn content_policy_refusals_go_to_their_fallbacks_and_others_do_not() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o"]
content_policy_fallbacks = ["b/claude-sonnet-4-5"]
fallbacks = ["c/gemini-2.5-flash"]
"#,
    );
    let (_, calls) = run(&r, "m", &facts(), |l| {
        if l == "a/gpt-4o" {
            Err(UpstreamErrorKind::ContentPolicy)
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(calls, ["a/gpt-4o", "b/claude-sonnet-4-5"]);
    let (_, calls) = run(&r, "m", &facts(), |l| {
        if l == "a/gpt-4o" {
            Err(UpstreamErrorKind::Server)
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(
        calls,
        ["a/gpt-4o", "c/gemini-2.5-flash"],
        "generic fallbacks on outages"
    );
}

#[tokio::test]
async fn request_level_fallbacks_come_before_configured_ones() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o"]
fallbacks = ["c/gemini-2.5-flash"]
"#,
    );
    let f = RequestFacts {
        fallbacks: vec!["b/claude-sonnet-4-5".into()],
        ..facts()
    };
    let (_, calls) = run(&r, "m", &f, |l| {
        if l == "b/claude-sonnet-4-5" {
            Ok(())
        } else {
            Err(UpstreamErrorKind::Server)
        }
    })
    .await;
    assert_eq!(calls, ["a/gpt-4o", "b/claude-sonnet-4-5"]);
}

#[tokio::test]
async fn the_total_deadline_stops_retrying() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5"]
timeout = 0.05
"#,
    );
    let route = r.resolve("m").unwrap();
    let result = execute::unary(&r, &route, &facts(), |_| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, UpstreamError>(Answer("late".into()))
    })
    .await;
    let e = result.unwrap_err();
    assert_eq!(e.code(), "upstream_timeout");
    assert_eq!(e.status().as_u16(), 504);
}

#[tokio::test]
async fn a_stream_that_fails_or_stalls_before_its_first_chunk_fails_over() {
    let r = routes(
        r#"
[[models]]
name = "m"
targets = ["a/gpt-4o", "b/claude-sonnet-4-5", "c/gemini-2.5-flash"]
ttft_timeout = 0.05
"#,
    );
    let route = r.resolve("m").unwrap();
    let served = execute::stream(&r, &route, &facts(), |t| async move {
        let s: futures::stream::BoxStream<'static, Result<Answer, UpstreamError>> = match t
            .target
            .provider
            .as_str()
        {
            // Accepted, then broke before any chunk.
            "a" => futures::stream::iter(vec![Err(err(UpstreamErrorKind::StreamInterrupted, "a"))])
                .boxed(),
            // Accepted, then stalled.
            "b" => futures::stream::pending().boxed(),
            _ => futures::stream::iter(vec![Ok(Answer("one".into())), Ok(Answer("two".into()))])
                .boxed(),
        };
        Ok(s)
    })
    .await
    .unwrap();
    assert_eq!(served.by.target.label, "c/gemini-2.5-flash");
    assert_eq!(served.by.attempts, 3);
    let items: Vec<_> = served.value.map(|r| r.unwrap().0).collect().await;
    assert_eq!(items, ["one", "two"]);
}

#[tokio::test]
async fn direct_targets_share_state_and_unknown_names_are_not_found() {
    let r = routes("[[models]]\nname = \"m\"\ntargets = [\"a/gpt-4o\"]\n");
    let direct = r.resolve("a/gpt-4o").unwrap();
    let via_model = r.resolve("m").unwrap();
    assert!(Arc::ptr_eq(&direct.targets[0].0, &via_model.targets[0].0));
    assert!(direct.targets[0].0.info.is_some(), "catalog entry attached");
    assert!(matches!(
        r.resolve("z/x"),
        Err(ApiError::ModelNotFound { .. })
    ));
    assert!(matches!(
        r.resolve("gpt-9"),
        Err(ApiError::ModelNotFound { .. })
    ));
}
