//! OpenAI wire types: what clients send and what Airlock answers.
//!
//! These are the one canonical request and response shapes inside the gateway: every
//! provider adapter translates from and to them. Invariants:
//! - Fields a client sends that are not modelled here are kept in `extra` and only
//!   forwarded to OpenAI-compatible upstreams; the other adapters drop them.
//! - Optional fields are omitted when serializing, never sent as `null`, so upstreams
//!   that reject `null` for a parameter are not surprised.
//! - Polymorphic fields (`content`, `stop`, `input`, `prompt`, `tool_choice`) accept
//!   every form OpenAI accepts and say in their error which forms those are.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSequences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Fields Airlock does not model; forwarded only to OpenAI-compatible upstreams.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatCompletionRequest {
    /// The output cap the client asked for, whichever of the two names it used.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

/// One message of a conversation. A flat struct rather than an enum per role so that
/// errors name the exact field (`messages[2].content`); role-specific rules are checked
/// in validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// The message's text: the string content, or its text parts joined by newlines.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(c) => c.text(),
        }
    }
}

/// `content`: a plain string or an array of typed parts.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

impl Serialize for MessageContent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MessageContent::Text(t) => t.serialize(s),
            MessageContent::Parts(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(MessageContent::Text(s)),
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    serde_json::from_value(v)
                        .map_err(|e| D::Error::custom(format!("content part {i}: {e}")))
                })
                .collect::<Result<Vec<ContentPart>, _>>()
                .map(MessageContent::Parts),
            other => Err(D::Error::custom(format!(
                "expected a string or an array of content parts, got {}",
                json_kind(&other)
            ))),
        }
    }
}

/// One part of a multi-part message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    InputAudio {
        input_audio: InputAudio,
    },
    File {
        file: Value,
    },
    /// An assistant refusal part (assistant messages only).
    Refusal {
        refusal: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// An `https://` URL or a `data:<mime>;base64,<data>` URL.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ImageUrl {
    /// Splits a `data:` URL into (media type, base64 payload).
    pub fn as_data_url(&self) -> Option<(&str, &str)> {
        let rest = self.url.strip_prefix("data:")?;
        let (meta, data) = rest.split_once(',')?;
        let media = meta.strip_suffix(";base64")?;
        Some((media, data))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputAudio {
    pub data: String,
    pub format: String,
}

/// `stop`: one string or a list of up to four.
#[derive(Debug, Clone, PartialEq)]
pub struct StopSequences(pub Vec<String>);

impl Serialize for StopSequences {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StopSequences {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(StopSequences(vec![s])),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "expected a string in the stop list, got {}",
                        json_kind(&other)
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(StopSequences),
            other => Err(D::Error::custom(format!(
                "expected a string or an array of strings, got {}",
                json_kind(&other)
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolKind {
    Function,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none" | "auto" | "required"` or `{"type":"function","function":{"name":..}}`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

impl Serialize for ToolChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ToolChoice::None => s.serialize_str("none"),
            ToolChoice::Auto => s.serialize_str("auto"),
            ToolChoice::Required => s.serialize_str("required"),
            ToolChoice::Function(name) => serde_json::json!({
                "type": "function",
                "function": {"name": name}
            })
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match &v {
            Value::String(s) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                other => Err(D::Error::custom(format!(
                    "expected one of \"none\", \"auto\", \"required\" or a function object, got \"{other}\""
                ))),
            },
            Value::Object(o) => o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(|n| ToolChoice::Function(n.to_string()))
                .ok_or_else(|| {
                    D::Error::custom(
                        "expected {\"type\":\"function\",\"function\":{\"name\":\"...\"}}",
                    )
                }),
            other => Err(D::Error::custom(format!(
                "expected a string or an object, got {}",
                json_kind(other)
            ))),
        }
    }
}

/// `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A tool call made by the assistant (in responses, and in assistant messages sent back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON-encoded arguments, as OpenAI sends them.
    pub arguments: String,
}

/// Token usage. Extra detail fields (`prompt_tokens_details`...) pass through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            extra: Map::new(),
        }
    }
}

/// `chat.completion` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    #[serde(default = "chat_completion_object")]
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn chat_completion_object() -> String {
    "chat.completion".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ResponseMessage,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResponseMessage {
    #[serde(default = "assistant_role")]
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn assistant_role() -> String {
    "assistant".to_string()
}

/// `chat.completion.chunk`: one streamed event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[serde(default = "chunk_object")]
    pub object: String,
    pub created: i64,
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn chunk_object() -> String {
    "chat.completion.chunk".to_string()
}

impl ChatCompletionChunk {
    /// A chunk with no choices, as adapters build them before filling a delta.
    pub fn new(id: &str, created: i64, model: &str) -> Self {
        ChatCompletionChunk {
            id: id.to_string(),
            object: chunk_object(),
            created,
            model: model.to_string(),
            choices: Vec::new(),
            usage: None,
            system_fingerprint: None,
            extra: Map::new(),
        }
    }

    /// A chunk carrying one delta for choice `index`.
    pub fn with_delta(mut self, index: u32, delta: Delta, finish_reason: Option<String>) -> Self {
        self.choices.push(ChunkChoice {
            index,
            delta,
            finish_reason,
            logprobs: None,
        });
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkChoice {
    pub index: u32,
    #[serde(default)]
    pub delta: Delta,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ToolKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// `POST /v1/completions` body (legacy text completions).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSequences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CompletionRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of those.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl Serialize for Prompt {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Prompt::Text(t) => t.serialize(s),
            Prompt::Texts(t) => t.serialize(s),
            Prompt::Tokens(t) => t.serialize(s),
            Prompt::TokenLists(t) => t.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        text_or_tokens(v)
            .map(|t| match t {
                TextOrTokens::Text(s) => Prompt::Text(s),
                TextOrTokens::Texts(s) => Prompt::Texts(s),
                TextOrTokens::Tokens(s) => Prompt::Tokens(s),
                TextOrTokens::TokenLists(s) => Prompt::TokenLists(s),
            })
            .map_err(D::Error::custom)
    }
}

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// `input` of an embeddings request, same forms as `prompt`.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// The inputs as texts, when they are texts.
    pub fn texts(&self) -> Option<Vec<&str>> {
        match self {
            EmbeddingInput::Text(t) => Some(vec![t.as_str()]),
            EmbeddingInput::Texts(t) => Some(t.iter().map(String::as_str).collect()),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Text(_) | EmbeddingInput::Tokens(_) => 1,
            EmbeddingInput::Texts(t) => t.len(),
            EmbeddingInput::TokenLists(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Serialize for EmbeddingInput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EmbeddingInput::Text(t) => t.serialize(s),
            EmbeddingInput::Texts(t) => t.serialize(s),
            EmbeddingInput::Tokens(t) => t.serialize(s),
            EmbeddingInput::TokenLists(t) => t.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for EmbeddingInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        text_or_tokens(v)
            .map(|t| match t {
                TextOrTokens::Text(s) => EmbeddingInput::Text(s),
                TextOrTokens::Texts(s) => EmbeddingInput::Texts(s),
                TextOrTokens::Tokens(s) => EmbeddingInput::Tokens(s),
                TextOrTokens::TokenLists(s) => EmbeddingInput::TokenLists(s),
            })
            .map_err(D::Error::custom)
    }
}

enum TextOrTokens {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

const TEXT_OR_TOKENS: &str =
    "expected a string, an array of strings, an array of token ids or an array of token id arrays";

fn text_or_tokens(v: Value) -> Result<TextOrTokens, String> {
    match v {
        Value::String(s) => Ok(TextOrTokens::Text(s)),
        Value::Array(items) => {
            if items.iter().all(Value::is_string) {
                Ok(TextOrTokens::Texts(
                    items
                        .into_iter()
                        .filter_map(|v| match v {
                            Value::String(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                ))
            } else if items.iter().all(Value::is_number) {
                token_ids(&items).map(TextOrTokens::Tokens)
            } else if items.iter().all(Value::is_array) {
                items
                    .iter()
                    .map(|v| token_ids(v.as_array().map(Vec::as_slice).unwrap_or(&[])))
                    .collect::<Result<Vec<_>, _>>()
                    .map(TextOrTokens::TokenLists)
            } else {
                Err(TEXT_OR_TOKENS.to_string())
            }
        }
        other => Err(format!("{TEXT_OR_TOKENS}, got {}", json_kind(&other))),
    }
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, String> {
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("token ids must be non-negative integers, got {v}"))
        })
        .collect()
}

/// `text_completion` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    #[serde(default = "text_completion_object")]
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn text_completion_object() -> String {
    "text_completion".to_string()
}

impl CompletionResponse {
    pub fn object() -> String {
        text_completion_object()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// Embeddings response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    #[serde(default = "list_object")]
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    #[serde(default)]
    pub usage: EmbeddingUsage,
}

fn list_object() -> String {
    "list".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Embedding {
    #[serde(default = "embedding_object")]
    pub object: String,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

impl Embedding {
    pub fn new(index: u32, vector: Vec<f32>) -> Self {
        Embedding {
            object: embedding_object(),
            index,
            embedding: EmbeddingVector::Float(vector),
        }
    }
}

fn embedding_object() -> String {
    "embedding".to_string()
}

/// An embedding as floats, or as base64 of little-endian f32 (`encoding_format=base64`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

impl EmbeddingVector {
    /// Converts to the encoding the client asked for.
    pub fn into_format(self, format: EncodingFormat) -> Result<EmbeddingVector, String> {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::STANDARD;
        match (self, format) {
            (EmbeddingVector::Float(v), EncodingFormat::Base64) => {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Ok(EmbeddingVector::Base64(engine.encode(bytes)))
            }
            (EmbeddingVector::Base64(s), EncodingFormat::Float) => {
                let bytes = engine
                    .decode(s.as_bytes())
                    .map_err(|e| format!("upstream sent an embedding that is not base64: {e}"))?;
                if bytes.len() % 4 != 0 {
                    return Err("upstream base64 embedding is not a whole number of f32".into());
                }
                Ok(EmbeddingVector::Float(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
            (v, _) => Ok(v),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The JSON kind of a value, for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_accepts_string_and_parts() {
        let m: ChatMessage = serde_json::from_value(json!({
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
            ]
        }))
        .unwrap();
        let Some(MessageContent::Parts(parts)) = &m.content else {
            panic!("parts expected")
        };
        assert_eq!(parts.len(), 2);
        let ContentPart::ImageUrl { image_url } = &parts[1] else {
            panic!("image expected")
        };
        assert_eq!(image_url.as_data_url(), Some(("image/png", "AAAA")));
        assert_eq!(m.text(), "what is this?");
        let m: ChatMessage =
            serde_json::from_value(json!({"role": "system", "content": "be brief"})).unwrap();
        assert_eq!(m.content, Some(MessageContent::Text("be brief".into())));
    }

    #[test]
    fn content_rejects_numbers_with_a_clear_message() {
        let err = serde_json::from_value::<ChatMessage>(json!({"role": "user", "content": 5}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected a string or an array of content parts"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_kept_and_reserialized() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "reasoning_effort": "low"
        }))
        .unwrap();
        assert_eq!(req.extra.get("reasoning_effort"), Some(&json!("low")));
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["reasoning_effort"], "low");
        assert!(
            back.get("temperature").is_none(),
            "absent options are omitted"
        );
    }

    #[test]
    fn stop_and_tool_choice_forms() {
        let s: StopSequences = serde_json::from_value(json!("END")).unwrap();
        assert_eq!(s.0, vec!["END"]);
        let s: StopSequences = serde_json::from_value(json!(["a", "b"])).unwrap();
        assert_eq!(s.0, vec!["a", "b"]);
        assert!(serde_json::from_value::<StopSequences>(json!([1])).is_err());
        let t: ToolChoice = serde_json::from_value(json!("required")).unwrap();
        assert_eq!(t, ToolChoice::Required);
        let t: ToolChoice =
            serde_json::from_value(json!({"type": "function", "function": {"name": "f"}})).unwrap();
        assert_eq!(t, ToolChoice::Function("f".into()));
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert!(serde_json::from_value::<ToolChoice>(json!("sometimes")).is_err());
    }

    #[test]
    fn embedding_input_forms() {
        let i: EmbeddingInput = serde_json::from_value(json!(["a", "b"])).unwrap();
        assert_eq!(i.texts(), Some(vec!["a", "b"]));
        let i: EmbeddingInput = serde_json::from_value(json!([1, 2, 3])).unwrap();
        assert_eq!(i, EmbeddingInput::Tokens(vec![1, 2, 3]));
        let i: EmbeddingInput = serde_json::from_value(json!([[1], [2, 3]])).unwrap();
        assert_eq!(i.len(), 2);
        assert!(serde_json::from_value::<EmbeddingInput>(json!(["a", 1])).is_err());
        assert!(serde_json::from_value::<EmbeddingInput>(json!([-1])).is_err());
    }

    #[test]
    fn base64_embeddings_round_trip() {
        let v = EmbeddingVector::Float(vec![0.5, -1.25, 3.0]);
        let b = v.clone().into_format(EncodingFormat::Base64).unwrap();
        assert!(matches!(b, EmbeddingVector::Base64(_)));
        assert_eq!(b.into_format(EncodingFormat::Float).unwrap(), v);
    }
}
