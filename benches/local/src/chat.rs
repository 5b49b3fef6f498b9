//! Chat models through the engine: time to first token, decode rate, aggregate rates
//! (with the prefills, and decode only).
//!
//! Every request is greedy (temperature 0, no penalties) on the same prompt: the fixed
//! text tokenized by the model's own tokenizer (BOS if the model asks for it) and cut
//! to `plan.prompt_tokens`. Times run from `Engine::submit` to the event that marks
//! them, so they include the hop over the engine's channel (microseconds). A stream may
//! end early on an end-of-sequence token; rates count the tokens actually generated.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock_runtime::models::{load_with, EncodeOptions, LoadOptions};
use airlock_runtime::{Engine, Event, GenerateRequest, SamplingParams};
use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{median, Plan, PROMPT_TEXT};

/// One request's timeline, measured from its submit.
struct Timeline {
    first_token: Duration,
    done: Duration,
    tokens: usize,
}

/// Measures one GGUF model; a model that does not load is `"status": "skipped"`.
pub fn bench(path: &Path, plan: &Plan) -> anyhow::Result<Value> {
    let model_name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    eprintln!("airlock-bench-local: loading {}", path.display());
    let started = Instant::now();
    let model = match load_with(path, &LoadOptions::default()) {
        Ok(m) => m,
        Err(e) => {
            let note = format!("Airlock cannot load it: {e}");
            eprintln!("airlock-bench-local: skipping {model_name}: {note}");
            return Ok(json!({"model": model_name, "status": "skipped", "note": note}));
        }
    };
    let load_s = started.elapsed().as_secs_f64();
    let architecture = model.info().architecture.clone();
    let mut model = model;

    let mut prompt = model.tokenizer().encode(
        PROMPT_TEXT,
        EncodeOptions {
            add_special: true,
            parse_special: false,
        },
    );
    if prompt.len() < plan.prompt_tokens {
        bail!(
            "the prompt text is only {} tokens for {model_name}, fewer than {}",
            prompt.len(),
            plan.prompt_tokens
        );
    }
    prompt.truncate(plan.prompt_tokens);
    let loglik = mean_loglik(model.as_mut(), &prompt)?;
    eprintln!("airlock-bench-local: {model_name}: mean log-likelihood of the prompt {loglik:.4}");
    let most_streams = plan.streams.iter().copied().max().unwrap_or(1);
    // Every stream runs at once on its own KV cache, as with `[local] max_batch >= N`.
    let engine = Engine::start_batched(model, most_streams, most_streams);

    // Warm-up: first-touch of the weights, allocator, rayon's pool.
    finish(submit(&engine, &prompt, 8)?, Instant::now())?;

    let mut ttft_ms = Vec::new();
    for _ in 0..plan.ttft_runs {
        let start = Instant::now();
        let t = finish(submit(&engine, &prompt, 1)?, start)?;
        ttft_ms.push(t.first_token.as_secs_f64() * 1e3);
    }
    eprintln!(
        "airlock-bench-local: {model_name}: TTFT runs (ms) {ttft_ms:.1?}; decoding {} tokens",
        plan.decode_tokens
    );

    let mut decode_rates = Vec::new();
    let mut decode_tokens = Vec::new();
    for _ in 0..plan.decode_runs {
        let start = Instant::now();
        let t = finish(submit(&engine, &prompt, plan.decode_tokens)?, start)?;
        let span = (t.done - t.first_token).as_secs_f64();
        if t.tokens > 1 && span > 0.0 {
            decode_rates.push((t.tokens - 1) as f64 / span);
        }
        decode_tokens.push(t.tokens);
    }

    let mut streams = Vec::new();
    for &n in &plan.streams {
        let start = Instant::now();
        let receivers = (0..n)
            .map(|_| submit(&engine, &prompt, plan.stream_tokens))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // One thread a request, so every event is timed when it arrives (draining
        // the requests one after the other would time the later ones' buffered
        // first tokens late).
        let timelines = std::thread::scope(|scope| {
            let waits: Vec<_> = receivers
                .into_iter()
                .map(|rx| scope.spawn(move || finish(rx, start)))
                .collect();
            waits
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| bail!("a stream's thread panicked"))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let mut tokens = 0;
        let mut after_first = 0;
        let mut first_token_ms = Vec::new();
        let mut first_first = Duration::MAX;
        let mut last_done = Duration::ZERO;
        for t in timelines {
            tokens += t.tokens;
            after_first += t.tokens.saturating_sub(1);
            first_token_ms.push(t.first_token.as_secs_f64() * 1e3);
            first_first = first_first.min(t.first_token);
            last_done = last_done.max(t.done);
        }
        let wall_s = last_done.as_secs_f64();
        let rate = if wall_s > 0.0 {
            tokens as f64 / wall_s
        } else {
            0.0
        };
        // Decode only: the tokens after each stream's first one, over the time from
        // the first stream's first token to the last stream's end.
        let decode_s = last_done.saturating_sub(first_first).as_secs_f64();
        let decode_rate = if decode_s > 0.0 {
            after_first as f64 / decode_s
        } else {
            0.0
        };
        eprintln!("airlock-bench-local: {model_name}: {n} streams: {tokens} tokens in {wall_s:.2} s = {rate:.1} tok/s; decode only {after_first} tokens in {decode_s:.2} s = {decode_rate:.1} tok/s");
        streams.push(json!({
            "n": n,
            "tokens": tokens,
            "wall_s": wall_s,
            "tokens_per_s": rate,
            "decode_tokens": after_first,
            "decode_s": decode_s,
            "decode_tokens_per_s": decode_rate,
            "first_token_ms": first_token_ms,
        }));
    }

    Ok(json!({
        "model": model_name,
        "status": "ok",
        "architecture": architecture,
        "load_s": load_s,
        "prompt_tokens": prompt.len(),
        "prompt_mean_loglik": loglik,
        "ttft_ms_runs": ttft_ms,
        "ttft_ms_median": median(&ttft_ms),
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s_runs": decode_rates,
        "decode_tokens_per_s": median(&decode_rates),
        "streams": streams,
    }))
}

/// The model's mean log-probability per token of `ids[1..]` (natural log), each token
/// scored from the logits after the ones before it: the figure `baseline.py` computes
/// for llama.cpp, so the table shows both engines compute the same model.
fn mean_loglik(
    model: &mut dyn airlock_runtime::models::LanguageModel,
    ids: &[u32],
) -> anyhow::Result<f64> {
    model.reset();
    let mut total = 0f64;
    for (i, pair) in ids.windows(2).enumerate() {
        let logits = model.forward(&pair[..1], i)?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let max = f64::from(max);
        let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
        let picked = logits
            .get(pair[1] as usize)
            .context("a prompt token outside the vocabulary")?;
        total += f64::from(*picked) - max - sum.ln();
    }
    model.reset();
    Ok(total / ids.len().saturating_sub(1).max(1) as f64)
}

fn submit(
    engine: &Engine,
    prompt: &[u32],
    max_tokens: usize,
) -> anyhow::Result<UnboundedReceiver<Event>> {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    };
    engine
        .submit(GenerateRequest {
            prompt_tokens: prompt.to_vec(),
            params,
        })
        .context("submit")
}

/// Waits for the request to end; times are from `start`.
fn finish(mut rx: UnboundedReceiver<Event>, start: Instant) -> anyhow::Result<Timeline> {
    let mut first_token = None;
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { .. } => {
                first_token.get_or_insert_with(|| start.elapsed());
            }
            Event::Done {
                completion_tokens, ..
            } => {
                let done = start.elapsed();
                return Ok(Timeline {
                    first_token: first_token.unwrap_or(done),
                    done,
                    tokens: completion_tokens,
                });
            }
            Event::Error(message) => bail!("generation failed: {message}"),
        }
    }
    bail!("the engine dropped the request without a Done event")
}
