//! `peft_models::Checkpoint` and `AutoModel` on checkpoint folders: the
//! transformers fixtures as they are, sharded copies of them, and folders
//! broken one way at a time, each refused with a typed error that names
//! what is at fault.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use peft_core::prelude::*;
use peft_models::{AutoModel, Checkpoint, ModelError, CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE};
use serde_json::{json, Value};

mod support;
use support::{assert_close, fixture_io, fixture_path, read_json_object, scratch};

const LOGITS_TOL: f32 = 1e-5;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn input_ids(case: &str) -> Tensor {
    fixture_io(case)["input_ids"].to_dtype(DType::U32).unwrap()
}

/// A copy of the fixture `case`'s checkpoint (config and weights) in a
/// fresh folder, to break.
fn copy_of(case: &str, name: &str) -> PathBuf {
    let dir = scratch("checkpoints", name);
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(fixture_path(case).join(file), dir.join(file)).unwrap();
    }
    dir
}

/// Rewrites the checkpoint in `dir` as two shards and an index, as
/// transformers' `save_pretrained(max_shard_size=...)` does.
fn shard(dir: &Path) {
    let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let (first, second) = keys.split_at(keys.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (name, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: HashMap<String, Tensor> = part.iter().map(|k| ((*k).clone(), tensors[*k].clone())).collect();
        candle_core::safetensors::save(&shard, dir.join(name)).unwrap();
        for key in part {
            weight_map.insert((*key).clone(), json!(name));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut config = read_json_object(dir.join(CONFIG_FILE));
    edit(&mut config);
    std::fs::write(dir.join(CONFIG_FILE), Value::Object(config).to_string()).unwrap();
}

fn load_error(dir: &Path) -> ModelError {
    match AutoModel::from_dir(dir, DType::F32, &Device::Cpu) {
        Ok(model) => panic!("{} loaded as {}", dir.display(), model.model_type()),
        Err(error) => error,
    }
}

#[test]
fn fixtures_load_by_model_type_with_transformers_logits() -> TestResult {
    for (case, model_type) in [("llama_lora_all_linear", "llama"), ("gpt2_lora_conv1d", "gpt2")] {
        let checkpoint = Checkpoint::open(fixture_path(case))?;
        assert_eq!(checkpoint.model_type(), model_type);
        let model = AutoModel::load(&checkpoint, DType::F32, &Device::Cpu)?;
        assert_eq!(model.model_type(), model_type);
        let logits = model.forward(&input_ids(case))?;
        assert_close(case, &logits, &fixture_io(case)["logits_base"], LOGITS_TOL)?;
    }
    Ok(())
}

#[test]
fn peft_adapters_load_on_the_auto_model_unchanged() -> TestResult {
    // The enum's variants add no path segment: PEFT's keys name the same
    // modules, and all_linear() picks what PEFT picked.
    for case in ["llama_lora_all_linear", "gpt2_lora_conv1d"] {
        let mut model = AutoModel::from_dir(fixture_path(case), DType::F32, &Device::Cpu)?;
        let targets: Vec<String> =
            serde_json::from_value(support::read_json(fixture_path(case).join("targets.json"))["targets"].clone())?;
        assert_eq!(model.targeted_modules(&all_linear())?, targets, "{case}");
        model.load_adapter(fixture_path(case).join("adapter"), "default")?;
        let logits = model.forward(&input_ids(case))?;
        assert_close(case, &logits, &fixture_io(case)["logits_adapted"], LOGITS_TOL)?;
    }
    Ok(())
}

#[test]
fn a_sharded_checkpoint_loads_the_same_weights() -> TestResult {
    let case = "llama_lora_all_linear";
    let dir = copy_of(case, "sharded");
    shard(&dir);
    let checkpoint = Checkpoint::open(&dir)?;
    assert_eq!(checkpoint.weight_files().len(), 2);
    let model = AutoModel::load(&checkpoint, DType::F32, &Device::Cpu)?;
    let logits = model.forward(&input_ids(case))?;
    assert_close("sharded", &logits, &fixture_io(case)["logits_base"], LOGITS_TOL)?;
    Ok(())
}

#[test]
fn half_precision_loads_convert_the_weights() -> TestResult {
    let case = "llama_lora_all_linear";
    let model = AutoModel::from_dir(fixture_path(case), DType::F16, &Device::Cpu)?;
    let logits = model.forward(&input_ids(case))?.to_dtype(DType::F32)?;
    // f16 weights and activations: within half precision of the f32 logits.
    assert_close("f16", &logits, &fixture_io(case)["logits_base"], 0.05)?;
    Ok(())
}

/// A checkpoint stored in half precision loads as stored (copied out of the
/// mapping piece by piece) to exactly the weights an f32 file converted at
/// load gives.
#[test]
fn half_precision_files_load_to_the_converted_weights() -> TestResult {
    let case = "llama_lora_all_linear";
    let ids = input_ids(case);
    for dtype in [DType::F16, DType::BF16] {
        let dir = copy_of(case, &format!("stored_{dtype:?}"));
        let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu)?;
        let stored: HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(name, tensor)| Ok((name, tensor.to_dtype(dtype)?)))
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&stored, dir.join(WEIGHTS_FILE))?;
        let from_stored = AutoModel::from_dir(&dir, dtype, &Device::Cpu)?.forward(&ids)?;
        let converted = AutoModel::from_dir(fixture_path(case), dtype, &Device::Cpu)?.forward(&ids)?;
        let difference = (from_stored.to_dtype(DType::F32)? - converted.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(difference, 0.0, "{dtype:?}");
        // And loading the half-precision file as f32 widens it.
        let widened = AutoModel::from_dir(&dir, DType::F32, &Device::Cpu)?.forward(&ids)?;
        assert_close("widened", &widened, &fixture_io(case)["logits_base"], 0.05)?;
    }
    Ok(())
}

#[test]
fn missing_files_are_named() {
    let dir = copy_of("llama_lora_all_linear", "no-config");
    std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
    match load_error(&dir) {
        ModelError::MissingFile { path, what } => {
            assert_eq!(path, dir.join(CONFIG_FILE));
            assert_eq!(what, "config.json");
        }
        other => panic!("{other}"),
    }

    let dir = copy_of("llama_lora_all_linear", "no-weights");
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, ModelError::MissingFile { .. }), "{error}");
    assert!(error.to_string().contains("model.safetensors"), "{error}");

    let dir = copy_of("llama_lora_all_linear", "no-shard");
    shard(&dir);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    match load_error(&dir) {
        ModelError::MissingFile { path, .. } => assert_eq!(path, dir.join("model-00002-of-00002.safetensors")),
        other => panic!("{other}"),
    }
}

#[test]
fn a_shard_missing_a_tensor_its_index_names_is_refused() {
    let dir = copy_of("llama_lora_all_linear", "index-lies");
    shard(&dir);
    let mut index = read_json_object(dir.join(INDEX_FILE));
    index["weight_map"].as_object_mut().unwrap().insert(
        "model.layers.9.mlp.up_proj.weight".into(),
        json!("model-00001-of-00002.safetensors"),
    );
    std::fs::write(dir.join(INDEX_FILE), Value::Object(index).to_string()).unwrap();
    match load_error(&dir) {
        ModelError::MissingTensor { shard, key, .. } => {
            assert_eq!(key, "model.layers.9.mlp.up_proj.weight");
            assert_eq!(shard, dir.join("model-00001-of-00002.safetensors"));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_names_the_tensor_and_both_shapes() {
    // A config that says 3 layers of width 32 over weights for 2: the first
    // missing tensor is named; a config with another width names the shapes.
    let dir = copy_of("llama_lora_all_linear", "deeper");
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), json!(3));
    });
    let error = load_error(&dir);
    assert!(matches!(error, ModelError::Load { .. }), "{error}");
    assert!(error.to_string().contains("model.layers.2"), "{error}");

    let dir = copy_of("llama_lora_all_linear", "wider");
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), json!(48));
    });
    let message = load_error(&dir).to_string();
    assert!(
        message.contains("mlp.gate_proj.weight") && message.contains("48") && message.contains("64"),
        "{message}"
    );
}

#[test]
fn unknown_architectures_and_options_are_refused() {
    let dir = copy_of("llama_lora_all_linear", "unknown-type");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), json!("mamba"));
    });
    match load_error(&dir) {
        ModelError::UnknownModelType { found, supported, path } => {
            assert_eq!(found, "mamba");
            assert_eq!(supported, peft_models::SUPPORTED_MODEL_TYPES.join(", "));
            assert_eq!(path, dir.join(CONFIG_FILE));
        }
        other => panic!("{other}"),
    }

    let dir = copy_of("llama_lora_all_linear", "no-type");
    edit_config(&dir, |c| {
        c.remove("model_type");
    });
    assert!(matches!(load_error(&dir), ModelError::UnknownModelType { found, .. } if found == "null"));

    let dir = copy_of("llama_lora_all_linear", "yarn-rope");
    edit_config(&dir, |c| {
        c.insert(
            "rope_parameters".into(),
            json!({"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}),
        );
    });
    match load_error(&dir) {
        ModelError::Unsupported { field, value, .. } => {
            assert_eq!(field, "rope_parameters");
            assert_eq!(value, "\"yarn\"");
        }
        other => panic!("{other}"),
    }
    let dir = copy_of("llama_lora_all_linear", "llama3-rope-cut-short");
    edit_config(&dir, |c| {
        c.insert("rope_parameters".into(), json!({"rope_type": "llama3", "factor": 8.0}));
    });
    let error = load_error(&dir);
    assert!(
        matches!(error, ModelError::Unsupported { .. }) && error.to_string().contains("low_freq_factor"),
        "{error}"
    );

    let dir = copy_of("llama_lora_all_linear", "bad-json");
    std::fs::write(dir.join(CONFIG_FILE), "{\"model_type\": \"llama\",").unwrap();
    match load_error(&dir) {
        ModelError::Json { path, .. } => assert_eq!(path, dir.join(CONFIG_FILE)),
        other => panic!("{other}"),
    }

    let dir = copy_of("llama_lora_all_linear", "wrong-field-type");
    edit_config(&dir, |c| {
        c.insert("hidden_size".into(), json!("32"));
    });
    let error = load_error(&dir);
    assert!(matches!(error, ModelError::Json { .. }), "{error}");
    assert!(error.to_string().contains("invalid type"), "{error}");
}

#[test]
fn an_adapter_for_another_architecture_is_refused() {
    // GPT-2's adapter names modules (transformer.h.0.attn.c_attn) Llama lacks.
    let mut model = AutoModel::from_dir(fixture_path("llama_lora_all_linear"), DType::F32, &Device::Cpu).unwrap();
    let error = model
        .load_adapter(fixture_path("gpt2_lora_conv1d").join("adapter"), "default")
        .unwrap_err();
    assert!(matches!(error, peft_core::PeftError::NoTargetMatched { .. }), "{error}");
    assert!(error.to_string().contains("c_attn"), "{error}");
    assert!(model.adapter_names().is_empty());
}

#[test]
fn the_kv_cache_gives_the_logits_of_the_whole_sequence() -> TestResult {
    for case in ["llama_lora_all_linear", "gpt2_lora_conv1d"] {
        let mut model = AutoModel::from_dir(fixture_path(case), DType::F32, &Device::Cpu)?;
        model.load_adapter(fixture_path(case).join("adapter"), "default")?;
        let ids: Vec<u32> = input_ids(case).i(0)?.to_vec1()?;
        let whole = model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
        // Three tokens, then one at a time.
        let mut cache = peft_models::llama::KvCache::default();
        let mut steps =
            vec![model.forward_with_cache(&Tensor::new(&ids[..3], &Device::Cpu)?.unsqueeze(0)?, &mut cache)?];
        for i in 3..ids.len() {
            let new = Tensor::new(&ids[i..=i], &Device::Cpu)?.unsqueeze(0)?;
            steps.push(model.forward_with_cache(&new, &mut cache)?);
        }
        assert_eq!(cache.seen(), ids.len());
        assert_close(
            &format!("cached ({case})"),
            &Tensor::cat(&steps, 1)?,
            &whole,
            LOGITS_TOL,
        )?;
    }
    Ok(())
}

#[test]
fn generation_is_greedy_by_default_and_seeded_when_sampled() -> TestResult {
    use peft_models::generate::{generate, GenerateOptions, Sampling};
    for case in ["llama_lora_all_linear", "gpt2_lora_conv1d"] {
        let model = AutoModel::from_dir(fixture_path(case), DType::F32, &Device::Cpu)?;
        let prompt: Vec<u32> = input_ids(case).i(0)?.to_vec1()?;
        let options = GenerateOptions {
            max_new_tokens: 8,
            ..GenerateOptions::default()
        };
        let mut streamed = Vec::new();
        let greedy = generate(&model, &prompt, &options, |token| streamed.push(token))?;
        assert_eq!(greedy.tokens, streamed);
        assert_eq!(greedy.tokens.len(), 8);
        // Each greedy token is the argmax of the whole sequence's logits.
        let mut sequence = prompt.clone();
        for &token in &greedy.tokens {
            let logits = model.forward(&Tensor::new(sequence.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
            let last = logits.i((0, sequence.len() - 1))?;
            assert_eq!(
                last.argmax(candle_core::D::Minus1)?.to_scalar::<u32>()?,
                token,
                "{case}"
            );
            sequence.push(token);
        }
        // A stop token ends the text at its first appearance, and is kept.
        let stop_token = greedy.tokens[2];
        let first = greedy.tokens.iter().position(|&t| t == stop_token).unwrap();
        let stop = GenerateOptions {
            stop_tokens: vec![stop_token],
            ..options.clone()
        };
        let stopped = generate(&model, &prompt, &stop, |_| {})?;
        assert!(
            stopped.stopped && stopped.tokens == greedy.tokens[..=first],
            "{case}: {stopped:?}"
        );
        // Sampling: the same seed, the same tokens.
        let sampled = |seed| {
            let options = GenerateOptions {
                sampling: Sampling {
                    temperature: 1.5,
                    top_k: Some(20),
                    top_p: Some(0.95),
                    seed,
                },
                ..options.clone()
            };
            generate(&model, &prompt, &options, |_| {}).unwrap().tokens
        };
        assert_eq!(sampled(11), sampled(11));
        assert_ne!(sampled(11), sampled(12), "{case}");
    }
    Ok(())
}

#[test]
fn generation_refuses_prompts_the_model_cannot_hold() {
    use peft_models::generate::{generate, GenerateOptions};
    let model = AutoModel::from_dir(fixture_path("llama_lora_all_linear"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.max_positions(), Some(64));
    let options = GenerateOptions {
        max_new_tokens: 10,
        ..GenerateOptions::default()
    };
    let error = generate(&model, &[1; 60], &options, |_| {}).unwrap_err();
    assert!(matches!(error, ModelError::Generation { .. }), "{error}");
    assert!(
        error.to_string().contains("70 positions") && error.to_string().contains("64"),
        "{error}"
    );
    let error = generate(&model, &[], &options, |_| {}).unwrap_err();
    assert!(error.to_string().contains("no token"), "{error}");
}

/// A Hugging Face cache folder holding the fixture `case` as `org/name` at
/// commit `commit`, with `refs/main` pointing at it, as huggingface_hub
/// lays it out.
fn fake_hub_cache(name: &str, case: &str, commit: &str) -> PathBuf {
    let cache = scratch("checkpoints", name);
    let repo = cache.join("models--tiny-org--tiny-model");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(fixture_path(case).join(file), snapshot.join(file)).unwrap();
    }
    cache
}

#[test]
fn hub_ids_load_from_the_hugging_face_cache() -> TestResult {
    use peft_models::hub::resolve_in;
    let case = "qwen2_lora_all_linear";
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let cache = fake_hub_cache("hub-cache", case, commit);
    let snapshot = cache.join("models--tiny-org--tiny-model/snapshots").join(commit);
    assert_eq!(resolve_in("tiny-org/tiny-model", None, &cache)?, snapshot);
    assert_eq!(resolve_in("tiny-org/tiny-model", Some("main"), &cache)?, snapshot);
    assert_eq!(resolve_in("tiny-org/tiny-model", Some(commit), &cache)?, snapshot);
    let model = AutoModel::from_dir(
        resolve_in("tiny-org/tiny-model", None, &cache)?,
        DType::F32,
        &Device::Cpu,
    )?;
    assert_close(
        "hub",
        &model.forward(&input_ids(case))?,
        &fixture_io(case)["logits_base"],
        LOGITS_TOL,
    )?;
    // A folder is taken as it is.
    assert_eq!(resolve_in(snapshot.to_str().unwrap(), None, &cache)?, snapshot);

    // Not in the cache: the error names the id, the revision and the folder.
    for (id, revision) in [("tiny-org/other-model", None), ("tiny-org/tiny-model", Some("v2"))] {
        match resolve_in(id, revision, &cache) {
            Err(ModelError::NotInCache {
                repo,
                revision: rev,
                cache: folder,
            }) => {
                assert_eq!(repo, id);
                assert_eq!(rev, revision.unwrap_or("main"));
                assert_eq!(folder, cache);
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    // Neither a folder nor an org/name id.
    assert!(matches!(
        resolve_in("no-such-folder", None, &cache),
        Err(ModelError::MissingFile { .. })
    ));
    Ok(())
}

#[test]
fn quantizing_at_load_keeps_the_logits_within_quantization_error() -> TestResult {
    use candle_core::quantized::GgmlDType;
    let case = "llama_lora_all_linear";
    let dense = AutoModel::from_dir(fixture_path(case), DType::F32, &Device::Cpu)?;
    let expected = dense.forward(&input_ids(case))?;
    let mut model = AutoModel::from_dir(fixture_path(case), DType::F32, &Device::Cpu)?;
    let mut quantized = model.quantize(GgmlDType::Q8_0)?;
    // Every linear layer but the head.
    quantized.sort();
    assert_eq!(quantized, model.targeted_modules(&all_linear())?);
    assert!(model.layers().iter().filter(|l| l.layer.is_quantized()).count() == 14);
    let logits = model.forward(&input_ids(case))?;
    // Q8_0 rounds weights (and candle's kernel the activations) to 8 bits
    // per block of 32: the logits move by a few percent of their scale.
    let scale = support::max_abs(&expected);
    let error = support::max_abs_diff(&logits, &expected) / scale;
    assert!(error > 0.0 && error < 0.05, "Q8_0: relative error {error}");
    // LoRA trains on top; merging into the quantized weights is refused.
    model.load_adapter(fixture_path(case).join("adapter"), "default")?;
    let adapted = model.forward(&input_ids(case))?;
    let expected = &fixture_io(case)["logits_adapted"];
    let error = support::max_abs_diff(&adapted, expected) / support::max_abs(expected);
    assert!(error < 0.05, "Q8_0 with the adapter: relative error {error}");
    assert!(model.merge().is_err());

    // Refused, with nothing changed: a width the format cannot block, or adapters already there.
    let mut model = AutoModel::from_dir(fixture_path(case), DType::F32, &Device::Cpu)?;
    match model.quantize(GgmlDType::Q4K) {
        Err(ModelError::Quantize { module, reason }) => {
            assert!(module.starts_with("model.layers.0"), "{module}");
            assert!(reason.contains("256"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(model.layers().iter().all(|l| !l.layer.is_quantized()));
    model.load_adapter(fixture_path(case).join("adapter"), "default")?;
    assert!(matches!(
        model.quantize(GgmlDType::Q8_0),
        Err(ModelError::Quantize { .. })
    ));
    let half = AutoModel::from_dir(fixture_path(case), DType::F16, &Device::Cpu)?;
    let mut half = half;
    assert!(matches!(
        half.quantize(GgmlDType::Q8_0),
        Err(ModelError::Quantize { .. })
    ));
    Ok(())
}

/// A stand-in for the Hub on 127.0.0.1 serving the files of `remote` as
/// repository `org/name` at commit `commit`: the file list
/// (`/api/models/<id>/revision/<rev>`) and `resolve/<rev>/<file>` with the
/// headers hf-hub reads (`etag`, `x-repo-commit`, `content-range`). Counts
/// the requests it answers.
struct FakeHub {
    endpoint: String,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeHub {
    fn serve(remote: PathBuf, id: &'static str, commit: &'static str) -> Self {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut request_line, mut range) = (String::new(), None);
                reader.read_line(&mut request_line).unwrap();
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some(value) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (start, end) = value.trim().split_once('-').unwrap();
                        range = Some((start.parse::<usize>().unwrap(), end.parse::<usize>().ok()));
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut files: Vec<String> = std::fs::read_dir(&remote)
                    .unwrap()
                    .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                files.sort();
                let (status, headers, body) = if path == format!("/api/models/{id}/revision/main") {
                    let siblings: Vec<Value> = files.iter().map(|f| json!({"rfilename": f})).collect();
                    let body = json!({"siblings": siblings, "sha": commit}).to_string().into_bytes();
                    ("200 OK", String::new(), body)
                } else if let Some(file) = path.strip_prefix(&format!("/{id}/resolve/main/")) {
                    match std::fs::read(remote.join(file)) {
                        Ok(bytes) => {
                            let (start, end) = range.unwrap_or((0, None));
                            let end = end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                            let headers = format!(
                                "etag: \"etag-{}\"\r\nx-repo-commit: {commit}\r\ncontent-range: bytes {start}-{end}/{}\r\n",
                                file.replace('.', "-"),
                                bytes.len()
                            );
                            ("206 Partial Content", headers, bytes[start..=end].to_vec())
                        }
                        Err(_) => ("404 Not Found", String::new(), Vec::new()),
                    }
                } else {
                    ("404 Not Found", String::new(), Vec::new())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
            }
        });
        Self { endpoint, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn hub_ids_missing_from_the_cache_are_downloaded_into_it() -> TestResult {
    use peft_models::hub::{resolve_with, HubOptions};
    use peft_models::Tokenizer;
    let case = "llama_with_tokenizer";
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    // The remote repository: a sharded checkpoint with its tokenizer, and a
    // pickled file a download must leave alone.
    let remote = copy_of(case, "hub-remote");
    shard(&remote);
    for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(fixture_path(case).join(file), remote.join(file))?;
    }
    std::fs::write(remote.join("pytorch_model.bin"), b"not for peft")?;
    let hub = FakeHub::serve(remote, "tiny-org/tiny-llama", commit);
    let cache = scratch("checkpoints", "hub-download-cache");
    let options = HubOptions {
        cache: cache.clone(),
        offline: false,
        endpoint: hub.endpoint.clone(),
        token: None,
        progress: false,
    };

    let snapshot = resolve_with("tiny-org/tiny-llama", None, &options)?;
    let repo = cache.join("models--tiny-org--tiny-llama");
    assert_eq!(snapshot, repo.join("snapshots").join(commit));
    assert_eq!(std::fs::read_to_string(repo.join("refs/main"))?, commit);
    assert!(!snapshot.join("pytorch_model.bin").exists());
    let model = AutoModel::from_dir(&snapshot, DType::F32, &Device::Cpu)?;
    assert_close(
        "downloaded",
        &model.forward(&input_ids(case))?,
        &fixture_io(case)["logits_base"],
        LOGITS_TOL,
    )?;
    assert!(Tokenizer::from_dir(&snapshot)?.has_chat_template());

    // Now in the cache: found there without asking the Hub, also offline.
    let asked = hub.requests();
    assert_eq!(resolve_with("tiny-org/tiny-llama", None, &options)?, snapshot);
    let offline = HubOptions {
        offline: true,
        ..options.clone()
    };
    assert_eq!(resolve_with("tiny-org/tiny-llama", Some(commit), &offline)?, snapshot);
    assert_eq!(hub.requests(), asked);

    // Offline and not cached: NotInCache; online and not on the Hub: a
    // download error naming the id and the cache.
    assert!(matches!(
        resolve_with("tiny-org/other", None, &offline),
        Err(ModelError::NotInCache { .. })
    ));
    match resolve_with("tiny-org/other", None, &options) {
        Err(error @ ModelError::Download(_)) => {
            let message = error.to_string();
            assert!(
                message.contains("tiny-org/other") && message.contains("hub-download-cache"),
                "{message}"
            );
        }
        other => panic!("expected a download error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn adapter_hub_ids_are_downloaded_into_the_cache_and_load() -> TestResult {
    use peft_models::hub::{resolve_adapter_in, resolve_adapter_with, HubOptions};
    let case = "llama_lora_all_linear";
    let commit = "fedcba9876543210fedcba9876543210fedcba98";
    // The remote adapter repository, with a pickled copy a download must leave alone.
    let remote = scratch("checkpoints", "hub-adapter-remote");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture_path(case).join("adapter").join(file), remote.join(file))?;
    }
    std::fs::write(remote.join("adapter_model.bin"), b"not for peft")?;
    let hub = FakeHub::serve(remote, "tiny-org/tiny-adapter", commit);
    let cache = scratch("checkpoints", "hub-adapter-cache");
    let options = HubOptions {
        cache: cache.clone(),
        offline: false,
        endpoint: hub.endpoint.clone(),
        token: None,
        progress: false,
    };
    assert!(matches!(
        resolve_adapter_in("tiny-org/tiny-adapter", None, &cache),
        Err(ModelError::NotInCache { .. })
    ));
    let snapshot = resolve_adapter_with("tiny-org/tiny-adapter", None, &options)?;
    assert_eq!(
        snapshot,
        cache.join("models--tiny-org--tiny-adapter/snapshots").join(commit)
    );
    assert!(!snapshot.join("adapter_model.bin").exists());
    assert_eq!(resolve_adapter_in("tiny-org/tiny-adapter", None, &cache)?, snapshot);
    let mut model = AutoModel::from_dir(fixture_path(case), DType::F32, &Device::Cpu)?;
    model.load_adapter(&snapshot, "default")?;
    assert_close(
        "adapter from the Hub",
        &model.forward(&input_ids(case))?,
        &fixture_io(case)["logits_adapted"],
        LOGITS_TOL,
    )?;
    // A model repository is no adapter: refused, naming the file.
    match resolve_adapter_with("tiny-org/other", None, &options) {
        Err(error @ ModelError::Download(_)) => assert!(error.to_string().contains("tiny-org/other"), "{error}"),
        other => panic!("expected a download error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn adapter_hub_ids_without_safetensors_fall_back_to_adapter_model_bin() -> TestResult {
    use peft_models::hub::{resolve_adapter_with, HubOptions};
    // tests/fixtures/bin_adapter: a LoRA adapter PEFT saved with
    // safe_serialization=False, over the base of llama_lora_all_linear.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let remote = scratch("checkpoints", "hub-bin-adapter-remote");
    for file in ["adapter_config.json", "adapter_model.bin"] {
        std::fs::copy(fixture_path("bin_adapter/adapter_bin").join(file), remote.join(file))?;
    }
    let hub = FakeHub::serve(remote, "tiny-org/bin-adapter", commit);
    let options = HubOptions {
        cache: scratch("checkpoints", "hub-bin-adapter-cache"),
        offline: false,
        endpoint: hub.endpoint.clone(),
        token: None,
        progress: false,
    };
    let snapshot = resolve_adapter_with("tiny-org/bin-adapter", None, &options)?;
    assert!(snapshot.join("adapter_model.bin").is_file());
    assert!(!snapshot.join("adapter_model.safetensors").exists());
    let mut model = AutoModel::from_dir(fixture_path("llama_lora_all_linear"), DType::F32, &Device::Cpu)?;
    model.load_adapter(&snapshot, "default")?;
    assert_close(
        "pickled adapter from the Hub",
        &model.forward(&input_ids("bin_adapter"))?,
        &fixture_io("bin_adapter")["logits_bin"],
        LOGITS_TOL,
    )?;
    Ok(())
}
