//! The engine: one dedicated thread per model, fed by a bounded queue.
//!
//! Invariants: the thread owns the model and runs one request at a time (continuous
//! batching is a later step); admission never blocks (a full queue is `Overloaded` at
//! once); requests that cannot fit the context are refused at submit, never truncated;
//! the KV cache is reset before every request; a request whose receiver is gone is
//! cancelled before its next step; a panic in the model becomes `Event::Error` and the
//! thread goes on serving.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use airlock_models::{ChatTemplate, LanguageModel, ModelInfo, StreamDecoder, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::sampling::{Logprobs, Sampler, SamplingParams, TokenLogprob};
use crate::stop::StopMatcher;
use crate::RuntimeError;

/// A tokenized prompt and how to continue it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What a request streams back.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text that became safe to emit (after UTF-8 completion and stop-string
    /// hold-back; may be empty) when `token` arrived. One per generated token, plus one
    /// carrying the end token when it releases held-back text. `logprob` is set when
    /// the request asked for log-probabilities (never for the end token).
    Token {
        text: String,
        token: u32,
        logprob: Option<TokenLogprob>,
    },
    /// The last event of a successful request.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        /// Every token sampled, the end token included.
        completion_tokens: usize,
        /// Completion tokens over the whole request time (prefill included).
        tokens_per_second: f64,
        time_to_first_token: Duration,
    },
    /// The request failed; nothing follows.
    Error(String),
}

struct Job {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    _ticket: Ticket,
}

/// Requests queued or running, and when the last one ended.
#[derive(Debug)]
struct Activity {
    depth: AtomicUsize,
    last_done: std::sync::Mutex<Instant>,
}

/// Counts a request from submit until its job is dropped (finished, failed, skipped).
struct Ticket(Arc<Activity>);

impl Ticket {
    fn new(activity: &Arc<Activity>) -> Ticket {
        activity.depth.fetch_add(1, Ordering::Relaxed);
        Ticket(activity.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        *self.0.last_done.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.depth.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handle to one model's engine thread. Dropping it lets the thread finish the
/// queued requests and exit.
#[derive(Debug)]
pub struct Engine {
    queue: SyncSender<Job>,
    context: usize,
    vocab_size: usize,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    activity: Arc<Activity>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the engine thread; at most `queue_capacity` (at least 1) requests wait.
    pub fn start(model: Box<dyn LanguageModel>, queue_capacity: usize) -> Engine {
        let context = model.max_context();
        let vocab_size = model.tokenizer().vocab_size().max(model.info().vocab_size);
        let info = model.info().clone();
        let tokenizer = model.tokenizer().clone();
        let template = model.chat_template().clone();
        let (queue, jobs) = sync_channel(queue_capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("airlock-engine".into())
            .spawn(move || run(model, jobs))
            .ok();
        Engine {
            queue,
            context,
            vocab_size,
            info,
            tokenizer,
            template,
            activity: Arc::new(Activity {
                depth: AtomicUsize::new(0),
                last_done: std::sync::Mutex::new(Instant::now()),
            }),
            thread,
        }
    }

    /// The model's context in tokens.
    pub fn max_context(&self) -> usize {
        self.context
    }

    /// The model's metadata.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's tokenizer, for encoding prompts outside the engine thread.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The model's chat template.
    pub fn chat_template(&self) -> &Arc<ChatTemplate> {
        &self.template
    }

    /// Requests queued or running.
    pub fn queue_depth(&self) -> usize {
        self.activity.depth.load(Ordering::Relaxed)
    }

    /// When the last request ended (or the engine started, before any did).
    pub fn last_done(&self) -> Instant {
        *self
            .activity
            .last_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Validates and queues a request; never blocks.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<UnboundedReceiver<Event>, RuntimeError> {
        if self.thread.is_none() {
            return Err(RuntimeError::EngineStopped);
        }
        if request.prompt_tokens.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        request.params.validate(self.vocab_size)?;
        if let Some(&bad) = request
            .prompt_tokens
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(RuntimeError::InvalidParam {
                param: "prompt",
                message: format!(
                    "token {bad} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            });
        }
        let prompt = request.prompt_tokens.len();
        let max_tokens = request.params.max_tokens;
        if prompt.saturating_add(max_tokens) > self.context {
            return Err(RuntimeError::ContextOverflow {
                prompt,
                max_tokens,
                context: self.context,
            });
        }
        let (events, receiver) = unbounded_channel();
        let job = Job {
            request,
            events,
            _ticket: Ticket::new(&self.activity),
        };
        match self.queue.try_send(job) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => Err(RuntimeError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(RuntimeError::EngineStopped),
        }
    }
}

/// Special tokens that end a sequence in the families we serve.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "</s>",
];

fn end_tokens(model: &dyn LanguageModel) -> Vec<u32> {
    let tok = model.tokenizer();
    let mut ids: Vec<u32> = END_TOKENS
        .iter()
        .filter_map(|t| tok.token_id(t))
        .filter(|&id| tok.is_special(id))
        .collect();
    ids.extend(tok.eos_token_id());
    ids.extend(model.info().eos_token_id);
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn run(mut model: Box<dyn LanguageModel>, jobs: Receiver<Job>) {
    let ends = catch_unwind(AssertUnwindSafe(|| end_tokens(model.as_ref()))).unwrap_or_default();
    while let Ok(job) = jobs.recv() {
        if job.events.is_closed() {
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            model.reset();
            generate(model.as_mut(), &ends, &job)
        }));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(message)) => Some(message),
            Err(panic) => Some(format!("the model panicked: {}", panic_message(&panic))),
        };
        if let Some(message) = error {
            let _ = job.events.send(Event::Error(message));
        }
        // Leave no state behind, even after a panic mid-forward.
        let _ = catch_unwind(AssertUnwindSafe(|| model.reset()));
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs one request; `Err` is a message for `Event::Error`. Returns `Ok` when the
/// client went away (there is no one to tell).
fn generate(model: &mut dyn LanguageModel, ends: &[u32], job: &Job) -> Result<(), String> {
    let start = Instant::now();
    let GenerateRequest {
        prompt_tokens,
        params,
    } = &job.request;
    let max_tokens = params.max_tokens;
    let mut sampler = Sampler::new(params.clone());
    let mut stops = StopMatcher::new(&params.stop);
    let mut decoder = StreamDecoder::new(true);
    let mut generated: Vec<u32> = Vec::with_capacity(max_tokens.min(4096));
    let mut first_token_at = None;

    let mut logits = model
        .forward(prompt_tokens, 0)
        .map_err(|e| format!("forward pass failed: {e}"))?;
    let finish_reason = loop {
        if job.events.is_closed() {
            return Ok(());
        }
        // Log-probabilities are of the model's own distribution: taken before the
        // sampler applies bias, penalties and temperature in place.
        let summary = params.logprobs.map(|k| Logprobs::new(&logits, k));
        let raw: Option<Vec<f32>> = summary.as_ref().map(|_| logits.clone());
        let token = sampler.sample(&mut logits, &generated);
        let logprob = summary.zip(raw).map(|(s, raw)| {
            let logit = raw
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            s.for_token(token, logit)
        });
        generated.push(token);
        first_token_at.get_or_insert_with(|| start.elapsed());
        if ends.contains(&token) {
            let rest = stops.push(&decoder.finish());
            let text = if rest.stopped {
                rest.text
            } else {
                rest.text + &stops.finish()
            };
            if !text.is_empty() {
                let _ = job.events.send(Event::Token {
                    text,
                    token,
                    logprob: None,
                });
            }
            break FinishReason::Stop;
        }
        let piece = decoder.push(model.tokenizer(), token);
        let mut out = stops.push(&piece);
        let last = generated.len() >= max_tokens;
        if last && !out.stopped {
            let tail = stops.push(&std::mem::take(&mut decoder).finish());
            out.text.push_str(&tail.text);
            out.stopped = tail.stopped;
            if !tail.stopped {
                out.text.push_str(&stops.finish());
            }
        }
        if job
            .events
            .send(Event::Token {
                text: out.text,
                token,
                logprob,
            })
            .is_err()
        {
            return Ok(());
        }
        if out.stopped {
            break FinishReason::Stop;
        }
        if last {
            break FinishReason::Length;
        }
        let pos = model.cached_tokens();
        logits = model
            .forward(&[token], pos)
            .map_err(|e| format!("forward pass failed: {e}"))?;
    };
    let elapsed = start.elapsed().as_secs_f64();
    let _ = job.events.send(Event::Done {
        finish_reason,
        prompt_tokens: prompt_tokens.len(),
        completion_tokens: generated.len(),
        tokens_per_second: if elapsed > 0.0 {
            generated.len() as f64 / elapsed
        } else {
            0.0
        },
        time_to_first_token: first_token_at.unwrap_or_default(),
    });
    Ok(())
}
