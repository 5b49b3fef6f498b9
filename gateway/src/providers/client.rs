//! The upstream HTTP client: hyper-util's pooled client over rustls (Mozilla's roots
//! from `webpki-roots`, so nothing is read from the host), with the few request and
//! response helpers the adapters use.
//!
//! It replaces reqwest on the proxy path: the same hyper client underneath, without
//! reqwest's per-request layers (URL to URI conversion, redirect and decoder
//! wrappers, boxed bodies), which cost ~6 µs of CPU per proxied request on one core,
//! about a fifth of a minimal hyper proxy's whole cost (BENCHMARKS.md).
//!
//! Invariants:
//! - one [`Client`] per process (built by `providers::http::build_client`); clones
//!   share its connection pool; [`Client::new`] is the only place a hyper client is
//!   built (clippy's `disallowed-methods`);
//! - a request's deadlines are one timer: it fires at the first-byte deadline (or the
//!   total one, if sooner) until the response head arrives, then is moved to the total
//!   deadline, which every later body read of that response honours;
//! - errors say which of connect, timeout, request, body or decode failed, so callers
//!   can classify them ([`Error::is_timeout`], [`Error::is_connect`]).
//!
//! No redirects are followed and no proxy from the environment (`HTTPS_PROXY`) is
//! used: upstreams are called directly, as configured.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{Method, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};

type Inner = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The request could not be built (bad URL, header or body).
    Builder,
    Connect,
    Timeout,
    /// Sending the request or reading the response head.
    Request,
    /// Reading the response body.
    Body,
}

/// An upstream call that failed before a response (or while reading its body).
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    fn new(kind: Kind, message: impl Into<String>, source: Option<BoxError>) -> Error {
        Error {
            kind,
            message: message.into(),
            source,
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    pub fn is_connect(&self) -> bool {
        self.kind == Kind::Connect
    }

    /// Whether the request was refused before it was sent.
    pub fn is_builder(&self) -> bool {
        self.kind == Kind::Builder
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The pooled upstream client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Inner,
    user_agent: HeaderValue,
}

impl Client {
    /// A client that connects within `connect_timeout` and keeps up to
    /// `max_idle_per_host` idle connections per upstream for `idle_timeout`.
    #[allow(clippy::disallowed_methods)] // The one place it is built.
    pub fn new(
        connect_timeout: Duration,
        max_idle_per_host: usize,
        idle_timeout: Duration,
    ) -> Client {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle_timeout)
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .build(https);
        Client {
            inner,
            user_agent: HeaderValue::from_static(concat!("airlock/", env!("CARGO_PKG_VERSION"))),
        }
    }

    /// A request to `url` (anything `http::Uri` parses from).
    pub fn request<U>(&self, method: Method, url: U) -> RequestBuilder
    where
        Uri: TryFrom<U>,
        <Uri as TryFrom<U>>::Error: Into<http::Error>,
    {
        let mut rb = RequestBuilder {
            client: self.clone(),
            method,
            uri: Uri::default(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            timeout: None,
            first_byte_timeout: None,
            error: None,
        };
        match Uri::try_from(url) {
            Ok(uri) => rb.uri = uri,
            Err(e) => rb.fail(format!("invalid URL: {}", e.into())),
        }
        rb
    }

    pub fn post<U>(&self, url: U) -> RequestBuilder
    where
        Uri: TryFrom<U>,
        <Uri as TryFrom<U>>::Error: Into<http::Error>,
    {
        self.request(Method::POST, url)
    }
}

/// A request being built; the first building error is kept and returned by
/// [`RequestBuilder::send`].
#[derive(Debug)]
pub struct RequestBuilder {
    client: Client,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    timeout: Option<Duration>,
    first_byte_timeout: Option<Duration>,
    error: Option<Error>,
}

impl RequestBuilder {
    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(Error::new(Kind::Builder, message, None));
        }
    }

    /// Sets a header (replacing one of the same name).
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(k), Ok(v)) => {
                self.headers.insert(k, v);
            }
            (Err(e), _) => self.fail(format!("invalid header name: {}", e.into())),
            (_, Err(e)) => self.fail(format!("invalid header value: {}", e.into())),
        }
        self
    }

    /// Adds every header of `headers` (replacing those of the same names).
    pub fn headers(mut self, headers: HeaderMap) -> Self {
        for (k, v) in headers {
            if let Some(k) = k {
                self.headers.insert(k, v);
            }
        }
        self
    }

    /// `Authorization: Bearer <token>`, marked sensitive (never logged by hyper).
    pub fn bearer_auth(mut self, token: &str) -> Self {
        match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(mut v) => {
                v.set_sensitive(true);
                self.headers.insert(AUTHORIZATION, v);
            }
            Err(_) => self.fail("the API key is not a valid header value".to_string()),
        }
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// `value` as the JSON body, with `Content-Type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(v) => {
                self.body = Bytes::from(v);
                self.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Err(e) => self.fail(format!("cannot encode the request body: {e}")),
        }
        self
    }

    /// The total deadline: from sending until the last byte of the body is read.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The deadline for the response head (status and headers).
    pub fn first_byte_timeout(mut self, timeout: Duration) -> Self {
        self.first_byte_timeout = Some(timeout);
        self
    }

    /// Sends the request and waits for the response head.
    pub async fn send(self) -> Result<Response, Error> {
        let RequestBuilder {
            client,
            method,
            uri,
            mut headers,
            body,
            timeout,
            first_byte_timeout,
            error,
        } = self;
        if let Some(e) = error {
            return Err(e);
        }
        headers
            .entry(USER_AGENT)
            .or_insert_with(|| client.user_agent.clone());
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;

        let now = Instant::now();
        let total = timeout.map(|t| (now + t, t));
        let head = match (first_byte_timeout.map(|t| (now + t, t)), total) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 {
                (a, "no response within")
            } else {
                (b, "no answer within")
            }),
            (Some(a), None) => Some((a, "no response within")),
            (None, Some(b)) => Some((b, "no answer within")),
            (None, None) => None,
        };
        let call = client.inner.request(req);
        let (resp, mut timer) = match head {
            None => (call.await, None),
            Some(((at, limit), what)) => {
                let mut sleep = Box::pin(tokio::time::sleep_until(at));
                tokio::select! {
                    r = call => (r, Some(sleep)),
                    () = sleep.as_mut() => {
                        return Err(Error::new(Kind::Timeout, format!("{what} {limit:?}"), None));
                    }
                }
            }
        };
        let resp = resp.map_err(|e| {
            let kind = if e.is_connect() {
                Kind::Connect
            } else {
                Kind::Request
            };
            let message = match kind {
                Kind::Connect => "cannot connect to the upstream",
                _ => "the upstream call failed",
            };
            Error::new(kind, message, Some(Box::new(e)))
        })?;
        // From here on, the timer stands for the total deadline alone.
        match (&mut timer, total) {
            (Some(sleep), Some((at, _))) => sleep.as_mut().reset(at),
            _ => timer = None,
        }
        let (parts, body) = resp.into_parts();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
            timer,
            limit: timeout,
        })
    }
}

/// A response whose head has arrived; the body is read with the request's total
/// deadline.
#[derive(Debug)]
pub struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    timer: Option<Pin<Box<Sleep>>>,
    limit: Option<Duration>,
}

impl Response {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Error>> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(None) => return Poll::Ready(Ok(None)),
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(Error::new(
                        Kind::Body,
                        "reading the upstream's body failed",
                        Some(Box::new(e)),
                    )))
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Poll::Ready(Ok(Some(data))),
                    // Empty data or trailers: read on.
                    _ => continue,
                },
                Poll::Pending => {}
            }
            if let Some(timer) = &mut self.timer {
                if timer.as_mut().poll(cx).is_ready() {
                    let limit = self.limit.unwrap_or_default();
                    return Poll::Ready(Err(Error::new(
                        Kind::Timeout,
                        format!("no answer within {limit:?}"),
                        None,
                    )));
                }
            }
            return Poll::Pending;
        }
    }

    /// The next piece of the body, `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// The whole body.
    pub async fn bytes(mut self) -> Result<Bytes, Error> {
        let Some(first) = self.chunk().await? else {
            return Ok(Bytes::new());
        };
        let Some(second) = self.chunk().await? else {
            return Ok(first);
        };
        let mut buf = BytesMut::with_capacity(first.len() + second.len());
        buf.extend_from_slice(&first);
        buf.extend_from_slice(&second);
        while let Some(more) = self.chunk().await? {
            buf.extend_from_slice(&more);
        }
        Ok(buf.freeze())
    }

    /// The whole body as text (invalid UTF-8 replaced).
    pub async fn text(self) -> Result<String, Error> {
        let bytes = self.bytes().await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The body as a stream of pieces; it ends after the first error.
    pub fn bytes_stream(self) -> BodyStream {
        BodyStream {
            response: Some(self),
        }
    }
}

/// [`Response::bytes_stream`].
#[derive(Debug)]
pub struct BodyStream {
    response: Option<Response>,
}

impl Stream for BodyStream {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(resp) = self.response.as_mut() else {
            return Poll::Ready(None);
        };
        match resp.poll_chunk(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(b))) => Poll::Ready(Some(Ok(b))),
            Poll::Ready(Ok(None)) => {
                self.response = None;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.response = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn client() -> Client {
        Client::new(Duration::from_secs(2), 4, Duration::from_secs(90))
    }

    /// A one-connection HTTP/1.1 server: reads the request head (and its body, by
    /// `Content-Length`), sends it back through the channel, then writes `parts`
    /// with `pause` before each one after the first, and keeps the socket open.
    async fn server(
        parts: Vec<&'static str>,
        pause: Duration,
    ) -> (String, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/x", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = sock.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&buf).to_string());
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(pause).await;
                }
                if sock.write_all(part.as_bytes()).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        (url, rx)
    }

    const HEAD: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n";

    #[tokio::test]
    async fn sends_headers_and_body_and_reads_the_answer() {
        let (url, seen) = server(vec![HEAD, "{\"ok\":true}"], Duration::ZERO).await;
        let resp = client()
            .post(url.as_str())
            .bearer_auth("sk-secret")
            .header("x-extra", "1")
            .json(&serde_json::json!({"model": "m"}))
            .timeout(Duration::from_secs(5))
            .first_byte_timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(&resp.bytes().await.unwrap()[..], b"{\"ok\":true}");
        let req = seen.await.unwrap().to_ascii_lowercase();
        assert!(req.starts_with("post /v1/x http/1.1\r\n"), "{req}");
        for line in [
            "authorization: bearer sk-secret",
            "x-extra: 1",
            "content-type: application/json",
            concat!("user-agent: airlock/", env!("CARGO_PKG_VERSION")),
        ] {
            assert!(req.contains(line), "{line:?} missing in {req}");
        }
        assert!(req.ends_with("{\"model\":\"m\"}"), "{req}");
    }

    #[tokio::test]
    async fn a_late_head_is_a_first_byte_timeout() {
        let (url, _seen) = server(vec!["", HEAD, "{\"ok\":true}"], Duration::from_secs(5)).await;
        let t0 = std::time::Instant::now();
        let err = client()
            .post(url.as_str())
            .timeout(Duration::from_secs(20))
            .first_byte_timeout(Duration::from_millis(200))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert_eq!(err.to_string(), "no response within 200ms");
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn the_total_deadline_covers_the_body() {
        // The head comes at once; the body never finishes.
        let (url, _seen) = server(
            vec![
                "HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\"",
                ":true}",
            ],
            Duration::from_secs(10),
        )
        .await;
        let resp = client()
            .post(url.as_str())
            .timeout(Duration::from_millis(300))
            .first_byte_timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        let mut stream = resp.bytes_stream();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(&first[..], b"{\"ok\"");
        let err = stream.next().await.unwrap().unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert_eq!(err.to_string(), "no answer within 300ms");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // The stream ends after its error.
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = client()
            .post(format!("http://127.0.0.1:{port}/v1/x"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert!(!err.is_timeout());
        assert!(std::error::Error::source(&err).is_some());
    }

    #[tokio::test]
    async fn bad_urls_and_headers_fail_before_sending() {
        let err = client().post("http://exa mple/").send().await.unwrap_err();
        assert!(err.is_builder(), "{err:?}");
        assert!(err.to_string().starts_with("invalid URL"), "{err}");
        let err = client()
            .post("http://127.0.0.1:9/")
            .header("x-bad", "line\nbreak")
            .send()
            .await
            .unwrap_err();
        assert!(err.is_builder(), "{err:?}");
        assert!(err.to_string().starts_with("invalid header value"), "{err}");
    }

    #[tokio::test]
    async fn a_given_user_agent_is_kept() {
        let (url, seen) = server(vec![HEAD, "{\"ok\":true}"], Duration::ZERO).await;
        let resp = client()
            .post(url.as_str())
            .header("user-agent", "mine/1")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), "{\"ok\":true}");
        let req = seen.await.unwrap().to_ascii_lowercase();
        assert!(req.contains("user-agent: mine/1\r\n"), "{req}");
        assert!(!req.contains("airlock/"), "{req}");
    }
}
