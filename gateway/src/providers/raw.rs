//! Answers forwarded as the upstream's own bytes: what OpenAI-compatible upstreams send
//! already is the client's wire format, so parsing it into typed structs and serializing
//! it again would only cost time.
//!
//! A raw answer is still checked before it is forwarded: it must be JSON of the expected
//! shape (`id`, `created`, `model`, and `choices` with an `index` each; for a whole
//! answer, each choice's `message` must be an object), and its token usage is read for
//! metering, budgets and the audit record. An answer that fails the check is an
//! `InvalidResponse`, as it is on the typed path, so routing may still fail over.
//!
//! Invariants:
//! - The bytes reach the client unchanged, except that a chunk whose `usage` the client
//!   did not ask for loses it ([`ChatChunk::strip_usage`]), as on the typed path. The
//!   common case, OpenAI's `,"usage":null` as the object's last member (every chunk but
//!   the last once usage is asked for, which the gateway always does), is cut out of the
//!   bytes; any other placement is re-serialized from the typed chunk.
//! - Usage read here is the upstream's own count (`prompt_tokens`, `completion_tokens`,
//!   `total_tokens`); the detail objects stay in the forwarded bytes only.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

use crate::api::types::{ChatCompletionChunk, ChatCompletionResponse, Usage};

/// A chat answer: typed (translated by an adapter) or the upstream's own JSON.
#[derive(Debug)]
pub enum ChatAnswer {
    Typed(ChatCompletionResponse),
    Raw(RawAnswer),
}

impl ChatAnswer {
    pub fn usage(&self) -> Option<&Usage> {
        match self {
            ChatAnswer::Typed(r) => r.usage.as_ref(),
            ChatAnswer::Raw(r) => r.usage.as_ref(),
        }
    }
}

/// A `chat.completion` body as the upstream sent it, checked, with its usage read.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub body: Bytes,
    pub usage: Option<Usage>,
}

impl RawAnswer {
    /// Checks `body` as a `chat.completion` and reads its usage.
    pub fn parse(body: Bytes) -> Result<RawAnswer, serde_json::Error> {
        let shape: AnswerShape = serde_json::from_slice(&body)?;
        Ok(RawAnswer {
            usage: shape.usage.map(UsageCounts::into_usage),
            body,
        })
    }
}

/// One streamed chat chunk: typed (translated by an adapter) or the upstream's own.
#[derive(Debug, Clone)]
pub enum ChatChunk {
    Typed(ChatCompletionChunk),
    Raw(RawChunk),
}

impl ChatChunk {
    pub fn usage(&self) -> Option<&Usage> {
        match self {
            ChatChunk::Typed(c) => c.usage.as_ref(),
            ChatChunk::Raw(c) => c.usage.as_ref(),
        }
    }

    /// The final chunk that carries only usage (no choices).
    pub fn is_usage_only(&self) -> bool {
        match self {
            ChatChunk::Typed(c) => c.choices.is_empty() && c.usage.is_some(),
            ChatChunk::Raw(c) => !c.has_choices && c.usage.is_some(),
        }
    }

    /// Drops `usage` from the chunk. A raw chunk whose last member is `"usage":null` has
    /// it cut from its bytes; one with a `usage` key anywhere else is parsed into the
    /// typed chunk and re-serialized without it; one that does not parse as a typed
    /// chunk is left as it is.
    pub fn strip_usage(&mut self) {
        match self {
            ChatChunk::Typed(c) => c.usage = None,
            ChatChunk::Raw(c) if c.usage_key => {
                if c.usage.is_none() && c.cut_null_usage() {
                    return;
                }
                if let Ok(mut typed) = serde_json::from_slice::<ChatCompletionChunk>(&c.json) {
                    typed.usage = None;
                    *self = ChatChunk::Typed(typed);
                }
            }
            ChatChunk::Raw(_) => {}
        }
    }

    /// Total tokens, when the chunk reports usage.
    pub fn total_tokens(&self) -> Option<u64> {
        self.usage().map(|u| u.total_tokens)
    }
}

/// A `chat.completion.chunk` event's JSON as the upstream sent it, checked.
#[derive(Debug, Clone)]
pub struct RawChunk {
    /// The event's `data`: one JSON object.
    pub json: Bytes,
    pub usage: Option<Usage>,
    /// Whether the object has a `usage` key at all (OpenAI sends `"usage":null` on every
    /// chunk but the last when usage is asked for).
    usage_key: bool,
    has_choices: bool,
}

impl RawChunk {
    /// Checks `json` as a `chat.completion.chunk` and reads its usage.
    pub fn parse(json: Bytes) -> Result<RawChunk, serde_json::Error> {
        let shape: ChunkShape = serde_json::from_slice(&json)?;
        Ok(RawChunk {
            usage_key: shape.usage.is_some(),
            usage: shape.usage.flatten().map(UsageCounts::into_usage),
            has_choices: shape.choices.0 > 0,
            json,
        })
    }

    /// Cuts a trailing `,"usage":null` member (JSON whitespace allowed between tokens)
    /// out of the bytes; false, changing nothing, when the object does not end so.
    ///
    /// Sound on a checked chunk: the object parsed with a top-level `usage` of `null`
    /// (serde refuses duplicate keys), and bytes ending `, "usage" : null }` can only be
    /// that member: the `}` closes the top-level object, `null` is its last value, and the
    /// quote after the comma is not escaped, so it opens the key `usage`.
    fn cut_null_usage(&mut self) -> bool {
        let b = &self.json[..];
        let mut i = b.len();
        let expect = |token: &[u8], i: &mut usize| -> bool {
            while *i > 0 && matches!(b[*i - 1], b' ' | b'\t' | b'\n' | b'\r') {
                *i -= 1;
            }
            if b[..*i].ends_with(token) {
                *i -= token.len();
                true
            } else {
                false
            }
        };
        if !expect(b"}", &mut i) {
            return false;
        }
        let close = i;
        if !(expect(b"null", &mut i)
            && expect(b":", &mut i)
            && expect(b"\"usage\"", &mut i)
            && expect(b",", &mut i))
        {
            return false;
        }
        let mut cut = Vec::with_capacity(b.len() - (close - i));
        cut.extend_from_slice(&b[..i]);
        cut.extend_from_slice(&b[close..]);
        self.json = Bytes::from(cut);
        self.usage_key = false;
        true
    }
}

/// What is checked of a `chat.completion`.
#[derive(Deserialize)]
struct AnswerShape {
    #[serde(rename = "id")]
    _id: Str,
    #[serde(rename = "created")]
    _created: i64,
    #[serde(rename = "model")]
    _model: Str,
    #[serde(rename = "choices")]
    _choices: Vec<AnswerChoiceShape>,
    #[serde(default)]
    usage: Option<UsageCounts>,
}

#[derive(Deserialize)]
struct AnswerChoiceShape {
    #[serde(rename = "index")]
    _index: u32,
    #[serde(rename = "message")]
    _message: Object,
}

/// What is checked of a `chat.completion.chunk`.
#[derive(Deserialize)]
struct ChunkShape {
    #[serde(rename = "id")]
    _id: Str,
    #[serde(rename = "created")]
    _created: i64,
    #[serde(rename = "model")]
    _model: Str,
    #[serde(default)]
    choices: Count<ChunkChoiceShape>,
    /// `Some(None)`: the key is there with `null`.
    #[serde(default, deserialize_with = "present")]
    usage: Option<Option<UsageCounts>>,
}

#[derive(Deserialize)]
struct ChunkChoiceShape {
    #[serde(rename = "index")]
    _index: u32,
}

/// The token counts of `usage`.
#[derive(Deserialize)]
struct UsageCounts {
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    total_tokens: u64,
}

impl UsageCounts {
    fn into_usage(self) -> Usage {
        let mut u = Usage::new(self.prompt_tokens, self.completion_tokens);
        u.total_tokens = self.total_tokens;
        u
    }
}

fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A JSON string, checked and not kept.
struct Str;

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Str;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Str, E> {
                Ok(Str)
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON object, checked and not kept.
struct Object;

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Object)
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON array of `T`, each checked, counted and not kept.
struct Count<T>(usize, std::marker::PhantomData<T>);

impl<T> Default for Count<T> {
    fn default() -> Self {
        Count(0, std::marker::PhantomData)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Count<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Count<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count<T>, A::Error> {
                let mut n = 0;
                while seq.next_element::<T>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n, std::marker::PhantomData))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_and_their_usage_read() {
        let body = br#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let a = RawAnswer::parse(Bytes::from_static(body)).unwrap();
        assert_eq!(a.body.as_ref(), body.as_slice(), "forwarded unchanged");
        let u = a.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (3, 2, 5)
        );
        for bad in [
            &br#"{"error":{"message":"overloaded"}}"#[..],
            br#"{"id":"c1","created":1,"model":"m"}"#,
            br#"{"id":"c1","created":"now","model":"m","choices":[]}"#,
            br#"{"id":"c1","created":1,"model":"m","choices":[{"index":0}]}"#,
            br#"{"id":"c1","created":1,"model":"m","choices":[{"index":0,"message":"hi"}]}"#,
            br#"{"id":"c1","created":1,"model":"m","choices":[],"usage":{"total_tokens":1}}"#,
            br#"{"id":"c1","created":1,"#,
        ] {
            assert!(
                RawAnswer::parse(Bytes::from_static(bad)).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A stream as OpenAI sends it when usage is asked for (what the gateway always
    /// asks), and the same stream as OpenAI sends it to a client that did not ask: the
    /// same bytes without the `,"usage":null` member and without the usage chunk.
    const OPENAI_WITH_USAGE: &str = r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"The \"usage\":null}"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":" answer"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"#;

    const OPENAI_WITHOUT_USAGE: &str = r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"The \"usage\":null}"},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":" answer"},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}

data: [DONE]

"#;

    #[test]
    fn an_openai_stream_without_asked_usage_is_openais_own_bytes() {
        let mut out = String::new();
        let mut usage = None;
        for event in OPENAI_WITH_USAGE.split("\n\n").filter(|e| !e.is_empty()) {
            let data = event.strip_prefix("data: ").unwrap();
            if data == "[DONE]" {
                out.push_str("data: [DONE]\n\n");
                continue;
            }
            let mut chunk =
                ChatChunk::Raw(RawChunk::parse(Bytes::copy_from_slice(data.as_bytes())).unwrap());
            if let Some(u) = chunk.usage() {
                usage = Some(u.total_tokens);
            }
            // What the SSE writer does for a client that did not ask for usage.
            if chunk.is_usage_only() {
                continue;
            }
            chunk.strip_usage();
            let ChatChunk::Raw(c) = &chunk else {
                panic!("OpenAI's chunks stay raw bytes: {data}")
            };
            out.push_str("data: ");
            out.push_str(std::str::from_utf8(&c.json).unwrap());
            out.push_str("\n\n");
        }
        assert_eq!(out, OPENAI_WITHOUT_USAGE);
        assert_eq!(usage, Some(12));
    }

    #[test]
    fn a_trailing_null_usage_is_cut_only_when_it_is_the_last_member() {
        let cut = |json: &'static [u8]| {
            let mut c = RawChunk::parse(Bytes::from_static(json)).unwrap();
            c.cut_null_usage()
                .then(|| String::from_utf8(c.json.to_vec()).unwrap())
        };
        // Python's json.dumps spacing.
        assert_eq!(
            cut(br#"{"id": "c", "created": 1, "model": "m", "choices": [{"index": 0}], "usage" : null }"#),
            Some(r#"{"id": "c", "created": 1, "model": "m", "choices": [{"index": 0}]}"#.into())
        );
        // The text of a string is never taken for the member.
        assert_eq!(
            cut(br#"{"id":"c","created":1,"model":"m","choices":[{"index":0,"delta":{"content":",\"usage\":null}"}}],"usage":null}"#),
            Some(r#"{"id":"c","created":1,"model":"m","choices":[{"index":0,"delta":{"content":",\"usage\":null}"}}]}"#.into())
        );
        for unchanged in [
            &br#"{"id":"c","created":1,"model":"m","choices":[],"usage":null,"x":1}"#[..],
            br#"{"id":"c","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":1,"total_tokens":1}}"#,
            br#"{"id":"c","created":1,"model":"m","choices":[],"x":{"usage":null}}"#,
            br#"{"id":"c","created":1,"model":"m","choices":[]}"#,
        ] {
            assert_eq!(cut(unchanged), None, "{}", String::from_utf8_lossy(unchanged));
        }
    }

    #[test]
    fn chunks_tell_usage_only_and_null_usage_apart() {
        let content = br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        let c = RawChunk::parse(Bytes::from_static(content)).unwrap();
        assert!(c.has_choices && !c.usage_key && c.usage.is_none());

        let null_usage = br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#;
        let c = RawChunk::parse(Bytes::from_static(null_usage)).unwrap();
        assert!(c.usage_key && c.usage.is_none());
        let mut chunk = ChatChunk::Raw(c);
        assert!(!chunk.is_usage_only());
        chunk.strip_usage();
        let ChatChunk::Raw(c) = &chunk else {
            panic!("a trailing null usage is cut from the bytes, not re-serialized")
        };
        assert_eq!(
            &c.json[..],
            &null_usage[..null_usage.len() - 14]
                .iter()
                .chain(b"}")
                .copied()
                .collect::<Vec<u8>>()[..]
        );

        // `usage` elsewhere than last: the typed path.
        let inner = br#"{"id":"c","object":"chat.completion.chunk","usage":null,"created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
        let mut chunk = ChatChunk::Raw(RawChunk::parse(Bytes::from_static(inner)).unwrap());
        chunk.strip_usage();
        let ChatChunk::Typed(t) = &chunk else {
            panic!("a usage key that is not last is re-serialized without it")
        };
        assert!(serde_json::to_value(t).unwrap().get("usage").is_none());

        let usage_only = br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let chunk = ChatChunk::Raw(RawChunk::parse(Bytes::from_static(usage_only)).unwrap());
        assert!(chunk.is_usage_only());
        assert_eq!(chunk.total_tokens(), Some(5));

        for bad in [
            &br#"{"error":{"message":"overloaded"}}"#[..],
            br#"{"id":"c","created":1,"model":"m","choices":[{"delta":{}}]}"#,
            br#"{"id":"c","created":1,"model":"m","choices":{}}"#,
            br#"not json"#,
        ] {
            assert!(
                RawChunk::parse(Bytes::from_static(bad)).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
