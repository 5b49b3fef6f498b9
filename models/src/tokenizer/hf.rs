//! Hugging Face `tokenizer.json` vocabularies behind [`Tokenizer`](super::Tokenizer).
//!
//! Owns wrapping a `tokenizers::Tokenizer` so that it behaves like the GGUF
//! tokenizers: the text -> ids step is Hugging Face's own (normalizer,
//! pre-tokenizer, model, added tokens), everything else is ours:
//! - added tokens marked `special` are control tokens, split out of the text only with
//!   `parse_special` (HF's `encode_special_tokens` keeps them literal otherwise); the
//!   other added tokens are user-defined and always split out, as HF does;
//! - HF's post-processor is not run: BOS/EOS are added by
//!   [`Tokenizer::encode`](super::Tokenizer::encode) when `add_special` is asked and
//!   `add_bos_token` / `add_eos_token` say so. Those come from `tokenizer_config.json`,
//!   else from what the post-processor would add to an empty input;
//! - each token's bytes are derived from the decoder: byte-level (`Ġ` -> space, GPT-2's
//!   table), metaspace (`▁` -> space, by `Metaspace` or `Replace("▁", " ")`), byte
//!   fallback (`<0xNN>` -> that byte, by `ByteFallback`); added tokens are their literal
//!   text. Decoders whose output is not a concatenation of per-token bytes
//!   (`WordPiece`, `BPEDecoder`, `CTC`, other `Replace`s) are refused. `Strip` and
//!   `Fuse` are ignored, so like the GGUF SentencePiece tokenizers a leading space is
//!   kept.
//!
//! Invariant: encoding a probe text with ASCII, accents, CJK and an emoji succeeds at
//! construction; if HF still fails on some text later, the unknown token (or nothing)
//! stands for it rather than a panic.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::ModelWrapper;

use super::{byte_to_char_table, check_parts, Algorithm, TokenType, Tokenizer};
use crate::error::{catch_panic, ModelError};

/// Text every usable tokenizer must encode at construction.
const PROBE: &str = "Hello, wörld! 2+2=4\n\t你好 🎉 <tag>";

/// What the model folder says about special tokens, beside `tokenizer.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HfSpecialTokens {
    /// `tokenizer_config.json`'s `bos_token` text; wins over `bos_token_id`.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// From `config.json` (or `generation_config.json`).
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `tokenizer_config.json`'s flags; absent means what HF's post-processor does.
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
}

/// The HF-specific state.
pub(super) struct Hf {
    /// Splits out every added token.
    parse: tokenizers::Tokenizer,
    /// The same with special added tokens kept as literal text.
    literal: tokenizers::Tokenizer,
    unknown: Option<u32>,
    pub(super) bytes: TokenBytes,
    pub(super) model: &'static str,
}

/// How a vocabulary entry's text becomes bytes, from the decoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TokenBytes {
    /// Byte-level (GPT-2's byte <-> char table).
    pub(super) byte_level: bool,
    /// The character standing for a space (`▁`).
    pub(super) metaspace: Option<char>,
    /// `<0xNN>` tokens are raw bytes.
    pub(super) byte_fallback: bool,
}

impl TokenBytes {
    /// Reads the decoder's serialized form (`None`: no decoder, tokens are text).
    fn from_decoder(decoder: Option<&serde_json::Value>) -> Result<Self, ModelError> {
        let mut out = Self::default();
        if let Some(decoder) = decoder {
            out.visit(decoder)?;
        }
        Ok(out)
    }

    fn visit(&mut self, decoder: &serde_json::Value) -> Result<(), ModelError> {
        let kind = decoder.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let refuse = |what: String| {
            Err(ModelError::Tokenizer(format!(
                "decoder {what} cannot be reproduced token by token"
            )))
        };
        match kind {
            "Sequence" => {
                let parts = decoder.get("decoders").and_then(|d| d.as_array());
                for part in parts.into_iter().flatten() {
                    self.visit(part)?;
                }
            }
            "ByteLevel" => self.byte_level = true,
            "ByteFallback" => self.byte_fallback = true,
            "Fuse" | "Strip" => {}
            "Metaspace" => {
                let replacement = decoder.get("replacement").and_then(|r| r.as_str());
                match replacement.map(|r| (r.chars().next(), r.chars().count())) {
                    Some((Some(c), 1)) => self.metaspace = Some(c),
                    _ => return refuse(format!("Metaspace with replacement {replacement:?}")),
                }
            }
            "Replace" => {
                let pattern = decoder.pointer("/pattern/String").and_then(|p| p.as_str());
                let content = decoder.get("content").and_then(|c| c.as_str());
                match (pattern, content) {
                    (Some("\u{2581}"), Some(" ")) => self.metaspace = Some('\u{2581}'),
                    _ => return refuse(format!("Replace {pattern:?} -> {content:?}")),
                }
            }
            other => return refuse(format!("`{other}`")),
        }
        Ok(())
    }

    /// The raw bytes of a normal vocabulary entry; `char_to_byte` inverts GPT-2's
    /// table.
    fn normal(&self, text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
        if !self.byte_level {
            return match self.metaspace {
                Some(m) => text.replace(m, " ").into_bytes(),
                None => text.as_bytes().to_vec(),
            };
        }
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match char_to_byte.get(&c) {
                Some(b) => out.push(*b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out
    }
}

/// The inverse of GPT-2's byte -> char table.
fn char_to_byte() -> HashMap<char, u8> {
    byte_to_char_table()
        .iter()
        .enumerate()
        .map(|(b, c)| (*c, b as u8))
        .collect()
}

/// `<0xNN>` -> `NN`.
fn fallback_byte(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

impl Hf {
    /// Appends the ids of `text` (no BOS/EOS).
    pub(super) fn encode(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
        let tokenizer = if parse_special {
            &self.parse
        } else {
            &self.literal
        };
        match tokenizer.encode_fast(text, false) {
            Ok(encoding) => out.extend_from_slice(encoding.get_ids()),
            Err(_) => out.extend(self.unknown),
        }
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json` file; see [`Tokenizer::from_hf`].
    pub fn from_hf_file(path: &Path, specials: HfSpecialTokens) -> Result<Self, ModelError> {
        let hf = catch_panic("reading tokenizer.json", || {
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
        })?;
        catch_panic("building the tokenizer", || Self::from_hf(hf, specials)).map_err(|e| match e {
            ModelError::Tokenizer(reason) => {
                ModelError::Tokenizer(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Wraps a Hugging Face tokenizer (see [`hf`](self)).
    pub fn from_hf(
        mut hf: tokenizers::Tokenizer,
        specials: HfSpecialTokens,
    ) -> Result<Self, ModelError> {
        let tokenizer_error = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
        // tokenizer.json may ask for truncation or padding; prompts are checked
        // against the context by the runtime instead.
        hf.with_truncation(None).map_err(tokenizer_error)?;
        hf.with_padding(None);

        let decoder = hf
            .get_decoder()
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| ModelError::Tokenizer(format!("decoder: {e}")))?;
        let bytes = TokenBytes::from_decoder(decoder.as_ref())?;

        let vocab = hf.get_vocab(true);
        let n = vocab.values().max().map_or(0, |&max| max as usize + 1);
        let mut tokens = vec![String::new(); n];
        let mut present = vec![false; n];
        for (text, &id) in &vocab {
            // Two texts for one id (an added token over a model token): keep one.
            if !present[id as usize] || text < &tokens[id as usize] {
                tokens[id as usize] = text.clone();
            }
            present[id as usize] = true;
        }
        let added = hf.get_added_tokens_decoder();
        let unknown = match hf.get_model() {
            ModelWrapper::BPE(bpe) => bpe.unk_token.as_ref(),
            ModelWrapper::WordPiece(wp) => Some(&wp.unk_token),
            ModelWrapper::WordLevel(wl) => Some(&wl.unk_token),
            ModelWrapper::Unigram(_) => None,
        }
        .and_then(|t| vocab.get(t).copied());
        let model = match hf.get_model() {
            ModelWrapper::BPE(_) => "bpe",
            ModelWrapper::WordPiece(_) => "wordpiece",
            ModelWrapper::WordLevel(_) => "wordlevel",
            ModelWrapper::Unigram(_) => "unigram",
        };

        let char_to_byte = char_to_byte();
        let mut token_types = Vec::with_capacity(n);
        let mut token_bytes = Vec::with_capacity(n);
        for (id, text) in tokens.iter().enumerate() {
            let id32 = id as u32;
            let (ty, raw) = match added.get(&id32) {
                _ if !present[id] => (TokenType::Unused, Vec::new()),
                Some(t) if t.special => (TokenType::Control, text.as_bytes().to_vec()),
                Some(_) => (TokenType::UserDefined, text.as_bytes().to_vec()),
                None if unknown == Some(id32) => (TokenType::Unknown, text.as_bytes().to_vec()),
                None => match fallback_byte(text).filter(|_| bytes.byte_fallback) {
                    Some(b) => (TokenType::Byte, vec![b]),
                    None => (TokenType::Normal, bytes.normal(text, &char_to_byte)),
                },
            };
            token_types.push(ty);
            token_bytes.push(raw);
        }

        let id_of = |text: &Option<String>, id: Option<u32>| {
            text.as_ref().and_then(|t| vocab.get(t).copied()).or(id)
        };
        let bos_token_id = id_of(&specials.bos_token, specials.bos_token_id);
        let eos_token_id = id_of(&specials.eos_token, specials.eos_token_id);
        let token_types = check_parts(&tokens, token_types, [bos_token_id, eos_token_id, unknown])?;

        // What the post-processor adds around an empty input tells the defaults.
        let framed = hf.encode_fast("", true).map_err(tokenizer_error)?;
        let framed = framed.get_ids();
        let adds_bos = bos_token_id.is_some() && framed.first().copied() == bos_token_id;
        let adds_eos = eos_token_id.is_some()
            && framed.last().copied() == eos_token_id
            && (framed.len() > 1 || !adds_bos);

        hf.encode_fast(PROBE, false)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode text: {e}")))?;
        let mut literal = hf.clone();
        literal.set_encode_special_tokens(true);

        let vocab: HashMap<String, u32> = vocab.into_iter().collect();
        Ok(Self {
            tokens,
            token_types,
            token_bytes,
            vocab,
            all_specials: None,
            user_specials: None,
            bos_token_id,
            eos_token_id,
            add_bos_token: specials.add_bos_token.unwrap_or(adds_bos),
            add_eos_token: specials.add_eos_token.unwrap_or(adds_eos),
            add_space_prefix: false,
            algorithm: Algorithm::Hf(Box::new(Hf {
                parse: hf,
                literal,
                unknown,
                bytes,
                model,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_fallback_names() {
        assert_eq!(fallback_byte("<0x0A>"), Some(10));
        assert_eq!(fallback_byte("<0xff>"), Some(255));
        assert_eq!(fallback_byte("<0x0A0>"), None);
        assert_eq!(fallback_byte("<0xZZ>"), None);
        assert_eq!(fallback_byte("0x0A"), None);
    }

    #[test]
    fn decoders_are_read_or_refused() {
        let read = |json: &str| {
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            TokenBytes::from_decoder(Some(&value))
        };
        let llama2 = read(
            r#"{"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}"#,
        )
        .unwrap();
        assert_eq!(llama2.metaspace, Some('\u{2581}'));
        assert!(llama2.byte_fallback && !llama2.byte_level);
        let table = char_to_byte();
        assert_eq!(llama2.normal("▁the▁cat", &table), b" the cat");

        let gpt2 = read(r#"{"type": "ByteLevel", "add_prefix_space": true}"#).unwrap();
        assert_eq!(gpt2.normal("Ġh\u{e9}", &table), [b' ', b'h', 0xE9]);
        assert_eq!(gpt2.normal("ĠÃ", &table), [b' ', 0xC3]);

        for bad in [
            r###"{"type": "WordPiece", "prefix": "##", "cleanup": true}"###,
            r#"{"type": "Replace", "pattern": {"String": "_"}, "content": " "}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert_eq!(
            TokenBytes::from_decoder(None).unwrap(),
            TokenBytes::default()
        );
    }
}
