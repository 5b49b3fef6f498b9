//! What the real-model tests share: llama.cpp reference fixtures
//! (`fixtures/<family>_tokens.json`, written by `scripts/make-llamacpp-fixture.py`
//! with llama-cpp-python) and the checks against them.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use airlock_models::{EncodeOptions, LanguageModel, Tokenizer};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Fixture {
    pub tokens: Vec<TokenCase>,
    pub greedy: Vec<GreedyCase>,
}

#[derive(Debug, Deserialize)]
pub struct TokenCase {
    pub text: String,
    pub add_bos: bool,
    pub special: bool,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct GreedyCase {
    pub question: String,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    /// llama.cpp's best-minus-second logit at each step.
    pub margins: Vec<f32>,
    pub text: String,
}

/// Reads `tests/fixtures/<family>_tokens.json`.
pub fn load_fixture(family: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/{family}_tokens.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every fixture case encodes to llama.cpp's ids.
pub fn assert_tokenizer_matches(tok: &Tokenizer, fixture: &Fixture) {
    let mut mismatches = Vec::new();
    for case in &fixture.tokens {
        let options = EncodeOptions {
            add_special: case.add_bos,
            parse_special: case.special,
        };
        let got = tok.encode(&case.text, options);
        if got != case.ids {
            mismatches.push(format!(
                "{:?} (bos {}, special {}):\n  ours      {got:?}\n  llama.cpp {:?}",
                case.text, case.add_bos, case.special, case.ids
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(fixture.tokens.len() >= 20);
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in logits.iter().enumerate() {
        if *x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of the cached sequence: up to `n` tokens, the end token
/// included when one comes.
pub fn greedy(
    model: &mut dyn LanguageModel,
    mut logits: Vec<f32>,
    n: usize,
    ends: &[u32],
) -> Vec<u32> {
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        if ends.contains(&next) {
            break;
        }
        let pos = model.cached_tokens();
        logits = model.forward(&[next], pos).unwrap();
    }
    out
}

/// Runs every fixture prompt greedily and compares with llama.cpp. A prompt agrees
/// when its whole continuation is llama.cpp's; a prompt that leaves llama.cpp's path
/// within the first `must_agree` tokens must do so at a near tie (llama.cpp's margin
/// below `near_tie` at or before that step). Returns how many prompts agree in full.
pub fn check_greedy(
    model: &mut dyn LanguageModel,
    fixture: &Fixture,
    ends: &[u32],
    must_agree: usize,
    near_tie: f32,
) -> usize {
    let (mut steps, mut seconds, mut whole) = (0usize, 0f64, 0usize);
    for case in &fixture.greedy {
        model.reset();
        let logits = model.forward(&case.prompt_ids, 0).unwrap();
        let start = Instant::now();
        let ours = greedy(model, logits, case.ids.len(), ends);
        seconds += start.elapsed().as_secs_f64();
        steps += ours.len().saturating_sub(1);
        let common = ours
            .iter()
            .zip(&case.ids)
            .take_while(|(a, b)| a == b)
            .count();
        if common == case.ids.len() {
            whole += 1;
        }
        let text = model.tokenizer().decode(&ours, true);
        eprintln!(
            "{:?}: {common}/{} tokens as llama.cpp\n  ours      {text:?}\n  llama.cpp {:?}",
            case.question,
            case.ids.len(),
            case.text
        );
        if common < case.ids.len().min(must_agree) {
            let margin = case.margins[common];
            assert!(
                case.margins[..=common].iter().any(|m| *m < near_tie),
                "{:?} leaves llama.cpp at step {common} where its margin is {margin}: \
                 ours {ours:?}, llama.cpp {:?}",
                case.question,
                case.ids
            );
        }
    }
    eprintln!(
        "{whole}/{} prompts as llama.cpp; decode {steps} tokens in {seconds:.2} s ({:.1} tok/s, one stream)",
        fixture.greedy.len(),
        steps as f64 / seconds
    );
    model.reset();
    whole
}
