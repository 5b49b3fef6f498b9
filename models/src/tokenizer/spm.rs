//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`), as llama.cpp runs them.
//!
//! Owns the piece-level algorithm of llama.cpp's `llm_tokenizer_spm`: the text (spaces
//! already escaped to `▁`) is split into UTF-8 characters, then the adjacent pair whose
//! concatenation is a vocabulary entry with the highest score is merged, leftmost on
//! ties, until no pair is in the vocabulary. Every resulting piece is a vocabulary
//! entry except single characters the vocabulary lacks; those fall back to byte tokens
//! (`<0xNN>`, else the byte itself as a token, else the unknown token).
//!
//! Splitting out special tokens, BOS/EOS and the space prefix are shared with the BPE
//! tokenizer and live in [`super::Tokenizer::encode`].
//! Invariant: every byte value has a fallback id (checked at construction), so
//! encoding never fails and never drops input.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::TokenType;
use crate::error::ModelError;

/// llama.cpp's escaped space.
pub(super) const SPACE: char = '\u{2581}';

/// Everything needed to build a SentencePiece [`Tokenizer`](super::Tokenizer) without a
/// GGUF file.
#[derive(Debug, Clone)]
pub struct SpmConfig {
    /// Vocabulary entries as stored (`▁the`, `<0x0A>`, `<start_of_turn>`), by id.
    pub tokens: Vec<String>,
    /// One score per token (higher merges first); empty means all zero.
    pub scores: Vec<f32>,
    /// One type per token; empty means all normal.
    pub token_types: Vec<TokenType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    pub add_space_prefix: bool,
}

/// The SentencePiece-specific state: scores and byte fallbacks.
pub(super) struct Spm {
    scores: Vec<f32>,
    byte_ids: [u32; 256],
}

impl Spm {
    pub(super) fn new(
        tokens: &[String],
        scores: Vec<f32>,
        vocab: &HashMap<String, u32>,
        unknown_token_id: Option<u32>,
    ) -> Result<Self, ModelError> {
        let scores = if scores.is_empty() {
            vec![0.0; tokens.len()]
        } else if scores.len() == tokens.len() {
            scores
        } else {
            return Err(ModelError::Tokenizer(format!(
                "{} scores for {} tokens",
                scores.len(),
                tokens.len()
            )));
        };
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            let raw = u8::try_from(b)
                .ok()
                .filter(u8::is_ascii)
                .map(|b| char::from(b).to_string());
            *slot = vocab
                .get(&hex)
                .or_else(|| raw.and_then(|r| vocab.get(&r)))
                .copied()
                .or(unknown_token_id)
                .ok_or_else(|| {
                    ModelError::Tokenizer(format!(
                        "byte 0x{b:02x} has no {hex} token and there is no unknown token"
                    ))
                })?;
        }
        Ok(Self { scores, byte_ids })
    }

    /// Encodes one special-free fragment whose spaces are already `▁`.
    pub(super) fn encode(&self, text: &str, vocab: &HashMap<String, u32>, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        // One symbol per character, linked into a list; a merged-away symbol has len 0.
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (left, right) = (left?, right?);
            let start = symbols[left].start;
            let size = symbols[left].len + symbols[right].len;
            let id = vocab.get(text.get(start..start + size)?)?;
            Some(Bigram {
                score: *self.scores.get(*id as usize)?,
                left,
                right,
                size,
            })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(top) = queue.pop() {
            let (l, r) = (top.left, top.right);
            // Stale: one side was merged into something else since it was queued.
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != top.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(next) = symbols[r].next {
                symbols[next].prev = Some(l);
            }
            queue.extend(bigram(&symbols, symbols[l].prev, Some(l)));
            queue.extend(bigram(&symbols, Some(l), symbols[l].next));
        }
        // Merged pieces are vocabulary entries by construction; a single character
        // the vocabulary lacks becomes its bytes.
        let mut at = Some(0);
        while let Some(i) = at {
            let piece = &text[symbols[i].start..symbols[i].start + symbols[i].len];
            match vocab.get(piece) {
                Some(id) => out.push(*id),
                None => out.extend(piece.bytes().map(|b| self.byte_ids[usize::from(b)])),
            }
            at = symbols[i].next;
        }
    }
}

/// A run of characters in the text being encoded.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
#[derive(Debug, Clone, Copy)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

// Max-heap order: highest score first, then the leftmost pair (llama.cpp's comparator).
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// The bytes a vocabulary entry decodes to: `▁` is a space, `<0xNN>` byte tokens are
/// that byte, control/unknown/unused tokens are their literal text.
pub(super) fn token_bytes(text: &str, ty: TokenType) -> Vec<u8> {
    match ty {
        TokenType::Normal | TokenType::UserDefined => text.replace(SPACE, " ").into_bytes(),
        TokenType::Byte => {
            parse_byte_token(text).map_or_else(|| text.as_bytes().to_vec(), |b| vec![b])
        }
        TokenType::Control | TokenType::Unknown | TokenType::Unused => text.as_bytes().to_vec(),
    }
}

/// `<0xNN>` -> NN.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> HashMap<String, u32> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect()
    }

    #[test]
    fn merges_by_score_then_leftmost() {
        // "abc": "ab" and "bc" both exist; the higher score wins, leftmost on ties.
        let tokens = ["<unk>", "a", "b", "c", "ab", "bc"];
        let v = vocab(&tokens);
        let strings: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        let run = |scores: Vec<f32>| {
            let spm = Spm::new(&strings, scores, &v, Some(0)).unwrap();
            let mut out = Vec::new();
            spm.encode("abc", &v, &mut out);
            out
        };
        assert_eq!(run(vec![0.0, 0.0, 0.0, 0.0, -1.0, -2.0]), [4, 3]);
        assert_eq!(run(vec![0.0, 0.0, 0.0, 0.0, -2.0, -1.0]), [1, 5]);
        assert_eq!(run(vec![0.0, 0.0, 0.0, 0.0, -1.0, -1.0]), [4, 3]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "a".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let v: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let spm = Spm::new(&tokens, Vec::new(), &v, Some(0)).unwrap();
        let mut out = Vec::new();
        spm.encode("aé", &v, &mut out);
        assert_eq!(out, [1, 2 + 0xC3, 2 + 0xA9]);
        assert_eq!(token_bytes("<0xC3>", TokenType::Byte), [0xC3]);
        assert_eq!(token_bytes("\u{2581}a\u{2581}", TokenType::Normal), b" a ");
    }
}
