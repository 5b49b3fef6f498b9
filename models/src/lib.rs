//! `airlock-models`: model families as artifacts and functions.
//!
//! Owns, once the local runtime lands (see ARCHITECTURE.md): format detection (GGUF
//! file, or a folder with config.json + *.safetensors + tokenizer.json), metadata,
//! loading weights with candle, tokenizers, chat templates and forward passes. It
//! never does threads, async, HTTP or queues. It holds no code yet: the gateway core
//! (external providers) is the first milestone.
