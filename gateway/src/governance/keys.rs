//! API key format: generation, strict parsing, hashing and constant-time verification.
//!
//! A key reads `sk-airlock-<public id>.<secret>`:
//! - public id: `ak_` and 12 lowercase hex characters (48 random bits). It names the key
//!   in lists, logs and the audit log, and is how a presented key is looked up.
//! - secret: 32 random bytes (256 bits) in URL-safe base64 without padding (43 chars).
//!
//! Invariants:
//! - Only `hash_secret(secret)` (SHA-256, hex) is ever stored; the secret has 256 bits of
//!   entropy, so an unsalted fast hash is enough (nothing to brute-force).
//! - [`parse`] is strict: exact prefix, exact lengths, exact alphabets, canonical base64
//!   (no stray trailing bits). Anything else is `None`.
//! - Hash comparison is constant-time ([`verify_secret`]).
//! - A full key lives only in a [`FullKey`], whose `Debug` is redacted and which has no
//!   `Display` or `Serialize`: it reaches a client once, explicitly, via
//!   [`FullKey::expose`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every key starts with.
pub const KEY_PREFIX: &str = "sk-airlock-";
/// What every public id starts with.
pub const ID_PREFIX: &str = "ak_";
/// Random characters after a prefix in public ids (and entity ids).
pub const ID_RANDOM_CHARS: usize = 12;
/// Random bytes in a secret.
pub const SECRET_BYTES: usize = 32;
/// Characters of a secret: 32 bytes in unpadded base64.
pub const SECRET_CHARS: usize = 43;
/// Length of a whole key.
pub const KEY_LEN: usize = KEY_PREFIX.len() + ID_PREFIX.len() + ID_RANDOM_CHARS + 1 + SECRET_CHARS;

/// A full key. Shown once at creation; never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct FullKey(String);

impl FullKey {
    /// The key text, for the one response that hands it out (or the bootstrap file).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for FullKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FullKey(<redacted>)")
    }
}

/// `prefix` and 12 random lowercase hex characters: `ak_…`, `org_…`, `team_…`, `user_…`.
pub fn random_id(prefix: &str) -> String {
    let bytes: [u8; ID_RANDOM_CHARS / 2] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// A new key: the full key (show it once), its public id, and the hex SHA-256 of its
/// secret (store only this).
pub fn generate() -> (FullKey, String, String) {
    let public_id = random_id(ID_PREFIX);
    let bytes: [u8; SECRET_BYTES] = rand::random();
    let secret = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_secret(&secret);
    (
        FullKey(format!("{KEY_PREFIX}{public_id}.{secret}")),
        public_id,
        hash,
    )
}

/// Whether `s` is a well-formed public id (`ak_` and 12 lowercase hex characters).
pub fn is_public_id(s: &str) -> bool {
    s.strip_prefix(ID_PREFIX).is_some_and(|r| {
        r.len() == ID_RANDOM_CHARS && r.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Splits a presented key into `(public id, secret)`; `None` unless it is exactly in
/// our format.
pub fn parse(presented: &str) -> Option<(&str, &str)> {
    if presented.len() != KEY_LEN {
        return None;
    }
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('.')?;
    if !is_public_id(id) || secret.len() != SECRET_CHARS {
        return None;
    }
    // The decoder checks the alphabet and refuses non-canonical trailing bits.
    let decoded = URL_SAFE_NO_PAD.decode(secret).ok()?;
    (decoded.len() == SECRET_BYTES).then_some((id, secret))
}

/// Hex SHA-256 of a secret, as stored in `ApiKey::secret_hash`.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `stored_hex`, compared in constant time. A stored value
/// that is not 32 bytes of hex never matches.
pub fn verify_secret(secret: &str, stored_hex: &str) -> bool {
    let mut stored = [0u8; 32];
    if hex::decode_to_slice(stored_hex, &mut stored).is_err() {
        return false;
    }
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    digest.ct_eq(&stored).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_to_their_id_and_hash() {
        let (full, id, hash) = generate();
        let text = full.expose();
        assert_eq!(text.len(), KEY_LEN);
        assert!(text.starts_with("sk-airlock-ak_"));
        assert!(is_public_id(&id));
        let (pid, secret) = parse(text).unwrap();
        assert_eq!(pid, id);
        assert_eq!(hash_secret(secret), hash);
        assert!(verify_secret(secret, &hash));
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(secret));
    }

    #[test]
    fn keys_and_ids_are_distinct() {
        let (a, ida, _) = generate();
        let (b, idb, _) = generate();
        assert_ne!(a, b);
        assert_ne!(ida, idb);
        assert_ne!(random_id("org_"), random_id("org_"));
        assert!(random_id("team_").starts_with("team_"));
    }

    #[test]
    fn full_keys_never_show_in_debug() {
        let (full, _, _) = generate();
        let (_, secret) = parse(full.expose()).unwrap();
        let dbg = format!("{full:?} {:?}", (full.clone(), 1));
        assert!(!dbg.contains(secret), "{dbg}");
        assert!(!dbg.contains("sk-airlock"), "{dbg}");
    }

    #[test]
    fn parse_rejects_everything_not_exactly_our_format() {
        let (full, _, _) = generate();
        let good = full.expose().to_string();
        let secret = good.split_once('.').unwrap().1.to_string();
        let id = &good[KEY_PREFIX.len()..KEY_PREFIX.len() + 15];
        let bad: Vec<String> = vec![
            String::new(),
            "sk-airlock-".into(),
            good.replace("sk-airlock-", "sk-airlocc-"),
            good.replace("sk-airlock-", "SK-AIRLOCK-"),
            good.replace("ak_", "ak-"),
            good.replace("ak_", "AK_"),
            format!("{good}x"),
            good[..good.len() - 1].to_string(),
            // uppercase hex in the id
            format!("{KEY_PREFIX}ak_ABCDEF012345.{secret}"),
            // non-hex in the id
            format!("{KEY_PREFIX}ak_ghijkl012345.{secret}"),
            // short id, long secret (same total length)
            format!("{KEY_PREFIX}ak_abcdef01234.{secret}A"),
            // no dot
            good.replace('.', "_"),
            // two dots
            format!("{KEY_PREFIX}{id}.{}.{}", &secret[..5], &secret[6..]),
            // bad base64 alphabet
            format!("{KEY_PREFIX}{id}.{}+", &secret[..SECRET_CHARS - 1]),
            format!("{KEY_PREFIX}{id}.{}/", &secret[..SECRET_CHARS - 1]),
            format!("{KEY_PREFIX}{id}.{}=", &secret[..SECRET_CHARS - 1]),
            // non-canonical last character (trailing bits set): 'B' has a low bit set
            format!("{KEY_PREFIX}{id}.{}B", &secret[..SECRET_CHARS - 1]),
            // whitespace
            format!(" {}", &good[1..]),
            // multibyte characters of the same byte length must not panic
            format!("{}é", &good[..good.len() - 2]),
        ];
        for b in &bad {
            assert_eq!(parse(b), None, "{b:?} must not parse");
        }
        // The 'A'-ended canonical form still parses.
        let canonical = format!("{KEY_PREFIX}{id}.{}A", &secret[..SECRET_CHARS - 1]);
        assert!(parse(&canonical).is_some());
    }

    #[test]
    fn verify_is_exact_and_tolerates_a_corrupt_stored_hash() {
        let h = hash_secret("abc");
        assert!(verify_secret("abc", &h));
        assert!(!verify_secret("abd", &h));
        assert!(!verify_secret("abc", "zz"));
        assert!(!verify_secret("abc", ""));
        assert!(!verify_secret("abc", &h[..62]));
    }
}
