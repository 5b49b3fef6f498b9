//! The model catalog: prices, context windows and capabilities of well-known provider
//! models, shipped inside the binary (`catalog.toml`, never fetched at run time), plus
//! the operator's `[[catalog]]` overrides; and the token estimates routing needs to
//! price a request before sending it.
//!
//! Routing uses it to rank targets by expected cost, to know context windows for
//! context-window fallbacks, and `/v1/models` shows its prices and capabilities.
//!
//! Invariants:
//! - Every entry has a non-empty name and family, a known mode, and prices that are
//!   finite and >= 0. The embedded file is checked the same way as config overrides,
//!   and also may not repeat a name or alias; `builtin()` returns an error rather than
//!   panicking if it is broken (a test keeps it parsing).
//! - A context window or max output of 0 means "unknown", never "zero tokens": only
//!   operator-added entries can have it.
//! - `lookup` never guesses across models: it only strips a `models/` prefix and
//!   trailing date/version segments (`-2024-08-06`, `-20250929`, `-preview-05-20`,
//!   `-001`), so a name resolves to the entry of the model it is a snapshot of, or to
//!   nothing.
//! - `apply` is all-or-nothing: on an error the catalog is unchanged.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::api::types::{ChatCompletionRequest, ContentPart, MessageContent, ResponseFormat};

/// The embedded data file.
const BUILTIN_TOML: &str = include_str!("catalog.toml");

/// Families the embedded file may use; overrides may name any family.
const BUILTIN_FAMILIES: [&str; 4] = ["openai", "anthropic", "gemini", "mistral"];

/// Family of an override-added entry that does not name one.
const DEFAULT_FAMILY: &str = "other";

/// One model as the catalog knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// `openai`, `anthropic`, `gemini`, `mistral`, or what an override says.
    pub family: String,
    pub mode: Mode,
    /// USD per million prompt tokens.
    pub input_per_mtok: f64,
    /// USD per million generated tokens.
    pub output_per_mtok: f64,
    /// Tokens the model accepts, prompt and output together; 0: unknown.
    pub context_window: u32,
    /// The most tokens it generates in one answer; 0: unknown (or an embedding model).
    pub max_output: u32,
    pub capabilities: Capabilities,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Chat,
    Embedding,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        match s {
            "chat" => Some(Mode::Chat),
            "embedding" => Some(Mode::Embedding),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Capabilities {
    /// Function calling.
    pub tools: bool,
    /// Image input.
    pub vision: bool,
    /// `response_format: json_schema` can be honoured (natively or by the adapter).
    pub json_schema: bool,
    /// Streamed chat completions.
    pub streaming: bool,
}

/// One `[[catalog]]` entry of the gateway config: name required, every other field
/// optional. For a name the catalog already resolves (see [`Catalog::apply`]) only the
/// given fields change; for a new name, missing prices default to 0, a missing context
/// window and max output to 0 (unknown), capabilities to false, mode to chat and family
/// to `other`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogOverride {
    pub name: String,
    pub family: Option<String>,
    pub mode: Option<String>,
    pub input_per_mtok: Option<f64>,
    pub output_per_mtok: Option<f64>,
    pub context_window: Option<u32>,
    pub max_output: Option<u32>,
    pub tools: Option<bool>,
    pub vision: Option<bool>,
    pub json_schema: Option<bool>,
    pub streaming: Option<bool>,
}

/// The catalog: entries, and every name and alias pointing at one of them.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: Vec<ModelInfo>,
    /// Names and aliases -> index into `entries`.
    index: HashMap<String, usize>,
}

/// `catalog.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    model: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    family: String,
    mode: String,
    input_per_mtok: f64,
    output_per_mtok: f64,
    context_window: u32,
    max_output: u32,
    tools: bool,
    vision: bool,
    json_schema: bool,
    streaming: bool,
    #[serde(default)]
    aliases: Vec<String>,
}

impl Catalog {
    /// The embedded catalog. An error here is a bug in `catalog.toml` (a test parses
    /// it); it is returned rather than panicking.
    pub fn builtin() -> Result<Catalog, String> {
        Catalog::from_toml(BUILTIN_TOML).map_err(|e| format!("built-in model catalog: {e}"))
    }

    /// Parses and checks a catalog file in the embedded format.
    fn from_toml(text: &str) -> Result<Catalog, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut catalog = Catalog {
            entries: Vec::with_capacity(raw.model.len()),
            index: HashMap::new(),
        };
        for m in raw.model {
            let what = format!("model \"{}\"", m.name);
            if m.name.is_empty() {
                return Err("a model has an empty name".to_string());
            }
            if !BUILTIN_FAMILIES.contains(&m.family.as_str()) {
                return Err(format!(
                    "{what}: unknown family \"{}\" (expected one of {})",
                    m.family,
                    BUILTIN_FAMILIES.join(", ")
                ));
            }
            let mode = parse_mode(&what, &m.mode)?;
            check_price(&what, "input_per_mtok", m.input_per_mtok)?;
            check_price(&what, "output_per_mtok", m.output_per_mtok)?;
            if m.context_window == 0 {
                return Err(format!("{what}: context_window must be > 0"));
            }
            if m.max_output > m.context_window {
                return Err(format!(
                    "{what}: max_output {} exceeds context_window {}",
                    m.max_output, m.context_window
                ));
            }
            if mode == Mode::Chat && m.max_output == 0 {
                return Err(format!("{what}: a chat model needs max_output > 0"));
            }
            let idx = catalog.entries.len();
            for key in std::iter::once(&m.name).chain(m.aliases.iter()) {
                if key.is_empty() {
                    return Err(format!("{what}: empty alias"));
                }
                if catalog.index.insert(key.clone(), idx).is_some() {
                    return Err(format!("{what}: duplicate name or alias \"{key}\""));
                }
            }
            catalog.entries.push(ModelInfo {
                name: m.name,
                family: m.family,
                mode,
                input_per_mtok: m.input_per_mtok,
                output_per_mtok: m.output_per_mtok,
                context_window: m.context_window,
                max_output: m.max_output,
                capabilities: Capabilities {
                    tools: m.tools,
                    vision: m.vision,
                    json_schema: m.json_schema,
                    streaming: m.streaming,
                },
            });
        }
        Ok(catalog)
    }

    /// Looks a provider's model name up, case-sensitively: the exact name or alias;
    /// then, with a leading `models/` (Gemini) removed; then with trailing date or
    /// version segments removed one at a time (`gpt-4o-2024-08-06` -> `gpt-4o`,
    /// `claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`,
    /// `gemini-2.5-flash-preview-05-20` -> `gemini-2.5-flash`,
    /// `gemini-2.0-flash-001` -> `gemini-2.0-flash`). A stripped segment is all digits
    /// of length 2, 3, 4 or 8, or the word `preview` or `exp`; at most four are
    /// stripped. Mistral's `mistral-large-2411` does not become `mistral-large-latest`.
    pub fn lookup(&self, model: &str) -> Option<&ModelInfo> {
        if let Some(info) = self.get(model) {
            return Some(info);
        }
        let mut name = model.strip_prefix("models/").unwrap_or(model);
        if name.len() != model.len() {
            if let Some(info) = self.get(name) {
                return Some(info);
            }
        }
        for _ in 0..MAX_STRIPPED_SEGMENTS {
            let (rest, last) = name.rsplit_once('-')?;
            if rest.is_empty() || !is_version_segment(last) {
                return None;
            }
            name = rest;
            if let Some(info) = self.get(name) {
                return Some(info);
            }
        }
        None
    }

    /// Exact name or alias.
    fn get(&self, name: &str) -> Option<&ModelInfo> {
        self.index.get(name).and_then(|&i| self.entries.get(i))
    }

    /// Adds or replaces entries from config. For each override, in order:
    /// - a name that is an entry's own name changes that entry (and so what its
    ///   aliases resolve to), only in the fields given;
    /// - any other name `lookup` resolves (an alias, a dated snapshot, `models/...`)
    ///   becomes its own entry, starting from the resolved entry's values, so the
    ///   override touches that name only;
    /// - an unknown name becomes a new entry with the defaults of [`CatalogOverride`].
    ///
    /// Rejected, leaving the catalog unchanged: an empty name or family, a name given
    /// twice, an unknown mode, a negative or non-finite price.
    pub fn apply(&mut self, overrides: &[CatalogOverride]) -> Result<(), String> {
        let mut next = self.clone();
        let mut seen: Vec<&str> = Vec::with_capacity(overrides.len());
        for (i, o) in overrides.iter().enumerate() {
            if o.name.is_empty() {
                return Err(format!("catalog entry {i}: name must not be empty"));
            }
            if seen.contains(&o.name.as_str()) {
                return Err(format!("catalog entry \"{}\": given twice", o.name));
            }
            seen.push(&o.name);
            let what = format!("catalog entry \"{}\"", o.name);
            let mode = o
                .mode
                .as_deref()
                .map(|m| parse_mode(&what, m))
                .transpose()?;
            if let Some(family) = &o.family {
                if family.is_empty() {
                    return Err(format!("{what}: family must not be empty"));
                }
            }
            if let Some(p) = o.input_per_mtok {
                check_price(&what, "input_per_mtok", p)?;
            }
            if let Some(p) = o.output_per_mtok {
                check_price(&what, "output_per_mtok", p)?;
            }

            let idx = match next.index.get(&o.name) {
                Some(&idx) if next.entries.get(idx).is_some_and(|e| e.name == o.name) => idx,
                _ => {
                    let base = next.lookup(&o.name).cloned().unwrap_or_else(|| ModelInfo {
                        name: String::new(),
                        family: DEFAULT_FAMILY.to_string(),
                        mode: Mode::Chat,
                        input_per_mtok: 0.0,
                        output_per_mtok: 0.0,
                        context_window: 0,
                        max_output: 0,
                        capabilities: Capabilities::default(),
                    });
                    let idx = next.entries.len();
                    next.entries.push(ModelInfo {
                        name: o.name.clone(),
                        ..base
                    });
                    next.index.insert(o.name.clone(), idx);
                    idx
                }
            };
            let Some(e) = next.entries.get_mut(idx) else {
                return Err(format!("{what}: catalog index out of step"));
            };
            if let Some(family) = &o.family {
                e.family.clone_from(family);
            }
            if let Some(mode) = mode {
                e.mode = mode;
            }
            if let Some(p) = o.input_per_mtok {
                e.input_per_mtok = p;
            }
            if let Some(p) = o.output_per_mtok {
                e.output_per_mtok = p;
            }
            if let Some(n) = o.context_window {
                e.context_window = n;
            }
            if let Some(n) = o.max_output {
                e.max_output = n;
            }
            let c = &mut e.capabilities;
            c.tools = o.tools.unwrap_or(c.tools);
            c.vision = o.vision.unwrap_or(c.vision);
            c.json_schema = o.json_schema.unwrap_or(c.json_schema);
            c.streaming = o.streaming.unwrap_or(c.streaming);
        }
        *self = next;
        Ok(())
    }

    /// The entries, in file order then in the order overrides added them.
    pub fn iter(&self) -> impl Iterator<Item = &ModelInfo> {
        self.entries.iter()
    }

    /// Number of entries (aliases not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How many trailing date/version segments `lookup` strips at most
/// (`-preview-09-2025` is three).
const MAX_STRIPPED_SEGMENTS: usize = 4;

/// A trailing name segment that marks a snapshot of a model rather than another model:
/// a date or version number (`2024`, `08`, `001`, `20250929`) or a preview marker.
fn is_version_segment(seg: &str) -> bool {
    let digits = !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit());
    (digits && matches!(seg.len(), 2 | 3 | 4 | 8)) || seg == "preview" || seg == "exp"
}

fn parse_mode(what: &str, mode: &str) -> Result<Mode, String> {
    Mode::parse(mode).ok_or_else(|| {
        format!("{what}: unknown mode \"{mode}\" (expected \"chat\" or \"embedding\")")
    })
}

fn check_price(what: &str, field: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(format!(
            "{what}: {field} must be a finite number >= 0, got {value}"
        ))
    }
}

/// Expected cost in USD of a request: its prompt tokens at the input price plus its
/// max output at the output price (an upper bound for the output part).
pub fn expected_cost(info: &ModelInfo, prompt_tokens: u64, max_output: u64) -> f64 {
    (prompt_tokens as f64 * info.input_per_mtok + max_output as f64 * info.output_per_mtok)
        / 1_000_000.0
}

/// Tokens of an image part: OpenAI's estimate for a high-detail 1024x1024 image (85
/// base + 4 tiles of 170). Images are not decoded, so every image counts this much.
pub const IMAGE_TOKENS: u64 = 765;
/// Tokens of an image part sent with `detail: "low"` (OpenAI's fixed low-detail cost).
pub const IMAGE_LOW_DETAIL_TOKENS: u64 = 85;
/// Tokens of an audio or file part, whose length is not known without decoding it: a
/// flat guess of about a page of text or a minute of speech.
pub const OPAQUE_PART_TOKENS: u64 = 1_000;
/// Per-message overhead: role and the delimiters around it.
const MESSAGE_OVERHEAD: u64 = 4;
/// The reply's own priming (`<|start|>assistant<|message|>`).
const REPLY_OVERHEAD: u64 = 3;
/// Per tool definition: the wrapper the provider renders around name and schema.
const TOOL_OVERHEAD: u64 = 8;
/// Once per request with tools: the tool-use preamble.
const TOOLS_PREAMBLE: u64 = 12;

/// Estimated prompt tokens of a chat request, without a tokenizer, for external
/// models: the text of every message ([`estimate_text_tokens`]) plus
/// [`MESSAGE_OVERHEAD`] per message, names and tool calls in assistant messages, each
/// tool's name, description and JSON schema plus [`TOOL_OVERHEAD`], a JSON response
/// schema, [`IMAGE_TOKENS`] per image ([`IMAGE_LOW_DETAIL_TOKENS`] for `detail: low`)
/// and [`OPAQUE_PART_TOKENS`] per audio or file part. Aimed to land within about 25%
/// of real counts for ordinary text; it is a ranking and fallback heuristic, never
/// billing.
pub fn estimate_chat_tokens(req: &ChatCompletionRequest) -> u64 {
    let mut total = REPLY_OVERHEAD;
    for m in &req.messages {
        total += MESSAGE_OVERHEAD;
        match &m.content {
            None => {}
            Some(MessageContent::Text(t)) => total += estimate_text_tokens(t),
            Some(MessageContent::Parts(parts)) => {
                for p in parts {
                    total += match p {
                        ContentPart::Text { text } => estimate_text_tokens(text),
                        ContentPart::Refusal { refusal } => estimate_text_tokens(refusal),
                        ContentPart::ImageUrl { image_url } => {
                            if image_url.detail.as_deref() == Some("low") {
                                IMAGE_LOW_DETAIL_TOKENS
                            } else {
                                IMAGE_TOKENS
                            }
                        }
                        ContentPart::InputAudio { .. } | ContentPart::File { .. } => {
                            OPAQUE_PART_TOKENS
                        }
                    };
                }
            }
        }
        if let Some(name) = &m.name {
            total += 1 + estimate_text_tokens(name);
        }
        if let Some(r) = &m.refusal {
            total += estimate_text_tokens(r);
        }
        for call in m.tool_calls.iter().flatten() {
            total += MESSAGE_OVERHEAD
                + estimate_text_tokens(&call.function.name)
                + estimate_text_tokens(&call.function.arguments);
        }
    }
    if let Some(tools) = &req.tools {
        if !tools.is_empty() {
            total += TOOLS_PREAMBLE;
        }
        for t in tools {
            let f = &t.function;
            total += TOOL_OVERHEAD + estimate_text_tokens(&f.name);
            if let Some(d) = &f.description {
                total += estimate_text_tokens(d);
            }
            if let Some(p) = &f.parameters {
                total += estimate_text_tokens(&p.to_string());
            }
        }
    }
    if let Some(ResponseFormat::JsonSchema { json_schema }) = &req.response_format {
        total += TOOL_OVERHEAD + estimate_text_tokens(&json_schema.name);
        if let Some(s) = &json_schema.schema {
            total += estimate_text_tokens(&s.to_string());
        }
    }
    total
}

/// Estimated tokens of a text, without a tokenizer. The rule, in quarter tokens:
/// an ASCII character counts 1 (about 4 characters a token, as BPE tokenizers give
/// for English and code); a CJK ideograph, kana, hangul, full-width form or any
/// character outside the Basic Multilingual Plane (emoji, rare ideographs) counts 4
/// (a token each); any other non-ASCII character (accented Latin, Cyrillic, Greek,
/// Arabic, Hebrew, Devanagari, ...) counts 2 (about 2 characters a token). The sum is
/// rounded up, so any non-empty text is at least one token.
pub fn estimate_text_tokens(text: &str) -> u64 {
    let quarters: u64 = text
        .chars()
        .map(|c| {
            if c.is_ascii() {
                1
            } else if is_wide(c) {
                4
            } else {
                2
            }
        })
        .sum();
    quarters.div_ceil(4)
}

/// Characters a tokenizer typically spends a whole token (or more) on.
fn is_wide(c: char) -> bool {
    matches!(u32::from(c),
        0x1100..=0x11FF       // Hangul Jamo
        | 0x2E80..=0x2FDF     // CJK radicals, Kangxi radicals
        | 0x3000..=0x303F     // CJK symbols and punctuation
        | 0x3040..=0x30FF     // Hiragana, Katakana
        | 0x3100..=0x31FF     // Bopomofo, Hangul compatibility jamo, kana extensions
        | 0x3200..=0x4DBF     // enclosed CJK, CJK compatibility, extension A
        | 0x4E00..=0x9FFF     // CJK unified ideographs
        | 0xA960..=0xA97F     // Hangul Jamo extended-A
        | 0xAC00..=0xD7FF     // Hangul syllables, Jamo extended-B
        | 0xF900..=0xFAFF     // CJK compatibility ideographs
        | 0xFE30..=0xFE4F     // CJK compatibility forms
        | 0xFF00..=0xFFEF     // half-width and full-width forms
        | 0x10000..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn builtin() -> Catalog {
        Catalog::builtin().unwrap()
    }

    fn ov(name: &str) -> CatalogOverride {
        CatalogOverride {
            name: name.to_string(),
            ..CatalogOverride::default()
        }
    }

    fn request(v: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn embedded_catalog_parses_and_covers_every_family() {
        let c = builtin();
        assert!(c.len() >= 30, "only {} entries", c.len());
        assert!(!c.is_empty());
        for family in BUILTIN_FAMILIES {
            assert!(
                c.iter().any(|m| m.family == family && m.mode == Mode::Chat),
                "no chat model for {family}"
            );
            // Anthropic has no embedding model.
            if family != "anthropic" {
                assert!(
                    c.iter()
                        .any(|m| m.family == family && m.mode == Mode::Embedding),
                    "no embedding model for {family}"
                );
            }
        }
    }

    #[test]
    fn embedded_catalog_lists_the_models_routing_expects() {
        let c = builtin();
        for name in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "o1",
            "o3",
            "o3-mini",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-embedding-ada-002",
            "claude-opus-4-1",
            "claude-opus-4",
            "claude-sonnet-4-5",
            "claude-sonnet-4",
            "claude-3-7-sonnet",
            "claude-3-5-haiku",
            "claude-haiku-4-5",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
            "gemini-2.5-flash-lite",
            "gemini-2.0-flash",
            "gemini-embedding-001",
            "text-embedding-004",
            "mistral-large-latest",
            "mistral-medium-latest",
            "mistral-small-latest",
            "codestral-latest",
            "open-mistral-nemo",
            "mistral-embed",
        ] {
            let m = c.lookup(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(m.name, name, "{name} resolved to another entry");
        }
    }

    #[test]
    fn embedded_entries_are_internally_consistent() {
        for m in builtin().iter() {
            assert!(m.context_window > 0, "{}", m.name);
            assert!(m.max_output <= m.context_window, "{}", m.name);
            match m.mode {
                Mode::Chat => {
                    assert!(m.max_output > 0, "{}", m.name);
                    assert!(m.capabilities.streaming, "{}", m.name);
                    assert!(m.output_per_mtok >= m.input_per_mtok, "{}", m.name);
                }
                Mode::Embedding => {
                    assert_eq!(m.max_output, 0, "{}", m.name);
                    assert_eq!(m.output_per_mtok, 0.0, "{}", m.name);
                    assert_eq!(m.capabilities, Capabilities::default(), "{}", m.name);
                }
            }
        }
    }

    #[test]
    fn spot_prices_match_the_data() {
        let c = builtin();
        let price = |n: &str| {
            let m = c.lookup(n).unwrap();
            (m.input_per_mtok, m.output_per_mtok)
        };
        assert_eq!(price("gpt-4o-mini"), (0.15, 0.60));
        assert_eq!(price("gpt-4o"), (2.50, 10.00));
        assert_eq!(price("gpt-5"), (1.25, 10.00));
        assert_eq!(price("claude-sonnet-4-5"), (3.00, 15.00));
        assert_eq!(price("claude-opus-4-1"), (15.00, 75.00));
        assert_eq!(price("claude-haiku-4-5"), (1.00, 5.00));
        assert_eq!(price("gemini-2.5-flash"), (0.30, 2.50));
        assert_eq!(price("gemini-2.5-pro"), (1.25, 10.00));
        assert_eq!(price("mistral-small-latest"), (0.10, 0.30));
        assert_eq!(price("text-embedding-3-small"), (0.02, 0.0));

        let m = c.lookup("gpt-4o-mini").unwrap();
        assert_eq!(m.context_window, 128_000);
        assert_eq!(m.max_output, 16_384);
        assert_eq!(m.mode, Mode::Chat);
        assert_eq!(
            m.capabilities,
            Capabilities {
                tools: true,
                vision: true,
                json_schema: true,
                streaming: true
            }
        );
        assert_eq!(c.lookup("gpt-4.1").unwrap().context_window, 1_047_576);
        assert!(!c.lookup("o3-mini").unwrap().capabilities.vision);
        assert_eq!(c.lookup("mistral-embed").unwrap().mode, Mode::Embedding);
    }

    #[test]
    fn lookup_by_exact_name_and_alias() {
        let c = builtin();
        assert_eq!(c.lookup("gpt-4o").unwrap().name, "gpt-4o");
        assert_eq!(
            c.lookup("gpt-4o-mini-2024-07-18").unwrap().name,
            "gpt-4o-mini"
        );
        assert_eq!(
            c.lookup("claude-3-7-sonnet-latest").unwrap().name,
            "claude-3-7-sonnet"
        );
        assert_eq!(
            c.lookup("claude-sonnet-4-0").unwrap().name,
            "claude-sonnet-4"
        );
        assert_eq!(
            c.lookup("mistral-large-2512").unwrap().name,
            "mistral-large-latest"
        );
    }

    #[test]
    fn lookup_strips_dated_and_versioned_suffixes() {
        let c = builtin();
        let to = |n: &str| c.lookup(n).map(|m| m.name.as_str());
        // Snapshots not listed as aliases.
        assert_eq!(to("gpt-4o-2099-01-01"), Some("gpt-4o"));
        assert_eq!(to("gpt-4.1-mini-2026-02-03"), Some("gpt-4.1-mini"));
        assert_eq!(to("gpt-5.1-2025-11-13"), Some("gpt-5.1"));
        assert_eq!(to("o3-mini-2099-12-31"), Some("o3-mini"));
        assert_eq!(to("claude-sonnet-4-5-20250929"), Some("claude-sonnet-4-5"));
        assert_eq!(to("claude-opus-4-1-20991231"), Some("claude-opus-4-1"));
        assert_eq!(
            to("gemini-2.5-flash-preview-05-20"),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            to("gemini-2.5-flash-preview-09-2025"),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            to("gemini-2.5-flash-lite-preview-06-17"),
            Some("gemini-2.5-flash-lite")
        );
        assert_eq!(to("gemini-2.5-pro-exp-03-25"), Some("gemini-2.5-pro"));
        assert_eq!(to("gemini-2.0-flash-001"), Some("gemini-2.0-flash"));
        assert_eq!(to("gpt-3.5-turbo-1106"), Some("gpt-3.5-turbo"));
        // A listed snapshot wins over its base name.
        let old = c.lookup("gpt-4o-2024-05-13").unwrap();
        assert_eq!(old.name, "gpt-4o-2024-05-13");
        assert_eq!(old.input_per_mtok, 5.0);
    }

    #[test]
    fn lookup_strips_the_gemini_models_prefix() {
        let c = builtin();
        assert_eq!(
            c.lookup("models/gemini-2.5-pro").unwrap().name,
            "gemini-2.5-pro"
        );
        assert_eq!(
            c.lookup("models/gemini-2.5-flash-preview-05-20")
                .unwrap()
                .name,
            "gemini-2.5-flash"
        );
        assert_eq!(
            c.lookup("models/text-embedding-004").unwrap().name,
            "text-embedding-004"
        );
    }

    #[test]
    fn lookup_does_not_guess() {
        let c = builtin();
        for name in [
            "",
            "gpt-6",
            "llama-3.1-8b",
            "GPT-4O",
            "gpt-4o-",
            "o1-mini",
            "openai/gpt-4o",
            "gemini-2.5-flash-tts",
            "gemini-2.5-flash-image-preview",
            "mistral-large-2411",
            "claude-opus-4-9",
            "models/",
            "-2024",
            "2024-08-06",
        ] {
            assert!(c.lookup(name).is_none(), "{name:?} resolved");
        }
        // A single-digit segment is a version of the model, not a snapshot date.
        assert_eq!(c.lookup("claude-opus-4-1").unwrap().name, "claude-opus-4-1");
        assert_eq!(c.lookup("gpt-5.2").unwrap().name, "gpt-5.2");
    }

    #[test]
    fn duplicate_names_and_aliases_are_rejected() {
        let entry = |name: &str, aliases: &str| {
            format!(
                "[[model]]\nname = \"{name}\"\nfamily = \"openai\"\nmode = \"chat\"\n\
                 input_per_mtok = 1.0\noutput_per_mtok = 2.0\ncontext_window = 1000\n\
                 max_output = 100\ntools = true\nvision = false\njson_schema = true\n\
                 streaming = true\naliases = [{aliases}]\n"
            )
        };
        let ok = format!("{}{}", entry("a", "\"a-1\""), entry("b", ""));
        assert_eq!(Catalog::from_toml(&ok).unwrap().len(), 2);

        let twice = format!("{}{}", entry("a", ""), entry("a", ""));
        let err = Catalog::from_toml(&twice).unwrap_err();
        assert!(err.contains("duplicate") && err.contains("\"a\""), "{err}");

        let alias_clash = format!("{}{}", entry("a", "\"x\""), entry("b", "\"x\""));
        let err = Catalog::from_toml(&alias_clash).unwrap_err();
        assert!(err.contains("\"x\""), "{err}");

        let alias_is_a_name = format!("{}{}", entry("a", ""), entry("b", "\"a\""));
        assert!(Catalog::from_toml(&alias_is_a_name).is_err());
    }

    #[test]
    fn bad_embedded_data_is_rejected_with_the_entry_and_field() {
        let base = "[[model]]\nname = \"m\"\nfamily = \"openai\"\nmode = \"chat\"\n\
                    input_per_mtok = 1.0\noutput_per_mtok = 2.0\ncontext_window = 1000\n\
                    max_output = 100\ntools = true\nvision = false\njson_schema = true\n\
                    streaming = true\n";
        assert!(Catalog::from_toml(base).is_ok());
        let cases = [
            (
                "input_per_mtok = 1.0",
                "input_per_mtok = -1.0",
                "input_per_mtok",
            ),
            (
                "output_per_mtok = 2.0",
                "output_per_mtok = nan",
                "output_per_mtok",
            ),
            (
                "output_per_mtok = 2.0",
                "output_per_mtok = inf",
                "output_per_mtok",
            ),
            ("mode = \"chat\"", "mode = \"completion\"", "mode"),
            ("family = \"openai\"", "family = \"cohere\"", "family"),
            (
                "context_window = 1000",
                "context_window = 0",
                "context_window",
            ),
            ("max_output = 100", "max_output = 5000", "max_output"),
            ("tools = true", "tools = true\ncolour = 1", "colour"),
        ];
        for (from, to, field) in cases {
            let text = base.replace(from, to);
            let err = Catalog::from_toml(&text).unwrap_err();
            assert!(err.contains(field), "{to}: {err}");
            if field != "colour" {
                assert!(err.contains("\"m\""), "{to}: {err}");
            }
        }
    }

    #[test]
    fn override_changes_one_field_and_keeps_the_rest() {
        let mut c = builtin();
        let before = c.lookup("gpt-4o-mini").unwrap().clone();
        let n = c.len();
        c.apply(&[CatalogOverride {
            input_per_mtok: Some(0.10),
            ..ov("gpt-4o-mini")
        }])
        .unwrap();
        let after = c.lookup("gpt-4o-mini").unwrap();
        assert_eq!(after.input_per_mtok, 0.10);
        assert_eq!(
            ModelInfo {
                input_per_mtok: before.input_per_mtok,
                ..after.clone()
            },
            before
        );
        assert_eq!(c.len(), n);
        // The entry's aliases follow it.
        assert_eq!(
            c.lookup("gpt-4o-mini-2024-07-18").unwrap().input_per_mtok,
            0.10
        );
    }

    #[test]
    fn override_of_a_snapshot_name_touches_only_that_name() {
        let mut c = builtin();
        c.apply(&[CatalogOverride {
            output_per_mtok: Some(99.0),
            ..ov("claude-sonnet-4-5-20250929")
        }])
        .unwrap();
        let pinned = c.lookup("claude-sonnet-4-5-20250929").unwrap();
        assert_eq!(pinned.name, "claude-sonnet-4-5-20250929");
        assert_eq!(pinned.output_per_mtok, 99.0);
        assert_eq!(pinned.input_per_mtok, 3.0);
        assert_eq!(pinned.context_window, 200_000);
        assert_eq!(c.lookup("claude-sonnet-4-5").unwrap().output_per_mtok, 15.0);

        // A dated name only `lookup`'s suffix rule knew starts from its base too.
        c.apply(&[CatalogOverride {
            input_per_mtok: Some(2.0),
            ..ov("gpt-4o-2024-11-20")
        }])
        .unwrap();
        let m = c.lookup("gpt-4o-2024-11-20").unwrap();
        assert_eq!((m.input_per_mtok, m.output_per_mtok), (2.0, 10.0));
        assert_eq!(m.context_window, 128_000);
        assert_eq!(c.lookup("gpt-4o").unwrap().input_per_mtok, 2.5);
    }

    #[test]
    fn override_adds_a_local_model_priced_zero() {
        let mut c = builtin();
        let n = c.len();
        c.apply(&[
            CatalogOverride {
                context_window: Some(32_768),
                tools: Some(true),
                family: Some("local".to_string()),
                ..ov("qwen2.5-7b-instruct")
            },
            ov("bare"),
        ])
        .unwrap();
        assert_eq!(c.len(), n + 2);
        let m = c.lookup("qwen2.5-7b-instruct").unwrap();
        assert_eq!(
            m,
            &ModelInfo {
                name: "qwen2.5-7b-instruct".to_string(),
                family: "local".to_string(),
                mode: Mode::Chat,
                input_per_mtok: 0.0,
                output_per_mtok: 0.0,
                context_window: 32_768,
                max_output: 0,
                capabilities: Capabilities {
                    tools: true,
                    ..Capabilities::default()
                },
            }
        );
        let bare = c.lookup("bare").unwrap();
        assert_eq!(bare.family, "other");
        assert_eq!(bare.context_window, 0);
        assert_eq!(expected_cost(bare, 10_000, 10_000), 0.0);
    }

    #[test]
    fn override_can_add_an_embedding_model() {
        let mut c = builtin();
        c.apply(&[CatalogOverride {
            mode: Some("embedding".to_string()),
            input_per_mtok: Some(0.01),
            ..ov("bge-m3")
        }])
        .unwrap();
        let m = c.lookup("bge-m3").unwrap();
        assert_eq!(m.mode, Mode::Embedding);
        assert_eq!(m.input_per_mtok, 0.01);
    }

    #[test]
    fn bad_overrides_are_rejected_and_change_nothing() {
        let bad = [
            (
                CatalogOverride {
                    input_per_mtok: Some(-0.5),
                    ..ov("gpt-4o")
                },
                "input_per_mtok",
            ),
            (
                CatalogOverride {
                    output_per_mtok: Some(f64::NAN),
                    ..ov("local-a")
                },
                "output_per_mtok",
            ),
            (
                CatalogOverride {
                    output_per_mtok: Some(f64::INFINITY),
                    ..ov("local-a")
                },
                "output_per_mtok",
            ),
            (
                CatalogOverride {
                    mode: Some("completion".to_string()),
                    ..ov("local-b")
                },
                "mode",
            ),
            (
                CatalogOverride {
                    family: Some(String::new()),
                    ..ov("local-c")
                },
                "family",
            ),
            (ov(""), "name"),
        ];
        for (o, field) in bad {
            let mut c = builtin();
            let n = c.len();
            // A good override before the bad one must not stick either.
            let good = CatalogOverride {
                input_per_mtok: Some(7.0),
                ..ov("gpt-4o-mini")
            };
            let err = c.apply(&[good, o.clone()]).unwrap_err();
            assert!(err.contains(field), "{err}");
            assert!(err.contains(&format!("\"{}\"", o.name)) || o.name.is_empty());
            assert_eq!(c.len(), n);
            assert_eq!(c.lookup("gpt-4o-mini").unwrap().input_per_mtok, 0.15);
        }

        let mut c = builtin();
        let err = c.apply(&[ov("x"), ov("x")]).unwrap_err();
        assert!(err.contains("\"x\"") && err.contains("twice"), "{err}");
        assert!(c.lookup("x").is_none());
    }

    #[test]
    fn overrides_deserialize_from_config_toml() {
        #[derive(Deserialize)]
        struct Cfg {
            catalog: Vec<CatalogOverride>,
        }
        let cfg: Cfg = toml::from_str(
            "[[catalog]]\nname = \"gpt-4o\"\ninput_per_mtok = 2\n\n\
             [[catalog]]\nname = \"llama\"\ncontext_window = 8192\nvision = false\n",
        )
        .unwrap();
        let mut c = builtin();
        c.apply(&cfg.catalog).unwrap();
        assert_eq!(c.lookup("gpt-4o").unwrap().input_per_mtok, 2.0);
        assert_eq!(c.lookup("llama").unwrap().context_window, 8192);

        let unknown = toml::from_str::<Cfg>("[[catalog]]\nname = \"a\"\nprice = 1\n");
        assert!(unknown.is_err());
    }

    #[test]
    fn model_info_serializes_for_the_models_listing() {
        let c = builtin();
        let v = serde_json::to_value(c.lookup("text-embedding-3-large").unwrap()).unwrap();
        assert_eq!(v["mode"], "embedding");
        assert_eq!(v["family"], "openai");
        assert_eq!(v["input_per_mtok"], 0.13);
        assert_eq!(v["capabilities"]["streaming"], false);
    }

    #[test]
    fn expected_cost_arithmetic() {
        let c = builtin();
        let mini = c.lookup("gpt-4o-mini").unwrap();
        // 1M prompt tokens at $0.15 + 1M output tokens at $0.60.
        assert!((expected_cost(mini, 1_000_000, 1_000_000) - 0.75).abs() < 1e-12);
        // 2,000 prompt + 500 output: 0.0003 + 0.0003.
        assert!((expected_cost(mini, 2_000, 500) - 0.0006).abs() < 1e-12);
        assert_eq!(expected_cost(mini, 0, 0), 0.0);
        let opus = c.lookup("claude-opus-4-1").unwrap();
        // 10k at $15 + 1k at $75 = 0.15 + 0.075.
        assert!((expected_cost(opus, 10_000, 1_000) - 0.225).abs() < 1e-12);
        assert!(expected_cost(opus, 10_000, 1_000) > expected_cost(mini, 10_000, 1_000));
    }

    #[test]
    fn text_estimate_for_ascii() {
        assert_eq!(estimate_text_tokens(""), 0);
        assert_eq!(estimate_text_tokens("a"), 1);
        assert!((2..=4).contains(&estimate_text_tokens("hello world")));
        // ~100 English words: about 130 real tokens.
        let para = "The quick brown fox jumps over the lazy dog while the cat watches. ".repeat(8);
        let n = estimate_text_tokens(&para);
        assert!((100..=200).contains(&n), "{n}");
        // Linear in length.
        let long = "abcd".repeat(10_000);
        assert_eq!(estimate_text_tokens(&long), 10_000);
    }

    #[test]
    fn text_estimate_for_cjk_and_other_scripts() {
        // 11 characters; real tokenizers give roughly 8-14.
        let zh = "你好世界，今天天气很好";
        let n = estimate_text_tokens(zh);
        assert!((8..=16).contains(&n), "{n}");
        // Far more than bytes/4 or chars/4 would say.
        assert!(n > zh.chars().count() as u64 / 2);
        let ja = "こんにちは、世界";
        assert_eq!(estimate_text_tokens(ja), ja.chars().count() as u64);
        let ko = "안녕하세요";
        assert_eq!(estimate_text_tokens(ko), 5);
        // Cyrillic: about 2 characters a token.
        let ru = "Привет мир";
        let n = estimate_text_tokens(ru);
        assert!((4..=8).contains(&n), "{n}");
        assert_eq!(estimate_text_tokens("😀😀"), 2);
    }

    #[test]
    fn chat_estimate_counts_messages_with_overhead() {
        let req = request(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "hello world"}
            ]
        }));
        // Real count for gpt-4o: 18 tokens.
        let n = estimate_chat_tokens(&req);
        assert!((14..=26).contains(&n), "{n}");

        let empty = request(json!({"model": "m", "messages": []}));
        assert_eq!(estimate_chat_tokens(&empty), REPLY_OVERHEAD);
    }

    #[test]
    fn chat_estimate_counts_tools_and_images() {
        let plain = request(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this picture, and what is the weather there?"}
                ]}
            ]
        }));
        let with_image_and_tools = request(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this picture, and what is the weather there?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                ]}
            ],
            "tools": [{
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Get the current weather for a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "description": "City name"},
                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                        },
                        "required": ["city"]
                    }
                }
            }]
        }));
        let plain_n = estimate_chat_tokens(&plain);
        let n = estimate_chat_tokens(&with_image_and_tools);
        assert!((15..=40).contains(&plain_n), "{plain_n}");
        // Text (~20) + image (765) + tool (~60-90).
        assert!((800..=950).contains(&n), "{n}");
        let tool_part = n - plain_n - IMAGE_TOKENS;
        assert!((40..=120).contains(&tool_part), "{tool_part}");

        let low = request(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}
            ]}]
        }));
        assert_eq!(
            estimate_chat_tokens(&low),
            REPLY_OVERHEAD + MESSAGE_OVERHEAD + IMAGE_LOW_DETAIL_TOKENS
        );
    }

    #[test]
    fn chat_estimate_counts_tool_calls_and_response_schema() {
        let base = request(json!({
            "model": "m",
            "messages": [{"role": "user", "content": "weather in Paris?"}]
        }));
        let with_call = request(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
                }]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"}
            ],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"summary": {"type": "string"}}}
            }}
        }));
        let diff = estimate_chat_tokens(&with_call) - estimate_chat_tokens(&base);
        assert!((25..=70).contains(&diff), "{diff}");
    }
}
