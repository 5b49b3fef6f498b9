//! Tests against the real Gemma 3 270M Q4_K_M GGUF (`gemma3` architecture, SentencePiece
//! vocabulary of 262144 tokens, no chat template in the file). The file comes from
//! `scripts/fetch-models.sh`; without it every test here fails, saying so.
//!
//! Reference data is `fixtures/gemma3_tokens.json`, written by
//! `scripts/make-llamacpp-fixture.py gemma3` with llama-cpp-python: llama.cpp's ids for a varied
//! corpus, and its greedy continuations (with the top-2 logit margin of every step) of
//! chat prompts, two of them (617 tokens) longer than the 512-position sliding window
//! of the local attention layers. The file is the pretrained model, not the instruction-tuned
//! one: through the chat template it mostly repeats the question, llama.cpp included.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate: failing loudly is the point

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use airlock_models::{
    load, ChatMessage, EncodeOptions, GgufFile, LanguageModel, LoadOptions, ModelError,
    StreamDecoder, TensorDecoder, Tokenizer,
};
mod common;

use common::argmax;

const FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Below this top-2 logit margin (in llama.cpp's logits) a step is a near tie that
/// rounding differences may flip.
const NEAR_TIE: f32 = 0.5;
/// How far a long prefill's logits may drift from the same tokens run one by one.
const STEP_TOLERANCE: f32 = 2.0;
/// Greedy steps that must agree with llama.cpp unless a near tie comes first.
const MUST_AGREE: usize = 4;

fn model_path() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models")
        .join(FILE);
    // Missing is a failure, like the other real-model tests: CI fetches the file, and a
    // test that silently passes without its model checks nothing.
    if path.is_file() {
        Some(path)
    } else {
        panic!(
            "{} is missing; run scripts/fetch-models.sh from the repository root",
            path.display()
        )
    }
}

fn fixture() -> &'static common::Fixture {
    static FIXTURE: OnceLock<common::Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| common::load_fixture("gemma3"))
}

fn tokenizer() -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    let path = model_path()?;
    Some(TOKENIZER.get_or_init(|| {
        let gguf = GgufFile::open(&path).unwrap();
        Tokenizer::from_gguf(&gguf.content, &gguf.info).unwrap()
    }))
}

fn model() -> Option<&'static Mutex<Box<dyn LanguageModel>>> {
    static MODEL: OnceLock<Mutex<Box<dyn LanguageModel>>> = OnceLock::new();
    let path = model_path()?;
    Some(MODEL.get_or_init(|| {
        let start = Instant::now();
        let model = load(path).unwrap();
        eprintln!("loaded {FILE} in {:?}", start.elapsed());
        Mutex::new(model)
    }))
}

fn end_ids(tok: &Tokenizer) -> Vec<u32> {
    vec![
        tok.token_id("<end_of_turn>").unwrap(),
        tok.eos_token_id().unwrap(),
    ]
}

fn greedy(model: &mut dyn LanguageModel, logits: Vec<f32>, n: usize) -> Vec<u32> {
    let ends = end_ids(model.tokenizer());
    common::greedy(model, logits, n, &ends)
}

fn chat_prompt(model: &dyn LanguageModel, question: &str) -> Vec<u32> {
    let prompt = model
        .chat_template()
        .render(&[ChatMessage::new("user", question)], true)
        .unwrap();
    model.tokenizer().encode(&prompt, EncodeOptions::PROMPT)
}

#[test]
fn metadata_and_chat_markers() {
    let Some(path) = model_path() else { return };
    let info = GgufFile::open(&path).unwrap().info;
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(info.vocab_size, 262_144);
    assert_eq!(info.context_length, Some(32_768));
    assert_eq!(info.tokenizer_model, "llama");
    assert_eq!((info.bos_token_id, info.eos_token_id), (Some(2), Some(1)));
    assert_eq!(info.add_bos_token, Some(true));
    assert_eq!(info.add_space_prefix, Some(false));
    assert_eq!(info.chat_template, None);

    let tok = tokenizer().unwrap();
    assert_eq!(tok.vocab_size(), 262_144);
    let marked = EncodeOptions {
        add_special: false,
        parse_special: true,
    };
    for (text, id) in [
        ("<bos>", 2),
        ("<eos>", 1),
        ("<start_of_turn>", 105),
        ("<end_of_turn>", 106),
    ] {
        assert_eq!(tok.token_id(text), Some(id));
        assert_eq!(tok.encode(text, marked), [id]);
        assert!(tok.is_special(id), "{text}");
        assert_eq!(tok.decode(&[id], true), "");
        assert_eq!(tok.decode(&[id], false), text);
    }
    // Plain encoding keeps markers as text; BOS comes with add_special.
    assert!(tok.encode("<end_of_turn>", EncodeOptions::PLAIN).len() > 1);
    assert_eq!(tok.encode("Hi", EncodeOptions::PROMPT)[0], 2);
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let Some(tok) = tokenizer() else { return };
    common::assert_tokenizer_matches(tok, fixture());
}

#[test]
fn tokenizer_round_trips_a_varied_corpus() {
    let Some(tok) = tokenizer() else { return };
    let marked = EncodeOptions {
        add_special: false,
        parse_special: true,
    };
    let extra = ["<0x41> is not a byte here", "x\u{0}y"];
    let texts = fixture()
        .tokens
        .iter()
        .map(|c| c.text.as_str())
        .chain(extra);
    for text in texts {
        for options in [marked, EncodeOptions::PLAIN] {
            let ids = tok.encode(text, options);
            assert_eq!(tok.decode(&ids, false), text, "{text:?} -> {ids:?}");
            let mut dec = StreamDecoder::new(false);
            let mut streamed: String = ids.iter().map(|id| dec.push(tok, *id)).collect();
            streamed.push_str(&dec.finish());
            assert_eq!(streamed, text);
        }
    }
    // The one lossy case, as in SentencePiece and llama.cpp: a literal `▁` is a space.
    let ids = tok.encode("a\u{2581}b", EncodeOptions::PLAIN);
    assert_eq!(tok.decode(&ids, false), "a b");
    // Characters outside the vocabulary go through byte tokens and come back whole.
    let ids = tok.encode("𝔘", EncodeOptions::PLAIN);
    assert_eq!(tok.decode_bytes(&ids, false), "𝔘".as_bytes());
}

#[test]
fn chat_template_renders_gemma_turns() {
    let Some(model) = model() else { return };
    let model = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let template = model.chat_template();
    for case in &fixture().greedy {
        let text = template
            .render(&[ChatMessage::new("user", case.question.as_str())], true)
            .unwrap();
        // The template writes <bos>; it is dropped because the tokenizer adds it.
        assert_eq!(text, case.prompt);
        assert_eq!(
            model.tokenizer().encode(&text, EncodeOptions::PROMPT),
            case.prompt_ids
        );
    }
    let conversation = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", " Hi "),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
    ];
    assert_eq!(
        template.render(&conversation, true).unwrap(),
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    let err = template
        .render(
            &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
            true,
        )
        .unwrap_err();
    assert!(err.to_string().contains("alternate"), "{err}");
}

#[test]
fn greedy_follows_llama_cpp() {
    let Some(model) = model() else { return };
    let mut guard = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    let ends = end_ids(model.tokenizer());
    let whole = common::check_greedy(model, fixture(), &ends, MUST_AGREE, NEAR_TIE);
    // Every op follows ggml-cpu's order of operations for this file's formats (Q5_0,
    // Q8_0, repacked Q4_K, Q6_K, F16 KV cache), so each continuation is llama.cpp's.
    assert_eq!(
        whole,
        fixture().greedy.len(),
        "gemma3: {whole}/{} prompts exactly as llama.cpp",
        fixture().greedy.len()
    );
}

#[test]
fn model_knows_the_capital_of_france() {
    let Some(model) = model() else { return };
    let mut guard = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    let tok = model.tokenizer().clone();
    let paris = tok.encode(" Paris", EncodeOptions::PLAIN);
    assert_eq!(paris.len(), 1, "\" Paris\" is one token");

    // The pretrained model repeats a bare question, so lead its answer in.
    let mut ids = chat_prompt(model, "What is the capital of France?");
    ids.extend(tok.encode("The capital of France is", EncodeOptions::PLAIN));
    model.reset();
    let logits = model.forward(&ids, 0).unwrap();
    assert_eq!(argmax(&logits), paris[0]);
    let answer = greedy(model, logits, 8);
    let text = tok.decode(&answer, true);
    eprintln!("The capital of France is{text:?}");
    assert!(text.starts_with(" Paris"), "{text:?}");
    model.reset();
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn forward_pass_invariants() {
    let Some(model) = model() else { return };
    let mut guard = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    assert_eq!(model.max_context(), 32_768);
    model.reset();
    let ids = chat_prompt(model, "Name a large animal that lives in the ocean.");

    // Bad calls are refused without touching the cache.
    let invalid = |r: Result<Vec<f32>, ModelError>| matches!(r, Err(ModelError::InvalidInput(_)));
    assert!(invalid(model.forward(&[], 0)));
    assert!(invalid(model.forward(&ids, 1)));
    assert!(invalid(model.forward(&[262_144], 0)));
    assert!(invalid(model.forward(&vec![2; 32_769], 0)));
    assert_eq!(model.cached_tokens(), 0);

    // One prefill, two chunks, and token by token give the same logits.
    let whole = model.forward(&ids, 0).unwrap();
    assert_eq!(whole.len(), 262_144);
    assert_eq!(model.cached_tokens(), ids.len());
    assert!(invalid(model.forward(&[2], 0)));
    model.reset();
    let split = ids.len() / 2;
    model.forward(&ids[..split], 0).unwrap();
    let chunked = model.forward(&ids[split..], split).unwrap();
    model.reset();
    let mut stepped = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        stepped = model.forward(&[*id], i).unwrap();
    }
    assert_eq!(argmax(&chunked), argmax(&whole));
    assert_eq!(argmax(&stepped), argmax(&whole));
    // Chunks are summed in llama.cpp's order for passes of their own length (its
    // Q4_K GEMM takes rows in groups of 4 of a pass), as two llama.cpp batches are:
    // close, not equal.
    assert!(
        max_diff(&whole, &chunked) < STEP_TOLERANCE,
        "{}",
        max_diff(&whole, &chunked)
    );
    // Measured: up to 8 tokens a prefill is bitwise equal to single steps; from 9 on,
    // candle's CPU kernels round differently and logits (of magnitude ~20) move by up
    // to ~1, with the same argmax. The greedy test checks what that costs.
    assert!(
        max_diff(&whole, &stepped) < STEP_TOLERANCE,
        "{}",
        max_diff(&whole, &stepped)
    );
    model.reset();
    for n in [2, 8] {
        model.reset();
        let short = model.forward(&ids[..n], 0).unwrap();
        model.reset();
        let mut one = Vec::new();
        for (i, id) in ids[..n].iter().enumerate() {
            one = model.forward(&[*id], i).unwrap();
        }
        // A pass of several tokens sums attention in llama.cpp's prompt order
        // (tinyBLAS), single steps in its decode order (vec_dot_f16), as llama.cpp
        // does: close, not bitwise equal.
        assert_eq!(argmax(&short), argmax(&one), "{n} tokens");
        assert!(
            max_diff(&short, &one) < 0.5,
            "{n} tokens: {}",
            max_diff(&short, &one)
        );
    }

    // Past the 512-token sliding window: one prefill of 600 tokens agrees with 560
    // then 40 single steps (the window is applied the same way in both).
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let mut long = tok_prefix(model.tokenizer(), &text, 600);
    long[0] = 2;
    model.reset();
    let start = Instant::now();
    let whole = model.forward(&long, 0).unwrap();
    eprintln!("prefill of {} tokens: {:?}", long.len(), start.elapsed());
    model.reset();
    let mut stepped = model.forward(&long[..560], 0).unwrap();
    for (i, id) in long.iter().enumerate().skip(560) {
        stepped = model.forward(&[*id], i).unwrap();
    }
    assert_eq!(argmax(&stepped), argmax(&whole));
    assert!(
        max_diff(&whole, &stepped) < STEP_TOLERANCE,
        "{}",
        max_diff(&whole, &stepped)
    );
    model.reset();
    assert_eq!(model.cached_tokens(), 0);
}

fn tok_prefix(tok: &Tokenizer, text: &str, n: usize) -> Vec<u32> {
    let mut ids = tok.encode(text, EncodeOptions::PROMPT);
    assert!(ids.len() >= n, "{} tokens", ids.len());
    ids.truncate(n);
    ids
}

#[test]
fn mean_log_likelihood_matches_llama_cpp() {
    let Some(model) = model() else { return };
    let mut guard = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    common::check_loglik(model, fixture(), 0.01);
}

#[test]
fn first_step_logits_are_close_to_llama_cpp() {
    let Some(model) = model() else { return };
    let mut guard = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    // Bit for bit llama.cpp's; the fixture keeps 7 significant digits.
    common::check_first_logits(model, fixture(), 1e-4);
}

#[test]
fn batched_sequences_equal_sequences_alone() {
    let Some(model) = model() else { return };
    let guard = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let prompt = &fixture().greedy[0].prompt_ids;
    common::check_batch_equals_alone(guard.as_ref(), prompt);
}

/// The candle-tensor pass GPU devices get ([`TensorDecoder`]), here on the CPU,
/// against the decoder `load` picks and against llama.cpp. The passes differ by the
/// decoder's half-precision KV cache and attention weights and by rounding inside the
/// quantized matmuls (with an F32 cache the decoder is still ~0.9 away). Measured on
/// the fixture's five prompts, first-step logits (of magnitude ~20): at most 1.48
/// apart over the whole vocabulary, 1.06 on the decoder's 20 best, and 1.21 from
/// llama.cpp's 20 best (the decoder: 1.18). Then past the 512-token sliding window,
/// chunked on the tensor pass (300 + 260 tokens, then single steps) and in one
/// prefill on the decoder (measured 1.24 apart): the window holds in prefill, in a
/// chunk after a cached prefix and in decode.
#[test]
fn tensor_pass_is_close_to_the_decoder() {
    let Some(path) = model_path() else { return };
    let Some(model) = model() else { return };
    let mut guard = model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let decoder: &mut dyn LanguageModel = &mut **guard;
    let gguf = GgufFile::open(&path).unwrap();
    let mut tensors = TensorDecoder::load(gguf, &LoadOptions::default()).unwrap();
    assert_eq!(tensors.max_context(), decoder.max_context());
    let chat = [ChatMessage::new("user", "Hi")];
    assert_eq!(
        tensors.chat_template().render(&chat, true).unwrap(),
        decoder.chat_template().render(&chat, true).unwrap()
    );

    for case in &fixture().greedy {
        tensors.reset();
        decoder.reset();
        let a = tensors.forward(&case.prompt_ids, 0).unwrap();
        let b = decoder.forward(&case.prompt_ids, 0).unwrap();
        let mut best: Vec<usize> = (0..b.len()).collect();
        best.sort_by(|&i, &j| b[j].total_cmp(&b[i]));
        let top = best[..20]
            .iter()
            .map(|&i| (a[i] - b[i]).abs())
            .fold(0.0, f32::max);
        let llama_cpp = case
            .top_logits
            .iter()
            .map(|&(id, theirs)| (a[id as usize] - theirs).abs())
            .fold(0.0, f32::max);
        let all = max_diff(&a, &b);
        eprintln!("first step: {all} apart, {top} on the 20 best, {llama_cpp} from llama.cpp's");
        // The tensor pass rounds as candle does, so it may pick the other side of a
        // near tie.
        if case.margins[0] >= NEAR_TIE {
            assert_eq!(argmax(&a), argmax(&b), "{:?}", case.question);
        }
        assert!(
            all < 2.0 && top < 1.5 && llama_cpp < 1.5,
            "{all} {top} {llama_cpp}"
        );
    }

    let text = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let mut long = tok_prefix(decoder.tokenizer(), &text, 600);
    long[0] = 2;
    tensors.reset();
    decoder.reset();
    tensors.forward(&long[..300], 0).unwrap();
    let mut a = tensors.forward(&long[300..560], 300).unwrap();
    for (i, id) in long.iter().enumerate().skip(560) {
        a = tensors.forward(&[*id], i).unwrap();
    }
    let b = decoder.forward(&long, 0).unwrap();
    eprintln!("600 tokens: logits differ by {}", max_diff(&a, &b));
    assert_eq!(argmax(&a), argmax(&b));
    assert!(max_diff(&a, &b) < STEP_TOLERANCE, "{}", max_diff(&a, &b));
    decoder.reset();
}
