//! Peak memory and time of `peft merge` on a sharded checkpoint: the
//! figures docs/PERFORMANCE.md gives ("Merging a checkpoint").
//!
//! ```text
//! # A random sharded Llama checkpoint and a random LoRA adapter for it
//! cargo run --release --example merge_bench -- --write /tmp/merge-bench
//! # Merge it, printing the peak resident memory against the largest shard plus the adapter
//! cargo run --release --example merge_bench -- --merge /tmp/merge-bench
//! ```
//!
//! `--write` makes `DIR/model` (config.json, shards of at most
//! `--shard-mib` MiB and model.safetensors.index.json; `--hidden`,
//! `--layers`, `--intermediate`, `--vocab` set the shapes) and `DIR/adapter`
//! (LoRA r = `--rank` on every linear layer but the head). `--merge` merges
//! them into `DIR/merged` in a fresh process, so the peak resident memory it
//! reads from /proc is the merge's.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use peft_models::merge::{merge_checkpoint, MergeOptions, WeightedAdapter};
use serde_json::json;

struct Args {
    write: Option<PathBuf>,
    merge: Option<PathBuf>,
    hidden: usize,
    layers: usize,
    intermediate: usize,
    vocab: usize,
    rank: usize,
    shard_mib: usize,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        write: None,
        merge: None,
        hidden: 1024,
        layers: 8,
        intermediate: 2816,
        vocab: 32000,
        rank: 16,
        shard_mib: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--write" => args.write = Some(value.into()),
            "--merge" => args.merge = Some(value.into()),
            "--hidden" => args.hidden = value.parse()?,
            "--layers" => args.layers = value.parse()?,
            "--intermediate" => args.intermediate = value.parse()?,
            "--vocab" => args.vocab = value.parse()?,
            "--rank" => args.rank = value.parse()?,
            "--shard-mib" => args.shard_mib = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    if args.write.is_none() == args.merge.is_none() {
        return Err("give --write DIR (make a checkpoint and an adapter) or --merge DIR (merge them)".into());
    }
    Ok(args)
}

/// The tensors of a Llama checkpoint, by name, with their shapes.
fn llama_shapes(args: &Args) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (args.hidden, args.intermediate, args.vocab);
    let mut shapes = vec![("model.embed_tokens.weight".to_owned(), vec![v, h])];
    for layer in 0..args.layers {
        let p = format!("model.layers.{layer}");
        for (name, shape) in [
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![h, h]),
            ("self_attn.v_proj", vec![h, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            shapes.push((format!("{p}.{name}.weight"), shape));
        }
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    shapes.push(("model.norm.weight".to_owned(), vec![h]));
    shapes.push(("lm_head.weight".to_owned(), vec![v, h]));
    shapes
}

fn write(dir: &Path, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    std::fs::write(
        model.join("config.json"),
        serde_json::to_string_pretty(&json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab,
            "hidden_size": args.hidden, "intermediate_size": args.intermediate,
            "num_hidden_layers": args.layers, "num_attention_heads": args.hidden / 64,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "torch_dtype": "float32",
        }))?,
    )?;
    // Shards of at most shard_mib, in order, as transformers splits them.
    let limit = args.shard_mib << 20;
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, shape) in llama_shapes(args) {
        let bytes = shape.iter().product::<usize>() * 4;
        if size > 0 && size + bytes > limit {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push((name, shape));
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0;
    for (index, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", index + 1);
        let mut tensors = HashMap::new();
        for (name, shape) in shard {
            total += shape.iter().product::<usize>() * 4;
            tensors.insert(name.clone(), Tensor::randn(0f32, 0.02, shape.as_slice(), &Device::Cpu)?);
            weight_map.insert(name.clone(), file.clone());
        }
        candle_core::safetensors::save(&tensors, model.join(&file))?;
    }
    std::fs::write(
        model.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&json!({"metadata": {"total_size": total}, "weight_map": weight_map}))?,
    )?;
    // A LoRA adapter on every linear layer but the head.
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter)?;
    let mut tensors = HashMap::new();
    let mut targets = Vec::new();
    for (name, shape) in llama_shapes(args) {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if shape.len() != 2 || !module.contains(".layers.") {
            continue;
        }
        let key = format!("base_model.model.{module}");
        let a = Tensor::randn(0f32, 0.02, (args.rank, shape[1]), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 0.02, (shape[0], args.rank), &Device::Cpu)?;
        tensors.insert(format!("{key}.lora_A.weight"), a);
        tensors.insert(format!("{key}.lora_B.weight"), b);
        targets.push(module.to_owned());
    }
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors"))?;
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::to_string_pretty(&json!({
            "peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": targets,
            "task_type": "CAUSAL_LM",
        }))?,
    )?;
    println!(
        "wrote {} ({count} shards, {:.1} MiB) and {}",
        model.display(),
        total as f64 / 1048576.0,
        adapter.display()
    );
    Ok(())
}

/// The process's peak resident memory so far (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn size_mib(path: &Path) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / 1048576.0)
}

fn merge(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let (model, adapter, out) = (dir.join("model"), dir.join("adapter"), dir.join("merged"));
    let largest_shard = std::fs::read_dir(&model)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| size_mib(&p))
        .fold(0.0, f64::max);
    let adapter_mib = size_mib(&adapter.join("adapter_model.safetensors"));
    let before = peak_rss_mib();
    let started = Instant::now();
    let adapters = [WeightedAdapter::read(&adapter, 1.0)?];
    let with_adapter = peak_rss_mib();
    let options = MergeOptions {
        dtype: None,
        force: true,
    };
    let report = merge_checkpoint(&model, &adapters, &out, &options, &mut |_| {})?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "merged {} modules, {} tensors in {} shards in {seconds:.2} s",
        report.merged_modules.len(),
        report.tensors,
        report.shards
    );
    let budget = largest_shard + adapter_mib;
    match (before, peak_rss_mib()) {
        (Some(before), Some(peak)) => println!(
            "peak RSS {peak:.1} MiB ({before:.1} MiB before the merge, {:.1} MiB with the adapter read); largest shard {largest_shard:.1} MiB + adapter \
             {adapter_mib:.1} MiB = {budget:.1} MiB: {:.2} x it (the target is at most 1.1 x)",
            with_adapter.unwrap_or(0.0),
            peak / budget
        ),
        _ => println!("peak RSS: no /proc on this system"),
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    match (&args.write, &args.merge) {
        (Some(dir), _) => write(dir, &args),
        (_, Some(dir)) => merge(dir),
        _ => unreachable!("parse_args checks"),
    }
}
