//! A tiny random-weight llama laid out as a Hugging Face safetensors folder, written
//! in the test itself (no downloads): a byte-level BPE `tokenizer.json` built with the
//! `tokenizers` crate, `tokenizer_config.json` with a chat template, `config.json` and
//! deterministic weights saved with candle. Shared by the models and runtime tests
//! through `#[path]`.

#![allow(dead_code)] // each test crate uses a part

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::AddedToken;

pub const HIDDEN: usize = 64;
pub const INTERMEDIATE: usize = 128;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
/// Larger than the tokenizer's vocabulary, like real checkpoints padded for speed.
pub const VOCAB: usize = 300;
pub const CONTEXT: usize = 256;

/// Merges of the tiny vocabulary, in GPT-2's byte-level alphabet.
const MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("l", "l"),
    ("e", "ll"),
    ("H", "ell"),
    ("Hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("Ġwor", "ld"),
    ("l", "d"),
    ("Ã", "©"),
    ("u", "s"),
    ("e", "r"),
];

pub const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// An added token that is not special: split out of the text always.
pub const USER_TOKEN: &str = "<tool>";

pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's byte -> char map.
pub fn byte_char(b: u8) -> char {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        return char::from(b);
    }
    let mut n = 0u32;
    for x in 0..b {
        if !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            n += 1;
        }
    }
    char::from_u32(256 + n).unwrap()
}

/// The byte-level BPE tokenizer: 256 byte symbols, the merges, then the added tokens.
pub fn byte_level_tokenizer() -> tokenizers::Tokenizer {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    for (l, r) in MERGES {
        tokens.push(format!("{l}{r}"));
    }
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = MERGES
        .iter()
        .map(|(l, r)| (l.to_string(), r.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(specials).unwrap();
    tok.add_tokens(vec![AddedToken::from(USER_TOKEN, false)])
        .unwrap();
    tok
}

/// How to write the folder.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub dtype: DType,
    /// Two files plus `model.safetensors.index.json`.
    pub sharded: bool,
    pub tied: bool,
}

pub const PLAIN: Layout = Layout {
    dtype: DType::F32,
    sharded: false,
    tied: false,
};

/// Deterministic pseudo-random values in `[-scale, scale]`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The weights by name, F32 but rounded through BF16 so every layout holds the same
/// values exactly.
pub fn weights(tied: bool) -> Vec<(String, Tensor)> {
    let head_dim = HIDDEN / HEADS;
    let mut shapes: Vec<(String, Vec<usize>, f32)> =
        vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0)];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![HIDDEN], 1.0),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![HIDDEN],
                1.0,
            ),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![HIDDEN, HIDDEN],
                0.3,
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![KV_HEADS * head_dim, HIDDEN],
                0.3,
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![KV_HEADS * head_dim, HIDDEN],
                0.3,
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, HIDDEN],
                0.3,
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
                0.3,
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
                0.3,
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, INTERMEDIATE],
                0.3,
            ),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![HIDDEN], 1.0));
    if !tied {
        shapes.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.5));
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, scale))| {
            let n = shape.iter().product();
            let mut v = values(n, i as u64 + 1, scale);
            if name.ends_with("norm.weight") {
                v.iter_mut().for_each(|x| *x = 1.0 + *x * 0.2);
            }
            let t = Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (name, t)
        })
        .collect()
}

pub fn config_json(tied: bool) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": 256 + MERGES.len() as u32,
        "eos_token_id": 256 + MERGES.len() as u32 + 2,
        "torch_dtype": "bfloat16",
    })
}

/// Writes the whole folder into `dir`.
pub fn write_folder(dir: &Path, layout: Layout) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config_json(layout.tied)).unwrap(),
    )
    .unwrap();
    byte_level_tokenizer()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|endoftext|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": true},
        "add_bos_token": false,
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();

    let tensors: Vec<(String, Tensor)> = weights(layout.tied)
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(layout.dtype).unwrap()))
        .collect();
    if !layout.sharded {
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
        return;
    }
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (file, part) in names.iter().zip([&tensors[..half], &tensors[half..]]) {
        let map: HashMap<String, Tensor> = part.iter().cloned().collect();
        for name in map.keys() {
            weight_map.insert(name.clone(), serde_json::Value::from(*file));
        }
        candle_core::safetensors::save(&map, dir.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}
