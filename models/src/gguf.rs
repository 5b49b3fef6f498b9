//! GGUF artifacts: format detection and typed metadata.
//!
//! Owns recognising a model on disk ([`detect_format`]: a GGUF file by its magic, or a
//! folder holding `config.json`, `*.safetensors` and `tokenizer.json`) and turning a
//! GGUF header into a [`ModelInfo`]. Reading is done by candle's
//! `gguf_file::Content::read`, guarded so a malformed file is an error, never a panic.
//! Invariants: a [`ModelInfo`] always has an architecture, a non-zero vocabulary size
//! (the length of `tokenizer.ggml.tokens` when `<arch>.vocab_size` is absent) and a
//! tokenizer model; every other field is optional or defaulted as documented on it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{catch_panic, ModelError};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// What kind of artifact a path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// A single GGUF file (weights, tokenizer and template in one).
    Gguf(PathBuf),
    /// A Hugging Face style folder: config.json + *.safetensors + tokenizer.json.
    SafetensorsDir(PathBuf),
}

/// Decides what `path` holds without loading it.
pub fn detect_format(path: &Path) -> Result<ModelFormat, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        let has = |name: &str| path.join(name).is_file();
        let entries = std::fs::read_dir(path).map_err(|e| ModelError::io(path, e))?;
        let mut has_safetensors = false;
        for entry in entries {
            let entry = entry.map_err(|e| ModelError::io(path, e))?;
            if entry.path().extension().is_some_and(|x| x == "safetensors") {
                has_safetensors = true;
                break;
            }
        }
        if has("config.json") && has("tokenizer.json") && has_safetensors {
            return Ok(ModelFormat::SafetensorsDir(path.to_path_buf()));
        }
        return Err(ModelError::UnrecognizedFormat {
            path: path.to_path_buf(),
            reason: "a model folder needs config.json, tokenizer.json and *.safetensors"
                .to_string(),
        });
    }
    check_gguf_magic(path)?;
    Ok(ModelFormat::Gguf(path.to_path_buf()))
}

/// Fails unless the file at `path` starts with the GGUF magic.
pub fn check_gguf_magic(path: &Path) -> Result<(), ModelError> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut magic = [0u8; 4];
    let mut read = 0;
    while read < magic.len() {
        match file.read(&mut magic[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ModelError::io(path, e)),
        }
    }
    if read == magic.len() && magic == GGUF_MAGIC {
        Ok(())
    } else {
        Err(ModelError::UnrecognizedFormat {
            path: path.to_path_buf(),
            reason: format!(
                "not a GGUF file (first bytes {:02x?}, expected \"GGUF\")",
                &magic[..read]
            ),
        })
    }
}

/// A parsed GGUF header: candle's content plus our typed view of it.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub info: ModelInfo,
}

impl GgufFile {
    /// Checks the magic, then reads the header (metadata and tensor index, no weights).
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        check_gguf_magic(path)?;
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = catch_panic("reading the GGUF header", || {
            Content::read(&mut reader).map_err(|e| ModelError::InvalidGguf {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        })?;
        let info = ModelInfo::from_metadata(&content.metadata)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            info,
        })
    }
}

/// The metadata a runtime needs to know about a model before running it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// `<arch>.context_length`: the context the model was trained for.
    pub context_length: Option<usize>,
    /// `<arch>.embedding_length`.
    pub embedding_length: Option<usize>,
    /// `<arch>.block_count`.
    pub block_count: Option<usize>,
    /// `<arch>.vocab_size`, else the number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece), ...
    pub tokenizer_model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer llama.cpp would use, when present.
    pub tokenizer_pre: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; absent means the tokenizer's default (no BOS
    /// for byte-level BPE).
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`; absent means false for byte-level BPE.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
}

impl ModelInfo {
    /// Builds the typed view from raw GGUF metadata.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self, ModelError> {
        let architecture = get_string(md, "general.architecture")?
            .ok_or_else(|| missing("general.architecture"))?;
        let arch_usize = |suffix: &str| get_usize(md, &format!("{architecture}.{suffix}"));
        let token_count = match md.get("tokenizer.ggml.tokens") {
            Some(v) => v
                .to_vec()
                .map_err(|e| wrong_type("tokenizer.ggml.tokens", e))?
                .len(),
            None => 0,
        };
        let vocab_size = arch_usize("vocab_size")?.unwrap_or(token_count);
        if vocab_size == 0 {
            return Err(missing("tokenizer.ggml.tokens"));
        }
        Ok(Self {
            name: get_string(md, "general.name")?,
            context_length: arch_usize("context_length")?,
            embedding_length: arch_usize("embedding_length")?,
            block_count: arch_usize("block_count")?,
            vocab_size,
            tokenizer_model: get_string(md, "tokenizer.ggml.model")?
                .ok_or_else(|| missing("tokenizer.ggml.model"))?,
            tokenizer_pre: get_string(md, "tokenizer.ggml.pre")?,
            bos_token_id: get_u32(md, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: get_u32(md, "tokenizer.ggml.eos_token_id")?,
            unknown_token_id: get_u32(md, "tokenizer.ggml.unknown_token_id")?,
            padding_token_id: get_u32(md, "tokenizer.ggml.padding_token_id")?,
            add_bos_token: get_bool(md, "tokenizer.ggml.add_bos_token")?,
            add_space_prefix: get_bool(md, "tokenizer.ggml.add_space_prefix")?,
            chat_template: get_string(md, "tokenizer.chat_template")?,
            architecture,
        })
    }
}

fn missing(key: &str) -> ModelError {
    ModelError::Metadata {
        key: key.to_string(),
        reason: "missing".to_string(),
    }
}

fn wrong_type(key: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Metadata {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

pub(crate) fn get_string(
    md: &HashMap<String, Value>,
    key: &str,
) -> Result<Option<String>, ModelError> {
    md.get(key)
        .map(|v| v.to_string().cloned().map_err(|e| wrong_type(key, e)))
        .transpose()
}

pub(crate) fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>, ModelError> {
    md.get(key)
        .map(|v| v.to_bool().map_err(|e| wrong_type(key, e)))
        .transpose()
}

/// Reads any integer type as u64 (GGUF writers disagree on widths), rejecting negatives.
fn get_u64(md: &HashMap<String, Value>, key: &str) -> Result<Option<u64>, ModelError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let n: i128 = match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        other => {
            return Err(wrong_type(
                key,
                format!("expected an integer, found {:?}", other.value_type()),
            ))
        }
    };
    u64::try_from(n)
        .map(Some)
        .map_err(|_| wrong_type(key, format!("{n} is out of range")))
}

fn get_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>, ModelError> {
    get_u64(md, key)?
        .map(|n| u32::try_from(n).map_err(|_| wrong_type(key, format!("{n} is out of range"))))
        .transpose()
}

fn get_usize(md: &HashMap<String, Value>, key: &str) -> Result<Option<usize>, ModelError> {
    get_u64(md, key)?
        .map(|n| usize::try_from(n).map_err(|_| wrong_type(key, format!("{n} is out of range"))))
        .transpose()
}
