//! `airlock-bench-local`: the local inference benchmark's Airlock side, driven by
//! `scripts/bench-local.sh` (which runs the llama.cpp and sentence-transformers
//! baselines, `benches/local/baseline.py`, in the same run with the same threads).
//!
//! ```text
//! airlock-bench-local --threads T [--gguf FILE]... [--embedding DIR] [--quick] [--json OUT]
//! ```
//!
//! For each GGUF file, through `airlock_runtime::Engine` (greedy, one engine thread):
//! time to first token of a 256-token prompt, decode tokens/s of one stream, aggregate
//! tokens/s of N streams submitted at once (over the whole wall time, prefills
//! included, and decode only: tokens after each stream's first over the time from the
//! first stream's first token to the last stream's end). For the embedding folder: embeddings/s at
//! batch 1 and batch 32. What is measured, and how many times, is `data/plan.json`,
//! shared with the Python baseline; the prompt text and the sentences are `data/`.
//!
//! Threads: our kernels (and candle's, for MiniLM) run on rayon's global pool, sized by
//! `RAYON_NUM_THREADS`; it is set to `--threads` before any model work (or must
//! already equal it). A model that does not load (e.g. an architecture not served yet)
//! is reported as skipped, not as a failure of the run.

mod chat;
mod embed;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Parser;
use serde::Deserialize;
use serde_json::{json, Value};

/// The long English text prompts are cut from.
pub const PROMPT_TEXT: &str = include_str!("../data/prompt.txt");
/// One sentence a line, typical of what is sent for embedding.
pub const SENTENCES: &str = include_str!("../data/sentences.txt");
const PLANS: &str = include_str!("../data/plan.json");

#[derive(Debug, Parser)]
#[command(
    name = "airlock-bench-local",
    about = "Airlock local inference benchmark"
)]
struct Cli {
    /// CPU threads for candle (RAYON_NUM_THREADS).
    #[arg(long)]
    threads: usize,
    /// A GGUF chat model to measure (repeatable).
    #[arg(long)]
    gguf: Vec<PathBuf>,
    /// A sentence-transformers folder to measure (e.g. all-MiniLM-L6-v2).
    #[arg(long)]
    embedding: Option<PathBuf>,
    /// Fewer runs and tokens (the "quick" plan).
    #[arg(long)]
    quick: bool,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A label stored in the JSON (e.g. the git commit).
    #[arg(long)]
    label: Option<String>,
}

/// What to measure and how often; the same file drives the Python baseline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub prompt_tokens: usize,
    pub ttft_runs: usize,
    pub decode_tokens: usize,
    pub decode_runs: usize,
    pub streams: Vec<usize>,
    pub stream_tokens: usize,
    pub embed_sentences: usize,
    pub batch1_passes: usize,
    pub batch32_passes: usize,
}

fn plan(name: &str) -> anyhow::Result<Plan> {
    let mut plans: std::collections::HashMap<String, Plan> =
        serde_json::from_str(PLANS).context("data/plan.json")?;
    plans
        .remove(name)
        .with_context(|| format!("data/plan.json has no plan `{name}`"))
}

fn set_threads(threads: usize) -> anyhow::Result<()> {
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    match std::env::var("RAYON_NUM_THREADS") {
        Ok(v) if v.trim() == threads.to_string() => {}
        Ok(v) => bail!("RAYON_NUM_THREADS={v} but --threads {threads}; make them agree"),
        // Nothing has touched rayon's global pool yet, so this sizes it.
        Err(_) => std::env::set_var("RAYON_NUM_THREADS", threads.to_string()),
    }
    let candle = candle_core::utils::get_num_threads();
    if candle != threads {
        bail!("candle would use {candle} threads, not {threads}");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-bench-local: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    set_threads(cli.threads)?;
    let plan_name = if cli.quick { "quick" } else { "full" };
    let plan = plan(plan_name)?;
    eprintln!(
        "airlock-bench-local: RAYON_NUM_THREADS={} (candle threads {}), plan {plan_name}",
        cli.threads,
        candle_core::utils::get_num_threads()
    );

    let started = Instant::now();
    let load_average_before = load_average();
    let mut chat = Vec::new();
    for path in &cli.gguf {
        chat.push(chat::bench(path, &plan)?);
    }
    let embedding = match &cli.embedding {
        Some(dir) => embed::bench(dir, &plan)?,
        None => Value::Null,
    };

    let wall_s = started.elapsed().as_secs_f64();
    let out = json!({
        "engine": "airlock",
        "load_average_before": load_average_before,
        "load_average_after": load_average(),
        "wall_s": wall_s,
        "cpu_s": process_cpu_seconds(),
        "label": cli.label,
        "threads": cli.threads,
        "rayon_num_threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "candle_threads": candle_core::utils::get_num_threads(),
        "load_options": "default (GGUF chat models on airlock-models' decoder and kernels, F16 KV cache)",
        "plan_name": plan_name,
        "chat": chat,
        "embedding": embedding,
    });
    print_table(&out);
    if let Some(path) = &cli.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| path.display().to_string())?;
        eprintln!("airlock-bench-local: wrote {}", path.display());
    }
    Ok(())
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures (Linux), to judge how busy the machine was.
pub fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// User + system CPU seconds of this process so far (Linux; clock ticks of 1/100 s).
/// Over the wall time and the thread count, it says how much of its cores the run got.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A human table of this side alone (the comparison is `benches/local/table.py`).
fn print_table(out: &Value) {
    println!("| model | measure | airlock |");
    println!("|---|---|--:|");
    for m in out["chat"].as_array().into_iter().flatten() {
        let name = m["model"].as_str().unwrap_or("?");
        if m["status"] != "ok" {
            println!(
                "| {name} | skipped | {} |",
                m["note"].as_str().unwrap_or("")
            );
            continue;
        }
        println!(
            "| {name} | load s | {:.2} |",
            m["load_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| {name} | TTFT ms ({} prompt tokens, median) | {:.1} |",
            m["prompt_tokens"],
            m["ttft_ms_median"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| {name} | decode tok/s (1 stream) | {:.1} |",
            m["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
        for s in m["streams"].as_array().into_iter().flatten() {
            println!(
                "| {name} | aggregate tok/s, {} streams | {:.1} |",
                s["n"],
                s["tokens_per_s"].as_f64().unwrap_or(0.0)
            );
        }
        for s in m["streams"].as_array().into_iter().flatten() {
            println!(
                "| {name} | aggregate decode-only tok/s, {} streams | {:.1} |",
                s["n"],
                s["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let e = &out["embedding"];
    if !e.is_null() {
        let name = e["model"].as_str().unwrap_or("?");
        for b in ["batch1", "batch32"] {
            println!(
                "| {name} | embeddings/s, {b} | {:.1} |",
                e[format!("{b}_per_s")].as_f64().unwrap_or(0.0)
            );
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_data_is_long_enough() {
        for name in ["full", "quick"] {
            let p = plan(name).unwrap();
            assert!(p.embed_sentences <= SENTENCES.lines().count());
            assert!(p.streams.iter().all(|&n| n >= 1));
        }
        // 256 tokens of English need about 190 words; the text has more than twice that.
        assert!(PROMPT_TEXT.split_whitespace().count() > 400);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
