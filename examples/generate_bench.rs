//! Loading and generation speed of a checkpoint through `peft_models`: the
//! figures docs/PERFORMANCE.md compares with transformers' `generate`
//! (`benches/transformers_generate.py` prints the same ones on the same
//! checkpoint).
//!
//! ```text
//! # A random 4-layer, 512-wide Llama checkpoint (config.json + model.safetensors)
//! cargo run --release --example generate_bench -- --write /tmp/llama512
//! # Load time, peak memory, tokens/s of greedy generation at batch 1
//! cargo run --release --example generate_bench -- --model /tmp/llama512 --new-tokens 128 --threads 2
//! # The same with the hidden linear layers quantized at load (q8_0, q4_0 or q4k)
//! cargo run --release --example generate_bench -- --model /tmp/llama512 --threads 2 --quantize q8_0
//! ```
//!
//! Generation reads every weight once per token, so its speed is bounded by
//! memory bandwidth: the bench measures the machine's read bandwidth and
//! prints the fraction of that roof reached (weight bytes per token times
//! tokens/s, over the bandwidth).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use peft_core::PeftModel;
use peft_models::generate::{generate, GenerateOptions};
use peft_models::AutoModel;

struct Args {
    write: Option<PathBuf>,
    model: Option<PathBuf>,
    hidden: usize,
    layers: usize,
    intermediate: usize,
    vocab: usize,
    heads: usize,
    prompt_len: usize,
    new_tokens: usize,
    runs: usize,
    threads: Option<usize>,
    quantize: Option<GgmlDType>,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        write: None,
        model: None,
        hidden: 512,
        layers: 4,
        intermediate: 1408,
        vocab: 32000,
        heads: 8,
        prompt_len: 16,
        new_tokens: 128,
        runs: 3,
        threads: None,
        quantize: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--write" => args.write = Some(value.into()),
            "--model" => args.model = Some(value.into()),
            "--hidden" => args.hidden = value.parse()?,
            "--layers" => args.layers = value.parse()?,
            "--intermediate" => args.intermediate = value.parse()?,
            "--vocab" => args.vocab = value.parse()?,
            "--heads" => args.heads = value.parse()?,
            "--prompt-len" => args.prompt_len = value.parse()?,
            "--new-tokens" => args.new_tokens = value.parse()?,
            "--runs" => args.runs = value.parse()?,
            "--threads" => args.threads = Some(value.parse()?),
            "--quantize" => {
                args.quantize = Some(match value.as_str() {
                    "q8_0" => GgmlDType::Q8_0,
                    "q4_0" => GgmlDType::Q4_0,
                    "q4k" => GgmlDType::Q4K,
                    other => return Err(format!("--quantize {other}: expected q8_0, q4_0 or q4k").into()),
                })
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    if args.write.is_none() == args.model.is_none() {
        return Err("give --write DIR (make a checkpoint) or --model DIR (measure one)".into());
    }
    Ok(args)
}

/// Writes a Llama checkpoint with random weights (std 0.02, norms 1), as
/// transformers would save one: `config.json` and `model.safetensors`.
fn write_checkpoint(dir: &PathBuf, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let device = Device::Cpu;
    let random = |rows: usize, cols: usize| Tensor::randn(0f32, 0.02, (rows, cols), &device);
    let ones = |n: usize| Tensor::ones(n, DType::F32, &device);
    let (h, i) = (args.hidden, args.intermediate);
    let mut tensors = HashMap::new();
    tensors.insert("model.embed_tokens.weight".to_owned(), random(args.vocab, h)?);
    tensors.insert("lm_head.weight".to_owned(), random(args.vocab, h)?);
    tensors.insert("model.norm.weight".to_owned(), ones(h)?);
    for layer in 0..args.layers {
        let prefix = format!("model.layers.{layer}");
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            tensors.insert(format!("{prefix}.self_attn.{name}.weight"), random(h, h)?);
        }
        tensors.insert(format!("{prefix}.mlp.gate_proj.weight"), random(i, h)?);
        tensors.insert(format!("{prefix}.mlp.up_proj.weight"), random(i, h)?);
        tensors.insert(format!("{prefix}.mlp.down_proj.weight"), random(h, i)?);
        tensors.insert(format!("{prefix}.input_layernorm.weight"), ones(h)?);
        tensors.insert(format!("{prefix}.post_attention_layernorm.weight"), ones(h)?);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    println!("wrote {}", dir.display());
    Ok(())
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The machine's read bandwidth in bytes/s: the best of five sums of a
/// 256 MiB buffer split over `threads` threads (far larger than any cache).
fn read_bandwidth(threads: usize) -> f64 {
    let buffer = vec![1u64; 32 << 20];
    let chunk = buffer.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().fold(0u64, |a, &b| a.wrapping_add(b))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(total);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (buffer.len() * 8) as f64 / best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    if let Some(dir) = &args.write {
        return write_checkpoint(dir, &args);
    }
    let Some(dir) = &args.model else {
        unreachable!("parse_args checks")
    };
    if let Some(threads) = args.threads {
        // Read by candle's CPU kernels; set before any of them runs.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rss_before = peak_rss_mib();
    let started = Instant::now();
    let mut model = AutoModel::from_dir(dir, DType::F32, &Device::Cpu)?;
    if let Some(dtype) = args.quantize {
        model.quantize(dtype)?;
    }
    let load = started.elapsed();
    let rss_loaded = peak_rss_mib();
    let file_bytes = std::fs::metadata(dir.join("model.safetensors"))?.len() as f64;
    // Each token reads every weight but the embedding (one row of it).
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let embedding_bytes =
        config["vocab_size"].as_f64().unwrap_or(0.0) * config["hidden_size"].as_f64().unwrap_or(0.0) * 4.0;
    // A quantized layer reads its blocks instead of its f32 weight.
    let quantized_savings: f64 = model
        .layers()
        .iter()
        .filter_map(|layer| layer.layer.quantized_weight())
        .map(|weight| (weight.shape().elem_count() * 4 - weight.size_in_bytes()) as f64)
        .sum();
    let bytes_per_token = file_bytes - embedding_bytes - quantized_savings;
    println!(
        "{} ({}{}): weights {:.1} MiB, {threads} threads",
        dir.display(),
        model.model_type(),
        args.quantize
            .map_or(String::new(), |dtype| format!(", hidden layers quantized to {dtype:?}")),
        file_bytes / 1048576.0
    );
    match (rss_before, rss_loaded) {
        (Some(before), Some(after)) => println!(
            "load: {:.3} s; peak RSS {after:.1} MiB ({:.2} x the weights; {before:.1} MiB before loading)",
            load.as_secs_f64(),
            after * 1048576.0 / file_bytes
        ),
        _ => println!("load: {:.3} s (peak RSS: no /proc on this system)", load.as_secs_f64()),
    }

    let prompt: Vec<u32> = (0..args.prompt_len as u32).map(|i| (i * 7 + 3) % 100 + 1).collect();
    let options = GenerateOptions {
        max_new_tokens: args.new_tokens,
        ..GenerateOptions::default()
    };
    // A warm-up run, then the measured ones.
    generate(
        &model,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 4,
            ..GenerateOptions::default()
        },
        |_| {},
    )?;
    let mut rates = Vec::new();
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        let generated = generate(&model, &prompt, &options, |_| {})?;
        rates.push(generated.tokens.len() as f64 / started.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let best = rates[rates.len() - 1];
    // Before the bandwidth test, whose buffer would count.
    if let Some(peak) = peak_rss_mib() {
        println!("peak RSS after generating: {peak:.1} MiB");
    }
    let bandwidth = read_bandwidth(threads);
    let roof = bandwidth / bytes_per_token;
    println!(
        "generate: prompt {} + {} new tokens, greedy, batch 1: {median:.1} tokens/s median, {best:.1} best of {}",
        args.prompt_len,
        args.new_tokens,
        rates.len()
    );
    println!(
        "roof: {:.1} MiB read per token, read bandwidth {:.1} GB/s -> {roof:.0} tokens/s; reached {:.0}%",
        bytes_per_token / 1048576.0,
        bandwidth / 1e9,
        100.0 * median / roof
    );
    Ok(())
}
