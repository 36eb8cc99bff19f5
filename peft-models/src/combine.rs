//! LoRA adapter folders combined into a new adapter folder with no base
//! model (`peft combine`), as PEFT's `add_weighted_adapter` combines the
//! adapters of a model: the adapters are read
//! ([`StandaloneAdapter`]), placed in an [`AdapterSkeleton`] (zero base
//! weights of the shapes their tensors give), combined by
//! [`PeftModel::add_weighted_adapter`] and saved.
//!
//! The output folder is written under a hidden name beside it, read back
//! with the loader's checks, and only then renamed into place.

use std::path::{Path, PathBuf};

use peft_core::{AdapterSkeleton, Combination, CombineOptions, PeftModel, StandaloneAdapter};

use crate::error::{ModelError, Result};
use crate::output::{finish, partial_dir, same_folder};

/// What [`combine_adapters`] wrote.
#[derive(Debug, Clone)]
pub struct CombineReport {
    /// The output folder.
    pub out: PathBuf,
    /// The combination applied (`linear` for one adapter, as PEFT).
    pub combination: Combination,
    /// The new adapter's rank (`r`, equal to `lora_alpha`).
    pub r: usize,
    /// The modules it adapts, sorted.
    pub modules: Vec<String>,
    /// How many values its tensors hold.
    pub parameters: usize,
}

/// Combines the LoRA adapters in `adapters` (folders), `weights[i]`
/// scaling `adapters[i]`, into a new adapter written to `out`. The DARE
/// types draw their masks from a generator seeded with `seed` (random
/// without one).
///
/// Refused before anything is written: an output that exists (unless
/// `force`) or is one of the inputs, and every refusal of
/// [`PeftModel::add_weighted_adapter`].
pub fn combine_adapters(
    adapters: &[PathBuf],
    weights: &[f64],
    options: &CombineOptions,
    seed: Option<u64>,
    out: &Path,
    force: bool,
) -> Result<CombineReport> {
    if out.exists() && !force {
        return Err(ModelError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    if let Some(input) = adapters.iter().find(|dir| same_folder(dir, out)) {
        return Err(ModelError::Combine {
            reason: format!(
                "the output folder {} is the input {}; inputs are never modified",
                out.display(),
                input.display()
            ),
        });
    }
    let read = adapters
        .iter()
        .map(StandaloneAdapter::from_dir)
        .collect::<peft_core::Result<Vec<_>>>()?;
    let names: Vec<String> = (0..adapters.len()).map(|i| format!("adapter{i}")).collect();
    let named: Vec<(&str, &StandaloneAdapter)> = names.iter().map(String::as_str).zip(&read).collect();
    let mut skeleton = AdapterSkeleton::from_adapters(&named)?;
    let sources: Vec<&str> = names.iter().map(String::as_str).collect();
    let combine = |skeleton: &mut AdapterSkeleton| skeleton.add_weighted_adapter(&sources, weights, "default", options);
    match seed {
        Some(seed) => peft_core::random::with_seed(seed, || combine(&mut skeleton))?,
        None => combine(&mut skeleton)?,
    }
    for name in &sources {
        skeleton.delete_adapter(name)?;
    }

    let partial = partial_dir(out)?;
    let written = (|| -> Result<CombineReport> {
        skeleton.save_adapter(&partial, "default")?;
        // Read back with the loader's checks: the folder loads as written.
        let back = StandaloneAdapter::from_dir(&partial)?;
        let r = back.field("r").and_then(serde_json::Value::as_u64).unwrap_or(0) as usize;
        Ok(CombineReport {
            out: out.to_path_buf(),
            combination: if adapters.len() == 1 {
                Combination::Linear
            } else {
                options.combination
            },
            r,
            modules: back.modules().into_iter().map(str::to_owned).collect(),
            parameters: back.tensors().values().map(|t| t.elem_count()).sum(),
        })
    })();
    finish(&partial, out, written)
}
