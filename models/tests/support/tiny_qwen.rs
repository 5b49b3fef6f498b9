//! Tiny random-weight Qwen 2 and Qwen 3 GGUF files, written by the test itself (no
//! downloads): the metadata and tensors llama.cpp's converter writes for these
//! architectures (Qwen 2's Q/K/V biases, Qwen 3's per-head Q/K norms and
//! `attention.key_length`), a byte-level BPE vocabulary laid out like Qwen's (byte
//! symbols, merged tokens, then the special tokens at the end) with
//! `tokenizer.ggml.pre = "qwen2"`, no BOS, `<|im_end|>` as EOS, and a Qwen-style chat
//! template. Shared by the models and runtime tests through `#[path]`.

#![allow(dead_code)] // each test crate uses a part

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The shape of one tiny model.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub arch: &'static str,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written as `attention.key_length` when it differs from `dim / heads` (Qwen 3).
    pub head_dim: usize,
    pub ff: usize,
    pub layers: usize,
    pub context: usize,
    /// Format of the block matmul weights (norms, biases and embeddings stay F32).
    pub dtype: GgmlDType,
}

pub const QWEN2: Shape = Shape {
    arch: "qwen2",
    dim: 32,
    heads: 4,
    kv_heads: 2,
    head_dim: 8,
    ff: 64,
    layers: 2,
    context: 256,
    dtype: GgmlDType::F32,
};

/// Head size 16 with 4 heads over a 32-wide residual: `key_length` matters.
/// Phi-3's layout (fused matrices), small.
pub const PHI3: Shape = Shape {
    arch: "phi3",
    dim: 32,
    heads: 4,
    kv_heads: 4,
    head_dim: 8,
    ff: 64,
    layers: 2,
    context: 256,
    dtype: GgmlDType::F32,
};

pub const QWEN3: Shape = Shape {
    arch: "qwen3",
    dim: 32,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    ff: 64,
    layers: 2,
    context: 256,
    dtype: GgmlDType::Q8_0,
};

/// Extra metadata to write (or override), and tensors to leave out.
#[derive(Debug, Default, Clone)]
pub struct Tweaks {
    pub metadata: Vec<(String, Value)>,
    pub without: Vec<String>,
    /// Ask candle-transformers' `quantized_qwen3` for F32 rotary tables (it builds them
    /// in F16 otherwise); only the reference comparison needs it, our loader ignores it.
    pub f32_for_candle: bool,
}

/// A Qwen 2.5-style template (the real one also handles tools).
pub const TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Special tokens after the normal ones, with llama.cpp's token types (3 control,
/// 4 user-defined): Qwen 3's `<think>` markers are added tokens that are not special.
pub const SPECIALS: [(&str, i32); 5] = [
    ("<|endoftext|>", 3),
    ("<|im_start|>", 3),
    ("<|im_end|>", 3),
    ("<think>", 4),
    ("</think>", 4),
];

/// Merges of the tiny vocabulary, as raw text (mapped to the byte-level alphabet).
pub const MERGES: &[(&str, &str)] = &[
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    (" ", "w"),
    ("o", "r"),
    (" w", "or"),
    ("l", "d"),
    (" wor", "ld"),
    ("'", "s"),
    ("\n", "\n"),
    (" ", "t"),
    (" t", "he"),
];

/// GPT-2's byte -> char map, written independently of the crate's.
pub fn byte_char(b: u8) -> char {
    let mut n = 0u32;
    for x in 0..=255u8 {
        let printable = matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if x == b {
            return if printable {
                char::from(x)
            } else {
                char::from_u32(256 + n).unwrap()
            };
        }
        if !printable {
            n += 1;
        }
    }
    unreachable!()
}

/// Raw text in the byte-level alphabet.
pub fn bl(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

/// Tokens (byte symbols, merged tokens, specials), their types and the merge lines.
pub fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut merges = Vec::new();
    for (l, r) in MERGES {
        let (l, r) = (bl(l), bl(r));
        let joined = format!("{l}{r}");
        if !tokens.contains(&joined) {
            tokens.push(joined);
        }
        merges.push(format!("{l} {r}"));
    }
    let mut types = vec![1; tokens.len()];
    for (text, ty) in SPECIALS {
        tokens.push(text.to_string());
        types.push(ty);
    }
    (tokens, types, merges)
}

/// The id of a special token in [`vocab`].
pub fn special_id(text: &str) -> u32 {
    let (tokens, _, _) = vocab();
    tokens.iter().position(|t| t == text).unwrap() as u32
}

/// Deterministic values in `[-scale, scale)` around `center`.
fn values(n: usize, seed: u64, center: f32, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            center + ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64, center: f32, scale: f32, dtype: GgmlDType) -> QTensor {
    let n = shape.iter().product();
    let t = Tensor::from_vec(values(n, seed, center, scale), shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// Writes the model to `path`.
pub fn write_gguf(path: &Path, shape: &Shape, tweaks: &Tweaks) {
    let (tokens, types, merges) = vocab();
    let vocab = tokens.len();
    let arch = shape.arch;
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s(&format!("tiny {arch}"))),
        (format!("{arch}.context_length"), u(shape.context)),
        (format!("{arch}.embedding_length"), u(shape.dim)),
        (format!("{arch}.block_count"), u(shape.layers)),
        (format!("{arch}.feed_forward_length"), u(shape.ff)),
        (format!("{arch}.attention.head_count"), u(shape.heads)),
        (format!("{arch}.attention.head_count_kv"), u(shape.kv_heads)),
        (format!("{arch}.rope.freq_base"), Value::F32(1_000_000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("qwen2")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            u(special_id("<|im_end|>") as usize),
        ),
        (
            "tokenizer.ggml.padding_token_id".into(),
            u(special_id("<|endoftext|>") as usize),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            u(special_id("<|endoftext|>") as usize),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s(TEMPLATE)),
    ];
    if arch == "phi3" {
        // candle's Phi-3 reads the rotary size; llama.cpp writes it for Phi-3.
        md.push((format!("{arch}.rope.dimension_count"), u(shape.head_dim)));
    }
    if shape.head_dim * shape.heads != shape.dim {
        md.push((format!("{arch}.attention.key_length"), u(shape.head_dim)));
        md.push((format!("{arch}.attention.value_length"), u(shape.head_dim)));
    }
    if tweaks.f32_for_candle {
        md.push(("general.dtype".into(), Value::U32(0)));
    }
    for (key, value) in &tweaks.metadata {
        md.retain(|(k, _)| k != key);
        md.push((key.clone(), value.clone()));
    }

    let (d, ff, hd) = (shape.dim, shape.ff, shape.head_dim);
    let (q, kv) = (shape.heads * hd, shape.kv_heads * hd);
    let f32 = GgmlDType::F32;
    let mut seed = 0u64;
    let mut next = || {
        seed += 1;
        seed
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            tensor(&[vocab, d], next(), 0.0, 1.0, f32),
        ),
        (
            "output_norm.weight".into(),
            tensor(&[d], next(), 1.0, 0.2, f32),
        ),
    ];
    // Qwen 2 and Phi-3 files keep a separate output matrix; Qwen 3's small models tie it.
    if arch == "qwen2" || arch == "phi3" {
        tensors.push((
            "output.weight".into(),
            tensor(&[vocab, d], next(), 0.0, 0.5, f32),
        ));
    }
    for i in 0..shape.layers {
        let mut add = |name: &str, dims: &[usize], center: f32, scale: f32, dtype| {
            tensors.push((
                format!("blk.{i}.{name}"),
                tensor(dims, next(), center, scale, dtype),
            ));
        };
        add("attn_norm.weight", &[d], 1.0, 0.2, f32);
        if arch == "phi3" {
            // Phi-3 stacks Q, K and V, and gate and up, in one matrix each.
            add("attn_qkv.weight", &[q + 2 * kv, d], 0.0, 0.5, shape.dtype);
            add("attn_output.weight", &[d, q], 0.0, 0.3, shape.dtype);
            add("ffn_norm.weight", &[d], 1.0, 0.2, f32);
            add("ffn_up.weight", &[2 * ff, d], 0.0, 0.5, shape.dtype);
            add("ffn_down.weight", &[d, ff], 0.0, 0.3, shape.dtype);
            continue;
        }
        add("attn_q.weight", &[q, d], 0.0, 0.5, shape.dtype);
        add("attn_k.weight", &[kv, d], 0.0, 0.5, shape.dtype);
        add("attn_v.weight", &[kv, d], 0.0, 0.5, shape.dtype);
        add("attn_output.weight", &[d, q], 0.0, 0.3, shape.dtype);
        if arch == "qwen2" {
            add("attn_q.bias", &[q], 0.0, 0.5, f32);
            add("attn_k.bias", &[kv], 0.0, 0.5, f32);
            add("attn_v.bias", &[kv], 0.0, 0.5, f32);
        } else {
            add("attn_q_norm.weight", &[hd], 1.0, 0.3, f32);
            add("attn_k_norm.weight", &[hd], 1.0, 0.3, f32);
        }
        add("ffn_norm.weight", &[d], 1.0, 0.2, f32);
        add("ffn_gate.weight", &[ff, d], 0.0, 0.5, shape.dtype);
        add("ffn_up.weight", &[ff, d], 0.0, 0.5, shape.dtype);
        add("ffn_down.weight", &[d, ff], 0.0, 0.3, shape.dtype);
    }
    tensors.retain(|(name, _)| !tweaks.without.contains(name));

    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}
