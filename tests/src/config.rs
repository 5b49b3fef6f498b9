//! A builder for the gateway's TOML config, wired to mock upstreams.
//!
//! The `[server]` section always starts with `listen = "127.0.0.1:0"`, `data_dir =
//! "@DATA_DIR@"` (the harness substitutes a temp dir) and `master_key_env =
//! "AIRLOCK_MASTER_KEY"`; [`ConfigBuilder::server`] overrides or adds keys. Each mock
//! provider gets its own `api_key_env` variable, set to the key that mock demands, so a
//! gateway that forgets credentials is caught by the mock's 401.

use crate::gateway::{Gateway, DATA_DIR_PLACEHOLDER, MASTER_KEY_ENV};
use crate::mock::{MockUpstream, ProviderKind};

/// Builds a config file plus the environment the gateway needs to read it.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    server: Vec<(String, String)>,
    upstream: Vec<(String, String)>,
    providers: Vec<String>,
    models: Vec<String>,
    raw: Vec<String>,
    env: Vec<(String, String)>,
}

impl ConfigBuilder {
    /// The harness defaults: port 0 on loopback, a temp data dir, the default master key env.
    pub fn new() -> Self {
        let mut b = ConfigBuilder::default();
        b = b.server("listen", "\"127.0.0.1:0\"");
        b = b.server("data_dir", &format!("\"{DATA_DIR_PLACEHOLDER}\""));
        b.server("master_key_env", &format!("\"{MASTER_KEY_ENV}\""))
    }

    /// Sets `[server] key = value`; `value` is raw TOML (`"true"`, `"\"text\""`, `"30"`).
    pub fn server(mut self, key: &str, value: &str) -> Self {
        set(&mut self.server, key, value);
        self
    }

    /// Sets `[upstream] key = value` (raw TOML).
    pub fn upstream(mut self, key: &str, value: &str) -> Self {
        set(&mut self.upstream, key, value);
        self
    }

    /// A provider named `name` pointing at `mock`, with the credentials it demands.
    pub fn provider(self, name: &str, mock: &MockUpstream) -> Self {
        self.provider_at(name, mock.kind(), &mock.base_url(), Some(mock.api_key()))
    }

    /// A provider at an arbitrary base URL (e.g. a closed port); `api_key` set through an
    /// environment variable named after the provider.
    pub fn provider_at(
        mut self,
        name: &str,
        kind: ProviderKind,
        base_url: &str,
        api_key: Option<&str>,
    ) -> Self {
        let mut block = format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"{}\"\nbase_url = \"{base_url}\"\n",
            kind.as_str()
        );
        if let Some(key) = api_key {
            let var = key_env_name(name);
            block.push_str(&format!("api_key_env = \"{var}\"\n"));
            self.env.push((var, key.to_string()));
        }
        self.providers.push(block);
        self
    }

    /// A model clients call `name`, served by `targets` (`provider/model`) in order.
    pub fn model(mut self, name: &str, targets: &[&str]) -> Self {
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        self.models.push(format!(
            "[[models]]\nname = \"{name}\"\ntargets = [{}]\n",
            list.join(", ")
        ));
        self
    }

    /// Appends raw TOML (a whole section such as `[local]`) to the file.
    pub fn raw(mut self, text: &str) -> Self {
        self.raw.push(text.to_string());
        self
    }

    /// An extra environment variable for the gateway process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The config file text.
    pub fn toml(&self) -> String {
        let mut out = String::from("[server]\n");
        for (k, v) in &self.server {
            out.push_str(&format!("{k} = {v}\n"));
        }
        if !self.upstream.is_empty() {
            out.push_str("\n[upstream]\n");
            for (k, v) in &self.upstream {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        for p in &self.providers {
            out.push('\n');
            out.push_str(p);
        }
        for m in self.models.iter().chain(&self.raw) {
            out.push('\n');
            out.push_str(m);
        }
        out
    }

    /// The environment the gateway needs (provider keys and extras).
    pub fn env_vars(&self) -> Vec<(String, String)> {
        self.env.clone()
    }

    /// Starts a gateway with this config.
    pub async fn start(self) -> Gateway {
        let toml = self.toml();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Gateway::start(&toml, &env).await
    }
}

fn set(list: &mut Vec<(String, String)>, key: &str, value: &str) {
    match list.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_string(),
        None => list.push((key.to_string(), value.to_string())),
    }
}

/// `AIRLOCK_TEST_KEY_<NAME>` with non-alphanumerics turned into `_`.
fn key_env_name(provider: &str) -> String {
    let suffix: String = provider
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("AIRLOCK_TEST_KEY_{suffix}")
}
