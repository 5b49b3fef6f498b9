//! Hugging Face model folders: the JSON files beside the weights, and the weights.
//!
//! Owns reading what a folder says about its tokenizer (`tokenizer_config.json`:
//! `bos_token`, `eos_token`, `add_bos_token`, `add_eos_token`, `chat_template`) and
//! loading its safetensors weights ([`read_weights`]). Invariants:
//! - weights are read into memory, never memory-mapped (candle's mmap loader is
//!   `unsafe` and the workspace forbids unsafe code), one file at a time, each tensor
//!   converted to the asked dtype before the next file is read, so the peak is one
//!   file's bytes plus the converted weights;
//! - with `model.safetensors.index.json`, exactly the files it names are read and every
//!   tensor it lists must be found in its file; without it, every `*.safetensors`;
//! - a malformed or truncated file is a [`ModelError`], never a panic.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{catch_panic, ModelError};

/// The index of a sharded checkpoint.
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::InvalidFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// What `tokenizer_config.json` says, as far as serving needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenizerConfigFile {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    /// The template itself, or the one named `default` when the file lists several.
    pub chat_template: Option<String>,
}

/// A special token is written either as its text or as a serialized `AddedToken`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added { content: String },
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct RawTokenizerConfig {
    bos_token: Option<TokenField>,
    eos_token: Option<TokenField>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    chat_template: Option<TemplateField>,
}

impl TokenizerConfigFile {
    /// Reads `dir/tokenizer_config.json`; a folder without one gets the defaults.
    pub(crate) fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let raw: RawTokenizerConfig = read_json(&path)?;
        let text = |t: Option<TokenField>| {
            t.map(|t| match t {
                TokenField::Text(s) | TokenField::Added { content: s } => s,
            })
        };
        let chat_template = match raw.chat_template {
            None => None,
            Some(TemplateField::One(s)) => Some(s),
            Some(TemplateField::Named(list)) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template),
        };
        Ok(Self {
            bos_token: text(raw.bos_token),
            eos_token: text(raw.eos_token),
            add_bos_token: raw.add_bos_token,
            add_eos_token: raw.add_eos_token,
            chat_template,
        })
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// Reads the folder's weights (see the module invariants), each tensor converted to
/// `dtype` on `device`. Returns the tensors by name and the files they came from.
pub(crate) fn read_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, Vec<PathBuf>), ModelError> {
    let index_path = dir.join(INDEX_FILE);
    let index = if index_path.is_file() {
        Some(read_json::<Index>(&index_path)?)
    } else {
        None
    };
    let files: Vec<PathBuf> = match &index {
        Some(index) => {
            let names: BTreeSet<&String> = index.weight_map.values().collect();
            let mut files = Vec::with_capacity(names.len());
            for name in names {
                // A shard name is a file in this folder, nothing else.
                if name.contains(['/', '\\']) || name.starts_with('.') {
                    return Err(ModelError::InvalidFile {
                        path: index_path,
                        reason: format!("shard {name:?} is not a file name"),
                    });
                }
                files.push(dir.join(name));
            }
            files
        }
        None => {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
                let path = entry.map_err(|e| ModelError::io(dir, e))?.path();
                if path.extension().is_some_and(|x| x == "safetensors") {
                    files.push(path);
                }
            }
            files.sort();
            files
        }
    };
    if files.is_empty() {
        return Err(ModelError::InvalidFile {
            path: dir.to_path_buf(),
            reason: "no safetensors weights".to_string(),
        });
    }

    let mut tensors = HashMap::new();
    for path in &files {
        let invalid = |reason: String| ModelError::InvalidFile {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let shard = catch_panic("reading safetensors", || {
            candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| invalid(e.to_string()))
        })?;
        drop(bytes);
        for (name, tensor) in shard {
            let tensor = match tensor.dtype() {
                DType::F32 | DType::F16 | DType::BF16 => tensor
                    .to_dtype(dtype)
                    .map_err(|e| invalid(format!("{name}: {e}")))?,
                other => {
                    return Err(invalid(format!(
                        "{name} has dtype {other:?}; expected floats"
                    )))
                }
            };
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(invalid(format!("tensor {name} appears in two files")));
            }
        }
    }
    if let Some(index) = index {
        for (name, file) in &index.weight_map {
            if !tensors.contains_key(name) {
                return Err(ModelError::InvalidFile {
                    path: dir.join(file),
                    reason: format!("{INDEX_FILE} lists tensor {name} but the file lacks it"),
                });
            }
        }
    }
    Ok((tensors, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(body: &str) -> TokenizerConfigFile {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), body).unwrap();
        TokenizerConfigFile::read(dir.path()).unwrap()
    }

    #[test]
    fn tokenizer_config_forms() {
        let c = config(
            r#"{"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>",
                "lstrip": false}, "add_bos_token": true, "chat_template": "{{ x }}"}"#,
        );
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.add_bos_token, Some(true));
        assert_eq!(c.add_eos_token, None);
        assert_eq!(c.chat_template.as_deref(), Some("{{ x }}"));

        let c = config(
            r#"{"bos_token": null, "chat_template": [{"name": "tool_use", "template": "t"},
                {"name": "default", "template": "d"}]}"#,
        );
        assert_eq!(c.bos_token, None);
        assert_eq!(c.chat_template.as_deref(), Some("d"));

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            TokenizerConfigFile::read(dir.path()).unwrap(),
            TokenizerConfigFile::default()
        );
    }
}
