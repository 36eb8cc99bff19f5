//! `peft export-gguf`: the file llama.cpp's convert_lora_to_gguf.py writes
//! (tests/fixtures/gguf_export/), what `--json` prints, and the exit codes
//! (1 on a refused input with the reason on stderr, 2 on a usage error).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path)
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli-export-gguf")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn export_gguf(adapter: &Path, model: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["export-gguf", "--adapter"])
        .arg(adapter)
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn writes_the_converters_file_and_reports_it_as_json() {
    let case = fixture("llama_lora_all_linear");
    let out = scratch("json").join("adapter.gguf");
    let output = export_gguf(&case.join("adapter"), &case, &out, &["--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(fixture("gguf_export/llama/reference.gguf")).unwrap(),
        "the bytes of convert_lora_to_gguf.py's file"
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["architecture"], "llama");
    assert_eq!(report["bytes"], 18688);
    let metadata = report["metadata"].as_array().unwrap();
    let keys: Vec<&str> = metadata.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "general.type",
            "adapter.type",
            "general.name",
            "general.base_model.count",
            "general.tags",
            "adapter.lora.alpha",
            "general.quantization_version"
        ]
    );
    let alpha = &metadata[6];
    assert_eq!(
        (&alpha["type"], &alpha["value"]),
        (&Value::from("float32"), &Value::from(8.0))
    );
    let tensors = report["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 28);
    assert_eq!(tensors[0]["name"], "blk.0.ffn_down.weight.lora_a");
    assert_eq!(tensors[0]["dtype"], "F32");
    assert_eq!(tensors[0]["shape"], serde_json::json!([4, 64]));
    let permuted = tensors.iter().filter(|t| t["permuted"] == true).count();
    assert_eq!(permuted, 4, "LoRA B of q_proj and k_proj in two layers");

    // Text: one line per tensor, GGUF's dimension order as the script logs it.
    let text_out = scratch("text").join("adapter.gguf");
    let output = export_gguf(&case.join("adapter"), &case, &text_out, &[]);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("28 tensors in F32"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("blk.1.attn_v.weight.lora_b ") && l.contains("{4, 16}")),
        "{text}"
    );
}

#[test]
fn refusals_exit_with_1_and_say_why() {
    let llama = fixture("llama_lora_all_linear");
    let dir = scratch("refusals");

    // Refused before the base model is looked for (no download for nothing).
    let output = export_gguf(
        &fixture("dora_tiny/adapter"),
        Path::new("no-such-org/no-such-model"),
        &dir.join("dora.gguf"),
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("DoRA") && stderr.contains("peft convert --adapter DIR --to lora --rank R --out DIR2"),
        "{stderr}"
    );
    assert!(!dir.join("dora.gguf").exists());

    let out = dir.join("exists.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let output = export_gguf(&llama.join("adapter"), &llama, &out, &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let output = export_gguf(&llama.join("adapter"), &llama, &out, &["--force"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read(&out).unwrap().len(), 18688);

    // A usage error: no --out.
    let output = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["export-gguf", "--adapter", "a", "--model", "m"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}
