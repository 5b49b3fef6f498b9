//! Anthropic adapter: OpenAI chat requests to `POST {base_url}/messages` and back.
//!
//! Owns Anthropic's private wire shapes, the request translation ([`translate_request`]),
//! the response translation ([`translate_response`]) and the streamed-event state
//! machine ([`StreamState`]). Invariants:
//! - Only what Anthropic models is sent: seed, logprobs, penalties, logit_bias and the
//!   client's unmodelled `extra` fields are dropped; `n > 1` and unparseable tool-call
//!   arguments are refused before anything is sent.
//! - Roles alternate on the wire: system/developer text goes to top-level `system`,
//!   tool results become `tool_result` blocks of a user turn, and consecutive turns of
//!   one role are merged. `max_tokens` is always sent (Anthropic requires it).
//! - `response_format: json_schema` becomes one forced tool named after the schema; its
//!   call comes back as the assistant's JSON `content` with finish_reason `stop`, in
//!   plain and streamed answers alike.
//! - A stream ends cleanly only after `message_stop` (preceded by one usage chunk);
//!   otherwise its last item is an error (the provider's `error` event, or
//!   `StreamInterrupted`). All chunks share one id and `created`; the first carries
//!   `role: assistant`.

use std::collections::HashMap;

use eventsource_stream::Event;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::http::UpstreamSettings;
use super::{
    unsupported, Capabilities, ChunkStream, CompletionStream, ProviderApi, UpstreamError,
    UpstreamErrorKind,
};
use crate::api::types::{
    unix_now, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatMessage, CompletionRequest, CompletionResponse, ContentPart, Delta, EmbeddingRequest,
    EmbeddingResponse, FunctionCall, FunctionCallDelta, ImageUrl, MessageContent, ResponseFormat,
    ResponseMessage, Role, ToolCall, ToolCallDelta, ToolChoice, ToolKind, Usage,
};

/// `anthropic-version` sent when the provider's headers do not set one.
const DEFAULT_API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the client sets no output cap (Anthropic requires one).
const DEFAULT_MAX_TOKENS: u32 = 4096;
/// Appended to `system` for `response_format: json_object`.
const JSON_OBJECT_INSTRUCTION: &str =
    "Respond only with a single valid JSON object, with no text before or after it.";

// ---------------------------------------------------------------------------------------
// Wire types: request
// ---------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct MessagesRequest {
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Debug, Serialize)]
struct Metadata {
    user_id: String,
}

#[derive(Debug, Serialize)]
struct WireMessage {
    role: WireRole,
    content: Vec<Block>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum WireRole {
    User,
    Assistant,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {
        source: Source,
    },
    Document {
        source: Source,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<ToolResultContent>,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Source {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ToolResultContent {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Serialize)]
struct WireTool {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    input_schema: Value,
}

/// `{"type": "auto" | "any" | "tool" | "none", "name"?, "disable_parallel_tool_use"?}`.
#[derive(Debug, Serialize)]
struct WireToolChoice {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

// ---------------------------------------------------------------------------------------
// Wire types: response and stream events
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct MessagesResponse {
    id: String,
    model: String,
    #[serde(default)]
    content: Vec<RespBlock>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

/// A content block in a response or a `content_block_start`; unknown kinds (thinking,
/// server tools...) are kept as `Other` and ignored.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RespBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Prompt tokens as OpenAI counts them (cached ones included), when reported.
    fn prompt_tokens(&self) -> Option<u64> {
        let input = self.input_tokens?;
        Some(
            input
                + self.cache_creation_input_tokens.unwrap_or(0)
                + self.cache_read_input_tokens.unwrap_or(0),
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u64,
        content_block: RespBlock,
    },
    ContentBlockDelta {
        index: u64,
        delta: BlockDelta,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error {
        error: WireError,
    },
    /// `ping`, `content_block_stop`, and event types added after this adapter.
    #[serde(other)]
    Ignored,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDeltaBody {
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

// ---------------------------------------------------------------------------------------
// Request translation
// ---------------------------------------------------------------------------------------

/// A translated request, and the forced tool standing for `json_schema`, if any.
#[derive(Debug)]
struct Translated {
    body: MessagesRequest,
    json_tool: Option<String>,
}

fn bad_request(provider: &str, message: String) -> UpstreamError {
    UpstreamError::new(UpstreamErrorKind::BadRequest, provider, message)
}

fn translate_request(
    req: &ChatCompletionRequest,
    model: &str,
    stream: bool,
    provider: &str,
) -> Result<Translated, UpstreamError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(bad_request(
            provider,
            "n > 1 is not supported by Anthropic".into(),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<WireMessage> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let (role, blocks) = match m.role {
            Role::System | Role::Developer => {
                let text = m.text();
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            Role::User => (WireRole::User, content_blocks(m, i, provider)?),
            Role::Assistant => {
                let mut blocks = content_blocks(m, i, provider)?;
                for call in m.tool_calls.iter().flatten() {
                    blocks.push(tool_use_block(call, i, provider)?);
                }
                (WireRole::Assistant, blocks)
            }
            Role::Tool => (WireRole::User, vec![tool_result_block(m, i, provider)?]),
            Role::Function => {
                return Err(bad_request(
                    provider,
                    format!("messages[{i}]: role `function` is not supported by Anthropic; use `tool` messages"),
                ))
            }
        };
        if blocks.is_empty() {
            continue; // Anthropic rejects empty turns; an empty message says nothing.
        }
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(WireMessage {
                role,
                content: blocks,
            }),
        }
    }

    let mut tools: Vec<WireTool> = req
        .tools
        .iter()
        .flatten()
        .map(|t| WireTool {
            name: t.function.name.clone(),
            description: t.function.description.clone(),
            input_schema: t.function.parameters.clone().unwrap_or_else(empty_schema),
        })
        .collect();

    let mut json_tool = None;
    match &req.response_format {
        Some(ResponseFormat::JsonObject) => system.push(JSON_OBJECT_INSTRUCTION.to_string()),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            tools.push(WireTool {
                name: json_schema.name.clone(),
                description: Some(json_schema.description.clone().unwrap_or_else(|| {
                    "Respond with a JSON object that matches this schema.".to_string()
                })),
                input_schema: json_schema.schema.clone().unwrap_or_else(empty_schema),
            });
            json_tool = Some(json_schema.name.clone());
        }
        Some(ResponseFormat::Text) | None => {}
    }

    let disable = (req.parallel_tool_calls == Some(false)).then_some(true);
    let choice = |kind, name, disable_parallel_tool_use| {
        Some(WireToolChoice {
            kind,
            name,
            disable_parallel_tool_use,
        })
    };
    let tool_choice = match (&json_tool, &req.tool_choice) {
        _ if tools.is_empty() => None, // Anthropic refuses `tool_choice` without `tools`.
        (Some(name), _) => choice("tool", Some(name.clone()), None),
        (None, None) => disable.and_then(|_| choice("auto", None, disable)),
        (None, Some(ToolChoice::Auto)) => choice("auto", None, disable),
        (None, Some(ToolChoice::Required)) => choice("any", None, disable),
        (None, Some(ToolChoice::Function(f))) => choice("tool", Some(f.clone()), disable),
        (None, Some(ToolChoice::None)) => choice("none", None, None),
    };

    let body = MessagesRequest {
        model: model.to_string(),
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        max_tokens: req.max_output_tokens().unwrap_or(DEFAULT_MAX_TOKENS),
        temperature: req.temperature.map(|t| t.clamp(0.0, 1.0)),
        top_p: req.top_p,
        stop_sequences: req.stop.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
        metadata: req.user.as_ref().map(|u| Metadata { user_id: u.clone() }),
        tools,
        tool_choice,
        stream,
    };
    Ok(Translated { body, json_tool })
}

fn empty_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

/// The content of a user or assistant message as Anthropic blocks (empty text dropped).
fn content_blocks(m: &ChatMessage, i: usize, provider: &str) -> Result<Vec<Block>, UpstreamError> {
    match &m.content {
        None => Ok(Vec::new()),
        Some(MessageContent::Text(t)) if t.is_empty() => Ok(Vec::new()),
        Some(MessageContent::Text(t)) => Ok(vec![Block::Text { text: t.clone() }]),
        Some(MessageContent::Parts(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                match part {
                    ContentPart::Text { text } | ContentPart::Refusal { refusal: text } => {
                        if !text.is_empty() {
                            out.push(Block::Text { text: text.clone() });
                        }
                    }
                    ContentPart::ImageUrl { image_url } => {
                        out.push(image_block(image_url, i, provider)?)
                    }
                    ContentPart::File { file } => out.push(document_block(file, i, provider)?),
                    ContentPart::InputAudio { .. } => {
                        return Err(bad_request(
                            provider,
                            format!("messages[{i}]: audio input is not supported by Anthropic"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

fn image_block(image: &ImageUrl, i: usize, provider: &str) -> Result<Block, UpstreamError> {
    if let Some((media_type, data)) = image.as_data_url() {
        let source = Source::Base64 {
            media_type: media_type.to_string(),
            data: data.to_string(),
        };
        return Ok(Block::Image { source });
    }
    if image.url.starts_with("https://") || image.url.starts_with("http://") {
        return Ok(Block::Image {
            source: Source::Url {
                url: image.url.clone(),
            },
        });
    }
    Err(bad_request(
        provider,
        format!("messages[{i}]: image_url must be an http(s) URL or a base64 data: URL"),
    ))
}

/// An OpenAI `file` part carrying inline `file_data` (a base64 data URL) as a document.
fn document_block(file: &Value, i: usize, provider: &str) -> Result<Block, UpstreamError> {
    let parsed = file["file_data"].as_str().and_then(|url| {
        let (meta, data) = url.strip_prefix("data:")?.split_once(',')?;
        Some((meta.strip_suffix(";base64")?, data))
    });
    match parsed {
        Some((media_type, data)) => Ok(Block::Document {
            source: Source::Base64 { media_type: media_type.to_string(), data: data.to_string() },
        }),
        None => Err(bad_request(
            provider,
            format!("messages[{i}]: file parts need inline `file_data` as a base64 data: URL (file ids are not supported by Anthropic)"),
        )),
    }
}

fn tool_use_block(call: &ToolCall, i: usize, provider: &str) -> Result<Block, UpstreamError> {
    let args = call.function.arguments.trim();
    let input = if args.is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str::<Value>(args).map_err(|e| {
            bad_request(
                provider,
                format!(
                    "messages[{i}]: arguments of tool call `{}` ({}) are not valid JSON: {e}",
                    call.id, call.function.name
                ),
            )
        })?
    };
    if !input.is_object() {
        return Err(bad_request(
            provider,
            format!(
                "messages[{i}]: arguments of tool call `{}` ({}) must be a JSON object",
                call.id, call.function.name
            ),
        ));
    }
    Ok(Block::ToolUse {
        id: call.id.clone(),
        name: call.function.name.clone(),
        input,
    })
}

fn tool_result_block(m: &ChatMessage, i: usize, provider: &str) -> Result<Block, UpstreamError> {
    let Some(id) = &m.tool_call_id else {
        return Err(bad_request(
            provider,
            format!("messages[{i}]: tool message without `tool_call_id`"),
        ));
    };
    let content = match &m.content {
        Some(MessageContent::Text(t)) if !t.is_empty() => Some(ToolResultContent::Text(t.clone())),
        Some(MessageContent::Parts(_)) => {
            let blocks = content_blocks(m, i, provider)?;
            (!blocks.is_empty()).then_some(ToolResultContent::Blocks(blocks))
        }
        _ => None,
    };
    Ok(Block::ToolResult {
        tool_use_id: id.clone(),
        content,
    })
}

// ---------------------------------------------------------------------------------------
// Response translation
// ---------------------------------------------------------------------------------------

fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop", // end_turn, stop_sequence, pause_turn, and anything newer
    }
}

fn usage(prompt: u64, completion: u64, cached: u64) -> Usage {
    let mut u = Usage::new(prompt, completion);
    if cached > 0 {
        u.extra.insert(
            "prompt_tokens_details".into(),
            json!({"cached_tokens": cached}),
        );
    }
    u
}

fn translate_response(resp: MessagesResponse, json_tool: Option<&str>) -> ChatCompletionResponse {
    let mut texts: Vec<String> = Vec::new();
    let mut tool_calls: Vec<ToolCall> = Vec::new();
    let mut json_answer: Option<String> = None;
    for block in resp.content {
        match block {
            RespBlock::Text { text } => texts.push(text),
            RespBlock::ToolUse { name, input, .. } if Some(name.as_str()) == json_tool => {
                json_answer = Some(input.to_string());
            }
            RespBlock::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                kind: ToolKind::Function,
                function: FunctionCall {
                    name,
                    arguments: input.to_string(),
                },
            }),
            RespBlock::Other => {}
        }
    }
    // The forced json_schema tool's call is the answer, not a tool call.
    let json_done = json_answer.is_some() && tool_calls.is_empty();
    let finish = resp.stop_reason.as_deref().map(|r| {
        if json_done && r == "tool_use" {
            "stop"
        } else {
            finish_reason(r)
        }
    });
    let content = json_answer.or_else(|| (!texts.is_empty()).then(|| texts.concat()));
    let u = &resp.usage;
    ChatCompletionResponse {
        id: resp.id,
        object: "chat.completion".to_string(),
        created: unix_now(),
        model: resp.model,
        choices: vec![ChatChoice {
            index: 0,
            message: ResponseMessage {
                role: "assistant".to_string(),
                content,
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                refusal: None,
                extra: Map::new(),
            },
            finish_reason: finish.map(str::to_string),
            logprobs: None,
        }],
        usage: Some(usage(
            u.prompt_tokens().unwrap_or(0),
            u.output_tokens.unwrap_or(0),
            u.cache_read_input_tokens.unwrap_or(0),
        )),
        system_fingerprint: None,
        extra: Map::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Stream translation
// ---------------------------------------------------------------------------------------

/// What a content block of the stream becomes.
#[derive(Debug, Clone, Copy)]
enum BlockKind {
    Text,
    /// A tool call, with its ordinal among the stream's tool calls.
    Tool(u32),
    /// The forced `json_schema` tool: its input streams as content.
    JsonContent,
    Ignored,
}

/// The translation state of one Anthropic stream. Pure: fed one event at a time.
#[derive(Debug)]
struct StreamState {
    provider: String,
    id: String,
    model: String,
    created: i64,
    json_tool: Option<String>,
    role_sent: bool,
    blocks: HashMap<u64, BlockKind>,
    tool_calls: u32,
    json_seen: bool,
    prompt_tokens: Option<u64>,
    cached_tokens: u64,
    output_tokens: u64,
    /// `message_stop` or an `error` event was seen: nothing more is read.
    done: bool,
}

type Item = Result<ChatCompletionChunk, UpstreamError>;

impl StreamState {
    fn new(provider: &str, model: &str, json_tool: Option<String>) -> Self {
        StreamState {
            provider: provider.to_string(),
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            model: model.to_string(),
            created: unix_now(),
            json_tool,
            role_sent: false,
            blocks: HashMap::new(),
            tool_calls: 0,
            json_seen: false,
            prompt_tokens: None,
            cached_tokens: 0,
            output_tokens: 0,
            done: false,
        }
    }

    /// A chunk with one delta; the first chunk of the stream carries the role.
    fn chunk(&mut self, mut delta: Delta, finish: Option<String>) -> Item {
        if !self.role_sent {
            delta.role = Some("assistant".to_string());
            self.role_sent = true;
        }
        Ok(
            ChatCompletionChunk::new(&self.id, self.created, &self.model)
                .with_delta(0, delta, finish),
        )
    }

    fn content(&mut self, text: String) -> Item {
        self.chunk(
            Delta {
                content: Some(text),
                ..Delta::default()
            },
            None,
        )
    }

    fn tool_delta(&mut self, d: ToolCallDelta) -> Item {
        self.chunk(
            Delta {
                tool_calls: Some(vec![d]),
                ..Delta::default()
            },
            None,
        )
    }

    fn fail(&mut self, kind: UpstreamErrorKind, message: String) -> Vec<Item> {
        self.done = true;
        vec![Err(UpstreamError::new(kind, &self.provider, message))]
    }

    fn take_usage(&mut self, u: &WireUsage) {
        if let Some(p) = u.prompt_tokens() {
            self.prompt_tokens = Some(p);
            self.cached_tokens = u.cache_read_input_tokens.unwrap_or(0);
        }
        if let Some(o) = u.output_tokens {
            self.output_tokens = o;
        }
    }

    /// Translates one SSE event. `event` is the SSE event name, used only when the data
    /// carries no `type` of its own.
    fn translate_event(&mut self, event: &str, data: &str) -> Vec<Item> {
        let data = data.trim();
        if data.is_empty() {
            return Vec::new();
        }
        // Anthropic's events name their own `type`: parsed once, straight into the
        // event. Only one that does not parse so is looked at as JSON, with the SSE
        // event name as its type where it has none.
        let ev = match serde_json::from_str::<StreamEvent>(data) {
            Ok(ev) => ev,
            Err(_) => match self.parse_untyped(event, data) {
                Ok(ev) => ev,
                Err(failed) => return failed,
            },
        };
        self.apply(ev)
    }

    /// The slow path of [`StreamState::translate_event`]: `data` as JSON, its `type`
    /// taken from the SSE `event` name when missing; a failure ends the stream.
    fn parse_untyped(&mut self, event: &str, data: &str) -> Result<StreamEvent, Vec<Item>> {
        let mut value: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                return Err(self.fail(
                    UpstreamErrorKind::InvalidResponse,
                    format!("stream event is not JSON: {e}"),
                ))
            }
        };
        if let Some(obj) = value.as_object_mut() {
            obj.entry("type")
                .or_insert_with(|| Value::String(event.to_string()));
        }
        serde_json::from_value(value).map_err(|e| {
            self.fail(
                UpstreamErrorKind::InvalidResponse,
                format!("unparseable `{event}` event: {e}"),
            )
        })
    }

    /// What one parsed event becomes.
    fn apply(&mut self, ev: StreamEvent) -> Vec<Item> {
        match ev {
            StreamEvent::MessageStart { message } => {
                if !self.role_sent {
                    if let Some(id) = message.id {
                        self.id = id;
                    }
                    if let Some(model) = message.model {
                        self.model = model;
                    }
                }
                self.take_usage(&message.usage);
                vec![self.content(String::new())]
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                RespBlock::Text { text } => {
                    self.blocks.insert(index, BlockKind::Text);
                    if text.is_empty() {
                        Vec::new()
                    } else {
                        vec![self.content(text)]
                    }
                }
                RespBlock::ToolUse { name, .. } if Some(&name) == self.json_tool.as_ref() => {
                    self.json_seen = true;
                    self.blocks.insert(index, BlockKind::JsonContent);
                    Vec::new()
                }
                RespBlock::ToolUse { id, name, .. } => {
                    let ordinal = self.tool_calls;
                    self.tool_calls += 1;
                    self.blocks.insert(index, BlockKind::Tool(ordinal));
                    vec![self.tool_delta(ToolCallDelta {
                        index: ordinal,
                        id: Some(id),
                        kind: Some(ToolKind::Function),
                        function: Some(FunctionCallDelta {
                            name: Some(name),
                            arguments: Some(String::new()),
                        }),
                    })]
                }
                RespBlock::Other => {
                    self.blocks.insert(index, BlockKind::Ignored);
                    Vec::new()
                }
            },
            StreamEvent::ContentBlockDelta { index, delta } => {
                let kind = self.blocks.get(&index).copied().unwrap_or(BlockKind::Text);
                match (kind, delta) {
                    (BlockKind::Text, BlockDelta::TextDelta { text }) => vec![self.content(text)],
                    (BlockKind::JsonContent, BlockDelta::InputJsonDelta { partial_json })
                        if !partial_json.is_empty() =>
                    {
                        vec![self.content(partial_json)]
                    }
                    (BlockKind::Tool(ordinal), BlockDelta::InputJsonDelta { partial_json })
                        if !partial_json.is_empty() =>
                    {
                        vec![self.tool_delta(ToolCallDelta {
                            index: ordinal,
                            function: Some(FunctionCallDelta {
                                name: None,
                                arguments: Some(partial_json),
                            }),
                            ..ToolCallDelta::default()
                        })]
                    }
                    _ => Vec::new(), // thinking, signature, citations, empty json pieces
                }
            }
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(u) = &usage {
                    self.take_usage(u);
                }
                match delta.stop_reason.as_deref() {
                    Some(reason) => {
                        let json_done = self.json_seen && self.tool_calls == 0;
                        let finish = if json_done && reason == "tool_use" {
                            "stop"
                        } else {
                            finish_reason(reason)
                        };
                        vec![self.chunk(Delta::default(), Some(finish.to_string()))]
                    }
                    None => Vec::new(),
                }
            }
            StreamEvent::MessageStop => {
                self.done = true;
                match self.prompt_tokens {
                    Some(prompt) => {
                        let mut c = ChatCompletionChunk::new(&self.id, self.created, &self.model);
                        c.usage = Some(usage(prompt, self.output_tokens, self.cached_tokens));
                        vec![Ok(c)]
                    }
                    None => Vec::new(),
                }
            }
            StreamEvent::Error { error } => {
                let kind = if error.kind == "overloaded_error" {
                    UpstreamErrorKind::Server
                } else {
                    UpstreamErrorKind::StreamError
                };
                let message = if error.message.is_empty() {
                    error.kind
                } else {
                    error.message
                };
                self.fail(kind, message)
            }
            StreamEvent::Ignored => Vec::new(),
        }
    }
}

/// One Anthropic stream's translation, fed one SSE event at a time: the pure part of
/// the provider's stream loop, public for the SSE benchmarks (`benches/benches/parse.rs`).
#[derive(Debug)]
pub struct StreamTranslator(StreamState);

impl StreamTranslator {
    /// A stream from `provider` for `model` (no forced `json_schema` tool).
    pub fn new(provider: &str, model: &str) -> Self {
        StreamTranslator(StreamState::new(provider, model, None))
    }

    /// The chunks one event (`event:` name and `data:` payload) becomes.
    pub fn event(&mut self, event: &str, data: &str) -> Vec<Item> {
        self.0.translate_event(event, data)
    }
}

/// Runs decoded SSE events through a [`StreamState`], ending with an error unless the
/// provider's `message_stop` arrived.
fn translate_stream(
    mut events: BoxStream<'static, Result<Event, UpstreamError>>,
    mut state: StreamState,
) -> ChunkStream {
    async_stream::stream! {
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => { yield Err(e); return; }
            };
            for item in state.translate_event(&ev.event, &ev.data) {
                yield item;
            }
            if state.done {
                return;
            }
        }
        yield Err(UpstreamError::new(
            UpstreamErrorKind::StreamInterrupted,
            &state.provider,
            "stream ended without message_stop",
        ));
    }
    .boxed()
}

// ---------------------------------------------------------------------------------------
// The provider
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    up: UpstreamSettings,
}

impl AnthropicProvider {
    pub fn new(up: UpstreamSettings) -> Self {
        AnthropicProvider { up }
    }

    /// `POST /messages` with the key and version headers. A configured
    /// `anthropic-version` header (already in `up.headers`) wins over the default.
    fn request(&self, body: &MessagesRequest) -> super::http::RequestBuilder {
        let mut rb = self.up.post(self.up.url("/messages")).json(body);
        if let Some(key) = &self.up.api_key {
            rb = rb.header("x-api-key", key);
        }
        if !self.up.headers.contains_key("anthropic-version") {
            rb = rb.header("anthropic-version", DEFAULT_API_VERSION);
        }
        rb
    }
}

impl ProviderApi for AnthropicProvider {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            legacy_completions: false,
            embeddings: false,
        }
    }

    async fn chat(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatCompletionResponse, UpstreamError> {
        let t = translate_request(req, model, false, &self.up.name)?;
        let resp: MessagesResponse = self.up.call_json(self.request(&t.body)).await?;
        Ok(translate_response(resp, t.json_tool.as_deref()))
    }

    async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChunkStream, UpstreamError> {
        let t = translate_request(req, model, true, &self.up.name)?;
        let resp = self.up.send(self.request(&t.body)).await?;
        let state = StreamState::new(&self.up.name, model, t.json_tool);
        Ok(translate_stream(self.up.events(resp), state))
    }

    async fn completion(
        &self,
        _req: &CompletionRequest,
        _model: &str,
    ) -> Result<CompletionResponse, UpstreamError> {
        Err(unsupported(&self.up.name, "legacy completions"))
    }

    async fn completion_stream(
        &self,
        _req: &CompletionRequest,
        _model: &str,
    ) -> Result<CompletionStream, UpstreamError> {
        Err(unsupported(&self.up.name, "legacy completions"))
    }

    async fn embeddings(
        &self,
        _req: &EmbeddingRequest,
        _model: &str,
    ) -> Result<EmbeddingResponse, UpstreamError> {
        Err(unsupported(&self.up.name, "embeddings"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use ::http::header::HeaderValue;
    use axum::http::HeaderMap;
    use eventsource_stream::Eventsource;

    use super::*;
    use crate::config::UpstreamDefaults;

    const TEXT_RESPONSE: &str =
        include_str!("../../../tests/fixtures/anthropic/text_response.json");
    const TOOL_USE_RESPONSE: &str =
        include_str!("../../../tests/fixtures/anthropic/tool_use_response.json");
    const JSON_SCHEMA_RESPONSE: &str =
        include_str!("../../../tests/fixtures/anthropic/json_schema_response.json");
    const ERROR_RESPONSE: &str =
        include_str!("../../../tests/fixtures/anthropic/error_invalid_request.json");
    const OPENAI_TOOL_REQUEST: &str =
        include_str!("../../../tests/fixtures/anthropic/openai_tool_conversation_request.json");
    const WIRE_TOOL_REQUEST: &str =
        include_str!("../../../tests/fixtures/anthropic/request_tool_conversation.json");
    const STREAM_TEXT: &str = include_str!("../../../tests/fixtures/anthropic/stream_text.sse");
    const STREAM_TOOL_USE: &str =
        include_str!("../../../tests/fixtures/anthropic/stream_tool_use.sse");
    const STREAM_JSON_SCHEMA: &str =
        include_str!("../../../tests/fixtures/anthropic/stream_json_schema.sse");
    const STREAM_ERROR: &str = include_str!("../../../tests/fixtures/anthropic/stream_error.sse");
    const STREAM_TRUNCATED: &str =
        include_str!("../../../tests/fixtures/anthropic/stream_truncated.sse");

    fn request(v: Value) -> ChatCompletionRequest {
        let mut v = v;
        v["model"] = json!("alias");
        serde_json::from_value(v).unwrap()
    }

    fn body(req: &ChatCompletionRequest) -> Value {
        let t = translate_request(req, "claude-sonnet-4-20250514", false, "anthropic").unwrap();
        serde_json::to_value(&t.body).unwrap()
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    fn parse_response(text: &str) -> MessagesResponse {
        serde_json::from_str(text).unwrap()
    }

    /// Decodes an SSE transcript delivered in small, arbitrary byte pieces.
    fn events(transcript: &'static str) -> BoxStream<'static, Result<Event, UpstreamError>> {
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> = transcript
            .as_bytes()
            .chunks(37)
            .map(|c| Ok(c.to_vec()))
            .collect();
        futures::stream::iter(pieces)
            .eventsource()
            .map(|r| {
                r.map_err(|e| {
                    UpstreamError::new(
                        UpstreamErrorKind::StreamInterrupted,
                        "anthropic",
                        e.to_string(),
                    )
                })
            })
            .boxed()
    }

    async fn run(transcript: &'static str, json_tool: Option<&str>) -> Vec<Item> {
        let state = StreamState::new("anthropic", "upstream-model", json_tool.map(str::to_string));
        translate_stream(events(transcript), state).collect().await
    }

    fn text_of(items: &[Item]) -> String {
        items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .flat_map(|c| c.choices.iter())
            .filter_map(|c| c.delta.content.clone())
            .collect()
    }

    fn finishes(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .flat_map(|c| c.choices.iter())
            .filter_map(|c| c.finish_reason.clone())
            .collect()
    }

    /// Checks the stream invariants: role first, one id and created, ends with usage.
    fn assert_clean_stream(items: &[Item], id: &str) -> Usage {
        assert!(items.iter().all(Result::is_ok), "{items:?}");
        let chunks: Vec<&ChatCompletionChunk> =
            items.iter().filter_map(|i| i.as_ref().ok()).collect();
        assert_eq!(
            chunks[0].choices[0].delta.role.as_deref(),
            Some("assistant")
        );
        let roles = chunks
            .iter()
            .flat_map(|c| &c.choices)
            .filter(|c| c.delta.role.is_some());
        assert_eq!(roles.count(), 1);
        assert!(chunks
            .iter()
            .all(|c| c.id == id && c.created == chunks[0].created));
        assert!(chunks.iter().all(|c| c.model == "claude-sonnet-4-20250514"));
        let last = chunks.last().unwrap();
        assert!(last.choices.is_empty());
        last.usage.clone().unwrap()
    }

    #[test]
    fn plain_text_response() {
        let r = translate_response(parse_response(TEXT_RESPONSE), None);
        assert_eq!(r.id, "msg_01XFDUDYJgAACzvnptvVoYEL");
        assert_eq!(r.model, "claude-sonnet-4-20250514");
        assert_eq!(r.object, "chat.completion");
        let c = &r.choices[0];
        assert_eq!(c.message.role, "assistant");
        assert_eq!(
            c.message.content.as_deref(),
            Some("Hello! How can I help you today?")
        );
        assert!(c.message.tool_calls.is_none());
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        let u = r.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (117, 11, 128)
        );
        assert_eq!(u.extra["prompt_tokens_details"]["cached_tokens"], 100);
    }

    #[test]
    fn tool_use_response_skips_thinking() {
        let r = translate_response(parse_response(TOOL_USE_RESPONSE), None);
        let m = &r.choices[0].message;
        assert_eq!(
            m.content.as_deref(),
            Some("I'll check the current weather in San Francisco for you.")
        );
        let calls = m.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id, "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(calls[0].kind, ToolKind::Function);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(
            calls[0].function.arguments,
            r#"{"location":"San Francisco, CA","unit":"celsius"}"#
        );
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        assert!(
            r.usage.unwrap().extra.is_empty(),
            "no cache hits, no details"
        );
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (anthropic, openai) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("pause_turn", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(finish_reason(anthropic), openai);
        }
    }

    #[test]
    fn tool_conversation_matches_the_recorded_wire_body() {
        let req: ChatCompletionRequest = serde_json::from_str(OPENAI_TOOL_REQUEST).unwrap();
        let expected: Value = serde_json::from_str(WIRE_TOOL_REQUEST).unwrap();
        assert_eq!(body(&req), expected);
    }

    #[test]
    fn dropped_parameters_never_reach_the_body() {
        let req: ChatCompletionRequest = serde_json::from_str(OPENAI_TOOL_REQUEST).unwrap();
        let b = body(&req);
        let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
        for dropped in [
            "seed",
            "n",
            "logprobs",
            "top_logprobs",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "reasoning_effort",
            "stream_options",
            "stream",
            "user",
            "max_completion_tokens",
            "parallel_tool_calls",
            "stop",
            "response_format",
        ] {
            assert!(
                !keys.iter().any(|k| *k == dropped),
                "{dropped} was forwarded"
            );
        }
        assert!(b["tools"][0].get("strict").is_none());
        assert!(b["messages"][0].get("name").is_none());
    }

    #[test]
    fn system_and_developer_messages_merge_into_system() {
        let req = request(json!({"messages": [
            {"role": "system", "content": "one"},
            user("hi"),
            {"role": "developer", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "three"}]},
            {"role": "system", "content": ""}
        ]}));
        let b = body(&req);
        assert_eq!(b["system"], "one\n\ntwo\nthree");
        assert_eq!(
            b["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        );
        let b = body(&request(json!({"messages": [user("hi")]})));
        assert!(b.get("system").is_none());
    }

    #[test]
    fn consecutive_roles_merge_and_empty_turns_vanish() {
        let req = request(json!({"messages": [
            user("a"), user("b"),
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": [{"type": "text", "text": "d"}]},
            user("e")
        ]}));
        let m = &body(&req)["messages"];
        assert_eq!(m.as_array().unwrap().len(), 3);
        assert_eq!(m[0]["role"], "user");
        assert_eq!(m[0]["content"].as_array().unwrap().len(), 2);
        assert_eq!(
            m[1],
            json!({"role": "assistant", "content": [
                {"type": "text", "text": "c"}, {"type": "text", "text": "d"}
            ]})
        );
        assert_eq!(m[2]["role"], "user");
    }

    #[test]
    fn tool_results_group_into_one_user_turn() {
        let req = request(json!({"messages": [
            user("go"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "t2", "type": "function", "function": {"name": "g", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "t1", "content": "r1"},
            {"role": "tool", "tool_call_id": "t2", "content": ""}
        ]}));
        let m = &body(&req)["messages"];
        assert_eq!(
            m[1]["content"][1],
            json!({"type": "tool_use", "id": "t2", "name": "g", "input": {}})
        );
        assert_eq!(
            m[2],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "r1"},
                {"type": "tool_result", "tool_use_id": "t2"}
            ]})
        );
        let req = request(json!({"messages": [{"role": "tool", "content": "r"}]}));
        let err = translate_request(&req, "m", false, "anthropic").unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::BadRequest);
    }

    #[test]
    fn invalid_tool_arguments_are_refused_naming_the_call() {
        for args in ["{not json", "[1, 2]"] {
            let req = request(json!({"messages": [
                user("go"),
                {"role": "assistant", "tool_calls": [
                    {"id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": args}}
                ]}
            ]}));
            let err = translate_request(&req, "m", false, "anthropic").unwrap_err();
            assert_eq!(err.kind, UpstreamErrorKind::BadRequest);
            assert!(
                err.message.contains("call_9") && err.message.contains("lookup"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn images_in_both_forms() {
        let req = request(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}}
        ]}]}));
        let content = &body(&req)["messages"][0]["content"];
        assert_eq!(
            content[1],
            json!({"type": "image", "source":
            {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})
        );
        assert_eq!(
            content[2],
            json!({"type": "image", "source":
            {"type": "url", "url": "https://example.com/cat.jpg"}})
        );
        let req = request(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://example.com/cat.jpg"}}
        ]}]}));
        let err = translate_request(&req, "m", false, "anthropic").unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::BadRequest);
    }

    #[test]
    fn tool_choice_variants() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let choice = |tc: Value, parallel: Option<bool>| {
            let mut v = json!({"messages": [user("x")], "tools": tools, "tool_choice": tc});
            if tc.is_null() {
                v.as_object_mut().unwrap().remove("tool_choice");
            }
            if let Some(p) = parallel {
                v["parallel_tool_calls"] = json!(p);
            }
            body(&request(v))["tool_choice"].clone()
        };
        assert_eq!(choice(json!("auto"), None), json!({"type": "auto"}));
        assert_eq!(choice(json!("required"), None), json!({"type": "any"}));
        assert_eq!(choice(json!("none"), None), json!({"type": "none"}));
        assert_eq!(
            choice(
                json!({"type": "function", "function": {"name": "f"}}),
                Some(false)
            ),
            json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            choice(json!("required"), Some(true)),
            json!({"type": "any"})
        );
        assert_eq!(choice(Value::Null, None), Value::Null);
        assert_eq!(
            choice(Value::Null, Some(false)),
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        let b = body(&request(json!({"messages": [user("x")], "tools": tools})));
        assert_eq!(
            b["tools"],
            json!([{"name": "f", "input_schema": {"type": "object", "properties": {}}}])
        );
        let b = body(&request(
            json!({"messages": [user("x")], "tool_choice": "auto"}),
        ));
        assert!(b.get("tool_choice").is_none(), "no tools, no tool_choice");
    }

    #[test]
    fn sampling_parameters_and_defaults() {
        let b = body(&request(json!({"messages": [user("x")]})));
        assert_eq!(b["max_tokens"], 4096);
        assert!(b.get("temperature").is_none() && b.get("stop_sequences").is_none());
        assert!(b.get("stream").is_none() && b.get("metadata").is_none());
        let b = body(&request(json!({
            "messages": [user("x")], "max_tokens": 77, "temperature": 0.3,
            "stop": ["a", "b"], "user": "u1"
        })));
        assert_eq!(b["max_tokens"], 77);
        assert_eq!(b["temperature"], 0.3);
        assert_eq!(b["stop_sequences"], json!(["a", "b"]));
        assert_eq!(b["metadata"], json!({"user_id": "u1"}));
        let req = request(json!({"messages": [user("x")], "temperature": 2.0}));
        let t = translate_request(&req, "m", true, "anthropic").unwrap();
        let b = serde_json::to_value(&t.body).unwrap();
        assert_eq!(b["temperature"], 1.0);
        assert_eq!(b["stream"], true);
    }

    #[test]
    fn n_above_one_is_refused() {
        let req = request(json!({"messages": [user("x")], "n": 2}));
        let err = translate_request(&req, "m", false, "anthropic").unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::BadRequest);
        assert_eq!(err.message, "n > 1 is not supported by Anthropic");
    }

    #[test]
    fn json_object_adds_a_system_instruction() {
        let req = request(
            json!({"messages": [{"role": "system", "content": "be terse"}, user("x")],
            "response_format": {"type": "json_object"}}),
        );
        let b = body(&req);
        assert_eq!(
            b["system"],
            format!("be terse\n\n{JSON_OBJECT_INSTRUCTION}")
        );
        assert!(b.get("tools").is_none());
    }

    fn json_schema_request() -> ChatCompletionRequest {
        request(json!({"messages": [user("Tell me about Paris")],
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "city_info", "strict": true,
            "schema": {"type": "object", "properties": {"city": {"type": "string"},
                "population": {"type": "integer"}}, "required": ["city", "population"]}
        }}}))
    }

    #[test]
    fn json_schema_becomes_a_forced_tool_and_comes_back_as_content() {
        let t = translate_request(&json_schema_request(), "m", false, "anthropic").unwrap();
        assert_eq!(t.json_tool.as_deref(), Some("city_info"));
        let b = serde_json::to_value(&t.body).unwrap();
        assert_eq!(b["tools"][1]["name"], "city_info");
        assert_eq!(
            b["tools"][1]["input_schema"]["required"],
            json!(["city", "population"])
        );
        assert_eq!(
            b["tool_choice"],
            json!({"type": "tool", "name": "city_info"})
        );

        let r = translate_response(parse_response(JSON_SCHEMA_RESPONSE), Some("city_info"));
        let c = &r.choices[0];
        assert_eq!(
            c.message.content.as_deref(),
            Some(r#"{"city":"Paris","population":2102650}"#)
        );
        assert!(c.message.tool_calls.is_none());
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));

        let cut = JSON_SCHEMA_RESPONSE.replace(
            r#""stop_reason": "tool_use""#,
            r#""stop_reason": "max_tokens""#,
        );
        let r = translate_response(parse_response(&cut), Some("city_info"));
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("length"));
    }

    #[tokio::test]
    async fn streamed_text_with_thinking_and_pings() {
        let items = run(STREAM_TEXT, None).await;
        let usage = assert_clean_stream(&items, "msg_01HqZ3xJ8sT5ViWcKx2bPQmN");
        assert_eq!(text_of(&items), "Hello! I'm doing well, thanks for asking.");
        assert_eq!(finishes(&items), vec!["stop"]);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (29, 34));
        assert_eq!(usage.extra["prompt_tokens_details"]["cached_tokens"], 8);
    }

    #[tokio::test]
    async fn streamed_tool_calls_are_numbered_among_tool_calls() {
        let items = run(STREAM_TOOL_USE, None).await;
        let usage = assert_clean_stream(&items, "msg_014p7gG3wDgGV9EUtLvnow3U");
        assert_eq!(text_of(&items), "I'll check the weather in both cities.");
        assert_eq!(finishes(&items), vec!["tool_calls"]);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (472, 118));
        let deltas: Vec<&ToolCallDelta> = items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .flat_map(|c| c.choices.iter())
            .flat_map(|c| c.delta.tool_calls.iter().flatten())
            .collect();
        let starts: Vec<_> = deltas.iter().filter(|d| d.id.is_some()).collect();
        assert_eq!(starts.len(), 2);
        for (n, (start, id)) in starts
            .iter()
            .zip([
                "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                "toolu_01Y8j3bMCXrjgLMzGZSTxLUb",
            ])
            .enumerate()
        {
            assert_eq!(start.index, n as u32);
            assert_eq!(start.id.as_deref(), Some(id));
            assert_eq!(start.kind, Some(ToolKind::Function));
            let f = start.function.as_ref().unwrap();
            assert_eq!(
                (f.name.as_deref(), f.arguments.as_deref()),
                (Some("get_weather"), Some(""))
            );
        }
        let args = |index: u32| -> Value {
            let s: String = deltas
                .iter()
                .filter(|d| d.index == index)
                .filter_map(|d| d.function.as_ref()?.arguments.clone())
                .collect();
            serde_json::from_str(&s).unwrap()
        };
        assert_eq!(
            args(0),
            json!({"location": "Paris, France", "unit": "celsius"})
        );
        assert_eq!(args(1), json!({"location": "Tokyo, Japan"}));
    }

    #[tokio::test]
    async fn streamed_json_schema_answer_becomes_content() {
        let items = run(STREAM_JSON_SCHEMA, Some("city_info")).await;
        assert_clean_stream(&items, "msg_01Kx7bVnN1pTq2aJ4cYHgR9s");
        let text = text_of(&items);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"city": "Paris", "population": 2102650})
        );
        assert_eq!(finishes(&items), vec!["stop"]);
        let tool_deltas = items
            .iter()
            .flatten()
            .flat_map(|c| &c.choices)
            .filter(|c| c.delta.tool_calls.is_some());
        assert_eq!(tool_deltas.count(), 0);
    }

    #[tokio::test]
    async fn error_event_ends_the_stream_with_its_message() {
        let items = run(STREAM_ERROR, None).await;
        assert_eq!(text_of(&items), "Once upon a");
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(
            err.kind,
            UpstreamErrorKind::Server,
            "overloaded_error is retryable"
        );
        assert_eq!(err.message, "Overloaded");
        assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1);

        let mut state = StreamState::new("anthropic", "m", None);
        let out = state.translate_event(
            "error",
            r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
        );
        let err = out[0].as_ref().unwrap_err();
        assert_eq!(
            (err.kind, err.message.as_str()),
            (UpstreamErrorKind::StreamError, "Internal server error")
        );
        assert!(state.done);
    }

    #[tokio::test]
    async fn a_stream_cut_before_message_stop_is_interrupted() {
        let items = run(STREAM_TRUNCATED, None).await;
        assert_eq!(text_of(&items), "The three primary colors are red,");
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::StreamInterrupted);
        assert!(items.iter().flatten().all(|c| c.usage.is_none()));
    }

    #[test]
    fn unknown_events_and_bad_json() {
        let mut state = StreamState::new("anthropic", "m", None);
        assert!(state
            .translate_event("future_event", r#"{"type":"future_event","x":1}"#)
            .is_empty());
        assert!(state
            .translate_event("ping", r#"{"type": "ping"}"#)
            .is_empty());
        let out = state.translate_event(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"server_tool_use","id":"s","name":"web_search","input":{}}}"#,
        );
        assert!(out.is_empty());
        // An event without its own `type` takes the SSE event name's.
        let out = state.translate_event(
            "content_block_start",
            r#"{"index":1,"content_block":{"type":"text","text":""}}"#,
        );
        assert!(out.is_empty());
        let out = state.translate_event(
            "content_block_delta",
            r#"{"index":1,"delta":{"type":"text_delta","text":"hi"}}"#,
        );
        let chunk = out[0].as_ref().unwrap();
        assert_eq!(chunk.choices[0].delta.content.as_deref(), Some("hi"));
        assert!(!state.done);
        let out = state.translate_event("message_start", "{not json");
        assert_eq!(
            out[0].as_ref().unwrap_err().kind,
            UpstreamErrorKind::InvalidResponse
        );
        assert!(state.done);
        // JSON of the wrong shape for its type ends the stream too.
        let mut state = StreamState::new("anthropic", "m", None);
        let out = state.translate_event(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":"zero"}"#,
        );
        let err = out[0].as_ref().unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::InvalidResponse);
        assert!(err
            .message
            .contains("unparseable `content_block_delta` event"));
        assert!(state.done);
    }

    // --- against a local mock of the Messages API ---------------------------------------

    #[derive(Debug, Clone)]
    struct Seen {
        headers: HeaderMap,
        body: Value,
    }

    async fn mock_server(seen: Arc<Mutex<Vec<Seen>>>) -> String {
        let handler = move |headers: HeaderMap, body: String| {
            let seen = seen.clone();
            async move {
                let body: Value = serde_json::from_str(&body).unwrap();
                let reply = if body["messages"][0]["content"][0]["text"] == "fail" {
                    (
                        axum::http::StatusCode::BAD_REQUEST,
                        "application/json",
                        ERROR_RESPONSE,
                    )
                } else if body["stream"] == true {
                    (
                        axum::http::StatusCode::OK,
                        "text/event-stream",
                        STREAM_TOOL_USE,
                    )
                } else {
                    (
                        axum::http::StatusCode::OK,
                        "application/json",
                        TEXT_RESPONSE,
                    )
                };
                seen.lock().unwrap().push(Seen { headers, body });
                (
                    reply.0,
                    [(axum::http::header::CONTENT_TYPE, reply.1)],
                    reply.2,
                )
            }
        };
        let app = axum::Router::new().route("/v1/messages", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v1")
    }

    fn provider(base_url: String, headers: HeaderMap) -> AnthropicProvider {
        let client = crate::providers::http::build_client(&UpstreamDefaults {
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            pool_max_idle_per_host: 2,
        });
        AnthropicProvider::new(UpstreamSettings {
            name: "anthropic-test".into(),
            base_url,
            api_key: Some("sk-ant-test".into()),
            headers,
            client,
            first_byte_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        })
    }

    #[tokio::test]
    async fn chat_and_chat_stream_against_a_local_mock() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let base = mock_server(seen.clone()).await;
        let p = provider(base.clone(), HeaderMap::new());
        assert!(!p.capabilities().legacy_completions && !p.capabilities().embeddings);

        let req = request(
            json!({"messages": [{"role": "system", "content": "sys"}, user("hi")], "seed": 1}),
        );
        let r = p.chat(&req, "claude-sonnet-4-20250514").await.unwrap();
        assert_eq!(
            r.choices[0].message.content.as_deref(),
            Some("Hello! How can I help you today?")
        );

        let stream = p
            .chat_stream(&req, "claude-sonnet-4-20250514")
            .await
            .unwrap();
        let items: Vec<Item> = stream.collect().await;
        assert_clean_stream(&items, "msg_014p7gG3wDgGV9EUtLvnow3U");
        assert_eq!(finishes(&items), vec!["tool_calls"]);

        let err = p
            .chat(&request(json!({"messages": [user("fail")]})), "m")
            .await
            .unwrap_err();
        assert_eq!(
            (err.kind, err.status),
            (UpstreamErrorKind::BadRequest, Some(400))
        );
        assert!(
            err.message.starts_with("messages.1.content.0.tool_result"),
            "{}",
            err.message
        );

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        for s in &seen {
            assert_eq!(s.headers["x-api-key"], "sk-ant-test");
            assert_eq!(s.headers["anthropic-version"], "2023-06-01");
            assert_eq!(s.headers["content-type"], "application/json");
            assert!(s.headers.get("authorization").is_none());
        }
        assert_eq!(
            seen[0].body,
            json!({
                "model": "claude-sonnet-4-20250514", "system": "sys",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "max_tokens": 4096
            })
        );
        assert_eq!(seen[1].body["stream"], true);

        // A configured version header is sent once, instead of the default.
        let mut headers = HeaderMap::new();
        headers.insert("anthropic-version", HeaderValue::from_static("2024-01-01"));
        let seen2 = Arc::new(Mutex::new(Vec::new()));
        let p = provider(mock_server(seen2.clone()).await, headers);
        p.chat(&req, "m").await.unwrap();
        let s = seen2.lock().unwrap()[0].clone();
        let versions: Vec<_> = s.headers.get_all("anthropic-version").iter().collect();
        assert_eq!(versions, vec!["2024-01-01"]);
        assert!(p
            .embeddings(
                &serde_json::from_value(json!({"model": "m", "input": "x"})).unwrap(),
                "m"
            )
            .await
            .is_err());
    }
}
