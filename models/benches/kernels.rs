//! Our quantized matmul (`airlock_models::kernels::QWeight::matmul`) beside candle's
//! `QMatMul` on the same weights, for one activation row (decode) and eight (batched
//! decode), on matrices of the served models' shapes: SmolLM2's 576x1536 (Q8_0,
//! Q4_1) and Gemma 3's 640x2048 (Q4_K, Q5_0, Q6_K). Throughput is in multiply-adds.
//! Both sides use rayon's / candle's default threads; random weights, fixed seed.

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
    let cases = [
        (576, 1536, GgmlDType::Q8_0),
        (576, 1536, GgmlDType::Q4_1),
        (640, 2048, GgmlDType::Q4K),
        (640, 2048, GgmlDType::Q5_0),
        (640, 2048, GgmlDType::Q6K),
    ];
    let mut group = c.benchmark_group("matmul");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for (rows, cols, dtype) in cases {
        let w = values(rows * cols, 0x1234_5678);
        let ours = QWeight::from_f32(&w, rows, cols, dtype).unwrap();
        let wt = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
        let theirs = QMatMul::from_qtensor(QTensor::quantize(&wt, dtype).unwrap()).unwrap();
        for m in [1usize, 8] {
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
