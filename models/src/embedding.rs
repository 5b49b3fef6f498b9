//! BERT sentence embeddings laid out as a sentence-transformers folder (e.g.
//! all-MiniLM-L6-v2) on the CPU.
//!
//! Owns reading such a folder ([`EmbeddingModel::load`]): `config.json` (BERT),
//! `*.safetensors` (one file or shards), `tokenizer.json`, and the sentence-transformers
//! files that say how token vectors become one sentence vector: `modules.json`
//! (Transformer, then optionally Pooling and Normalize), `<pooling>/config.json` and
//! `sentence_bert_config.json` (`max_seq_length`, `do_lower_case`). A folder without
//! `modules.json` gets what sentence-transformers gives a plain BERT model: mean pooling,
//! no normalization. Invariants:
//! - an input longer than [`EmbeddingInfo::max_tokens`] (counted with `[CLS]`/`[SEP]`)
//!   is refused with [`ModelError::InputTooLong`], never truncated, and the whole call
//!   fails before any forward pass runs;
//! - a text's vector does not depend on the other texts of the call: batches are padded
//!   and masked, and pooling reads only a text's own tokens;
//! - vectors come back in input order, each with [`EmbeddingInfo::dimensions`] values,
//!   of unit length when the folder lists a Normalize module;
//! - modules we cannot reproduce (Dense layers, several pooling modes at once, ...) are
//!   refused at load, never skipped;
//! - loading and forward passes run under `catch_unwind`, so a bad file is an error,
//!   never a crashed process. The model is `Send + Sync`; [`EmbeddingModel::embed`]
//!   takes `&self` and holds no state between calls.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;

use crate::error::{catch_panic, ModelError};
use crate::folder::read_json;
use crate::gguf::{detect_format, ModelFormat};

/// Texts run through the model together; sentence-transformers' default batch size.
const BATCH_SIZE: usize = 32;

/// sentence-transformers' `Normalize`: `x / max(||x||, 1e-12)`.
const NORM_EPSILON: f32 = 1e-12;

/// How the token vectors of a text become its sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The vector of the first token (`[CLS]`).
    Cls,
    /// The mean over the text's tokens, special tokens included.
    Mean,
    /// The element-wise maximum over the text's tokens.
    Max,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cls => "cls",
            Self::Mean => "mean",
            Self::Max => "max",
        }
    }
}

/// What a runtime needs to know about an embedding model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingInfo {
    /// `model_type` from config.json, e.g. `bert`.
    pub architecture: String,
    /// Length of every vector (`hidden_size`).
    pub dimensions: usize,
    /// The most tokens one input may have, `[CLS]` and `[SEP]` included.
    pub max_tokens: usize,
    pub pooling: Pooling,
    /// Whether vectors are scaled to unit length.
    pub normalize: bool,
}

/// The result of [`EmbeddingModel::embed`].
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens over all inputs, special tokens included: what the model processed.
    pub prompt_tokens: usize,
}

/// A loaded BERT sentence-embedding model.
pub struct EmbeddingModel {
    bert: BertModel,
    tokenizer: tokenizers::Tokenizer,
    info: EmbeddingInfo,
    lowercase: bool,
    pad_id: u32,
    device: Device,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("info", &self.info)
            .field("lowercase", &self.lowercase)
            .finish_non_exhaustive()
    }
}

/// Whether `path` is a model folder holding a BERT encoder (config.json's `model_type`
/// is `bert`, or an `architectures` entry starts with `Bert`), i.e. one that
/// [`EmbeddingModel::load`] is meant for rather than a text-generation model.
pub fn is_embedding_dir(path: &Path) -> bool {
    matches!(detect_format(path), Ok(ModelFormat::SafetensorsDir(_)))
        && read_json::<ModelTypeProbe>(&path.join("config.json")).is_ok_and(|c| c.is_bert())
}

impl EmbeddingModel {
    /// Loads the sentence-transformers folder at `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_on(dir, crate::ComputeDevice::Cpu)
    }

    /// Loads the folder at `dir` onto `device`.
    pub fn load_on(dir: &Path, device: crate::ComputeDevice) -> Result<Self, ModelError> {
        let ModelFormat::SafetensorsDir(dir) = detect_format(dir)? else {
            return Err(ModelError::UnrecognizedFormat {
                path: dir.to_path_buf(),
                reason: "an embedding model is a folder with config.json, tokenizer.json \
                         and *.safetensors"
                    .to_string(),
            });
        };

        let config_path = dir.join("config.json");
        let probe: ModelTypeProbe = read_json(&config_path)?;
        if !probe.is_bert() {
            return Err(ModelError::InvalidFile {
                path: config_path,
                reason: format!(
                    "model_type {:?} / architectures {:?} is not BERT (supported: bert)",
                    probe.model_type, probe.architectures
                ),
            });
        }
        let config: BertConfig = read_json(&config_path)?;
        if config.hidden_size == 0 || config.max_position_embeddings == 0 {
            return Err(ModelError::InvalidFile {
                path: config_path,
                reason: "hidden_size and max_position_embeddings must be positive".to_string(),
            });
        }

        let st = SentenceTransformerConfig::read(&dir, config.hidden_size)?;
        let max_tokens = st
            .max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .clamp(1, config.max_position_embeddings);

        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), config.vocab_size)?;
        let pad_id = u32::try_from(config.pad_token_id).map_err(|_| ModelError::InvalidFile {
            path: config_path,
            reason: format!("pad_token_id {} is out of range", config.pad_token_id),
        })?;

        let device = device.candle()?;
        let bert = load_weights(&dir, &config, &device)?;
        let info = EmbeddingInfo {
            architecture: probe.model_type.unwrap_or_else(|| "bert".to_string()),
            dimensions: config.hidden_size,
            max_tokens,
            pooling: st.pooling,
            normalize: st.normalize,
        };
        Ok(Self {
            bert,
            tokenizer,
            info,
            lowercase: st.lowercase,
            pad_id,
            device,
        })
    }

    pub fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    /// Tokens the model sees for `text`, `[CLS]` and `[SEP]` included. A text the
    /// tokenizer cannot encode counts as `usize::MAX` (and [`embed`](Self::embed)
    /// reports the error).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.encode(text).map_or(usize::MAX, |ids| ids.len())
    }

    /// Embeds `texts`, refusing the whole call when any of them is longer than
    /// [`EmbeddingInfo::max_tokens`].
    pub fn embed(&self, texts: &[&str]) -> Result<Embedded, ModelError> {
        let mut encoded = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            let ids = self.encode(text)?;
            if ids.len() > self.info.max_tokens {
                return Err(ModelError::InputTooLong {
                    index,
                    tokens: ids.len(),
                    max: self.info.max_tokens,
                });
            }
            encoded.push(ids);
        }
        let prompt_tokens = encoded.iter().map(Vec::len).sum();

        let mut vectors = vec![Vec::new(); encoded.len()];
        for batch in plan_batches(&encoded.iter().map(Vec::len).collect::<Vec<_>>()) {
            let rows: Vec<&[u32]> = batch.iter().map(|&i| encoded[i].as_slice()).collect();
            for (&i, vector) in batch.iter().zip(self.embed_batch(&rows)?) {
                vectors[i] = vector;
            }
        }
        Ok(Embedded {
            vectors,
            prompt_tokens,
        })
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let lowered;
        let text = if self.lowercase {
            lowered = text.to_lowercase();
            &lowered
        } else {
            text
        };
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Runs one padded batch and pools each row over its own tokens.
    fn embed_batch(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let seq = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        if seq == 0 {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(batch.len() * seq);
        let mut mask = Vec::with_capacity(batch.len() * seq);
        for row in batch {
            ids.extend_from_slice(row);
            ids.resize(ids.len() + seq - row.len(), self.pad_id);
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.resize(mask.len() + seq - row.len(), 0);
        }
        let shape = (batch.len(), seq);
        let hidden = catch_panic("running a BERT forward pass", || {
            let run = || -> candle_core::Result<Vec<f32>> {
                let ids = Tensor::from_vec(ids, shape, &self.device)?;
                let mask = Tensor::from_vec(mask, shape, &self.device)?;
                let types = ids.zeros_like()?;
                self.bert
                    .forward(&ids, &types, Some(&mask))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()
            };
            run().map_err(|e| ModelError::Forward(e.to_string()))
        })?;

        let dim = self.info.dimensions;
        if hidden.len() != batch.len() * seq * dim {
            return Err(ModelError::Forward(format!(
                "expected {} hidden values for a {}x{seq} batch of width {dim}, got {}",
                batch.len() * seq * dim,
                batch.len(),
                hidden.len()
            )));
        }
        Ok(batch
            .iter()
            .zip(hidden.chunks_exact(seq * dim))
            .map(|(row, states)| {
                let mut vector = pool(&states[..row.len() * dim], dim, self.info.pooling);
                if self.info.normalize {
                    normalize(&mut vector);
                }
                vector
            })
            .collect())
    }
}

/// Groups inputs (by index) into batches, given their token counts: longest first, at
/// most [`BATCH_SIZE`] a batch, and a text joins a batch only if it has at least half
/// the tokens of the batch's longest, so padding never more than doubles a text's cost
/// (a 10-token text padded to 200 would cost twenty times its own forward pass).
fn plan_batches(lens: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match batches.last_mut() {
            Some(batch) if batch.len() < BATCH_SIZE && lens[i] * 2 >= lens[batch[0]] => {
                batch.push(i)
            }
            _ => batches.push(vec![i]),
        }
    }
    batches
}

/// Pools `states`, the row-major `[tokens, dim]` vectors of one text's tokens (padding
/// already cut off), into one vector of `dim` values. No tokens pool to zeros.
fn pool(states: &[f32], dim: usize, pooling: Pooling) -> Vec<f32> {
    if dim == 0 || states.len() < dim {
        return vec![0.0; dim];
    }
    let mut rows = states.chunks_exact(dim);
    match pooling {
        Pooling::Cls => rows.next().map(<[f32]>::to_vec).unwrap_or_default(),
        Pooling::Mean => {
            let mut sum = vec![0.0f32; dim];
            let mut count = 0usize;
            for row in rows {
                sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                count += 1;
            }
            let count = count as f32;
            sum.iter_mut().for_each(|s| *s /= count);
            sum
        }
        Pooling::Max => {
            let mut max = vec![f32::NEG_INFINITY; dim];
            for row in rows {
                max.iter_mut().zip(row).for_each(|(m, x)| *m = m.max(*x));
            }
            max
        }
    }
}

/// Scales `v` to unit length as sentence-transformers' `Normalize` does.
fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(NORM_EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Just enough of config.json to tell a BERT encoder apart.
#[derive(Debug, Deserialize)]
struct ModelTypeProbe {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
}

impl ModelTypeProbe {
    fn is_bert(&self) -> bool {
        self.model_type.as_deref() == Some("bert")
            || (self.model_type.is_none()
                && self.architectures.iter().any(|a| a.starts_with("Bert")))
    }
}

/// What the sentence-transformers files say, defaults resolved.
#[derive(Debug, PartialEq)]
struct SentenceTransformerConfig {
    pooling: Pooling,
    normalize: bool,
    max_seq_length: Option<usize>,
    lowercase: bool,
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

impl SentenceTransformerConfig {
    fn read(dir: &Path, hidden_size: usize) -> Result<Self, ModelError> {
        let sbert_path = dir.join("sentence_bert_config.json");
        let sbert: SentenceBertConfig = if sbert_path.is_file() {
            read_json(&sbert_path)?
        } else {
            SentenceBertConfig::default()
        };
        let mut config = Self {
            pooling: Pooling::Mean,
            normalize: false,
            max_seq_length: sbert.max_seq_length,
            lowercase: sbert.do_lower_case,
        };

        let modules_path = dir.join("modules.json");
        if !modules_path.is_file() {
            return Ok(config);
        }
        let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
        let unsupported = |reason: String| ModelError::InvalidFile {
            path: modules_path.clone(),
            reason,
        };
        for (i, module) in modules.iter().enumerate() {
            let name = module.kind.rsplit('.').next().unwrap_or_default();
            match (i, name) {
                (0, "Transformer") if module.path.is_empty() => {}
                (0, "Transformer") => {
                    return Err(unsupported(format!(
                        "the Transformer module lives in {:?}; only one at the folder's root \
                         is supported",
                        module.path
                    )))
                }
                (0, _) => {
                    return Err(unsupported(format!(
                        "the first module is {}, expected a Transformer",
                        module.kind
                    )))
                }
                (_, "Pooling") => {
                    let path = dir.join(&module.path).join("config.json");
                    config.pooling = read_pooling(&path, hidden_size)?;
                }
                (_, "Normalize") => config.normalize = true,
                _ => {
                    return Err(unsupported(format!(
                        "module {} is not supported (supported: Transformer, Pooling, \
                         Normalize)",
                        module.kind
                    )))
                }
            }
        }
        if modules.is_empty() {
            return Err(unsupported("lists no modules".to_string()));
        }
        Ok(config)
    }
}

/// Reads a sentence-transformers Pooling config: either the `pooling_mode` string of
/// recent versions or the `pooling_mode_*` flags of older ones. Exactly one mode.
fn read_pooling(path: &Path, hidden_size: usize) -> Result<Pooling, ModelError> {
    let value: serde_json::Map<String, serde_json::Value> = read_json(path)?;
    let invalid = |reason: String| ModelError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    };
    let dimension = value
        .get("word_embedding_dimension")
        .or_else(|| value.get("embedding_dimension"))
        .and_then(serde_json::Value::as_u64);
    if let Some(dimension) = dimension {
        if usize::try_from(dimension).ok() != Some(hidden_size) {
            return Err(invalid(format!(
                "pools vectors of {dimension} values but the model's hidden_size is \
                 {hidden_size}"
            )));
        }
    }
    let mut modes: Vec<String> = value
        .iter()
        .filter(|(_, v)| v.as_bool() == Some(true))
        .filter_map(|(k, _)| k.strip_prefix("pooling_mode_").map(str::to_string))
        .collect();
    if let Some(mode) = value
        .get("pooling_mode")
        .and_then(serde_json::Value::as_str)
    {
        modes.push(mode.to_string());
    }
    modes.sort();
    modes.dedup();
    match modes.as_slice() {
        [mode] => match mode.as_str() {
            "cls" | "cls_token" => Ok(Pooling::Cls),
            "mean" | "mean_tokens" => Ok(Pooling::Mean),
            "max" | "max_tokens" => Ok(Pooling::Max),
            other => Err(invalid(format!(
                "pooling mode {other:?} is not supported (supported: cls, mean, max)"
            ))),
        },
        [] => Err(invalid("no pooling mode is set".to_string())),
        several => Err(invalid(format!(
            "several pooling modes {several:?} are set; only one is supported"
        ))),
    }
}

fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer, ModelError> {
    let tokenizer_error =
        |reason: String| ModelError::Tokenizer(format!("{}: {reason}", path.display()));
    let mut tokenizer = catch_panic("reading tokenizer.json", || {
        tokenizers::Tokenizer::from_file(path).map_err(|e| tokenizer_error(e.to_string()))
    })?;
    // tokenizer.json often asks for truncation and fixed padding (all-MiniLM-L6-v2's:
    // 128 tokens). We refuse long inputs and pad batches ourselves instead.
    tokenizer
        .with_truncation(None)
        .map_err(|e| tokenizer_error(e.to_string()))?;
    tokenizer.with_padding(None);
    let size = tokenizer.get_vocab_size(true);
    if size > vocab_size {
        return Err(tokenizer_error(format!(
            "its vocabulary has {size} tokens but the model embeds only {vocab_size}"
        )));
    }
    Ok(tokenizer)
}

/// Loads every `*.safetensors` in `dir` (one file or shards) into a BERT model.
///
/// Files are read into memory rather than memory-mapped: candle's mmap loader is
/// `unsafe` (a file changed underneath it is undefined behaviour) and the workspace
/// forbids unsafe code. Encoder-sized weights make the copy cheap.
fn load_weights(dir: &Path, config: &BertConfig, device: &Device) -> Result<BertModel, ModelError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let path = entry.map_err(|e| ModelError::io(dir, e))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    let mut tensors = HashMap::new();
    for path in &files {
        let invalid = |e: candle_core::Error| ModelError::InvalidFile {
            path: path.clone(),
            reason: e.to_string(),
        };
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let shard = catch_panic("reading safetensors", || {
            candle_core::safetensors::load_buffer(&bytes, device).map_err(invalid)
        })?;
        tensors.extend(shard);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    catch_panic("loading BERT weights", || {
        BertModel::load(vb, config).map_err(|e| ModelError::InvalidFile {
            path: weights_label(dir, &files),
            reason: e.to_string(),
        })
    })
}

fn weights_label(dir: &Path, files: &[PathBuf]) -> PathBuf {
    match files {
        [one] => one.clone(),
        _ => dir.join("*.safetensors"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [f32; 6] = [1.0, -2.0, 3.0, 4.0, 5.0, -6.0]; // two tokens of width 3

    #[test]
    fn pooling_modes() {
        assert_eq!(pool(&STATES, 3, Pooling::Cls), vec![1.0, -2.0, 3.0]);
        assert_eq!(pool(&STATES, 3, Pooling::Mean), vec![2.5, 1.5, -1.5]);
        assert_eq!(pool(&STATES, 3, Pooling::Max), vec![4.0, 5.0, 3.0]);
        for pooling in [Pooling::Cls, Pooling::Mean, Pooling::Max] {
            assert_eq!(pool(&[], 3, pooling), vec![0.0; 3], "{pooling:?}");
        }
    }

    #[test]
    fn batches_group_similar_lengths() {
        assert!(plan_batches(&[]).is_empty());
        assert_eq!(
            plan_batches(&[12, 194, 9, 120, 2, 100]),
            vec![vec![1, 3, 5], vec![0, 2], vec![4]]
        );
        let batches = plan_batches(&[7; 70]);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![BATCH_SIZE, BATCH_SIZE, 70 - 2 * BATCH_SIZE]
        );
    }

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0; 4];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0; 4]);
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        dir
    }

    const MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    #[test]
    fn reads_sentence_transformers_files() {
        let dir = folder(&[
            ("modules.json", MODULES),
            (
                "1_Pooling/config.json",
                r#"{"word_embedding_dimension": 4, "pooling_mode_cls_token": false,
                    "pooling_mode_mean_tokens": false, "pooling_mode_max_tokens": true}"#,
            ),
            (
                "sentence_bert_config.json",
                r#"{"max_seq_length": 128, "do_lower_case": true}"#,
            ),
        ]);
        let config = SentenceTransformerConfig::read(dir.path(), 4).unwrap();
        assert_eq!(
            config,
            SentenceTransformerConfig {
                pooling: Pooling::Max,
                normalize: true,
                max_seq_length: Some(128),
                lowercase: true,
            }
        );
    }

    #[test]
    fn plain_bert_folder_gets_mean_pooling_without_normalization() {
        let dir = folder(&[]);
        let config = SentenceTransformerConfig::read(dir.path(), 4).unwrap();
        assert_eq!(config.pooling, Pooling::Mean);
        assert!(!config.normalize);
        assert_eq!(config.max_seq_length, None);
    }

    #[test]
    fn pooling_mode_string_of_recent_versions() {
        let dir = folder(&[(
            "p/config.json",
            r#"{"embedding_dimension": 4, "pooling_mode": "cls", "include_prompt": true}"#,
        )]);
        let path = dir.path().join("p/config.json");
        assert_eq!(read_pooling(&path, 4).unwrap(), Pooling::Cls);
    }

    #[test]
    fn refuses_what_it_cannot_reproduce() {
        let cases = [
            (
                r#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#,
                "several",
            ),
            (
                r#"{"pooling_mode_weightedmean_tokens": true}"#,
                "not supported",
            ),
            (r#"{"pooling_mode_mean_tokens": false}"#, "no pooling mode"),
            (
                r#"{"word_embedding_dimension": 8, "pooling_mode_mean_tokens": true}"#,
                "hidden_size",
            ),
        ];
        for (body, expected) in cases {
            let dir = folder(&[("config.json", body)]);
            let err = read_pooling(&dir.path().join("config.json"), 4).unwrap_err();
            assert!(err.to_string().contains(expected), "{body}: {err}");
        }

        let dense = MODULES.replace("models.Normalize", "models.Dense");
        let dir = folder(&[
            ("modules.json", &dense),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_mean_tokens": true}"#,
            ),
        ]);
        let err = SentenceTransformerConfig::read(dir.path(), 4).unwrap_err();
        assert!(err.to_string().contains("Dense is not supported"), "{err}");
    }

    #[test]
    fn bert_probe() {
        let probe = |body: &str| {
            serde_json::from_str::<ModelTypeProbe>(body)
                .unwrap()
                .is_bert()
        };
        assert!(probe(
            r#"{"model_type": "bert", "architectures": ["BertModel"]}"#
        ));
        assert!(probe(r#"{"architectures": ["BertModel"]}"#));
        assert!(!probe(
            r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#
        ));
        assert!(!probe(
            r#"{"model_type": "roberta", "architectures": ["BertModel"]}"#
        ));
    }
}
