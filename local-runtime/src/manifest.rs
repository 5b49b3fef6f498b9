//! Manifests: what a registered model is, and proof that its files have not changed.
//!
//! [`Manifest::inspect`] detects the format (a GGUF file, or a folder with config.json,
//! *.safetensors and tokenizer.json), reads the architecture and context length, and
//! hashes every file the model is loaded from (sha256). [`Manifest::verify`] hashes
//! them again before each load.
//!
//! Invariants: a manifest names only files that exist and were hashed at registration;
//! paths are absolute; a model whose family this build cannot serve is refused at
//! registration, not at first use; nothing here reads more of a file than its header
//! except the hash, which streams in 1 MiB blocks.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use airlock_models::{detect_format, GgufFile, ModelFormat};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a model is served for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Chat and completions (a decoder).
    Chat,
    /// Embeddings (an encoder).
    Embedding,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
        }
    }
}

/// The weights' container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    Gguf,
    Safetensors,
}

/// One hashed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// A registered model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Served as `local/<name>`.
    pub name: String,
    /// The GGUF file or the model folder, absolute.
    pub path: PathBuf,
    pub format: WeightFormat,
    pub kind: ModelKind,
    pub architecture: String,
    /// From the file's metadata; `None` when it does not say.
    pub context_length: Option<usize>,
    pub files: Vec<FileDigest>,
    /// Sum of the files' sizes: the estimate of the memory the loaded weights take.
    pub bytes: u64,
    /// Unix seconds.
    pub registered_at: u64,
}

/// Why a model cannot be registered or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid model name `{0}`: use 1-64 characters from a-z, A-Z, 0-9, `.`, `-`, `_`, starting with a letter or digit")]
    InvalidName(String),
    #[error("{0}")]
    Unreadable(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the file {path} has changed since the model was registered ({reason}); register it again if the change is intended")]
    Changed { path: PathBuf, reason: String },
}

/// Architectures this build serves, by format.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3", "phi3"];
/// `model_type` values of safetensors folders this build serves: `bert` for
/// embeddings, the others for chat.
pub const SAFETENSORS_ARCHITECTURES: &[&str] = &["bert", "llama", "mistral"];

/// Whether `name` is a valid model name (used in URLs and model ids).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Files of a safetensors folder that loading reads (those present).
const FOLDER_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

impl Manifest {
    /// Inspects and hashes the model at `path`. `progress(done, total)` is called as
    /// bytes are hashed.
    pub fn inspect(
        path: &Path,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, ManifestError> {
        if !valid_name(name) {
            return Err(ManifestError::InvalidName(name.to_string()));
        }
        let path = std::path::absolute(path)
            .map_err(|e| ManifestError::Unreadable(format!("{}: {e}", path.display())))?;
        let format = detect_format(&path).map_err(|e| ManifestError::Unreadable(e.to_string()))?;
        let (format, kind, architecture, context_length, files) = match format {
            ModelFormat::Gguf(file) => {
                let gguf =
                    GgufFile::open(&file).map_err(|e| ManifestError::Unreadable(e.to_string()))?;
                let arch = gguf.info.architecture.clone();
                if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
                    return Err(ManifestError::Unsupported(format!(
                        "GGUF architecture `{arch}` is not served by this build (served: {})",
                        GGUF_ARCHITECTURES.join(", ")
                    )));
                }
                (
                    WeightFormat::Gguf,
                    ModelKind::Chat,
                    arch,
                    gguf.info.context_length,
                    vec![file],
                )
            }
            ModelFormat::SafetensorsDir(dir) => {
                let (arch, context) = folder_config(&dir)?;
                if !SAFETENSORS_ARCHITECTURES.contains(&arch.as_str()) {
                    return Err(ManifestError::Unsupported(format!(
                        "safetensors `model_type` `{arch}` is not served by this build (served: {})",
                        SAFETENSORS_ARCHITECTURES.join(", ")
                    )));
                }
                let files = folder_files(&dir)?;
                let kind = match arch.as_str() {
                    "bert" => ModelKind::Embedding,
                    _ => ModelKind::Chat,
                };
                (WeightFormat::Safetensors, kind, arch, context, files)
            }
        };
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        let mut done = 0;
        let mut digests = Vec::with_capacity(files.len());
        for file in files {
            let (bytes, sha256) = hash_file(&file, &mut |n| {
                done += n;
                progress(done, total);
            })?;
            digests.push(FileDigest {
                path: file,
                bytes,
                sha256,
            });
        }
        let registered_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Manifest {
            name: name.to_string(),
            path,
            format,
            kind,
            architecture,
            context_length,
            bytes: digests.iter().map(|d| d.bytes).sum(),
            files: digests,
            registered_at,
        })
    }

    /// Hashes every file again; `Changed` names the first that differs.
    pub fn verify(&self) -> Result<(), ManifestError> {
        for f in &self.files {
            let changed = |reason: String| ManifestError::Changed {
                path: f.path.clone(),
                reason,
            };
            let len = std::fs::metadata(&f.path)
                .map_err(|e| changed(format!("cannot read it: {e}")))?
                .len();
            if len != f.bytes {
                return Err(changed(format!("{len} bytes, registered with {}", f.bytes)));
            }
            let (_, sha) = hash_file(&f.path, &mut |_| {}).map_err(|e| changed(e.to_string()))?;
            if sha != f.sha256 {
                return Err(changed(format!(
                    "sha256 {sha}, registered with {}",
                    f.sha256
                )));
            }
        }
        Ok(())
    }
}

/// `model_type` and `max_position_embeddings` from a folder's config.json.
fn folder_config(dir: &Path) -> Result<(String, Option<usize>), ManifestError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ManifestError::Unreadable(format!("{}: {e}", path.display())))?;
    #[derive(Deserialize)]
    struct Config {
        model_type: Option<String>,
        max_position_embeddings: Option<usize>,
    }
    let cfg: Config = serde_json::from_str(&text)
        .map_err(|e| ManifestError::Unreadable(format!("{}: {e}", path.display())))?;
    let arch = cfg.model_type.ok_or_else(|| {
        ManifestError::Unsupported(format!("{} has no `model_type`", path.display()))
    })?;
    Ok((arch, cfg.max_position_embeddings))
}

/// The files a folder model loads from: the known JSON files present and every
/// `*.safetensors`, sorted.
fn folder_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let unreadable =
        |e: std::io::Error| ManifestError::Unreadable(format!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = FOLDER_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.is_file())
        .collect();
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    weights.sort();
    if weights.is_empty() {
        return Err(ManifestError::Unreadable(format!(
            "{} has no *.safetensors file",
            dir.display()
        )));
    }
    files.extend(weights);
    Ok(files)
}

/// Streams `path` through sha256; returns its size and hex digest.
fn hash_file(path: &Path, progress: &mut dyn FnMut(u64)) -> Result<(u64, String), ManifestError> {
    let unreadable =
        |e: std::io::Error| ManifestError::Unreadable(format!("{}: {e}", path.display()));
    let mut file = File::open(path).map_err(unreadable)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(unreadable)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        progress(n as u64);
    }
    Ok((total, hex::encode(hasher.finalize())))
}
