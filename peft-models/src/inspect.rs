//! What an adapter folder holds and everything wrong with it, without the
//! base model: `peft inspect`.
//!
//! [`inspect_adapter`] never stops at a problem. It reads the config
//! (parsed and validated as loading does), every tensor entry on its own
//! ([`peft_core::read_tensor_entries`]), groups the tensors by module, and
//! checks each module: the tensors its kind needs, their ranks against `r`
//! and `rank_pattern`, then the loader's own checks (targets, shapes) by
//! merging the module alone into a base of the shape its tensors give, with
//! [`StandaloneAdapter::merge_module`]. For the additive kinds (LoRA, LoHa,
//! LoKr) that merge into zeros is `ΔW`, whose norm is reported; DoRA's
//! norm is its LoRA part's, IA³'s is not computed (both depend on the base).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::{read_tensor_entries, split_adapter_key, PeftError, StandaloneAdapter, CONFIG_FILE, WEIGHTS_FILE};
use serde_json::{Map, Value};

use crate::convert::{frobenius_norm, module_delta, ModuleLayout};
use crate::error::ModelError;

/// The fields of `adapter_config.json` a report shows, when set.
const SHOWN_FIELDS: &[&str] = &[
    "r",
    "lora_alpha",
    "alpha",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "feedforward_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "init_lora_weights",
    "init_weights",
    "lora_dropout",
    "rank_dropout",
    "module_dropout",
    "decompose_both",
    "decompose_factor",
    "bias",
    "peft_version",
];

/// Something the loader would refuse, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What it is in: `adapter_config.json`, `adapter_model.safetensors`,
    /// or a module's path.
    pub at: String,
    /// What is wrong, naming the field, tensor key or shapes.
    pub message: String,
}

/// One module the file holds tensors for.
#[derive(Debug, Clone)]
pub struct ModuleReport {
    /// The module's path (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// Its tensors: name within the module (`lora_A.weight`), shape, dtype.
    pub tensors: Vec<(String, Vec<usize>, String)>,
    /// The values its tensors hold.
    pub parameters: usize,
    /// The base weight's layout, as the tensors give it.
    pub layout: Option<ModuleLayout>,
    /// `‖ΔW‖_F` (for DoRA, of its LoRA part); `None` when not computed.
    pub delta_norm: Option<f64>,
}

/// What the norms of a report measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NormsOf {
    /// `ΔW`, the whole change (LoRA with its scaling, LoHa, LoKr).
    Delta,
    /// The LoRA part `s · B · A` of a DoRA adapter: its whole change also
    /// rescales the base weight's rows.
    LoraPart,
    /// Not computed, and why.
    NotComputed(String),
}

/// The smallest, quartiles and largest of the norms, and a histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct NormSummary {
    /// How many modules.
    pub count: usize,
    /// The smallest.
    pub min: f64,
    /// The first quartile (linear interpolation, as numpy's default).
    pub q1: f64,
    /// The median.
    pub median: f64,
    /// The third quartile.
    pub q3: f64,
    /// The largest.
    pub max: f64,
    /// Equal-width bins from `min` to `max`: (from, to, modules).
    pub histogram: Vec<(f64, f64, usize)>,
}

/// What [`inspect_adapter`] found.
#[derive(Debug, Clone)]
pub struct InspectReport {
    /// The folder.
    pub dir: PathBuf,
    /// `peft_type` as written.
    pub peft_type: Option<String>,
    /// `use_dora`.
    pub use_dora: bool,
    /// `use_rslora`.
    pub use_rslora: bool,
    /// The PEFT fields of note that are set, as written.
    pub fields: Vec<(String, Value)>,
    /// `base_model_name_or_path`.
    pub base_model: Option<String>,
    /// `revision`.
    pub revision: Option<String>,
    /// `task_type`.
    pub task_type: Option<String>,
    /// The modules, sorted by path.
    pub modules: Vec<ModuleReport>,
    /// The values of the adapter's tensors (what PEFT counts as trainable).
    pub parameters: usize,
    /// Base weights PEFT saved beside the adapter (`<module>.base_layer.weight`,
    /// `save_embedding_layers`; biases trained with `bias = "all" |
    /// "lora_only"`): key and shape; not counted in `parameters`.
    pub saved_base_weights: Vec<(String, Vec<usize>)>,
    /// Modules the adapter holds whole (`modules_to_save`: a classifier
    /// head): each tensor's key and shape; not counted in `parameters`.
    pub copied_modules: Vec<(String, Vec<usize>)>,
    /// The dtypes of the tensors, as the header writes them.
    pub dtypes: Vec<String>,
    /// What the modules' norms measure.
    pub norms_of: NormsOf,
    /// Every problem found, in the order checked.
    pub problems: Vec<Problem>,
}

impl InspectReport {
    /// The `n` modules with the largest norms, largest first.
    pub fn top_modules(&self, n: usize) -> Vec<&ModuleReport> {
        let mut with_norm: Vec<&ModuleReport> = self.modules.iter().filter(|m| m.delta_norm.is_some()).collect();
        with_norm.sort_by(|a, b| {
            b.delta_norm
                .partial_cmp(&a.delta_norm)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        with_norm.truncate(n);
        with_norm
    }

    /// The summary of the modules' norms in `bins` bins; `None` when none
    /// was computed.
    pub fn norm_summary(&self, bins: usize) -> Option<NormSummary> {
        let mut norms: Vec<f64> = self.modules.iter().filter_map(|m| m.delta_norm).collect();
        if norms.is_empty() {
            return None;
        }
        norms.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            let at = q * (norms.len() - 1) as f64;
            let (low, high) = (at.floor() as usize, at.ceil() as usize);
            norms[low] + (norms[high] - norms[low]) * (at - low as f64)
        };
        let (min, max) = (norms[0], norms[norms.len() - 1]);
        let bins = bins.max(1);
        let width = (max - min) / bins as f64;
        let mut histogram: Vec<(f64, f64, usize)> = (0..bins)
            .map(|i| (min + width * i as f64, min + width * (i + 1) as f64, 0))
            .collect();
        for norm in &norms {
            let bin = if width > 0.0 {
                (((norm - min) / width) as usize).min(bins - 1)
            } else {
                0
            };
            histogram[bin].2 += 1;
        }
        Some(NormSummary {
            count: norms.len(),
            min,
            q1: quantile(0.25),
            median: quantile(0.5),
            q3: quantile(0.75),
            max,
            histogram,
        })
    }
}

/// Inspects the adapter folder `dir` (see the [module](self) docs). Every
/// failure, even a missing file, is a [`Problem`] of the report.
pub fn inspect_adapter(dir: &Path) -> InspectReport {
    let mut problems = Vec::new();
    let config_path = dir.join(CONFIG_FILE);
    // adapter_model.safetensors, or adapter_model.bin without it (as loading picks).
    let weights_path = peft_core::adapter_weights_file(dir);
    let weights_name = weights_path
        .file_name()
        .map_or(WEIGHTS_FILE.to_owned(), |n| n.to_string_lossy().into_owned());

    // The config: as written, then as the loader parses and validates it.
    let text = std::fs::read_to_string(&config_path)
        .map_err(|cause| {
            problems.push(problem(
                CONFIG_FILE,
                PeftError::Io {
                    path: config_path.clone(),
                    cause,
                },
            ))
        })
        .ok();
    let fields: Map<String, Value> = text
        .as_deref()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|value| value.as_object().cloned())
        .unwrap_or_default();
    let config = text.as_deref().and_then(|text| {
        match peft_core::config_file::parse_config(text, &config_path).and_then(|c| c.validate().map(|()| c)) {
            Ok(config) => Some(config),
            Err(error) => {
                problems.push(problem(CONFIG_FILE, error));
                None
            }
        }
    });
    let string = |name: &str| fields.get(name).and_then(Value::as_str).map(str::to_owned);
    let flag = |name: &str| fields.get(name).and_then(Value::as_bool).unwrap_or(false);
    let peft_type = string("peft_type");
    let use_dora = flag("use_dora");

    // The tensors, each on its own.
    let bytes = std::fs::read(&weights_path)
        .map_err(|cause| {
            problems.push(problem(
                &weights_name,
                PeftError::Io {
                    path: weights_path.clone(),
                    cause,
                },
            ))
        })
        .ok();
    let (entries, file_problems) = match &bytes {
        Some(bytes) => read_tensor_entries(bytes, &weights_path),
        None => (Vec::new(), Vec::new()),
    };
    problems.extend(file_problems.into_iter().map(|e| problem(&weights_name, e)));
    let dtypes: BTreeSet<String> = entries.iter().map(|e| e.dtype.clone()).collect();

    // Grouped by module.
    let mut by_module: BTreeMap<String, Vec<&peft_core::TensorEntry>> = BTreeMap::new();
    let mut saved_base_weights = Vec::new();
    let mut copied_modules = Vec::new();
    // A module kept whole is saved under its own keys (`<module>.weight`).
    let copied = |key: &str| {
        let module = key
            .strip_prefix("base_model.model.")
            .and_then(|rest| rest.rsplit_once('.'));
        match (module, &config) {
            (Some((module, _)), Some(config)) => config.targets().saved_module_containing(module).is_some(),
            _ => false,
        }
    };
    // With PEFT's `bias = "all"`, the biases of modules no adapter wraps are
    // saved under their own keys (`<module>.bias`).
    let trained_bias = |key: &str| {
        key.ends_with(".bias")
            && config
                .as_ref()
                .is_some_and(|c| c.trained_bias() != peft_core::TrainedBias::None)
    };
    for entry in &entries {
        match split_adapter_key(&entry.key) {
            None if copied(&entry.key) => copied_modules.push((entry.key.clone(), entry.shape.clone())),
            None if trained_bias(&entry.key) => saved_base_weights.push((entry.key.clone(), entry.shape.clone())),
            Some((_, name)) if name.starts_with("base_layer.") => {
                saved_base_weights.push((entry.key.clone(), entry.shape.clone()));
            }
            Some((module, _)) => by_module.entry(module.to_owned()).or_default().push(entry),
            None => problems.push(Problem {
                at: weights_name.clone(),
                message: format!(
                    "tensor `{}` names no module (keys are `base_model.model.<module>.<adapter tensor>`); \
                     the loader would refuse it as unexpected",
                    entry.key
                ),
            }),
        }
    }

    // Each module: its kind's tensors, their ranks.
    let kind = config.as_ref().map(|c| c.peft_type().to_owned()).or(peft_type.clone());
    let mut modules = Vec::new();
    let mut checkable = BTreeSet::new();
    for (module, tensors) in &by_module {
        let shapes: BTreeMap<&str, &[usize]> = tensors
            .iter()
            .filter_map(|e| Some((split_adapter_key(&e.key)?.1, e.shape.as_slice())))
            .collect();
        let before = problems.len();
        if let Some(kind) = &kind {
            problems.extend(tensor_set_problems(kind, use_dora, module, &shapes));
            if problems.len() == before {
                problems.extend(rank_problems(kind, &fields, module, &shapes));
            }
        }
        let sound = tensors.iter().all(|e| e.tensor.is_some());
        if sound && problems.len() == before {
            checkable.insert(module.clone());
        }
        modules.push(ModuleReport {
            module: module.clone(),
            tensors: tensors
                .iter()
                .map(|e| {
                    let name = split_adapter_key(&e.key).map_or(e.key.as_str(), |(_, name)| name);
                    (name.to_owned(), e.shape.clone(), e.dtype.clone())
                })
                .collect(),
            parameters: tensors.iter().map(|e| e.shape.iter().product::<usize>()).sum(),
            layout: ModuleLayout::from_tensors(|name| shapes.get(name).copied()),
            delta_norm: None,
        });
    }

    // The loader's own checks, module by module, and the norms.
    let norms_of = match (&config, &text) {
        (Some(config), Some(text)) => {
            let sound: Vec<(String, Tensor)> = entries
                .iter()
                .filter(|e| split_adapter_key(&e.key).is_some_and(|(module, _)| checkable.contains(module)))
                .filter_map(|e| Some((e.key.clone(), e.tensor.clone()?)))
                .collect();
            let mut norms = ModuleNorms {
                dir,
                problems: &mut problems,
            };
            norms.check(text, &fields, config.peft_type(), &sound, &mut modules, &checkable)
        }
        _ => NormsOf::NotComputed("the module checks and norms need a config that loads".to_owned()),
    };

    let parameters = modules.iter().map(|m| m.parameters).sum();
    let fields_shown = SHOWN_FIELDS
        .iter()
        .filter_map(|name| {
            let value = fields.get(*name)?;
            let empty = value.is_null() || value.as_object().is_some_and(Map::is_empty);
            (!empty).then(|| ((*name).to_owned(), value.clone()))
        })
        .collect();
    InspectReport {
        dir: dir.to_path_buf(),
        peft_type,
        use_dora,
        use_rslora: flag("use_rslora"),
        fields: fields_shown,
        base_model: string("base_model_name_or_path"),
        revision: string("revision"),
        task_type: string("task_type"),
        modules,
        parameters,
        saved_base_weights,
        copied_modules,
        dtypes: dtypes.into_iter().collect(),
        norms_of,
        problems,
    }
}

fn problem(at: &str, error: impl std::fmt::Display) -> Problem {
    Problem {
        at: at.to_owned(),
        message: error.to_string(),
    }
}

/// The tensors each of PEFT's kinds needs for a module (names within the
/// module), and the ones it may have.
fn tensor_set_problems(kind: &str, dora: bool, module: &str, shapes: &BTreeMap<&str, &[usize]>) -> Vec<Problem> {
    let has = |name: &str| shapes.contains_key(name);
    // Alternatives: each inner list is one way to have the part.
    let needed: Vec<Vec<Vec<&str>>> = match kind {
        "LORA" if has("lora_embedding_A") || has("lora_embedding_B") => {
            vec![vec![vec!["lora_embedding_A"]], vec![vec!["lora_embedding_B"]]]
        }
        "LORA" => {
            let mut parts = vec![vec![vec!["lora_A.weight"]], vec![vec!["lora_B.weight"]]];
            if dora {
                parts.push(vec![vec!["lora_magnitude_vector"]]);
            }
            parts
        }
        "LOHA" => ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
            .iter()
            .map(|name| vec![vec![*name]])
            .collect(),
        "LOKR" => vec![
            vec![vec!["lokr_w1"], vec!["lokr_w1_a", "lokr_w1_b"]],
            vec![vec!["lokr_w2"], vec!["lokr_w2_a", "lokr_w2_b"]],
        ],
        "IA3" => vec![vec![vec!["ia3_l"]]],
        // A kind registered elsewhere: the loader's checks alone.
        _ => return Vec::new(),
    };
    let allowed: BTreeSet<&str> = needed.iter().flatten().flatten().copied().collect();
    let mut problems = Vec::new();
    for (name, _) in shapes.iter().filter(|(name, _)| !allowed.contains(*name)) {
        let why = if *name == "lora_magnitude_vector" {
            "DoRA's magnitude, but the config does not set use_dora".to_owned()
        } else {
            format!("not a tensor of a {kind} adapter")
        };
        problems.push(Problem {
            at: module.to_owned(),
            message: format!(
                "tensor `base_model.model.{module}.{name}`: {why}; the loader would refuse it as unexpected"
            ),
        });
    }
    for part in &needed {
        if part.iter().any(|way| way.iter().all(|name| has(name))) {
            continue;
        }
        // Name what is missing from the way the module started, else the first.
        let way = part
            .iter()
            .find(|way| way.iter().any(|name| has(name)))
            .unwrap_or(&part[0]);
        for name in way.iter().filter(|name| !has(name)) {
            problems.push(problem(
                module,
                PeftError::MissingTensor {
                    module: module.to_owned(),
                    key: format!("base_model.model.{module}.{name}"),
                },
            ));
        }
    }
    problems
}

/// Each tensor's rank against the `r` the config gives the module (after
/// `rank_pattern`), for LoRA, LoHa and LoKr.
fn rank_problems(
    kind: &str,
    fields: &Map<String, Value>,
    module: &str,
    shapes: &BTreeMap<&str, &[usize]>,
) -> Vec<Problem> {
    // (tensor, the dimension holding the rank)
    let rank_dims: &[(&str, usize)] = match kind {
        "LORA" => &[
            ("lora_A.weight", 0),
            ("lora_B.weight", 1),
            ("lora_embedding_A", 0),
            ("lora_embedding_B", 1),
        ],
        "LOHA" => &[("hada_w1_a", 1), ("hada_w1_b", 0), ("hada_w2_a", 1), ("hada_w2_b", 0)],
        "LOKR" => &[("lokr_w1_a", 1), ("lokr_w1_b", 0), ("lokr_w2_a", 1), ("lokr_w2_b", 0)],
        _ => return Vec::new(),
    };
    let default_r = fields.get("r").and_then(Value::as_u64).unwrap_or(8);
    let patterns: Vec<(String, usize)> = fields
        .get("rank_pattern")
        .and_then(Value::as_object)
        .map(|patterns| {
            patterns
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), usize::try_from(v.as_u64()?).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut from = "`r`".to_owned();
    let mut r = default_r as usize;
    for (pattern, value) in &patterns {
        // A pattern that does not compile is the config's problem, reported there.
        let one = [(pattern.clone(), *value)];
        if let Ok(Some(value)) = peft_core::config_file::pattern_value(&one, module) {
            r = value;
            from = format!("`rank_pattern` entry `{pattern}`");
            break;
        }
    }
    rank_dims
        .iter()
        .filter_map(|(name, dim)| {
            let shape = shapes.get(name)?;
            let found = *shape.get(*dim)?;
            (found != r).then(|| Problem {
                at: module.to_owned(),
                message: format!(
                    "tensor `base_model.model.{module}.{name}` {shape:?} has rank {found}, but the config gives \
                     this module r = {r} ({from})"
                ),
            })
        })
        .collect()
}

/// The loader's checks of each module and the norms, over the sound tensors.
struct ModuleNorms<'a> {
    dir: &'a Path,
    problems: &'a mut Vec<Problem>,
}

impl ModuleNorms<'_> {
    fn check(
        &mut self,
        text: &str,
        fields: &Map<String, Value>,
        peft_type: &str,
        sound: &[(String, Tensor)],
        modules: &mut [ModuleReport],
        checkable: &BTreeSet<String>,
    ) -> NormsOf {
        let Some(adapter) = self.adapter(text, sound) else {
            return NormsOf::NotComputed("the sound tensors do not load".to_owned());
        };
        let dora = adapter.field("use_dora").and_then(Value::as_bool).unwrap_or(false);
        // DoRA's LoRA part: the same file as plain LoRA, without the magnitudes.
        let lora_part = if dora {
            let mut plain = fields.clone();
            plain.insert("use_dora".to_owned(), Value::Bool(false));
            let without: Vec<(String, Tensor)> = sound
                .iter()
                .filter(|(key, _)| !key.ends_with(".lora_magnitude_vector"))
                .cloned()
                .collect();
            self.adapter(&Value::Object(plain).to_string(), &without)
        } else {
            None
        };
        let norms_of = if adapter.is_additive() {
            NormsOf::Delta
        } else if lora_part.is_some() {
            NormsOf::LoraPart
        } else {
            NormsOf::NotComputed(format!(
                "a {peft_type} adapter's change depends on the base weights; convert it with --model to measure it"
            ))
        };
        for report in modules.iter_mut().filter(|m| checkable.contains(&m.module)) {
            let module = report.module.as_str();
            let measured = if adapter.is_additive() {
                module_delta(self.dir, &adapter, module, None).map(Some)
            } else {
                self.load_check(&adapter, module, report.layout.clone())
                    .and_then(|()| match &lora_part {
                        Some(lora) => module_delta(self.dir, lora, module, None).map(Some),
                        None => Ok(None),
                    })
            };
            match measured.and_then(|delta| delta.map(|d| frobenius_norm(&d.delta)).transpose()) {
                Ok(norm) => report.delta_norm = norm,
                Err(error) => self.problems.push(module_problem(module, error)),
            }
        }
        norms_of
    }

    /// A standalone adapter of `text` and `tensors`, or a problem.
    fn adapter(&mut self, text: &str, tensors: &[(String, Tensor)]) -> Option<StandaloneAdapter> {
        let bytes = safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(|e| e.to_string())
            .and_then(|bytes| StandaloneAdapter::from_bytes(text, &bytes).map_err(|e| e.to_string()));
        match bytes {
            Ok(adapter) => Some(adapter),
            Err(message) => {
                self.problems.push(Problem {
                    at: WEIGHTS_FILE.to_owned(),
                    message,
                });
                None
            }
        }
    }

    /// The loader's checks of one module of a kind that is not additive:
    /// merged alone into a base of ones (zeros would make DoRA divide by 0)
    /// of the shape its tensors give.
    fn load_check(&self, adapter: &StandaloneAdapter, module: &str, layout: Option<ModuleLayout>) -> crate::Result<()> {
        let layout = layout
            .or_else(|| ia3_layout(adapter, module))
            .ok_or_else(|| ModelError::AdapterMismatch {
                adapter: self.dir.to_path_buf(),
                reason: format!("module `{module}`: its tensors do not give the layer's shape"),
            })?;
        let ones = Tensor::ones(layout.stored_dims(adapter.fan_in_fan_out()), DType::F64, &Device::Cpu)?;
        adapter.merge_module(module, layout.base(ones, adapter, module)?)?;
        Ok(())
    }
}

/// IA³'s vector `[out, 1]` (or `[1, in]` on a feed-forward layer) fits a
/// linear layer of that many outputs (inputs) and one input (output).
fn ia3_layout(adapter: &StandaloneAdapter, module: &str) -> Option<ModuleLayout> {
    let l = adapter.tensors().get(&format!("base_model.model.{module}.ia3_l"))?;
    match l.dims() {
        [out, 1] => Some(ModuleLayout::Linear { out: *out, inp: 1 }),
        [1, inp] => Some(ModuleLayout::Linear { out: 1, inp: *inp }),
        _ => None,
    }
}

/// A module's problem from the loader's checks: targets that do not select
/// it said as what loading would do.
fn module_problem(module: &str, error: ModelError) -> Problem {
    let unselected = |why: String| {
        format!(
            "the config's targets do not select module `{module}` ({why}); \
             the loader would refuse its tensors as unexpected"
        )
    };
    let message = match &error {
        ModelError::Peft(peft) => match &**peft {
            PeftError::NoTargetMatched { .. } => unselected("`target_modules` does not match it".to_owned()),
            PeftError::AllTargetsExcluded { removed_by, .. } => unselected(format!("{removed_by} removes it")),
            _ => error.to_string(),
        },
        _ => error.to_string(),
    };
    Problem {
        at: module.to_owned(),
        message,
    }
}
