//! The accept loop over real sockets, in-process: header-read timeout, connection cap,
//! and graceful shutdown that lets an in-flight request finish.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate: failing loudly is the point

use std::time::{Duration, Instant};

use airlock::config::{Config, SecretPolicy};
use airlock::state::AppState;
use airlock::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const KEY: &str = "sk-test-0123456789abcdef";

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(server_toml: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(server_toml, &[("X", "y")], SecretPolicy::Require).unwrap();
    let state = AppState::build(cfg, Store::open(dir.path()).unwrap(), Some(KEY)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(airlock::server::serve(state, listener, async {
        let _ = rx.await;
    }));
    Running {
        addr,
        stop: Some(tx),
        done,
        _dir: dir,
    }
}

/// Reads until EOF or `limit`; returns what was read and whether EOF came.
async fn read_until_eof(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut buf = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&buf).into(), true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (String::from_utf8_lossy(&buf).into(), false),
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let srv = start("[server]\nheader_read_timeout = 0.3\n").await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, eof) = read_until_eof(&mut s, Duration::from_secs(5)).await;
    assert!(eof, "the slow client was not disconnected");

    // A normal client on the same server is served.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (text, _) = read_until_eof(&mut s, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let srv = start("[server]\nmax_connections = 1\n").await;
    let mut first = TcpStream::connect(srv.addr).await.unwrap();
    first
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // The kernel accepts the second connection into the backlog, but the gateway does
    // not serve it while the first (kept alive) holds the only slot.
    let mut second = TcpStream::connect(srv.addr).await.unwrap();
    second
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "the second connection was served past the cap"
    );

    drop(first);
    let (text, _) = read_until_eof(&mut second, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

async fn in_flight_metric(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    read_until_eof(&mut s, Duration::from_secs(5)).await.0
}

#[tokio::test]
async fn shutdown_stops_accepting_and_finishes_in_flight_requests() {
    let mut srv = start("[server]\nshutdown_grace = 5\n").await;
    // A request whose body is still arriving when shutdown starts.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let body = r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..10]).await.unwrap();
    // Wait until the server is inside that request (the metrics request itself is the
    // other one in flight), then stop it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !in_flight_metric(srv.addr)
        .await
        .contains("airlock_requests_in_flight 2")
    {
        assert!(
            Instant::now() < deadline,
            "the request never reached the handler"
        );
        tokio::task::yield_now().await;
    }
    srv.stop.take().unwrap().send(()).unwrap();
    // New connections are refused once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(srv.addr).await {
            Err(_) => break,
            Ok(_) if Instant::now() > deadline => panic!("still accepting after shutdown"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // The in-flight request still completes.
    s.write_all(&body.as_bytes()[10..]).await.unwrap();
    let (text, _) = read_until_eof(&mut s, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(text.contains("model_not_found"), "{text}");
    srv.done.await.unwrap().unwrap();
}
