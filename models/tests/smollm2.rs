//! Tests against the real SmolLM2-135M-Instruct Q4_1 GGUF (llama architecture, byte-level
//! BPE with the `smollm` pre-tokenizer, ChatML template). The file comes from
//! `scripts/fetch-models.sh`; without it these tests fail and say so.
//!
//! Reference ids were produced by Hugging Face `tokenizers` rebuilt from this file's
//! vocabulary and merges with SmolLM2's pipeline (individual digits, then byte-level
//! GPT-2 regex, no prefix space, the 17 control tokens as special tokens).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate: failing loudly is the point

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use airlock_models::{
    load, ChatMessage, EncodeOptions, GgufFile, LanguageModel, LlamaModel, LoadOptions,
    StreamDecoder, Tokenizer,
};

mod common;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models")
        .join(FILE);
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

fn model() -> &'static Mutex<Box<dyn LanguageModel>> {
    static MODEL: OnceLock<Mutex<Box<dyn LanguageModel>>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let start = Instant::now();
        let model = load(model_path()).unwrap();
        eprintln!("loaded {FILE} in {:?}", start.elapsed());
        Mutex::new(model)
    })
}

const REFERENCE: &[(&str, &[u32])] = &[
    (
        "What is the capital of France?",
        &[1780, 314, 260, 3575, 282, 4649, 47],
    ),
    (
        "Hello, world!  Multiple   spaces\tand\ttabs\n\nnew lines\n",
        &[
            19556, 28, 905, 17, 216, 16560, 256, 5600, 197, 397, 197, 100, 7366, 198, 198, 2241,
            3204, 198,
        ],
    ),
    (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        &[
            1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198,
        ],
    ),
    (
        "Prices: $1,234.56 and 3.14159; year 2024.",
        &[
            64, 12855, 42, 1885, 33, 28, 34, 35, 36, 30, 37, 38, 284, 216, 35, 30, 33, 36, 33, 37,
            41, 43, 713, 216, 34, 32, 34, 36, 30,
        ],
    ),
    (
        "naïve café — 日本語のテキスト 🙂🚀 Ünïcödé",
        &[
            3546, 46494, 37366, 1841, 17097, 241, 115, 40993, 179, 120, 248, 26453, 11100, 224,
            10391, 251, 10391, 134, 11100, 226, 47526, 10813, 244, 218, 5549, 246, 94, 25972, 83,
            7466, 84, 2756,
        ],
    ),
    (
        "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n",
        &[
            7853, 1085, 1000, 1662, 472, 1303, 1792, 42, 717, 1159, 44, 101, 35, 34, 46, 446,
            37024, 21653, 33, 28, 216, 34, 28, 216, 35, 26695, 472, 1628, 34115, 17, 45257, 42, 47,
            29394, 1792, 4258, 198, 109, 198,
        ],
    ),
    (
        "I'm sure they'll say it's fine, we've done it, you'd see.",
        &[
            57, 5248, 2090, 502, 3060, 1643, 357, 506, 4979, 28, 392, 3543, 2294, 357, 28, 346,
            6737, 963, 30,
        ],
    ),
    ("   leading and trailing   ", &[256, 2899, 284, 35079, 333]),
    ("\n\n\n", &[16506]),
    ("aaa       b", &[11510, 81, 5013, 278]),
];

#[test]
fn metadata() {
    let info = GgufFile::open(&model_path()).unwrap().info;
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.context_length, Some(8192));
    assert_eq!(info.embedding_length, Some(576));
    assert_eq!(info.block_count, Some(30));
    assert_eq!(info.tokenizer_model, "gpt2");
    assert_eq!(info.tokenizer_pre.as_deref(), Some("smollm"));
    assert_eq!(info.bos_token_id, Some(1));
    assert_eq!(info.eos_token_id, Some(2));
    assert_eq!(info.add_bos_token, Some(false));
    assert_eq!(info.add_space_prefix, Some(false));
    assert!(info
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn chatml_markers_have_their_vocabulary_ids() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    for (text, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.token_id(text), Some(id));
        assert_eq!(tok.encode(text, EncodeOptions::PROMPT), [id]);
        assert!(tok.is_special(id));
    }
    // Plain encoding keeps them as text.
    assert!(tok.encode("<|im_end|>", EncodeOptions::PLAIN).len() > 1);
}

#[test]
fn tokenizer_matches_reference_ids() {
    let tok = tokenizer();
    for (text, want) in REFERENCE {
        let got = tok.encode(text, EncodeOptions::PROMPT);
        assert_eq!(&got, want, "ids for {text:?}");
        assert_eq!(tok.decode(&got, false), *text);
    }
}

#[test]
fn tokenizer_round_trips_a_varied_corpus() {
    let tok = tokenizer();
    let corpus = [
        "",
        " ",
        "plain ASCII sentence, with punctuation; and (parentheses)!",
        "0123456789 3.14159 -42 1e-9 0xDEADBEEF",
        "     \t\t  \n  \r\n\n\n   trailing spaces   ",
        "Ünïcödé: naïve café, Straße, Ελληνικά, русский, العربية, हिन्दी, 中文, 日本語, 한국어",
        "emoji 🙂🚀👩‍👩‍👧‍👦 and symbols ∑∫√≠ ™ © € £ ¥",
        "def f(x):\n    return {'a': [x, x**2]}  # comment\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
        "<|im_start|><|im_end|><|endoftext|><|im_start",
        "\u{0}\u{1}\u{7f} control chars \u{feff} bom",
        "I'M SHOUTING and it's 'quoted' don't they'll",
    ];
    for text in corpus {
        let ids = tok.encode(text, EncodeOptions::PROMPT);
        assert_eq!(tok.decode(&ids, false), text, "{text:?} -> {ids:?}");
        // Token by token through the stream decoder gives the same text.
        let mut dec = StreamDecoder::new(false);
        let mut streamed: String = ids.iter().map(|id| dec.push(tok, *id)).collect();
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, text);
    }
}

#[test]
fn chat_template_renders_chatml() {
    let model = model()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let template = model.chat_template();
    let user = [ChatMessage::new("user", "What is the capital of France?")];
    assert_eq!(
        template.render(&user, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
    ];
    assert_eq!(
        template.render(&with_system, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n"
    );
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in logits.iter().enumerate() {
        if *x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of the cached sequence: up to `n` tokens, stopping at EOS.
fn greedy(model: &mut dyn LanguageModel, mut logits: Vec<f32>, n: usize) -> Vec<u32> {
    let eos = model.tokenizer().eos_token_id().unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        if next == eos {
            break;
        }
        out.push(next);
        let pos = model.cached_tokens();
        logits = model.forward(&[next], pos).unwrap();
    }
    out
}

fn chat_prompt(model: &dyn LanguageModel, question: &str) -> Vec<u32> {
    let prompt = model
        .chat_template()
        .render(&[ChatMessage::new("user", question)], true)
        .unwrap();
    model.tokenizer().encode(&prompt, EncodeOptions::PROMPT)
}

#[test]
fn greedy_answer_is_coherent_english() {
    let mut guard = model()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    model.reset();
    let ids = chat_prompt(model, "What is the capital of France?");

    let start = Instant::now();
    let logits = model.forward(&ids, 0).unwrap();
    let prefill = start.elapsed();
    assert_eq!(logits.len(), 49152);
    let start = Instant::now();
    let generated = greedy(model, logits, 20);
    let decode = start.elapsed();

    let mut dec = StreamDecoder::new(true);
    let mut text: String = generated
        .iter()
        .map(|id| dec.push(model.tokenizer(), *id))
        .collect();
    text.push_str(&dec.finish());
    eprintln!(
        "prompt {} tokens, prefill {prefill:?}; {} tokens in {decode:?} ({:.1} tok/s): {text:?}",
        ids.len(),
        generated.len(),
        generated.len() as f64 / decode.as_secs_f64()
    );
    assert_eq!(text, model.tokenizer().decode(&generated, true));

    // This prompt is a near tie for the first token ("The" vs "L" within 0.2 logits):
    // candle's quantized kernels answer "L'Étoile, la Marseillaise, ...", F32 weights
    // "The capital of France is Paris.". So assert what any working model and
    // tokenizer give, and what a broken one does not: several real words, mostly
    // letters and spaces, no loop on one token.
    assert!(generated.len() >= 5, "{text:?}");
    let letters = text
        .chars()
        .filter(|c| c.is_alphabetic() || *c == ' ')
        .count();
    assert!(letters * 10 >= text.chars().count() * 8, "{text:?}");
    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|w| w.chars().filter(|c| c.is_alphabetic()).count() >= 2)
        .collect();
    assert!(words.len() >= 4, "{text:?}");
    let distinct: std::collections::HashSet<_> = generated.iter().collect();
    assert!(distinct.len() * 2 > generated.len(), "{generated:?}");
    model.reset();
}

#[test]
fn model_knows_the_capital_of_france() {
    let mut guard = model()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    let tok = model.tokenizer();
    let paris = tok.encode(" Paris", EncodeOptions::PLAIN);
    assert_eq!(paris.len(), 1, "\" Paris\" is one token");
    let mut ids = chat_prompt(model, "What is the capital of France?");
    let prompt_len = ids.len();
    ids.extend(tok.encode("The capital of France is", EncodeOptions::PLAIN));

    // One prefill of the whole sequence.
    model.reset();
    let logits = model.forward(&ids, 0).unwrap();
    assert_eq!(argmax(&logits), paris[0]);

    // The prompt, then the answer one token at a time through the KV cache.
    model.reset();
    let mut logits = model.forward(&ids[..prompt_len], 0).unwrap();
    for (i, id) in ids.iter().enumerate().skip(prompt_len) {
        logits = model.forward(&[*id], i).unwrap();
    }
    assert_eq!(argmax(&logits), paris[0]);

    // And it goes on to end the sentence.
    let rest = greedy(model, logits, 4);
    let text = model.tokenizer().decode(&rest, true);
    assert!(text.starts_with(" Paris"), "{text:?}");
    model.reset();
}

#[test]
fn requantizing_keeps_the_model() {
    // candle's pass (GPU devices), weights as stored (Q4_1) instead of requantized
    // to Q8_0: the answer token after the teacher-forced prefix agrees.
    let options = LoadOptions {
        requantize_slow_formats: false,
        ..LoadOptions::default()
    };
    let gguf = GgufFile::open(&model_path()).unwrap();
    let mut plain: Box<dyn LanguageModel> = Box::new(LlamaModel::load(gguf, &options).unwrap());
    let tok = plain.tokenizer();
    let mut ids = chat_prompt(&*plain, "What is the capital of France?");
    ids.extend(tok.encode("The capital of France is", EncodeOptions::PLAIN));
    let paris = tok.encode(" Paris", EncodeOptions::PLAIN)[0];
    let logits = plain.forward(&ids, 0).unwrap();
    assert_eq!(argmax(&logits), paris);
}

fn end_ids(tok: &Tokenizer) -> Vec<u32> {
    vec![
        tok.token_id("<|im_end|>").unwrap(),
        tok.eos_token_id().unwrap(),
    ]
}

#[test]
fn tokenizer_matches_llama_cpp() {
    common::assert_tokenizer_matches(tokenizer(), &common::load_fixture("smollm2"));
}

#[test]
fn greedy_follows_llama_cpp() {
    let fixture = common::load_fixture("smollm2");
    // The fixture's prompts are SmolLM2's ChatML written out by hand: our template
    // must produce the same ids.
    let mut guard = model()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    for case in &fixture.greedy {
        let rendered = model
            .chat_template()
            .render(&[ChatMessage::new("user", &case.question)], true)
            .unwrap();
        assert_eq!(rendered, case.prompt);
        assert_eq!(
            model.tokenizer().encode(&rendered, EncodeOptions::PROMPT),
            case.prompt_ids
        );
    }
    let ends = end_ids(model.tokenizer());
    let whole = common::check_greedy(model, &fixture, &ends, 4, 0.5);
    // Every op follows ggml-cpu's order of operations for this file's formats
    // (Q4_1, Q8_0, F16 KV cache), so the whole continuation is llama.cpp's.
    assert_eq!(
        whole,
        fixture.greedy.len(),
        "smollm2: {whole}/{} prompts exactly as llama.cpp",
        fixture.greedy.len()
    );
}

#[test]
fn mean_log_likelihood_matches_llama_cpp() {
    let mut guard = model()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    common::check_loglik(model, &common::load_fixture("smollm2"), 0.01);
}

#[test]
fn first_step_logits_are_close_to_llama_cpp() {
    let mut guard = model()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: &mut dyn LanguageModel = &mut **guard;
    // Bit for bit llama.cpp's; the fixture keeps 7 significant digits.
    common::check_first_logits(model, &common::load_fixture("smollm2"), 1e-4);
}

#[test]
fn batched_sequences_equal_sequences_alone() {
    let guard = model()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let prompt = &common::load_fixture("smollm2").greedy[0].prompt_ids;
    common::check_batch_equals_alone(guard.as_ref(), prompt);
}
