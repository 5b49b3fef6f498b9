//! Tests against the real all-MiniLM-L6-v2 folder (BERT, mean pooling, Normalize) from
//! `scripts/fetch-models.sh`; without it these tests fail and say so, as smollm2.rs
//! does.
//!
//! `fixtures/minilm_reference.json` holds the vectors real sentence-transformers made
//! from the same files (`scripts/make-embedding-fixture.py` regenerates it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test crate: failing loudly is the point

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use airlock_models::{is_embedding_dir, EmbeddingModel, ModelError, Pooling};
use serde::Deserialize;

fn model_dir() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/all-MiniLM-L6-v2");
    assert!(
        path.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-models.sh from the repository root first",
        path.display()
    );
    path
}

fn model() -> &'static EmbeddingModel {
    static MODEL: OnceLock<EmbeddingModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let start = Instant::now();
        let model = EmbeddingModel::load(&model_dir()).unwrap();
        eprintln!("loaded all-MiniLM-L6-v2 in {:?}", start.elapsed());
        model
    })
}

#[derive(Deserialize)]
struct Fixture {
    max_seq_length: usize,
    dimensions: usize,
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_reference.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn texts() -> Vec<&'static str> {
    fixture()
        .sentences
        .iter()
        .map(|s| s.text.as_str())
        .collect()
}

#[test]
fn info_comes_from_the_sentence_transformers_files() {
    let info = model().info();
    assert_eq!(info.architecture, "bert");
    assert_eq!(info.dimensions, fixture().dimensions);
    assert_eq!(info.max_tokens, fixture().max_seq_length);
    assert_eq!(info.pooling, Pooling::Mean);
    assert!(info.normalize);
    assert!(is_embedding_dir(&model_dir()));
}

#[test]
fn matches_sentence_transformers_one_by_one() {
    for sentence in &fixture().sentences {
        assert_eq!(
            model().count_tokens(&sentence.text),
            sentence.tokens,
            "{:?}",
            sentence.text
        );
        let out = model().embed(&[&sentence.text]).unwrap();
        assert_eq!(out.prompt_tokens, sentence.tokens);
        let cos = cosine(&out.vectors[0], &sentence.embedding);
        assert!(cos >= 0.999, "cosine {cos} for {:?}", sentence.text);
        let max_diff = out.vectors[0]
            .iter()
            .zip(&sentence.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!(
            "cosine {cos:.7}, max |diff| {max_diff:.2e}: {:.40?}",
            sentence.text
        );
    }
}

#[test]
fn a_batch_gives_the_same_vectors_as_one_by_one() {
    let texts = texts();
    let batch = model().embed(&texts).unwrap();
    assert_eq!(batch.vectors.len(), texts.len());
    let total: usize = fixture().sentences.iter().map(|s| s.tokens).sum();
    assert_eq!(batch.prompt_tokens, total);
    for (text, vector) in texts.iter().zip(&batch.vectors) {
        let alone = &model().embed(&[text]).unwrap().vectors[0];
        let cos = cosine(vector, alone);
        assert!(cos >= 0.99999, "cosine {cos} for {text:?}");
        let max_diff = vector
            .iter()
            .zip(alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 1e-4, "max |diff| {max_diff} for {text:?}");
    }
}

#[test]
fn vectors_have_unit_length() {
    let texts = texts();
    for vector in model().embed(&texts).unwrap().vectors {
        assert_eq!(vector.len(), 384);
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}

#[test]
fn empty_list_and_empty_string() {
    let out = model().embed(&[]).unwrap();
    assert!(out.vectors.is_empty());
    assert_eq!(out.prompt_tokens, 0);

    let out = model().embed(&[""]).unwrap();
    assert_eq!(out.prompt_tokens, 2); // [CLS] [SEP]
    assert_eq!(out.vectors[0].len(), 384);
}

#[test]
fn similar_sentences_are_closer() {
    let out = model()
        .embed(&[
            "The quick brown fox jumps over the lazy dog.",
            "A fast auburn fox leaps above a sleepy hound.",
            "How do I reset my password?",
        ])
        .unwrap();
    let v = &out.vectors;
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.2);
}

#[test]
fn too_long_input_is_refused_not_truncated() {
    let max = model().info().max_tokens;
    // Each "word" is one token; with [CLS] and [SEP] this is exactly `max`, then one over.
    let fits = vec!["word"; max - 2].join(" ");
    let over = vec!["word"; max - 1].join(" ");
    assert_eq!(model().count_tokens(&fits), max);
    assert_eq!(model().count_tokens(&over), max + 1);
    assert_eq!(model().embed(&[&fits]).unwrap().prompt_tokens, max);

    let err = model().embed(&["short", &over]).unwrap_err();
    match err {
        ModelError::InputTooLong {
            index,
            tokens,
            max: m,
        } => {
            assert_eq!((index, tokens, m), (1, max + 1, max));
        }
        other => panic!("expected InputTooLong, got {other:?}"),
    }
}

#[test]
fn embed_from_several_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<EmbeddingModel>();

    let expected = model().embed(&["shared across threads"]).unwrap().vectors;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| model().embed(&["shared across threads"]).unwrap().vectors))
            .collect();
        for handle in handles {
            let got = handle.join().unwrap();
            assert!(cosine(&got[0], &expected[0]) > 0.99999);
        }
    });
}

/// A copy of the model folder in a tempdir, for breaking it.
fn copy_of_model() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&model_dir(), dir.path());
    dir
}

#[test]
fn broken_folders_are_errors_not_panics() {
    let dir = copy_of_model();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();

    // Cut in half: the header promises more bytes than there are.
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidFile { .. }), "{err:?}");

    // Garbage header.
    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidFile { .. }), "{err:?}");

    // A valid safetensors file missing the tensors BERT needs.
    std::fs::write(&weights, b"\x02\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidFile { .. }), "{err:?}");
    std::fs::write(&weights, &bytes).unwrap();

    // Unparseable config.json.
    let config = dir.path().join("config.json");
    let config_text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, "{ not json").unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidFile { .. }), "{err:?}");
    // A wrong hidden size makes every tensor the wrong shape.
    std::fs::write(
        &config,
        config_text.replace("\"hidden_size\": 384", "\"hidden_size\": 192"),
    )
    .unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
    // Tensors of another shape than config.json promises.
    let wrong = config_text.replace("\"intermediate_size\": 1536", "\"intermediate_size\": 1024");
    std::fs::write(&config, wrong).unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidFile { .. }), "{err:?}");
    // Zero heads make candle divide by zero: a caught panic, not a crash.
    let zero = config_text.replace("\"num_attention_heads\": 12", "\"num_attention_heads\": 0");
    std::fs::write(&config, zero).unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Panicked { .. }), "{err:?}");
    std::fs::write(&config, &config_text).unwrap();

    // Broken tokenizer.json.
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, "{\"version\": \"1.0\"").unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err:?}");

    // Missing tokenizer.json: no longer a model folder at all.
    std::fs::remove_file(&tokenizer).unwrap();
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnrecognizedFormat { .. }),
        "{err:?}"
    );
    assert!(!is_embedding_dir(dir.path()));
}

#[test]
fn a_llama_folder_is_not_an_embedding_model() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    assert!(!is_embedding_dir(dir.path()));
    let err = EmbeddingModel::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not BERT"), "{err}");
}
