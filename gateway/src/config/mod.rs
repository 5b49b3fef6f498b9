//! Configuration: a TOML file parsed in two phases, plus secrets from the environment.
//!
//! Phase one ([`raw`]) is serde with unknown keys denied; phase two
//! ([`Config::from_raw`]) resolves defaults, reads secrets from the environment and
//! checks every rule, collecting *all* problems, each naming its path and bad value
//! (`providers[1].base_url: "ftp://x" is not an http(s) URL`). A [`Config`] that exists
//! is valid: provider names are unique, every model target names a configured
//! provider, every duration and limit is positive.

pub mod raw;
pub mod routing;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raw::{RawConfig, RawGovernance, RawLocal, RawProvider, RawServer, RawUpstream};
pub use routing::{
    HybridWeights, ModelConfig, RoutePolicy, RoutingDefaults, Strategy, TargetConfig,
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./airlock-data";
pub const DEFAULT_MASTER_KEY_ENV: &str = "AIRLOCK_MASTER_KEY";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamDefaults,
    pub routing: RoutingDefaults,
    pub governance: GovernanceConfig,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    /// `[[catalog]]` entries, applied over the embedded catalog at start.
    pub catalog: Vec<crate::routing::catalog::CatalogOverride>,
    /// `[local]`: models served in-process.
    pub local: LocalConfig,
    /// The file it came from; `None` for the embedded defaults.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub master_key_env: String,
    /// The bearer key from `master_key_env`, if that variable is set.
    pub master_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub metrics_open: bool,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The provider name under which registered local models are served (`local/NAME`).
pub const LOCAL_PROVIDER: &str = "local";

/// `[local]`: how registered local models are loaded and served.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalConfig {
    pub memory_budget: Option<u64>,
    /// `None`: never unload.
    pub keep_alive: Option<Duration>,
    pub queue_capacity: usize,
    pub max_batch: usize,
    /// Loaded at start and kept loaded.
    pub preload: Vec<String>,
    pub device: LocalDevice,
    /// Registered at start when missing: `(name, path)`.
    pub models: Vec<(String, PathBuf)>,
}

/// Where local models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalDevice {
    Cpu,
    Cuda(usize),
}

/// `[governance]`: bootstrap key, audit retention, reservation defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GovernanceConfig {
    /// The variable holding the first admin key (used on first start only).
    pub admin_key_env: String,
    /// Its value, when set.
    pub admin_key: Option<String>,
    pub audit_retention: Option<Duration>,
    /// Output tokens reserved when neither the request nor the catalog gives a cap.
    pub default_max_output_tokens: u64,
    /// How many worst cases (of the request that raises it) a budget window's durable
    /// hold runs ahead of what requests in flight reserved; 0: each admission waits for
    /// a durable write of its own (see `governance::budget`).
    pub budget_hold_ahead: u64,
    /// Per-request audit records and usage counters; off only for bare proxying (admin
    /// changes and budget settlements are recorded regardless).
    pub record_requests: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamDefaults {
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(ProviderKind::OpenAi),
            "anthropic" => Some(ProviderKind::Anthropic),
            "gemini" => Some(ProviderKind::Gemini),
            _ => None,
        }
    }

    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "https://api.openai.com/v1",
            ProviderKind::Anthropic => "https://api.anthropic.com/v1",
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com/v1beta",
        }
    }

    /// The variable the embedded defaults look at to enable this kind.
    fn conventional_key_env(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "OPENAI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
            ProviderKind::Gemini => "GEMINI_API_KEY",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub api_key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub first_byte_timeout: Duration,
    pub timeout: Duration,
    pub api_version: Option<String>,
}

/// `provider/model`: a provider's name and the model name that provider knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetRef {
    pub provider: String,
    pub model: String,
}

impl TargetRef {
    /// Splits at the first `/`: `openai/ft:gpt-4o/x` is provider `openai`, model `ft:gpt-4o/x`.
    pub fn parse(s: &str) -> Option<TargetRef> {
        let (p, m) = s.split_once('/')?;
        if p.is_empty() || m.is_empty() {
            return None;
        }
        Some(TargetRef {
            provider: p.to_string(),
            model: m.to_string(),
        })
    }
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// Everything wrong with a config file, each line naming the path and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: Option<PathBuf>,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(p) => writeln!(f, "invalid config {}:", p.display())?,
            None => writeln!(f, "invalid config:")?,
        }
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where secrets come from; a trait object so tests need not touch the process env.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// Whether a referenced but unset secret is an error (serving) or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretPolicy {
    Require,
    Ignore,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path, env: &dyn Env, secrets: SecretPolicy) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: Some(path.to_path_buf()),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        let mut cfg = Config::parse(&text, env, secrets).map_err(|mut e| {
            e.source = Some(path.to_path_buf());
            e
        })?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str, env: &dyn Env, secrets: SecretPolicy) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            source: None,
            problems: vec![toml_problem(&e)],
        })?;
        Config::from_raw(raw, env, secrets)
    }

    /// The embedded defaults used when no config file is given: loopback, `./airlock-data`,
    /// and one provider for each of `OPENAI_API_KEY`, `ANTHROPIC_API_KEY`, `GEMINI_API_KEY`
    /// that is set.
    pub fn embedded(env: &dyn Env) -> Result<Config, ConfigError> {
        let providers = [
            ProviderKind::OpenAi,
            ProviderKind::Anthropic,
            ProviderKind::Gemini,
        ]
        .into_iter()
        .filter(|k| env.var(k.conventional_key_env()).is_some())
        .map(|k| RawProvider {
            name: Some(k.as_str().to_string()),
            kind: Some(k.as_str().to_string()),
            api_key_env: Some(k.conventional_key_env().to_string()),
            ..RawProvider::default()
        })
        .collect();
        let raw = RawConfig {
            providers: Some(providers),
            ..RawConfig::default()
        };
        Config::from_raw(raw, env, SecretPolicy::Require)
    }

    /// Phase two: defaults, secrets and every rule.
    pub fn from_raw(
        raw: RawConfig,
        env: &dyn Env,
        secrets: SecretPolicy,
    ) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        let server = server(raw.server.unwrap_or_default(), env, &mut p);
        let upstream = upstream(raw.upstream.unwrap_or_default(), &mut p);
        let providers = providers(
            raw.providers.unwrap_or_default(),
            &upstream,
            env,
            secrets,
            &mut p,
        );
        let known: HashSet<&str> = providers.iter().map(|p| p.name.as_str()).collect();
        let routing = routing::routing_defaults(raw.routing.unwrap_or_default(), &mut p);
        let governance = governance(raw.governance.unwrap_or_default(), env, &mut p);
        if known.contains(LOCAL_PROVIDER) {
            p.add(
                "providers",
                format_args!("the name `{LOCAL_PROVIDER}` is reserved for local models"),
            );
        }
        let mut known = known;
        known.insert(LOCAL_PROVIDER);
        let local = local(raw.local.unwrap_or_default(), &mut p);
        let models = routing::models(raw.models.unwrap_or_default(), &known, &routing, &mut p);
        let catalog = raw.catalog.unwrap_or_default();
        let mut probe = crate::routing::catalog::Catalog::default();
        if let Err(e) = probe.apply(&catalog) {
            p.add("catalog", e);
        }
        if p.0.is_empty() {
            Ok(Config {
                server,
                upstream,
                routing,
                governance,
                providers,
                models,
                catalog,
                local,
                source: None,
            })
        } else {
            Err(ConfigError {
                source: None,
                problems: p.0,
            })
        }
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: &str, msg: impl fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }
}

fn toml_problem(e: &toml::de::Error) -> String {
    // toml's message already names the key and shows the line; keep it on one entry.
    e.to_string().trim_end().to_string()
}

fn seconds(value: Option<f64>, default: Duration, path: &str, p: &mut Problems) -> Duration {
    match value {
        None => default,
        Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Duration::from_secs_f64(s),
        Some(s) => {
            p.add(
                path,
                format_args!("{s} is not a number of seconds in (0, 86400]"),
            );
            default
        }
    }
}

fn positive(value: Option<u64>, default: usize, path: &str, p: &mut Problems) -> usize {
    match value {
        None => default,
        Some(0) => {
            p.add(path, "0 is not allowed; it must be at least 1");
            default
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    }
}

fn server(raw: RawServer, env: &dyn Env, p: &mut Problems) -> ServerConfig {
    let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
        p.add(
            "server.listen",
            format_args!("{listen_text:?} is not an address like \"127.0.0.1:8080\""),
        );
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let data_dir = raw.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.to_string());
    if data_dir.trim().is_empty() {
        p.add("server.data_dir", "must not be empty");
    }
    let master_key_env = raw
        .master_key_env
        .unwrap_or_else(|| DEFAULT_MASTER_KEY_ENV.to_string());
    if !valid_env_name(&master_key_env) {
        p.add(
            "server.master_key_env",
            format_args!("{master_key_env:?} is not an environment variable name"),
        );
    }
    let master_key = env.var(&master_key_env);
    if let Some(k) = &master_key {
        if k.len() < 16 {
            p.add(
                "server.master_key_env",
                format_args!("the key in {master_key_env} is shorter than 16 characters"),
            );
        }
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.add(
                "server.log_format",
                format_args!("{other:?} is not one of \"text\", \"json\""),
            );
            LogFormat::Text
        }
    };
    ServerConfig {
        listen,
        data_dir: PathBuf::from(data_dir),
        master_key_env,
        master_key,
        max_body_bytes: positive(
            raw.max_body_bytes,
            16 * 1024 * 1024,
            "server.max_body_bytes",
            p,
        ),
        max_connections: positive(raw.max_connections, 10_000, "server.max_connections", p),
        header_read_timeout: seconds(
            raw.header_read_timeout,
            Duration::from_secs(10),
            "server.header_read_timeout",
            p,
        ),
        body_read_timeout: seconds(
            raw.body_read_timeout,
            Duration::from_secs(30),
            "server.body_read_timeout",
            p,
        ),
        shutdown_grace: seconds(
            raw.shutdown_grace,
            Duration::from_secs(30),
            "server.shutdown_grace",
            p,
        ),
        metrics_open: raw.metrics_open.unwrap_or(false),
        log_format,
    }
}

fn governance(raw: RawGovernance, env: &dyn Env, p: &mut Problems) -> GovernanceConfig {
    let admin_key_env = raw
        .admin_key_env
        .unwrap_or_else(|| "AIRLOCK_ADMIN_KEY".to_string());
    if !valid_env_name(&admin_key_env) {
        p.add(
            "governance.admin_key_env",
            format_args!("{admin_key_env:?} is not an environment variable name"),
        );
    }
    let audit_retention = match raw.audit_retention_days {
        None => None,
        Some(0) => {
            p.add(
                "governance.audit_retention_days",
                "0 is not allowed; leave it out to keep records forever",
            );
            None
        }
        Some(d) => Some(Duration::from_secs(d.saturating_mul(86_400))),
    };
    let default_max_output_tokens = match raw.default_max_output_tokens {
        Some(0) => {
            p.add("governance.default_max_output_tokens", "0 is not allowed");
            4096
        }
        Some(n) => n,
        None => 4096,
    };
    GovernanceConfig {
        record_requests: raw.record_requests.unwrap_or(true),
        admin_key: env.var(&admin_key_env),
        admin_key_env,
        audit_retention,
        default_max_output_tokens,
        budget_hold_ahead: raw
            .budget_hold_ahead
            .unwrap_or(crate::governance::budget::HOLD_AHEAD),
    }
}

fn local(raw: RawLocal, p: &mut Problems) -> LocalConfig {
    let keep_alive = match raw.keep_alive {
        None => Some(Duration::from_secs(300)),
        Some(s) if s < 0.0 => None,
        Some(s) if s.is_finite() && s <= 31_536_000.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            p.add(
                "local.keep_alive",
                format_args!("{s} is not a number of seconds (negative = never unload)"),
            );
            None
        }
    };
    let memory_budget = match raw.memory_budget_mb {
        Some(0) => {
            p.add(
                "local.memory_budget_mb",
                "0 is not allowed; leave it out for no cap",
            );
            None
        }
        other => other.map(|mb| mb.saturating_mul(1 << 20)),
    };
    let device = match raw.device.as_deref().map(str::trim) {
        None | Some("cpu") => LocalDevice::Cpu,
        Some("cuda") => LocalDevice::Cuda(0),
        Some(d) => match d.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => LocalDevice::Cuda(n),
            None => {
                p.add(
                    "local.device",
                    format_args!("{d:?} is not one of \"cpu\", \"cuda\", \"cuda:N\""),
                );
                LocalDevice::Cpu
            }
        },
    };
    if matches!(device, LocalDevice::Cuda(_))
        && !airlock_runtime::models::ComputeDevice::cuda_compiled()
    {
        p.add(
            "local.device",
            "this build has no CUDA support; build with `--features cuda` or use \"cpu\"",
        );
    }
    let mut preload = raw.preload.unwrap_or_default();
    let mut models = Vec::new();
    for (i, m) in raw.models.unwrap_or_default().into_iter().enumerate() {
        let at = format!("local.models[{i}]");
        let name = m.name.unwrap_or_default();
        if !airlock_runtime::manifest::valid_name(&name) {
            p.add(
                &format!("{at}.name"),
                format_args!("{name:?} is not a model name (1-64 of a-z A-Z 0-9 . - _)"),
            );
        }
        let Some(path) = m.path.filter(|s| !s.trim().is_empty()) else {
            p.add(&format!("{at}.path"), "is required");
            continue;
        };
        if models.iter().any(|(n, _): &(String, PathBuf)| *n == name) {
            p.add(
                &format!("{at}.name"),
                format_args!("`{name}` is declared twice"),
            );
        }
        if m.preload.unwrap_or(false) && !preload.contains(&name) {
            preload.push(name.clone());
        }
        models.push((name, PathBuf::from(path)));
    }
    LocalConfig {
        memory_budget,
        keep_alive,
        queue_capacity: positive(raw.queue_capacity, 16, "local.queue_capacity", p),
        max_batch: positive(raw.max_batch, 8, "local.max_batch", p),
        preload,
        device,
        models,
    }
}

fn upstream(raw: RawUpstream, p: &mut Problems) -> UpstreamDefaults {
    UpstreamDefaults {
        connect_timeout: seconds(
            raw.connect_timeout,
            Duration::from_secs(5),
            "upstream.connect_timeout",
            p,
        ),
        first_byte_timeout: seconds(
            raw.first_byte_timeout,
            Duration::from_secs(60),
            "upstream.first_byte_timeout",
            p,
        ),
        timeout: seconds(raw.timeout, Duration::from_secs(600), "upstream.timeout", p),
        pool_max_idle_per_host: positive(
            raw.pool_max_idle_per_host,
            256,
            "upstream.pool_max_idle_per_host",
            p,
        ),
    }
}

fn valid_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn providers(
    raw: Vec<RawProvider>,
    up: &UpstreamDefaults,
    env: &dyn Env,
    secrets: SecretPolicy,
    p: &mut Problems,
) -> Vec<ProviderConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("providers[{i}].{field}");
        let Some(name) = r.name else {
            p.add(&at("name"), "is required");
            continue;
        };
        if !valid_name(&name) {
            p.add(
                &at("name"),
                format_args!(
                    "{name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
                ),
            );
        } else if name == "local" {
            p.add(
                &at("name"),
                "\"local\" is reserved for models Airlock serves itself",
            );
        } else if !seen.insert(name.clone()) {
            p.add(&at("name"), format_args!("{name:?} is defined twice"));
        }
        let kind = match r.kind.as_deref() {
            None => {
                p.add(
                    &at("kind"),
                    "is required (one of \"openai\", \"anthropic\", \"gemini\")",
                );
                continue;
            }
            Some(k) => match ProviderKind::parse(k) {
                Some(k) => k,
                None => {
                    p.add(
                        &at("kind"),
                        format_args!("{k:?} is not one of \"openai\", \"anthropic\", \"gemini\""),
                    );
                    continue;
                }
            },
        };
        let base_url = r
            .base_url
            .unwrap_or_else(|| kind.default_base_url().to_string());
        // Checked as the client will parse it (joined with a path for each call).
        match base_url.parse::<http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
            _ => p.add(
                &at("base_url"),
                format_args!("{base_url:?} is not an http(s) URL"),
            ),
        }
        let api_key = match &r.api_key_env {
            None => None,
            Some(var) if !valid_env_name(var) => {
                p.add(
                    &at("api_key_env"),
                    format_args!("{var:?} is not an environment variable name"),
                );
                None
            }
            Some(var) => {
                let key = env.var(var);
                if key.is_none() && secrets == SecretPolicy::Require {
                    p.add(
                        &at("api_key_env"),
                        format_args!("environment variable {var} is not set"),
                    );
                }
                key
            }
        };
        let headers = r.headers.unwrap_or_default();
        for (k, v) in &headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                p.add(&at(&format!("headers.{k}")), "is not a valid HTTP header");
            }
        }
        if r.api_version.is_some() && kind != ProviderKind::Anthropic {
            p.add(&at("api_version"), "applies only to kind = \"anthropic\"");
        }
        out.push(ProviderConfig {
            name,
            kind,
            base_url,
            api_key_env: r.api_key_env,
            api_key,
            headers,
            first_byte_timeout: seconds(
                r.first_byte_timeout,
                up.first_byte_timeout,
                &at("first_byte_timeout"),
                p,
            ),
            timeout: seconds(r.timeout, up.timeout, &at("timeout"), p),
            api_version: r.api_version,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8080"
data_dir = "./airlock-data"
master_key_env = "AIRLOCK_MASTER_KEY"

[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[[models]]
name = "gpt-4o-mini"
targets = ["openai/gpt-4o-mini"]
"#;

    #[test]
    fn the_issue_example_parses() {
        let env = [
            ("OPENAI_API_KEY", "sk-test"),
            ("AIRLOCK_MASTER_KEY", "0123456789abcdef"),
        ];
        let cfg = Config::parse(EXAMPLE, &env, SecretPolicy::Require).unwrap();
        assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.server.master_key.as_deref(), Some("0123456789abcdef"));
        assert_eq!(cfg.providers[0].api_key.as_deref(), Some("sk-test"));
        assert_eq!(cfg.providers[0].kind, ProviderKind::OpenAi);
        assert_eq!(
            cfg.models[0].targets[0].target.to_string(),
            "openai/gpt-4o-mini"
        );
        assert_eq!(cfg.models[0].strategy, Strategy::Priority);
        assert_eq!(cfg.models[0].targets[0].weight, 1.0);
    }

    #[test]
    fn missing_secret_is_named() {
        let err = Config::parse(EXAMPLE, &[("X", "y")], SecretPolicy::Require).unwrap_err();
        assert_eq!(
            err.problems,
            vec!["providers[0].api_key_env: environment variable OPENAI_API_KEY is not set"]
        );
        assert!(Config::parse(EXAMPLE, &[("X", "y")], SecretPolicy::Ignore).is_ok());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse(
            "[server]\nlisten_addr = \"x\"\n",
            &[("X", "y")],
            SecretPolicy::Ignore,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `listen_addr`"), "{msg}");
    }

    #[test]
    fn every_problem_is_reported_with_path_and_value() {
        let text = r#"
[server]
listen = "nowhere"
header_read_timeout = -1

[[providers]]
name = "a"
kind = "cohere"

[[providers]]
name = "b"
kind = "openai"
base_url = "ftp://example.com"

[[providers]]
name = "b"
kind = "gemini"

[[models]]
name = "m"
targets = ["nope/x", "justaname"]
"#;
        let err = Config::parse(text, &[("X", "y")], SecretPolicy::Ignore).unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "server.listen: \"nowhere\"",
            "server.header_read_timeout: -1",
            "providers[0].kind: \"cohere\"",
            "providers[1].base_url: \"ftp://example.com\"",
            "providers[2].name: \"b\" is defined twice",
            "models[0].targets[0]: \"nope/x\" names provider \"nope\"",
            "models[0].targets[1]: \"justaname\" is not of the form",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
    }

    #[test]
    fn embedded_defaults_pick_up_conventional_keys() {
        let cfg = Config::embedded(&[("ANTHROPIC_API_KEY", "k")]).unwrap();
        assert_eq!(cfg.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cfg.providers.len(), 1);
        assert_eq!(cfg.providers[0].name, "anthropic");
        assert_eq!(cfg.providers[0].base_url, "https://api.anthropic.com/v1");
        assert!(Config::embedded(&[("X", "y")])
            .unwrap()
            .providers
            .is_empty());
    }

    #[test]
    fn target_refs_split_at_the_first_slash() {
        let t = TargetRef::parse("vllm/meta-llama/Llama-3.1-8B").unwrap();
        assert_eq!(t.provider, "vllm");
        assert_eq!(t.model, "meta-llama/Llama-3.1-8B");
        assert!(TargetRef::parse("/x").is_none());
        assert!(TargetRef::parse("x/").is_none());
    }
}
