//! Which quantized weight formats run as they are on the CPU, and requantizing the rest.
//!
//! Owns one policy: candle 0.11's CPU matmul for Q4_1, Q5_0 and Q5_1 is its generic
//! scalar code, several times slower than its SIMD Q8_0 kernel. SmolLM2-135M Q4_1 on
//! this 2-core AVX-512 machine, greedy, 42-token prompt: as stored, prefill 1.0 s and
//! 35 tok/s decode; requantized, prefill 0.22 s and 78 tok/s. With [`LoadOptions::requantize_slow_formats`](crate::LoadOptions)
//! (the default) tensors in those formats are dequantized and requantized to Q8_0 at
//! load. Q8_0's rounding error is several times smaller than theirs, so the weights
//! stay within the file's own precision, but the numbers are not bit-identical to
//! running the file's format (nor to llama.cpp), and weights take ~1.7x the memory.
//! This is a stopgap until the runtime has its own kernels.
//!
//! Invariant: the returned header describes exactly the returned bytes; tensors in any
//! other format are copied unchanged. The rewrite holds the weights in memory twice
//! for a moment (fine for the small models served today).

use std::io::{Cursor, Read, Seek};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

/// Formats whose CPU kernels in candle 0.11 are generic scalar code.
pub fn is_slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// True when some tensor of `content` would be requantized.
pub fn needs_requantize(content: &Content) -> bool {
    content
        .tensor_infos
        .values()
        .any(|t| is_slow_on_cpu(t.ggml_dtype))
}

/// Rewrites the file in memory with slow-format tensors requantized to Q8_0.
pub fn requantize_to_q8_0<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
) -> candle_core::Result<(Content, Cursor<Vec<u8>>)> {
    let device = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content.tensor(reader, name, &device)?;
        let tensor = if is_slow_on_cpu(tensor.dtype()) {
            QTensor::quantize(&tensor.dequantize(&device)?, GgmlDType::Q8_0)?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensor_refs)?;
    drop(tensors);
    out.set_position(0);
    let rewritten = Content::read(&mut out)?;
    Ok((rewritten, out))
}
