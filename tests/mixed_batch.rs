//! Mixed batches (PEFT's `adapter_names=[...]`): one forward pass where each
//! row uses its own adapter, every row equal to running it alone with that
//! adapter, through the whole model and through KV-cache generation.

use candle_core::{DType, Device, IndexOp, Tensor};
use peft_core::prelude::*;
use peft_core::{Ia3Config, PeftError, BASE_ROWS};
use peft_models::classification::LlamaForSequenceClassification;
use peft_models::llama::KvCache;
use peft_models::AutoModel;

mod support;
use support::{assert_close, fixture_path};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CASE: &str = "llama_lora_all_linear";

/// The fixture's Llama with three adapters of three kinds: PEFT's LoRA
/// (`peft`), a random DoRA (`dora`) and a random IA³ (`ia3`).
fn model() -> AutoModel {
    let mut model = AutoModel::from_dir(fixture_path(CASE), DType::F32, &Device::Cpu).unwrap();
    model.load_adapter(fixture_path(CASE).join("adapter"), "peft").unwrap();
    let random = LoraConfig::from(all_linear()).rank(4).init(LoraInit::Random);
    peft_core::random::with_seed(7, || model.add_adapter("dora", &random.clone().dora(true))).unwrap();
    model.add_adapter("ia3", &Ia3Config::from(all_linear())).unwrap();
    // IA³ starts at 1 (no change): move it so that the test sees it.
    for (name, var) in model.named_trainable_vars() {
        if name.contains("ia3_l.ia3") {
            var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
        }
    }
    model
}

/// Row `row` of `ids` run alone with adapter `name` (or none).
fn alone(model: &mut AutoModel, ids: &Tensor, row: usize, name: &str) -> candle_core::Result<Tensor> {
    let ids = ids.i(row..=row)?;
    if name == BASE_ROWS {
        return model.with_adapters_disabled(|m| m.forward(&ids)).unwrap();
    }
    model.set_active_adapters(&[name]).unwrap();
    model.forward(&ids)
}

fn ids() -> Tensor {
    Tensor::new(
        &[
            [1u32, 5, 9, 13, 2],
            [7, 3, 3, 8, 1],
            [4, 4, 20, 6, 11],
            [9, 2, 14, 5, 5],
        ],
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn each_row_computes_with_its_own_adapter() -> TestResult {
    let mut model = model();
    let rows = ["peft", BASE_ROWS, "dora", "ia3"];
    let mixed = model.with_batch_adapters(&rows, |m| m.forward(&ids()))??;
    for (row, name) in rows.iter().enumerate() {
        let expected = alone(&mut model, &ids(), row, name)?;
        assert_close(&format!("row {row} ({name})"), &mixed.i(row..=row)?, &expected, 1e-5)?;
    }
    // Afterwards the model computes with its active adapters again.
    model.set_active_adapters(&["peft"])?;
    let after = model.forward(&ids())?;
    assert_close("after", &after.i(0..=0)?, &alone(&mut model, &ids(), 0, "peft")?, 1e-5)?;
    Ok(())
}

#[test]
fn one_adapter_for_every_row_is_the_plain_forward() -> TestResult {
    let mut model = model();
    let mixed = model.with_batch_adapters(&["dora"; 4], |m| m.forward(&ids()))??;
    model.set_active_adapters(&["dora"])?;
    assert_close("all dora", &mixed, &model.forward(&ids())?, 0.0)?;
    Ok(())
}

#[test]
fn generation_with_a_kv_cache_keeps_each_rows_adapter() -> TestResult {
    let mut model = model();
    let rows = ["ia3", "peft", BASE_ROWS, "dora"];
    let prompt = ids();
    let greedy = |model: &AutoModel, prompt: &Tensor| -> candle_core::Result<Vec<Vec<u32>>> {
        let mut cache = KvCache::default();
        let mut logits = model.forward_with_cache(prompt, &mut cache)?;
        let mut generated = vec![Vec::new(); prompt.dim(0)?];
        for _ in 0..6 {
            let next = logits.i((.., logits.dim(1)? - 1))?.argmax(1)?;
            for (row, id) in next.to_vec1::<u32>()?.into_iter().enumerate() {
                generated[row].push(id);
            }
            logits = model.forward_with_cache(&next.unsqueeze(1)?, &mut cache)?;
        }
        Ok(generated)
    };
    let together = model.with_batch_adapters(&rows, |m| greedy(m, &prompt))??;
    for (row, name) in rows.iter().enumerate() {
        let prompt = prompt.i(row..=row)?;
        let single = if *name == BASE_ROWS {
            model.with_adapters_disabled(|m| greedy(m, &prompt))??
        } else {
            model.set_active_adapters(&[name])?;
            greedy(&model, &prompt)?
        };
        assert_eq!(together[row], single[0], "row {row} ({name})");
    }
    Ok(())
}

#[test]
fn classifier_heads_are_switched_per_row() -> TestResult {
    let case = fixture_path("seq_cls_lora");
    let mut model = LlamaForSequenceClassification::from_dir(case.join("base"), DType::F32, &Device::Cpu)?;
    model.load_adapter(case.join("adapter"), "default")?;
    let io = candle_core::safetensors::load(case.join("io.safetensors"), &Device::Cpu)?;
    let rows = ["default", BASE_ROWS, "default"];
    let mixed = model.with_batch_adapters(&rows, |m| m.forward(&io["input_ids"]))??;
    assert_close("adapter rows", &mixed.i(0)?, &io["logits"].i(0)?, 1e-4)?;
    assert_close("adapter rows", &mixed.i(2)?, &io["logits"].i(2)?, 1e-4)?;
    assert_close("base row", &mixed.i(1)?, &io["base_logits"].i(1)?, 1e-4)?;
    Ok(())
}

#[test]
fn bad_mixed_batches_are_refused() -> TestResult {
    let mut model = model();
    let error = model.with_batch_adapters(&["peft", "missing"], |_| ()).unwrap_err();
    assert!(matches!(error, PeftError::UnknownAdapter { .. }), "{error}");
    // A row count that is not the batch's: a candle error naming both.
    let error = model
        .with_batch_adapters(&["peft", "dora"], |m| m.forward(&ids()))?
        .unwrap_err();
    assert!(error.to_string().contains("2 rows"), "{error}");
    // Merged adapters are refused, as in PEFT.
    model.set_active_adapters(&["peft"])?;
    model.merge()?;
    let error = model.with_batch_adapters(&["peft"; 4], |_| ()).unwrap_err();
    assert!(matches!(error, PeftError::MergeState { .. }), "{error}");
    Ok(())
}
