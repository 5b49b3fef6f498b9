//! The usual test setup: one mock per provider kind behind one gateway, plus the
//! request bodies tests share.
//!
//! Model names the [`Stack`] configures (what clients send -> target):
//!
//! | client model        | target                          |
//! |---------------------|---------------------------------|
//! | `gpt`               | `oai/gpt-4o-mini`               |
//! | `claude`            | `ant/claude-3-5-haiku-latest`   |
//! | `gemini`            | `gem/gemini-2.0-flash`          |
//! | `embed`             | `oai/text-embedding-3-small`    |
//! | `gemini-embed`      | `gem/text-embedding-004`        |
//! | `team/chat`         | `oai/gpt-4o-mini` (a `/` in a name) |

use serde_json::{json, Value};

use crate::config::ConfigBuilder;
use crate::gateway::Gateway;
use crate::mock::{MockUpstream, ProviderKind};

/// Three mocks and a gateway in front of them.
pub struct Stack {
    pub openai: MockUpstream,
    pub anthropic: MockUpstream,
    pub gemini: MockUpstream,
    pub gateway: Gateway,
}

/// One provider kind as the stack wires it: the provider's name in the config, the
/// client model name, and the upstream model name.
#[derive(Debug, Clone, Copy)]
pub struct Wiring {
    pub kind: ProviderKind,
    pub provider: &'static str,
    pub model: &'static str,
    pub upstream_model: &'static str,
}

impl Wiring {
    /// `provider/upstream_model`, as `x-airlock-target` names it.
    pub fn target(&self) -> String {
        format!("{}/{}", self.provider, self.upstream_model)
    }
}

/// How the stack wires `kind`.
pub fn wiring(kind: ProviderKind) -> Wiring {
    match kind {
        ProviderKind::OpenAi => Wiring {
            kind,
            provider: "oai",
            model: "gpt",
            upstream_model: "gpt-4o-mini",
        },
        ProviderKind::Anthropic => Wiring {
            kind,
            provider: "ant",
            model: "claude",
            upstream_model: "claude-3-5-haiku-latest",
        },
        ProviderKind::Gemini => Wiring {
            kind,
            provider: "gem",
            model: "gemini",
            upstream_model: "gemini-2.0-flash",
        },
    }
}

impl Stack {
    /// The standard stack.
    pub async fn start() -> Stack {
        Self::start_with(|b| b).await
    }

    /// The standard stack with extra config (`[server]` keys, more models...).
    pub async fn start_with(extra: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> Stack {
        let openai = MockUpstream::openai().await;
        let anthropic = MockUpstream::anthropic().await;
        let gemini = MockUpstream::gemini().await;
        let builder = Self::config(&openai, &anthropic, &gemini);
        let gateway = extra(builder).start().await;
        Stack {
            openai,
            anthropic,
            gemini,
            gateway,
        }
    }

    /// The standard config for these mocks.
    pub fn config(
        openai: &MockUpstream,
        anthropic: &MockUpstream,
        gemini: &MockUpstream,
    ) -> ConfigBuilder {
        ConfigBuilder::new()
            .provider("oai", openai)
            .provider("ant", anthropic)
            .provider("gem", gemini)
            .model("gpt", &["oai/gpt-4o-mini"])
            .model("claude", &["ant/claude-3-5-haiku-latest"])
            .model("gemini", &["gem/gemini-2.0-flash"])
            .model("embed", &["oai/text-embedding-3-small"])
            .model("gemini-embed", &["gem/text-embedding-004"])
            .model("team/chat", &["oai/gpt-4o-mini"])
    }

    /// The mock of `kind`.
    pub fn mock(&self, kind: ProviderKind) -> &MockUpstream {
        match kind {
            ProviderKind::OpenAi => &self.openai,
            ProviderKind::Anthropic => &self.anthropic,
            ProviderKind::Gemini => &self.gemini,
        }
    }

    /// Requests received by all three mocks together.
    pub fn upstream_requests(&self) -> usize {
        self.openai.request_count() + self.anthropic.request_count() + self.gemini.request_count()
    }
}

/// A one-message chat body.
pub fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// A streamed one-message chat body.
pub fn chat_stream(model: &str, text: &str, include_usage: bool) -> Value {
    let mut b = chat(model, text);
    b["stream"] = json!(true);
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// Two tools; `get_weather` comes first, so mocks call it unless told otherwise.
pub fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather for a place",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "Current time for a place",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
        }}
    ])
}
