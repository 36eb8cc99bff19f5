//! Forward cost of `peft_core::Linear` against `candle_nn::Linear`, and the
//! cost of resolving targets on a model with 10,000 linear layers.
//!
//! Run with `cargo bench -p peft-core --bench linear`; the results and the
//! targets they are checked against are in `docs/PERFORMANCE.md`.
//!
//! Criterion groups `linear_1024x1024` and `linear_4096x4096` (`in x out`, f32,
//! CPU, input `[1, 256, in]`), each with four cases:
//! - `candle_nn`: `candle_nn::Linear`, the reference;
//! - `peft_no_adapter`: `peft_core::Linear` with no adapter;
//! - `peft_lora_unmerged/r16`: a LoRA adapter, r = 16, attached and not merged;
//! - `peft_lora_merged/r16`: the same adapter merged into the base weight.
//!
//! All four share the same base weight and bias; LoRA's `A` and `B` are random
//! and non-zero, so the adapter path does real work. Group
//! `targeted_modules_10000_layers` resolves targets on a derived model with
//! 10,000 linear layers plus an output head.
//!
//! After the criterion groups, `paired_ratios` times the four forward cases
//! round-robin and prints the median per-round ratio against `candle_nn`: on a
//! small shared machine this is much less sensitive to drifts in speed than
//! comparing medians measured one after the other. Set `PEFT_BENCH_BREAKDOWN=1`
//! to also print where the unmerged LoRA time goes (`lora_breakdown`).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor, Var};
use criterion::{black_box, criterion_group, BenchmarkId, Criterion, SamplingMode, Throughput};
use peft_core::prelude::*;
use peft_core::LoraAdapter;

/// Tokens per forward pass (batch 1, sequence 256).
const TOKENS: usize = 256;
/// LoRA rank.
const RANK: usize = 16;
/// `lora_alpha / r` with `lora_alpha = 32`.
const SCALE: f64 = 2.0;

struct Layers {
    input: Tensor,
    candle: candle_nn::Linear,
    plain: Linear,
    unmerged: Linear,
    merged: Linear,
}

fn layers(in_features: usize, out_features: usize) -> candle_core::Result<Layers> {
    let dev = Device::Cpu;
    // Scaled like a trained layer (std 1/sqrt(in)) so that outputs stay O(1).
    let std = 1.0 / (in_features as f64).sqrt();
    let weight = Tensor::randn(0f32, std as f32, (out_features, in_features), &dev)?;
    let bias = Tensor::randn(0f32, 0.1, out_features, &dev)?;
    let input = Tensor::randn(0f32, 1.0, (1, TOKENS, in_features), &dev)?;

    let candle = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
    let plain = Linear::new(weight.clone(), Some(bias.clone()));

    let a = Var::from_tensor(&Tensor::randn(0f32, std as f32, (RANK, in_features), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, (out_features, RANK), &dev)?)?;
    let mut unmerged = Linear::new(weight.clone(), Some(bias.clone()));
    unmerged
        .add_adapter("default", Box::new(LoraAdapter::new(a, b, SCALE, 0.0)?))
        .expect("fresh layer");
    let mut merged = unmerged.clone();
    merged.merge().expect("merge");
    assert!(merged.is_merged() && !unmerged.is_merged());

    let layers = Layers {
        input,
        candle,
        plain,
        unmerged,
        merged,
    };
    layers.check()?;
    Ok(layers)
}

impl Layers {
    /// Correctness sanity check (not a performance target): the plain layer
    /// is bit-identical to candle's, merged and unmerged agree, and the
    /// adapter changes the output.
    fn check(&self) -> candle_core::Result<()> {
        let reference = self.candle.forward(&self.input)?;
        let plain = self.plain.forward(&self.input)?;
        let unmerged = self.unmerged.forward(&self.input)?;
        let merged = self.merged.forward(&self.input)?;
        let max_abs = |t: &Tensor| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>();
        assert_eq!(
            max_abs(&(&reference - &plain)?)?,
            0.0,
            "no-adapter output differs from candle_nn"
        );
        let scale = max_abs(&unmerged)?;
        let merge_err = max_abs(&(&unmerged - &merged)?)?;
        assert!(
            merge_err <= 1e-4 * scale,
            "merged vs unmerged: {merge_err} (scale {scale})"
        );
        assert!(max_abs(&(&unmerged - &reference)?)? > 1e-3, "the adapter does nothing");
        Ok(())
    }
}

fn linear_forward(c: &mut Criterion) {
    for (size, sampling, measurement) in [
        (1024, SamplingMode::Auto, Duration::from_secs(3)),
        // ~0.1 s per call: flat sampling keeps 20 samples within a few seconds.
        (4096, SamplingMode::Flat, Duration::from_secs(5)),
    ] {
        let l = layers(size, size).expect("build layers");
        let mut group = c.benchmark_group(format!("linear_{size}x{size}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(measurement)
            .sampling_mode(sampling)
            .throughput(Throughput::Elements(TOKENS as u64));
        let x = &l.input;
        group.bench_function("candle_nn", |b| b.iter(|| l.candle.forward(black_box(x)).unwrap()));
        group.bench_function("peft_no_adapter", |b| b.iter(|| l.plain.forward(black_box(x)).unwrap()));
        group.bench_function(BenchmarkId::new("peft_lora_unmerged", format!("r{RANK}")), |b| {
            b.iter(|| l.unmerged.forward(black_box(x)).unwrap())
        });
        group.bench_function(BenchmarkId::new("peft_lora_merged", format!("r{RANK}")), |b| {
            b.iter(|| l.merged.forward(black_box(x)).unwrap())
        });
        group.finish();
    }
}

// ---- targeted_modules on 10,000 layers ---------------------------------------

#[derive(Adaptable)]
struct Block {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[derive(Adaptable)]
struct BigModel {
    layers: Vec<Block>,
    #[output_head]
    lm_head: Linear,
}

const BLOCKS: usize = 2_500;

fn big_model() -> BigModel {
    let dev = Device::Cpu;
    let small = || Linear::new(Tensor::zeros((2, 2), DType::F32, &dev).unwrap(), None);
    BigModel {
        layers: (0..BLOCKS)
            .map(|_| Block {
                q_proj: small(),
                k_proj: small(),
                v_proj: small(),
                o_proj: small(),
            })
            .collect(),
        lm_head: small(),
    }
}

fn targeted_modules(c: &mut Criterion) {
    let model = big_model();
    let all = all_linear();
    assert_eq!(model.targeted_modules(&all).unwrap().len(), 4 * BLOCKS);
    let q_v = modules(["q_proj", "v_proj"]);
    assert_eq!(model.targeted_modules(&q_v).unwrap().len(), 2 * BLOCKS);

    let mut group = c.benchmark_group("targeted_modules_10000_layers");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(4 * BLOCKS as u64));
    group.bench_function("all_linear", |b| {
        b.iter(|| model.targeted_modules(black_box(&all)).unwrap())
    });
    group.bench_function("modules_q_v", |b| {
        b.iter(|| model.targeted_modules(black_box(&q_v)).unwrap())
    });
    group.bench_function("linear_layers_walk", |b| b.iter(|| model.linear_layers()));
    group.finish();
}

// ---- paired (interleaved) ratios ---------------------------------------------

/// The four forward cases of one size, timed round-robin so that slow drifts
/// of the machine's speed (other processes, frequency changes) hit every case
/// alike; each round yields one ratio per case against `candle_nn` and the
/// report gives the median ratio over the rounds.
fn paired_ratios(size: usize, rounds: usize) {
    let l = layers(size, size).expect("build layers");
    let x = &l.input;
    let cases: [(&str, &dyn Fn() -> Tensor); 4] = [
        ("candle_nn", &|| l.candle.forward(black_box(x)).unwrap()),
        ("peft_no_adapter", &|| l.plain.forward(black_box(x)).unwrap()),
        ("peft_lora_unmerged/r16", &|| l.unmerged.forward(black_box(x)).unwrap()),
        ("peft_lora_merged/r16", &|| l.merged.forward(black_box(x)).unwrap()),
    ];
    // Warm up, then pick the iterations per timing so that each lasts ~25 ms.
    let start = Instant::now();
    for _ in 0..3 {
        black_box(cases[0].1());
    }
    let once = start.elapsed() / 3;
    let iters = (Duration::from_millis(25).as_nanos() / once.as_nanos().max(1)).max(1) as u32;
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    for round in 0..rounds {
        for k in 0..cases.len() {
            // Rotate the order so that no case always runs first.
            let i = (round + k) % cases.len();
            let start = Instant::now();
            for _ in 0..iters {
                black_box(cases[i].1());
            }
            times[i].push(start.elapsed().as_secs_f64() / f64::from(iters));
        }
    }
    let flop_ratio = 1.0 + (RANK * (size + size)) as f64 / (size * size) as f64;
    println!("paired_ratios/linear_{size}x{size}: {rounds} rounds x {iters} iterations per case");
    println!(
        "  flop ratio 1 + r(in+out)/(in*out) = {flop_ratio:.4}, unmerged budget 1.15 x that = {:.4}",
        1.15 * flop_ratio
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        let ratios: Vec<f64> = times[i].iter().zip(&times[0]).map(|(t, base)| t / base).collect();
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        let (q1, q3) = (sorted[sorted.len() / 4], sorted[sorted.len() * 3 / 4]);
        println!(
            "  {name:<24} median {:>9.3} ms   ratio vs candle_nn: median {:.4} (IQR {q1:.4}..{q3:.4})",
            median(times[i].clone()) * 1e3,
            median(ratios),
        );
    }
}

/// Where the unmerged LoRA time goes (diagnostic, `PEFT_BENCH_BREAKDOWN=1`):
/// each candle op of the adapter path timed alone, the whole unmerged forward
/// against the same ops written out by hand, and a fused alternative.
fn lora_breakdown(size: usize, rounds: usize) {
    let l = layers(size, size).expect("build layers");
    let x = &l.input;
    let lora = l.unmerged.adapter("default").expect("attached");
    let (a, b) = {
        let vars = lora.trainable_vars();
        (vars[0].1.as_tensor().clone(), vars[1].1.as_tensor().clone())
    };
    let down_layer = candle_nn::Linear::new(a, None);
    let up_layer = candle_nn::Linear::new(b, None);
    let base = l.candle.forward(x).unwrap();
    let down = down_layer.forward(x).unwrap();
    let scaled = (&down * SCALE).unwrap();
    let up = up_layer.forward(&scaled).unwrap();
    // A possible fusion: y = [x | s x A^T] [W | B]^T + b, one gemm with k = in + r
    // instead of the up-projection gemm and the full-size add; [W | B] is cached.
    let fused = candle_nn::Linear::new(
        Tensor::cat(&[l.candle.weight(), up_layer.weight()], 1).unwrap(),
        l.candle.bias().cloned(),
    );
    // Control: the same base layer with its weight in a fresh allocation, as a
    // merged layer has.
    let copied = candle_nn::Linear::new(l.candle.weight().copy().unwrap(), l.candle.bias().cloned());
    let cases: [(&str, &dyn Fn() -> Tensor); 10] = [
        ("base (candle_nn)", &|| l.candle.forward(black_box(x)).unwrap()),
        ("down x A^T", &|| down_layer.forward(black_box(x)).unwrap()),
        ("scale", &|| (black_box(&down) * SCALE).unwrap()),
        ("up (s x A^T) B^T", &|| up_layer.forward(black_box(&scaled)).unwrap()),
        ("add base + up", &|| (black_box(&base) + &up).unwrap()),
        ("unmerged forward", &|| l.unmerged.forward(black_box(x)).unwrap()),
        ("same ops by hand", &|| {
            let y = l.candle.forward(black_box(x)).unwrap();
            let d = down_layer.forward(x).unwrap();
            let u = up_layer.forward(&(d * SCALE).unwrap()).unwrap();
            (y + u).unwrap()
        }),
        ("fused alternative", &|| {
            let d = (down_layer.forward(black_box(x)).unwrap() * SCALE).unwrap();
            fused.forward(&Tensor::cat(&[x, &d], 2).unwrap()).unwrap()
        }),
        ("merged forward", &|| l.merged.forward(black_box(x)).unwrap()),
        ("base, copied W", &|| copied.forward(black_box(x)).unwrap()),
    ];
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    for round in 0..rounds {
        for k in 0..cases.len() {
            let i = (round + k) % cases.len();
            let start = Instant::now();
            for _ in 0..10 {
                black_box(cases[i].1());
            }
            times[i].push(start.elapsed().as_secs_f64() / 10.0);
        }
    }
    println!("lora_breakdown/linear_{size}x{size}: {rounds} rounds x 10 iterations, median per call");
    for (i, (name, _)) in cases.iter().enumerate() {
        println!("  {name:<18} {:>10.1} us", median(times[i].clone()) * 1e6);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

criterion_group!(benches, linear_forward, targeted_modules);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    benches();
    // `cargo test --benches` runs this binary without `--bench`: the extra
    // reports run only under `cargo bench`, and only when no filter excludes them.
    if args.iter().any(|a| a == "--bench") {
        let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
        if filters.is_empty() || filters.iter().any(|f| "paired_ratios".contains(f.as_str())) {
            paired_ratios(512, 40);
            paired_ratios(1024, 40);
            paired_ratios(4096, 30);
        }
        if std::env::var_os("PEFT_BENCH_BREAKDOWN").is_some() {
            lora_breakdown(1024, 30);
        }
    }
    Criterion::default().configure_from_args().final_summary();
}
