//! `peft_models::train`: data files read and masked as mlx-lm's formats
//! say, bad lines named by file and line, gradient accumulation equal to a
//! bigger batch, and a resumed run ending with the same bytes as one that
//! was not stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use peft_core::prelude::*;
use peft_core::random::with_seed;
use peft_models::train::data::{Batch, DataOptions, Dataset};
use peft_models::train::{accumulated_gradients, train, StepMetrics, TrainConfig, TrainObserver, TrainRun};
use peft_models::{AutoModel, ModelError, Tokenizer};

mod support;
use support::{fixture_path, scratch};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const MODEL: &str = "llama_with_tokenizer";

fn data_path(file: &str) -> PathBuf {
    fixture_path("train_data").join(file)
}

/// The fixture model has 128 positions.
fn options(mask_prompt: bool) -> DataOptions {
    DataOptions {
        mask_prompt,
        max_seq_len: 128,
    }
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixture_path(MODEL)).unwrap()
}

/// The fixture model with a fresh LoRA from `seed`.
fn model_with_lora(seed: u64, dropout: f32) -> AutoModel {
    let mut model = AutoModel::from_dir(fixture_path(MODEL), DType::F32, &Device::Cpu).unwrap();
    with_seed(seed, || {
        model.apply_lora(LoraConfig::from(all_linear()).rank(4).alpha(8.0).dropout(dropout))
    })
    .unwrap();
    model
}

fn write_lines(name: &str, lines: &[&str]) -> PathBuf {
    let path = scratch("train", name).join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// The tokens of `example` the loss predicts.
fn predicted_ids(example: &peft_models::train::data::Example) -> Vec<u32> {
    let pairs = example.ids.iter().zip(&example.predicted);
    pairs.filter(|(_, &p)| p).map(|(&id, _)| id).collect()
}

#[test]
fn each_format_predicts_what_mask_prompt_says() -> TestResult {
    let tokenizer = tokenizer();
    let all = Dataset::from_jsonl(&data_path("train.jsonl"), &tokenizer, &options(false))?;
    let masked = Dataset::from_jsonl(&data_path("train.jsonl"), &tokenizer, &options(true))?;
    assert_eq!(all.len(), 12);
    for (a, m) in all.examples().iter().zip(masked.examples()) {
        assert_eq!(a.ids, m.ids, "line {}", a.line);
        assert!(a.predicted.iter().all(|&p| p));
        assert!(m.predicted_tokens() > 0 && m.predicted_tokens() <= a.predicted_tokens());
    }
    // A text line: every token, EOS appended.
    let eos = tokenizer.eos_token_id().unwrap();
    let text = &masked.examples()[0];
    assert_eq!(text.ids.last(), Some(&eos));
    assert_eq!(text.predicted_tokens(), text.ids.len() - 1);
    // A prompt and completion: through the chat template; with the mask,
    // exactly the assistant's content and its end tag.
    let completion = &masked.examples()[2];
    assert_eq!(
        tokenizer.decode(&predicted_ids(completion), false)?,
        "The news.<|im_end|>\n"
    );
    // Two assistant turns: both, and nothing between them.
    let chat = &masked.examples()[5];
    assert!(chat.ids.len() < 128, "{} tokens: cut", chat.ids.len());
    assert_eq!(
        tokenizer.decode(&predicted_ids(chat), false)?,
        "Open doors.<|im_end|>\nBrr.<|im_end|>\n"
    );
    // Cut to max_seq_len, the second turn is gone.
    let short = DataOptions {
        max_seq_len: 40,
        ..options(true)
    };
    let cut_set = Dataset::from_jsonl(&data_path("train.jsonl"), &tokenizer, &short)?;
    assert!(cut_set.truncated() > 0);
    // Line 6's assistant turns begin past 40 tokens: it is left out.
    assert_eq!(cut_set.skipped_lines(), [6]);
    assert!(cut_set.examples().iter().all(|e| e.ids.len() <= 40 && e.line != 6));
    Ok(())
}

#[test]
fn a_bad_line_is_named_by_file_and_line() {
    let tokenizer = tokenizer();
    let cases: [(&[&str], usize, &str); 6] = [
        (&[r#"{"text": "fine"}"#, "{not json"], 2, "not JSON"),
        (
            &[r#"{"txt": "typo"}"#],
            1,
            "no `text`, `prompt` and `completion`, or `messages` field",
        ),
        (
            &[r#"{"text": "a"}"#, "", r#"{"prompt": "q", "completion": ""}"#],
            3,
            "`completion` is empty",
        ),
        (&[r#"{"prompt": "q"}"#], 1, "no `completion` field"),
        (&[r#"{"messages": [{"role": "user"}]}"#], 1, "`messages` is not a list"),
        (&[r#"{"text": 5}"#], 1, "`text` is not a string"),
    ];
    for (i, (lines, line, reason)) in cases.iter().enumerate() {
        let path = write_lines(&format!("bad{i}"), lines);
        let error = Dataset::from_jsonl(&path, &tokenizer, &options(false)).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(&error, ModelError::Data { line: l, .. } if l == line),
            "{message}"
        );
        assert!(message.contains(reason), "{message}");
        assert!(message.starts_with(&format!("{}:{line}:", path.display())), "{message}");
    }
}

#[test]
fn a_role_the_template_rejects_is_named_by_line() -> TestResult {
    let dir = scratch("train", "strict_template");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture_path(MODEL).join(file), dir.join(file))?;
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}\
         {{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}",
    )?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let path = write_lines(
        "bad_role",
        &[
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
            r#"{"messages": [{"role": "narrator", "content": "hi"}]}"#,
        ],
    );
    let message = Dataset::from_jsonl(&path, &tokenizer, &options(false))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(":2:") && message.contains("unknown role narrator"),
        "{message}"
    );
    Ok(())
}

#[test]
fn four_micro_batches_of_one_give_the_gradients_of_a_batch_of_four() -> TestResult {
    let tokenizer = tokenizer();
    let data = Dataset::from_jsonl(&data_path("train.jsonl"), &tokenizer, &options(true))?;
    let model = model_with_lora(1, 0.0);
    // LoRA's B starts at zero; give it values so every gradient is non-zero.
    for (name, var) in model.named_trainable_vars() {
        if name.contains("lora_B") {
            var.set(&with_seed(2, || {
                peft_core::random::normal(0.0, 0.1, var.shape(), DType::F32, &Device::Cpu)
            })?)?;
        }
    }
    let examples: Vec<_> = data.examples()[2..6].iter().collect();
    let together = [Batch::new(&examples, &Device::Cpu)?];
    let apart: Vec<Batch> = examples
        .iter()
        .map(|e| Batch::new(&[*e], &Device::Cpu))
        .collect::<Result<_, _>>()?;
    assert!(together[0].positions > together[0].tokens, "the case must pad and mask");
    let (loss_together, grads_together) = accumulated_gradients(&model, &together, 0)?;
    let (loss_apart, grads_apart) = accumulated_gradients(&model, &apart, 0)?;
    assert!(
        (loss_together - loss_apart).abs() < 1e-5,
        "{loss_together} vs {loss_apart}"
    );
    let mut largest = 0f32;
    for (name, var) in model.named_trainable_vars() {
        let (a, b) = (
            grads_together.get(var.as_tensor()).unwrap(),
            grads_apart.get(var.as_tensor()).unwrap(),
        );
        let diff = support::max_abs_diff(a, b);
        assert!(diff < 1e-5, "{name}: {diff}");
        largest = largest.max(support::max_abs(a));
    }
    assert!(largest > 1e-4, "gradients too small to compare: {largest}");
    Ok(())
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        batch_size: 3,
        grad_accumulation: 2,
        steps: Some(steps),
        learning_rate: 5e-3,
        schedule: peft_models::train::optim::Schedule::Cosine,
        warmup_steps: 2,
        seed: 11,
        save_every: Some(5),
        eval_every: Some(5),
        ..TrainConfig::default()
    }
}

fn run_training(
    out: &Path,
    resume: Option<&Path>,
    stop_after: Option<usize>,
) -> Result<(AutoModel, peft_models::train::TrainReport), Box<dyn std::error::Error>> {
    let tokenizer = tokenizer();
    let train_set = Dataset::from_jsonl(&data_path("train.jsonl"), &tokenizer, &options(true))?;
    let valid = Dataset::from_jsonl(&data_path("valid.jsonl"), &tokenizer, &options(true))?;
    // Dropout on: its masks must repeat too.
    let mut model = model_with_lora(5, 0.1);
    let stop = AtomicBool::new(false);
    struct StopAt<'a>(Option<usize>, &'a AtomicBool);
    impl TrainObserver for StopAt<'_> {
        fn on_step(&mut self, metrics: &StepMetrics) {
            if Some(metrics.step) == self.0 {
                self.1.store(true, Ordering::SeqCst);
            }
        }
    }
    let config = config(12);
    let run = TrainRun {
        train: &train_set,
        valid: Some(&valid),
        config: &config,
        out,
        resume,
        stop: Some(&stop),
    };
    let report = train(&mut model, &run, &mut StopAt(stop_after, &stop))?;
    Ok((model, report))
}

#[test]
fn a_resumed_run_ends_with_the_bytes_of_an_unbroken_one() -> TestResult {
    let straight = scratch("train", "straight");
    let (_, report) = run_training(&straight, None, None)?;
    assert_eq!(report.steps, 12);
    assert!(!report.interrupted);
    assert!(straight
        .join("checkpoint-5")
        .join("adapter_model.safetensors")
        .is_file());
    assert!(straight.join("checkpoint-10").join("optimizer.safetensors").is_file());
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl"))?;
    assert_eq!(metrics.lines().filter(|l| l.contains("\"val_loss\"")).count(), 3); // steps 5, 10, 12

    // Resumed from step 5 of the same run.
    let resumed = scratch("train", "resumed");
    let (_, report) = run_training(&resumed, Some(&straight.join("checkpoint-5")), None)?;
    assert_eq!(report.steps, 12);
    let final_bytes = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(final_bytes(&straight), final_bytes(&resumed));
    assert_eq!(
        final_bytes(&straight.join("checkpoint-10")),
        final_bytes(&resumed.join("checkpoint-10"))
    );

    // Stopped (as Ctrl-C does) after step 7: a checkpoint there, then on.
    let stopped = scratch("train", "stopped");
    let (_, report) = run_training(&stopped, None, Some(7))?;
    assert!(report.interrupted);
    assert_eq!(report.steps, 7);
    assert_eq!(report.adapter_dir, stopped.join("checkpoint-7"));
    assert!(!stopped.join("adapter_model.safetensors").exists());
    let (_, report) = run_training(&stopped, Some(&stopped.join("checkpoint-7")), None)?;
    assert_eq!(report.steps, 12);
    assert_eq!(final_bytes(&straight), final_bytes(&stopped));
    Ok(())
}

#[test]
fn the_trained_adapter_lowers_the_loss_and_loads_back() -> TestResult {
    let out = scratch("train", "loads_back");
    let (model, report) = run_training(&out, None, None)?;
    let last_eval = report.last_eval.unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let first_loss: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap())?;
    assert!(report.last_loss.unwrap() < first_loss["loss"].as_f64().unwrap());
    let mut reloaded = AutoModel::from_dir(fixture_path(MODEL), DType::F32, &Device::Cpu)?;
    reloaded.load_adapter(&out, "default")?;
    let ids = candle_core::Tensor::new(&[[0u32, 5, 9, 30, 2]], &Device::Cpu)?;
    let diff = support::max_abs_diff(&model.forward(&ids)?, &reloaded.forward(&ids)?);
    assert!(diff < 1e-6, "{diff}");
    assert!(last_eval.val_loss.is_finite() && last_eval.val_tokens > 0);
    Ok(())
}

#[test]
fn resuming_with_other_settings_is_refused_and_changes_nothing() -> TestResult {
    let out = scratch("train", "other_settings");
    run_training(&out, None, Some(5))?;
    let tokenizer = tokenizer();
    let train_set = Dataset::from_jsonl(&data_path("train.jsonl"), &tokenizer, &options(true))?;
    let mut model = model_with_lora(5, 0.1);
    let before = model.forward(&candle_core::Tensor::new(&[[0u32, 5, 9]], &Device::Cpu)?)?;
    let other = TrainConfig {
        learning_rate: 1e-3,
        ..config(12)
    };
    let run = TrainRun {
        train: &train_set,
        valid: None,
        config: &other,
        out: &out,
        resume: Some(&out.join("checkpoint-5")),
        stop: None,
    };
    let error = train(&mut model, &run, &mut ()).unwrap_err();
    assert!(matches!(error, ModelError::Resume { .. }), "{error}");
    assert!(error.to_string().contains("`learning_rate`"), "{error}");
    let after = model.forward(&candle_core::Tensor::new(&[[0u32, 5, 9]], &Device::Cpu)?)?;
    assert_eq!(support::max_abs_diff(&before, &after), 0.0);
    assert_eq!(model.adapter_names(), vec!["default".to_owned()]);
    Ok(())
}

/// `train_data/trained_{lora,dora}` were written by `peft train`;
/// `peft_logits.safetensors` holds Python PEFT's logits with them
/// (`train_data/check_in_peft.py`).
#[test]
fn python_peft_gives_the_logits_of_adapters_peft_train_wrote() -> TestResult {
    let expected = candle_core::safetensors::load(data_path("peft_logits.safetensors"), &Device::Cpu)?;
    let ids = expected["input_ids"].to_dtype(DType::U32)?;
    for name in ["trained_lora", "trained_dora"] {
        let mut model = AutoModel::from_dir(fixture_path(MODEL), DType::F32, &Device::Cpu)?;
        model.load_adapter(data_path(name), "default")?;
        support::assert_close(name, &model.forward(&ids)?, &expected[&format!("logits_{name}")], 1e-4)?;
    }
    Ok(())
}
