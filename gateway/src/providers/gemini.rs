//! Google Gemini (Generative Language API `v1beta`): chat over `generateContent` and
//! `streamGenerateContent?alt=sse`, embeddings over `batchEmbedContents`.
//!
//! This module owns the translation between the canonical OpenAI shapes and Gemini's
//! wire format, and the Gemini wire types (private). Invariants:
//! - The API key travels only in the `x-goog-api-key` header, never in the URL.
//! - Only modelled parameters are translated; `logit_bias`, `user`,
//!   `parallel_tool_calls` and unmodelled `extra` fields are dropped.
//! - `json_schema` response formats go out as `responseJsonSchema` (standard JSON
//!   Schema, as OpenAI clients write it, `additionalProperties` included), never as the
//!   OpenAPI-subset `responseSchema`.
//! - Gemini has no stream end marker: a stream ends cleanly only when every candidate it
//!   mentioned reported a `finishReason`; otherwise its last item is `StreamInterrupted`.
//!   Stream translation is a pure state machine ([`StreamState`]) the network loop feeds.
//! - Gemini reports no embedding usage: `prompt_tokens` is an estimate (chars / 4,
//!   rounded up).

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::http::{error_message, event_error, UpstreamSettings};
use super::{
    unsupported, Capabilities, ChunkStream, CompletionStream, ProviderApi, UpstreamError,
    UpstreamErrorKind,
};
use crate::api::types::{
    json_kind, unix_now, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatMessage, CompletionRequest, CompletionResponse, ContentPart, Delta,
    Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, FunctionCall,
    FunctionCallDelta, ImageUrl, MessageContent, ResponseFormat, ResponseMessage, Role, ToolCall,
    ToolCallDelta, ToolChoice, ToolKind, Usage,
};

// ---- Wire types ----

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest {
    contents: Vec<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<GeminiTool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(default)]
    parts: Vec<Part>,
}

/// One `Part`: Gemini's oneof (text, inlineData, fileData, functionCall,
/// functionResponse) plus the `thought` flag. Unknown members are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thought: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inline_data: Option<Blob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file_data: Option<FileData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function_call: Option<GeminiFunctionCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function_response: Option<FunctionResponse>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Blob {
    mime_type: String,
    data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileData {
    mime_type: String,
    file_uri: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GeminiFunctionCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    name: String,
    /// Absent for a call without arguments.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    args: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FunctionResponse {
    name: String,
    response: Value,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiTool {
    function_declarations: Vec<FunctionDeclaration>,
}

#[derive(Debug, Serialize)]
struct FunctionDeclaration {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Full JSON Schema (`additionalProperties`, `$defs`, type unions), as OpenAI
    /// clients write it; the older `parameters` field takes only an OpenAPI subset.
    #[serde(rename = "parametersJsonSchema")]
    parameters: Option<Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig {
    function_calling_config: FunctionCallingConfig,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionCallingConfig {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_function_names: Option<Vec<String>>,
}

#[derive(Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    candidate_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
    model_version: Option<String>,
    response_id: Option<String>,
    /// Set when the body is an `{"error": ...}` object (a failure mid-stream), not a
    /// response.
    error: Option<serde::de::IgnoredAny>,
}

impl GenerateContentResponse {
    /// Whether the prompt itself was blocked (no candidates at all).
    fn prompt_blocked(&self) -> bool {
        self.candidates.is_empty()
            && self
                .prompt_feedback
                .as_ref()
                .is_some_and(|f| f.block_reason.is_some())
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
    index: Option<u32>,
}

impl Candidate {
    /// The answer's parts, thought summaries left out.
    fn parts(&self) -> impl Iterator<Item = &Part> {
        self.content
            .iter()
            .flat_map(|c| c.parts.iter())
            .filter(|p| p.thought != Some(true))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    total_token_count: Option<u64>,
}

#[derive(Debug, Serialize)]
struct BatchEmbedRequest {
    requests: Vec<EmbedContentRequest>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbedContentRequest {
    model: String,
    content: Content,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct BatchEmbedResponse {
    #[serde(default)]
    embeddings: Vec<ContentEmbedding>,
}

#[derive(Debug, Deserialize)]
struct ContentEmbedding {
    #[serde(default)]
    values: Vec<f32>,
}

// ---- Request translation ----

fn bad_request(provider: &str, message: impl Into<String>) -> UpstreamError {
    UpstreamError::new(UpstreamErrorKind::BadRequest, provider, message)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// The model's resource name: `models/{model}` unless it already names one
/// (`models/x`, `tunedModels/x`).
fn resource_name(model: &str) -> String {
    if model.contains('/') {
        model.to_string()
    } else {
        format!("models/{model}")
    }
}

fn text_part(text: impl Into<String>) -> Part {
    Part {
        text: Some(text.into()),
        ..Part::default()
    }
}

fn inline_part(mime_type: &str, data: &str) -> Part {
    Part {
        inline_data: Some(Blob {
            mime_type: mime_type.to_string(),
            data: data.to_string(),
        }),
        ..Part::default()
    }
}

/// Appends a content, merging it into the previous one when the role is the same
/// (Gemini wants turns to alternate). Empty contents are left out.
fn push_merged(contents: &mut Vec<Content>, role: &str, parts: Vec<Part>) {
    if parts.is_empty() {
        return;
    }
    match contents.last_mut() {
        Some(last) if last.role.as_deref() == Some(role) => last.parts.extend(parts),
        _ => contents.push(Content {
            role: Some(role.to_string()),
            parts,
        }),
    }
}

fn to_gemini_request(
    req: &ChatCompletionRequest,
    provider: &str,
) -> Result<GenerateContentRequest, UpstreamError> {
    let mut system = Vec::new();
    let mut contents = Vec::new();
    // tool_call_id -> function name, from earlier assistant messages.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    for (i, msg) in req.messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        match msg.role {
            Role::System | Role::Developer => {
                let text = msg.text();
                if !text.is_empty() {
                    system.push(text_part(text));
                }
            }
            Role::User => push_merged(&mut contents, "user", user_parts(msg, &at, provider)?),
            Role::Assistant => {
                let parts = assistant_parts(msg, &at, &mut call_names, provider)?;
                push_merged(&mut contents, "model", parts);
            }
            Role::Tool | Role::Function => {
                let part = tool_result_part(msg, &at, &call_names, provider)?;
                push_merged(&mut contents, "user", vec![part]);
            }
        }
    }
    let system_instruction = (!system.is_empty()).then_some(Content {
        role: None,
        parts: system,
    });
    let tools = match &req.tools {
        Some(tools) if !tools.is_empty() => vec![GeminiTool {
            function_declarations: tools
                .iter()
                .map(|t| FunctionDeclaration {
                    name: t.function.name.clone(),
                    description: t.function.description.clone(),
                    parameters: t.function.parameters.clone(),
                })
                .collect(),
        }],
        _ => Vec::new(),
    };
    let tool_config = req.tool_choice.as_ref().map(|choice| {
        let (mode, allowed_function_names) = match choice {
            ToolChoice::Auto => ("AUTO", None),
            ToolChoice::None => ("NONE", None),
            ToolChoice::Required => ("ANY", None),
            ToolChoice::Function(f) => ("ANY", Some(vec![f.clone()])),
        };
        ToolConfig {
            function_calling_config: FunctionCallingConfig {
                mode,
                allowed_function_names,
            },
        }
    });
    let config = generation_config(req);
    Ok(GenerateContentRequest {
        contents,
        system_instruction,
        tools,
        tool_config,
        generation_config: (config != GenerationConfig::default()).then_some(config),
    })
}

/// A tool (or legacy function) message as a `functionResponse`, named after the
/// assistant call its `tool_call_id` answers.
fn tool_result_part(
    msg: &ChatMessage,
    at: &str,
    call_names: &HashMap<&str, &str>,
    provider: &str,
) -> Result<Part, UpstreamError> {
    let name = match (&msg.tool_call_id, &msg.name) {
        (Some(id), _) => call_names.get(id.as_str()).copied().ok_or_else(|| {
            let msg = format!("{at}: tool_call_id `{id}` matches no earlier assistant tool call");
            bad_request(provider, msg)
        })?,
        (None, Some(name)) if msg.role == Role::Function => name.as_str(),
        (None, _) => {
            let msg = format!("{at}: a tool message needs `tool_call_id`");
            return Err(bad_request(provider, msg));
        }
    };
    Ok(Part {
        function_response: Some(FunctionResponse {
            name: name.to_string(),
            response: tool_response(msg.text()),
        }),
        ..Part::default()
    })
}

/// A tool's output as a `functionResponse.response`: the content itself when it is a
/// JSON object, else `{"result": <text>}`.
fn tool_response(text: String) -> Value {
    match serde_json::from_str::<Value>(&text) {
        Ok(obj @ Value::Object(_)) => obj,
        _ => json!({ "result": text }),
    }
}

fn user_parts(msg: &ChatMessage, at: &str, provider: &str) -> Result<Vec<Part>, UpstreamError> {
    let parts = match &msg.content {
        None => return Ok(Vec::new()),
        Some(MessageContent::Text(t)) => return Ok(non_empty_text(t).into_iter().collect()),
        Some(MessageContent::Parts(parts)) => parts,
    };
    let mut out = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match part {
            ContentPart::Text { text } => out.extend(non_empty_text(text)),
            ContentPart::ImageUrl { image_url } => out.push(image_part(image_url, &at, provider)?),
            ContentPart::InputAudio { input_audio } => out.push(inline_part(
                &format!("audio/{}", input_audio.format),
                &input_audio.data,
            )),
            ContentPart::File { file } => {
                let data_url = file.get("file_data").and_then(Value::as_str);
                let (mime, data) = data_url
                    .and_then(|u| u.strip_prefix("data:")?.split_once(','))
                    .and_then(|(meta, data)| Some((meta.strip_suffix(";base64")?, data)))
                    .ok_or_else(|| {
                        bad_request(
                            provider,
                            format!("{at}: Gemini takes files only as `file_data` data: URLs"),
                        )
                    })?;
                out.push(inline_part(mime, data));
            }
            ContentPart::Refusal { .. } => {}
        }
    }
    Ok(out)
}

fn non_empty_text(text: &str) -> Option<Part> {
    (!text.is_empty()).then(|| text_part(text))
}

fn image_part(image: &ImageUrl, at: &str, provider: &str) -> Result<Part, UpstreamError> {
    if image.url.starts_with("data:") {
        let (mime, data) = image.as_data_url().ok_or_else(|| {
            bad_request(
                provider,
                format!("{at}: image data URLs must be data:<type>;base64,<data>"),
            )
        })?;
        return Ok(inline_part(mime, data));
    }
    if image.url.starts_with("https://") || image.url.starts_with("http://") {
        return Ok(Part {
            file_data: Some(FileData {
                mime_type: guess_image_mime(&image.url).to_string(),
                file_uri: image.url.clone(),
            }),
            ..Part::default()
        });
    }
    Err(bad_request(
        provider,
        format!("{at}: image URLs must be http(s) or data: URLs"),
    ))
}

/// The image type from the URL's file extension; `image/jpeg` when there is none.
fn guess_image_mime(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let file = path.rsplit('/').next().unwrap_or(path);
    let ext = file.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("heic") => "image/heic",
        Some("heif") => "image/heif",
        _ => "image/jpeg",
    }
}

fn assistant_parts<'a>(
    msg: &'a ChatMessage,
    at: &str,
    call_names: &mut HashMap<&'a str, &'a str>,
    provider: &str,
) -> Result<Vec<Part>, UpstreamError> {
    let mut out: Vec<Part> = non_empty_text(&msg.text()).into_iter().collect();
    for (j, call) in msg.tool_calls.iter().flatten().enumerate() {
        let raw = call.function.arguments.trim();
        let what = format!(
            "{at}.tool_calls[{j}] (`{}`, id `{}`)",
            call.function.name, call.id
        );
        let args = match serde_json::from_str::<Value>(if raw.is_empty() { "{}" } else { raw }) {
            Ok(v @ Value::Object(_)) => v,
            Ok(other) => {
                let kind = json_kind(&other);
                let msg = format!("{what}: arguments must be a JSON object, got {kind}");
                return Err(bad_request(provider, msg));
            }
            Err(e) => {
                let msg = format!("{what}: arguments are not valid JSON: {e}");
                return Err(bad_request(provider, msg));
            }
        };
        call_names.insert(&call.id, &call.function.name);
        out.push(Part {
            function_call: Some(GeminiFunctionCall {
                id: None,
                name: call.function.name.clone(),
                args,
            }),
            ..Part::default()
        });
    }
    Ok(out)
}

fn generation_config(req: &ChatCompletionRequest) -> GenerationConfig {
    let response_logprobs = req.logprobs.filter(|l| *l);
    let (response_mime_type, response_json_schema) = match &req.response_format {
        Some(ResponseFormat::JsonObject) => (Some("application/json"), None),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            (Some("application/json"), json_schema.schema.clone())
        }
        Some(ResponseFormat::Text) | None => (None, None),
    };
    GenerationConfig {
        temperature: req.temperature,
        top_p: req.top_p,
        max_output_tokens: req.max_output_tokens(),
        stop_sequences: req
            .stop
            .as_ref()
            .map(|s| s.0.clone())
            .filter(|s| !s.is_empty()),
        candidate_count: req.n,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        response_logprobs,
        logprobs: response_logprobs.and(req.top_logprobs),
        response_mime_type,
        response_json_schema,
    }
}

// ---- Response translation ----

fn finish_reason(reason: &str, has_tool_calls: bool) -> &'static str {
    match reason {
        "STOP" if has_tool_calls => "tool_calls",
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ => "stop",
    }
}

/// `thoughtsTokenCount` counts as completion (it is billed as output), and is also
/// reported as `completion_tokens_details.reasoning_tokens`.
fn usage_from(m: &UsageMetadata) -> Usage {
    let thoughts = m.thoughts_token_count.unwrap_or(0);
    let completion = m.candidates_token_count.unwrap_or(0) + thoughts;
    let mut usage = Usage::new(m.prompt_token_count.unwrap_or(0), completion);
    if let Some(total) = m.total_token_count {
        usage.total_tokens = total;
    }
    if thoughts > 0 {
        usage.extra.insert(
            "completion_tokens_details".into(),
            json!({ "reasoning_tokens": thoughts }),
        );
    }
    if let Some(cached) = m.cached_content_token_count.filter(|c| *c > 0) {
        usage.extra.insert(
            "prompt_tokens_details".into(),
            json!({ "cached_tokens": cached }),
        );
    }
    usage
}

fn tool_call_from(call: &GeminiFunctionCall) -> ToolCall {
    ToolCall {
        id: call.id.clone().unwrap_or_else(|| new_id("call_")),
        kind: ToolKind::Function,
        function: FunctionCall {
            name: call.name.clone(),
            arguments: arguments_json(&call.args),
        },
    }
}

fn arguments_json(args: &Value) -> String {
    if args.is_null() {
        "{}".to_string()
    } else {
        args.to_string()
    }
}

fn from_gemini_response(
    resp: GenerateContentResponse,
    model: &str,
    provider: &str,
) -> Result<ChatCompletionResponse, UpstreamError> {
    let mut choices = Vec::new();
    if resp.prompt_blocked() {
        choices.push(ChatChoice {
            index: 0,
            message: assistant_message(Some(String::new()), Vec::new()),
            finish_reason: Some("content_filter".into()),
            logprobs: None,
        });
    } else if resp.candidates.is_empty() {
        return Err(UpstreamError::new(
            UpstreamErrorKind::InvalidResponse,
            provider,
            "response has no candidates and no block reason",
        ));
    }
    for (pos, cand) in resp.candidates.iter().enumerate() {
        let mut text = String::new();
        let mut calls = Vec::new();
        for part in cand.parts() {
            if let Some(t) = &part.text {
                text.push_str(t);
            }
            if let Some(call) = &part.function_call {
                calls.push(tool_call_from(call));
            }
        }
        let content = (!text.is_empty() || calls.is_empty()).then_some(text);
        let finish = cand
            .finish_reason
            .as_deref()
            .map(|r| finish_reason(r, !calls.is_empty()).to_string());
        choices.push(ChatChoice {
            index: cand.index.unwrap_or(pos as u32),
            message: assistant_message(content, calls),
            finish_reason: finish,
            logprobs: None,
        });
    }
    choices.sort_by_key(|c| c.index);
    Ok(ChatCompletionResponse {
        id: resp.response_id.unwrap_or_else(|| new_id("chatcmpl-")),
        object: "chat.completion".into(),
        created: unix_now(),
        model: resp.model_version.unwrap_or_else(|| model.to_string()),
        choices,
        usage: resp.usage_metadata.as_ref().map(usage_from),
        system_fingerprint: None,
        extra: Default::default(),
    })
}

fn assistant_message(content: Option<String>, calls: Vec<ToolCall>) -> ResponseMessage {
    ResponseMessage {
        role: "assistant".into(),
        content,
        tool_calls: (!calls.is_empty()).then_some(calls),
        refusal: None,
        extra: Default::default(),
    }
}

// ---- Stream translation: a pure state machine over the `data:` payloads ----

type ChunkResult = Result<ChatCompletionChunk, UpstreamError>;

/// What a stream has seen so far. Feed each event's data to [`translate_event`], then
/// call [`finish`] when the transport ends.
#[derive(Debug)]
struct StreamState {
    provider: String,
    id: String,
    created: i64,
    model: String,
    /// Whether the first event (which fixes `id` and `model`) was seen.
    started: bool,
    choices: BTreeMap<u32, ChoiceProgress>,
    /// The last `usageMetadata` (Gemini's are cumulative).
    usage: Option<Usage>,
    /// An error was emitted or the stream was finished: nothing more comes out.
    ended: bool,
}

#[derive(Debug, Default)]
struct ChoiceProgress {
    role_sent: bool,
    tool_calls: u32,
    finished: bool,
}

impl StreamState {
    fn new(provider: &str, model: &str) -> Self {
        StreamState {
            provider: provider.to_string(),
            id: new_id("chatcmpl-"),
            created: unix_now(),
            model: model.to_string(),
            started: false,
            choices: BTreeMap::new(),
            usage: None,
            ended: false,
        }
    }

    /// A chunk with one delta for choice `index`; the choice's first carries the role.
    fn chunk(&mut self, index: u32, mut delta: Delta, finish: Option<&str>) -> ChatCompletionChunk {
        let progress = self.choices.entry(index).or_default();
        if !progress.role_sent {
            progress.role_sent = true;
            delta.role = Some("assistant".into());
        }
        if finish.is_some() {
            progress.finished = true;
        }
        ChatCompletionChunk::new(&self.id, self.created, &self.model).with_delta(
            index,
            delta,
            finish.map(str::to_string),
        )
    }

    fn fail(&mut self, kind: UpstreamErrorKind, message: String) -> Vec<ChunkResult> {
        self.ended = true;
        vec![Err(UpstreamError::new(kind, &self.provider, message))]
    }
}

/// Translates one SSE `data:` payload (a whole `GenerateContentResponse`, or an
/// `{"error":..}` object) into chunks. An error item is always the last one.
fn translate_event(state: &mut StreamState, data: &str) -> Vec<ChunkResult> {
    if state.ended {
        return Vec::new();
    }
    // Parsed once, straight into the typed response; only a failure looks closer.
    let resp: GenerateContentResponse = match serde_json::from_str(data) {
        Ok(r) => r,
        Err(e) => {
            state.ended = true;
            return vec![Err(event_error(&state.provider, data, &e))];
        }
    };
    if resp.error.is_some() {
        let msg = error_message(data.as_bytes(), 200);
        return state.fail(UpstreamErrorKind::StreamError, msg);
    }
    if !state.started {
        state.started = true;
        if let Some(id) = &resp.response_id {
            state.id = id.clone();
        }
        if let Some(model) = &resp.model_version {
            state.model = model.clone();
        }
    }
    if let Some(m) = &resp.usage_metadata {
        state.usage = Some(usage_from(m));
    }
    let mut out = Vec::new();
    if resp.prompt_blocked() {
        let delta = Delta {
            content: Some(String::new()),
            ..Delta::default()
        };
        out.push(Ok(state.chunk(0, delta, Some("content_filter"))));
    }
    for (pos, cand) in resp.candidates.iter().enumerate() {
        let index = cand.index.unwrap_or(pos as u32);
        for part in cand.parts() {
            if let Some(text) = part.text.as_ref().filter(|t| !t.is_empty()) {
                let delta = Delta {
                    content: Some(text.clone()),
                    ..Delta::default()
                };
                out.push(Ok(state.chunk(index, delta, None)));
            }
            if let Some(call) = &part.function_call {
                let progress = state.choices.entry(index).or_default();
                let ordinal = progress.tool_calls;
                progress.tool_calls += 1;
                let call = tool_call_from(call);
                let delta = Delta {
                    tool_calls: Some(vec![ToolCallDelta {
                        index: ordinal,
                        id: Some(call.id),
                        kind: Some(ToolKind::Function),
                        function: Some(FunctionCallDelta {
                            name: Some(call.function.name),
                            arguments: Some(call.function.arguments),
                        }),
                    }]),
                    ..Delta::default()
                };
                out.push(Ok(state.chunk(index, delta, None)));
            }
        }
        if let Some(reason) = &cand.finish_reason {
            let has_calls = state.choices.get(&index).is_some_and(|c| c.tool_calls > 0);
            let finish = finish_reason(reason, has_calls);
            out.push(Ok(state.chunk(index, Delta::default(), Some(finish))));
        }
    }
    out
}

/// One Gemini stream's translation, fed one SSE `data:` payload at a time: the pure
/// part of the provider's stream loop, public for the SSE benchmarks
/// (`benches/benches/parse.rs`).
#[derive(Debug)]
pub struct StreamTranslator(StreamState);

impl StreamTranslator {
    /// A stream from `provider` for `model`.
    pub fn new(provider: &str, model: &str) -> Self {
        StreamTranslator(StreamState::new(provider, model))
    }

    /// The chunks one event's `data:` payload becomes.
    pub fn event(&mut self, data: &str) -> Vec<ChunkResult> {
        translate_event(&mut self.0, data)
    }
}

/// Ends the stream: the usage chunk when every candidate finished, else
/// `StreamInterrupted`. Nothing after an error.
fn finish(state: &mut StreamState) -> Vec<ChunkResult> {
    if state.ended {
        return Vec::new();
    }
    let clean = !state.choices.is_empty() && state.choices.values().all(|c| c.finished);
    if !clean {
        let msg = "stream ended before every candidate reported a finishReason".to_string();
        return state.fail(UpstreamErrorKind::StreamInterrupted, msg);
    }
    state.ended = true;
    match state.usage.take() {
        Some(usage) => {
            let mut chunk = ChatCompletionChunk::new(&state.id, state.created, &state.model);
            chunk.usage = Some(usage);
            vec![Ok(chunk)]
        }
        None => Vec::new(),
    }
}

// ---- Embeddings ----

/// The `batchEmbedContents` body and the estimated token count of its inputs.
fn embed_request(
    req: &EmbeddingRequest,
    model: &str,
    provider: &str,
) -> Result<(BatchEmbedRequest, u64), UpstreamError> {
    let texts = req
        .input
        .texts()
        .ok_or_else(|| bad_request(provider, "Gemini embeddings take text input"))?;
    let resource = resource_name(model);
    let chars: usize = texts.iter().map(|t| t.chars().count()).sum();
    let requests = texts
        .iter()
        .map(|t| EmbedContentRequest {
            model: resource.clone(),
            content: Content {
                role: None,
                parts: vec![text_part(*t)],
            },
            output_dimensionality: req.dimensions,
        })
        .collect();
    Ok((BatchEmbedRequest { requests }, (chars as u64).div_ceil(4)))
}

fn from_gemini_embeddings(
    resp: BatchEmbedResponse,
    expected: usize,
    model: &str,
    estimated_tokens: u64,
    provider: &str,
) -> Result<EmbeddingResponse, UpstreamError> {
    if resp.embeddings.len() != expected {
        return Err(UpstreamError::new(
            UpstreamErrorKind::InvalidResponse,
            provider,
            format!("{} embeddings for {expected} inputs", resp.embeddings.len()),
        ));
    }
    Ok(EmbeddingResponse {
        object: "list".into(),
        data: (0u32..)
            .zip(resp.embeddings)
            .map(|(i, e)| Embedding::new(i, e.values))
            .collect(),
        model: model.to_string(),
        usage: EmbeddingUsage {
            prompt_tokens: estimated_tokens,
            total_tokens: estimated_tokens,
        },
    })
}

// ---- The provider ----

#[derive(Debug, Clone)]
pub struct GeminiProvider {
    up: UpstreamSettings,
}

impl GeminiProvider {
    pub fn new(up: UpstreamSettings) -> Self {
        GeminiProvider { up }
    }

    /// A POST to `/{resource}:{method}` (method may carry a query) with the key in `x-goog-api-key`.
    fn request<T: Serialize>(
        &self,
        model: &str,
        method: &str,
        body: &T,
    ) -> super::http::RequestBuilder {
        let url = self.up.url(&format!("/{}:{method}", resource_name(model)));
        let rb = self.up.post(url).json(body);
        match &self.up.api_key {
            Some(key) => rb.header("x-goog-api-key", key),
            None => rb,
        }
    }
}

impl ProviderApi for GeminiProvider {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            legacy_completions: false,
            embeddings: true,
        }
    }

    async fn chat(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatCompletionResponse, UpstreamError> {
        let body = to_gemini_request(req, &self.up.name)?;
        let resp: GenerateContentResponse = self
            .up
            .call_json(self.request(model, "generateContent", &body))
            .await?;
        from_gemini_response(resp, model, &self.up.name)
    }

    async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChunkStream, UpstreamError> {
        let body = to_gemini_request(req, &self.up.name)?;
        let rb = self.request(model, "streamGenerateContent?alt=sse", &body);
        let resp = self.up.send(rb).await?;
        let mut events = self.up.events(resp);
        let mut state = StreamState::new(&self.up.name, model);
        Ok(async_stream::stream! {
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => { yield Err(e); return; }
                };
                let data = ev.data.trim();
                if data.is_empty() {
                    continue;
                }
                for item in translate_event(&mut state, data) {
                    yield item;
                }
                if state.ended {
                    return;
                }
            }
            for item in finish(&mut state) {
                yield item;
            }
        }
        .boxed())
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
        req: &EmbeddingRequest,
        model: &str,
    ) -> Result<EmbeddingResponse, UpstreamError> {
        let (body, estimate) = embed_request(req, model, &self.up.name)?;
        let expected = body.requests.len();
        let resp: BatchEmbedResponse = self
            .up
            .call_json(self.request(model, "batchEmbedContents", &body))
            .await?;
        from_gemini_embeddings(resp, expected, model, estimate, &self.up.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = include_str!("../../../tests/fixtures/gemini/generate_text.json");
    const FUNCTION_CALL: &str =
        include_str!("../../../tests/fixtures/gemini/generate_function_call.json");
    const PROMPT_BLOCKED: &str =
        include_str!("../../../tests/fixtures/gemini/generate_prompt_blocked.json");
    const CANDIDATE_SAFETY: &str =
        include_str!("../../../tests/fixtures/gemini/generate_candidate_safety.json");
    const STREAM_TEXT: &str = include_str!("../../../tests/fixtures/gemini/stream_text.sse");
    const STREAM_CALLS: &str =
        include_str!("../../../tests/fixtures/gemini/stream_function_call.sse");
    const STREAM_CUT: &str = include_str!("../../../tests/fixtures/gemini/stream_truncated.sse");
    const STREAM_ERROR: &str = include_str!("../../../tests/fixtures/gemini/stream_error.sse");
    const EMBED: &str = include_str!("../../../tests/fixtures/gemini/batch_embed.json");

    fn chat_req(v: Value) -> ChatCompletionRequest {
        serde_json::from_value(v).unwrap()
    }

    fn body(v: Value) -> Value {
        serde_json::to_value(to_gemini_request(&chat_req(v), "gemini").unwrap()).unwrap()
    }

    fn response(fixture: &str) -> ChatCompletionResponse {
        from_gemini_response(serde_json::from_str(fixture).unwrap(), "gemini-x", "gemini").unwrap()
    }

    /// The `data:` payloads of a recorded transcript, one per event.
    fn events(transcript: &str) -> Vec<&str> {
        transcript
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data:"))
            .map(str::trim)
            .collect()
    }

    fn run_stream(transcript: &str) -> Vec<ChunkResult> {
        let mut state = StreamState::new("gemini", "requested-model");
        let mut out = Vec::new();
        for data in events(transcript) {
            out.extend(translate_event(&mut state, data));
        }
        out.extend(finish(&mut state));
        out
    }

    #[test]
    fn system_and_developer_messages_become_the_system_instruction() {
        let b = body(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "answer in French"}]},
            {"role": "user", "content": "hi"}
        ]}));
        assert_eq!(
            b["systemInstruction"],
            json!({"parts": [{"text": "be brief"}, {"text": "answer in French"}]})
        );
        assert_eq!(
            b["contents"],
            json!([{"role": "user", "parts": [{"text": "hi"}]}])
        );
    }

    #[test]
    fn roles_map_and_consecutive_turns_merge() {
        let b = body(json!({"model": "m", "messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "four"}
        ]}));
        assert_eq!(
            b["contents"],
            json!([
                {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
                {"role": "model", "parts": [{"text": "three"}]},
                {"role": "user", "parts": [{"text": "four"}]}
            ])
        );
    }

    #[test]
    fn tool_calls_and_results_round_trip_with_name_lookup() {
        let b = body(json!({"model": "m", "messages": [
            {"role": "user", "content": "weather in Paris and the time?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
            {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 21}"}
        ]}));
        assert_eq!(
            b["contents"][1],
            json!({"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {}}}
            ]})
        );
        assert_eq!(
            b["contents"][2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"name": "get_time", "response": {"result": "14:05"}}},
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}
            ]})
        );
        assert_eq!(b["contents"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn bad_tool_history_is_a_bad_request_naming_the_call() {
        let bad_args = chat_req(json!({"model": "m", "messages": [
            {"role": "assistant", "tool_calls": [{"id": "call_x", "type": "function",
                "function": {"name": "lookup", "arguments": "{not json"}}]}
        ]}));
        let err = to_gemini_request(&bad_args, "gemini").unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::BadRequest);
        assert!(
            err.message.contains("messages[0].tool_calls[0]"),
            "{}",
            err.message
        );
        assert!(err.message.contains("lookup") && err.message.contains("call_x"));
        let unknown = chat_req(json!({"model": "m", "messages": [
            {"role": "tool", "tool_call_id": "call_nope", "content": "x"}
        ]}));
        let err = to_gemini_request(&unknown, "gemini").unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::BadRequest);
        assert!(err.message.contains("call_nope"), "{}", err.message);
        let legacy = body(json!({"model": "m", "messages": [
            {"role": "function", "name": "lookup", "content": "42"}
        ]}));
        assert_eq!(
            legacy["contents"][0]["parts"][0],
            json!({"functionResponse": {"name": "lookup", "response": {"result": "42"}}})
        );
    }

    #[test]
    fn images_as_inline_data_and_file_data() {
        let b = body(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a/cat.WEBP?size=2"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/photo"}}
            ]}]}),
        );
        assert_eq!(
            b["contents"][0]["parts"],
            json!([
                {"text": "compare"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/a/cat.WEBP?size=2"}},
                {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photo"}}
            ])
        );
        let ftp = chat_req(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "ftp://example.com/x.png"}}
            ]}]}),
        );
        let err = to_gemini_request(&ftp, "gemini").unwrap_err();
        assert!(
            err.message.contains("messages[0].content[0]"),
            "{}",
            err.message
        );
    }

    #[test]
    fn generation_config_maps_sampling_parameters() {
        let b = body(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.2, "top_p": 0.9, "max_tokens": 100, "max_completion_tokens": 50,
            "stop": "END", "n": 2, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "logprobs": true, "top_logprobs": 3,
            "response_format": {"type": "json_object"}}),
        );
        assert_eq!(
            b["generationConfig"],
            json!({"temperature": 0.2, "topP": 0.9, "maxOutputTokens": 50,
                "stopSequences": ["END"], "candidateCount": 2, "seed": 7,
                "presencePenalty": 0.5, "frequencyPenalty": -0.5,
                "responseLogprobs": true, "logprobs": 3,
                "responseMimeType": "application/json"})
        );
        let plain = body(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10, "logprobs": false, "top_logprobs": 2}),
        );
        assert_eq!(plain["generationConfig"], json!({"maxOutputTokens": 10}));
        let none = body(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        assert!(none.get("generationConfig").is_none());
    }

    #[test]
    fn json_schema_goes_out_as_response_json_schema() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}},
            "required": ["a"], "additionalProperties": false});
        let b = body(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "out", "strict": true, "schema": schema}}}),
        );
        assert_eq!(
            b["generationConfig"]["responseMimeType"],
            "application/json"
        );
        assert_eq!(b["generationConfig"]["responseJsonSchema"], schema);
        assert!(b["generationConfig"].get("responseSchema").is_none());
    }

    #[test]
    fn tools_and_every_tool_choice() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "description": "Weather now", "strict": true,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
        let b = body(base.clone());
        assert_eq!(
            b["tools"],
            json!([{"functionDeclarations": [{"name": "get_weather", "description": "Weather now",
                "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}}}}]}])
        );
        assert!(b.get("toolConfig").is_none());
        let cases = [
            (json!("auto"), json!({"mode": "AUTO"})),
            (json!("none"), json!({"mode": "NONE"})),
            (json!("required"), json!({"mode": "ANY"})),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                json!({"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
            ),
        ];
        for (choice, expected) in cases {
            let mut req = base.clone();
            req["tool_choice"] = choice;
            assert_eq!(
                body(req)["toolConfig"],
                json!({"functionCallingConfig": expected})
            );
        }
    }

    #[test]
    fn dropped_parameters_never_reach_gemini() {
        let b = body(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "bob"}],
            "logit_bias": {"50256": -100}, "user": "u-123", "parallel_tool_calls": false,
            "stream": true, "stream_options": {"include_usage": true},
            "reasoning_effort": "low", "metadata": {"k": "v"}}),
        );
        let keys: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["contents"]);
        let text = b.to_string();
        for dropped in [
            "logit",
            "u-123",
            "parallel",
            "reasoning",
            "metadata",
            "bob",
            "stream",
        ] {
            assert!(!text.contains(dropped), "{dropped} leaked: {text}");
        }
    }

    #[test]
    fn text_response_translates_with_usage_id_and_model() {
        let r = response(TEXT);
        assert_eq!(r.id, "Bq5NaKL2FqGx1dkPzN-R0A4");
        assert_eq!(r.model, "gemini-2.5-flash");
        assert_eq!(r.object, "chat.completion");
        assert_eq!(r.choices.len(), 1);
        assert_eq!(r.choices[0].message.role, "assistant");
        assert_eq!(
            r.choices[0].message.content.as_deref(),
            Some("The capital of France is Paris.")
        );
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
        let u = r.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (12, 33, 45)
        );
        assert_eq!(u.extra["completion_tokens_details"]["reasoning_tokens"], 25);
    }

    #[test]
    fn function_call_response_becomes_tool_calls() {
        let r = response(FUNCTION_CALL);
        let choice = &r.choices[0];
        assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(choice.message.content, None);
        let calls = choice.message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(
            calls[0].function.arguments,
            r#"{"city":"Paris","unit":"celsius"}"#
        );
        assert_eq!(
            calls[1].function.arguments,
            r#"{"timezone":"Europe/Paris"}"#
        );
        assert!(calls.iter().all(|c| c.id.starts_with("call_")));
        assert_ne!(calls[0].id, calls[1].id);
    }

    #[test]
    fn blocked_prompts_and_candidates_are_content_filtered() {
        for fixture in [PROMPT_BLOCKED, CANDIDATE_SAFETY] {
            let r = response(fixture);
            assert_eq!(r.choices.len(), 1);
            assert_eq!(r.choices[0].message.content.as_deref(), Some(""));
            assert_eq!(
                r.choices[0].finish_reason.as_deref(),
                Some("content_filter")
            );
        }
        assert_eq!(response(PROMPT_BLOCKED).usage.unwrap().prompt_tokens, 14);
    }

    #[test]
    fn thoughts_are_skipped_and_missing_ids_are_generated() {
        let r = response(
            r#"{"candidates": [
                {"content": {"parts": [{"text": "hmm", "thought": true}, {"text": "A"}, {"text": "B"}],
                 "role": "model"}, "finishReason": "MAX_TOKENS"},
                {"content": {"parts": [{"functionCall": {"name": "now"}}], "role": "model"},
                 "finishReason": "STOP", "index": 1}]}"#,
        );
        assert!(r.id.starts_with("chatcmpl-"));
        assert_eq!(r.model, "gemini-x");
        assert_eq!(r.choices[0].message.content.as_deref(), Some("AB"));
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("length"));
        let call = &r.choices[1].message.tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.function.arguments, "{}");
        assert!(r.usage.is_none());
        for (reason, expected) in [
            ("RECITATION", "content_filter"),
            ("SPII", "content_filter"),
            ("MALFORMED_FUNCTION_CALL", "stop"),
            ("OTHER", "stop"),
        ] {
            assert_eq!(finish_reason(reason, false), expected);
        }
    }

    #[test]
    fn streamed_text_ends_with_a_usage_chunk() {
        let items: Vec<_> = run_stream(STREAM_TEXT)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(items.iter().all(|c| c.id == "8K1NaN7nNcm11dkP1e6N6As"
            && c.created == items[0].created
            && c.model == "gemini-2.0-flash"));
        assert_eq!(items[0].choices[0].delta.role.as_deref(), Some("assistant"));
        assert!(items[1..]
            .iter()
            .all(|c| c.choices.iter().all(|ch| ch.delta.role.is_none())));
        let text: String = items
            .iter()
            .flat_map(|c| &c.choices)
            .filter_map(|ch| ch.delta.content.as_deref())
            .collect();
        assert_eq!(
            text,
            "Once upon a time, a small robot named Bolt learned to paint the sunrise.\n"
        );
        let finishes: Vec<_> = items
            .iter()
            .flat_map(|c| &c.choices)
            .filter_map(|ch| ch.finish_reason.as_deref())
            .collect();
        assert_eq!(finishes, ["stop"]);
        let last = items.last().unwrap();
        assert!(last.choices.is_empty());
        let u = last.usage.as_ref().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (9, 17, 26)
        );
        assert_eq!(items.iter().filter(|c| c.usage.is_some()).count(), 1);
    }

    #[test]
    fn streamed_function_calls_arrive_whole_with_ordinals() {
        let items: Vec<_> = run_stream(STREAM_CALLS)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let calls: Vec<&ToolCallDelta> = items
            .iter()
            .flat_map(|c| &c.choices)
            .flat_map(|ch| ch.delta.tool_calls.iter().flatten())
            .collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].index, 0);
        assert_eq!(calls[1].index, 1);
        let f = calls[1].function.as_ref().unwrap();
        assert_eq!(f.name.as_deref(), Some("get_weather"));
        assert_eq!(f.arguments.as_deref(), Some(r#"{"city":"London"}"#));
        assert!(calls
            .iter()
            .all(|c| c.id.as_deref().is_some_and(|id| id.starts_with("call_"))));
        assert_eq!(items[0].choices[0].delta.role.as_deref(), Some("assistant"));
        let finish = items
            .iter()
            .flat_map(|c| &c.choices)
            .find_map(|ch| ch.finish_reason.clone());
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        let u = items.last().unwrap().usage.as_ref().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (88, 78, 166)
        );
    }

    #[test]
    fn a_stream_cut_before_finish_reason_is_interrupted() {
        let items = run_stream(STREAM_CUT);
        assert_eq!(items.len(), 3);
        assert!(items[..2]
            .iter()
            .all(|i| i.as_ref().is_ok_and(|c| c.usage.is_none())));
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::StreamInterrupted);
        let mut empty = StreamState::new("gemini", "m");
        let err = finish(&mut empty).pop().unwrap().unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::StreamInterrupted);
    }

    #[test]
    fn an_error_event_ends_the_stream_with_the_providers_message() {
        let items = run_stream(STREAM_ERROR);
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0].as_ref().unwrap().choices[0]
                .delta
                .content
                .as_deref(),
            Some("Once")
        );
        let err = items[1].as_ref().unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::StreamError);
        assert_eq!(
            err.message,
            "The model is overloaded. Please try again later."
        );
        let mut state = StreamState::new("gemini", "m");
        let bad = translate_event(&mut state, "{not json");
        assert_eq!(
            bad[0].as_ref().unwrap_err().kind,
            UpstreamErrorKind::InvalidResponse
        );
        assert!(translate_event(&mut state, events(STREAM_TEXT)[0]).is_empty());
        assert!(finish(&mut state).is_empty());
        // `"error": null` is no error; JSON of another shape is not a response.
        let mut state = StreamState::new("gemini", "m");
        let ok = translate_event(
            &mut state,
            r#"{"error":null,"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"index":0}]}"#,
        );
        assert_eq!(
            ok[0].as_ref().unwrap().choices[0].delta.content.as_deref(),
            Some("Hi")
        );
        let bad = translate_event(&mut state, r#"{"candidates":"none"}"#);
        let err = bad[0].as_ref().unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::InvalidResponse);
        assert!(err.message.starts_with("unparseable stream event"));
        assert!(translate_event(&mut state, events(STREAM_TEXT)[0]).is_empty());
    }

    #[test]
    fn a_blocked_prompt_in_a_stream_finishes_cleanly() {
        let mut state = StreamState::new("gemini", "m");
        let one_line: Value = serde_json::from_str(PROMPT_BLOCKED).unwrap();
        let items = translate_event(&mut state, &one_line.to_string());
        let chunk = items[0].as_ref().unwrap();
        assert_eq!(
            chunk.choices[0].finish_reason.as_deref(),
            Some("content_filter")
        );
        assert_eq!(chunk.choices[0].delta.role.as_deref(), Some("assistant"));
        assert!(finish(&mut state)[0].as_ref().unwrap().usage.is_some());
    }

    #[test]
    fn embeddings_request_and_response() {
        let req: EmbeddingRequest = serde_json::from_value(
            json!({"model": "alias", "input": ["hello", "wörld!"], "dimensions": 4, "user": "u"}),
        )
        .unwrap();
        let (body, estimate) = embed_request(&req, "text-embedding-004", "gemini").unwrap();
        assert_eq!(estimate, 3, "11 chars / 4, rounded up");
        assert_eq!(
            serde_json::to_value(&body).unwrap()["requests"][1],
            json!({"model": "models/text-embedding-004",
                "content": {"parts": [{"text": "wörld!"}]}, "outputDimensionality": 4})
        );
        let resp = serde_json::from_str(EMBED).unwrap();
        let out =
            from_gemini_embeddings(resp, 2, "text-embedding-004", estimate, "gemini").unwrap();
        assert_eq!(out.data.len(), 2);
        assert_eq!(out.data[1].index, 1);
        let v = serde_json::to_value(&out.data[0].embedding).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 4);
        assert_eq!(
            out.usage,
            EmbeddingUsage {
                prompt_tokens: 3,
                total_tokens: 3
            }
        );
        let resp = serde_json::from_str(EMBED).unwrap();
        let err = from_gemini_embeddings(resp, 3, "m", 0, "gemini").unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::InvalidResponse);
        let tokens: EmbeddingRequest =
            serde_json::from_value(json!({"model": "m", "input": [1, 2, 3]})).unwrap();
        let err = embed_request(&tokens, "m", "gemini").unwrap_err();
        assert_eq!(err.kind, UpstreamErrorKind::BadRequest);
        assert_eq!(err.message, "Gemini embeddings take text input");
    }

    mod mock {
        use std::sync::{Arc, Mutex};
        use std::time::Duration;

        use axum::extract::State;
        use axum::http::{header, HeaderMap, StatusCode, Uri};
        use axum::response::{IntoResponse, Response};

        use super::*;
        use crate::config::UpstreamDefaults;

        /// (path and query, x-goog-api-key, JSON body) of each request received.
        type Seen = Arc<Mutex<Vec<(String, Option<String>, Value)>>>;

        async fn serve(
            State(seen): State<Seen>,
            uri: Uri,
            headers: HeaderMap,
            body: String,
        ) -> Response {
            let key = headers
                .get("x-goog-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let json = serde_json::from_str(&body).unwrap_or(Value::Null);
            seen.lock().unwrap().push((uri.to_string(), key, json));
            let (content_type, body) = match uri.path() {
                "/v1beta/models/gemini-2.5-flash:generateContent" => ("application/json", TEXT),
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent" => {
                    ("text/event-stream", STREAM_TEXT)
                }
                "/v1beta/models/text-embedding-004:batchEmbedContents" => {
                    ("application/json", EMBED)
                }
                _ => {
                    let err = r#"{"error": {"code": 404, "message": "models/nope is not found for API version v1beta", "status": "NOT_FOUND"}}"#;
                    return (
                        StatusCode::NOT_FOUND,
                        [(header::CONTENT_TYPE, "application/json")],
                        err,
                    )
                        .into_response();
                }
            };
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }

        #[tokio::test]
        async fn chat_stream_and_embeddings_against_a_local_gemini() {
            let seen = Seen::default();
            let app = axum::Router::new().fallback(serve).with_state(seen.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            let defaults = UpstreamDefaults {
                connect_timeout: Duration::from_secs(2),
                first_byte_timeout: Duration::from_secs(5),
                timeout: Duration::from_secs(10),
                pool_max_idle_per_host: 2,
            };
            let provider = GeminiProvider::new(UpstreamSettings {
                name: "gemini".into(),
                base_url: format!("http://{addr}/v1beta"),
                api_key: Some("test-key".into()),
                headers: Default::default(),
                client: crate::providers::http::build_client(&defaults),
                first_byte_timeout: defaults.first_byte_timeout,
                timeout: defaults.timeout,
            });
            let req = chat_req(json!({"model": "alias", "max_tokens": 64,
                "messages": [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "capital of France?"}]}));

            let r = provider.chat(&req, "gemini-2.5-flash").await.unwrap();
            assert_eq!(
                r.choices[0].message.content.as_deref(),
                Some("The capital of France is Paris.")
            );

            let stream = provider
                .chat_stream(&req, "gemini-2.0-flash")
                .await
                .unwrap();
            let items: Vec<_> = stream.collect().await;
            let items: Vec<_> = items.into_iter().map(Result::unwrap).collect();
            assert_eq!(
                items.len(),
                5,
                "three text chunks, a finish chunk, a usage chunk"
            );
            assert_eq!(
                items.last().unwrap().usage.as_ref().unwrap().total_tokens,
                26
            );

            let ereq: EmbeddingRequest =
                serde_json::from_value(json!({"model": "e", "input": ["a", "b"]})).unwrap();
            let e = provider
                .embeddings(&ereq, "text-embedding-004")
                .await
                .unwrap();
            assert_eq!(e.data.len(), 2);

            let err = provider.chat(&req, "nope").await.unwrap_err();
            assert_eq!(
                (err.kind, err.status),
                (UpstreamErrorKind::BadRequest, Some(404))
            );
            assert_eq!(
                err.message,
                "models/nope is not found for API version v1beta"
            );

            let seen = seen.lock().unwrap();
            let paths: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
            assert_eq!(
                paths,
                [
                    "/v1beta/models/gemini-2.5-flash:generateContent",
                    "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                    "/v1beta/models/text-embedding-004:batchEmbedContents",
                    "/v1beta/models/nope:generateContent",
                ]
            );
            assert!(seen.iter().all(|s| s.1.as_deref() == Some("test-key")));
            assert!(
                paths.iter().all(|p| !p.contains("key")),
                "the key never goes in the URL"
            );
            let expected_chat = json!({
                "contents": [{"role": "user", "parts": [{"text": "capital of France?"}]}],
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "generationConfig": {"maxOutputTokens": 64}
            });
            assert_eq!(seen[0].2, expected_chat);
            assert_eq!(seen[1].2, expected_chat);
            assert_eq!(
                seen[2].2["requests"][1]["content"],
                json!({"parts": [{"text": "b"}]})
            );
        }
    }
}
