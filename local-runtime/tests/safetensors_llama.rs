//! A tiny random-weight llama safetensors folder through the runtime: registration
//! classifies it as a chat model, and the engine's greedy generation is deterministic
//! and equals a greedy loop over the model itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate

#[path = "../../models/tests/support/tiny_hf.rs"]
mod tiny_hf;

use std::collections::HashMap;

use airlock_runtime::models::{load, EncodeOptions};
use airlock_runtime::{
    Engine, Event, FinishReason, GenerateRequest, Manifest, ModelKind, SamplingParams, WeightFormat,
};

#[test]
fn manifest_classifies_the_folder_as_chat() {
    let dir = tempfile::tempdir().unwrap();
    tiny_hf::write_folder(
        dir.path(),
        tiny_hf::Layout {
            sharded: true,
            ..tiny_hf::PLAIN
        },
    );
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [273, 271]}"#,
    )
    .unwrap();
    let manifest = Manifest::inspect(dir.path(), "tiny-llama", &mut |_, _| {}).unwrap();
    assert_eq!(manifest.kind, ModelKind::Chat);
    assert_eq!(manifest.format, WeightFormat::Safetensors);
    assert_eq!(manifest.architecture, "llama");
    assert_eq!(manifest.context_length, Some(tiny_hf::CONTEXT));
    let names: Vec<String> = manifest
        .files
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    manifest.verify().unwrap();
    let model = load(&manifest.path).unwrap();
    assert_eq!(model.info().eos_token_id, Some(273));
}

/// Greedy with the end tokens banned, so generation runs to `max_tokens`.
fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        logit_bias: HashMap::from([(271, -100.0), (273, -100.0)]),
        ..SamplingParams::default()
    }
}

async fn generate(engine: &Engine, prompt: &[u32], max_tokens: usize) -> (Vec<u32>, String) {
    let mut rx = engine
        .submit(GenerateRequest {
            prompt_tokens: prompt.to_vec(),
            params: params(max_tokens),
        })
        .unwrap();
    let (mut tokens, mut text) = (Vec::new(), String::new());
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token { text: t, token, .. } => {
                tokens.push(token);
                text.push_str(&t);
            }
            Event::Done { finish_reason, .. } => {
                assert_eq!(finish_reason, FinishReason::Length);
                return (tokens, text);
            }
            Event::Error(e) => panic!("{e}"),
        }
    }
    panic!("no Done event");
}

#[tokio::test]
async fn greedy_generation_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    tiny_hf::write_folder(dir.path(), tiny_hf::PLAIN);
    let engine = Engine::start(load(dir.path()).unwrap(), 4);
    assert_eq!(engine.max_context(), tiny_hf::CONTEXT);
    let prompt = engine.tokenizer().encode(
        "<|im_start|>user\nHello world<|im_end|>\n",
        EncodeOptions::PROMPT,
    );

    let (first, text) = generate(&engine, &prompt, 12).await;
    assert_eq!(first.len(), 12);
    let (second, again) = generate(&engine, &prompt, 12).await;
    assert_eq!((&first, &text), (&second, &again));

    // The same as a greedy loop over the model, one token at a time.
    let mut model = load(dir.path()).unwrap();
    let mut logits = model.forward(&prompt, 0).unwrap();
    let mut expected = Vec::new();
    for _ in 0..12 {
        logits[271] -= 100.0;
        logits[273] -= 100.0;
        let next = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        expected.push(next);
        logits = model.forward(&[next], model.cached_tokens()).unwrap();
    }
    assert_eq!(first, expected);
    assert_eq!(text, engine.tokenizer().decode(&first, false));
}
