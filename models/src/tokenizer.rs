//! Tokenizers rebuilt from GGUF metadata or read from `tokenizer.json`, and
//! incremental decoding.
//!
//! Owns text <-> token ids for byte-level BPE (`tokenizer.ggml.model = "gpt2"`) and
//! SentencePiece (`llama`, in [`spm`]) vocabularies, matching llama.cpp rather than
//! candle's `TokenizerFromGguf` (which differs on SmolLM2 and knows no SentencePiece),
//! and for Hugging Face `tokenizer.json` files of safetensors folders ([`hf`]: Hugging
//! Face's own encoding under the same options, ids and token bytes as below). GGUF
//! vocabularies are encoded in three steps:
//!
//! 1. Special tokens are split out of the text first (leftmost-longest match): control
//!    tokens (`<|im_start|>`, ...) only when `parse_special` is set, user-defined tokens
//!    always (for SentencePiece, the unknown token is matched with the control ones,
//!    as llama.cpp does). Each one becomes its own id; the text between them is
//!    encoded alone.
//! 2. BPE: each text fragment is pre-tokenized by the regex llama.cpp picks from
//!    `tokenizer.ggml.pre` ([`PreTokenizer`]: `gpt2`, `smollm`, `qwen2`), then every
//!    piece is mapped to GPT-2's byte-to-unicode alphabet and merged by BPE: the
//!    adjacent pair with the lowest merge rank first, leftmost on ties.
//!    SentencePiece: spaces become `▁` and the fragment is merged by score ([`spm`]),
//!    unknown characters falling back to bytes.
//! 3. A BOS id is prepended (and for SentencePiece an EOS id appended) only when
//!    `add_special` is asked for *and* the model says `add_bos_token`
//!    (`add_eos_token`); a space is prepended to each text fragment that starts the
//!    input or follows a special token only when `add_space_prefix`.
//!
//! Invariants: every byte value has an initial symbol (its byte-level character or
//! byte token in the vocabulary, else the unknown token), so encoding never fails and
//! never drops input; for normal tokens `decode(encode(x)) == x` byte for byte (plus
//! the prefix space when `add_space_prefix`). Decoding a control token yields its
//! literal text unless `skip_special`. [`StreamDecoder`] never emits a partial UTF-8
//! sequence: it holds back an incomplete tail until the next token.

pub mod hf;
pub mod spm;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};
use candle_core::quantized::gguf_file::{Content, Value};
use fancy_regex::Regex;

use crate::error::ModelError;
use crate::gguf::{self, ModelInfo};
pub use hf::HfSpecialTokens;
pub use spm::SpmConfig;

/// GPT-2's pre-tokenizer pattern (HF `ByteLevel(use_regex=true)`).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenizer pattern, as llama.cpp writes it for
/// `LLAMA_VOCAB_PRE_TYPE_QWEN2` (the tokenizer.json original has `(?i:...)` around
/// the contractions): llama 3's pattern with every digit a piece of its own, a letter
/// run taking at most one non-letter, non-digit, non-newline character before it, and
/// newlines kept with the whitespace or punctuation before them.
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The type llama.cpp gives each vocabulary entry (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Maps llama.cpp's numbering; anything unrecognised is treated as normal text.
    pub fn from_gguf(code: i64) -> Self {
        match code {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// How text is cut into pieces before BPE, by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex (`gpt2`, `default` or no `tokenizer.ggml.pre`).
    Gpt2,
    /// Every numeric character on its own, then GPT-2's regex (`smollm`).
    SmolLm,
    /// Qwen2's regex (`qwen2`: Qwen 2, 2.5 and 3 vocabularies; `deepseek-r1-qwen`, the
    /// same vocabulary in DeepSeek's Qwen distillations, as llama.cpp maps it).
    Qwen2,
}

impl PreTokenizer {
    /// Picks the pre-tokenizer for a `tokenizer.ggml.pre` value; unknown values are an
    /// error rather than a silent, wrong tokenization.
    pub fn from_gguf(pre: Option<&str>) -> Result<Self, ModelError> {
        match pre {
            None | Some("default" | "gpt2" | "gpt-2") => Ok(Self::Gpt2),
            Some("smollm") => Ok(Self::SmolLm),
            Some("qwen2" | "deepseek-r1-qwen") => Ok(Self::Qwen2),
            Some(other) => Err(ModelError::Tokenizer(format!(
                "unsupported pre-tokenizer `{other}` (supported: gpt2, smollm, qwen2)"
            ))),
        }
    }

    /// The regex that cuts text (for `SmolLm`, the text between digits).
    fn pattern(self) -> &'static str {
        match self {
            Self::Gpt2 | Self::SmolLm => GPT2_PATTERN,
            Self::Qwen2 => QWEN2_PATTERN,
        }
    }
}

/// Everything needed to build a [`Tokenizer`] without a GGUF file.
#[derive(Debug, Clone)]
pub struct TokenizerConfig {
    /// Vocabulary entries in byte-level form (`Ġthe`), indexed by id.
    pub tokens: Vec<String>,
    /// One type per token; empty means all normal.
    pub token_types: Vec<TokenType>,
    /// Merges in rank order, each `"left right"`.
    pub merges: Vec<String>,
    pub pre: PreTokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub add_space_prefix: bool,
}

/// Options for [`Tokenizer::encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Add BOS when the model asks for it (`add_bos_token`).
    pub add_special: bool,
    /// Recognise control tokens (`<|im_start|>`) written in the text.
    pub parse_special: bool,
}

impl EncodeOptions {
    /// For a rendered chat prompt: markers are parsed, BOS added if the model wants it.
    pub const PROMPT: Self = Self {
        add_special: true,
        parse_special: true,
    };
    /// For untrusted text that must stay text: no BOS, markers encoded literally.
    pub const PLAIN: Self = Self {
        add_special: false,
        parse_special: false,
    };
}

/// A BPE or SentencePiece tokenizer. Cheap to share behind `&`; encoding allocates
/// per call.
pub struct Tokenizer {
    tokens: Vec<String>,
    token_types: Vec<TokenType>,
    /// Raw bytes each token decodes to (byte-level decoded for normal tokens).
    token_bytes: Vec<Vec<u8>>,
    vocab: HashMap<String, u32>,
    /// Tokens matched in the text with `parse_special` (control and user-defined, plus
    /// unknown for SentencePiece), and user-defined only.
    all_specials: Option<(AhoCorasick, Vec<u32>)>,
    user_specials: Option<(AhoCorasick, Vec<u32>)>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    add_bos_token: bool,
    add_eos_token: bool,
    add_space_prefix: bool,
    algorithm: Algorithm,
}

/// How a special-free text fragment becomes ids.
/// Boxed: each holds 256-entry byte tables (or a whole HF tokenizer).
enum Algorithm {
    Bpe(Box<Bpe>),
    Spm(Box<spm::Spm>),
    /// Hugging Face `tokenizer.json`: it also splits out the added tokens itself.
    Hf(Box<hf::Hf>),
}

/// Byte-level BPE state.
struct Bpe {
    /// (left, right) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Initial symbol for each byte value.
    byte_ids: [u32; 256],
    /// Byte value -> its GPT-2 unicode stand-in.
    byte_chars: [char; 256],
    pre: PreTokenizer,
    regex: Regex,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Tokenizer");
        d.field("vocab_size", &self.tokens.len());
        match &self.algorithm {
            Algorithm::Bpe(bpe) => d
                .field("model", &"bpe")
                .field("merges", &bpe.merges.len())
                .field("pre", &bpe.pre),
            Algorithm::Spm(_) => d.field("model", &"sentencepiece"),
            Algorithm::Hf(hf) => d
                .field("model", &format_args!("tokenizer.json {}", hf.model))
                .field("token_bytes", &hf.bytes),
        };
        d.field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("add_bos_token", &self.add_bos_token)
            .field("add_eos_token", &self.add_eos_token)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish()
    }
}

/// GPT-2's reversible byte -> printable unicode map.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            let c = next;
            next += 1;
            c
        };
        // Codes stay below 0x200, all valid scalar values.
        table[usize::from(b)] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

impl Tokenizer {
    /// Rebuilds the tokenizer from a GGUF header.
    pub fn from_gguf(content: &Content, info: &ModelInfo) -> Result<Self, ModelError> {
        let spm = match info.tokenizer_model.as_str() {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2 byte-level \
                     BPE, llama SentencePiece)"
                )))
            }
        };
        let md = &content.metadata;
        let array = |key: &str| -> Result<&Vec<Value>, ModelError> {
            md.get(key)
                .ok_or_else(|| ModelError::Metadata {
                    key: key.to_string(),
                    reason: "missing".to_string(),
                })?
                .to_vec()
                .map_err(|e| ModelError::Metadata {
                    key: key.to_string(),
                    reason: e.to_string(),
                })
        };
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            array(key)?
                .iter()
                .map(|v| {
                    v.to_string().cloned().map_err(|e| ModelError::Metadata {
                        key: key.to_string(),
                        reason: e.to_string(),
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let token_types = match md.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| {
                    let code = match v {
                        Value::I32(x) => i64::from(*x),
                        Value::U32(x) => i64::from(*x),
                        Value::I8(x) => i64::from(*x),
                        Value::U8(x) => i64::from(*x),
                        _ => 1,
                    };
                    TokenType::from_gguf(code)
                })
                .collect(),
        };
        if spm {
            let scores = match md.get("tokenizer.ggml.scores") {
                None => Vec::new(),
                Some(_) => array("tokenizer.ggml.scores")?
                    .iter()
                    .map(|v| {
                        v.to_f32().map_err(|e| ModelError::Metadata {
                            key: "tokenizer.ggml.scores".to_string(),
                            reason: e.to_string(),
                        })
                    })
                    .collect::<Result<_, _>>()?,
            };
            // llama.cpp's defaults for SentencePiece when the file is silent.
            return Self::sentencepiece(SpmConfig {
                tokens,
                scores,
                token_types,
                bos_token_id: info.bos_token_id.or(Some(1)),
                eos_token_id: info.eos_token_id.or(Some(2)),
                unknown_token_id: info.unknown_token_id.or(Some(0)),
                add_bos_token: info.add_bos_token.unwrap_or(true),
                add_eos_token: gguf::get_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false),
                add_space_prefix: info.add_space_prefix.unwrap_or(true),
            });
        }
        let merges = strings("tokenizer.ggml.merges")?;
        Self::new(TokenizerConfig {
            tokens,
            token_types,
            merges,
            pre: PreTokenizer::from_gguf(info.tokenizer_pre.as_deref())?,
            bos_token_id: info.bos_token_id,
            eos_token_id: info.eos_token_id,
            unknown_token_id: info.unknown_token_id,
            add_bos_token: info.add_bos_token.unwrap_or(false),
            add_space_prefix: info.add_space_prefix.unwrap_or(false),
        })
    }

    /// Builds a byte-level BPE tokenizer from its parts, checking that they are
    /// consistent.
    pub fn new(config: TokenizerConfig) -> Result<Self, ModelError> {
        let TokenizerConfig {
            tokens,
            token_types,
            merges: merge_list,
            pre,
            bos_token_id,
            eos_token_id,
            unknown_token_id,
            add_bos_token,
            add_space_prefix,
        } = config;
        let token_types = check_parts(
            &tokens,
            token_types,
            [bos_token_id, eos_token_id, unknown_token_id],
        )?;
        let n = tokens.len();

        let byte_chars = byte_to_char_table();
        let char_to_byte: HashMap<char, u8> = byte_chars
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();

        let mut vocab = HashMap::with_capacity(n);
        let mut token_bytes = Vec::with_capacity(n);
        for (id, (text, ty)) in tokens.iter().zip(&token_types).enumerate() {
            vocab.entry(text.clone()).or_insert(id as u32);
            let bytes = match ty {
                TokenType::Normal | TokenType::Byte => {
                    let mut out = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match char_to_byte.get(&c) {
                            Some(b) => out.push(*b),
                            None => {
                                let mut buf = [0u8; 4];
                                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                    out
                }
                _ => text.as_bytes().to_vec(),
            };
            token_bytes.push(bytes);
        }

        let mut byte_ids = [0u32; 256];
        for (b, c) in byte_chars.iter().enumerate() {
            byte_ids[b] = match vocab.get(c.to_string().as_str()) {
                Some(id) => *id,
                None => unknown_token_id.ok_or_else(|| {
                    ModelError::Tokenizer(format!(
                        "byte 0x{b:02x} ({c:?}) has no token and there is no unknown token"
                    ))
                })?,
            };
        }

        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, merge) in merge_list.iter().enumerate() {
            let (left, right) = merge.split_once(' ').ok_or_else(|| {
                ModelError::Tokenizer(format!("merge {rank} `{merge}` is not `left right`"))
            })?;
            let (Some(l), Some(r), Some(m)) = (
                vocab.get(left),
                vocab.get(right),
                vocab.get(format!("{left}{right}").as_str()),
            ) else {
                // llama.cpp ignores merges whose parts are not in the vocabulary.
                continue;
            };
            merges.entry((*l, *r)).or_insert((rank as u32, *m));
        }

        let all_specials = specials(&tokens, &token_types, &|ty| {
            matches!(ty, TokenType::Control | TokenType::UserDefined)
        })?;
        let user_specials = specials(&tokens, &token_types, &|ty| ty == TokenType::UserDefined)?;

        let regex = Regex::new(pre.pattern())
            .map_err(|e| ModelError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;

        Ok(Self {
            tokens,
            token_types,
            token_bytes,
            vocab,
            all_specials,
            user_specials,
            bos_token_id,
            eos_token_id,
            add_bos_token,
            add_eos_token: false,
            add_space_prefix,
            algorithm: Algorithm::Bpe(Box::new(Bpe {
                merges,
                byte_ids,
                byte_chars,
                pre,
                regex,
            })),
        })
    }

    /// Builds a SentencePiece tokenizer from its parts, checking that they are
    /// consistent.
    pub fn sentencepiece(config: SpmConfig) -> Result<Self, ModelError> {
        let SpmConfig {
            tokens,
            scores,
            token_types,
            bos_token_id,
            eos_token_id,
            unknown_token_id,
            add_bos_token,
            add_eos_token,
            add_space_prefix,
        } = config;
        let token_types = check_parts(
            &tokens,
            token_types,
            [bos_token_id, eos_token_id, unknown_token_id],
        )?;
        // llama.cpp keeps the last id of a duplicated text.
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, text)| (text.clone(), id as u32))
            .collect();
        let token_bytes = tokens
            .iter()
            .zip(&token_types)
            .map(|(text, ty)| spm::token_bytes(text, *ty))
            .collect();
        let model = spm::Spm::new(&tokens, scores, &vocab, unknown_token_id)?;
        let all_specials = specials(&tokens, &token_types, &|ty| {
            matches!(
                ty,
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown
            )
        })?;
        let user_specials = specials(&tokens, &token_types, &|ty| ty == TokenType::UserDefined)?;
        Ok(Self {
            tokens,
            token_types,
            token_bytes,
            vocab,
            all_specials,
            user_specials,
            bos_token_id,
            eos_token_id,
            add_bos_token,
            add_eos_token,
            add_space_prefix,
            algorithm: Algorithm::Spm(Box::new(model)),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// Whether [`EncodeOptions::add_special`] prepends BOS (`add_bos_token`).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token && self.bos_token_id.is_some()
    }

    /// The id of a vocabulary entry given in its stored (byte-level) form.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The stored form of a token (`Ġthe`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.token_types.get(id as usize).copied()
    }

    /// The bytes a token decodes to (literal text for control tokens).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(Vec::as_slice)
    }

    /// Control and unknown/unused tokens: what `skip_special` leaves out of decoding.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_type(id),
            Some(TokenType::Control | TokenType::Unknown | TokenType::Unused)
        )
    }

    /// Encodes `text`; never fails (see the module invariants).
    pub fn encode(&self, text: &str, options: EncodeOptions) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if options.add_special && self.add_bos_token {
            if let Some(bos) = self.bos_token_id {
                out.push(bos);
            }
        }
        if let Algorithm::Hf(hf) = &self.algorithm {
            hf.encode(text, options.parse_special, &mut out);
            if options.add_special && self.add_eos_token {
                out.extend(self.eos_token_id);
            }
            return out;
        }
        let specials = if options.parse_special {
            self.all_specials.as_ref()
        } else {
            self.user_specials.as_ref()
        };
        // Like llama.cpp, the space prefix goes on each text fragment that starts the
        // input or follows a special token; empty fragments produce nothing.
        let fragment = |out: &mut Vec<u32>, s: &str| {
            if s.is_empty() {
                return;
            }
            if self.add_space_prefix {
                self.encode_fragment(&format!(" {s}"), out);
            } else {
                self.encode_fragment(s, out);
            }
        };
        let mut start = 0;
        if let Some((automaton, ids)) = specials {
            for m in automaton.find_iter(text) {
                fragment(&mut out, &text[start..m.start()]);
                out.push(ids[m.pattern().as_usize()]);
                start = m.end();
            }
        }
        fragment(&mut out, &text[start..]);
        if options.add_special && self.add_eos_token {
            if let Some(eos) = self.eos_token_id {
                out.push(eos);
            }
        }
        out
    }

    /// Encodes one special-free fragment with the model's algorithm.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        match &self.algorithm {
            Algorithm::Bpe(bpe) => bpe.encode_fragment(text, out),
            Algorithm::Spm(spm) => {
                let escaped = text.replace(' ', spm::SPACE.encode_utf8(&mut [0; 4]));
                spm.encode(&escaped, &self.vocab, out);
            }
            Algorithm::Hf(hf) => hf.encode(text, true, out),
        }
    }

    /// The bytes `ids` decode to; ids outside the vocabulary are skipped.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            self.append_token(id, skip_special, &mut out);
        }
        out
    }

    /// Decodes to text; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }

    fn append_token(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) {
        if skip_special && self.is_special(id) {
            return;
        }
        if let Some(bytes) = self.token_bytes(id) {
            out.extend_from_slice(bytes);
        }
    }

    /// The pieces a byte-level BPE vocabulary's pre-tokenizer cuts special-free
    /// `text` into before merging (see [`PreTokenizer`]); other vocabularies do not
    /// pre-tokenize, so their text is one piece. For checking a pre-tokenizer against
    /// llama.cpp's, piece by piece.
    pub fn pre_tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        match &self.algorithm {
            Algorithm::Bpe(bpe) => {
                let mut pieces = Vec::new();
                bpe.split(text, &mut |p| pieces.push(p));
                pieces
            }
            Algorithm::Spm(_) | Algorithm::Hf(_) if text.is_empty() => Vec::new(),
            Algorithm::Spm(_) | Algorithm::Hf(_) => vec![text],
        }
    }

    /// The stored form raw bytes would have as a vocabulary entry: GPT-2's byte-level
    /// characters for BPE, the text with spaces as `▁` for SentencePiece.
    pub fn byte_level(&self, bytes: &[u8]) -> String {
        match &self.algorithm {
            Algorithm::Bpe(bpe) => bytes
                .iter()
                .map(|b| bpe.byte_chars[usize::from(*b)])
                .collect(),
            Algorithm::Spm(_) => String::from_utf8_lossy(bytes).replace(' ', "\u{2581}"),
            Algorithm::Hf(hf) if hf.bytes.byte_level => {
                let table = byte_to_char_table();
                bytes.iter().map(|b| table[usize::from(*b)]).collect()
            }
            Algorithm::Hf(hf) => {
                let text = String::from_utf8_lossy(bytes);
                match hf.bytes.metaspace {
                    Some(m) => text.replace(' ', m.encode_utf8(&mut [0; 4])),
                    None => text.into_owned(),
                }
            }
        }
    }
}

/// Checks the parts every vocabulary has; returns the token types (all normal when
/// none were given).
fn check_parts(
    tokens: &[String],
    mut token_types: Vec<TokenType>,
    ids: [Option<u32>; 3],
) -> Result<Vec<TokenType>, ModelError> {
    let n = tokens.len();
    if n == 0 || u32::try_from(n).is_err() {
        return Err(ModelError::Tokenizer(format!(
            "vocabulary size {n} is not usable"
        )));
    }
    if token_types.is_empty() {
        token_types = vec![TokenType::Normal; n];
    } else if token_types.len() != n {
        return Err(ModelError::Tokenizer(format!(
            "{} token types for {n} tokens",
            token_types.len()
        )));
    }
    for (what, id) in ["bos", "eos", "unknown"].into_iter().zip(ids) {
        if let Some(id) = id {
            if id as usize >= n {
                return Err(ModelError::Tokenizer(format!(
                    "{what} token id {id} is outside the vocabulary of {n}"
                )));
            }
        }
    }
    Ok(token_types)
}

/// A leftmost-longest matcher over the non-empty tokens whose type `keep` accepts.
fn specials(
    tokens: &[String],
    token_types: &[TokenType],
    keep: &dyn Fn(TokenType) -> bool,
) -> Result<Option<(AhoCorasick, Vec<u32>)>, ModelError> {
    let (ids, patterns): (Vec<u32>, Vec<&str>) = tokens
        .iter()
        .zip(token_types)
        .enumerate()
        .filter(|(_, (text, ty))| keep(**ty) && !text.is_empty())
        .map(|(id, (text, _))| (id as u32, text.as_str()))
        .unzip();
    if ids.is_empty() {
        return Ok(None);
    }
    let automaton = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&patterns)
        .map_err(|e| ModelError::Tokenizer(format!("special tokens: {e}")))?;
    Ok(Some((automaton, ids)))
}

impl Bpe {
    /// Pre-tokenizes one special-free fragment and BPE-encodes each piece.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        self.split(text, &mut |piece| self.bpe(piece.as_bytes(), out));
    }

    /// Cuts one special-free fragment into the pieces BPE runs on, in order; together
    /// they cover `text` exactly.
    fn split<'t>(&self, text: &'t str, piece: &mut dyn FnMut(&'t str)) {
        match self.pre {
            PreTokenizer::Gpt2 | PreTokenizer::Qwen2 => self.split_regex(text, piece),
            PreTokenizer::SmolLm => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        self.split_regex(&text[start..i], piece);
                        let end = i + c.len_utf8();
                        piece(&text[i..end]);
                        start = end;
                    }
                }
                self.split_regex(&text[start..], piece);
            }
        }
    }

    fn split_regex<'t>(&self, text: &'t str, piece: &mut dyn FnMut(&'t str)) {
        let mut start = 0;
        for m in self.regex.find_iter(text) {
            match m {
                Ok(m) => {
                    // Text the pattern skipped is a piece of its own, as in llama.cpp.
                    if m.start() > start {
                        piece(&text[start..m.start()]);
                    }
                    if !m.as_str().is_empty() {
                        piece(m.as_str());
                    }
                    start = m.end();
                }
                // Backtracking limit hit: keep the rest as one piece rather than lose it.
                Err(_) => break,
            }
        }
        if start < text.len() {
            piece(&text[start..]);
        }
    }

    /// Byte-level BPE on one piece: merge the lowest-ranked adjacent pair, leftmost first.
    fn bpe(&self, piece: &[u8], out: &mut Vec<u32>) {
        match piece.len() {
            0 => return,
            1 => {
                out.push(self.byte_ids[usize::from(piece[0])]);
                return;
            }
            _ => {}
        }
        // Whole piece in the vocabulary and reachable by merges is the common case,
        // but merges decide: always run them.
        let mut ids: Vec<u32> = piece
            .iter()
            .map(|b| self.byte_ids[usize::from(*b)])
            .collect();
        let n = ids.len();
        let mut next: Vec<usize> = (1..=n).collect(); // n means "none"
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect(); // MAX = none
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, ids: &[u32], l: usize, r: usize| {
            if let Some((rank, _)) = self.merges.get(&(ids[l], ids[r])) {
                heap.push(Reverse((*rank, l, r, ids[l], ids[r])));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &ids, i, i + 1);
        }
        while let Some(Reverse((_, l, r, lid, rid))) = heap.pop() {
            if !alive[l] || !alive[r] || next[l] != r || ids[l] != lid || ids[r] != rid {
                continue;
            }
            let Some((_, merged)) = self.merges.get(&(lid, rid)) else {
                continue;
            };
            ids[l] = *merged;
            alive[r] = false;
            next[l] = next[r];
            if next[r] < n {
                prev[next[r]] = l;
            }
            if prev[l] < n {
                push(&mut heap, &ids, prev[l], l);
            }
            if next[l] < n {
                push(&mut heap, &ids, l, next[l]);
            }
        }
        let mut i = 0;
        while i < n {
            out.push(ids[i]);
            i = next[i];
        }
    }
}

/// Turns a stream of token ids into text chunks that are always valid UTF-8.
///
/// A multi-byte character split across tokens is held back until it is complete;
/// bytes that can never become valid UTF-8 are emitted as U+FFFD at once.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            pending: Vec::new(),
            skip_special,
        }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        tokenizer.append_token(id, self.skip_special, &mut self.pending);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    text.push_str(s);
                    self.pending.clear();
                    return text;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: keep it for later.
                        None => {
                            self.pending.drain(..valid);
                            return text;
                        }
                        Some(bad) => {
                            text.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream: whatever is held back is emitted, lossily.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}
