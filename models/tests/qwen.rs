//! Qwen 2 and Qwen 3 without a download: tiny random-weight GGUF files written by the
//! tests (`support/tiny_qwen.rs`). The `qwen2` pre-tokenizer against pieces derived
//! by hand from llama.cpp's regex and against Hugging Face's `Split` with Qwen's own
//! tokenizer.json pattern; the vocabulary's BOS/EOS and special tokens; and for both
//! families: `load` picks them, logits equal candle-transformers' reference
//! implementations, chunked prefill equals one pass, greedy decoding is
//! deterministic, `reset` and `fork` keep sequences apart, and files the pass cannot
//! run are refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate: failing loudly is the point

#[path = "support/tiny_qwen.rs"]
mod tiny_qwen;

use std::path::{Path, PathBuf};

use airlock_models::tokenizer::TokenType;
use airlock_models::{
    load, load_with, ChatMessage, EncodeOptions, GgufFile, KvCachePrecision, LanguageModel,
    LoadOptions, ModelError, TensorDecoder, Tokenizer,
};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use tiny_qwen::{special_id, Shape, Tweaks, QWEN2, QWEN3};

fn write(dir: &Path, shape: &Shape, tweaks: &Tweaks) -> PathBuf {
    let path = dir.join(format!("{}.gguf", shape.arch));
    tiny_qwen::write_gguf(&path, shape, tweaks);
    path
}

fn tokenizer() -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &QWEN2, &Tweaks::default());
    let gguf = GgufFile::open(&path).unwrap();
    Tokenizer::from_gguf(&gguf.content, &gguf.info).unwrap()
}

/// Pieces derived by hand from llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` regex:
/// `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|
/// \p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
#[test]
fn qwen2_pre_tokenizer_follows_its_regex() {
    let tok = tokenizer();
    let cases: &[(&str, &[&str])] = &[
        // Contractions are pieces; a digit run is one piece per digit, and the space
        // before it stays alone (no alternative takes " 2").
        (
            "I'm here, it's 2024!",
            &[
                "I", "'m", " here", ",", " it", "'s", " ", "2", "0", "2", "4", "!",
            ],
        ),
        // Contractions match in either case.
        (
            "DON'T WE'LL we're",
            &["DON", "'T", " WE", "'LL", " we", "'re"],
        ),
        // A quote that starts no contraction leads the letters after it.
        ("rock'n'roll", &["rock", "'n", "'roll"]),
        // One leading non-letter (not a newline) joins a letter run: brackets, tabs.
        ("(hello) $100", &["(hello", ")", " $", "1", "0", "0"]),
        ("x\t\ty", &["x", "\t", "\ty"]),
        // Letters and numbers are Unicode categories: ï, é, CJK letters; ² is a number.
        (
            "naïve café 日本語 x²",
            &["naïve", " café", " 日本語", " x", "²"],
        ),
        // A whitespace run before a word leaves its last space to the word; at the end
        // it is one piece.
        ("a   b  ", &["a", "  ", " b", "  "]),
        // Newline runs: with the whitespace before them, or after punctuation.
        ("hi\n\nthere", &["hi", "\n\n", "there"]),
        ("hi \n  there", &["hi", " \n", " ", " there"]),
        ("end.\n\nNext", &["end", ".\n\n", "Next"]),
        ("hi 🙂🙂!\r\n", &["hi", " 🙂🙂!\r\n"]),
        ("", &[]),
    ];
    for (text, want) in cases {
        assert_eq!(&tok.pre_tokenize(text), want, "{text:?}");
    }
}

/// The same split as Hugging Face's `Split` pre-tokenizer running the pattern from
/// Qwen's tokenizer.json (case-insensitive contractions, `Isolated`), over a corpus.
#[test]
fn qwen2_pre_tokenizer_agrees_with_hugging_face() {
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{
        OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
    };
    const QWEN_TOKENIZER_JSON: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = Split::new(
        SplitPattern::Regex(QWEN_TOKENIZER_JSON.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .unwrap();
    let tok = tokenizer();
    for text in [
        "Hello, World! It's a test: 3.14159 + 2e10 = ?",
        "  leading and trailing  \n",
        "tabs\tand\nnewlines\r\n\r\n  indented\n\tcode();",
        "fn main() {\n    println!(\"{}\", x[0]);\n}\n",
        "I'LL THEY'RE you've she'd we'M",
        "Ünïcödé Ελληνικά русский 中文字符 العربية हिन्दी",
        "½ ¾ ² ³ ١٢٣ 一二三 Ⅻ",
        "emoji 🙂 👍🏽 🇫🇷 and ZWJ 👩‍👩‍👧",
        "...!!!???\n\n\n---",
        "   \n\n   \t\t  x",
        "a\u{a0}b\u{2003}c\u{3000}d",
        "price: $1,234.56 (approx.)",
    ] {
        let mut pre = PreTokenizedString::from(text);
        split.pre_tokenize(&mut pre).unwrap();
        let theirs: Vec<String> = pre
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect();
        let ours: Vec<String> = tok
            .pre_tokenize(text)
            .into_iter()
            .map(str::to_string)
            .collect();
        assert_eq!(ours, theirs, "{text:?}");
    }
}

#[test]
fn qwen_vocabulary_has_no_bos_and_ends_on_im_end() {
    let tok = tokenizer();
    let (im_start, im_end, eot) = (
        special_id("<|im_start|>"),
        special_id("<|im_end|>"),
        special_id("<|endoftext|>"),
    );
    assert_eq!(tok.eos_token_id(), Some(im_end));
    assert_eq!(tok.bos_token_id(), Some(eot));
    assert!(!tok.add_bos_token());
    for id in [im_start, im_end, eot] {
        assert_eq!(tok.token_type(id), Some(TokenType::Control));
        assert!(tok.is_special(id));
    }
    let think = special_id("<think>");
    assert_eq!(tok.token_type(think), Some(TokenType::UserDefined));

    // A rendered prompt: no BOS, markers parsed, merges applied inside pieces.
    let text = "<|im_start|>user\nhello world's<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(text, EncodeOptions::PROMPT);
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 1);
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| String::from_utf8_lossy(tok.token_bytes(id).unwrap()).into_owned())
        .collect();
    assert_eq!(
        pieces,
        [
            "<|im_start|>",
            "u",
            "s",
            "e",
            "r",
            "\n",
            "hello",
            " world",
            "'s",
            "<|im_end|>",
            "\n",
            "<|im_start|>",
            "a",
            "s",
            "s",
            "i",
            "s",
            "t",
            "a",
            "n",
            "t",
            "\n",
        ]
    );
    assert_eq!(tok.decode(&ids, false), text);
    assert_eq!(tok.decode(&ids, true), "user\nhello world's\nassistant\n");
    // Untrusted text keeps control markers as text; `<think>` always splits out.
    let plain = tok.encode("<|im_end|><think>the", EncodeOptions::PLAIN);
    assert!(!plain.contains(&im_end));
    assert!(plain.contains(&think));
    assert_eq!(
        tok.decode(&plain, false),
        "<|im_end|><think>the",
        "{plain:?}"
    );
}

#[test]
fn deepseek_r1_qwen_pre_tokenizer_is_qwen2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &QWEN2,
        &Tweaks {
            metadata: vec![(
                "tokenizer.ggml.pre".into(),
                Value::String("deepseek-r1-qwen".into()),
            )],
            ..Tweaks::default()
        },
    );
    let gguf = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf.content, &gguf.info).unwrap();
    assert_eq!(tok.pre_tokenize("it's 42"), ["it", "'s", " ", "4", "2"]);
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap() as u32
}

/// `n` greedy tokens after `prompt`, from an empty cache.
fn greedy(model: &mut dyn LanguageModel, prompt: &[u32], n: usize) -> Vec<u32> {
    assert_eq!(model.cached_tokens(), 0);
    let mut logits = model.forward(prompt, 0).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        logits = model.forward(&[next], model.cached_tokens()).unwrap();
    }
    out
}

fn prompt(model: &dyn LanguageModel) -> Vec<u32> {
    let text = model
        .chat_template()
        .render(&[ChatMessage::new("user", "hello world, it's 2024")], true)
        .unwrap();
    model.tokenizer().encode(&text, EncodeOptions::PROMPT)
}

/// `load`'s choice on the CPU: our own decoder.
fn decoder(path: &Path) -> Box<dyn LanguageModel> {
    let model = load(path).unwrap();
    assert!(
        format!("{model:?}").starts_with("DecoderModel"),
        "{model:?}"
    );
    model
}

/// The candle-tensor pass GPU devices get, here on the CPU.
fn tensor_pass(path: &Path) -> Box<dyn LanguageModel> {
    let gguf = GgufFile::open(path).unwrap();
    Box::new(TensorDecoder::load(gguf, &LoadOptions::default()).unwrap())
}

/// Everything a served model must do, for one family on one pass (`open`).
fn check_family(shape: &Shape, open: fn(&Path) -> Box<dyn LanguageModel>) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), shape, &Tweaks::default());
    let mut model = open(&path);
    let info = model.info().clone();
    assert_eq!(info.architecture, shape.arch);
    assert_eq!(model.max_context(), shape.context);
    assert_eq!(info.vocab_size, model.tokenizer().vocab_size());

    // The file's template, with its default system prompt; no BOS.
    let rendered = model
        .chat_template()
        .render(&[ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = prompt(model.as_ref());
    assert_eq!(ids[0], special_id("<|im_start|>"));
    assert!(ids.len() > 30, "{}", ids.len());

    let whole = model.forward(&ids, 0).unwrap();
    assert_eq!(whole.len(), info.vocab_size);
    assert!(whole.iter().all(|x| x.is_finite()));
    let spread = whole.iter().fold(f32::MIN, |m, x| m.max(*x))
        - whole.iter().fold(f32::MAX, |m, x| m.min(*x));
    assert!(spread > 0.1, "logits are nearly flat ({spread})");
    assert_eq!(model.cached_tokens(), ids.len());

    // Chunked prefill (two passes, then the rest one token at a time) gives the
    // same last logits as one pass.
    for split in [1, 7, ids.len() / 2, ids.len() - 1] {
        model.reset();
        model.forward(&ids[..split], 0).unwrap();
        let chunked = model.forward(&ids[split..], split).unwrap();
        let diff = max_diff(&whole, &chunked);
        assert!(diff < 1e-4, "split at {split}: logits differ by {diff}");
    }
    model.reset();
    let mut stepped = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        stepped = model.forward(&[*id], i).unwrap();
    }
    let diff = max_diff(&whole, &stepped);
    assert!(diff < 1e-4, "token by token: logits differ by {diff}");

    // Greedy decoding is deterministic, and reset forgets the sequence.
    model.reset();
    assert_eq!(model.cached_tokens(), 0);
    let first = greedy(model.as_mut(), &ids, 8);
    model.reset();
    let second = greedy(model.as_mut(), &ids, 8);
    assert_eq!(first, second);
    assert!(
        first.iter().any(|&t| t != first[0]),
        "greedy output is one token repeated: {first:?}"
    );

    // A fork has its own cache: running another prompt on it leaves the original's
    // sequence as it was, and it generates what a fresh model would.
    model.reset();
    model.forward(&ids, 0).unwrap();
    let mut fork = model.fork().unwrap();
    assert_eq!(fork.cached_tokens(), 0);
    let other = model
        .tokenizer()
        .encode("the world's hello", EncodeOptions::PLAIN);
    let forked = greedy(fork.as_mut(), &other, 4);
    let mut fresh = open(&path);
    assert_eq!(forked, greedy(fresh.as_mut(), &other, 4));
    let next = model.forward(&[first[0]], ids.len()).unwrap();
    fresh.reset();
    fresh.forward(&ids, 0).unwrap();
    assert_eq!(next, fresh.forward(&[first[0]], ids.len()).unwrap());

    // Misuse is an error, not corruption; a full context is refused.
    let n = model.cached_tokens();
    assert!(model.forward(&ids[..1], 0).is_err());
    assert!(model.forward(&[info.vocab_size as u32], n).is_err());
    assert!(model
        .forward(&vec![5u32; shape.context - n + 1], n)
        .is_err());
    assert_eq!(model.cached_tokens(), n);
    model.forward(&vec![5u32; shape.context - n], n).unwrap();
    assert_eq!(model.cached_tokens(), shape.context);
}

#[test]
fn qwen2_loads_and_serves() {
    check_family(&QWEN2, decoder);
}

#[test]
fn qwen3_loads_and_serves() {
    check_family(&QWEN3, decoder);
}

#[test]
fn qwen2_serves_on_the_tensor_pass() {
    check_family(&QWEN2, tensor_pass);
}

#[test]
fn qwen3_serves_on_the_tensor_pass() {
    check_family(&QWEN3, tensor_pass);
}

/// candle-transformers' own implementations, the reference.
enum Reference {
    Qwen2(candle_transformers::models::quantized_qwen2::ModelWeights),
    Qwen3(candle_transformers::models::quantized_qwen3::ModelWeights),
}

impl Reference {
    fn load(path: &Path, arch: &str) -> Self {
        use candle_transformers::models::{quantized_qwen2, quantized_qwen3};
        let mut file = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let cpu = &Device::Cpu;
        match arch {
            "qwen2" => Self::Qwen2(
                quantized_qwen2::ModelWeights::from_gguf(content, &mut file, cpu).unwrap(),
            ),
            _ => Self::Qwen3(
                quantized_qwen3::ModelWeights::from_gguf(content, &mut file, cpu).unwrap(),
            ),
        }
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = match self {
            Self::Qwen2(m) => m.forward(&input, pos),
            Self::Qwen3(m) => m.forward(&input, pos),
        };
        logits.unwrap().squeeze(0).unwrap().to_vec1().unwrap()
    }
}

/// Our logits against candle-transformers' on the same file: the prompt in one pass
/// from position 0, then two decode steps (the one sequence shape both handle
/// correctly). The candle-tensor pass ([`TensorDecoder`], used on GPUs) and the CPU
/// decoder ([`load`]'s choice) with a full-precision KV cache must agree to 1e-4.
/// (With llama.cpp's half-precision cache, the default, the decoder's logits move by
/// up to ~0.1 on these random weights, which amplify rounding.)
#[test]
fn logits_match_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for shape in [QWEN2, QWEN3] {
        let tweaks = Tweaks {
            f32_for_candle: true,
            ..Tweaks::default()
        };
        let path = write(dir.path(), &shape, &tweaks);
        let tensors = TensorDecoder::load(GgufFile::open(&path).unwrap(), &LoadOptions::default());
        let f32_cache = LoadOptions {
            kv_cache: KvCachePrecision::F32,
            ..LoadOptions::default()
        };
        let decoder = load_with(&path, &f32_cache).unwrap();
        assert!(format!("{decoder:?}").starts_with("DecoderModel"));
        let candidates: [Box<dyn LanguageModel>; 2] = [Box::new(tensors.unwrap()), decoder];
        for mut ours in candidates {
            let tolerance = 1e-4;
            let mut reference = Reference::load(&path, shape.arch);
            let mut pos = 0;
            let mut next = prompt(ours.as_ref());
            for step in 0..3 {
                let a = ours.forward(&next, pos).unwrap();
                let b = reference.forward(&next, pos);
                let diff = max_diff(&a, &b);
                assert!(
                    diff < tolerance,
                    "{} {ours:?} step {step}: differs by {diff}",
                    shape.arch
                );
                pos += next.len();
                next = vec![argmax(&a)];
            }
        }
    }
}

/// The tensor pass against the decoder with a full-precision KV cache, on the same
/// file and the same calls: a prefill split at an odd position (so the second chunk
/// runs after a cached prefix), then greedy decode steps. Both compute in F32 from the
/// same weights, so they agree to summation order.
#[test]
fn tensor_pass_matches_the_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let f32_cache = LoadOptions {
        kv_cache: KvCachePrecision::F32,
        ..LoadOptions::default()
    };
    for shape in [QWEN2, QWEN3] {
        let path = write(dir.path(), &shape, &Tweaks::default());
        let mut tensors = tensor_pass(&path);
        let mut decoder = load_with(&path, &f32_cache).unwrap();
        let ids = prompt(decoder.as_ref());
        let split = ids.len() / 2 + 1;
        let mut next = ids[..split].to_vec();
        let mut rest = Some(ids[split..].to_vec());
        for step in 0..8 {
            let pos = decoder.cached_tokens();
            let a = tensors.forward(&next, pos).unwrap();
            let b = decoder.forward(&next, pos).unwrap();
            let diff = max_diff(&a, &b);
            assert!(diff < 1e-4, "{} step {step}: differs by {diff}", shape.arch);
            next = rest.take().unwrap_or_else(|| vec![argmax(&a)]);
        }
        assert_eq!(tensors.cached_tokens(), decoder.cached_tokens());
    }
}

#[test]
fn files_the_pass_cannot_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Both passes: the decoder (`load` on the CPU) and the tensor pass.
    let both = |path: &Path| -> [ModelError; 2] {
        let tensors = TensorDecoder::load(GgufFile::open(path).unwrap(), &LoadOptions::default());
        [load(path).unwrap_err(), tensors.unwrap_err()]
    };
    let refused = |shape: &Shape, tweaks: Tweaks| -> [String; 2] {
        let path = write(dir.path(), shape, &tweaks);
        both(&path).map(|e| e.to_string())
    };
    // YaRN rope scaling is not implemented.
    let err = refused(
        &QWEN2,
        Tweaks {
            metadata: vec![(
                "qwen2.rope.scaling.type".into(),
                Value::String("yarn".into()),
            )],
            ..Tweaks::default()
        },
    );
    assert!(
        err.iter().all(|e| e.contains("rope scaling `yarn`")),
        "{err:?}"
    );
    // Partial rotary dimensions.
    let err = refused(
        &QWEN3,
        Tweaks {
            metadata: vec![("qwen3.rope.dimension_count".into(), Value::U32(8))],
            ..Tweaks::default()
        },
    );
    assert!(
        err.iter().all(|e| e.contains("rope dimensions 8")),
        "{err:?}"
    );
    // A family's own tensors are required.
    let err = refused(
        &QWEN2,
        Tweaks {
            without: vec!["blk.1.attn_k.bias".into()],
            ..Tweaks::default()
        },
    );
    assert!(
        err.iter().all(|e| e.contains("blk.1.attn_k.bias")),
        "{err:?}"
    );
    let err = refused(
        &QWEN3,
        Tweaks {
            without: vec!["blk.0.attn_q_norm.weight".into()],
            ..Tweaks::default()
        },
    );
    assert!(err.iter().all(|e| e.contains("attn_q_norm")), "{err:?}");
    // Heads that do not divide: a metadata error, not a panic.
    let path = write(
        dir.path(),
        &QWEN3,
        &Tweaks {
            metadata: vec![("qwen3.attention.head_count_kv".into(), Value::U32(3))],
            ..Tweaks::default()
        },
    );
    for err in both(&path) {
        assert!(matches!(err, ModelError::Metadata { .. }), "{err}");
    }
}

/// Phi-3 (fused Q/K/V and gate/up matrices, Q scaled before attention) on the CPU
/// decoder with a full-precision KV cache, against candle-transformers' own Phi-3 on
/// the same tiny file: the prompt in one pass, then decode steps.
#[test]
fn phi3_matches_candle_transformers() {
    use candle_transformers::models::quantized_phi3;
    let dir = tempfile::tempdir().unwrap();
    // candle's Phi-3 fixes the rotary base at 10 000 (what Phi-3 files carry).
    let base = Tweaks {
        metadata: vec![("phi3.rope.freq_base".into(), Value::F32(10_000.0))],
        ..Tweaks::default()
    };
    let path = write(dir.path(), &tiny_qwen::PHI3, &base);
    let options = LoadOptions {
        kv_cache: KvCachePrecision::F32,
        ..LoadOptions::default()
    };
    let mut ours = load_with(&path, &options).unwrap();
    assert!(format!("{ours:?}").starts_with("DecoderModel"), "{ours:?}");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut reference =
        quantized_phi3::ModelWeights::from_gguf(false, content, &mut file, &Device::Cpu).unwrap();
    let mut pos = 0;
    let mut next = prompt(ours.as_ref());
    for step in 0..3 {
        let a = ours.forward(&next, pos).unwrap();
        let input = Tensor::new(next.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let b: Vec<f32> = reference
            .forward(&input, pos)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-4, "phi3 step {step}: differs by {diff}");
        pos += next.len();
        next = vec![argmax(&a)];
    }
    // The default (half-precision cache) stays close, and a broken fused matrix is
    // refused at load.
    let mut half = load(&path).unwrap();
    let logits = half.forward(&prompt(half.as_ref()), 0).unwrap();
    assert!(logits.iter().all(|l| l.is_finite()));
    let path = write(
        dir.path(),
        &tiny_qwen::PHI3,
        &Tweaks {
            without: vec!["blk.1.attn_qkv.weight".into()],
            ..base
        },
    );
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("blk.1.attn_qkv.weight"), "{err}");
}
