//! Sentence embeddings: sentences/s at batch 1 (one call per sentence) and batch 32
//! (one call per 32 sentences), on the caller's thread as the gateway runs them.

use std::path::Path;
use std::time::Instant;

use airlock_runtime::models::EmbeddingModel;
use anyhow::Context as _;
use serde_json::{json, Value};

use crate::{Plan, SENTENCES};

pub fn bench(dir: &Path, plan: &Plan) -> anyhow::Result<Value> {
    let model_name = dir
        .file_name()
        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
    eprintln!("airlock-bench-local: loading {}", dir.display());
    let started = Instant::now();
    let model = EmbeddingModel::load(dir).with_context(|| dir.display().to_string())?;
    let load_s = started.elapsed().as_secs_f64();
    let sentences: Vec<&str> = SENTENCES.lines().take(plan.embed_sentences).collect();
    let tokens: usize = sentences.iter().map(|s| model.count_tokens(s)).sum();

    // Warm-up, one call of each shape.
    model.embed(&sentences[..1])?;
    model.embed(&sentences[..sentences.len().min(32)])?;

    let rate = |batch: usize, passes: usize| -> anyhow::Result<f64> {
        let start = Instant::now();
        for _ in 0..passes {
            for chunk in sentences.chunks(batch) {
                model.embed(chunk)?;
            }
        }
        Ok((passes * sentences.len()) as f64 / start.elapsed().as_secs_f64())
    };
    let batch1 = rate(1, plan.batch1_passes)?;
    let batch32 = rate(32, plan.batch32_passes)?;
    eprintln!(
        "airlock-bench-local: {model_name}: {batch1:.1}/s at batch 1, {batch32:.1}/s at batch 32"
    );
    Ok(json!({
        "model": model_name,
        "load_s": load_s,
        "sentences": sentences.len(),
        "mean_tokens": tokens as f64 / sentences.len().max(1) as f64,
        "batch1_per_s": batch1,
        "batch32_per_s": batch32,
    }))
}
