//! Safetensors llama folders and `tokenizer.json` tokenizers, on tiny artifacts written
//! by the tests themselves (`support/tiny_hf.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate

#[path = "support/tiny_hf.rs"]
mod tiny_hf;

use std::path::Path;

use airlock_models::tokenizer::{HfSpecialTokens, TokenType};
use airlock_models::{
    is_embedding_dir, is_llama_dir, load, ChatMessage, EncodeOptions, LanguageModel, ModelError,
    StreamDecoder, Tokenizer,
};
use candle_core::DType;
use tiny_hf::{write_folder, Layout, CONTEXT, PLAIN, VOCAB};

fn folder(layout: Layout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), layout);
    dir
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits after each of `tokens` fed one at a time from a fresh sequence.
fn stepwise(model: &mut dyn LanguageModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    model.reset();
    tokens
        .iter()
        .enumerate()
        .map(|(pos, &t)| model.forward(&[t], pos).unwrap())
        .collect()
}

/// Ids of every kind: BOS, bytes, a merge, one the tokenizer lacks (299).
const PROMPT: &[u32] = &[271, 72, 101, 108, 108, 111, 266, 7, 299];

#[test]
fn a_llama_folder_loads_and_keeps_the_position_invariants() {
    let dir = folder(PLAIN);
    assert!(is_llama_dir(dir.path()));
    assert!(!is_embedding_dir(dir.path()));
    let mut model = load(dir.path()).unwrap();
    let info = model.info().clone();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.vocab_size, VOCAB);
    assert_eq!(info.context_length, Some(CONTEXT));
    assert_eq!(model.max_context(), CONTEXT);

    let tok = model.tokenizer().clone();
    assert_eq!(tok.vocab_size(), 275);
    assert_eq!(tok.bos_token_id(), Some(271));
    assert_eq!(tok.eos_token_id(), Some(273));
    assert!(
        !tok.add_bos_token(),
        "tokenizer_config.json says add_bos_token false"
    );

    // Chat template from tokenizer_config.json, rendered and tokenized with markers.
    let prompt = model
        .chat_template()
        .render(&[ChatMessage::new("user", "Hello world")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, EncodeOptions::PROMPT);
    assert_eq!(ids[0], 272);
    assert_eq!(tok.decode(&ids, false), prompt);

    // Shapes and the position bookkeeping.
    let logits = model.forward(&ids, 0).unwrap();
    assert_eq!(logits.len(), VOCAB);
    assert!(logits.iter().all(|x| x.is_finite()));
    assert_eq!(model.cached_tokens(), ids.len());
    let err = model.forward(&[1], 0).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    let err = model.forward(&[VOCAB as u32], ids.len()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    // Refused calls do not poison: the sequence continues where it was.
    let next = model.forward(&[5], ids.len()).unwrap();
    assert_eq!(next.len(), VOCAB);
    assert_eq!(model.cached_tokens(), ids.len() + 1);
    let err = model
        .forward(&vec![5; CONTEXT], model.cached_tokens())
        .unwrap_err();
    assert!(err.to_string().contains("exceed the context"), "{err}");
    model.reset();
    assert_eq!(model.cached_tokens(), 0);
    assert_eq!(
        model.forward(&ids, 0).unwrap(),
        logits,
        "reset gives a fresh cache"
    );
}

#[test]
fn prefill_equals_token_by_token() {
    let dir = folder(PLAIN);
    let mut model = load(dir.path()).unwrap();
    let steps = stepwise(model.as_mut(), PROMPT);
    model.reset();
    let prefill = model.forward(PROMPT, 0).unwrap();
    let diff = max_diff(&prefill, steps.last().unwrap());
    assert!(diff < 1e-4, "prefill differs from stepwise by {diff}");
    // Chunked: a prefill at a later position agrees too.
    model.reset();
    model.forward(&PROMPT[..4], 0).unwrap();
    let chunked = model.forward(&PROMPT[4..], 4).unwrap();
    let diff = max_diff(&chunked, steps.last().unwrap());
    assert!(diff < 1e-4, "chunked prefill differs by {diff}");
    // Logits depend on the context, so the cache is really used.
    assert!(
        max_diff(
            &steps[PROMPT.len() - 1],
            &stepwise(model.as_mut(), &PROMPT[PROMPT.len() - 1..])[0]
        ) > 1e-3
    );
}

#[test]
fn bf16_sharded_and_tied_layouts_load_the_same_model() {
    let reference = {
        let dir = folder(PLAIN);
        let mut model = load(dir.path()).unwrap();
        stepwise(model.as_mut(), PROMPT)
    };
    for layout in [
        Layout {
            dtype: DType::BF16,
            ..PLAIN
        },
        Layout {
            dtype: DType::F16,
            ..PLAIN
        },
        Layout {
            sharded: true,
            ..PLAIN
        },
        Layout {
            sharded: true,
            dtype: DType::BF16,
            ..PLAIN
        },
    ] {
        let dir = folder(layout);
        if layout.sharded {
            assert!(!dir.path().join("model.safetensors").exists());
            assert!(dir.path().join("model.safetensors.index.json").is_file());
        }
        let mut model = load(dir.path()).unwrap();
        let got = stepwise(model.as_mut(), PROMPT);
        // Every layout holds BF16-exact values: F32 after conversion is identical.
        for (a, b) in got.iter().zip(&reference) {
            assert!(max_diff(a, b) < 1e-5, "{layout:?}");
        }
    }

    // Tied embeddings: no lm_head tensor, the embedding is the output layer.
    let dir = folder(Layout {
        tied: true,
        sharded: true,
        ..PLAIN
    });
    let mut model = load(dir.path()).unwrap();
    let logits = model.forward(PROMPT, 0).unwrap();
    assert_eq!(logits.len(), VOCAB);
    assert!(max_diff(&logits, reference.last().unwrap()) > 1e-3);
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

#[test]
fn bad_folders_are_errors_not_panics() {
    // A truncated single file, at many lengths.
    let dir = folder(PLAIN);
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    for len in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&weights, &bytes[..len]).unwrap();
        load_err(dir.path());
    }

    // A truncated shard, and an index naming a tensor its shard lacks.
    let dir = folder(Layout {
        sharded: true,
        ..PLAIN
    });
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002"), "{err}");
    std::fs::write(&shard, &bytes).unwrap();
    assert!(load(dir.path()).is_ok());
    edit_json(&dir.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors".into();
    });
    let err = load_err(dir.path());
    assert!(err.contains("model.extra.weight"), "{err}");

    // No tokenizer.json: not a model folder.
    let dir = folder(PLAIN);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert!(matches!(
        load(dir.path()),
        Err(ModelError::UnrecognizedFormat { .. })
    ));
    // A tokenizer.json that is not one.
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    assert!(matches!(load(dir.path()), Err(ModelError::Tokenizer(_))));

    // Wrong shapes and missing tensors.
    let dir = folder(PLAIN);
    edit_json(&dir.path().join("config.json"), |v| {
        v["intermediate_size"] = 96.into();
    });
    let err = load_err(dir.path());
    assert!(err.contains("shape"), "{err}");
    let dir = folder(Layout {
        tied: true,
        ..PLAIN
    });
    edit_json(&dir.path().join("config.json"), |v| {
        v["tie_word_embeddings"] = false.into();
    });
    let err = load_err(dir.path());
    assert!(err.contains("lm_head"), "{err}");

    // Configurations candle's llama would run wrongly, and other families.
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("attention_bias", true.into(), "biases"),
        ("hidden_act", "gelu".into(), "hidden_act"),
        ("head_dim", 32.into(), "head_dim"),
        ("num_key_value_heads", 3.into(), "do not fit"),
        ("vocab_size", 200.into(), "embeds only 200"),
        (
            "max_position_embeddings",
            0.into(),
            "max_position_embeddings",
        ),
        (
            "model_type",
            "mamba".into(),
            "unsupported architecture `mamba`",
        ),
        ("model_type", "bert".into(), "embedding model"),
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
            "config.json",
        ),
    ];
    for (key, value, expected) in cases {
        let dir = folder(PLAIN);
        edit_json(&dir.path().join("config.json"), |v| {
            v[*key] = value.clone();
        });
        let err = load_err(dir.path());
        assert!(err.contains(expected), "{key}={value}: {err}");
    }
}

#[test]
fn mistral_sliding_window_caps_the_context() {
    let dir = folder(PLAIN);
    edit_json(&dir.path().join("config.json"), |v| {
        v["model_type"] = "mistral".into();
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        v["sliding_window"] = 100.into();
    });
    let model = load(dir.path()).unwrap();
    assert_eq!(model.info().architecture, "mistral");
    assert_eq!(model.max_context(), 100);
}

// --- tokenizer.json tokenizers ---

fn byte_level() -> Tokenizer {
    Tokenizer::from_hf(
        tiny_hf::byte_level_tokenizer(),
        HfSpecialTokens {
            bos_token: Some("<|endoftext|>".into()),
            eos_token: Some("<|im_end|>".into()),
            ..HfSpecialTokens::default()
        },
    )
    .unwrap()
}

const UNICODE: &str = "Hello world — naïve café, 世界 🎉!\n\ttheir\u{a0}Öl";

#[test]
fn byte_level_round_trip_matches_hugging_face() {
    let tok = byte_level();
    let hf = tiny_hf::byte_level_tokenizer();
    let ids = tok.encode(UNICODE, EncodeOptions::PLAIN);
    assert_eq!(ids, hf.encode(UNICODE, false).unwrap().get_ids());
    assert_eq!(tok.decode(&ids, false), UNICODE);
    assert_eq!(tok.decode_bytes(&ids, false), UNICODE.as_bytes());
    // Merged tokens are in use, and map back through the byte-level alphabet.
    let hello = tok.token_id("Hello").unwrap();
    let world = tok.token_id("Ġworld").unwrap();
    assert_eq!(&ids[..2], &[hello, world]);
    assert_eq!(tok.token_bytes(world), Some(&b" world"[..]));
    assert_eq!(tok.token_text(world), Some("Ġworld"));
    assert_eq!(
        tok.token_bytes(tok.token_id("Ã©").unwrap()),
        Some("é".as_bytes())
    );
    assert_eq!(tok.token_type(world), Some(TokenType::Normal));
    assert_eq!(tok.byte_level(" é".as_bytes()), "ĠÃ©");
}

#[test]
fn stream_decoder_reassembles_characters_split_across_tokens() {
    let tok = byte_level();
    let ids = tok.encode(UNICODE, EncodeOptions::PLAIN);
    let mut stream = StreamDecoder::new(false);
    let mut text = String::new();
    let mut held_back = 0;
    for &id in &ids {
        let chunk = stream.push(&tok, id);
        assert!(!chunk.contains('\u{FFFD}'), "{chunk:?}");
        if chunk.is_empty() && !stream.pending().is_empty() {
            held_back += 1;
        }
        text.push_str(&chunk);
    }
    assert_eq!(stream.finish(), "");
    assert_eq!(text, UNICODE);
    // 世, 界 and 🎉 are byte tokens here: 2 + 2 + 3 pushes hold bytes back.
    assert!(held_back >= 7, "{held_back}");
}

#[test]
fn special_tokens_follow_encode_options() {
    let tok = byte_level();
    let (start, end, eot) = (272, 273, 271);
    assert_eq!(tok.token_id("<|im_start|>"), Some(start));
    assert!(tok.is_special(start) && tok.is_special(end) && tok.is_special(eot));
    assert_eq!(tok.token_type(start), Some(TokenType::Control));
    let user = tok.token_id(tiny_hf::USER_TOKEN).unwrap();
    assert_eq!(tok.token_type(user), Some(TokenType::UserDefined));
    assert!(!tok.is_special(user));
    assert_eq!(tok.token_bytes(end), Some(&b"<|im_end|>"[..]));

    let text = "<|im_start|>user\nhi<|im_end|> <tool>";
    let parsed = tok.encode(text, EncodeOptions::PROMPT);
    assert_eq!(parsed[0], start);
    assert!(parsed.contains(&end) && parsed.contains(&user));
    // PLAIN: control markers stay text, user-defined tokens are still split out.
    let plain = tok.encode(text, EncodeOptions::PLAIN);
    assert!(!plain.contains(&start) && !plain.contains(&end));
    assert!(plain.contains(&user));
    assert_eq!(tok.decode(&plain, false), text);
    assert_eq!(tok.decode(&parsed, false), text);
    assert_eq!(tok.decode(&parsed, true), "user\nhi <tool>");

    // BOS/EOS only when asked and the config says so.
    assert!(!tok.add_bos_token());
    let with_bos = Tokenizer::from_hf(
        tiny_hf::byte_level_tokenizer(),
        HfSpecialTokens {
            bos_token: Some("<|endoftext|>".into()),
            add_bos_token: Some(true),
            ..HfSpecialTokens::default()
        },
    )
    .unwrap();
    assert_eq!(with_bos.encode("hi", EncodeOptions::PROMPT)[0], eot);
    assert_ne!(with_bos.encode("hi", EncodeOptions::PLAIN)[0], eot);
    // Ids from config.json when tokenizer_config.json names no token.
    let by_id = Tokenizer::from_hf(
        tiny_hf::byte_level_tokenizer(),
        HfSpecialTokens {
            eos_token_id: Some(273),
            ..HfSpecialTokens::default()
        },
    )
    .unwrap();
    assert_eq!(by_id.eos_token_id(), Some(273));
    assert_eq!(by_id.bos_token_id(), None);
    let err = Tokenizer::from_hf(
        tiny_hf::byte_level_tokenizer(),
        HfSpecialTokens {
            eos_token_id: Some(9999),
            ..HfSpecialTokens::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

/// A Llama-2-style tokenizer.json: BPE over `▁`-escaped text with byte fallback, a
/// post-processor that adds `<s>`, and the decoder chain Llama 2 and Mistral ship.
const SPM_STYLE: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
  "pre_tokenizer": null,
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
  "decoder": {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
  "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
    "vocab": VOCAB, "merges": [["▁", "h"], ["▁h", "i"]]}
}"#;

fn spm_style() -> tokenizers::Tokenizer {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    for t in ["▁", "h", "i", "▁h", "▁hi", "t", "e", "!"] {
        let id = vocab.len();
        vocab.insert(t.to_string(), id.into());
    }
    let json = SPM_STYLE.replace("VOCAB", &serde_json::Value::Object(vocab).to_string());
    json.parse().unwrap()
}

#[test]
fn byte_fallback_tokens_are_bytes() {
    let tok = Tokenizer::from_hf(
        spm_style(),
        HfSpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..HfSpecialTokens::default()
        },
    )
    .unwrap();
    // The post-processor adds <s>: that is the default for add_bos_token.
    assert!(tok.add_bos_token());
    let ids = tok.encode("hi 世!", EncodeOptions::PROMPT);
    assert_eq!(ids[0], 1);
    assert_eq!(tok.token_text(ids[1]), Some("▁hi"));
    assert_eq!(tok.token_bytes(ids[1]), Some(&b" hi"[..]));
    let e4 = 3 + 0xE4;
    assert_eq!(tok.token_type(e4), Some(TokenType::Byte));
    assert_eq!(tok.token_bytes(e4), Some(&[0xE4u8][..]));
    assert_eq!(&ids[3..6], &[e4, 3 + 0xB8, 3 + 0x96]);
    // Like the GGUF SentencePiece tokenizers, the prefix space is kept.
    assert_eq!(tok.decode(&ids, true), " hi 世!");
    let mut stream = StreamDecoder::new(true);
    let chunks: Vec<String> = ids.iter().map(|&id| stream.push(&tok, id)).collect();
    assert_eq!(chunks.concat(), " hi 世!");
    assert_eq!(&chunks[3..6], &["", "", "世"]);
    assert_eq!(tok.byte_level(b" hi"), "▁hi");
    assert!(tok.is_special(0) && tok.is_special(1));
}
