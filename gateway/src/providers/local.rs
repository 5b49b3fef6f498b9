//! The `local` provider: registered models served in-process by the local runtime.
//!
//! Turns OpenAI requests into engine requests (chat template, tokenizer, sampling
//! parameters) and engine events back into OpenAI responses and chunks. The model name
//! is the registered name (`local/NAME` routes here with `NAME`).
//!
//! Invariants:
//! - loading, hashing and embedding run on the blocking pool, never on an async worker;
//! - every refusal is decided before anything streams (queue full, context overflow,
//!   bad parameter), so routing may still fail over;
//! - `max_tokens` defaults to what is left of the context, capped at the governance
//!   default, so a reservation made for the default output cap covers the request;
//! - a dropped stream drops its receivers, which cancels generation at the next step;
//! - usage is exact (the tokenizer's counts) and carries `tokens_per_second` and
//!   `time_to_first_token_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use airlock_runtime::models::{
    ChatMessage as TemplateMessage, EncodeOptions, ModelError, Tokenizer,
};
use airlock_runtime::{
    Engine, Event, FinishReason, GenerateRequest, Loaded, ModelPool, PoolError, RuntimeError,
    SamplingParams, TokenLogprob,
};
use futures::stream::{self, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    Capabilities, ChunkStream, CompletionStream, ProviderApi, UpstreamError, UpstreamErrorKind,
};
use crate::api::types::{
    unix_now, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    CompletionChoice, CompletionRequest, CompletionResponse, Delta, Embedding, EmbeddingInput,
    EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, MessageContent, Prompt, ResponseMessage,
    Role, Usage,
};
use crate::config::LOCAL_PROVIDER;

/// Most choices (`n`) one request may ask of a local model.
pub const MAX_CHOICES: u32 = 8;

#[derive(Debug, Clone)]
pub struct LocalProvider {
    pool: Arc<ModelPool>,
    /// Output cap when a request gives none (governance's default).
    default_max_tokens: usize,
}

fn err(kind: UpstreamErrorKind, message: impl Into<String>) -> UpstreamError {
    UpstreamError::new(kind, LOCAL_PROVIDER, message)
}

fn invalid(message: impl Into<String>) -> UpstreamError {
    err(UpstreamErrorKind::InvalidRequest, message)
}

fn from_runtime(e: RuntimeError) -> UpstreamError {
    let kind = match &e {
        RuntimeError::Overloaded => {
            let mut e = err(
                UpstreamErrorKind::Overloaded,
                "The local model is busy: its queue is full. Retry shortly.",
            );
            e.retry_after = Some(std::time::Duration::from_secs(1));
            return e;
        }
        RuntimeError::ContextOverflow { .. } => UpstreamErrorKind::ContextWindowExceeded,
        RuntimeError::InvalidParam { .. } | RuntimeError::EmptyPrompt => {
            UpstreamErrorKind::InvalidRequest
        }
        RuntimeError::EngineStopped => UpstreamErrorKind::Server,
    };
    err(kind, e.to_string())
}

fn from_pool(e: PoolError) -> UpstreamError {
    let kind = match &e {
        PoolError::NotFound(_) => UpstreamErrorKind::ModelNotFound,
        PoolError::Changed(_) => UpstreamErrorKind::ModelChanged,
        PoolError::LoadFailed { .. } | PoolError::OverBudget { .. } => {
            UpstreamErrorKind::ModelLoadFailed
        }
    };
    err(kind, e.to_string())
}

/// The sampling fields shared by chat and legacy completions.
struct Knobs<'a> {
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<&'a Map<String, Value>>,
    stop: Vec<String>,
    max_tokens: Option<u32>,
    n: Option<u32>,
    /// `Some(k)`: log-probabilities with `k` alternatives per token.
    logprobs: Option<usize>,
    extra: &'a Map<String, Value>,
}

impl Knobs<'_> {
    /// Parameters for a prompt of `prompt_len` tokens on `engine`.
    fn params(
        &self,
        engine: &Engine,
        prompt_len: usize,
        default_max: usize,
    ) -> Result<SamplingParams, UpstreamError> {
        let mut logit_bias = HashMap::new();
        for (k, v) in self.logit_bias.into_iter().flatten() {
            let id: u32 = k
                .parse()
                .map_err(|_| invalid(format!("logit_bias key {k:?} is not a token id")))?;
            let bias = v
                .as_f64()
                .ok_or_else(|| invalid(format!("logit_bias[{k}] is not a number")))?;
            logit_bias.insert(id, bias as f32);
        }
        let extra_f32 = |name: &str| -> Result<Option<f32>, UpstreamError> {
            match self.extra.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(|f| Some(f as f32))
                    .ok_or_else(|| invalid(format!("`{name}` must be a number"))),
            }
        };
        let top_k = match self.extra.get("top_k") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .and_then(|k| usize::try_from(k).ok())
                .ok_or_else(|| invalid("`top_k` must be a non-negative integer"))?,
        };
        let room = engine.max_context().saturating_sub(prompt_len);
        let max_tokens = match self.max_tokens {
            Some(m) => m as usize,
            None => room.min(default_max).max(1),
        };
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(1.0) as f32,
            top_p: self.top_p.unwrap_or(1.0) as f32,
            top_k,
            min_p: extra_f32("min_p")?.unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            logit_bias,
            max_tokens,
            stop: self.stop.clone(),
            logprobs: self.logprobs,
        })
    }

    fn choices(&self) -> Result<u32, UpstreamError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_CHOICES => Ok(n),
            n => Err(invalid(format!(
                "n = {n}: local models produce 1 to {MAX_CHOICES} choices"
            ))),
        }
    }
}

fn chat_knobs(req: &ChatCompletionRequest) -> Result<Knobs<'_>, UpstreamError> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(invalid("tools are not supported by local models"));
    }
    if let Some(f) = &req.response_format {
        let kind = serde_json::to_value(f)
            .ok()
            .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string));
        if kind.as_deref() != Some("text") {
            return Err(invalid(
                "response_format other than `text` is not supported by local models",
            ));
        }
    }
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(invalid("top_logprobs requires logprobs: true"));
    }
    Ok(Knobs {
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        logit_bias: req.logit_bias.as_ref(),
        stop: req.stop.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
        max_tokens: req.max_output_tokens(),
        n: req.n,
        logprobs: (req.logprobs == Some(true)).then(|| req.top_logprobs.unwrap_or(0) as usize),
        extra: &req.extra,
    })
}

fn completion_knobs(req: &CompletionRequest) -> Result<Knobs<'_>, UpstreamError> {
    if req.logprobs.is_some_and(|n| n > 5) {
        return Err(invalid(
            "logprobs: legacy completions report at most 5 alternatives",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("suffix is not supported by local models"));
    }
    Ok(Knobs {
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        logit_bias: req.logit_bias.as_ref(),
        stop: req.stop.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
        max_tokens: req.max_tokens,
        n: req.n,
        logprobs: req.logprobs.map(|n| n as usize),
        extra: &req.extra,
    })
}

/// The conversation as the chat template sees it.
fn template_messages(req: &ChatCompletionRequest) -> Result<Vec<TemplateMessage>, UpstreamError> {
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if let Some(MessageContent::Parts(parts)) = &m.content {
                if parts
                    .iter()
                    .any(|p| !matches!(p, crate::api::types::ContentPart::Text { .. }))
                {
                    return Err(invalid(format!(
                        "messages[{i}]: local models take text content only"
                    )));
                }
            }
            let role = match m.role {
                Role::System | Role::Developer => "system",
                Role::User => "user",
                Role::Assistant if m.tool_calls.as_ref().is_none_or(Vec::is_empty) => "assistant",
                Role::Assistant | Role::Tool | Role::Function => {
                    return Err(invalid(format!(
                        "messages[{i}]: tool calls are not supported by local models"
                    )))
                }
            };
            Ok(TemplateMessage::new(role, m.text()))
        })
        .collect()
}

/// Encodes a rendered prompt (the template already left out a BOS the tokenizer adds).
fn encode_prompt(engine: &Engine, text: &str) -> Vec<u32> {
    engine.tokenizer().encode(text, EncodeOptions::PROMPT)
}

/// What one finished generation produced.
#[derive(Debug, Default)]
struct Generated {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish_reason: Option<FinishReason>,
    prompt_tokens: usize,
    completion_tokens: usize,
    first_token_ms: Option<f64>,
}

fn finish_str(f: Option<FinishReason>) -> String {
    match f {
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
    .to_string()
}

/// Usage over all choices, with the local extras.
fn usage(prompt_tokens: usize, completion: usize, started: Instant, ttft: Option<f64>) -> Usage {
    let mut u = Usage::new(prompt_tokens as u64, completion as u64);
    let secs = started.elapsed().as_secs_f64();
    let tps = if secs > 0.0 {
        completion as f64 / secs
    } else {
        0.0
    };
    u.extra.insert(
        "tokens_per_second".into(),
        json!((tps * 100.0).round() / 100.0),
    );
    if let Some(ms) = ttft {
        u.extra.insert(
            "time_to_first_token_ms".into(),
            json!((ms * 100.0).round() / 100.0),
        );
    }
    u
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Generated, UpstreamError> {
    let mut g = Generated::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { text, logprob, .. } => {
                g.text.push_str(&text);
                g.logprobs.extend(logprob);
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                time_to_first_token,
                ..
            } => {
                g.finish_reason = Some(finish_reason);
                g.prompt_tokens = prompt_tokens;
                g.completion_tokens = completion_tokens;
                g.first_token_ms = Some(time_to_first_token.as_secs_f64() * 1000.0);
                return Ok(g);
            }
            Event::Error(m) => return Err(err(UpstreamErrorKind::Server, m)),
        }
    }
    Err(err(
        UpstreamErrorKind::Server,
        "the local engine stopped before finishing",
    ))
}

/// A token as logprobs show it: its text (lossy UTF-8 of its bytes) and its bytes.
fn token_repr(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.decode_bytes(&[id], false);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let (token, bytes) = token_repr(tok, id);
        json!({"token": token, "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut e = entry(lp.token, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy `logprobs`: `{tokens, token_logprobs, top_logprobs, text_offset}`, offsets
/// counted in characters from `offset`.
fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for lp in lps {
        let (text, _) = token_repr(tok, lp.token);
        offsets.push(offset);
        offset += text.chars().count();
        tokens.push(text);
        token_logprobs.push(lp.logprob);
        let top: Map<String, Value> = lp
            .top
            .iter()
            .map(|&(id, l)| (token_repr(tok, id).0, json!(l)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets})
}

/// Generations under way for one request.
struct Submitted {
    receivers: Vec<UnboundedReceiver<Event>>,
    tokenizer: Arc<Tokenizer>,
    /// Whether the client asked for log-probabilities.
    logprobs: bool,
    /// Legacy completions with `echo`: the prompt text to put before the answer.
    echo: String,
}

/// One stream item: choice index and event.
type Tagged = (u32, Event);

/// Merges the choices' event streams, each tagged with its index.
fn merged(receivers: Vec<UnboundedReceiver<Event>>) -> stream::BoxStream<'static, Tagged> {
    let streams = receivers.into_iter().zip(0u32..).map(|(rx, i)| {
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(move |e| (i, e))
            .boxed()
    });
    stream::select_all(streams).boxed()
}

/// Running totals while streaming.
struct StreamTally {
    left: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    first_token_ms: Option<f64>,
    started: Instant,
}

impl StreamTally {
    /// Accounts a `Done`; returns the finish reason text.
    fn done(
        &mut self,
        finish: FinishReason,
        prompt: usize,
        completion: usize,
        ttft: f64,
    ) -> String {
        self.left = self.left.saturating_sub(1);
        self.prompt_tokens = prompt;
        self.completion_tokens += completion;
        self.first_token_ms = Some(self.first_token_ms.map_or(ttft, |t| t.min(ttft)));
        finish_str(Some(finish))
    }

    fn usage(&self) -> Usage {
        usage(
            self.prompt_tokens,
            self.completion_tokens,
            self.started,
            self.first_token_ms,
        )
    }
}

/// Turns the choices' engine events into a client stream: `heads` first, then one item
/// per non-empty text piece (`text(choice, piece, logprobs)`, with the log-probabilities
/// of the tokens since the last item), a `done(choice, finish_reason)` per finished
/// choice, and after the last one `usage(totals)`. An engine error, or an engine that
/// stops early, ends the stream with a `StreamInterrupted` error.
fn event_stream<T: Send + 'static>(
    receivers: Vec<UnboundedReceiver<Event>>,
    started: Instant,
    heads: Vec<T>,
    text: impl Fn(u32, String, Vec<TokenLogprob>) -> T + Send + 'static,
    done: impl Fn(u32, String) -> T + Send + 'static,
    usage: impl Fn(Usage) -> T + Send + 'static,
) -> stream::BoxStream<'static, Result<T, UpstreamError>> {
    let mut tally = StreamTally {
        left: receivers.len(),
        prompt_tokens: 0,
        completion_tokens: 0,
        first_token_ms: None,
        started,
    };
    let mut pending: Vec<Vec<TokenLogprob>> = vec![Vec::new(); receivers.len()];
    let mut events = merged(receivers);
    async_stream::stream! {
        for h in heads {
            yield Ok(h);
        }
        loop {
            let Some((i, ev)) = events.next().await else {
                yield Err(err(
                    UpstreamErrorKind::StreamInterrupted,
                    "the local engine stopped before finishing",
                ));
                break;
            };
            match ev {
                Event::Token { text: piece, logprob, .. } => {
                    let held = &mut pending[i as usize];
                    held.extend(logprob);
                    if !piece.is_empty() {
                        yield Ok(text(i, piece, std::mem::take(held)));
                    }
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    time_to_first_token,
                    ..
                } => {
                    let reason = tally.done(
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        time_to_first_token.as_secs_f64() * 1000.0,
                    );
                    let held = std::mem::take(&mut pending[i as usize]);
                    if !held.is_empty() {
                        yield Ok(text(i, String::new(), held));
                    }
                    yield Ok(done(i, reason));
                    if tally.left == 0 {
                        yield Ok(usage(tally.usage()));
                        break;
                    }
                }
                Event::Error(m) => {
                    yield Err(err(UpstreamErrorKind::StreamInterrupted, m));
                    break;
                }
            }
        }
    }
    .boxed()
}

impl LocalProvider {
    pub fn new(pool: Arc<ModelPool>, default_max_tokens: u64) -> LocalProvider {
        LocalProvider {
            pool,
            default_max_tokens: usize::try_from(default_max_tokens).unwrap_or(usize::MAX),
        }
    }

    pub fn pool(&self) -> &Arc<ModelPool> {
        &self.pool
    }

    /// The loaded model, loading it on the blocking pool if needed.
    async fn loaded(&self, model: &str) -> Result<Loaded, UpstreamError> {
        let pool = self.pool.clone();
        let name = model.to_string();
        tokio::task::spawn_blocking(move || pool.get(&name))
            .await
            .map_err(|e| err(UpstreamErrorKind::Server, format!("loader failed: {e}")))?
            .map_err(from_pool)
    }

    async fn engine(&self, model: &str) -> Result<Arc<Engine>, UpstreamError> {
        match self.loaded(model).await? {
            Loaded::Chat(e) => Ok(e),
            Loaded::Embedding(_) => Err(invalid(format!(
                "`{LOCAL_PROVIDER}/{model}` is an embedding model: use /v1/embeddings"
            ))),
        }
    }

    /// Submits `n` generations of `prompt`; seeds differ per choice when given.
    fn submit(
        &self,
        engine: &Engine,
        prompt: Vec<u32>,
        knobs: &Knobs<'_>,
    ) -> Result<Vec<UnboundedReceiver<Event>>, UpstreamError> {
        let n = knobs.choices()?;
        let params = knobs.params(engine, prompt.len(), self.default_max_tokens)?;
        (0..n)
            .map(|i| {
                let mut params = params.clone();
                params.seed = params.seed.map(|s| s.wrapping_add(u64::from(i)));
                engine
                    .submit(GenerateRequest {
                        prompt_tokens: prompt.clone(),
                        params,
                    })
                    .map_err(from_runtime)
            })
            .collect()
    }

    async fn chat_receivers(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<Submitted, UpstreamError> {
        let knobs = chat_knobs(req)?;
        let messages = template_messages(req)?;
        let engine = self.engine(model).await?;
        let text = engine
            .chat_template()
            .render(&messages, true)
            .map_err(|e| {
                invalid(format!(
                    "the model's chat template refused the conversation: {e}"
                ))
            })?;
        let prompt = encode_prompt(&engine, &text);
        Ok(Submitted {
            receivers: self.submit(&engine, prompt, &knobs)?,
            tokenizer: engine.tokenizer().clone(),
            logprobs: knobs.logprobs.is_some(),
            echo: String::new(),
        })
    }

    /// The prompt of a legacy completion as token ids.
    fn completion_prompt(engine: &Engine, prompt: &Prompt) -> Result<Vec<u32>, UpstreamError> {
        match prompt {
            Prompt::Text(t) => Ok(engine.tokenizer().encode(
                t,
                EncodeOptions {
                    add_special: true,
                    parse_special: false,
                },
            )),
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Texts(v) if v.len() == 1 => Self::completion_prompt(engine, &Prompt::Text(v[0].clone())),
            Prompt::TokenLists(v) if v.len() == 1 => Ok(v[0].clone()),
            _ => Err(invalid(
                "local models take one prompt per request; send several requests for several prompts",
            )),
        }
    }

    async fn completion_receivers(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<Submitted, UpstreamError> {
        let knobs = completion_knobs(req)?;
        let engine = self.engine(model).await?;
        let prompt = Self::completion_prompt(&engine, &req.prompt)?;
        let echo = if req.echo == Some(true) {
            engine.tokenizer().decode(&prompt, true)
        } else {
            String::new()
        };
        Ok(Submitted {
            receivers: self.submit(&engine, prompt, &knobs)?,
            tokenizer: engine.tokenizer().clone(),
            logprobs: knobs.logprobs.is_some(),
            echo,
        })
    }
}

fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

impl ProviderApi for LocalProvider {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            legacy_completions: true,
            embeddings: true,
        }
    }

    async fn chat(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChatCompletionResponse, UpstreamError> {
        let started = Instant::now();
        let sub = self.chat_receivers(req, model).await?;
        let results = futures::future::try_join_all(sub.receivers.into_iter().map(collect)).await?;
        let prompt = results.first().map_or(0, |g| g.prompt_tokens);
        let completion = results.iter().map(|g| g.completion_tokens).sum();
        let ttft = results
            .iter()
            .filter_map(|g| g.first_token_ms)
            .reduce(f64::min);
        Ok(ChatCompletionResponse {
            id: response_id("chatcmpl"),
            object: "chat.completion".into(),
            created: unix_now(),
            model: model.to_string(),
            choices: (0u32..)
                .zip(results)
                .map(|(index, g)| ChatChoice {
                    index,
                    logprobs: sub
                        .logprobs
                        .then(|| chat_logprobs(&sub.tokenizer, &g.logprobs)),
                    message: ResponseMessage {
                        role: "assistant".into(),
                        content: Some(g.text),
                        ..ResponseMessage::default()
                    },
                    finish_reason: Some(finish_str(g.finish_reason)),
                })
                .collect(),
            usage: Some(usage(prompt, completion, started, ttft)),
            system_fingerprint: None,
            extra: Map::new(),
        })
    }

    async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
        model: &str,
    ) -> Result<ChunkStream, UpstreamError> {
        let started = Instant::now();
        let Submitted {
            receivers,
            tokenizer,
            logprobs,
            ..
        } = self.chat_receivers(req, model).await?;
        let base = ChatCompletionChunk::new(&response_id("chatcmpl"), unix_now(), model);
        let n = receivers.len() as u32;
        let heads: Vec<ChatCompletionChunk> = (0..n)
            .map(|i| {
                let delta = Delta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    ..Delta::default()
                };
                base.clone().with_delta(i, delta, None)
            })
            .collect();
        let (b1, b2) = (base.clone(), base.clone());
        let text = move |i, text, lps: Vec<TokenLogprob>| {
            let delta = Delta {
                content: Some(text),
                ..Delta::default()
            };
            let mut chunk = b1.clone().with_delta(i, delta, None);
            if logprobs {
                if let Some(c) = chunk.choices.first_mut() {
                    c.logprobs = Some(chat_logprobs(&tokenizer, &lps));
                }
            }
            chunk
        };
        let done = move |i, reason| b2.clone().with_delta(i, Delta::default(), Some(reason));
        let usage = move |u| ChatCompletionChunk {
            usage: Some(u),
            ..base.clone()
        };
        Ok(event_stream(receivers, started, heads, text, done, usage))
    }

    async fn completion(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionResponse, UpstreamError> {
        let started = Instant::now();
        let sub = self.completion_receivers(req, model).await?;
        let echo = sub.echo.as_str();
        let results = futures::future::try_join_all(sub.receivers.into_iter().map(collect)).await?;
        let prompt = results.first().map_or(0, |g| g.prompt_tokens);
        let completion = results.iter().map(|g| g.completion_tokens).sum();
        let ttft = results
            .iter()
            .filter_map(|g| g.first_token_ms)
            .reduce(f64::min);
        Ok(CompletionResponse {
            id: response_id("cmpl"),
            object: CompletionResponse::object(),
            created: unix_now(),
            model: model.to_string(),
            choices: (0u32..)
                .zip(results)
                .map(|(index, g)| CompletionChoice {
                    index,
                    logprobs: sub.logprobs.then(|| {
                        completion_logprobs(&sub.tokenizer, &g.logprobs, echo.chars().count())
                    }),
                    text: format!("{echo}{}", g.text),
                    finish_reason: Some(finish_str(g.finish_reason)),
                })
                .collect(),
            usage: Some(usage(prompt, completion, started, ttft)),
            system_fingerprint: None,
            extra: Map::new(),
        })
    }

    async fn completion_stream(
        &self,
        req: &CompletionRequest,
        model: &str,
    ) -> Result<CompletionStream, UpstreamError> {
        let started = Instant::now();
        let Submitted {
            receivers,
            tokenizer,
            logprobs,
            echo,
        } = self.completion_receivers(req, model).await?;
        let base = CompletionResponse {
            id: response_id("cmpl"),
            object: CompletionResponse::object(),
            created: unix_now(),
            model: model.to_string(),
            choices: Vec::new(),
            usage: None,
            system_fingerprint: None,
            extra: Map::new(),
        };
        let chunk = move |index: u32, text: String, finish_reason: Option<String>| {
            let mut c = base.clone();
            c.choices.push(CompletionChoice {
                index,
                text,
                logprobs: None,
                finish_reason,
            });
            c
        };
        let n = receivers.len() as u32;
        let heads: Vec<CompletionResponse> = if echo.is_empty() {
            Vec::new()
        } else {
            (0..n).map(|i| chunk(i, echo.clone(), None)).collect()
        };
        let usage_base = chunk(0, String::new(), None);
        let usage = move |u| CompletionResponse {
            choices: Vec::new(),
            usage: Some(u),
            ..usage_base.clone()
        };
        // Where each choice's next token starts, for `text_offset`.
        let offsets = std::sync::Mutex::new(vec![echo.chars().count(); n as usize]);
        let text_chunk = chunk.clone();
        let text = move |i: u32, t: String, lps: Vec<TokenLogprob>| {
            let mut c = text_chunk(i, t, None);
            if logprobs {
                let mut offsets = offsets.lock().unwrap_or_else(|e| e.into_inner());
                let at = offsets.get(i as usize).copied().unwrap_or(0);
                let lp = completion_logprobs(&tokenizer, &lps, at);
                let used: usize = lp["tokens"].as_array().map_or(0, |v| {
                    v.iter()
                        .filter_map(Value::as_str)
                        .map(|t| t.chars().count())
                        .sum()
                });
                if let Some(o) = offsets.get_mut(i as usize) {
                    *o = at + used;
                }
                if let Some(choice) = c.choices.first_mut() {
                    choice.logprobs = Some(lp);
                }
            }
            c
        };
        let done = move |i, reason| chunk(i, String::new(), Some(reason));
        Ok(event_stream(receivers, started, heads, text, done, usage))
    }

    async fn embeddings(
        &self,
        req: &EmbeddingRequest,
        model: &str,
    ) -> Result<EmbeddingResponse, UpstreamError> {
        let Loaded::Embedding(embedder) = self.loaded(model).await? else {
            return Err(invalid(format!(
                "`{LOCAL_PROVIDER}/{model}` is a chat model: use /v1/chat/completions"
            )));
        };
        let texts: Vec<String> = match &req.input {
            EmbeddingInput::Text(t) => vec![t.clone()],
            EmbeddingInput::Texts(t) => t.clone(),
            EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => {
                return Err(invalid(
                    "local embedding models take text input, not token ids",
                ))
            }
        };
        let dims = embedder.info().dimensions;
        if let Some(d) = req.dimensions {
            if d as usize != dims {
                return Err(invalid(format!(
                    "dimensions = {d}: `{LOCAL_PROVIDER}/{model}` produces {dims}-dimensional embeddings"
                )));
            }
        }
        let embedded = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            embedder.embed(&refs)
        })
        .await
        .map_err(|e| err(UpstreamErrorKind::Server, format!("embedding failed: {e}")))?
        .map_err(|e| match e {
            ModelError::InputTooLong { .. } => {
                err(UpstreamErrorKind::ContextWindowExceeded, e.to_string())
            }
            other => err(UpstreamErrorKind::Server, other.to_string()),
        })?;
        let tokens = embedded.prompt_tokens as u64;
        Ok(EmbeddingResponse {
            object: "list".into(),
            data: (0u32..)
                .zip(embedded.vectors)
                .map(|(i, v)| Embedding::new(i, v))
                .collect(),
            model: model.to_string(),
            usage: EmbeddingUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        })
    }
}
