//! Forward (and forward + backward) cost of `peft_core::Linear` against `candle_nn::Linear`, and the
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
//! comparing medians measured one after the other. `paired_training_ratios`
//! does the same for forward + backward, as in a training step.

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
    group.bench_function("linear_layers_walk", |b| b.iter(|| model.layers()));
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
    let cases: [(&str, &dyn Fn()); 4] = [
        ("candle_nn", &|| {
            black_box(l.candle.forward(black_box(x)).unwrap());
        }),
        ("peft_no_adapter", &|| {
            black_box(l.plain.forward(black_box(x)).unwrap());
        }),
        ("peft_lora_unmerged/r16", &|| {
            black_box(l.unmerged.forward(black_box(x)).unwrap());
        }),
        ("peft_lora_merged/r16", &|| {
            black_box(l.merged.forward(black_box(x)).unwrap());
        }),
    ];
    let runs: Vec<&dyn Fn()> = cases.iter().map(|(_, f)| -> &dyn Fn() { f }).collect();
    let (iters, times) = round_robin(&runs, rounds);
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

/// Times `cases` round-robin for `rounds` rounds, rotating the order so that
/// no case always runs first; each timing repeats a case for ~25 ms (the
/// first case's warm-up time decides how often). Returns the repetitions and
/// the seconds per call, per case and round.
fn round_robin(cases: &[&dyn Fn()], rounds: usize) -> (u32, Vec<Vec<f64>>) {
    let start = Instant::now();
    for _ in 0..3 {
        cases[0]();
    }
    let once = start.elapsed() / 3;
    let iters = (Duration::from_millis(25).as_nanos() / once.as_nanos().max(1)).max(1) as u32;
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    for round in 0..rounds {
        for k in 0..cases.len() {
            let i = (round + k) % cases.len();
            let start = Instant::now();
            for _ in 0..iters {
                cases[i]();
            }
            times[i].push(start.elapsed().as_secs_f64() / f64::from(iters));
        }
    }
    (iters, times)
}

/// Forward and backward of one layer, as in a training step (the input is a
/// `Var` standing for the activations of earlier layers; the loss is the sum
/// of the output), timed round-robin like [`paired_ratios`]:
/// - `candle_nn`: `candle_nn::Linear`, whose backward pass also computes the
///   frozen weight's gradient (candle differentiates both matmul operands);
/// - `peft_no_adapter`: the slot alone: the input gradient only;
/// - `peft_lora_unmerged/r16`: the input gradient and LoRA's two gradients.
///
/// The LoRA budget is against the slot without adapter: 1.15 x the flop ratio
/// of the forward pass, which the backward pass's products share.
fn paired_training_ratios(size: usize, rounds: usize) {
    let l = layers(size, size).expect("build layers");
    let x = Var::from_tensor(&l.input).expect("var");
    let mut training = l.unmerged.clone();
    training.set_training(true);
    let step = |forward: &dyn Fn(&Tensor) -> Tensor| {
        let grads = forward(black_box(x.as_tensor())).sum_all().unwrap().backward().unwrap();
        black_box(grads.get(&x).expect("input gradient"));
    };
    let cases: [(&str, &dyn Fn()); 3] = [
        ("candle_nn", &|| step(&|x| l.candle.forward(x).unwrap())),
        ("peft_no_adapter", &|| step(&|x| l.plain.forward(x).unwrap())),
        ("peft_lora_unmerged/r16", &|| step(&|x| training.forward(x).unwrap())),
    ];
    let runs: Vec<&dyn Fn()> = cases.iter().map(|(_, f)| -> &dyn Fn() { f }).collect();
    let (iters, times) = round_robin(&runs, rounds);
    let flop_ratio = 1.0 + (RANK * (size + size)) as f64 / (size * size) as f64;
    println!("paired_training_ratios/linear_{size}x{size}: forward + backward, {rounds} rounds x {iters} iterations");
    println!(
        "  LoRA budget 1.15 x flop ratio = {:.4} x peft_no_adapter",
        1.15 * flop_ratio
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        let ratio_to = |j: usize| {
            let ratios: Vec<f64> = times[i].iter().zip(&times[j]).map(|(t, base)| t / base).collect();
            median(ratios)
        };
        println!(
            "  {name:<24} median {:>9.3} ms   vs candle_nn {:.4}   vs peft_no_adapter {:.4}",
            median(times[i].clone()) * 1e3,
            ratio_to(0),
            ratio_to(1),
        );
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
            paired_training_ratios(512, 40);
            paired_training_ratios(1024, 40);
            paired_training_ratios(4096, 20);
        }
    }
    Criterion::default().configure_from_args().final_summary();
}
