//! The engine: one dedicated thread per model, fed by a bounded queue.
//!
//! Invariants: the thread owns the model and up to `max_batch` handles on it
//! ([`LanguageModel::fork`]: shared weights, one KV cache each); every running
//! request takes one step per iteration (a prefill chunk of at most [`PREFILL_CHUNK`]
//! tokens, or one decoded token), all of them in one
//! [`airlock_models::forward_batch`] pass (continuous batching: requests join and
//! leave between steps), so a new request starts while others are decoding and its
//! time to first token does not wait for theirs to finish; rows of a batch never see
//! each other, so a sequence's text is the same whatever runs beside it. Admission never blocks (a
//! full queue is `Overloaded` at once); requests that cannot fit the context are
//! refused at submit, never truncated; a handle's KV cache is reset before every
//! request; a request whose receiver is gone is cancelled before its next step; a
//! panic in the model becomes `Event::Error` and the thread goes on serving.

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
    /// Starts the engine thread running one request at a time; at most
    /// `queue_capacity` (at least 1) requests wait.
    pub fn start(model: Box<dyn LanguageModel>, queue_capacity: usize) -> Engine {
        Engine::start_batched(model, queue_capacity, 1)
    }

    /// Starts the engine thread running up to `max_batch` requests together (when the
    /// model can [`fork`](LanguageModel::fork) handles; one otherwise), each on its own
    /// KV cache, stepped in turn; at most `queue_capacity` more wait.
    pub fn start_batched(
        model: Box<dyn LanguageModel>,
        queue_capacity: usize,
        max_batch: usize,
    ) -> Engine {
        let context = model.max_context();
        let vocab_size = model.tokenizer().vocab_size().max(model.info().vocab_size);
        let info = model.info().clone();
        let tokenizer = model.tokenizer().clone();
        let template = model.chat_template().clone();
        let (queue, jobs) = sync_channel(queue_capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("airlock-engine".into())
            .spawn(move || run(model, jobs, max_batch))
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

/// Prompt tokens per prefill step: a long prompt is prefilled over several steps so
/// the other sequences keep decoding meanwhile.
pub const PREFILL_CHUNK: usize = 256;

/// One request in progress on its own model handle (its own KV cache).
struct Slot {
    job: Job,
    model: Box<dyn LanguageModel>,
    start: Instant,
    sampler: Sampler,
    stops: StopMatcher,
    decoder: StreamDecoder,
    generated: Vec<u32>,
    first_token_at: Option<Duration>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Prompt tokens of the chunk in flight (0 when decoding).
    prefilling: usize,
    /// Logits of the last position run; empty until the prompt is prefilled.
    logits: Vec<f32>,
}

/// What a slot needs next.
enum Step {
    /// These tokens run through the model (a prefill chunk, or the token just
    /// sampled) before the slot can go on.
    Forward(Vec<u32>),
    /// Finished (Done sent) or cancelled (no one to tell).
    Over,
}

/// The engine loop: admits queued requests while it has model handles free, then
/// runs one step for every running request together: each says what it needs (a
/// prefill chunk, or the token it just sampled and emitted) and one
/// [`airlock_models::forward_batch`] call runs them all, the weights read once for
/// every row. A new request thus starts without waiting for the ones before it, and
/// decoding many sequences costs little more than one.
fn run(model: Box<dyn LanguageModel>, jobs: Receiver<Job>, max_batch: usize) {
    let ends = catch_unwind(AssertUnwindSafe(|| end_tokens(model.as_ref()))).unwrap_or_default();
    // One handle per concurrent sequence; forks share the weights.
    let mut spare = vec![model];
    while spare.len() < max_batch.max(1) {
        match catch_unwind(AssertUnwindSafe(|| spare[0].fork())) {
            Ok(Some(m)) => spare.push(m),
            _ => break,
        }
    }
    let mut active: Vec<Slot> = Vec::new();
    loop {
        while let Some(model) = spare.pop() {
            let job = if active.is_empty() {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(_) => {
                        spare.push(model);
                        break;
                    }
                }
            };
            if job.events.is_closed() {
                spare.push(model);
                continue;
            }
            active.push(Slot::new(job, model));
        }
        // Each slot says what it needs; finished and failed ones leave.
        let mut wanted: Vec<Vec<u32>> = Vec::with_capacity(active.len());
        let mut i = 0;
        while i < active.len() {
            let outcome = catch_unwind(AssertUnwindSafe(|| active[i].next(&ends)));
            let error = match outcome {
                Ok(Ok(Step::Forward(tokens))) => {
                    wanted.push(tokens);
                    i += 1;
                    continue;
                }
                Ok(Ok(Step::Over)) => None,
                Ok(Err(message)) => Some(message),
                Err(panic) => Some(format!("the model panicked: {}", panic_message(&panic))),
            };
            let slot = active.swap_remove(i);
            retire(slot, error, &mut spare);
        }
        if active.is_empty() {
            if spare.is_empty() {
                return;
            }
            continue;
        }
        // One pass for everyone.
        let results = {
            let mut models: Vec<&mut (dyn LanguageModel + 'static)> =
                active.iter_mut().map(|s| s.model.as_mut()).collect();
            let tokens: Vec<&[u32]> = wanted.iter().map(Vec::as_slice).collect();
            catch_unwind(AssertUnwindSafe(|| {
                airlock_models::forward_batch(&mut models, &tokens)
            }))
        };
        let results: Vec<Result<Vec<f32>, String>> = match results {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(|e| format!("forward pass failed: {e}")))
                .collect(),
            Err(panic) => {
                let message = format!("the model panicked: {}", panic_message(&panic));
                vec![Err(message); active.len()]
            }
        };
        let mut failed = Vec::new();
        for (i, (slot, result)) in active.iter_mut().zip(results).enumerate() {
            match result {
                Ok(logits) => slot.absorb(logits),
                Err(message) => failed.push((i, message)),
            }
        }
        for (i, message) in failed.into_iter().rev() {
            let slot = active.swap_remove(i);
            retire(slot, Some(message), &mut spare);
        }
    }
}

/// Ends a slot: tells its client about an error, and gives its handle back clean.
fn retire(mut slot: Slot, error: Option<String>, spare: &mut Vec<Box<dyn LanguageModel>>) {
    if let Some(message) = error {
        let _ = slot.job.events.send(Event::Error(message));
    }
    // Leave no state behind, even after a panic mid-forward; a handle broken beyond
    // reset is dropped (the loop ends when none is left).
    if catch_unwind(AssertUnwindSafe(|| slot.model.reset())).is_ok() {
        spare.push(slot.model);
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Slot {
    fn new(job: Job, mut model: Box<dyn LanguageModel>) -> Slot {
        model.reset();
        let params = &job.request.params;
        Slot {
            start: Instant::now(),
            sampler: Sampler::new(params.clone()),
            stops: StopMatcher::new(&params.stop),
            decoder: StreamDecoder::new(true),
            generated: Vec::with_capacity(params.max_tokens.min(4096)),
            first_token_at: None,
            prefilled: 0,
            prefilling: 0,
            logits: Vec::new(),
            job,
            model,
        }
    }

    /// The logits of the tokens [`next`](Self::next) asked for.
    fn absorb(&mut self, logits: Vec<f32>) {
        self.prefilled += std::mem::take(&mut self.prefilling);
        self.logits = logits;
    }

    /// What this slot needs next: the next prefill chunk, or (once the prompt is in)
    /// one token sampled, emitted, and then run. `Err` is a message for
    /// `Event::Error`.
    fn next(&mut self, ends: &[u32]) -> Result<Step, String> {
        if self.job.events.is_closed() {
            return Ok(Step::Over);
        }
        let prompt = &self.job.request.prompt_tokens;
        if self.prefilled < prompt.len() {
            let end = (self.prefilled + PREFILL_CHUNK).min(prompt.len());
            self.prefilling = end - self.prefilled;
            return Ok(Step::Forward(prompt[self.prefilled..end].to_vec()));
        }
        let params = &self.job.request.params;
        // Log-probabilities are of the model's own distribution: taken before the
        // sampler applies bias, penalties and temperature in place.
        let summary = params.logprobs.map(|k| Logprobs::new(&self.logits, k));
        let raw: Option<Vec<f32>> = summary.as_ref().map(|_| self.logits.clone());
        let token = self.sampler.sample(&mut self.logits, &self.generated);
        let logprob = summary.zip(raw).map(|(s, raw)| {
            let logit = raw
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            s.for_token(token, logit)
        });
        self.generated.push(token);
        let start = self.start;
        self.first_token_at.get_or_insert_with(|| start.elapsed());
        if ends.contains(&token) {
            let rest = self.stops.push(&std::mem::take(&mut self.decoder).finish());
            let text = if rest.stopped {
                rest.text
            } else {
                rest.text + &self.stops.finish()
            };
            if !text.is_empty() {
                let _ = self.job.events.send(Event::Token {
                    text,
                    token,
                    logprob: None,
                });
            }
            return Ok(self.done(FinishReason::Stop));
        }
        let piece = self.decoder.push(self.model.tokenizer(), token);
        let mut out = self.stops.push(&piece);
        let last = self.generated.len() >= params.max_tokens;
        if last && !out.stopped {
            let tail = self.stops.push(&std::mem::take(&mut self.decoder).finish());
            out.text.push_str(&tail.text);
            out.stopped = tail.stopped;
            if !tail.stopped {
                out.text.push_str(&self.stops.finish());
            }
        }
        let sent = self.job.events.send(Event::Token {
            text: out.text,
            token,
            logprob,
        });
        if sent.is_err() {
            return Ok(Step::Over);
        }
        if out.stopped {
            return Ok(self.done(FinishReason::Stop));
        }
        if last {
            return Ok(self.done(FinishReason::Length));
        }
        Ok(Step::Forward(vec![token]))
    }

    fn done(&self, finish_reason: FinishReason) -> Step {
        let elapsed = self.start.elapsed().as_secs_f64();
        let completion = self.generated.len();
        let _ = self.job.events.send(Event::Done {
            finish_reason,
            prompt_tokens: self.job.request.prompt_tokens.len(),
            completion_tokens: completion,
            tokens_per_second: if elapsed > 0.0 {
                completion as f64 / elapsed
            } else {
                0.0
            },
            time_to_first_token: self.first_token_at.unwrap_or_default(),
        });
        Step::Over
    }
}
