//! What the integration tests share: comparing tensors, scratch folders,
//! fixture files, JSON, a deterministic random generator (`rng`) and the
//! check of a LoHa / LoKr fixture case (`fixture_case`).
//!
//! Each test crate uses a part of it, hence `dead_code` allowed.
#![allow(dead_code)]

pub mod fixture_case;
pub mod rng;
pub mod tiny_lm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde_json::{Map, Value};

/// The largest absolute value of `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar())
        .unwrap()
}

/// The largest absolute difference between `a` and `b` (same shape).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// Panics unless `a` and `b` differ by at most `tolerance` times the larger of
/// 1 and `a`'s largest magnitude: merging reassociates float sums, so merged
/// and unmerged outputs compare relative to the output's scale.
pub fn assert_close_relative(a: &Tensor, b: &Tensor, tolerance: f32) {
    let scale = max_abs(a).max(1.0);
    let diff = max_abs_diff(a, b);
    assert!(diff <= tolerance * scale, "max abs diff {diff} > {tolerance} x {scale}");
}

/// The largest absolute difference between `a` and `b`, or NaN when a
/// difference is NaN or infinite (a max may skip NaNs); an error when the
/// shapes differ.
pub fn max_abs_diff_or_nan(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    if a.dims() != b.dims() {
        candle_core::bail!("shape {:?} vs expected {:?}", a.dims(), b.dims());
    }
    let diff = (a - b)?;
    // A NaN or infinity anywhere makes the sum non-finite.
    if !diff.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok(f32::NAN);
    }
    diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// `Err` naming `what` when `got` and `expected` differ by more than `tol`
/// (or by NaN); the difference otherwise. Prints the difference.
pub fn assert_close(what: &str, got: &Tensor, expected: &Tensor, tol: f32) -> Result<f32, Box<dyn std::error::Error>> {
    let diff = max_abs_diff_or_nan(got, expected)?;
    eprintln!("  {what}: max abs diff {diff:.3e}");
    // NaN fails too.
    if diff.is_nan() || diff > tol {
        return Err(format!("{what}: max abs diff {diff:.3e} > {tol:.0e}").into());
    }
    Ok(diff)
}

/// Next-token cross entropy, as the fixtures compute it: positions 0..T-1
/// predict tokens 1..T, mean over all predictions.
pub fn next_token_loss(logits: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let t = ids.dim(1)?;
    let predictions = logits.narrow(1, 0, t - 1)?.flatten_to(1)?;
    let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
    candle_nn::loss::cross_entropy(&predictions, &targets)
}

/// A fresh, empty folder `group/name` under the target's temporary folder.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(group).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `tests/fixtures/<path>`: a case folder, or a file of the fixtures.
pub fn fixture_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

/// The tensors of `tests/fixtures/<case>/io.safetensors` (inputs, expected
/// outputs and gradients).
pub fn fixture_io(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_path(case).join("io.safetensors"), &Device::Cpu).unwrap()
}

/// A reference case under `tests/fixtures/<name>`, made by Python PEFT.
pub struct Fixture(pub &'static str);

impl Fixture {
    /// The case's folder.
    pub fn dir(&self) -> PathBuf {
        fixture_path(self.0)
    }

    /// A file of the case.
    pub fn path(&self, path: &str) -> PathBuf {
        self.dir().join(path)
    }

    /// The case's `io.safetensors`.
    pub fn io(&self) -> HashMap<String, Tensor> {
        fixture_io(self.0)
    }

    /// A fresh, empty folder `<case>/<name>` under the target's temporary folder.
    pub fn scratch(&self, name: &str) -> PathBuf {
        scratch(self.0, name)
    }
}

/// The JSON document in `path`.
pub fn read_json(path: impl AsRef<Path>) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The JSON object in `path` (panics if the document is not an object).
pub fn read_json_object(path: impl AsRef<Path>) -> Map<String, Value> {
    let path = path.as_ref();
    match read_json(path) {
        Value::Object(map) => map,
        other => panic!("{path:?} is not a JSON object: {other}"),
    }
}

/// The bit patterns of `t`'s values as f32: comparing two of them is
/// comparing the tensors exactly.
pub fn bits(t: &Tensor) -> Vec<u32> {
    let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    values.into_iter().map(f32::to_bits).collect()
}

/// The trainable tensor of `model` named `name` (PEFT's state-dict name,
/// as `named_trainable_vars` gives it); panics listing the names if absent.
pub fn trainable_var<M: peft_core::PeftModel>(model: &M, name: &str) -> Var {
    let vars = model.named_trainable_vars();
    let names: Vec<&String> = vars.iter().map(|(n, _)| n).collect();
    let found = vars.iter().find_map(|(n, var)| (n == name).then(|| var.clone()));
    found.unwrap_or_else(|| panic!("no trainable tensor {name} among {names:?}"))
}

/// Asserts that the safetensors files `ours` and `theirs` hold the same
/// keys, and under each the same values bit for bit.
pub fn assert_same_tensor_files(ours: &Path, theirs: &Path) {
    let read = |path: &Path| candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let (ours_tensors, theirs_tensors) = (read(ours), read(theirs));
    let keys = |t: &HashMap<String, Tensor>| t.keys().cloned().collect::<std::collections::BTreeSet<_>>();
    assert_eq!(keys(&ours_tensors), keys(&theirs_tensors), "{ours:?} and {theirs:?}");
    for (key, tensor) in &theirs_tensors {
        assert_eq!(bits(&ours_tensors[key]), bits(tensor), "{key}");
    }
}
