//! Failover between targets, upstream streams that break mid-way, and graceful shutdown
//! on SIGTERM.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use airlock_e2e::gateway::{wait_until, HttpReply};
use airlock_e2e::mock::{closed_port_url, Fault, MockUpstream, ProviderKind};
use airlock_e2e::sse::{SseReader, SseTranscript};
use airlock_e2e::stack::{chat, chat_stream};
use airlock_e2e::{ConfigBuilder, Gateway};
use serde_json::Value;

const CHAT: &str = "/v1/chat/completions";

/// A gateway whose model `m` tries `first` then `second` (both openai mocks).
async fn two_openai_targets() -> (MockUpstream, MockUpstream, Gateway) {
    let first = MockUpstream::openai().await;
    let second = MockUpstream::openai().await;
    let gw = ConfigBuilder::new()
        .upstream("first_byte_timeout", "1")
        .provider("first", &first)
        .provider("second", &second)
        .model("m", &["first/gpt-4o-mini", "second/gpt-4o"])
        .start()
        .await;
    (first, second, gw)
}

#[tokio::test]
async fn failover_on_503() {
    let (first, second, gw) = two_openai_targets().await;
    first.fail_always(Fault::Status(503));
    let reply = gw.post_json(CHAT, &chat("m", "fail over")).await;
    let resp = reply.expect_status(200);
    assert_eq!(reply.header("x-airlock-target"), Some("second/gpt-4o"));
    assert_eq!(
        resp["choices"][0]["message"]["content"],
        "You said: fail over"
    );
    assert!(first.request_count() >= 1, "the first target was not tried");
    assert_eq!(second.request_count(), 1);
    assert_eq!(second.last_request().body_json()["model"], "gpt-4o");
}

#[tokio::test]
async fn failover_on_429_and_500_and_dropped_connection() {
    let (first, second, gw) = two_openai_targets().await;
    for fault in [
        Fault::Status(429),
        Fault::Status(500),
        Fault::DropConnection,
    ] {
        first.fail_always(fault.clone());
        let reply = gw.post_json(CHAT, &chat("m", "again")).await;
        assert_eq!(reply.status, 200, "{fault:?}: {}", reply.text);
        assert_eq!(
            reply.header("x-airlock-target"),
            Some("second/gpt-4o"),
            "{fault:?}"
        );
    }
    assert_eq!(second.request_count(), 3);
}

#[tokio::test]
async fn failover_on_closed_port() {
    let dead = closed_port_url("/v1").await;
    let second = MockUpstream::openai().await;
    let gw = ConfigBuilder::new()
        .provider_at("dead", ProviderKind::OpenAi, &dead, Some("k"))
        .provider("second", &second)
        .model("m", &["dead/gpt-4o-mini", "second/gpt-4o-mini"])
        .start()
        .await;
    let reply = gw.post_json(CHAT, &chat("m", "anyone there?")).await;
    reply.expect_status(200);
    assert_eq!(reply.header("x-airlock-target"), Some("second/gpt-4o-mini"));
    // Streams fail over too, before any byte reached the client.
    let resp = gw
        .post_stream(CHAT, &chat_stream("m", "streamed", false))
        .await;
    assert_eq!(
        resp.headers()
            .get("x-airlock-target")
            .and_then(|v| v.to_str().ok()),
        Some("second/gpt-4o-mini")
    );
    let t = SseTranscript::read(resp).await;
    assert!(t.done_is_last(), "{t}");
    assert_eq!(t.text(), "You said: streamed");
}

#[tokio::test]
async fn failover_on_first_byte_timeout() {
    let (first, second, gw) = two_openai_targets().await;
    first.fail_always(Fault::DelayFirstByte(Duration::from_secs(5)));
    let start = Instant::now();
    let reply = gw.post_json(CHAT, &chat("m", "too slow")).await;
    reply.expect_status(200);
    assert_eq!(reply.header("x-airlock-target"), Some("second/gpt-4o"));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "waited for the slow target: {:?}",
        start.elapsed()
    );
    assert_eq!(second.request_count(), 1);
}

#[tokio::test]
async fn failover_across_provider_kinds_streaming() {
    let ant = MockUpstream::anthropic().await;
    let gem = MockUpstream::gemini().await;
    let gw = ConfigBuilder::new()
        .provider("ant", &ant)
        .provider("gem", &gem)
        .model(
            "m",
            &["ant/claude-3-5-haiku-latest", "gem/gemini-2.0-flash"],
        )
        .start()
        .await;
    ant.fail_always(Fault::Status(529));
    let resp = gw
        .post_stream(CHAT, &chat_stream("m", "cross over", true))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("x-airlock-target")
            .and_then(|v| v.to_str().ok()),
        Some("gem/gemini-2.0-flash")
    );
    let t = SseTranscript::read(resp).await;
    assert!(t.done_is_last(), "{t}");
    assert_eq!(t.text(), "You said: cross over", "{t}");
    assert_eq!(t.usage_chunks().len(), 1, "{t}");
    assert!(ant.request_count() >= 1);
}

#[tokio::test]
async fn no_failover_on_upstream_400() {
    let (first, second, gw) = two_openai_targets().await;
    first.fail_always(Fault::Status(400));
    gw.post_json(CHAT, &chat("m", "bad for them"))
        .await
        .expect_error(400, "upstream_rejected_request");
    assert_eq!(
        second.request_count(),
        0,
        "a 400 is the request's fault; no other target may be tried"
    );
}

#[tokio::test]
async fn all_targets_down_reports_the_failure() {
    let (first, second, gw) = two_openai_targets().await;
    first.fail_always(Fault::Status(503));
    second.fail_always(Fault::Status(502));
    let reply = gw.post_json(CHAT, &chat("m", "nobody")).await;
    reply.expect_error(502, "upstream_error");
    assert!(first.request_count() >= 1 && second.request_count() >= 1);
}

/// A stream that breaks after some events: error event, no [DONE], no failover.
async fn stream_cut(kind: ProviderKind, cut_after: usize) {
    let mock = MockUpstream::start(kind, "key-for-the-cut-test").await;
    let spare = MockUpstream::openai().await;
    let upstream_model = match kind {
        ProviderKind::OpenAi => "gpt-4o-mini",
        ProviderKind::Anthropic => "claude-3-5-haiku-latest",
        ProviderKind::Gemini => "gemini-2.0-flash",
    };
    let gw = ConfigBuilder::new()
        .provider("p", &mock)
        .provider("spare", &spare)
        .model("m", &[&format!("p/{upstream_model}"), "spare/gpt-4o-mini"])
        .start()
        .await;
    mock.fail_always(Fault::CutAfter(cut_after));
    let resp = gw
        .post_stream(
            CHAT,
            &chat_stream("m", "this stream will break off in the middle", true),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let t = SseTranscript::read(resp).await;
    assert!(!t.timed_out, "{t}");
    let errors = t.errors();
    assert_eq!(errors.len(), 1, "exactly one error event: {t}");
    assert_eq!(
        errors[0]["error"]["code"], "upstream_stream_interrupted",
        "{t}"
    );
    assert!(
        errors[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{t}"
    );
    assert!(!t.has_done(), "no [DONE] after a broken stream: {t}");
    let last = t
        .events
        .last()
        .and_then(|e| e.json())
        .unwrap_or(Value::Null);
    assert!(
        last.get("error").is_some(),
        "the error event is the last event: {t}"
    );
    // What came before the break is well-formed and a prefix of the full answer.
    let text = t.text();
    assert!(
        !text.is_empty(),
        "some text came through before the break: {t}"
    );
    assert!(
        "You said: this stream will break off in the middle".starts_with(&text),
        "partial text {text:?} is not a prefix of the answer"
    );
    assert_eq!(
        spare.request_count(),
        0,
        "bytes went to the client; failover is too late"
    );
    assert!(gw.get("/health").await.status == 200);
}

#[tokio::test]
async fn stream_cut_openai() {
    stream_cut(ProviderKind::OpenAi, 3).await;
}

#[tokio::test]
async fn stream_cut_anthropic() {
    stream_cut(ProviderKind::Anthropic, 5).await;
}

#[tokio::test]
async fn stream_cut_gemini() {
    stream_cut(ProviderKind::Gemini, 2).await;
}

#[tokio::test]
async fn anthropic_error_event_mid_stream() {
    let ant = MockUpstream::anthropic().await;
    let gw = ConfigBuilder::new()
        .provider("ant", &ant)
        .model("m", &["ant/claude-3-5-haiku-latest"])
        .start()
        .await;
    ant.fail_always(Fault::StreamErrorEventAfter(5));
    let resp = gw
        .post_stream(CHAT, &chat_stream("m", "overload me please now", false))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let t = SseTranscript::read(resp).await;
    let errors = t.errors();
    assert_eq!(
        errors.len(),
        1,
        "the upstream's error event becomes one error event: {t}"
    );
    assert!(
        errors[0]["error"]["code"]
            .as_str()
            .is_some_and(|c| c.starts_with("upstream_")),
        "{t}"
    );
    assert!(!t.has_done(), "no [DONE] after an upstream error: {t}");
}

#[tokio::test]
async fn graceful_shutdown_finishes_streams_then_exits_0() {
    let oai = MockUpstream::openai().await;
    let mut gw = ConfigBuilder::new()
        .server("shutdown_grace", "20")
        .provider("oai", &oai)
        .model("m", &["oai/gpt-4o-mini"])
        .start()
        .await;
    let addr = gw.addr();
    // 14 words -> about 17 events, 250 ms apart: about 4 s of stream.
    let words = "one two three four five six seven eight nine ten eleven twelve";
    oai.fail_next(Fault::SlowStream(Duration::from_millis(250)));
    oai.fail_next(Fault::DelayFirstByte(Duration::from_millis(1500)));
    let resp = gw.post_stream(CHAT, &chat_stream("m", words, false)).await;
    assert_eq!(resp.status().as_u16(), 200);
    let mut reader = SseReader::new(resp);
    let first = reader
        .next_event_within(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(first.is_some(), "the stream started");

    // A non-streamed request that is in flight when the signal comes.
    let client = gw.client().clone();
    let url = gw.url(CHAT);
    let slow = tokio::spawn(async move {
        let resp = client
            .post(url)
            .json(&chat("m", "slow but sure"))
            .send()
            .await;
        match resp {
            Ok(r) => HttpReply::read(r).await,
            Err(e) => panic!("in-flight request failed: {e}"),
        }
    });
    // Wait until the mock has that request, so it is truly in flight.
    assert!(
        wait_until(Duration::from_secs(5), || oai.request_count() == 2).await,
        "second request never arrived"
    );

    let rest = tokio::spawn(async move {
        let mut events = vec![first.unwrap()];
        while let Some(ev) = reader.next_event().await {
            events.push(ev);
        }
        (events, reader.transport_error)
    });

    gw.sigterm().await;
    // New connections are refused while the stream is still going.
    let refused_at = Instant::now();
    let mut refused = false;
    while refused_at.elapsed() < Duration::from_secs(3) {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "the gateway still accepted connections 3 s after SIGTERM"
    );
    assert!(
        !rest.is_finished(),
        "the stream ended before the listener closed; the test proves nothing"
    );

    let (events, transport_error) = tokio::time::timeout(Duration::from_secs(15), rest)
        .await
        .expect("stream finished within the grace period")
        .unwrap();
    let t = SseTranscript {
        events,
        transport_error,
        timed_out: false,
    };
    assert!(
        t.transport_error.is_none(),
        "the stream was cut by shutdown: {t}"
    );
    assert!(t.done_is_last(), "the stream ends with [DONE]: {t}");
    assert_eq!(t.text(), format!("You said: {words}"), "{t}");

    let slow_reply = tokio::time::timeout(Duration::from_secs(15), slow)
        .await
        .expect("in-flight request")
        .unwrap();
    assert_eq!(slow_reply.status, 200, "{}", slow_reply.text);

    let status = gw
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exited after the streams");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        gw.stderr()
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn idle_gateway_exits_0_on_sigterm() {
    let oai = MockUpstream::openai().await;
    let mut gw = ConfigBuilder::new()
        .provider("oai", &oai)
        .model("m", &["oai/gpt-4o-mini"])
        .start()
        .await;
    gw.post_json(CHAT, &chat("m", "hello"))
        .await
        .expect_status(200);
    let start = Instant::now();
    let status = gw.stop().await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", gw.stderr());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "idle shutdown took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn slow_request_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let oai = MockUpstream::openai().await;
    let gw = ConfigBuilder::new()
        .server("header_read_timeout", "1")
        .provider("oai", &oai)
        .model("m", &["oai/gpt-4o-mini"])
        .start()
        .await;
    let mut sock = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    // Half a request head, then silence.
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), sock.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the connection was still open 6 s after a partial request head"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "closed after {took:?}, before header_read_timeout = 1 s"
    );
    let head = String::from_utf8_lossy(&buf);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 408"),
        "answer to a slow head: {head:?}"
    );
    // The server is fine afterwards.
    assert_eq!(gw.get("/health").await.status, 200);
}
