//! The `airlock` process under test: start, talk to, stop.
//!
//! [`Gateway::start`] writes the config into a fresh temp dir (the literal `@DATA_DIR@`
//! in the text becomes a `data` folder inside it), spawns `airlock serve --config FILE`,
//! and reads the one line the binary promises on stdout, `airlock listening on
//! http://ADDR`, to learn the bound address. Stderr is collected into a buffer for
//! assertions and is printed when a test panics while the gateway is alive, so a failure
//! shows the gateway's own account of it. Drop kills the process; [`Gateway::stop`]
//! sends SIGTERM and returns the exit status.
//!
//! The binary is `AIRLOCK_BIN` if set, else `target/<profile>/airlock` next to the test
//! executable (tests run from `target/<profile>/deps/`). It is not built from here: run
//! `cargo build -p airlock` first, as `scripts/test.sh` does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::ConfigBuilder;

/// The master key the harness gives the gateway unless a test sets its own.
pub const DEFAULT_MASTER_KEY: &str = "airlock-test-master-key-0123456789";
/// The environment variable the default config names in `master_key_env`.
pub const MASTER_KEY_ENV: &str = "AIRLOCK_MASTER_KEY";
/// The placeholder replaced by the gateway's data directory.
pub const DATA_DIR_PLACEHOLDER: &str = "@DATA_DIR@";

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const LISTEN_PREFIX: &str = "airlock listening on http://";

/// The path of the `airlock` binary under test.
pub fn airlock_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "AIRLOCK_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-exe> -> target/<profile>/airlock
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("airlock{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the airlock binary is missing at {}: run `cargo build -p airlock` first \
         (scripts/test.sh does), or set AIRLOCK_BIN",
        bin.display()
    );
    bin
}

/// The workspace root (the parent of this crate's manifest dir).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// An HTTP client for talking to the gateway; `auth` is sent as a bearer key on every
/// request when given.
#[allow(clippy::disallowed_methods)] // The one-shared-client rule is the gateway's, not ours.
pub fn http_client(auth: Option<&str>) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    if let Some(key) = auth {
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).expect("key is a header value"),
        );
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .expect("build reqwest client")
}

/// A running `airlock serve`.
pub struct Gateway {
    child: Child,
    addr: SocketAddr,
    key: String,
    stderr: Arc<Mutex<String>>,
    stdout_rest: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
    client: reqwest::Client,
    exited: Option<ExitStatus>,
}

impl Gateway {
    /// A config builder with the harness's `[server]` defaults; finish with
    /// [`ConfigBuilder::start`].
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::new()
    }

    /// Starts `airlock serve --config FILE` with `config_toml` and extra environment.
    /// Panics (with the gateway's stderr) if it does not announce its address.
    pub async fn start(config_toml: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_with_args(config_toml, env, &[]).await
    }

    /// As [`Gateway::start`], with extra command-line arguments after `--config FILE`.
    pub async fn start_with_args(
        config_toml: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let text = config_toml.replace(DATA_DIR_PLACEHOLDER, &data_dir.to_string_lossy());
        let config_path = dir.path().join("airlock.toml");
        std::fs::write(&config_path, text).expect("write config");
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace(DATA_DIR_PLACEHOLDER, &data_dir.to_string_lossy()))
            .collect();

        let key = env
            .iter()
            .find(|(k, _)| *k == MASTER_KEY_ENV)
            .map(|(_, v)| (*v).to_string())
            .unwrap_or_else(|| DEFAULT_MASTER_KEY.to_string());

        let mut cmd = Command::new(airlock_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(&args)
            .current_dir(dir.path())
            // Hermetic: the CLI also reads these, and the caller's shell may set them.
            .env_remove("AIRLOCK_CONFIG")
            .env_remove("AIRLOCK_LISTEN")
            .env_remove("AIRLOCK_DATA_DIR")
            .env_remove(MASTER_KEY_ENV)
            .env(MASTER_KEY_ENV, &key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn airlock");

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            loop {
                match err_pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });

        let mut out = BufReader::new(child.stdout.take().expect("stdout piped"));
        let mut line = String::new();
        let read = tokio::time::timeout(STARTUP_TIMEOUT, out.read_line(&mut line)).await;
        let announced = match read {
            Ok(Ok(n)) if n > 0 => line.trim_end().to_string(),
            other => {
                let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await
                {
                    Ok(s) => format!("{s:?}"),
                    Err(_) => "still running".to_string(),
                };
                // Give the stderr reader a moment to drain what the process wrote.
                wait_until(Duration::from_secs(2), || {
                    !stderr.lock().unwrap().is_empty()
                })
                .await;
                panic!(
                    "airlock did not announce its address on stdout ({other:?}); process: {status}\n\
                     --- config ---\n{config_toml}\n--- stderr ---\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let addr: SocketAddr = announced
            .strip_prefix(LISTEN_PREFIX)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "first stdout line must be `{LISTEN_PREFIX}IP:PORT`, got {announced:?}\n--- stderr ---\n{}",
                    stderr.lock().unwrap()
                )
            });
        // Keep draining stdout so the process never blocks on a full pipe; the contract
        // says nothing more comes there, which [`Gateway::stdout_rest`] lets a test check.
        let stdout_rest = Arc::new(Mutex::new(String::new()));
        let sink = stdout_rest.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match out.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });

        Gateway {
            child,
            addr,
            client: http_client(Some(&key)),
            key,
            stderr,
            stdout_rest,
            dir,
            exited: None,
        }
    }

    /// The bound address, as announced.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The master key clients must send: the value given to `AIRLOCK_MASTER_KEY` (the
    /// harness default unless `env` set it). A config naming another `master_key_env`
    /// must pass that variable in `env` and use its value instead.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A client that sends the master key on every request.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// A client that sends no key.
    pub fn anon_client(&self) -> reqwest::Client {
        http_client(None)
    }

    /// The temp dir holding the config file and the data dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child
            .id()
            .expect("gateway process has an id while running")
    }

    /// Everything the gateway wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// POSTs JSON with the master key and reads the whole reply.
    pub async fn post_json(&self, path: &str, body: &Value) -> HttpReply {
        let resp = self.client.post(self.url(path)).json(body).send().await;
        HttpReply::read(resp.unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.stderr())))
            .await
    }

    /// GETs with the master key and reads the whole reply.
    pub async fn get(&self, path: &str) -> HttpReply {
        let resp = self.client.get(self.url(path)).send().await;
        HttpReply::read(resp.unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.stderr()))).await
    }

    /// POSTs a streaming request (with the master key) and returns the raw response.
    pub async fn post_stream(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.stderr()))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Sends SIGTERM without waiting.
    pub async fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status);
                Some(status)
            }
            _ => None,
        }
    }

    /// SIGTERM, then wait (up to 30 s) for the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        self.sigterm().await;
        match self.wait_exit(Duration::from_secs(30)).await {
            Some(status) => status,
            None => panic!(
                "airlock did not exit within 30 s of SIGTERM\n{}",
                self.stderr()
            ),
        }
    }

    /// What the gateway wrote to stdout after the address line (should stay empty).
    pub fn stdout_rest(&self) -> String {
        self.stdout_rest.lock().unwrap().clone()
    }

    /// Polls stderr until it contains `needle` or `timeout` passes.
    pub async fn wait_stderr_contains(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr.lock().unwrap().contains(needle)).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- airlock stderr (gateway at {}) ---\n{}\n--- end of airlock stderr ---",
                self.addr,
                self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
        let _ = self.child.start_kill();
    }
}

/// A fully read HTTP response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl HttpReply {
    /// Reads the whole body.
    pub async fn read(resp: reqwest::Response) -> HttpReply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("read response body");
        HttpReply {
            status,
            headers,
            text,
        }
    }

    /// The body as JSON; panics with the text if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}), status {}: {:?}",
                self.status, self.text
            )
        })
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `error.code` of an error body.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.text)
            .ok()?
            .pointer("/error/code")?
            .as_str()
            .map(str::to_string)
    }

    /// Asserts the status and returns the JSON body, with a readable message on mismatch.
    pub fn expect_status(&self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "expected HTTP {status}, got {} with body {}",
            self.status, self.text
        );
        self.json()
    }

    /// Asserts an OpenAI-shaped error with this status and code; returns `error`.
    pub fn expect_error(&self, status: u16, code: &str) -> Value {
        let body = self.expect_status(status);
        let err = body
            .get("error")
            .unwrap_or_else(|| panic!("no `error` object in {}", self.text))
            .clone();
        assert_eq!(err["code"], code, "error code; body {}", self.text);
        assert_error_shape(&body);
        err
    }
}

/// Asserts `{"error":{"message": non-empty string, "type": string, "code", "param"}}`.
pub fn assert_error_shape(body: &Value) {
    if let Some(problem) = error_shape_problem(body) {
        panic!("{problem}");
    }
}

/// What is wrong with an error body's shape, if anything.
pub fn error_shape_problem(body: &Value) -> Option<String> {
    let Some(err) = body.get("error").and_then(Value::as_object) else {
        return Some(format!("error body must be {{\"error\":{{..}}}}: {body}"));
    };
    if err
        .get("message")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Some(format!("error.message must be a non-empty string: {body}"));
    }
    if err.get("type").and_then(Value::as_str).is_none() {
        return Some(format!("error.type must be a string: {body}"));
    }
    if !err.contains_key("code") {
        return Some(format!("error.code must be present: {body}"));
    }
    if !err.contains_key("param") {
        return Some(format!(
            "error.param must be present (null allowed): {body}"
        ));
    }
    None
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `airlock ARGS...` to completion (for `config check` and bad-config starts),
/// with a timeout of 30 s.
pub async fn run_airlock(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(airlock_bin());
    cmd.args(args)
        .env_remove("AIRLOCK_CONFIG")
        .env_remove("AIRLOCK_LISTEN")
        .env_remove("AIRLOCK_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match tokio::time::timeout(Duration::from_secs(30), cmd.output()).await {
        Ok(out) => out.expect("run airlock"),
        Err(_) => panic!("`airlock {}` did not finish within 30 s", args.join(" ")),
    }
}
