//! `peft inspect` and `peft convert` as a shell sees them: what they print,
//! `--json`, and their exit codes (0; 1 on problems or errors, with the
//! cause on stderr; 2 on a usage error).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(case)
}

fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh folder under the target dir for one test's outputs.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("convert_inspect")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn inspect_reports_a_sound_adapter_and_exits_0() {
    let dir = fixture("llama_lora_all_linear/adapter");
    let output = peft(&["inspect", path(&dir)]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    for part in [
        "kind:        LORA (use_dora: false, use_rslora: false)",
        "task_type CAUSAL_LM",
        "modules:     14, 4096 values",
        "‖ΔW‖_F",
        "largest 10:",
        "problems:    none",
    ] {
        assert!(stdout.contains(part), "{part:?} not in\n{stdout}");
    }

    let output = peft(&["inspect", path(&dir), "--json"]);
    assert_eq!(output.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["peft_type"], "LORA");
    assert_eq!(report["modules"], 14);
    assert_eq!(report["parameters"], 4096);
    assert_eq!(report["fields"]["r"], 4);
    assert_eq!(report["norms_of"], "delta");
    assert_eq!(report["top_modules"].as_array().unwrap().len(), 10);
    assert_eq!(report["norm_summary"]["count"], 14);
    assert_eq!(report["problems"], Value::Array(Vec::new()));
}

#[test]
fn inspect_lists_every_problem_and_exits_1() {
    let source = fixture("merge_cases/lora/adapter");
    let dir = scratch("broken").join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(source.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(source.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let prefix = "base_model.model.model.layers";
    tensors.remove(&format!("{prefix}.0.mlp.up_proj.lora_A.weight"));
    tensors.remove(&format!("{prefix}.1.mlp.up_proj.lora_B.weight"));
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();

    let output = peft(&["inspect", path(&dir)]);
    assert_eq!(output.status.code(), Some(1));
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        stdout.contains("modules:     14") && stdout.contains("problems:    2"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("no tensor `{prefix}.0.mlp.up_proj.lora_A.weight`")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("no tensor `{prefix}.1.mlp.up_proj.lora_B.weight`")),
        "{stdout}"
    );
    assert!(stderr.contains("error: 2 problem(s) in"), "{stderr}");

    let output = peft(&["inspect", path(&dir), "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[0]["at"], "model.layers.0.mlp.up_proj");
    // The 12 sound modules are measured.
    let measured = report["module_norms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["norm"].is_number())
        .count();
    assert_eq!(measured, 12);
}

#[test]
fn convert_writes_a_lora_adapter_and_says_how_close_it_is() {
    let dir = scratch("convert");
    let out = dir.join("lora");
    let adapter = fixture("merge_cases/lokr/adapter");
    let args = [
        "convert",
        "--adapter",
        path(&adapter),
        "--to",
        "lora",
        "--rank",
        "64",
        "--out",
        path(&out),
        "--json",
    ];
    let output = peft(&args);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (report["from"].as_str(), report["to"].as_str()),
        (Some("LOKR"), Some("LORA"))
    );
    assert_eq!(report["r"], 32);
    let modules = report["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 14);
    for module in modules {
        assert!(module["relative_error"].as_f64().unwrap() < 1e-6, "{module}");
    }
    // The output is an adapter inspect finds sound.
    let inspected = peft(&["inspect", path(&out), "--json"]);
    assert_eq!(inspected.status.code(), Some(0), "{}", text(&inspected.stdout));
    let inspected: Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(inspected["peft_type"], "LORA");

    // Again: refused without --force, done with it.
    let output = peft(&args);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("exists"), "{}", text(&output.stderr));
    let mut forced = args.to_vec();
    forced.push("--force");
    forced[6] = "2";
    let output = peft(&forced);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["r"], 2);
    assert!(report["max_relative_error"].as_f64().unwrap() > 0.01);

    // Text: a line per module and the largest error.
    let text_out = dir.join("text");
    let output = peft(&[
        "convert",
        "--adapter",
        path(&adapter),
        "--to",
        "lora",
        "--rank",
        "4",
        "--out",
        path(&text_out),
    ]);
    let stdout = text(&output.stdout);
    assert!(
        stdout.starts_with("converted LOKR to LoRA: r = lora_alpha = 4 (scaling 1), 14 modules"),
        "{stdout}"
    );
    assert!(stdout.contains("model.layers.1.mlp.up_proj") && stdout.contains("largest relative error"));
}

#[test]
fn convert_refuses_bad_input_with_the_reason() {
    let dir = scratch("refused");
    let out = dir.join("lora");
    let dora = fixture("merge_cases/dora/adapter");
    let output = peft(&[
        "convert",
        "--adapter",
        path(&dora),
        "--to",
        "lora",
        "--rank",
        "4",
        "--out",
        path(&out),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("DoRA") && stderr.contains("--model"), "{stderr}");

    let output = peft(&[
        "convert",
        "--adapter",
        path(&dora),
        "--to",
        "lora",
        "--rank",
        "0",
        "--model",
        path(&fixture("merge_cases/llama")),
        "--out",
        path(&out),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("at least 1"));
    assert!(!out.exists());

    // Usage errors: no --to, an unknown kind.
    let output = peft(&["convert", "--adapter", path(&dora), "--rank", "4", "--out", path(&out)]);
    assert_eq!(output.status.code(), Some(2));
    let output = peft(&[
        "convert",
        "--adapter",
        path(&dora),
        "--to",
        "loha",
        "--rank",
        "4",
        "--out",
        path(&out),
    ]);
    assert_eq!(output.status.code(), Some(2));
}
