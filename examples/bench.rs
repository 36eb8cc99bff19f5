//! Throughput of a Llama-shaped model with LoRA on every linear layer: the
//! figures docs/PERFORMANCE.md compares with PyTorch + PEFT
//! (`benches/pytorch_peft.py` prints the same ones).
//!
//! ```text
//! cargo run --release --example bench
//! cargo run --release --example bench -- --hidden 512 --layers 4 --intermediate 1408 --vocab 4096 \
//!     --heads 8 --batch 4 --seq 128 --rank 16 --steps 5 --threads 2 --dtype f32 --tuned yes
//! ```
//!
//! `--profile` adds where a training step's time goes: each fused op's time
//! in the forward and backward passes (`peft_core::profile`), what is left
//! for candle's ops and autograd, and every matrix product the step runs,
//! timed alone on the same shapes with the product kernels the fused ops
//! use (the roof; candle's `matmul` beside it), against the measured step.
//!
//! `--tuned yes` (the default) applies the two runtime settings of
//! `peft_models::train::tune_runtime`; `--tuned no` measures with glibc's and candle's defaults.
//!
//! Prints tokens/s of the forward pass (base, LoRA unmerged, LoRA merged) and
//! of a training step (forward, backward, AdamW on the adapters), the time of
//! `apply_lora`, `save_adapter` and `load_adapter`, and the peak resident
//! memory. Weights are random (no download); the model is
//! `peft_models::llama`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_models::llama::{Config, LlamaForCausalLM};
use peft_models::train::optim::{AdamW, AdamWParams};

struct Args {
    hidden: usize,
    layers: usize,
    intermediate: usize,
    vocab: usize,
    heads: usize,
    batch: usize,
    seq: usize,
    rank: usize,
    steps: usize,
    threads: Option<usize>,
    dtype: DType,
    /// Runtime settings for training on the CPU (`peft_models::train::tune_runtime`).
    tuned: bool,
    /// Print where a step goes: each fused op, and the products against their roof.
    profile: bool,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        hidden: 512,
        layers: 4,
        intermediate: 1408,
        vocab: 4096,
        heads: 8,
        batch: 4,
        seq: 128,
        rank: 16,
        steps: 5,
        threads: None,
        dtype: DType::F32,
        tuned: true,
        profile: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--profile" {
            args.profile = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--hidden" => args.hidden = value.parse()?,
            "--layers" => args.layers = value.parse()?,
            "--intermediate" => args.intermediate = value.parse()?,
            "--vocab" => args.vocab = value.parse()?,
            "--heads" => args.heads = value.parse()?,
            "--batch" => args.batch = value.parse()?,
            "--seq" => args.seq = value.parse()?,
            "--rank" => args.rank = value.parse()?,
            "--steps" => args.steps = value.parse()?,
            "--threads" => args.threads = Some(value.parse()?),
            "--tuned" => {
                args.tuned = match value.as_str() {
                    "yes" => true,
                    "no" => false,
                    other => return Err(format!("--tuned takes yes or no, not {other}").into()),
                }
            }
            "--dtype" => {
                args.dtype = match value.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => return Err(format!("unknown dtype {other} (f32, f16, bf16)").into()),
                }
            }
            other => return Err(format!("unknown flag {other}; see the top of examples/bench.rs").into()),
        }
    }
    Ok(args)
}

/// A model with random base weights that are plain tensors (frozen), as if
/// loaded from a checkpoint.
fn random_model(cfg: &Config, dtype: DType, device: &Device) -> candle_core::Result<LlamaForCausalLM> {
    let varmap = VarMap::new();
    LlamaForCausalLM::load(VarBuilder::from_varmap(&varmap, dtype, device), cfg)?;
    let tensors = varmap
        .data()
        .lock()
        .expect("no other thread holds the var map")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
        .collect();
    LlamaForCausalLM::load(VarBuilder::from_tensors(tensors, dtype, device), cfg)
}

/// Runs `f` once to warm up, then `steps` times; returns the mean time.
fn time<T>(steps: usize, mut f: impl FnMut() -> candle_core::Result<T>) -> candle_core::Result<Duration> {
    f()?;
    let started = Instant::now();
    for _ in 0..steps {
        std::hint::black_box(f()?);
    }
    Ok(started.elapsed() / steps as u32)
}

/// The middle value of `times` (the upper one of an even count).
fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The global allocator, counting live heap bytes and their peak so that the
/// bench can say what one operation allocates. (Resident memory cannot: the
/// allocator reuses memory freed by earlier work without asking the kernel.)
struct CountingAllocator;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters are only arithmetic on the side.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MIB: f64 = 1024.0 * 1024.0;

/// Runs `f` and returns its result, its time and the most heap memory it
/// held above what was live when it started, in MiB.
fn time_and_heap<T>(f: impl FnOnce() -> T) -> (T, Duration, f64) {
    let start = LIVE_BYTES.load(Ordering::Relaxed);
    PEAK_BYTES.store(start, Ordering::Relaxed);
    let started = Instant::now();
    let out = f();
    let elapsed = started.elapsed();
    let rise = PEAK_BYTES.load(Ordering::Relaxed).saturating_sub(start);
    (out, elapsed, rise as f64 / MIB)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let runtime = if args.tuned {
        peft_models::train::tune_runtime().join(", ")
    } else {
        "defaults".to_owned()
    };
    if let Some(threads) = args.threads {
        // Read by candle's CPU kernels; set before any of them runs.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let device = Device::Cpu;
    let cfg: Config = serde_json::from_value(serde_json::json!({
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "rms_norm_eps": 1e-6,
    }))?;
    let tokens = args.batch * args.seq;
    let per_s = |d: Duration| tokens as f64 / d.as_secs_f64();
    println!(
        "Llama-shaped: hidden {}, layers {}, intermediate {}, vocab {}, heads {}; batch {} x {} tokens; r = {}; {:?}; {} threads",
        args.hidden,
        args.layers,
        args.intermediate,
        args.vocab,
        args.heads,
        args.batch,
        args.seq,
        args.rank,
        args.dtype,
        args.threads.map_or_else(|| "default".to_owned(), |t| t.to_string())
    );
    println!("runtime: {runtime}");

    let ids: Vec<u32> = (0..tokens).map(|i| ((i * 7919) % args.vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.seq), &device)?;
    let (inputs, targets) = (ids.narrow(1, 0, args.seq - 1)?, ids.narrow(1, 1, args.seq - 1)?);

    let mut model = random_model(&cfg, args.dtype, &device)?;
    let base = time(args.steps, || model.forward(&ids))?;
    println!("forward, base:           {:>9.0} tokens/s", per_s(base));

    let (applied, apply, apply_heap) = time_and_heap(|| {
        model.apply_lora(
            LoraConfig::from(all_linear())
                .rank(args.rank)
                .alpha(2.0 * args.rank as f64),
        )
    });
    applied?;
    println!(
        "apply_lora:              {apply:>9.2?} ({} modules; heap {apply_heap:+.1} MiB)",
        model.adapted_modules().len()
    );
    println!("{}", model.num_parameters());

    let unmerged = time(args.steps, || model.forward(&ids))?;
    println!(
        "forward, LoRA unmerged:  {:>9.0} tokens/s ({:.3}x the base time)",
        per_s(unmerged),
        unmerged.as_secs_f64() / base.as_secs_f64()
    );

    model.set_training(true);
    // The optimizer `peft train` uses: candle-nn's AdamW, bit for bit, fused on the CPU.
    let mut optimizer = AdamW::new(model.named_trainable_vars(), AdamWParams::default())?;
    // Each phase timed on its own, so the figures show where a step goes.
    let (mut forward, mut backward, mut update) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut train_step = |forward: &mut Duration, backward: &mut Duration, update: &mut Duration| {
        let started = Instant::now();
        let logits = model.forward(&inputs)?;
        let loss = peft_core::ops::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?;
        let forward_done = Instant::now();
        let grads = loss.backward()?;
        let backward_done = Instant::now();
        optimizer.step(&grads)?;
        *forward += forward_done - started;
        *backward += backward_done - forward_done;
        *update += backward_done.elapsed();
        candle_core::Result::Ok(())
    };
    let step = time(args.steps, || train_step(&mut forward, &mut backward, &mut update))?;
    let phase = |d: Duration| d.as_secs_f64() * 1e3 / (args.steps + 1) as f64;
    println!(
        "training step:           {:>9.0} tokens/s (forward {:.0} ms, backward {:.0} ms, AdamW {:.1} ms)",
        per_s(step),
        phase(forward),
        phase(backward),
        phase(update)
    );
    if let Some(peak) = peak_rss_mib() {
        println!("peak resident memory:    {peak:>9.1} MiB (through training)");
    }
    if args.profile {
        // A few more steps with the fused ops timing themselves (after the
        // figures above, which are taken without it).
        let steps = args.steps.max(3);
        let mut phases = [Duration::ZERO; 3];
        peft_core::profile::set_enabled(true);
        for _ in 0..steps {
            let [forward, backward, update] = &mut phases;
            train_step(forward, backward, update)?;
        }
        peft_core::profile::set_enabled(false);
        print_op_times(&peft_core::profile::take(), steps, phases);
        profile_step(&args, &cfg, step, [phase(forward), phase(backward), phase(update)])?;
    }

    let (merged, merge_time, merge_heap) = time_and_heap(|| model.merge());
    merged?;
    let largest = args.hidden * args.intermediate.max(args.hidden);
    println!(
        "merge:                   {merge_time:>9.2?} (heap {merge_heap:+.1} MiB at most; the largest adapted weight is {:.1} MiB)",
        (largest * args.dtype.size_in_bytes()) as f64 / MIB
    );
    let merged = time(args.steps, || model.forward(&ids))?;
    println!(
        "forward, LoRA merged:    {:>9.0} tokens/s ({:.3}x the base time)",
        per_s(merged),
        merged.as_secs_f64() / base.as_secs_f64()
    );
    let (unmerged_result, unmerge_time, unmerge_heap) = time_and_heap(|| model.unmerge());
    unmerged_result?;
    println!("unmerge:                 {unmerge_time:>9.2?} (heap {unmerge_heap:+.1} MiB at most)");
    // One merge is a few milliseconds: the median of several pairs is the
    // figure to compare.
    let (mut merges, mut unmerges) = (Vec::new(), Vec::new());
    for _ in 0..args.steps.max(5) {
        let started = Instant::now();
        model.merge()?;
        merges.push(started.elapsed());
        let started = Instant::now();
        model.unmerge()?;
        unmerges.push(started.elapsed());
    }
    println!(
        "merge, unmerge (median): {:>9.2?} {:.2?} ({} pairs)",
        median(&mut merges),
        median(&mut unmerges),
        merges.len()
    );

    let dir = std::env::temp_dir().join("peft-bench-adapter");
    let started = Instant::now();
    model.save_adapter(&dir, "default")?;
    let save = started.elapsed();
    let mut fresh = random_model(&cfg, args.dtype, &device)?;
    let started = Instant::now();
    fresh.load_adapter(&dir, "default")?;
    println!("save_adapter:            {save:>9.2?}");
    println!("load_adapter:            {:>9.2?}", started.elapsed());
    Ok(())
}

/// Prints each fused op's share of the forward and backward passes, per
/// step, and what is left for candle's own ops and autograd.
fn print_op_times(times: &[peft_core::profile::OpTime], steps: usize, phases: [Duration; 3]) {
    use peft_core::profile::Pass;
    let per_step = |seconds: f64| seconds * 1e3 / steps as f64;
    println!("profile: the fused ops' own time per step ({steps} steps), by pass");
    for (pass, name, total) in [
        (Pass::Forward, "forward", phases[0]),
        (Pass::Backward, "backward", phases[1]),
    ] {
        let total = per_step(total.as_secs_f64());
        println!("  {name}: {total:.1} ms");
        let mut ops: Vec<_> = times.iter().filter(|t| t.pass == pass).collect();
        ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        let mut timed = 0.0;
        for op in ops {
            let ms = per_step(op.seconds);
            timed += ms;
            println!(
                "    {:<26} {:>7.1} ms {:>5.1}% ({} calls)",
                op.op,
                ms,
                100.0 * ms / total,
                op.calls / steps as u64
            );
        }
        let rest = if pass == Pass::Forward {
            "candle's ops (embedding, residual adds, reshapes)"
        } else {
            "candle's autograd between the ops, candle ops' backward"
        };
        println!(
            "    {:<26} {:>7.1} ms {:>5.1}% ({rest})",
            "the rest",
            total - timed,
            100.0 * (total - timed) / total
        );
    }
    println!("  AdamW: {:.1} ms", per_step(phases[2].as_secs_f64()));
}

/// One kind of matrix product of a training step: `[m, k] x [k, n]`, `count` times.
struct Product {
    what: &'static str,
    m: usize,
    k: usize,
    n: usize,
    count: usize,
}

impl Product {
    fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n * self.count) as f64
    }
}

/// Every matrix product of one training step of the bench's model, by what
/// computes it (`peft_models::llama` with LoRA on its seven linear layers per
/// block, the head frozen, fused kernels: no weight gradient for frozen layers).
fn step_products(args: &Args, cfg: &Config) -> Vec<Product> {
    let t = args.batch * (args.seq - 1);
    let (h, inter, r, layers) = (args.hidden, args.intermediate, args.rank, args.layers);
    let kv = cfg.num_key_value_heads() * cfg.head_dim();
    let mut products = Vec::new();
    let mut add = |what, m, k, n, count| products.push(Product { what, m, k, n, count });
    // (in, out) of q, k, v, o, gate, up, down.
    for (input, output) in [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)] {
        add("frozen x Wt (forward)", t, input, output, layers);
        add("input gradient g W (backward)", t, output, input, layers);
        add("adapter x At (forward)", t, input, r, layers);
        add("adapter (x At) Bt (forward)", t, r, output, layers);
        add("adapter u = g B (backward)", t, output, r, layers);
        add("adapter u A (backward)", t, r, input, layers);
        add("adapter dA = ut x (backward)", r, t, input, layers);
        add("adapter dB = gt (x At) (backward)", output, t, r, layers);
    }
    add("head x Wt (forward)", t, h, args.vocab, 1);
    add("head g W (backward)", t, args.vocab, h, 1);
    // Per sequence and head: scores and values forward; scores again, dP, dV, dQ, dK backward.
    let (s, d, heads) = (args.seq - 1, cfg.head_dim(), args.batch * args.heads * layers);
    add("attention q kt (forward, and again backward)", s, d, s, 2 * heads);
    add("attention p v (forward)", s, s, d, heads);
    add("attention dP = dO vt (backward)", s, d, s, heads);
    add("attention dV, dQ, dK (backward)", s, s, d, 3 * heads);
    // One row per distinct product (q and o, k and v share their shapes).
    let mut distinct: Vec<Product> = Vec::new();
    for p in products {
        match distinct
            .iter_mut()
            .find(|d| (d.what, d.m, d.k, d.n) == (p.what, p.m, p.k, p.n))
        {
            Some(same) => same.count += p.count,
            None => distinct.push(p),
        }
    }
    distinct
}

/// Median seconds of `product(a, b)` for `[m, k] x [k, n]` f32, run for at
/// least 30 ms.
fn time_product(
    m: usize,
    k: usize,
    n: usize,
    product: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
    product(&a, &b)?;
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || started.elapsed() < Duration::from_millis(30) {
        let one = Instant::now();
        std::hint::black_box(product(&a, &b)?);
        times.push(one.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Prints the step's matrix products, each timed alone with `gemm` (the
/// roof), and how close the measured step comes to that roof.
fn profile_step(args: &Args, cfg: &Config, step: Duration, phases_ms: [f64; 3]) -> candle_core::Result<()> {
    let products = step_products(args, cfg);
    println!(
        "profile: the step's matrix products, each timed alone with the fused ops' product kernels \
         (peft_core::fused::matmul: the roof) and with candle's matmul"
    );
    println!(
        "  {:<44} {:>17} {:>6} {:>8} {:>8} {:>8} {:>9}",
        "product", "m x k x n", "count", "GFLOP", "roof ms", "GFLOP/s", "candle ms"
    );
    let (mut flops, mut roof, mut candle) = (0.0, 0.0, 0.0);
    let mut by_kind: Vec<(&str, f64, f64)> = Vec::new();
    for p in &products {
        let seconds = time_product(p.m, p.k, p.n, peft_core::fused::matmul)? * p.count as f64;
        let candle_seconds = time_product(p.m, p.k, p.n, |a, b| a.matmul(b))? * p.count as f64;
        flops += p.flops();
        roof += seconds;
        candle += candle_seconds;
        println!(
            "  {:<44} {:>17} {:>6} {:>8.3} {:>8.2} {:>8.1} {:>9.2}",
            p.what,
            format!("{}x{}x{}", p.m, p.k, p.n),
            p.count,
            p.flops() / 1e9,
            seconds * 1e3,
            p.flops() / seconds / 1e9,
            candle_seconds * 1e3
        );
        let kind = p.what.split(' ').next().unwrap_or(p.what);
        match by_kind.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(entry) => {
                entry.1 += p.flops();
                entry.2 += seconds;
            }
            None => by_kind.push((kind, p.flops(), seconds)),
        }
    }
    for (kind, kind_flops, seconds) in by_kind {
        println!(
            "  {kind:<10} {:>7.2} GFLOP in {:>6.1} ms at the roof ({:.0} GFLOP/s)",
            kind_flops / 1e9,
            seconds * 1e3,
            kind_flops / seconds / 1e9
        );
    }
    let step_s = step.as_secs_f64();
    println!(
        "  step: {:.2} GFLOP of products; the product kernels alone need {:.0} ms ({:.0} GFLOP/s; candle's \
         matmul {:.0} ms), the step took {:.0} ms (forward {:.0}, backward {:.0}, AdamW {:.1}): \
         {:.0} GFLOP/s achieved, {:.2} of the roof",
        flops / 1e9,
        roof * 1e3,
        flops / roof / 1e9,
        candle * 1e3,
        step_s * 1e3,
        phases_ms[0],
        phases_ms[1],
        phases_ms[2],
        flops / step_s / 1e9,
        roof / step_s
    );
    Ok(())
}
