//! [`PeftModel::add_weighted_adapter`]: LoRA adapters of a model combined
//! into a new one, as PEFT's `LoraModel.add_weighted_adapter` (0.21).
//!
//! Everything (checks, every module's new `A` and `B`, the new adapters)
//! is computed before the model changes; then the adapters are inserted
//! at once. An error leaves the model as it was.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{Map, Value};

use crate::error::{InModule, PeftError, Result};
use crate::kinds::config_file::number;
use crate::kinds::{LoraAdapter, LoraConvAdapter, LoraEmbeddingAdapter, RankSettings};
use crate::layer::{Adapter, Layer, LayerKind};
use crate::model::attach::{check_known, check_new_name};
use crate::model::combine_math::{merge, svd_factors};
use crate::model::combine_options::{Combination, CombineOptions};
use crate::model::{check_adapter_name, PeftModel};
/// A source adapter: its name, weight and what its config says.
struct Source<'n> {
    name: &'n str,
    weight: f64,
    config: Arc<Map<String, Value>>,
    ranks: RankSettings,
    rslora: bool,
}

impl<'n> Source<'n> {
    fn of<M: PeftModel + ?Sized>(model: &M, name: &'n str, weight: f64) -> Result<Self> {
        let not = |reason: String| PeftError::NotCombinable {
            adapter: name.to_owned(),
            reason,
        };
        let layers = model.layers();
        let Some(layer) = layers.iter().find(|l| l.layer.has_adapter(name)) else {
            return Err(not("no layer holds it".into()));
        };
        let Some(config) = layer.layer.adapter_config(name) else {
            return Err(not(
                "it was attached by hand with Layer::add_adapter, so its config (r, lora_alpha) is unknown".into(),
            ));
        };
        let peft_type = config.get("peft_type").and_then(Value::as_str).unwrap_or("?");
        if peft_type != crate::kinds::lora::PEFT_TYPE {
            return Err(not(format!(
                "it is {peft_type}; add_weighted_adapter combines LoRA adapters only"
            )));
        }
        if config.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
            return Err(not(
                "it is DoRA (use_dora); its magnitude vector depends on the base weight and does not combine".into(),
            ));
        }
        let pattern = |field: &str| -> Vec<(String, Value)> {
            config
                .get(field)
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default()
        };
        let ranks = RankSettings {
            r: config.get("r").and_then(Value::as_u64).unwrap_or(8) as usize,
            alpha: config.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
            rank_pattern: pattern("rank_pattern")
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.as_u64()? as usize)))
                .collect(),
            alpha_pattern: pattern("alpha_pattern")
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.as_f64()?)))
                .collect(),
        };
        Ok(Source {
            name,
            weight,
            rslora: config.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            config: config.clone(),
            ranks,
        })
    }

    /// PEFT's rank for sizing the new adapter: `r`, or the largest of `r`
    /// and `rank_pattern`'s ranks.
    fn max_rank(&self) -> usize {
        self.ranks
            .rank_pattern
            .iter()
            .map(|(_, r)| *r)
            .fold(self.ranks.r, usize::max)
    }
}

/// One source's `A` and `B` on one module, flattened, and its scaling.
struct Factors {
    a: Vec<f64>,
    b: Vec<f64>,
    a_dims: Vec<usize>,
    b_dims: Vec<usize>,
    rank: usize,
    scale: f64,
}

/// The new adapter's tensors on one module.
struct NewFactors {
    a: Vec<f64>,
    b: Vec<f64>,
}

/// [`PeftModel::add_weighted_adapter`].
pub(crate) fn add_weighted<M: PeftModel + ?Sized>(
    model: &mut M,
    adapters: &[&str],
    weights: &[f64],
    name: &str,
    options: &CombineOptions,
) -> Result<()> {
    check_adapter_name(name)?;
    check_new_name(model, name)?;
    if adapters.is_empty() {
        return Err(PeftError::InvalidConfig {
            field: "adapters",
            value: "[]".into(),
            reason: "name at least one adapter to combine",
        });
    }
    if adapters.len() != weights.len() {
        return Err(PeftError::WeightsLength {
            adapters: adapters.len(),
            weights: weights.len(),
        });
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(PeftError::InvalidConfig {
            field: "weights",
            value: w.to_string(),
            reason: "every weight must be a finite number",
        });
    }
    check_known(adapters, &model.adapter_names())?;
    // As PEFT: one adapter is always combined linearly.
    let combination = if adapters.len() == 1 {
        Combination::Linear
    } else {
        options.combination
    };
    let density = options.checked(combination)?;
    let sources = adapters
        .iter()
        .zip(weights)
        .map(|(name, &w)| Source::of(model, name, w))
        .collect::<Result<Vec<_>>>()?;
    let new_rank = new_rank(combination, &sources, options.svd_rank)?;

    let config = sources[0].config.clone();
    let rslora = sources[0].rslora;
    let dropout = config.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    // r = lora_alpha = new rank: scaling 1 (√r with rsLoRA, as PEFT's config copy gives).
    let scale = if rslora { (new_rank as f64).sqrt() } else { 1.0 };

    let (planned, modules) = {
        let layers = model.layers();
        let mut planned = Vec::new();
        let mut modules = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let mut present = Vec::new();
            for source in &sources {
                if let Some(adapter) = l.layer.adapter(source.name) {
                    present.push((source, factors(source, &l.path, adapter)?));
                }
            }
            if present.is_empty() {
                continue;
            }
            let (a_dims, b_dims) = dims_of(&l.path, &present)?;
            let new = combine_module(
                combination,
                options,
                density,
                new_rank,
                &l.path,
                &present,
                &a_dims,
                &b_dims,
            )?;
            let adapter = new_adapter(l.layer, &l.path, new, new_rank, &a_dims, &b_dims, scale, dropout)?;
            l.layer.check_attach(name, &*adapter).in_module(&l.path)?;
            planned.push((i, adapter));
            modules.push(l.path.clone());
        }
        (planned, modules)
    };
    let mut config = Map::clone(&config);
    config.insert("r".into(), Value::from(new_rank));
    config.insert("lora_alpha".into(), number(new_rank as f64));
    config.insert("rank_pattern".into(), Value::Object(Map::new()));
    config.insert("alpha_pattern".into(), Value::Object(Map::new()));
    config.insert("target_modules".into(), Value::from(modules));
    let saved = Arc::new(config);
    let mut layers = model.layers_mut();
    for (i, adapter) in planned {
        layers[i].layer.insert_adapter(name, adapter, Some(saved.clone()));
    }
    Ok(())
}

/// PEFT's new rank: the one rank of `linear` and the non-SVD pruning types,
/// the sum for `cat`, `svd_rank` or the largest for the SVD types.
fn new_rank(combination: Combination, sources: &[Source<'_>], svd_rank: Option<usize>) -> Result<usize> {
    let ranks: Vec<usize> = sources.iter().map(Source::max_rank).collect();
    Ok(if combination == Combination::Cat {
        ranks.iter().sum()
    } else if combination.uses_svd() {
        svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1))
    } else {
        if ranks.iter().any(|&r| r != ranks[0]) {
            let listed: Vec<String> = sources
                .iter()
                .zip(&ranks)
                .map(|(s, r)| format!("{}: r = {r}", s.name))
                .collect();
            return Err(PeftError::RankMismatch {
                combination: combination.as_str(),
                ranks: listed.join(", "),
            });
        }
        ranks[0]
    })
}

/// `A` and `B` of a LoRA adapter of `source` at `path`, with its scaling.
fn factors(source: &Source<'_>, path: &str, adapter: &dyn Adapter) -> Result<Factors> {
    let not = |what: String| PeftError::NotCombinable {
        adapter: source.name.to_owned(),
        reason: format!("module `{path}`: {what}"),
    };
    if adapter.peft_type() != crate::kinds::lora::PEFT_TYPE {
        return Err(not(format!("it is {}, not LoRA", adapter.peft_type())));
    }
    let vars = adapter.trainable_vars();
    let find = |keys: [&str; 2]| vars.iter().find(|(k, _)| keys.contains(k)).map(|(_, v)| v.clone());
    let (Some(a), Some(b), 2) = (
        find(["lora_A.weight", "lora_embedding_A"]),
        find(["lora_B.weight", "lora_embedding_B"]),
        vars.len(),
    ) else {
        let keys: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
        return Err(not(format!(
            "its tensors {keys:?} are not plain LoRA's A and B (DoRA?)"
        )));
    };
    let host = |t: &Var| -> Result<Vec<f64>> {
        t.as_tensor()
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .in_module(path)
    };
    let rank = a.dims()[0];
    let (_, alpha) = source.ranks.rank_and_alpha(path)?;
    let scale = if source.rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    };
    Ok(Factors {
        a: host(&a)?,
        b: host(&b)?,
        a_dims: a.dims().to_vec(),
        b_dims: b.dims().to_vec(),
        rank,
        scale,
    })
}

/// The shapes of `A` and `B` at `path` with rank 1 in place of `r`; a
/// source whose other dimensions differ is refused.
fn dims_of(path: &str, present: &[(&Source<'_>, Factors)]) -> Result<(Vec<usize>, Vec<usize>)> {
    let (first, f) = &present[0];
    let (mut a_dims, mut b_dims) = (f.a_dims.clone(), f.b_dims.clone());
    if a_dims.len() < 2 || b_dims.len() < 2 {
        return Err(PeftError::NotCombinable {
            adapter: first.name.to_owned(),
            reason: format!("module `{path}`: LoRA tensors of unexpected shapes {a_dims:?}, {b_dims:?}"),
        });
    }
    a_dims[0] = 1;
    b_dims[1] = 1;
    let (a_size, b_size): (usize, usize) = (a_dims.iter().product(), b_dims.iter().product());
    for (source, f) in present {
        if f.a.len() != a_size * f.rank || f.b.len() != b_size * f.rank {
            return Err(PeftError::NotCombinable {
                adapter: source.name.to_owned(),
                reason: format!(
                    "module `{path}`: its A and B do not fit the shapes of `{}`'s ({a_dims:?}, {b_dims:?} at rank 1)",
                    first.name
                ),
            });
        }
    }
    Ok((a_dims, b_dims))
}

/// Rounds to f32, as `torch.tensor(list_of_floats)` does with PEFT's weights.
fn as_f32(x: f64) -> f64 {
    f64::from(x as f32)
}

/// The new `A` `[new_rank, in·k]` and `B` `[out, new_rank]` (row-major) of one module.
#[allow(clippy::too_many_arguments)]
fn combine_module(
    combination: Combination,
    options: &CombineOptions,
    density: f64,
    new_rank: usize,
    path: &str,
    present: &[(&Source<'_>, Factors)],
    a_dims: &[usize],
    b_dims: &[usize],
) -> Result<NewFactors> {
    let cols: usize = a_dims.iter().product();
    let rows = b_dims[0];
    let sign = options.majority_sign_method;
    if combination.uses_svd() {
        let deltas: Vec<Vec<f64>> = present.iter().map(|(_, f)| delta(f, rows, cols)).collect();
        let weights: Vec<f64> = present.iter().map(|(s, _)| as_f32(s.weight)).collect();
        let delta = merge(combination.rule(), &deltas, &weights, density, sign).in_module(path)?;
        if new_rank > rows.min(cols) {
            return Err(PeftError::SvdRankTooLarge {
                module: path.to_owned(),
                rank: new_rank,
                shape: vec![rows, cols],
            });
        }
        let (b, a) =
            svd_factors(&delta, rows, cols, new_rank, options.svd_clamp).map_err(|message| PeftError::Module {
                module: path.to_owned(),
                cause: candle_core::Error::Msg(message),
            })?;
        return Ok(NewFactors { a, b });
    }
    if combination == Combination::Cat {
        let mut a = Vec::with_capacity(new_rank * cols);
        for (source, f) in present {
            let w = source.weight * f.scale;
            a.extend(f.a.iter().map(|x| x * w));
        }
        let total: usize = present.iter().map(|(_, f)| f.rank).sum();
        a.resize(new_rank * cols, 0.0);
        let mut b = vec![0.0; rows * new_rank];
        let mut offset = 0;
        for (_, f) in present {
            for i in 0..rows {
                for j in 0..f.rank {
                    b[i * new_rank + offset + j] = f.b[i * f.rank + j];
                }
            }
            offset += f.rank;
        }
        debug_assert_eq!(offset, total);
        return Ok(NewFactors { a, b });
    }
    let rank = present[0].1.rank;
    if let Some((source, f)) = present.iter().find(|(_, f)| f.rank != rank) {
        return Err(PeftError::RankMismatch {
            combination: combination.as_str(),
            ranks: format!(
                "{}: r = {rank}, {}: r = {} on module `{path}` (rank_pattern)",
                present[0].0.name, source.name, f.rank
            ),
        });
    }
    // √|w·s| on both, the sign on A only, so the signs do not cancel.
    let (mut weights_a, mut weights_b) = (Vec::new(), Vec::new());
    for (source, f) in present {
        let ws = source.weight * f.scale;
        let root = ws.abs().sqrt();
        weights_a.push(as_f32(if ws >= 0.0 { root } else { -root }));
        weights_b.push(as_f32(root));
    }
    let a_list: Vec<Vec<f64>> = present.iter().map(|(_, f)| f.a.clone()).collect();
    let b_list: Vec<Vec<f64>> = present.iter().map(|(_, f)| f.b.clone()).collect();
    let rule = combination.rule();
    let a = merge(rule, &a_list, &weights_a, density, sign).in_module(path)?;
    let b = merge(rule, &b_list, &weights_b, density, sign).in_module(path)?;
    // A module whose rank (rank_pattern) is below the new r: zeros fill the
    // rest, so the file matches its config (PEFT would write the smaller
    // tensors under the larger r).
    let mut a = a;
    a.resize(new_rank * cols, 0.0);
    let b = (0..rows)
        .flat_map(|i| (0..new_rank).map(move |j| (i, j)))
        .map(|(i, j)| if j < rank { b[i * rank + j] } else { 0.0 })
        .collect();
    Ok(NewFactors { a, b })
}

/// `s · B A`, `[rows, cols]` row-major.
fn delta(f: &Factors, rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for k in 0..f.rank {
            let b = f.b[i * f.rank + k] * f.scale;
            if b == 0.0 {
                continue;
            }
            let a_row = &f.a[k * cols..(k + 1) * cols];
            for (o, a) in out[i * cols..(i + 1) * cols].iter_mut().zip(a_row) {
                *o += b * a;
            }
        }
    }
    out
}

/// The new adapter of the layer's kind from `new`, in the layer's dtype
/// and device.
#[allow(clippy::too_many_arguments)]
fn new_adapter(
    layer: &Layer,
    path: &str,
    new: NewFactors,
    rank: usize,
    a_dims: &[usize],
    b_dims: &[usize],
    scale: f64,
    dropout: f32,
) -> Result<Box<dyn Adapter>> {
    let (mut a_shape, mut b_shape) = (a_dims.to_vec(), b_dims.to_vec());
    a_shape[0] = rank;
    b_shape[1] = rank;
    let dtype = layer
        .adapter_names()
        .next()
        .and_then(|n| layer.adapter(n))
        .and_then(|a| a.trainable_vars().first().map(|(_, v)| v.dtype()))
        .unwrap_or_else(|| layer.dtype());
    let device = layer.device();
    let var = |data: Vec<f64>, shape: Vec<usize>| -> Result<Var> {
        let t = Tensor::from_vec(data, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(&device))
            .in_module(path)?;
        Var::from_tensor(&t).in_module(path)
    };
    let (a, b) = (var(new.a, a_shape)?, var(new.b, b_shape)?);
    Ok(match layer.kind() {
        LayerKind::Embedding => Box::new(LoraEmbeddingAdapter::new(a, b, scale).in_module(path)?),
        LayerKind::Conv => {
            let Some(geometry) = layer.conv_geometry() else {
                return Err(PeftError::Module {
                    module: path.to_owned(),
                    cause: candle_core::Error::Msg("a convolution slot without its geometry".into()),
                });
            };
            Box::new(LoraConvAdapter::new(a, b, scale, dropout, geometry).in_module(path)?)
        }
        _ => Box::new(LoraAdapter::new(a, b, scale, dropout).in_module(path)?),
    })
}
