//! The engine driving the real SmolLM2-135M-Instruct Q4_1 GGUF. The file comes from
//! `scripts/fetch-models.sh`; without it this test fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use airlock_models::{EncodeOptions, GgufFile, Tokenizer};
use airlock_runtime::{Engine, Event, FinishReason, GenerateRequest, SamplingParams};

fn model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh from the repository root first",
        path.display()
    );
    path
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let gguf = GgufFile::open(&model_path()).unwrap();
        Tokenizer::from_gguf(&gguf.content, &gguf.info).unwrap()
    })
}

/// Returns the concatenated streamed text and the finish reason.
async fn generate(
    engine: &Engine,
    prompt: &[u32],
    params: SamplingParams,
) -> (String, FinishReason, usize) {
    let mut rx = engine
        .submit(GenerateRequest {
            prompt_tokens: prompt.to_vec(),
            params,
        })
        .unwrap();
    let mut text = String::new();
    let mut token_events = 0;
    let mut ids = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("generation finished within 120 s")
            .expect("the stream ends with Done or Error");
        match event {
            Event::Token { text: t, token, .. } => {
                text.push_str(&t);
                ids.push(token);
                token_events += 1;
            }
            Event::Done {
                finish_reason,
                completion_tokens,
                ..
            } => {
                assert!(completion_tokens >= token_events);
                assert_eq!(text, tokenizer().decode(&ids, true), "stream == final text");
                return (text, finish_reason, completion_tokens);
            }
            Event::Error(e) => panic!("generation failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn smollm2_generates_reproducibly_through_the_engine() {
    let model = airlock_models::load(model_path()).unwrap();
    let prompt = model.tokenizer().encode(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        EncodeOptions::PROMPT,
    );
    let tokenizer_check = model.tokenizer().decode(&prompt, false);
    assert!(tokenizer_check.contains("capital of France"));
    let engine = Engine::start(model, 4);

    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 16,
        ..SamplingParams::default()
    };
    let (a, reason, n) = generate(&engine, &prompt, greedy.clone()).await;
    let (b, _, _) = generate(&engine, &prompt, greedy).await;
    eprintln!("greedy: {a:?} ({reason:?}, {n} tokens)");
    assert!(!a.is_empty());
    assert_eq!(a, b, "greedy generation is deterministic");
    assert!(n <= 16);
    if reason == FinishReason::Length {
        assert_eq!(n, 16);
    }

    let seeded = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(1234),
        max_tokens: 16,
        ..SamplingParams::default()
    };
    let (c, _, _) = generate(&engine, &prompt, seeded.clone()).await;
    let (d, _, _) = generate(&engine, &prompt, seeded).await;
    eprintln!("seeded: {c:?}");
    assert_eq!(c, d, "the same seed gives the same text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_equal_the_same_requests_one_by_one() {
    let model = airlock_models::load(model_path()).unwrap();
    // Four at once on their own KV caches, the rest queued.
    let engine = Engine::start_batched(model, 8, 4);
    let questions = [
        "What is the capital of France?",
        "Name a colour.",
        "Count to five.",
        "Say hello in Spanish.",
        "What is 3 + 4?",
        "Write one word about the sea.",
        "Who wrote Hamlet?",
        "What do bees make?",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            let text = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
            tokenizer().encode(&text, EncodeOptions::PROMPT)
        })
        .collect();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 12,
        ..SamplingParams::default()
    };
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(generate(&engine, p, params.clone()).await);
    }
    // join_all polls every future before any finishes: all eight are queued at once.
    let together =
        futures::future::join_all(prompts.iter().map(|p| generate(&engine, p, params.clone())))
            .await;
    assert_eq!(together, alone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_request_does_not_wait_for_a_long_one_to_finish() {
    let model = airlock_models::load(model_path()).unwrap();
    let engine = Engine::start_batched(model, 4, 2);
    let prompt = |q: &str| {
        tokenizer().encode(
            &format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
            EncodeOptions::PROMPT,
        )
    };
    let long_params = SamplingParams {
        temperature: 0.0,
        max_tokens: 400,
        ..SamplingParams::default()
    };
    let mut long = engine
        .submit(GenerateRequest {
            prompt_tokens: prompt("Write a long story about a dragon."),
            params: long_params,
        })
        .unwrap();
    // Let the long one get going.
    for _ in 0..3 {
        assert!(matches!(long.recv().await, Some(Event::Token { .. })));
    }
    let short = generate(
        &engine,
        &prompt("Say hi."),
        SamplingParams {
            temperature: 0.0,
            max_tokens: 4,
            ..SamplingParams::default()
        },
    )
    .await;
    assert!(short.2 >= 1, "the short request finished");
    // The long one is still running: its Done has not come yet.
    let mut seen_done = false;
    while let Ok(ev) = long.try_recv() {
        seen_done |= matches!(ev, Event::Done { .. });
    }
    assert!(!seen_done, "the short request overtook the long one");
    assert!(engine.queue_depth() >= 1, "the long one still counts");
}
