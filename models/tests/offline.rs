//! Tests that need no model download: a handmade byte-level BPE vocabulary, special
//! tokens, streaming UTF-8 decode, ChatML rendering, and GGUF files written here
//! (valid tiny llama, truncated, wrong magic, unsupported architecture, bad shapes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate: failing loudly is the point

use std::path::Path;

use airlock_models::tokenizer::{PreTokenizer, TokenType, TokenizerConfig};
use airlock_models::{
    load, ChatMessage, ChatTemplate, EncodeOptions, GgufFile, ModelError, StreamDecoder, Tokenizer,
};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// GPT-2's byte -> char map, written independently of the crate's.
fn byte_char(b: u8) -> char {
    let mut n = 0u32;
    for x in 0..=255u8 {
        let printable = matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if x == b {
            return if printable {
                char::from(x)
            } else {
                char::from_u32(256 + n).unwrap()
            };
        }
        if !printable {
            n += 1;
        }
    }
    unreachable!()
}

fn bl(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

const SPECIALS: [(&str, TokenType); 4] = [
    ("<|endoftext|>", TokenType::Control),
    ("<|im_start|>", TokenType::Control),
    ("<|im_end|>", TokenType::Control),
    ("<tool>", TokenType::UserDefined),
];

/// Specials at ids 0..4, then the 256 byte symbols, then merged tokens.
fn tiny_parts(merges: &[(&str, &str)]) -> (Vec<String>, Vec<TokenType>, Vec<String>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(t, _)| t.to_string()).collect();
    let mut types: Vec<TokenType> = SPECIALS.iter().map(|(_, ty)| *ty).collect();
    for b in 0..=255u8 {
        tokens.push(byte_char(b).to_string());
        types.push(TokenType::Normal);
    }
    let mut merge_lines = Vec::new();
    for (l, r) in merges {
        let (l, r) = (bl(l), bl(r));
        let joined = format!("{l}{r}");
        if !tokens.contains(&joined) {
            tokens.push(joined);
            types.push(TokenType::Normal);
        }
        merge_lines.push(format!("{l} {r}"));
    }
    (tokens, types, merge_lines)
}

const MERGES: &[(&str, &str)] = &[
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    (" ", "w"),
    ("o", "r"),
    (" w", "or"),
    (" wor", "ld"),
    ("l", "d"),
    ("\n", "\n"),
];

fn tiny_tokenizer_with(pre: PreTokenizer, add_bos: bool, space_prefix: bool) -> Tokenizer {
    let (tokens, token_types, merges) = tiny_parts(MERGES);
    Tokenizer::new(TokenizerConfig {
        tokens,
        token_types,
        merges,
        pre,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        unknown_token_id: None,
        add_bos_token: add_bos,
        add_space_prefix: space_prefix,
    })
    .unwrap()
}

fn tiny_tokenizer() -> Tokenizer {
    tiny_tokenizer_with(PreTokenizer::SmolLm, false, false)
}

fn texts(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|id| String::from_utf8_lossy(tok.token_bytes(*id).unwrap()).into_owned())
        .collect()
}

#[test]
fn bpe_merges_by_rank() {
    let tok = tiny_tokenizer();
    let ids = tok.encode("hello world", EncodeOptions::PLAIN);
    assert_eq!(texts(&tok, &ids), ["hello", " world"]);
    assert_eq!(ids[0], tok.token_id(&bl("hello")).unwrap());

    // Rank decides, not position: with "b c" ranked before "a b", "abc" -> a + bc.
    for (merges, want) in [
        (&[("a", "b"), ("b", "c"), ("ab", "c")][..], vec!["abc"]),
        (&[("b", "c"), ("a", "b"), ("ab", "c")][..], vec!["a", "bc"]),
    ] {
        let (tokens, token_types, merges) = tiny_parts(merges);
        let tok = Tokenizer::new(TokenizerConfig {
            tokens,
            token_types,
            merges,
            pre: PreTokenizer::Gpt2,
            bos_token_id: None,
            eos_token_id: None,
            unknown_token_id: None,
            add_bos_token: false,
            add_space_prefix: false,
        })
        .unwrap();
        assert_eq!(texts(&tok, &tok.encode("abc", EncodeOptions::PLAIN)), want);
    }
}

#[test]
fn pretokenizer_splits_like_gpt2_and_smollm() {
    let tok = tiny_tokenizer_with(PreTokenizer::Gpt2, false, false);
    // GPT-2: a digit run is one piece; a whitespace run leaves its last space to the word.
    let ids = tok.encode("hello   world 123", EncodeOptions::PLAIN);
    assert_eq!(
        texts(&tok, &ids),
        ["hello", " ", " ", " world", " ", "1", "2", "3"]
    );
    let smol = tiny_tokenizer();
    let ids = smol.encode("he 12\n\nhello", EncodeOptions::PLAIN);
    // A newline run before a word leaves its last newline as a piece of its own.
    assert_eq!(
        texts(&smol, &ids),
        ["he", " ", "1", "2", "\n", "\n", "hello"]
    );
    let ids = smol.encode("he\n\n", EncodeOptions::PLAIN);
    assert_eq!(texts(&smol, &ids), ["he", "\n\n"]);
}

#[test]
fn special_tokens_are_split_out_before_bpe() {
    let tok = tiny_tokenizer();
    let text = "<|im_start|>user\nhello<|im_end|>\n<tool>hello";
    let ids = tok.encode(text, EncodeOptions::PROMPT);
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1);
    assert!(ids.contains(&2));
    assert!(ids.contains(&3));
    assert_eq!(
        texts(&tok, &ids),
        [
            "<|im_start|>",
            "u",
            "s",
            "e",
            "r",
            "\n",
            "hello",
            "<|im_end|>",
            "\n",
            "<tool>",
            "hello"
        ]
    );
    assert_eq!(tok.decode(&ids, false), text);
    assert_eq!(tok.decode(&ids, true), "user\nhello\n<tool>hello");

    // Plain: control markers are text, user-defined tokens still split out.
    let plain = tok.encode(text, EncodeOptions::PLAIN);
    assert!(!plain.contains(&1) && !plain.contains(&2));
    assert!(plain.contains(&3));
    assert_eq!(tok.decode(&plain, false), text);
}

#[test]
fn bos_and_space_prefix_follow_the_model() {
    let no_bos = tiny_tokenizer();
    assert_ne!(no_bos.encode("hello", EncodeOptions::PROMPT)[0], 1);
    let bos = tiny_tokenizer_with(PreTokenizer::SmolLm, true, false);
    assert_eq!(bos.encode("hello", EncodeOptions::PROMPT)[0], 1);
    assert_ne!(bos.encode("hello", EncodeOptions::PLAIN)[0], 1);
    assert!(bos.encode("", EncodeOptions::PLAIN).is_empty());

    let spaced = tiny_tokenizer_with(PreTokenizer::SmolLm, false, true);
    let ids = spaced.encode("world<|im_end|>world", EncodeOptions::PROMPT);
    assert_eq!(texts(&spaced, &ids), [" world", "<|im_end|>", " world"]);
    let plain = tiny_tokenizer();
    let ids = plain.encode("world", EncodeOptions::PROMPT);
    assert_eq!(texts(&plain, &ids)[0], "w");
}

#[test]
fn round_trip_on_a_handmade_vocab() {
    let tok = tiny_tokenizer();
    for text in [
        "",
        "hello world",
        "  leading, trailing  ",
        "tabs\tand\nnewlines\r\n\n",
        "naïve café 日本語 🙂🚀",
        "x = [1, 22, 333]; // 'quoted' it's",
        "<|im_start|>system\n<|im_end|>",
        "<|im_start",
    ] {
        let ids = tok.encode(text, EncodeOptions::PROMPT);
        assert_eq!(tok.decode(&ids, false), text, "{text:?} -> {ids:?}");
    }
}

#[test]
fn stream_decoder_holds_back_incomplete_utf8() {
    let tok = tiny_tokenizer();
    // No merges touch these bytes: each multi-byte character spans several tokens.
    let text = "é日🙂!";
    let ids = tok.encode(text, EncodeOptions::PLAIN);
    assert_eq!(ids.len(), text.len());
    let mut dec = StreamDecoder::new(false);
    let chunks: Vec<String> = ids.iter().map(|id| dec.push(&tok, *id)).collect();
    assert_eq!(
        chunks,
        ["", "é", "", "", "日", "", "", "", "🙂", "!"],
        "a chunk must never hold half a character"
    );
    assert!(dec.pending().is_empty());
    assert_eq!(dec.finish(), "");

    // A cut-off character at the end comes out lossily on finish.
    let mut dec = StreamDecoder::new(false);
    assert_eq!(dec.push(&tok, ids[2]), "");
    assert_eq!(dec.pending().len(), 1);
    assert_eq!(dec.finish(), "\u{FFFD}");

    // A byte that can never start a character is replaced at once, not held.
    let lone_continuation = tok.token_id(&byte_char(0x80).to_string()).unwrap();
    let mut dec = StreamDecoder::new(false);
    assert_eq!(dec.push(&tok, lone_continuation), "\u{FFFD}");
    assert!(dec.pending().is_empty());

    // Skipping specials in the stream.
    let mut dec = StreamDecoder::new(true);
    assert_eq!(dec.push(&tok, 2), "");
    assert_eq!(dec.push(&tok, ids[9]), "!");
}

#[test]
fn tokenizer_rejects_inconsistent_parts() {
    let (tokens, token_types, _) = tiny_parts(&[]);
    let base = TokenizerConfig {
        tokens,
        token_types,
        merges: vec![],
        pre: PreTokenizer::Gpt2,
        bos_token_id: None,
        eos_token_id: None,
        unknown_token_id: None,
        add_bos_token: false,
        add_space_prefix: false,
    };
    let mut bad = base.clone();
    bad.eos_token_id = Some(100_000);
    assert!(matches!(Tokenizer::new(bad), Err(ModelError::Tokenizer(_))));
    let mut bad = base.clone();
    bad.token_types.pop();
    assert!(matches!(Tokenizer::new(bad), Err(ModelError::Tokenizer(_))));
    let mut bad = base.clone();
    bad.merges = vec!["nospace".to_string()];
    assert!(matches!(Tokenizer::new(bad), Err(ModelError::Tokenizer(_))));
    let mut bad = base;
    bad.tokens.truncate(10);
    bad.token_types.truncate(10);
    let err = Tokenizer::new(bad).unwrap_err().to_string();
    assert!(err.contains("has no token"), "{err}");
    assert!(PreTokenizer::from_gguf(Some("llama-bpe")).is_err());
}

#[test]
fn chatml_template_renders() {
    let t = ChatTemplate::fallback("<|im_start|>", "<|im_end|>").unwrap();
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    assert_eq!(
        t.render(&messages, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&messages[1..], false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn templates_get_hf_features_and_fail_cleanly() {
    // bos_token, trim_blocks/lstrip_blocks, Python string methods.
    let src = "{{ bos_token }}\n  {% for m in messages %}\n{{ m['role'] | upper }}: {{ m['content'].strip() }}\n  {% endfor %}\n{{ eos_token }}";
    let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
    let out = t
        .render(&[ChatMessage::new("user", "  hi  ")], false)
        .unwrap();
    assert_eq!(out, "<s>\nUSER: hi\n</s>");

    let raising = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok";
    let t = ChatTemplate::new(raising, "", "").unwrap();
    assert_eq!(
        t.render(&[ChatMessage::new("user", "x")], false).unwrap(),
        "ok"
    );
    let err = t
        .render(&[ChatMessage::new("assistant", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("first message must be from the user"), "{err}");

    assert!(matches!(
        ChatTemplate::new("{% for %}", "", ""),
        Err(ModelError::Template(_))
    ));
    // A runaway template runs out of fuel instead of hanging.
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    assert!(t.render(&[], false).is_err());
}

// ---- GGUF files written here ----

struct TinyLlama {
    vocab: usize,
    dim: usize,
    heads: u32,
    kv_heads: u32,
    ff: usize,
    architecture: &'static str,
    /// Format of the block matmul weights (norms and embeddings stay F32).
    dtype: GgmlDType,
}

const TINY: TinyLlama = TinyLlama {
    vocab: 0, // filled from the tokenizer parts
    dim: 16,
    heads: 2,
    kv_heads: 1,
    ff: 32,
    architecture: "llama",
    dtype: GgmlDType::F32,
};

fn f32_tensor(shape: &[usize], seed: usize) -> QTensor {
    weight_tensor(shape, seed, GgmlDType::F32)
}

fn weight_tensor(shape: &[usize], seed: usize, dtype: GgmlDType) -> QTensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
        .collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn write_tiny_gguf(path: &Path, cfg: &TinyLlama, chat_template: Option<&str>) {
    let (tokens, types, merges) = tiny_parts(MERGES);
    let vocab = if cfg.vocab == 0 {
        tokens.len()
    } else {
        cfg.vocab
    };
    let arch = cfg.architecture;
    let s = |x: &str| Value::String(x.to_string());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (format!("{arch}.context_length"), Value::U32(64)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(cfg.dim as u32),
        ),
        (format!("{arch}.block_count"), Value::U32(1)),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(cfg.ff as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(cfg.heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(cfg.kv_heads),
        ),
        (
            format!("{arch}.rope.dimension_count"),
            Value::U32((cfg.dim as u32).checked_div(cfg.heads).unwrap_or(8)),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                types
                    .iter()
                    .map(|t| Value::I32(if *t == TokenType::Control { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if let Some(t) = chat_template {
        md.push(("tokenizer.chat_template".into(), s(t)));
    }
    let (d, ff) = (cfg.dim, cfg.ff);
    let kv = if cfg.heads == 0 {
        d
    } else {
        d / cfg.heads as usize * cfg.kv_heads as usize
    };
    let tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), f32_tensor(&[vocab, d], 1)),
        ("output_norm.weight".into(), f32_tensor(&[d], 2)),
        ("output.weight".into(), f32_tensor(&[vocab, d], 3)),
        (
            "blk.0.attn_q.weight".into(),
            weight_tensor(&[d, d], 4, cfg.dtype),
        ),
        (
            "blk.0.attn_k.weight".into(),
            weight_tensor(&[kv, d], 5, cfg.dtype),
        ),
        (
            "blk.0.attn_v.weight".into(),
            weight_tensor(&[kv, d], 6, cfg.dtype),
        ),
        (
            "blk.0.attn_output.weight".into(),
            weight_tensor(&[d, d], 7, cfg.dtype),
        ),
        (
            "blk.0.ffn_gate.weight".into(),
            weight_tensor(&[ff, d], 8, cfg.dtype),
        ),
        (
            "blk.0.ffn_down.weight".into(),
            weight_tensor(&[d, ff], 9, cfg.dtype),
        ),
        (
            "blk.0.ffn_up.weight".into(),
            weight_tensor(&[ff, d], 10, cfg.dtype),
        ),
        ("blk.0.attn_norm.weight".into(), f32_tensor(&[d], 11)),
        ("blk.0.ffn_norm.weight".into(), f32_tensor(&[d], 12)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}

#[test]
fn tiny_llama_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &TINY, None);

    let mut model = load(&path).unwrap();
    let info = model.info().clone();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.context_length, Some(64));
    assert_eq!(model.max_context(), 64);
    assert_eq!(info.vocab_size, model.tokenizer().vocab_size());
    // No template in the file: ChatML fallback with the file's bos/eos strings.
    let prompt = model
        .chat_template()
        .render(&[ChatMessage::new("user", "hello")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );

    let ids = model.tokenizer().encode(&prompt, EncodeOptions::PROMPT);
    let prefill = model.forward(&ids, 0).unwrap();
    assert_eq!(prefill.len(), info.vocab_size);
    assert!(prefill.iter().all(|x| x.is_finite()));
    assert_eq!(model.cached_tokens(), ids.len());

    // Prefill of n tokens == prefill of n-1 then one decode step.
    model.reset();
    model.forward(&ids[..ids.len() - 1], 0).unwrap();
    let stepped = model.forward(&ids[ids.len() - 1..], ids.len() - 1).unwrap();
    let max_diff = prefill
        .iter()
        .zip(&stepped)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff < 1e-4,
        "prefill and stepped logits differ by {max_diff}"
    );

    // Misuse is an error, not corruption.
    let n = model.cached_tokens();
    let err = model.forward(&ids[..1], 0).unwrap_err().to_string();
    assert!(err.contains("KV cache holds"), "{err}");
    assert!(model.forward(&[], n).is_err());
    assert!(model.forward(&[info.vocab_size as u32], n).is_err());
    let too_long = vec![5u32; 64];
    assert!(model.forward(&too_long, n).is_err());
    assert_eq!(
        model.cached_tokens(),
        n,
        "rejected calls leave the cache alone"
    );
    model.reset();
    assert_eq!(model.cached_tokens(), 0);
    assert_eq!(model.forward(&ids, 0).unwrap(), prefill);
}

#[test]
fn not_a_gguf_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let err = load(&path).unwrap_err();
    assert!(
        matches!(err, ModelError::UnrecognizedFormat { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a GGUF file"), "{err}");

    std::fs::write(&path, b"GG").unwrap();
    assert!(matches!(
        load(&path),
        Err(ModelError::UnrecognizedFormat { .. })
    ));
    assert!(matches!(
        load(dir.path().join("missing.gguf")),
        Err(ModelError::Io { .. })
    ));
    // A folder without the safetensors trio.
    assert!(matches!(
        load(dir.path()),
        Err(ModelError::UnrecognizedFormat { .. })
    ));
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("tiny.gguf");
    write_tiny_gguf(&full, &TINY, None);
    let bytes = std::fs::read(&full).unwrap();
    let cut = dir.path().join("cut.gguf");
    let mut lengths: Vec<usize> = (4..64).collect();
    lengths.extend((64..bytes.len()).step_by(bytes.len() / 97 + 1));
    lengths.push(bytes.len() - 1);
    for len in lengths {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        match load(&cut) {
            Err(_) => {}
            Ok(_) => panic!("a file cut to {len} of {} bytes loaded", bytes.len()),
        }
    }
}

#[test]
fn unsupported_architecture_and_bad_shapes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    write_tiny_gguf(
        &path,
        &TinyLlama {
            architecture: "mamba",
            ..TINY
        },
        None,
    );
    let err = load(&path).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "mamba"),
        "{err:?}"
    );
    // The header alone still reads: the registry can describe what it cannot run.
    assert_eq!(GgufFile::open(&path).unwrap().info.architecture, "mamba");

    // head_count = 0 would make a pass divide by zero: refused at load, not a crash.
    let path = dir.path().join("zero_heads.gguf");
    write_tiny_gguf(
        &path,
        &TinyLlama {
            heads: 0,
            kv_heads: 0,
            ..TINY
        },
        None,
    );
    let err = load(&path).unwrap_err();
    assert!(
        matches!(&err, ModelError::Metadata { reason, .. } if reason.contains("inconsistent shape")),
        "{err:?}"
    );

    // Embedding rows that do not cover the vocabulary: refused at load.
    let path = dir.path().join("short_embd.gguf");
    write_tiny_gguf(&path, &TinyLlama { vocab: 8, ..TINY }, None);
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("token_embd.weight has 8 rows"), "{err}");

    // A broken template in the file is an error at load.
    let path = dir.path().join("bad_template.gguf");
    write_tiny_gguf(&path, &TINY, Some("{% if %}"));
    assert!(matches!(load(&path), Err(ModelError::Template(_))));
}

#[test]
fn slow_formats_are_requantized_without_changing_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4_1.gguf");
    let cfg = TinyLlama {
        // candle's Q4_1 kernel wants an even number of 32-wide blocks per row.
        dim: 64,
        ff: 128,
        dtype: GgmlDType::Q4_1,
        ..TINY
    };
    write_tiny_gguf(&path, &cfg, None);
    assert!(airlock_models::quant::needs_requantize(
        &GgufFile::open(&path).unwrap().content
    ));
    let run = |requantize_slow_formats| {
        let options = airlock_models::LoadOptions {
            requantize_slow_formats,
            ..airlock_models::LoadOptions::default()
        };
        // candle's pass (GPU devices); the CPU decoder runs Q4_1 as stored.
        let gguf = GgufFile::open(&path).unwrap();
        let mut model: Box<dyn airlock_models::LanguageModel> =
            Box::new(airlock_models::LlamaModel::load(gguf, &options).unwrap());
        let ids = model
            .tokenizer()
            .encode("hello world 42", EncodeOptions::PLAIN);
        model.forward(&ids, 0).unwrap()
    };
    let (stored, requantized) = (run(false), run(true));
    let scale = stored.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_diff = stored
        .iter()
        .zip(&requantized)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff <= 0.05 * scale,
        "logits moved by {max_diff} (largest {scale})"
    );
}

#[test]
fn a_cuda_device_without_cuda_is_a_clear_error() {
    if airlock_models::ComputeDevice::cuda_compiled() {
        return;
    }
    let err = airlock_models::ComputeDevice::Cuda(0).candle().unwrap_err();
    assert!(err.to_string().contains("cuda:0"), "{err}");
}
