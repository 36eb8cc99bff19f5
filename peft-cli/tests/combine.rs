//! `peft combine` as a shell sees it: adapter folders in, PEFT's combined
//! adapter out (the tensors of `tests/fixtures/weighted_adapters`, made by
//! PEFT's `add_weighted_adapter`), `--json`, refusals with exit status 1 and
//! nothing written, usage errors with 2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use serde_json::Value;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/weighted_adapters")
        .join(path)
}

fn adapter(name: &str) -> String {
    fixture(&format!("adapters/{name}")).to_str().unwrap().to_owned()
}

fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh folder under the target dir for one test's outputs.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("combine").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `B·A` of every module (r = lora_alpha: scaling 1).
fn deltas(tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(key, a)| {
            let module = key.strip_suffix(".lora_A.weight")?;
            Some((
                module.to_owned(),
                tensors[&format!("{module}.lora_B.weight")].matmul(a).unwrap(),
            ))
        })
        .collect()
}

/// Runs `peft combine` for `case` of the fixture and compares the output
/// with PEFT's (A and B, or ΔW for an SVD type).
fn equals_peft(case: &str, args: &[&str], svd: bool) {
    let out = scratch(case).join("out");
    let mut all = args.to_vec();
    all.extend(["--out", out.to_str().unwrap()]);
    let output = peft(&all);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("written to"), "{}", text(&output.stdout));
    let expected = fixture(&format!("cases/{case}"));
    for field in ["r", "lora_alpha", "peft_type", "use_rslora"] {
        assert_eq!(config(&out)[field], config(&expected)[field], "{case}: {field}");
    }
    let (ours, peft) = (tensors(&out), tensors(&expected));
    let (ours, peft) = if svd {
        (deltas(&ours), deltas(&peft))
    } else {
        (ours, peft)
    };
    assert_eq!(ours.len(), peft.len());
    for (key, expected) in &peft {
        let diff = max_diff(&ours[key], expected);
        assert!(diff < 1e-5, "{case}: {key} differs from PEFT's by {diff}");
    }
}

#[test]
fn combine_writes_what_peft_writes() {
    let (a, b, c) = (adapter("a"), adapter("b"), adapter("c"));
    equals_peft(
        "ties",
        &[
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--weights",
            "0.7,0.3",
            "--combination",
            "ties",
            "--density",
            "0.5",
        ],
        false,
    );
    equals_peft(
        "linear_negative",
        &[
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--weights",
            "1.0,-0.5",
            "--combination",
            "linear",
        ],
        false,
    );
    equals_peft(
        "cat",
        &[
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--adapter",
            &c,
            "--weights",
            "0.7,0.3,0.5",
            "--combination",
            "cat",
        ],
        false,
    );
    equals_peft(
        "svd_rank2_reduced",
        &[
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--adapter",
            &c,
            "--weights",
            "0.7,-0.3,0.5",
            "--combination",
            "svd",
            "--svd-rank",
            "2",
        ],
        true,
    );
    equals_peft(
        "ties_frequency",
        &[
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--weights",
            "0.6,0.4",
            "--combination",
            "ties",
            "--density",
            "0.7",
            "--majority-sign",
            "frequency",
        ],
        false,
    );
}

#[test]
fn combine_json_force_and_seed() {
    let (a, b) = (adapter("a"), adapter("b"));
    let dir = scratch("json");
    let out = dir.join("dare");
    let run = |out: &Path, seed: &str, extra: &[&str]| {
        let mut args = vec![
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--weights",
            "0.7,0.3",
            "--combination",
            "dare_ties",
            "--density",
            "0.5",
            "--seed",
            seed,
            "--json",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        peft(&args)
    };
    let output = run(&out, "3", &[]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["combination"], "dare_ties");
    assert_eq!(report["r"], 4);
    assert_eq!(report["modules"].as_array().unwrap().len(), 4);
    assert_eq!(report["parameters"], 4 * (4 * 16 + 16 * 4));

    // The output exists: refused without --force, nothing changed.
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let output = run(&out, "4", &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("--force"), "{}", text(&output.stderr));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), before);

    // The same seed writes the same adapter, another seed another one.
    let again = dir.join("again");
    assert_eq!(run(&again, "3", &[]).status.code(), Some(0));
    assert_eq!(std::fs::read(again.join("adapter_model.safetensors")).unwrap(), before);
    assert_eq!(run(&out, "4", &["--force"]).status.code(), Some(0));
    assert_ne!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), before);
    // No hidden partial folder is left beside the outputs.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn combine_refusals_write_nothing() {
    let (a, b, c) = (adapter("a"), adapter("b"), adapter("c"));
    let dir = scratch("refusals");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--adapter",
                &a,
                "--adapter",
                &c,
                "--weights",
                "0.5,0.5",
                "--combination",
                "linear",
            ],
            "adapter0: r = 4, adapter1: r = 2",
        ),
        (
            &[
                "--adapter",
                &a,
                "--adapter",
                &b,
                "--weights",
                "0.5",
                "--combination",
                "cat",
            ],
            "2 adapter(s) but 1 weight(s)",
        ),
        (
            &[
                "--adapter",
                &a,
                "--adapter",
                &b,
                "--weights",
                "0.5,0.5",
                "--combination",
                "ties",
                "--density",
                "1.5",
            ],
            "density",
        ),
        (
            &[
                "--adapter",
                &a,
                "--adapter",
                &b,
                "--weights",
                "0.5,0.5",
                "--combination",
                "ties",
            ],
            "need a density",
        ),
        (
            &[
                "--adapter",
                &a,
                "--adapter",
                &b,
                "--weights",
                "0.5,0.5",
                "--svd-rank",
                "40",
            ],
            "svd rank 40",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["combine"];
        all.extend(args);
        all.extend(["--out", out]);
        let output = peft(&all);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{message:?} not in {stderr}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "{args:?} wrote something");
    }
    // A type that does not exist is a usage error.
    let output = peft(&[
        "combine",
        "--adapter",
        &a,
        "--weights",
        "1",
        "--combination",
        "sum",
        "--out",
        out,
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("magnitude_prune_svd"),
        "{}",
        text(&output.stderr)
    );
}
