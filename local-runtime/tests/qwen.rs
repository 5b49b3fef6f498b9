//! Tiny random-weight Qwen 2 and Qwen 3 GGUF files (`support/tiny_qwen.rs` of the
//! models crate) through the runtime: registration accepts both architectures as chat
//! models, and the engine ends a generation on either of Qwen's end tokens
//! (`<|im_end|>`, the file's EOS, and `<|endoftext|>`, which is not).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate

#[path = "../../models/tests/support/tiny_qwen.rs"]
mod tiny_qwen;

use std::collections::HashMap;

use airlock_runtime::models::{load, EncodeOptions};
use airlock_runtime::{
    Engine, Event, FinishReason, GenerateRequest, Manifest, ModelKind, SamplingParams, WeightFormat,
};

#[test]
fn manifest_accepts_qwen2_and_qwen3_as_chat() {
    let dir = tempfile::tempdir().unwrap();
    for shape in [tiny_qwen::QWEN2, tiny_qwen::QWEN3] {
        let path = dir.path().join(format!("{}.gguf", shape.arch));
        tiny_qwen::write_gguf(&path, &shape, &tiny_qwen::Tweaks::default());
        let manifest = Manifest::inspect(&path, "tiny-qwen", &mut |_, _| {}).unwrap();
        assert_eq!(manifest.kind, ModelKind::Chat);
        assert_eq!(manifest.format, WeightFormat::Gguf);
        assert_eq!(manifest.architecture, shape.arch);
        assert_eq!(manifest.context_length, Some(shape.context));
        assert_eq!(manifest.files.len(), 1);
    }
}

/// Runs one greedy request; returns the finish reason and the completion tokens.
async fn run(engine: &Engine, prompt: &[u32], bias: &[(u32, f32)]) -> (FinishReason, Vec<u32>) {
    let mut rx = engine
        .submit(GenerateRequest {
            prompt_tokens: prompt.to_vec(),
            params: SamplingParams {
                temperature: 0.0,
                max_tokens: 6,
                logit_bias: bias.iter().copied().collect::<HashMap<_, _>>(),
                ..SamplingParams::default()
            },
        })
        .unwrap();
    let mut tokens = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token { token, .. } => tokens.push(token),
            Event::Done { finish_reason, .. } => return (finish_reason, tokens),
            Event::Error(e) => panic!("{e}"),
        }
    }
    panic!("no Done event");
}

#[tokio::test]
async fn generation_ends_on_either_qwen_end_token() {
    let dir = tempfile::tempdir().unwrap();
    let im_end = tiny_qwen::special_id("<|im_end|>");
    let eot = tiny_qwen::special_id("<|endoftext|>");
    for shape in [tiny_qwen::QWEN2, tiny_qwen::QWEN3] {
        let path = dir.path().join(format!("{}.gguf", shape.arch));
        tiny_qwen::write_gguf(&path, &shape, &tiny_qwen::Tweaks::default());
        let engine = Engine::start(load(&path).unwrap(), 4);
        let prompt = engine.tokenizer().encode(
            "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n",
            EncodeOptions::PROMPT,
        );
        let banned = [(im_end, -100.0), (eot, -100.0)];
        let (reason, tokens) = run(&engine, &prompt, &banned).await;
        assert_eq!((reason, tokens.len()), (FinishReason::Length, 6));
        for end in [im_end, eot] {
            let (reason, tokens) = run(&engine, &prompt, &[(end, 100.0)]).await;
            assert_eq!(reason, FinishReason::Stop, "{} {end}", shape.arch);
            assert!(
                tokens.is_empty(),
                "the end token is not emitted: {tokens:?}"
            );
        }
    }
}
