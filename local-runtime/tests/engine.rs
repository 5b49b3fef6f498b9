//! The engine against a tiny fake model: a 12-token byte-level vocabulary and logits
//! that follow a fixed script, so every outcome is known in advance.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use airlock_models::tokenizer::{PreTokenizer, TokenType, TokenizerConfig};
use airlock_models::{ChatTemplate, LanguageModel, ModelError, ModelInfo, Tokenizer};
use airlock_runtime::{Engine, Event, FinishReason, GenerateRequest, RuntimeError, SamplingParams};
use tokio::sync::mpsc::UnboundedReceiver;

const IM_END: u32 = 1;
const HELLO: u32 = 3;
const WORLD: u32 = 4;
const SP_S: u32 = 5;
const TO: u32 = 6;
const P: u32 = 7;
const BANG: u32 = 8;
const E_ACUTE_1: u32 = 9;
const E_ACUTE_2: u32 = 10;
const AGAIN: u32 = 11;

fn tokenizer() -> Tokenizer {
    let tokens = [
        "<unk>",
        "<|im_end|>",
        "<|endoftext|>",
        "Hello",
        "Ġworld",
        "ĠS",
        "TO",
        "P",
        "!",
        "Ã",
        "©",
        "Ġagain",
    ];
    let mut token_types = vec![TokenType::Normal; tokens.len()];
    token_types[..3].fill(TokenType::Control);
    Tokenizer::new(TokenizerConfig {
        tokens: tokens.iter().map(|t| t.to_string()).collect(),
        token_types,
        merges: Vec::new(),
        pre: PreTokenizer::Gpt2,
        bos_token_id: None,
        eos_token_id: Some(2),
        unknown_token_id: Some(0),
        add_bos_token: false,
        add_space_prefix: false,
    })
    .unwrap()
}

#[derive(Debug, Default)]
struct Behaviour {
    /// Preferred token at each generated position; then `AGAIN` forever.
    script: Vec<u32>,
    /// All logits equal: sampling decides everything.
    flat: bool,
    /// Panic in the prefill of a prompt starting with this token.
    panic_on: Option<u32>,
    /// Told when a prefill starts; the prefill then waits for `release`.
    entered: Option<mpsc::Sender<()>>,
    release: Option<mpsc::Receiver<()>>,
    /// Work per forward pass.
    delay: Option<Duration>,
}

#[derive(Debug)]
struct Fake {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    context: usize,
    cached: usize,
    prompt_len: usize,
    forwards: Arc<AtomicUsize>,
    b: Behaviour,
}

impl Fake {
    fn new(context: usize, b: Behaviour) -> Self {
        let tokenizer = tokenizer();
        Self {
            info: ModelInfo {
                architecture: "fake".into(),
                name: None,
                context_length: Some(context),
                embedding_length: None,
                block_count: None,
                vocab_size: tokenizer.vocab_size(),
                tokenizer_model: "gpt2".into(),
                tokenizer_pre: None,
                bos_token_id: None,
                eos_token_id: Some(2),
                unknown_token_id: Some(0),
                padding_token_id: None,
                add_bos_token: None,
                add_space_prefix: None,
                chat_template: None,
            },
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(ChatTemplate::fallback("", "<|im_end|>").unwrap()),
            context,
            cached: 0,
            prompt_len: 0,
            forwards: Arc::default(),
            b,
        }
    }

    fn script(script: &[u32]) -> Self {
        Self::new(
            64,
            Behaviour {
                script: script.to_vec(),
                ..Behaviour::default()
            },
        )
    }
}

impl LanguageModel for Fake {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }
    fn chat_template(&self) -> &Arc<ChatTemplate> {
        &self.template
    }
    fn max_context(&self) -> usize {
        self.context
    }
    fn cached_tokens(&self) -> usize {
        self.cached
    }
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        self.forwards.fetch_add(1, Ordering::SeqCst);
        if pos != self.cached {
            return Err(ModelError::Tokenizer(format!(
                "pos {pos} but {} cached: the KV cache was not reset",
                self.cached
            )));
        }
        if pos == 0 {
            self.prompt_len = tokens.len();
            if self.b.panic_on == tokens.first().copied() {
                panic!("fake model exploded");
            }
            if let Some(entered) = &self.b.entered {
                entered.send(()).unwrap();
                self.b.release.as_ref().unwrap().recv().unwrap();
            }
        }
        if let Some(delay) = self.b.delay {
            std::thread::sleep(delay);
        }
        self.cached = pos + tokens.len();
        let mut logits = vec![0.0; self.tokenizer.vocab_size()];
        if !self.b.flat {
            let step = self.cached - self.prompt_len;
            logits[*self.b.script.get(step).unwrap_or(&AGAIN) as usize] = 10.0;
        }
        Ok(logits)
    }
    fn reset(&mut self) {
        self.cached = 0;
    }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    }
}

fn request(params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt_tokens: vec![HELLO, WORLD],
        params,
    }
}

struct Outcome {
    text: String,
    tokens: Vec<u32>,
    texts: Vec<String>,
    done: Event,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Outcome {
    let mut out = Outcome {
        text: String::new(),
        tokens: Vec::new(),
        texts: Vec::new(),
        done: Event::Error("no end".into()),
    };
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the engine answered within 20 s")
            .expect("the stream ends with Done or Error");
        match event {
            Event::Token { text, token, .. } => {
                out.text.push_str(&text);
                out.texts.push(text);
                out.tokens.push(token);
            }
            end => {
                out.done = end;
                return out;
            }
        }
    }
}

fn finish(done: &Event) -> (FinishReason, usize, usize) {
    match done {
        Event::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
            ..
        } => (*finish_reason, *prompt_tokens, *completion_tokens),
        other => panic!("expected Done, got {other:?}"),
    }
}

#[tokio::test]
async fn greedy_is_deterministic_and_eos_stops() {
    let engine = Engine::start(Box::new(Fake::script(&[HELLO, WORLD, BANG, IM_END])), 4);
    let a = collect(engine.submit(request(greedy(10))).unwrap()).await;
    let b = collect(engine.submit(request(greedy(10))).unwrap()).await;
    assert_eq!(a.text, "Hello world!");
    assert_eq!(a.text, b.text);
    assert_eq!(a.tokens, vec![HELLO, WORLD, BANG]);
    assert_eq!(finish(&a.done), (FinishReason::Stop, 2, 4));
}

#[tokio::test]
async fn max_tokens_gives_length_with_exact_counts() {
    let engine = Engine::start(Box::new(Fake::script(&[HELLO])), 4);
    let out = collect(engine.submit(request(greedy(3))).unwrap()).await;
    assert_eq!(out.text, "Hello again again");
    assert_eq!(out.tokens.len(), 3);
    assert_eq!(finish(&out.done), (FinishReason::Length, 2, 3));
}

#[tokio::test]
async fn stop_string_across_tokens_is_never_leaked() {
    let engine = Engine::start(Box::new(Fake::script(&[HELLO, SP_S, TO, P, BANG])), 4);
    let params = SamplingParams {
        stop: vec!["STOP".into()],
        ..greedy(10)
    };
    let out = collect(engine.submit(request(params)).unwrap()).await;
    assert_eq!(out.text, "Hello ");
    assert_eq!(out.texts, vec!["Hello", " ", "", ""]);
    assert_eq!(finish(&out.done), (FinishReason::Stop, 2, 4));
}

#[tokio::test]
async fn held_back_text_is_released_at_the_end() {
    let engine = Engine::start(Box::new(Fake::script(&[HELLO, SP_S, IM_END])), 4);
    let params = SamplingParams {
        stop: vec!["STOP".into()],
        ..greedy(10)
    };
    let out = collect(engine.submit(request(params.clone())).unwrap()).await;
    assert_eq!(out.text, "Hello S");
    assert_eq!(out.tokens, vec![HELLO, SP_S, IM_END]);
    let out = collect(
        engine
            .submit(request(SamplingParams {
                max_tokens: 2,
                ..params
            }))
            .unwrap(),
    )
    .await;
    assert_eq!(out.text, "Hello S");
    assert_eq!(finish(&out.done).0, FinishReason::Length);
}

#[tokio::test]
async fn utf8_split_across_tokens_is_completed() {
    let engine = Engine::start(Box::new(Fake::script(&[E_ACUTE_1, E_ACUTE_2, IM_END])), 4);
    let out = collect(engine.submit(request(greedy(10))).unwrap()).await;
    assert_eq!(out.texts, vec!["", "é"]);
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let flat = || {
        Box::new(Fake::new(
            64,
            Behaviour {
                flat: true,
                ..Behaviour::default()
            },
        ))
    };
    let engine = Engine::start(flat(), 4);
    let seeded = |seed| {
        request(SamplingParams {
            seed: Some(seed),
            max_tokens: 24,
            logit_bias: [(IM_END, -100.0), (2, -100.0)].into(),
            ..SamplingParams::default()
        })
    };
    let a = collect(engine.submit(seeded(7)).unwrap()).await;
    let b = collect(engine.submit(seeded(7)).unwrap()).await;
    let c = collect(engine.submit(seeded(8)).unwrap()).await;
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
    assert_eq!(finish(&a.done).2, 24);
}

#[tokio::test]
async fn full_queue_is_overloaded_at_once() {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let model = Fake::new(
        64,
        Behaviour {
            script: vec![HELLO, IM_END],
            entered: Some(entered_tx),
            release: Some(release_rx),
            ..Behaviour::default()
        },
    );
    let engine = Engine::start(Box::new(model), 1);
    let first = engine.submit(request(greedy(4))).unwrap();
    entered.recv_timeout(Duration::from_secs(20)).unwrap(); // the engine is busy
    let second = engine.submit(request(greedy(4))).unwrap(); // fills the queue
    assert_eq!(
        engine.submit(request(greedy(4))).unwrap_err(),
        RuntimeError::Overloaded
    );
    release.send(()).unwrap();
    release.send(()).unwrap();
    assert_eq!(collect(first).await.text, "Hello");
    assert_eq!(collect(second).await.text, "Hello");
}

#[tokio::test]
async fn dropped_receiver_cancels_the_request() {
    let model = Fake::new(
        1_000_000,
        Behaviour {
            delay: Some(Duration::from_millis(2)),
            ..Behaviour::default()
        },
    );
    let forwards = model.forwards.clone();
    let engine = Engine::start(Box::new(model), 4);
    let mut long = engine.submit(request(greedy(100_000))).unwrap(); // ~200 s if not cancelled
    assert!(matches!(long.recv().await, Some(Event::Token { .. })));
    drop(long);
    let next = collect(engine.submit(request(greedy(3))).unwrap()).await;
    assert_eq!(finish(&next.done).0, FinishReason::Length);
    assert!(forwards.load(Ordering::SeqCst) < 5_000);
}

#[test]
fn context_overflow_is_refused_at_submit() {
    let engine = Engine::start(Box::new(Fake::new(16, Behaviour::default())), 4);
    let req = GenerateRequest {
        prompt_tokens: vec![HELLO; 10],
        params: greedy(7),
    };
    assert_eq!(
        engine.submit(req).unwrap_err(),
        RuntimeError::ContextOverflow {
            prompt: 10,
            max_tokens: 7,
            context: 16
        }
    );
    let fits = GenerateRequest {
        prompt_tokens: vec![HELLO; 10],
        params: greedy(6),
    };
    assert!(engine.submit(fits).is_ok());
    let empty = GenerateRequest {
        prompt_tokens: Vec::new(),
        params: greedy(1),
    };
    assert_eq!(engine.submit(empty).unwrap_err(), RuntimeError::EmptyPrompt);
    let bad = request(SamplingParams {
        temperature: -1.0,
        ..greedy(1)
    });
    assert!(matches!(
        engine.submit(bad),
        Err(RuntimeError::InvalidParam {
            param: "temperature",
            ..
        })
    ));
}

#[tokio::test]
async fn a_panicking_model_yields_error_and_the_engine_lives_on() {
    let model = Fake::new(
        64,
        Behaviour {
            script: vec![HELLO, IM_END],
            panic_on: Some(BANG),
            ..Behaviour::default()
        },
    );
    let engine = Engine::start(Box::new(model), 4);
    let boom = GenerateRequest {
        prompt_tokens: vec![BANG],
        params: greedy(4),
    };
    let out = collect(engine.submit(boom).unwrap()).await;
    assert!(matches!(&out.done, Event::Error(m) if m.contains("fake model exploded")));
    let out = collect(engine.submit(request(greedy(4))).unwrap()).await;
    assert_eq!(out.text, "Hello");
}
