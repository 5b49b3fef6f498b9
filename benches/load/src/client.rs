//! The load generator's HTTP/1.1 client: a keep-alive connection pool over hyper's
//! low-level `client::conn::http1`, capped by a semaphore (a request waits for a
//! connection when all are busy, and that wait counts in its latency).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;

/// One kind of request to one target, prebuilt.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub path: String,
    pub host: HeaderValue,
    pub auth: Option<HeaderValue>,
    pub body: Bytes,
    pub stream: bool,
}

impl RequestSpec {
    pub fn new(
        addr: SocketAddr,
        path: &str,
        key: Option<&str>,
        model: &str,
        stream: bool,
    ) -> anyhow::Result<Self> {
        let mut body = serde_json::json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant. Answer in plain prose."},
                {"role": "user", "content": "Summarize the plot of Hamlet in two sentences, naming the main characters."}
            ],
            "max_tokens": 256,
            "temperature": 0.2,
            "user": "bench-user-1"
        });
        if stream {
            if let Some(o) = body.as_object_mut() {
                o.insert("stream".into(), true.into());
                o.insert(
                    "stream_options".into(),
                    serde_json::json!({"include_usage": true}),
                );
            }
        }
        Ok(RequestSpec {
            path: path.to_string(),
            host: HeaderValue::from_str(&addr.to_string())?,
            auth: match key {
                Some(k) => Some(HeaderValue::from_str(&format!("Bearer {k}"))?),
                None => None,
            },
            body: Bytes::from(serde_json::to_vec(&body)?),
            stream,
        })
    }

    fn build(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&self.path)
            .body(Full::new(self.body.clone()))?;
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(a) = &self.auth {
            h.insert(AUTHORIZATION, a.clone());
        }
        Ok(req)
    }
}

/// Keep-alive pool to one address.
pub struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    permits: Arc<Semaphore>,
}

/// How one request ended.
#[derive(Debug)]
pub enum Outcome {
    /// Time of the first body byte.
    Ok {
        first_byte: Instant,
    },
    Failed(String),
}

impl Pool {
    pub fn new(addr: SocketAddr, max_connections: usize) -> Self {
        Pool {
            addr,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(max_connections)),
        }
    }

    fn pop_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(c) = idle.pop() {
            if !c.is_closed() {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, c: SendRequest<Full<Bytes>>) {
        if !c.is_closed() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Opens up to `n` connections ahead of a run so connection setup stays out of it.
    pub async fn prewarm(&self, n: usize) {
        let have = self.idle.lock().unwrap_or_else(|e| e.into_inner()).len();
        for _ in have..n {
            match self.connect().await {
                Ok(c) => self.put_idle(c),
                Err(_) => break,
            }
        }
    }

    /// Sends one request and reads the whole answer. For a stream, the answer must end
    /// with `data: [DONE]`.
    pub async fn send(&self, spec: &RequestSpec) -> Outcome {
        match self.send_inner(spec).await {
            Ok(o) => o,
            Err(e) => Outcome::Failed(classify(&e)),
        }
    }

    async fn send_inner(&self, spec: &RequestSpec) -> anyhow::Result<Outcome> {
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| anyhow!("pool closed"))?;
        let mut conn = match self.pop_idle() {
            Some(c) => c,
            None => self.connect().await?,
        };
        // A pooled connection the server closed in the meantime: one fresh try.
        if conn.ready().await.is_err() {
            conn = self.connect().await?;
            conn.ready().await?;
        }
        let resp = conn.send_request(spec.build()?).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut first_byte = None;
        let mut tail: Vec<u8> = Vec::with_capacity(32);
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Some(data) = frame.data_ref() {
                if first_byte.is_none() && !data.is_empty() {
                    first_byte = Some(Instant::now());
                }
                if spec.stream {
                    tail.extend_from_slice(data);
                    let keep = 16.min(tail.len());
                    tail.drain(..tail.len() - keep);
                }
            }
        }
        self.put_idle(conn);
        if !status.is_success() {
            return Ok(Outcome::Failed(format!("http {}", status.as_u16())));
        }
        if spec.stream && !tail.ends_with(b"data: [DONE]\n\n") {
            return Ok(Outcome::Failed("stream without [DONE]".into()));
        }
        Ok(Outcome::Ok {
            first_byte: first_byte.unwrap_or_else(Instant::now),
        })
    }
}

fn classify(e: &anyhow::Error) -> String {
    let s = e.to_string();
    if s.starts_with("connect") {
        "connect error".into()
    } else if let Some(h) = e.downcast_ref::<hyper::Error>() {
        if h.is_incomplete_message() {
            "connection closed early".into()
        } else {
            format!("http error: {h}")
        }
    } else {
        s
    }
}

/// Waits until `addr` accepts TCP connections, for up to `timeout`.
pub async fn wait_http(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{addr} did not accept connections within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request on a fresh connection: (status, body as text).
pub async fn one_shot(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .context("url must start with http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = hostport.parse().context("url must be http://IP:PORT/...")?;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method.to_ascii_uppercase().as_str())
        .uri(path)
        .header(HOST, hostport)
        .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))?;
    if body.is_some() {
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(k) = key {
        req.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {k}"))?,
        );
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    let bytes = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await??
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
