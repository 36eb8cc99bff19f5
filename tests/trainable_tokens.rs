//! PEFT's trainable tokens on a Llama with tied embeddings: the
//! `trainable_tokens` fixture (PEFT 0.21.2), LoRA's
//! `trainable_token_indices` and the `TRAINABLE_TOKENS` kind, loaded, saved
//! back as PEFT writes them, trained, merged, switched; bad input refused
//! with the model unchanged.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::Optimizer;
use peft_core::prelude::*;
use peft_core::{Embedding, PeftError, TokenIndices, TrainableTokensConfig, BASE_ROWS, CONFIG_FILE, WEIGHTS_FILE};
use peft_models::AutoModel;

mod support;
use support::{assert_close, assert_same_tensor_files, bits, max_abs_diff, read_json_object, trainable_var, Fixture};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CASE: Fixture = Fixture("trainable_tokens");
const TOKENS: [usize; 3] = [3, 7, 60];
const EMBED: &str = "model.embed_tokens";
const LORA_DELTA: &str = "model.embed_tokens.token_adapter.trainable_tokens_delta.default";

fn base() -> AutoModel {
    AutoModel::from_dir(CASE.path("base"), DType::F32, &Device::Cpu).unwrap()
}

fn loaded(adapter: &str) -> AutoModel {
    let mut model = base();
    model
        .load_adapter(CASE.path(&format!("adapter_{adapter}")), adapter)
        .unwrap();
    model
}

/// The weight of the slot at `path`, `[out, in]`.
fn weight(model: &AutoModel, path: &str) -> Tensor {
    let layers = model.layers();
    let layer = layers.iter().find(|l| l.path == path).unwrap();
    layer.layer.weight().unwrap().clone()
}

/// The embedding's output for every token of the vocabulary, `[64, 16]`.
fn every_row(model: &AutoModel) -> Tensor {
    let ids = Tensor::arange(0u32, 64, &Device::Cpu).unwrap();
    let layers = model.layers();
    layers
        .iter()
        .find(|l| l.path == EMBED)
        .unwrap()
        .layer
        .forward(&ids)
        .unwrap()
}

#[test]
fn both_adapters_give_peft_logits() -> TestResult {
    let io = CASE.io();
    for adapter in ["lora", "tokens"] {
        let model = loaded(adapter);
        let logits = model.forward(&io["input_ids"])?;
        let difference = assert_close(adapter, &logits, &io[&format!("logits_{adapter}")], 1e-4)?;
        println!("{adapter}: max |logits - PEFT| = {difference:e}");
        // The adapter changes the output: the test could fail.
        let base_logits = base().forward(&io["input_ids"])?;
        assert!(max_abs_diff(&base_logits, &logits) > 1e-2, "{adapter} changes nothing");
    }
    Ok(())
}

#[test]
fn the_tied_head_trains_the_same_rows_once() -> TestResult {
    for (adapter, key) in [
        ("lora", "token_adapter.trainable_tokens_delta"),
        ("tokens", "trainable_tokens_delta"),
    ] {
        let name = &format!("{EMBED}.{key}.{adapter}");
        let model = loaded(adapter);
        let names: Vec<String> = model
            .named_trainable_vars()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.contains("trainable_tokens"))
            .collect();
        // Listed once, under the embedding's name (as PEFT's named_parameters).
        assert_eq!(names, std::slice::from_ref(name), "{adapter}");
        // The head's logits for the trained tokens follow the delta.
        let delta = trainable_var(&model, name);
        let x = Tensor::new(&[[0.5f32; 16]], &Device::Cpu)?;
        let layers = model.layers();
        let head = layers.iter().find(|l| l.path == "lm_head").unwrap();
        let logits = head.layer.forward(&x)?;
        for (row, &token) in TOKENS.iter().enumerate() {
            let expected = (delta.as_tensor().i(row)? * 0.5)?.sum_all()?.to_scalar::<f32>()?;
            let got = logits.i((0, token))?.to_scalar::<f32>()?;
            assert!(
                (expected - got).abs() < 1e-5,
                "{adapter} token {token}: {got} vs {expected}"
            );
        }
    }
    Ok(())
}

#[test]
fn saving_writes_what_peft_wrote() -> TestResult {
    for adapter in ["lora", "tokens"] {
        let model = loaded(adapter);
        let dir = CASE.scratch(&format!("saved_{adapter}"));
        model.save_adapter(&dir, adapter)?;
        let dir = dir.join(adapter);
        assert_same_tensor_files(
            &dir.join(WEIGHTS_FILE),
            &CASE.path(&format!("adapter_{adapter}/{WEIGHTS_FILE}")),
        );
        let config = read_json_object(dir.join(CONFIG_FILE));
        let peft = read_json_object(CASE.path(&format!("adapter_{adapter}/{CONFIG_FILE}")));
        assert_eq!(config["peft_type"], peft["peft_type"]);
        if adapter == "lora" {
            assert_eq!(config["trainable_token_indices"], serde_json::json!(TOKENS));
            let targets = &config["target_modules"];
            assert!(!targets.to_string().contains("embed_tokens"), "{targets}");
            assert!(!targets.to_string().contains("lm_head"), "{targets}");
        } else {
            assert_eq!(config["token_indices"], serde_json::json!(TOKENS));
            assert_eq!(config["target_modules"], serde_json::json!([EMBED]));
            assert_eq!(config["init_weights"], serde_json::json!(true));
        }
        // And it reads back to the same logits.
        let io = CASE.io();
        let mut again = base();
        again.load_adapter(&dir, adapter)?;
        assert_eq!(
            bits(&again.forward(&io["input_ids"])?),
            bits(&model.forward(&io["input_ids"])?)
        );
    }
    Ok(())
}

#[test]
fn training_moves_the_chosen_rows_only() -> TestResult {
    let io = CASE.io();
    let mut model = base();
    let table = weight(&model, EMBED);
    let before = every_row(&model);
    let config = LoraConfig::from(modules(["q_proj", "v_proj"]))
        .rank(4)
        .trainable_tokens(TOKENS);
    model.add_adapter("default", &config)?;
    // A fresh delta is a copy of the rows: nothing changes yet.
    assert_eq!(bits(&every_row(&model)), bits(&before));
    let delta = trainable_var(&model, LORA_DELTA);
    assert_eq!(delta.dims(), [3, 16]);
    let mut optimizer = candle_nn::SGD::new(model.trainable_vars(), 0.5)?;
    let logits = model.forward(&io["input_ids"])?;
    let loss = support::next_token_loss(&logits, &io["input_ids"])?;
    let grads = loss.backward()?;
    let grad = grads.get(delta.as_tensor()).expect("the delta gets a gradient");
    assert!(grad.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    assert!(model
        .missing_gradients(&grads)?
        .iter()
        .all(|n| !n.contains("trainable_tokens")));
    optimizer.step(&grads)?;
    // The base table is untouched; the chosen rows moved, no other did.
    assert_eq!(bits(&weight(&model, EMBED)), bits(&table));
    let after = every_row(&model);
    for token in 0..64 {
        let same = bits(&after.i(token)?) == bits(&before.i(token)?);
        assert_eq!(same, !TOKENS.contains(&token), "token {token}");
    }
    Ok(())
}

#[test]
fn merging_and_unmerging_give_the_same_logits() -> TestResult {
    let io = CASE.io();
    for adapter in ["lora", "tokens"] {
        let mut model = loaded(adapter);
        let (table, head) = (weight(&model, EMBED), weight(&model, "lm_head"));
        let expected = model.forward(&io["input_ids"])?;
        model.merge()?;
        assert_close("merged", &model.forward(&io["input_ids"])?, &expected, 1e-5)?;
        // The trained rows are in the base now, in both the embedding and the head.
        assert!(max_abs_diff(&weight(&model, EMBED), &table) > 1e-2);
        assert!(max_abs_diff(&weight(&model, "lm_head"), &head) > 1e-2);
        model.unmerge()?;
        assert_eq!(
            bits(&weight(&model, EMBED)),
            bits(&table),
            "{adapter}: unmerge restores the table"
        );
        assert_eq!(bits(&weight(&model, "lm_head")), bits(&head), "{adapter}: and the head");
        assert_close("unmerged", &model.forward(&io["input_ids"])?, &expected, 1e-6)?;
        model.merge_and_unload()?;
        assert!(model.adapter_names().is_empty());
        assert_close(
            "merged and unloaded",
            &model.forward(&io["input_ids"])?,
            &expected,
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn switching_disabling_and_mixed_batches() -> TestResult {
    let io = CASE.io();
    let ids = &io["input_ids"];
    let mut model = loaded("lora");
    model.load_adapter(CASE.path("adapter_tokens"), "tokens")?;
    model.set_active_adapters(&["tokens"])?;
    assert_close("tokens active", &model.forward(ids)?, &io["logits_tokens"], 1e-4)?;
    model.set_active_adapters(&["lora"])?;
    assert_close("lora active", &model.forward(ids)?, &io["logits_lora"], 1e-4)?;
    let base_logits = base().forward(ids)?;
    let disabled = model.with_adapters_disabled(|m| m.forward(ids))??;
    assert_eq!(bits(&disabled), bits(&base_logits));
    let mixed = model.with_batch_adapters(&["tokens", "lora"], |m| m.forward(ids))??;
    assert_close("row 0 (tokens)", &mixed.i(0)?, &io["logits_tokens"].i(0)?, 1e-4)?;
    assert_close("row 1 (lora)", &mixed.i(1)?, &io["logits_lora"].i(1)?, 1e-4)?;
    let mixed = model.with_batch_adapters(&[BASE_ROWS, "tokens"], |m| m.forward(ids))??;
    assert_close("row 0 (base)", &mixed.i(0)?, &base_logits.i(0)?, 1e-5)?;
    assert_close("row 1 (tokens)", &mixed.i(1)?, &io["logits_tokens"].i(1)?, 1e-4)?;
    Ok(())
}

/// Runs `operation` on the fixture's base model with the `tokens` adapter,
/// checks it fails and leaves the logits and adapters as they were.
fn fails_unchanged(operation: impl FnOnce(&mut AutoModel) -> peft_core::Result<()>) -> PeftError {
    let io = CASE.io();
    let mut model = loaded("tokens");
    let before = bits(&model.forward(&io["input_ids"]).unwrap());
    let error = operation(&mut model).expect_err("the operation must fail");
    assert_eq!(bits(&model.forward(&io["input_ids"]).unwrap()), before, "{error}");
    assert_eq!(model.adapter_names(), ["tokens"], "{error}");
    error
}

fn lora() -> LoraConfig {
    LoraConfig::from(modules(["q_proj", "v_proj"])).rank(4)
}

#[test]
fn token_index_beyond_the_vocabulary() {
    let error = fails_unchanged(|m| m.add_adapter("bad", &lora().trainable_tokens([3, 64])));
    match &error {
        PeftError::TokenIndexOutOfRange { module, index, vocab } => {
            assert_eq!((module.as_str(), *index, *vocab), (EMBED, 64, 64));
        }
        other => panic!("expected TokenIndexOutOfRange, got {other:?}"),
    }
    let error = fails_unchanged(|m| m.add_adapter("bad", &TrainableTokensConfig::new([100])));
    assert!(
        matches!(error, PeftError::TokenIndexOutOfRange { index: 100, .. }),
        "{error}"
    );
}

#[test]
fn token_index_listed_twice() {
    let error = fails_unchanged(|m| m.add_adapter("bad", &lora().trainable_tokens([3, 7, 3])));
    assert!(
        matches!(&error, PeftError::DuplicateTokenIndex { module, index: 3 } if module == EMBED),
        "{error}"
    );
}

#[test]
fn token_module_that_does_not_exist() {
    let error = fails_unchanged(|m| m.add_adapter("bad", &lora().trainable_tokens_in("wte", [3])));
    assert!(matches!(error, PeftError::NoTargetMatched { .. }), "{error}");
    assert!(error.to_string().contains("wte"), "{error}");
}

#[test]
fn lora_target_holding_trainable_tokens() {
    // PEFT does not refuse it, and its forward then skips the LoRA of that
    // embedding; refused here.
    let config = LoraConfig::from(modules(["q_proj", "embed_tokens"])).trainable_tokens([3]);
    let error = fails_unchanged(|m| m.add_adapter("bad", &config));
    assert!(
        matches!(&error, PeftError::IncompatibleAdapter { module, .. } if module == EMBED),
        "{error}"
    );
    // The same with modules_to_save.
    let config = lora().trainable_tokens([3]);
    let config = config
        .clone()
        .target_modules(config.target_modules.clone().modules_to_save(["embed_tokens"]));
    let error = fails_unchanged(|m| m.add_adapter("bad", &config));
    assert!(matches!(error, PeftError::IncompatibleAdapter { .. }), "{error}");
}

#[test]
fn token_delta_of_the_wrong_shape() {
    // PEFT's file for three tokens, read with a config for two.
    let dir = CASE.scratch("two_tokens");
    std::fs::copy(CASE.path("adapter_tokens").join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    let mut config = read_json_object(CASE.path("adapter_tokens").join(CONFIG_FILE));
    config.insert("token_indices".into(), serde_json::json!([3, 7]));
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&config).unwrap()).unwrap();
    let error = fails_unchanged(|m| m.load_adapter(&dir, "bad"));
    match &error {
        PeftError::ShapeMismatch { key, expected, found } => {
            assert!(key.ends_with("trainable_tokens_delta"), "{key}");
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                ([2, 16].as_slice(), [3, 16].as_slice())
            );
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[derive(Adaptable)]
struct TwoTables {
    words: Embedding,
    positions: Embedding,
    proj: Linear,
}

#[derive(Adaptable)]
struct NoTable {
    proj: Linear,
}

#[test]
fn token_list_without_one_input_embedding() -> TestResult {
    let dev = Device::Cpu;
    let table = || Embedding::new(Tensor::ones((8, 2), DType::F32, &dev).unwrap(), 2).unwrap();
    let proj = || Linear::new(Tensor::eye(2, DType::F32, &dev).unwrap(), None);
    let mut two = TwoTables {
        words: table(),
        positions: table(),
        proj: proj(),
    };
    let config = LoraConfig::from(modules(["proj"])).trainable_tokens([1]);
    let error = two.add_adapter("default", &config).expect_err("two embeddings");
    match &error {
        PeftError::NoInputEmbedding { embeddings } => assert_eq!(embeddings, &["words", "positions"]),
        other => panic!("expected NoInputEmbedding, got {other:?}"),
    }
    assert!(error.to_string().contains("{module_name: [indices]}"), "{error}");
    assert!(two.adapter_names().is_empty());
    // The dict form names the module.
    two.add_adapter(
        "default",
        &LoraConfig::from(modules(["proj"])).trainable_tokens_in("words", [1]),
    )?;
    assert_eq!(
        two.layers().iter().filter(|l| l.layer.has_adapter("default")).count(),
        2,
        "proj and words"
    );
    let mut none = NoTable { proj: proj() };
    let error = none.add_adapter("default", &config).expect_err("no embedding");
    assert!(
        matches!(&error, PeftError::NoInputEmbedding { embeddings } if embeddings.is_empty()),
        "{error}"
    );
    assert!(none.adapter_names().is_empty());
    // A config read from PEFT's dict form keeps it.
    assert_eq!(
        LoraConfig::from(modules(["proj"]))
            .trainable_tokens_in("words", [1])
            .trainable_token_indices,
        Some(TokenIndices::Modules(vec![("words".into(), vec![1])]))
    );
    Ok(())
}

/// Rust → Python: writes both adapters, changed by Rust (the second trained
/// row doubled), and the logits Rust computes with them, into the folder
/// `PEFT_TRAINABLE_TOKENS_OUT`, for `check_in_peft.py` to compare with
/// PEFT (see the case's CASE.md).
#[test]
#[ignore = "writes a folder for tests/fixtures/trainable_tokens/check_in_peft.py"]
fn write_adapters_for_peft() -> TestResult {
    let out = std::path::PathBuf::from(std::env::var("PEFT_TRAINABLE_TOKENS_OUT")?);
    let io = CASE.io();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("input_ids".to_owned(), io["input_ids"].clone());
    for (adapter, key) in [
        ("lora", "token_adapter.trainable_tokens_delta"),
        ("tokens", "trainable_tokens_delta"),
    ] {
        let name = &format!("{EMBED}.{key}.{adapter}");
        let model = loaded(adapter);
        let delta = trainable_var(&model, name);
        let doubled = Tensor::cat(
            &[
                delta.as_tensor().i(0..1)?,
                (delta.as_tensor().i(1..2)? * 2.0)?,
                delta.as_tensor().i(2..)?,
            ],
            0,
        )?;
        delta.set(&doubled)?;
        model.save_adapter(&out, adapter)?;
        tensors.insert(format!("logits_{adapter}"), model.forward(&io["input_ids"])?);
    }
    candle_core::safetensors::save(&tensors, out.join("io.safetensors"))?;
    Ok(())
}

#[test]
fn the_file_tools_refuse_trainable_tokens_rather_than_drop_them() -> TestResult {
    use peft_models::convert::{convert_to_lora, ConvertOptions};
    use peft_models::merge::{merge_checkpoint, MergeOptions, WeightedAdapter};
    for adapter in ["adapter_lora", "adapter_tokens"] {
        let read = WeightedAdapter::read(CASE.path(adapter), 1.0)?;
        assert!(!read.adapter.trainable_token_keys().is_empty(), "{adapter}");
        let out = CASE.scratch(&format!("merged_{adapter}")).join("model");
        let error =
            merge_checkpoint(&CASE.path("base"), &[read], &out, &MergeOptions::default(), &mut |_| {}).unwrap_err();
        assert!(error.to_string().contains("trainable tokens"), "{adapter}: {error}");
        assert!(!out.exists());
    }
    let out = CASE.scratch("converted").join("adapter");
    let options = ConvertOptions {
        rank: 4,
        ..ConvertOptions::default()
    };
    let error = convert_to_lora(&CASE.path("adapter_lora"), &out, &options).unwrap_err();
    assert!(error.to_string().contains("trainable tokens"), "{error}");
    assert!(!out.exists());
    Ok(())
}

#[test]
fn gpt2_takes_trainable_tokens_on_its_tied_embedding() -> TestResult {
    let mut model = AutoModel::from_dir(support::fixture_path("gpt2_lora_conv1d"), DType::F32, &Device::Cpu)?;
    let lora = || LoraConfig::from(modules(["c_attn"])).rank(2);
    // Two embeddings (`wte`, `wpe`): the list form cannot tell which is the input's.
    let error = model.apply_lora(lora().trainable_tokens([1, 2])).unwrap_err();
    assert!(
        matches!(&error, PeftError::NoInputEmbedding { embeddings } if embeddings.len() == 2),
        "{error}"
    );
    assert!(model.adapter_names().is_empty());
    model.apply_lora(lora().trainable_tokens_in("wte", [1, 2]))?;
    let delta = trainable_var(&model, "transformer.wte.token_adapter.trainable_tokens_delta.default");
    // The tied head follows the same rows: with inputs that do not use
    // tokens 1 and 2, moving their rows changes their logits and no other.
    let ids = Tensor::new(&[[5u32, 9, 7, 3]], &Device::Cpu)?;
    let before = model.forward(&ids)?;
    delta.set(&(delta.as_tensor() + 1.0)?)?;
    let after = model.forward(&ids)?;
    let changed = (after - &before)?
        .abs()?
        .max_keepdim(1)?
        .squeeze(1)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let moved: Vec<usize> = (0..changed.len()).filter(|&v| changed[v] > 1e-3).collect();
    assert_eq!(moved, [1, 2]);
    Ok(())
}
