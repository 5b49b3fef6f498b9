//! `airlock-benches`: criterion micro-benchmarks of the gateway's hot paths
//! (`cargo bench -p airlock-benches`); results and commands are in BENCHMARKS.md.
//!
//! This library holds the fixtures the benches share, so each bench measures the
//! same inputs.

use airlock::config::{Config, SecretPolicy};
use airlock::routing::catalog::Catalog;
use airlock::routing::Routes;

/// A chat request of typical size: a system prompt, a few turns, one tool.
pub const CHAT_REQUEST: &str = r#"{
  "model": "smart",
  "messages": [
    {"role": "system", "content": "You are a helpful assistant that answers briefly and cites sources when asked."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And what is its population, roughly? Answer with one number."}
  ],
  "temperature": 0.2,
  "max_tokens": 256,
  "stream": false,
  "tools": [{"type": "function", "function": {"name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}],
  "user": "bench"
}"#;

/// Routes with one model per strategy, each over the same five targets.
pub fn five_target_routes() -> Result<Routes, String> {
    let mut text = String::new();
    for p in ["a", "b", "c", "d", "e"] {
        text.push_str(&format!(
            "[[providers]]\nname = \"{p}\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n"
        ));
    }
    let targets = r#"["a/gpt-4o", "b/gpt-4o-mini", "c/gpt-4.1", "d/gpt-4.1-mini", {target = "e/gpt-4.1-nano", weight = 3}]"#;
    for s in ["priority", "weighted", "cost", "latency", "hybrid"] {
        text.push_str(&format!(
            "[[models]]\nname = \"{s}\"\nstrategy = \"{s}\"\ntargets = {targets}\n"
        ));
    }
    let cfg =
        Config::parse(&text, &[("X", "y")], SecretPolicy::Ignore).map_err(|e| e.to_string())?;
    let client = airlock::providers::http::build_client(&cfg.upstream);
    Ok(Routes::new(&cfg, &client, Catalog::builtin()?))
}
