//! What the fuzz targets share: a small model with one layer slot of every
//! kind, the input format of the load targets, the table of known-good adapter
//! configs, and the checks each target runs.
//!
//! The model's top-level names and shapes are the union of the tiny fixtures
//! in `tests/fixtures/` (`dora_tiny`, `loha_tiny`, `lokr_tiny`,
//! `lora_conv_tiny`, `lora_embedding_tiny`), so those adapters, written by
//! Python PEFT, load onto it as they are: the seeds start the fuzzer on real
//! files that reach the end of the loading path. See `docs/FUZZING.md`.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use peft_core::config_file::parse_config;
use peft_core::Ia3Config;
use peft_core::LohaConfig;
use peft_core::{LokrConfig, LokrInit};
use peft_core::prelude::*;
use peft_core::{AdapterConfig, Conv1d, Conv2d, Embedding, CONFIG_FILE};
use serde_json::Value;

/// One of the blocks `layers.N`, for `layers_to_transform`.
#[derive(Adaptable, Clone)]
pub struct Block {
    /// `[4 -> 4]`, with bias.
    pub q: Linear,
    /// `[4 -> 4]`, no bias.
    pub v: Linear,
}

/// The model every execution runs on: small, so that an execution is cheap,
/// with every kind of layer slot peft-core has.
#[derive(Adaptable, Clone)]
pub struct FuzzModel {
    /// Embedding `[10, 4]` (`lora_embedding_tiny`).
    pub embed: Embedding,
    /// `[4 -> 6]`, bias (`lora_embedding_tiny`).
    pub proj: Linear,
    /// `[4 -> 6]`, bias (`dora_tiny`).
    pub up: Linear,
    /// `[6 -> 3]`, no bias (`dora_tiny`).
    pub down: Linear,
    /// `[8 -> 12]`, bias (`loha_tiny`, `lokr_tiny`).
    pub fc1: Linear,
    /// `[12 -> 20]`, no bias (`loha_tiny`, `lokr_tiny`).
    pub fc2: Linear,
    /// Conv1d 3 -> 4, kernel 3, padding 1, bias (`lora_conv_tiny`).
    pub c1: Conv1d,
    /// Conv2d 2 -> 5, kernel 3, stride 2, padding 1, no bias (`lora_conv_tiny`).
    pub c2: Conv2d,
    /// Two blocks.
    pub layers: Vec<Block>,
    /// `[4 -> 8]` stored `[in, out]` as GPT-2's `Conv1D` (`fan_in_fan_out`).
    pub c_attn: Linear,
    /// `[32 -> 4]` quantized to Q8_0 (QLoRA: merging is refused).
    pub quant: Linear,
    /// `[6 -> 5]`, the output head: `all-linear` leaves it alone.
    #[output_head]
    pub head: Linear,
}

/// Deterministic values in (-0.5, 0.5) of `shape`, different for each `seed`.
fn values(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let build = || {
        Tensor::arange(0u32, n as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .affine(0.731, seed)?
            .sin()?
            .affine(0.5, 0.0)?
            .reshape(shape)
    };
    build().expect("building a small tensor on the CPU")
}

fn dense(out: usize, inp: usize, bias: bool, seed: f64) -> Linear {
    Linear::new(values(&[out, inp], seed), bias.then(|| values(&[out], seed + 0.5)))
}

impl FuzzModel {
    /// The model, with fixed weights.
    pub fn new() -> FuzzModel {
        let conv1 = candle_nn::Conv1dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv2 = candle_nn::Conv2dConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        let quant = QTensor::quantize(&values(&[4, 32], 11.0), GgmlDType::Q8_0).expect("Q8_0 of a [4, 32] weight");
        FuzzModel {
            embed: Embedding::new(values(&[10, 4], 1.0), 4).expect("a 2-D table"),
            proj: dense(6, 4, true, 2.0),
            up: dense(6, 4, true, 3.0),
            down: dense(3, 6, false, 4.0),
            fc1: dense(12, 8, true, 5.0),
            fc2: dense(20, 12, false, 6.0),
            c1: Conv1d::new(values(&[4, 3, 3], 7.0), Some(values(&[4], 7.5)), conv1).expect("a 1-D kernel"),
            c2: Conv2d::new(values(&[5, 2, 3, 3], 8.0), None, conv2).expect("a 2-D kernel"),
            layers: (0..2)
                .map(|i| Block {
                    q: dense(4, 4, true, 9.0 + i as f64),
                    v: dense(4, 4, false, 9.5 + i as f64),
                })
                .collect(),
            c_attn: Linear::from_fan_in_fan_out(values(&[4, 8], 10.0), Some(values(&[8], 10.5))).expect("a 2-D weight"),
            quant: Linear::from_qtensor(Arc::new(quant), Some(values(&[4], 11.5))).expect("a Q8_0 weight"),
            head: dense(5, 6, true, 12.0),
        }
    }

    /// Every slot's output on a fixed input (the slots are not chained: each
    /// gets an input of its own shape, so any adapter on any slot is run).
    pub fn forward_all(&self) -> candle_core::Result<Vec<Tensor>> {
        let ids = Tensor::new(&[[0u32, 3, 9], [1, 2, 8]], &Device::Cpu)?;
        let x = |shape: &[usize], seed: f64| values(shape, 20.0 + seed);
        let mut out = vec![
            self.embed.forward(&ids)?,
            self.proj.forward(&x(&[2, 4], 1.0))?,
            self.up.forward(&x(&[2, 4], 2.0))?,
            self.down.forward(&x(&[2, 6], 3.0))?,
            self.fc1.forward(&x(&[2, 8], 4.0))?,
            self.fc2.forward(&x(&[2, 12], 5.0))?,
            self.c1.forward(&x(&[1, 3, 7], 6.0))?,
            self.c2.forward(&x(&[1, 2, 6, 6], 7.0))?,
            self.c_attn.forward(&x(&[2, 4], 8.0))?,
            self.quant.forward(&x(&[2, 32], 9.0))?,
            self.head.forward(&x(&[2, 6], 10.0))?,
        ];
        for block in &self.layers {
            out.push(block.q.forward(&x(&[2, 4], 11.0))?);
            out.push(block.v.forward(&x(&[2, 4], 12.0))?);
        }
        Ok(out)
    }
}

impl Default for FuzzModel {
    fn default() -> Self {
        Self::new()
    }
}

/// A tensor's values as bit patterns, to compare exactly (NaN included).
fn bits(tensor: &Tensor) -> Vec<u32> {
    let values = tensor
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>());
    values.expect("a CPU tensor").into_iter().map(f32::to_bits).collect()
}

/// What a layer holds and how it is set: enough to tell that a failed
/// operation changed nothing. (Cheaper than comparing forward passes, which
/// would double the time of an execution that fails, as most do.)
#[derive(Debug, PartialEq)]
pub struct LayerState {
    path: String,
    weight: Vec<u32>,
    bias: Option<Vec<u32>>,
    /// Each adapter: name, active.
    adapters: Vec<(String, bool)>,
    merged: Vec<String>,
    enabled: bool,
    training: bool,
    /// The trainable tensors of the active adapters, by key.
    vars: Vec<(String, Vec<u32>)>,
}

/// Every layer's [`LayerState`], in field order.
pub fn snapshot(model: &FuzzModel) -> Vec<LayerState> {
    model
        .layers()
        .into_iter()
        .map(|l| LayerState {
            weight: bits(l.layer.weight().expect("the weight of a layer")),
            bias: l.layer.bias().map(bits),
            adapters: l
                .layer
                .adapter_names()
                .map(|n| (n.to_owned(), l.layer.is_active(n)))
                .collect(),
            merged: l.layer.merged_adapter_names().map(str::to_owned).collect(),
            enabled: l.layer.adapters_enabled(),
            training: l.layer.is_training(),
            vars: l
                .layer
                .trainable_vars()
                .into_iter()
                .map(|(k, v)| (k, bits(v.as_tensor())))
                .collect(),
            path: l.path,
        })
        .collect()
}

/// A model made once per process, and its [`snapshot`].
pub struct Template {
    /// The model; each execution works on a clone (tensors are shared, and
    /// every change peft-core makes replaces tensors rather than writing into
    /// them, so the template stays as it is).
    pub model: FuzzModel,
    /// [`snapshot`] of `model`.
    pub state: Vec<LayerState>,
}

impl Template {
    fn new(model: FuzzModel) -> Template {
        model.forward_all().expect("the forward pass of the template");
        let state = snapshot(&model);
        Template { model, state }
    }
}

/// The two models an execution starts from.
pub struct Templates {
    /// No adapter.
    pub bare: Template,
    /// Already holding a LoRA adapter `"default"` (the dense linear layers:
    /// merging stays possible) and an
    /// IA³ adapter `"ia3"` (`fc1`, `fc2`), both active: loading a second
    /// adapter, a name that exists, merging several.
    pub adapted: Template,
}

/// The templates, built on first use.
pub fn templates() -> &'static Templates {
    static TEMPLATES: OnceLock<Templates> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        // One thread: on tensors this small, threads made an execution 30
        // times slower. Candle reads this at each matmul, rayon when its pool
        // starts; it is set on the first execution, before either runs.
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let bare = FuzzModel::new();
        let mut adapted = bare.clone();
        adapted
            .add_adapter(
                "default",
                &LoraConfig::from(all_linear().exclude(["quant"]))
                    .rank(2)
                    .init(LoraInit::Random),
            )
            .expect("LoRA on the dense linear layers");
        adapted
            .add_adapter("ia3", &Ia3Config::from(modules(["fc1", "fc2"])).init(false))
            .expect("IA3 on fc1 and fc2");
        adapted
            .set_active_adapters(&["default", "ia3"])
            .expect("both adapters exist");
        Templates {
            bare: Template::new(bare),
            adapted: Template::new(adapted),
        }
    })
}

// ---- the load targets' input ---------------------------------------------------

/// Flag bits of the first input byte of `load_adapter` (and of
/// [`exercise_load`]).
pub mod flags {
    /// Bits 0-1: the adapter name, see [`adapter_name`](super::adapter_name).
    pub const NAME: u8 = 0b11;
    /// Bit 2: start from [`Templates::adapted`](super::Templates::adapted).
    pub const ADAPTED: u8 = 0b100;
    /// Bit 3: run the forward passes after a load in training mode (dropout).
    pub const TRAINING: u8 = 0b1000;
}

/// The adapter name that flag bits 0-1 choose: `"default"`, `"other"`,
/// `"ia3"` (taken in the adapted template) or `"../up"` (refused).
pub fn adapter_name(flag_bits: u8) -> &'static str {
    ["default", "other", "ia3", "../up"][usize::from(flag_bits & flags::NAME)]
}

/// One input of the `load_adapter` target:
///
/// ```text
/// byte 0        flags (see [`flags`])
/// bytes 1-2     n, the length of the config text, u16 little-endian
/// bytes 3..3+n  adapter_config.json (invalid UTF-8 replaced by U+FFFD)
/// the rest      adapter_model.safetensors
/// ```
///
/// A length past the end takes everything that is left as the config (and
/// no weights); an input shorter than 3 bytes is skipped.
pub struct LoadInput<'a> {
    /// The flag byte.
    pub flags: u8,
    /// The config text.
    pub config: Cow<'a, str>,
    /// The safetensors bytes.
    pub weights: &'a [u8],
}

impl<'a> LoadInput<'a> {
    /// Splits `data` as described on the type.
    pub fn parse(data: &'a [u8]) -> Option<LoadInput<'a>> {
        let (&[flags, lo, hi], rest) = data.split_first_chunk::<3>()?;
        let n = usize::from(u16::from_le_bytes([lo, hi])).min(rest.len());
        let (config, weights) = rest.split_at(n);
        Some(LoadInput {
            flags,
            config: String::from_utf8_lossy(config),
            weights,
        })
    }

    /// The bytes that [`parse`](Self::parse) splits back into these parts.
    pub fn encode(flags: u8, config: &str, weights: &[u8]) -> Vec<u8> {
        let n = u16::try_from(config.len()).expect("a config of at most 64 KiB");
        let mut data = Vec::with_capacity(3 + config.len() + weights.len());
        data.push(flags);
        data.extend_from_slice(&n.to_le_bytes());
        data.extend_from_slice(config.as_bytes());
        data.extend_from_slice(weights);
        data
    }
}

// ---- known-good configs --------------------------------------------------------

/// A known-good adapter config for the model.
pub struct Case {
    /// A short name, used for seed files.
    pub name: &'static str,
    /// The text of `adapter_config.json`.
    pub config: String,
    /// For a fixture, its folder under `tests/fixtures/` (whose
    /// `adapter_model.safetensors` fits the model); `None` for a config made
    /// here, whose seed weights `make_seeds` saves from the model.
    pub fixture: Option<&'static str>,
}

/// Fixture configs, verbatim as Python PEFT wrote them.
const FIXTURES: &[(&str, &str, &str)] = &[
    (
        "dora_tiny",
        "dora_tiny/adapter",
        include_str!("../../tests/fixtures/dora_tiny/adapter/adapter_config.json"),
    ),
    (
        "loha_tiny",
        "loha_tiny/adapter",
        include_str!("../../tests/fixtures/loha_tiny/adapter/adapter_config.json"),
    ),
    (
        "loha_patterns",
        "loha_tiny/adapter_patterns",
        include_str!("../../tests/fixtures/loha_tiny/adapter_patterns/adapter_config.json"),
    ),
    (
        "lokr_tiny",
        "lokr_tiny/adapter",
        include_str!("../../tests/fixtures/lokr_tiny/adapter/adapter_config.json"),
    ),
    (
        "lokr_decompose_both",
        "lokr_tiny/adapter_decompose_both",
        include_str!("../../tests/fixtures/lokr_tiny/adapter_decompose_both/adapter_config.json"),
    ),
    (
        "lora_conv_tiny",
        "lora_conv_tiny/adapter",
        include_str!("../../tests/fixtures/lora_conv_tiny/adapter/adapter_config.json"),
    ),
    (
        "lora_embedding_tiny",
        "lora_embedding_tiny/adapter",
        include_str!("../../tests/fixtures/lora_embedding_tiny/adapter/adapter_config.json"),
    ),
];

/// Configs made with the Rust builders, covering what the fixtures do not:
/// every layer slot, rank and alpha patterns, rsLoRA, dropout, IA³'s two
/// feed-forward forms, exclusions, LoKr's factor options.
pub fn rust_configs() -> Vec<(&'static str, Box<dyn AdapterConfig>)> {
    vec![
        (
            "lora_all_linear",
            Box::new(
                LoraConfig::from(all_linear())
                    .rank(4)
                    .alpha(8.0)
                    .init(LoraInit::Random)
                    .task_type("CAUSAL_LM"),
            ),
        ),
        (
            "lora_patterns",
            Box::new(
                LoraConfig::from(modules(["q", "v"]).layers([1]))
                    .rank(2)
                    .rank_for("q", 3)
                    .alpha_for(r"layers\.1\.v", 5.0)
                    .rslora(true)
                    .dropout(0.1)
                    .init(LoraInit::Random),
            ),
        ),
        (
            "lora_embed_conv",
            Box::new(
                LoraConfig::from(modules(["embed", "c1", "c2", "proj"]))
                    .rank(3)
                    .init(LoraInit::Random),
            ),
        ),
        (
            "dora_all_linear",
            Box::new(
                LoraConfig::from(all_linear().exclude(["quant"]))
                    .rank(2)
                    .dora(true)
                    .init(LoraInit::Random),
            ),
        ),
        (
            "ia3_feedforward_names",
            Box::new(
                Ia3Config::from(all_linear())
                    .feedforward_modules(["fc2", "down"])
                    .init(false),
            ),
        ),
        (
            "ia3_feedforward_regex",
            Box::new(
                Ia3Config::from(regex(r"fc\d|up|down|layers\.\d\.q"))
                    .feedforward_regex(r".*fc1")
                    .init(false),
            ),
        ),
        (
            "loha_exclude",
            Box::new(
                LohaConfig::from(all_linear().exclude(["quant", "c_attn"]))
                    .rank(2)
                    .rank_for("fc2", 3)
                    .alpha_for("up", 2.5)
                    .init_weights(false),
            ),
        ),
        (
            "lokr_factor",
            Box::new(
                LokrConfig::from(modules(["fc1", "fc2", "up", "down", "c_attn", "quant"]))
                    .decompose_both(true)
                    .decompose_factor(2)
                    .rank(1)
                    .init(LokrInit::Random),
            ),
        ),
        (
            "lokr_all_linear",
            Box::new(LokrConfig::from(all_linear()).rank(2).init(LokrInit::Random)),
        ),
    ]
}

/// The config saving writes for `config` on `paths` (the modules it sits
/// on): its own fields plus `target_modules` and, on a fan-in-fan-out layer,
/// `fan_in_fan_out: true`, as `PeftModel::save_adapter` writes it (pretty,
/// keys sorted).
pub fn saved_config(config: &dyn AdapterConfig, paths: &[String]) -> String {
    let mut fields = config.to_peft_config();
    let mut paths = paths.to_vec();
    paths.sort();
    if paths.iter().any(|p| p == "c_attn") {
        fields.insert("fan_in_fan_out".into(), Value::Bool(true));
    }
    fields.insert("target_modules".into(), Value::from(paths));
    // Top-level keys sorted, as PEFT writes them (a no-op unless serde_json
    // keeps insertion order); the patterns inside keep their order.
    fields.sort_keys();
    let mut json = serde_json::to_string_pretty(&Value::Object(fields)).expect("a JSON map serializes");
    json.push('\n');
    json
}

/// The known-good configs: the fixtures, then [`rust_configs`] as saving
/// writes them for the model. `load_weights` picks one by its first byte.
pub fn cases() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        let mut cases: Vec<Case> = FIXTURES
            .iter()
            .map(|&(name, dir, config)| Case {
                name,
                config: config.to_owned(),
                fixture: Some(dir),
            })
            .collect();
        let model = &templates().bare.model;
        for (name, config) in rust_configs() {
            let paths = model
                .targeted_modules(config.targets())
                .expect("a known-good config resolves");
            cases.push(Case {
                name,
                config: saved_config(config.as_ref(), &paths),
                fixture: None,
            });
        }
        cases
    })
}

// ---- the checks ----------------------------------------------------------------

/// The `config` target adds valid configs from code, and `add_adapter`
/// allocates whatever rank it is asked for, as PEFT does (only loading
/// checks a rank against the file: `PeftError::RankBeyondFile`, which the
/// load targets exercise). So that target skips configs with a rank above
/// this, which would only measure the allocator.
pub const MAX_RANK: u64 = 4096;

/// Whether `fields` (a config's `to_peft_config()`) asks for a rank above
/// [`MAX_RANK`], in `r` or `rank_pattern`.
fn huge_rank(fields: &serde_json::Map<String, Value>) -> bool {
    let too_big = |v: &Value| v.as_u64().is_none_or(|r| r > MAX_RANK);
    fields.get("r").is_some_and(too_big)
        || fields
            .get("rank_pattern")
            .and_then(Value::as_object)
            .is_some_and(|ranks| ranks.values().any(too_big))
}

/// The adapter file saving writes for adapter `name` of `model`: the same
/// keys, shapes and values as `PeftModel::save_adapter` writes.
pub fn adapter_bytes(model: &FuzzModel, name: &str) -> Vec<u8> {
    let mut tensors = Vec::new();
    for layer in model.layers() {
        if let Some(adapter) = layer.layer.adapter(name) {
            for (key, var) in adapter.trainable_vars() {
                tensors.push((
                    format!("base_model.model.{}.{key}", layer.path),
                    var.as_tensor().clone(),
                ));
            }
        }
    }
    safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None).expect("serializing CPU tensors")
}

/// Whether two forward passes agree bit for bit (any NaN equal to any NaN).
fn same_outputs(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            let (a, b) = (bits(a), bits(b));
            a.len() == b.len()
                && a.iter()
                    .zip(&b)
                    .all(|(&x, &y)| x == y || (f32::from_bits(x).is_nan() && f32::from_bits(y).is_nan()))
        })
}

/// A config's fields, less `fan_in_fan_out`, which saving sets for
/// fan-in-fan-out layers whatever the config said.
fn comparable(config: &dyn AdapterConfig) -> Value {
    let mut fields = config.to_peft_config();
    fields.remove("fan_in_fan_out");
    Value::Object(fields)
}

/// Saves adapter `name` of `model` (made from `config`) in memory, config and
/// weights as saving writes them, and loads it onto a fresh clone of
/// `template`: it must load, its config must read back as `config`, and it
/// must compute what `model` computes, bit for bit.
fn check_round_trip(model: &FuzzModel, template: &Template, config: &dyn AdapterConfig, name: &str) {
    let paths: Vec<String> = model
        .layers()
        .into_iter()
        .filter(|l| l.layer.has_adapter(name))
        .map(|l| l.path)
        .collect();
    let saved = saved_config(config, &paths);
    let again = match parse_config(&saved, Path::new(CONFIG_FILE)) {
        Ok(again) => again,
        Err(e) => panic!("the saved config does not parse: {e}\n{saved}"),
    };
    assert_eq!(again.peft_type(), config.peft_type(), "saved as another kind\n{saved}");
    let (fields, again_fields) = (comparable(config), comparable(again.as_ref()));
    assert!(
        again_fields == fields,
        "the saved config reads back as another config\n{saved}\nfirst: {fields}\nagain: {again_fields}"
    );

    let weights = adapter_bytes(model, name);
    let mut reloaded = template.model.clone();
    if let Err(e) = reloaded.load_adapter_from_bytes(&saved, &weights, name) {
        panic!("a saved adapter does not load back: {e}\n{saved}");
    }
    assert_eq!(
        reloaded.adapted_modules(),
        model.adapted_modules(),
        "reloaded on other modules\n{saved}"
    );
    let (before, after) = (model.forward_all(), reloaded.forward_all());
    let (before, after) = (before.expect("forward, saved"), after.expect("forward, reloaded"));
    assert!(
        same_outputs(&before, &after),
        "the reloaded adapter computes something else\n{saved}"
    );
}

/// The `config` target: parse and validate `text` as `adapter_config.json`;
/// for a valid config, add it to the model as loading would, give its
/// tensors non-zero values, save it (in memory) and load it back: it must
/// load, read back as the same config, and compute the same outputs.
pub fn exercise_config(text: &str) {
    let path = Path::new(CONFIG_FILE);
    let Ok(config) = parse_config(text, path) else {
        return;
    };
    if huge_rank(&config.to_peft_config()) || config.validate().is_err() {
        return;
    }
    let template = &templates().bare;
    let Ok(paths) = template.model.targeted_modules(config.targets()) else {
        return;
    };
    let mut adapted = template.model.clone();
    if adapted.add_adapter("default", config.as_ref()).is_err() {
        return;
    }
    assert_eq!(
        adapted.adapted_modules(),
        paths,
        "added on other modules than the targets resolved to"
    );
    // Non-zero everywhere (LoRA's B starts at zero), so that the round trip
    // sees every scale and every tensor.
    for (i, (_, var)) in adapted.named_trainable_vars().into_iter().enumerate() {
        var.set(&values(var.dims(), 30.0 + i as f64))
            .expect("a tensor of its own shape");
    }
    check_round_trip(&adapted, template, config.as_ref(), "default");
}

/// The load targets: add the adapter (`config`, `weights`) to a clone of a
/// template model, as `flags` says (see [`flags`]). A failed load must leave
/// the model exactly as it was (same adapters, settings and bit-identical
/// tensors); a loaded adapter must save and load back to the same outputs,
/// and run forward, merge, unmerge and delete without panicking; deleting
/// must give back the model it started from.
pub fn exercise_load(flag_bits: u8, config: &str, weights: &[u8]) {
    let templates = templates();
    let template = if flag_bits & flags::ADAPTED != 0 {
        &templates.adapted
    } else {
        &templates.bare
    };
    let mut model = template.model.clone();
    let name = adapter_name(flag_bits);

    if model.load_adapter_from_bytes(config, weights, name).is_err() {
        assert!(snapshot(&model) == template.state, "a failed load changed the model");
        return;
    }
    let names = template.model.adapter_names();
    assert!(
        model.adapter_names().iter().any(|n| n == name),
        "loaded, but {name:?} is not there"
    );
    // One name, one adapter (fuzz/found/README.md, "adapter name reused").
    assert!(
        !names.iter().any(|n| n == name),
        "loaded under {name:?}, a name the model already had"
    );
    let parsed = parse_config(config, Path::new(CONFIG_FILE)).expect("a config that loaded parses");
    check_round_trip(&model, template, parsed.as_ref(), name);

    model.set_training(flag_bits & flags::TRAINING != 0);
    model.forward_all().expect("the forward pass with the loaded adapter");
    let merged = model.merge().is_ok();
    if merged {
        model.forward_all().expect("the forward pass, merged");
        if model.unmerge().is_err() {
            // IA³ refuses to divide by a tiny scale; the adapter stays merged.
            return;
        }
        model.forward_all().expect("the forward pass, unmerged");
    }
    model.set_training(false);
    model
        .delete_adapter(name)
        .expect("deleting the loaded adapter once unmerged");
    assert_eq!(
        model.adapter_names(),
        names,
        "deleting the loaded adapter left other adapters"
    );
    if !merged {
        // A refused merge changes nothing, so the model is back to its template.
        assert!(snapshot(&model) == template.state, "load + delete changed the model");
    }
}
