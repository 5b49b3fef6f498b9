//! Our quantized matmul (`airlock_models::kernels::QWeight::matmul`) beside candle's
//! `QMatMul` on the same weights, for one activation row (decode), eight (batched
//! decode) and 64 (a prefill chunk), on the served models' matrices (rows x cols =
//! outputs x inputs): SmolLM2-135M's 576x576, 192x576, 1536x576 and 576x1536 in Q8_0
//! and Q4_1, Gemma 3 270M's 1024x640, 2048x640 (Q5_0, Q8_0), 640x1024 and 640x2048
//! (Q4_K, Q6_K). Throughput is in multiply-adds. Both sides use rayon's / candle's
//! threads, which both follow `RAYON_NUM_THREADS` (run with `RAYON_NUM_THREADS=1` to
//! compare single-threaded kernels); random weights, fixed seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a broken fixture should stop it

use std::hint::black_box;
use std::time::Duration;

use airlock_models::kernels::QWeight;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn values(n: usize, mut seed: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn matmul(c: &mut Criterion) {
    let mut cases = Vec::new();
    for (rows, cols) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        cases.push((rows, cols, GgmlDType::Q8_0));
        cases.push((rows, cols, GgmlDType::Q4_1));
    }
    for (rows, cols) in [(1024, 640), (2048, 640)] {
        cases.push((rows, cols, GgmlDType::Q5_0));
        cases.push((rows, cols, GgmlDType::Q8_0));
    }
    for (rows, cols) in [(640, 1024), (640, 2048)] {
        cases.push((rows, cols, GgmlDType::Q4K));
        cases.push((rows, cols, GgmlDType::Q6K));
    }
    let mut group = c.benchmark_group("matmul");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (rows, cols, dtype) in cases {
        let w = values(rows * cols, 0x1234_5678);
        let ours = QWeight::from_f32(&w, rows, cols, dtype).unwrap();
        let wt = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
        let theirs = QMatMul::from_qtensor(QTensor::quantize(&wt, dtype).unwrap()).unwrap();
        for m in [1usize, 8, 64] {
            let x = values(m * cols, 0x9876_5432 + m as u64);
            let xt = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
            let mut out = vec![0f32; m * rows];
            let label = format!("{dtype:?} {rows}x{cols} m={m}");
            group.throughput(Throughput::Elements((rows * cols * m) as u64));
            group.bench_function(BenchmarkId::new("airlock", &label), |b| {
                b.iter(|| ours.matmul(black_box(&x), m, &mut out))
            });
            group.bench_function(BenchmarkId::new("candle", &label), |b| {
                b.iter(|| theirs.forward(black_box(&xt)).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
