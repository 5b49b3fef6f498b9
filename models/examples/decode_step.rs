//! Times one batched decode step of a real GGUF model at several batch sizes: the
//! harness for tuning the kernels (`cargo run --release -p airlock-models --example
//! decode_step -- FILE [PROMPT_TOKENS] [STEPS] [ROWS...]`, with `RAYON_NUM_THREADS`
//! giving the threads).
//!
//! For each batch size N (default 1 2 4 8): N handles of the model each prefill the
//! same PROMPT_TOKENS (default 256) token ids, then run STEPS (default 16) greedy
//! decode steps together through `airlock_models::forward_batch` (one token per
//! handle per step). Prints the median and minimum milliseconds of a step, the
//! implied decode tokens/s (N / median step time) and the fastest of the N prefills.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness: a bad argument stops it

use std::time::Instant;

use airlock_models::LanguageModel;

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .expect("usage: decode_step FILE [PROMPT] [STEPS] [ROWS...]");
    let prompt: usize = args.get(1).map_or(256, |a| a.parse().unwrap());
    let steps: usize = args.get(2).map_or(16, |a| a.parse().unwrap());
    let mut sizes: Vec<usize> = args.iter().skip(3).map(|a| a.parse().unwrap()).collect();
    if sizes.is_empty() {
        sizes = vec![1, 2, 4, 8];
    }
    let base = airlock_models::load(path).unwrap();
    let ids: Vec<u32> = (0..prompt as u32).map(|i| 100 + (i * 37) % 2000).collect();
    for &n in &sizes {
        let mut handles: Vec<Box<dyn LanguageModel>> =
            (0..n).map(|_| base.fork().expect("fork")).collect();
        let mut next = Vec::new();
        let mut prefill_ms = Vec::new();
        for h in handles.iter_mut() {
            let t0 = Instant::now();
            let logits = h.forward(&ids, 0).unwrap();
            prefill_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            next.push(argmax(&logits));
        }
        prefill_ms.sort_by(f64::total_cmp);
        let mut times = Vec::new();
        for _ in 0..steps {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let tok_refs: Vec<&[u32]> = toks.iter().map(|t| &t[..]).collect();
            let mut refs: Vec<&mut (dyn LanguageModel + 'static)> =
                handles.iter_mut().map(|h| &mut **h).collect();
            let t0 = Instant::now();
            let out = airlock_models::forward_batch(&mut refs, &tok_refs);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            next = out.into_iter().map(|l| argmax(&l.unwrap())).collect();
        }
        let checksum: u64 = next.iter().map(|&t| u64::from(t)).sum();
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        println!(
            "rows {n}: step median {med:.2} ms, min {:.2} ms, {:.1} tok/s (tokens {checksum}); \
             prefill of {prompt} tokens: min {:.1} ms",
            times[0],
            n as f64 * 1e3 / med,
            prefill_ms[0],
        );
    }
}
