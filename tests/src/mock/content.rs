//! Deterministic content the mocks answer with, public so tests can compute what to
//! expect: the reply texts, the word-count "tokens", how streams split text, and the
//! fake embeddings (exact in f32, so JSON and base64 round trips compare equal).

/// The text a mock answers to `last_user_text`, before any `max_tokens` cut.
pub fn reply_text(last_user_text: &str) -> String {
    let t = last_user_text.trim();
    if t.is_empty() {
        "You said: (nothing)".to_string()
    } else {
        format!("You said: {t}")
    }
}

/// The text a mock answers after a tool result.
pub fn tool_result_reply(result_text: &str) -> String {
    format!("Tool result: {}", result_text.trim())
}

/// Cuts `text` to at most `max_words` words; returns the text and whether it was cut.
pub fn limit_words(text: &str, max_words: Option<u64>) -> (String, bool) {
    let words: Vec<&str> = text.split_whitespace().collect();
    match max_words {
        Some(m) if (m as usize) < words.len() => (words[..m as usize].join(" "), true),
        _ => (words.join(" "), false),
    }
}

/// Whitespace-separated words: the mocks' token count.
pub fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// How a mock splits a text into stream deltas: the first word, then ` word` each.
pub fn stream_pieces(text: &str) -> Vec<String> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// Splits a string into `n` roughly equal pieces on char boundaries (for streamed
/// tool-call arguments).
pub fn split_in(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// Length of every [`fake_embedding`].
pub const EMBEDDING_DIMS: usize = 8;

/// A deterministic embedding of `text`: [`EMBEDDING_DIMS`] values `(b - 128) / 128` with
/// `b` a byte of an FNV-1a hash, so each is exact in f32 and prints exactly in JSON.
pub fn fake_embedding(text: &str) -> Vec<f32> {
    (0..EMBEDDING_DIMS)
        .map(|i| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (i as u64);
            for b in text.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            let byte = (h >> 24) as u8;
            (f32::from(byte) - 128.0) / 128.0
        })
        .collect()
}

/// Little-endian f32 bytes in base64, as OpenAI's `encoding_format: "base64"`.
pub fn embedding_to_base64(v: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes [`embedding_to_base64`]; panics on bad input.
pub fn embedding_from_base64(s: &str) -> Vec<f32> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("embedding is not base64 ({e}): {s:?}"));
    assert_eq!(
        bytes.len() % 4,
        0,
        "base64 embedding is not a whole number of f32s"
    );
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
