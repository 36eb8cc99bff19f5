//! Properties over generated models and adapters (proptest), and PEFT's own
//! target-matching decisions as a table of data.
//!
//! - Merging then unmerging gives the base weights back, and the merged model
//!   computes what the unmerged one does, for every adapter kind (LoRA,
//!   rsLoRA, DoRA, IA³, LoHa, LoKr), one or two named adapters, random shapes,
//!   ranks, alphas and targets; the combinations whose outputs could not
//!   agree are refused, exactly those (see `expected_refusal`).
//! - Saving then loading, into a fresh copy of the base model under the same
//!   names and under other names, gives the same outputs; saving what was
//!   loaded writes the same files, which load again.
//! - The crate's targets agree with `tests/fixtures/peft_target_matching.json`,
//!   what Python PEFT 0.21.2 decided for 122 configurations over 11 module
//!   sets (made by `tests/fixtures/make_target_matching.py`), except where the
//!   table marks a documented difference or a known divergence.
//!
//! Adapter weights are drawn from a seed that is part of each generated case
//! (fresh adapters' own random inits are overwritten), so a failing case shrinks
//! to a printed value that reproduces it exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Module, Tensor};
use peft_core::config_file::TargetFields;
use peft_core::prelude::*;
use peft_core::Ia3Config;
use peft_core::LohaConfig;
use peft_core::{AdapterConfig, LayerKind, Role, CONFIG_FILE, WEIGHTS_FILE};
use peft_core::{LokrConfig, LokrInit};
use proptest::prelude::*;
use proptest::sample::subsequence;
use serde_json::Value;

mod support;
use support::rng::{relative_error, Rng};
use support::{fixture_path, max_abs, max_abs_diff, read_json};

const DEV: Device = Device::Cpu;

// ---------------------------------------------------------------------------
// The model the properties run on
// ---------------------------------------------------------------------------

#[derive(Adaptable)]
struct Block {
    q: Linear,
    v: Linear,
    up: Linear,
}

#[derive(Adaptable)]
struct Net {
    layers: Vec<Block>,
    #[output_head]
    head: Linear,
}

/// The shapes of a [`Net`]: `q`, `v` `hidden -> inner`, `up` `inner -> hidden`,
/// `head` `hidden -> out`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    inner: usize,
    out: usize,
    layers: usize,
    batch: usize,
}

impl Net {
    /// Base weights drawn from `seed`: the same seed gives the same model.
    fn new(dims: Dims, seed: u64) -> Net {
        let mut rng = Rng(seed | 1);
        let mut layer = |rows: usize, cols: usize, bias: bool| {
            // U(±1/√in), as a freshly initialised torch layer.
            let scale = 1.0 / (cols as f64).sqrt();
            let weight = rng.tensor(&[rows, cols], DType::F32).affine(scale, 0.0).unwrap();
            let bias = bias.then(|| rng.tensor(&[rows], DType::F32).affine(scale, 0.0).unwrap());
            Linear::new(weight, bias)
        };
        let layers = (0..dims.layers)
            .map(|_| Block {
                q: layer(dims.inner, dims.hidden, true),
                v: layer(dims.inner, dims.hidden, false),
                up: layer(dims.hidden, dims.inner, true),
            })
            .collect();
        Net {
            layers,
            head: layer(dims.out, dims.hidden, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.clone();
        for block in &self.layers {
            let h = (block.q.forward(&x).unwrap() + block.v.forward(&x).unwrap()).unwrap();
            x = (&x + block.up.forward(&h.tanh().unwrap()).unwrap()).unwrap();
        }
        self.head.forward(&x).unwrap()
    }

    /// Every layer's weight and bias, by path.
    fn weights(&self) -> BTreeMap<String, (Tensor, Option<Tensor>)> {
        self.layers()
            .into_iter()
            .map(|l| (l.path, (l.layer.weight().unwrap().clone(), l.layer.bias().cloned())))
            .collect()
    }
}

fn input(dims: Dims, seed: u64) -> Tensor {
    Rng(seed.rotate_left(17) | 1).tensor(&[dims.batch, dims.hidden], DType::F32)
}

// ---------------------------------------------------------------------------
// Generated adapters
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Lora,
    RsLora,
    Dora,
    /// `feedforward`: IA³ scales the input of `up` rather than its output.
    Ia3 {
        feedforward: bool,
    },
    Loha,
    Lokr {
        decompose_both: bool,
    },
}

/// Which layers an adapter goes on: `names` (`None`: `all_linear()`), then
/// an optional layer filter (indices taken modulo the number of layers).
#[derive(Debug, Clone)]
struct Which {
    names: Option<Vec<&'static str>>,
    layers: Option<Vec<usize>>,
}

#[derive(Debug, Clone)]
struct Spec {
    kind: Kind,
    rank: usize,
    alpha: f64,
    which: Which,
}

impl Which {
    fn targets(&self, layer_count: usize) -> Targets {
        let targets = match &self.names {
            None => all_linear(),
            Some(names) => modules(names.iter().copied()),
        };
        match &self.layers {
            None => targets,
            Some(layers) => targets.layers(layers.iter().map(|i| i % layer_count)),
        }
    }
}

impl Spec {
    fn config(&self, layer_count: usize) -> Box<dyn AdapterConfig> {
        let targets = self.which.targets(layer_count);
        let lora = || {
            LoraConfig::from(targets.clone())
                .rank(self.rank)
                .alpha(self.alpha)
                .init(LoraInit::Random)
        };
        match self.kind {
            Kind::Lora => Box::new(lora()),
            Kind::RsLora => Box::new(lora().rslora(true)),
            Kind::Dora => Box::new(lora().dora(true)),
            Kind::Ia3 { feedforward } => {
                let config = Ia3Config::from(targets).init(false);
                Box::new(if feedforward {
                    config.feedforward_modules(["up"])
                } else {
                    config
                })
            }
            Kind::Loha => Box::new(
                LohaConfig::from(targets)
                    .rank(self.rank)
                    .alpha(self.alpha)
                    .init_weights(false),
            ),
            Kind::Lokr { decompose_both } => Box::new(
                LokrConfig::from(targets)
                    .rank(self.rank)
                    .alpha(self.alpha)
                    .init(LokrInit::Random)
                    .decompose_both(decompose_both),
            ),
        }
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Lora),
        Just(Kind::RsLora),
        Just(Kind::Dora),
        any::<bool>().prop_map(|feedforward| Kind::Ia3 { feedforward }),
        Just(Kind::Loha),
        any::<bool>().prop_map(|decompose_both| Kind::Lokr { decompose_both }),
    ]
}

fn which() -> impl Strategy<Value = Which> {
    let names = prop_oneof![
        Just(None),
        subsequence(vec!["q", "v", "up", "head"], 1..=4).prop_map(Some),
    ];
    let layers = proptest::option::of(subsequence(vec![0usize, 1, 2], 1..=3));
    (names, layers).prop_map(|(names, mut layers)| {
        // The head has no layer index: a layer filter would leave nothing.
        if names.as_deref() == Some(&["head"][..]) {
            layers = None;
        }
        Which { names, layers }
    })
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        kind(),
        1usize..=4,
        prop::sample::select(vec![1.0, 0.5, 2.0, 4.0, 8.0]),
        which(),
    )
        .prop_map(|(kind, rank, alpha, which)| Spec {
            kind,
            rank,
            alpha,
            which,
        })
}

fn dims() -> impl Strategy<Value = Dims> {
    (1usize..=8, 1usize..=8, 1usize..=5, 1usize..=3, 1usize..=3).prop_map(|(hidden, inner, out, layers, batch)| Dims {
        hidden,
        inner,
        out,
        layers,
        batch,
    })
}

/// One generated case: a base model, one or two adapters, and the seed of
/// every weight and input.
#[derive(Debug, Clone)]
struct Case {
    dims: Dims,
    adapters: Vec<Spec>,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (dims(), prop::collection::vec(spec(), 1..=2), 1u64..).prop_map(|(dims, adapters, seed)| Case {
        dims,
        adapters,
        seed,
    })
}

impl Case {
    fn base(&self) -> Net {
        Net::new(self.dims, self.seed)
    }

    fn x(&self) -> Tensor {
        input(self.dims, self.seed)
    }

    /// The base model with the case's adapters under `names`, all active, their
    /// weights drawn from the seed; or the error adding one gave.
    fn try_adapted(&self, names: &[&str]) -> peft_core::Result<Net> {
        let mut net = self.base();
        for (spec, name) in self.adapters.iter().zip(names) {
            net.add_adapter(name, &*spec.config(self.dims.layers))?;
        }
        net.set_active_adapters(&names[..self.adapters.len()])?;
        fill_adapter_weights(&net, self.seed);
        Ok(net)
    }
}

/// Overwrites every adapter tensor with values drawn from `seed`: U(±0.5),
/// except scale vectors (IA³'s `l`, DoRA's magnitude), which get magnitudes in
/// [0.5, 1) so that merging divides by nothing small.
fn fill_adapter_weights(net: &Net, seed: u64) {
    let mut rng = Rng(seed.rotate_left(41) | 1);
    for (name, var) in net.named_trainable_vars() {
        let values = rng.tensor(var.dims(), DType::F32);
        let values = if name.contains("ia3_l") {
            // sign(u)·(0.5 + |u|/2)
            let sign = values.sign().unwrap();
            (values.abs().unwrap().affine(0.5, 0.5).unwrap() * sign).unwrap()
        } else if name.contains("magnitude") {
            values.abs().unwrap().affine(0.5, 0.5).unwrap()
        } else {
            values.affine(0.5, 0.0).unwrap()
        };
        var.set(&values).unwrap();
    }
}

const NAMES: [&str; 2] = ["default", "extra"];

// ---------------------------------------------------------------------------
// Tolerances
// ---------------------------------------------------------------------------

/// Unmerge gives back `W` up to float rounding, relative to the size of what
/// was added and taken out: the error is divided by max(|W|, |W merged|, 1).
/// All values are f32 (unit roundoff u = 6e-8): an additive adapter stores
/// fl(fl(W + ΔW) − ΔW), off from `W` by at most 2u·(|W| + |ΔW|) per entry;
/// IA³ and DoRA multiply by a factor and divide by it again (2u relative),
/// DoRA also adding and taking out ΔW; two adapters on one layer double that.
/// The largest error seen in 5,500 generated cases (layers up to 40 wide) was
/// 2.1e-7. 1e-5 is ~50x that, while a skipped or partial unmerge leaves an
/// error of |ΔW| (1e-3 to 1 here), 100x over it at least.
const UNMERGE_TOLERANCE: f64 = 1e-5;

/// The merged model computes `(W + ΔW)·x` where the unmerged one computes
/// `W·x + ΔW·x` (or DoRA's and IA³'s rescaled forms): the same sums
/// associated differently, each output entry off by about k·u·Σ|terms| for
/// sums of k ≤ 8 products, through up to 3 blocks and the head. The error is
/// relative to the output's magnitude (or 1). The largest seen in 4,000
/// generated cases of this file's sizes was 1.6e-6 for the merged output and
/// 5.5e-6 for the output after unmerging (with layers up to 40 wide, 1.2e-5).
/// 1e-4 leaves ~20x over this file's worst, while an adapter that merging
/// dropped or applied twice typically moves the output by 1e-2 or more of its
/// magnitude (the known bugs below give errors of 0.01 to 1.6).
const MERGE_OUTPUT_TOLERANCE: f64 = 1e-4;

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// proptest's configuration with `cases` cases. A fixed seed: every run
/// generates the same cases, so a test cannot fail on one run and pass on the
/// next (the tolerances are float bounds, checked on these cases). No failure
/// persistence: a failing case is printed in full, shrunk, and its seed
/// reproduces it, so no regression file is written into the source tree.
/// Shrinking stops after 30 s.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x005e_ed0f_9ef7),
        failure_persistence: None,
        max_shrink_time: 30_000,
        ..ProptestConfig::default()
    }
}

/// Which refusal, if any, the crate owes `case`: the combinations whose
/// merged and unmerged outputs could not agree are refused (the model is left
/// as it was), and the property checks exactly these are refused.
///
/// - At `add_adapter`: DoRA after an adapter that scales the output (IA³ not
///   on a feed-forward layer), on a shared layer: DoRA reads the base weight
///   and bias, which the earlier adapter has changed.
/// - At a merge of the first adapter alone, when the second stays active
///   and unmerged on a shared layer: exact only if the second is additive
///   (LoRA, LoHa, LoKr) and the first is additive or scales the input of a
///   feed-forward layer (it then acts on the base weight alone).
#[derive(Debug, PartialEq)]
enum Refusal {
    Add,
    PartialMerge,
}

fn expected_refusal(case: &Case, merge_only_first: bool) -> Option<Refusal> {
    let [a, b] = &case.adapters[..] else {
        return None;
    };
    let base = case.base();
    let targeted = |spec: &Spec| base.targeted_modules(&spec.which.targets(case.dims.layers)).unwrap();
    let b_layers = targeted(b);
    let shared: Vec<String> = targeted(a).into_iter().filter(|p| b_layers.contains(p)).collect();
    let scales_input = |kind: Kind, path: &str| kind == (Kind::Ia3 { feedforward: true }) && path.ends_with(".up");
    let scales_output = |kind: Kind, path: &str| matches!(kind, Kind::Ia3 { .. }) && !scales_input(kind, path);
    let additive = |kind: Kind| !matches!(kind, Kind::Dora | Kind::Ia3 { .. });
    if b.kind == Kind::Dora && shared.iter().any(|p| scales_output(a.kind, p)) {
        return Some(Refusal::Add);
    }
    let inexact = |p: &String| !(additive(b.kind) && (additive(a.kind) || scales_input(a.kind, p)));
    (merge_only_first && shared.iter().any(inexact)).then_some(Refusal::PartialMerge)
}

proptest! {
    // 256 cases (proptest's default): each builds a model of up to 3 blocks
    // and runs 4 forward passes, a merge and an unmerge, about 3 ms in the dev
    // profile, so under a second in all; 256 meet each of the 7 kinds (IA³ in
    // two modes) alone and in most of the 49 ordered pairs every run.
    #![proptest_config(config(256))]

    #[test]
    fn merge_then_unmerge_restores_the_base(case in case(), merge_only_first in any::<bool>()) {
        let refusal = expected_refusal(&case, merge_only_first);
        let mut net = match case.try_adapted(&NAMES) {
            Ok(net) => net,
            Err(error) => {
                prop_assert_eq!(refusal, Some(Refusal::Add), "adding was refused: {}", error);
                prop_assert!(matches!(error, peft_core::PeftError::IncompatibleAdapter { .. }), "{}", error);
                return Ok(());
            }
        };
        prop_assert_ne!(&refusal, &Some(Refusal::Add), "an inexact combination was accepted");
        let x = case.x();
        let adapted = net.forward(&x);
        let base_out = net.with_adapters_disabled(|net| net.forward(&x)).unwrap();
        prop_assert!(max_abs_diff(&adapted, &base_out) > 0.0, "the adapters change nothing");
        let before = net.weights();

        let merged_names: Vec<&str> = if merge_only_first {
            NAMES[..1].to_vec()
        } else {
            NAMES[..case.adapters.len()].to_vec()
        };
        if let Err(error) = net.merge_adapters(&merged_names) {
            prop_assert_eq!(refusal, Some(Refusal::PartialMerge), "merging was refused: {}", error);
            prop_assert!(matches!(error, peft_core::PeftError::MergeState { .. }), "{}", error);
            for ((path, (w0, _)), (_, (w, _))) in before.iter().zip(&net.weights()) {
                prop_assert_eq!(max_abs_diff(w0, w), 0.0, "a refused merge changed {}", path);
            }
            return Ok(());
        }
        prop_assert_eq!(refusal, None, "an inexact partial merge was accepted");
        let merged_weights = net.weights();
        prop_assert!(
            before.iter().zip(&merged_weights).any(|((_, (b, _)), (_, (m, _)))| max_abs_diff(b, m) > 0.0),
            "merging changed no weight"
        );
        let merged = net.forward(&x);
        let error = relative_error(&merged, &adapted);
        prop_assert!(error <= MERGE_OUTPUT_TOLERANCE, "merged output off by {error:e} (relative)");

        net.unmerge().unwrap();
        for (path, (weight, bias)) in net.weights() {
            let (w0, b0) = &before[&path];
            let (wm, bm) = &merged_weights[&path];
            let scale = f64::from(max_abs(w0).max(max_abs(wm))).max(1.0);
            let error = f64::from(max_abs_diff(&weight, w0)) / scale;
            prop_assert!(error <= UNMERGE_TOLERANCE, "{path}: weight off by {error:e} of {scale} after unmerge");
            if let (Some(bias), Some(b0), Some(bm)) = (bias, b0, bm) {
                let scale = f64::from(max_abs(b0).max(max_abs(bm))).max(1.0);
                let error = f64::from(max_abs_diff(&bias, b0)) / scale;
                prop_assert!(error <= UNMERGE_TOLERANCE, "{path}: bias off by {error:e} after unmerge");
            }
        }
        let unmerged = net.forward(&x);
        let error_after = relative_error(&unmerged, &adapted);
        prop_assert!(error_after <= MERGE_OUTPUT_TOLERANCE, "output after unmerge off by {error_after:e}");
    }
}

proptest! {
    // 32 cases: each saves its one or two adapters twice, loads them back
    // twice and builds three models. The time goes to the file system: every
    // save syncs both files and the folder (peft-core's durable save), about
    // 25 ms per case on an idle disk, ten times that when other builds write
    // to it; 32 keep the worst case near 10 s and still meet every kind
    // several times per run.
    #![proptest_config(config(32))]

    #[test]
    fn save_then_load_reproduces_the_outputs(case in case()) {
        let count = case.adapters.len();
        let names = &NAMES[..count];
        // Combinations refused when added have nothing to save.
        let Ok(net) = case.try_adapted(&NAMES) else { return Ok(()) };
        let x = case.x();
        let adapted = net.forward(&x);
        let first = Scratch::new("first");
        net.save_adapters(first.path()).unwrap();

        // A fresh copy of the base, the same names: exactly the same outputs.
        let mut twin = case.base();
        prop_assert!(max_abs_diff(&twin.forward(&x), &adapted) > 0.0);
        for name in names {
            twin.load_adapter(adapter_dir(first.path(), name), name).unwrap();
        }
        twin.set_active_adapters(names).unwrap();
        prop_assert_eq!(max_abs_diff(&twin.forward(&x), &adapted), 0.0);

        // What was loaded saves to the same files.
        let second = Scratch::new("second");
        twin.save_adapters(second.path()).unwrap();
        for name in names {
            let (a, b) = (adapter_dir(first.path(), name), adapter_dir(second.path(), name));
            prop_assert_eq!(read_json(a.join(CONFIG_FILE)), read_json(b.join(CONFIG_FILE)), "{} config", name);
            let (ta, tb) = (read_tensors(&a), read_tensors(&b));
            prop_assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
            for (key, t) in &ta {
                prop_assert_eq!(max_abs_diff(t, &tb[key]), 0.0, "{}", key);
            }
        }

        // The second save loads again, under other names.
        let mut other = case.base();
        let renamed = ["copy", "copy_2"];
        for (name, new_name) in names.iter().zip(renamed) {
            other.load_adapter(adapter_dir(second.path(), name), new_name).unwrap();
        }
        other.set_active_adapters(&renamed[..count]).unwrap();
        prop_assert_eq!(max_abs_diff(&other.forward(&x), &adapted), 0.0);
    }
}

proptest! {
    // No tensor work: 256 cases (proptest's default) take about 30 ms.
    #![proptest_config(config(256))]

    /// `targeted_modules` is `Targets::matches` over the model's layers, and an
    /// error exactly when that is empty.
    #[test]
    fn targeted_modules_are_the_matching_layers(
        names in subsequence(vec!["q", "v", "up", "head", "0.q", "layers.1.v", "p", "x"], 0..=3),
        pattern in proptest::option::of(prop::sample::select(vec![r".*\.q", r"layers\.[01]\..*", "head|.*up", "q"])),
        exclude in proptest::option::of(subsequence(vec!["q", "up", "layers.0.v", "head"], 1..=2)),
        layers in proptest::option::of(subsequence(vec![0usize, 1, 2, 5], 0..=2)),
    ) {
        let net = Net::new(Dims { hidden: 1, inner: 1, out: 1, layers: 3, batch: 1 }, 1);
        let mut targets = match (&names[..], pattern) {
            ([], None) => all_linear(),
            (_, None) => modules(names.clone()),
            ([], Some(p)) => regex(p),
            (_, Some(p)) => modules(names.clone()).or(regex(p)),
        };
        if let Some(exclude) = &exclude {
            targets = targets.exclude(exclude.clone());
        }
        if let Some(layers) = &layers {
            targets = targets.layers(layers.clone());
        }
        let mut expected: Vec<String> = net
            .layers()
            .into_iter()
            .filter(|l| targets.matches_layer(&l.path, l.role, l.layer.kind()))
            .map(|l| l.path)
            .collect();
        expected.sort();
        match net.targeted_modules(&targets) {
            Ok(found) => prop_assert_eq!(found, expected, "{}", targets),
            Err(e) => prop_assert!(expected.is_empty(), "{targets}: {e}, but {expected:?} match"),
        }
    }
}

/// A folder under the system's temporary directory, unique to this process
/// and call, removed when dropped (also when a case fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("peft-properties-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where `save_adapters` puts adapter `name`: `"default"` in the folder itself.
fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == peft_core::DEFAULT_ADAPTER {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

fn read_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &DEV)
        .unwrap()
        .into_iter()
        .collect()
}

// ---------------------------------------------------------------------------
// PEFT's target-matching table
// ---------------------------------------------------------------------------

/// A module set of the table as a Rust model: each set of
/// `tests/fixtures/peft_target_matching.json` is a struct here whose layer
/// paths are the set's module names.
mod table_models {
    use super::*;
    use peft_core::Embedding;

    pub fn lin() -> Linear {
        Linear::new(Tensor::zeros((2, 2), DType::F32, &DEV).unwrap(), None)
    }

    pub fn emb() -> Embedding {
        Embedding::new(Tensor::zeros((3, 2), DType::F32, &DEV).unwrap(), 2).unwrap()
    }

    #[derive(Adaptable)]
    pub struct LlamaAttention {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
        o_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct LlamaMlp {
        gate_proj: Linear,
        up_proj: Linear,
        down_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct LlamaLayer {
        self_attn: LlamaAttention,
        mlp: LlamaMlp,
    }

    #[derive(Adaptable)]
    pub struct LlamaModel {
        embed_tokens: Embedding,
        layers: Vec<LlamaLayer>,
    }

    #[derive(Adaptable)]
    pub struct Llama {
        model: LlamaModel,
        #[output_head]
        lm_head: Linear,
    }

    pub fn llama(layers: usize) -> Llama {
        let layer = || LlamaLayer {
            self_attn: LlamaAttention {
                q_proj: lin(),
                k_proj: lin(),
                v_proj: lin(),
                o_proj: lin(),
            },
            mlp: LlamaMlp {
                gate_proj: lin(),
                up_proj: lin(),
                down_proj: lin(),
            },
        };
        Llama {
            model: LlamaModel {
                embed_tokens: emb(),
                layers: (0..layers).map(|_| layer()).collect(),
            },
            lm_head: lin(),
        }
    }

    #[derive(Adaptable)]
    pub struct FlatAttn {
        q_proj: Linear,
        xq_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct FlatMlp {
        fc: Linear,
    }

    #[derive(Adaptable)]
    pub struct FlatBlock {
        attn: FlatAttn,
        mlp: FlatMlp,
    }

    /// A plain model: PEFT's "all-linear" does not know its head.
    #[derive(Adaptable)]
    pub struct Flat {
        layers: Vec<FlatBlock>,
        #[output_head]
        head: Linear,
    }

    pub fn flat() -> Flat {
        let block = || FlatBlock {
            attn: FlatAttn {
                q_proj: lin(),
                xq_proj: lin(),
            },
            mlp: FlatMlp { fc: lin() },
        };
        Flat {
            layers: (0..3).map(|_| block()).collect(),
            head: lin(),
        }
    }

    #[derive(Adaptable)]
    pub struct Expert {
        w1: Linear,
        w2: Linear,
    }

    #[derive(Adaptable)]
    pub struct MoeMlp {
        gate: Linear,
        experts: Vec<Expert>,
    }

    #[derive(Adaptable)]
    pub struct MoeLayer {
        mlp: MoeMlp,
    }

    #[derive(Adaptable)]
    pub struct MoeModel {
        layers: Vec<MoeLayer>,
    }

    #[derive(Adaptable)]
    pub struct Moe {
        model: MoeModel,
        #[output_head]
        lm_head: Linear,
    }

    pub fn moe() -> Moe {
        let layer = || MoeLayer {
            mlp: MoeMlp {
                gate: lin(),
                experts: (0..2).map(|_| Expert { w1: lin(), w2: lin() }).collect(),
            },
        };
        Moe {
            model: MoeModel {
                layers: (0..2).map(|_| layer()).collect(),
            },
            lm_head: lin(),
        }
    }

    #[derive(Adaptable)]
    pub struct W1 {
        w1: Linear,
    }

    #[derive(Adaptable)]
    pub struct MoeFlatLayer {
        experts: Vec<W1>,
    }

    #[derive(Adaptable)]
    pub struct MoeFlat {
        layers: Vec<MoeFlatLayer>,
    }

    pub fn moe_flat() -> MoeFlat {
        MoeFlat {
            layers: (0..2)
                .map(|_| MoeFlatLayer {
                    experts: (0..3).map(|_| W1 { w1: lin() }).collect(),
                })
                .collect(),
        }
    }

    #[derive(Adaptable)]
    pub struct Gpt2Attn {
        c_attn: Linear,
        c_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct Gpt2Mlp {
        c_fc: Linear,
        c_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct Gpt2Block {
        attn: Gpt2Attn,
        mlp: Gpt2Mlp,
    }

    #[derive(Adaptable)]
    pub struct Gpt2Transformer {
        wte: Embedding,
        h: Vec<Gpt2Block>,
    }

    #[derive(Adaptable)]
    pub struct Gpt2 {
        transformer: Gpt2Transformer,
        #[output_head]
        lm_head: Linear,
    }

    pub fn gpt2() -> Gpt2 {
        let block = || Gpt2Block {
            attn: Gpt2Attn {
                c_attn: lin(),
                c_proj: lin(),
            },
            mlp: Gpt2Mlp {
                c_fc: lin(),
                c_proj: lin(),
            },
        };
        Gpt2 {
            transformer: Gpt2Transformer {
                wte: emb(),
                h: (0..2).map(|_| block()).collect(),
            },
            lm_head: lin(),
        }
    }

    #[derive(Adaptable)]
    pub struct T5SelfAttention {
        q: Linear,
        v: Linear,
    }

    #[derive(Adaptable)]
    pub struct T5DenseReluDense {
        wi: Linear,
        wo: Linear,
    }

    #[derive(Adaptable)]
    pub enum T5Layer {
        Attention {
            #[adapt(rename = "SelfAttention")]
            self_attention: T5SelfAttention,
        },
        Ff {
            #[adapt(rename = "DenseReluDense")]
            dense_relu_dense: T5DenseReluDense,
        },
    }

    #[derive(Adaptable)]
    pub struct T5Block {
        layer: Vec<T5Layer>,
    }

    #[derive(Adaptable)]
    pub struct T5Encoder {
        block: Vec<T5Block>,
    }

    #[derive(Adaptable)]
    pub struct T5 {
        encoder: T5Encoder,
    }

    pub fn t5() -> T5 {
        let block = || T5Block {
            layer: vec![
                T5Layer::Attention {
                    self_attention: T5SelfAttention { q: lin(), v: lin() },
                },
                T5Layer::Ff {
                    dense_relu_dense: T5DenseReluDense { wi: lin(), wo: lin() },
                },
            ],
        };
        T5 {
            encoder: T5Encoder {
                block: (0..2).map(|_| block()).collect(),
            },
        }
    }

    #[derive(Adaptable)]
    pub struct ModuleList {
        layers: Vec<Linear>,
        proj: Linear,
    }

    pub fn modulelist() -> ModuleList {
        ModuleList {
            layers: (0..3).map(|_| lin()).collect(),
            proj: lin(),
        }
    }

    #[derive(Adaptable)]
    pub struct SuffixesAB {
        q_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct SuffixesA {
        q_proj: Linear,
        xq_proj: Linear,
        b: SuffixesAB,
    }

    #[derive(Adaptable)]
    pub struct SuffixesB {
        q: Linear,
    }

    #[derive(Adaptable)]
    pub struct Suffixes {
        q_proj: Linear,
        xq_proj: Linear,
        q_proj_x: Linear,
        a: SuffixesA,
        b: SuffixesB,
    }

    pub fn suffixes() -> Suffixes {
        Suffixes {
            q_proj: lin(),
            xq_proj: lin(),
            q_proj_x: lin(),
            a: SuffixesA {
                q_proj: lin(),
                xq_proj: lin(),
                b: SuffixesAB { q_proj: lin() },
            },
            b: SuffixesB { q: lin() },
        }
    }

    #[derive(Adaptable)]
    pub struct VisionLayer {
        q_proj: Linear,
        v_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct VisionTower {
        layers: Vec<VisionLayer>,
    }

    #[derive(Adaptable)]
    pub struct TextAttention {
        q_proj: Linear,
        v_proj: Linear,
    }

    #[derive(Adaptable)]
    pub struct TextLayer {
        self_attn: TextAttention,
    }

    #[derive(Adaptable)]
    pub struct TextModel {
        layers: Vec<TextLayer>,
    }

    #[derive(Adaptable)]
    pub struct Projector {
        linear_1: Linear,
    }

    #[derive(Adaptable)]
    pub struct VlmModel {
        vision_tower: VisionTower,
        language_model: TextModel,
        multi_modal_projector: Projector,
    }

    #[derive(Adaptable)]
    pub struct Vlm {
        model: VlmModel,
        #[output_head]
        lm_head: Linear,
    }

    pub fn vlm() -> Vlm {
        Vlm {
            model: VlmModel {
                vision_tower: VisionTower {
                    layers: (0..2)
                        .map(|_| VisionLayer {
                            q_proj: lin(),
                            v_proj: lin(),
                        })
                        .collect(),
                },
                language_model: TextModel {
                    layers: (0..2)
                        .map(|_| TextLayer {
                            self_attn: TextAttention {
                                q_proj: lin(),
                                v_proj: lin(),
                            },
                        })
                        .collect(),
                },
                multi_modal_projector: Projector { linear_1: lin() },
            },
            lm_head: lin(),
        }
    }

    #[derive(Adaptable)]
    pub struct Fc {
        fc: Linear,
    }

    #[derive(Adaptable)]
    pub struct NestedAdapter {
        layers: Vec<Option<Fc>>,
    }

    #[derive(Adaptable)]
    pub struct NestedLayer {
        adapter: NestedAdapter,
    }

    #[derive(Adaptable)]
    pub struct NestedModel {
        layers: Vec<NestedLayer>,
    }

    /// `model.layers.0.adapter.layers.1.fc` and `model.layers.1.adapter.layers.0.fc`.
    #[derive(Adaptable)]
    pub struct Nested {
        model: NestedModel,
    }

    pub fn nested() -> Nested {
        let layer = |inner: usize| NestedLayer {
            adapter: NestedAdapter {
                layers: (0..2).map(|i| (i == inner).then(|| Fc { fc: lin() })).collect(),
            },
        };
        Nested {
            model: NestedModel {
                layers: vec![layer(1), layer(0)],
            },
        }
    }
}

/// A model's layers (path, role, kind), and what it targets.
type Probe = (Vec<(String, Role, LayerKind)>, peft_core::Result<Vec<String>>);

fn probe_model<M: Adaptable>(model: M, targets: &Targets) -> Probe {
    let layers = model
        .layers()
        .into_iter()
        .map(|l| (l.path, l.role, l.layer.kind()))
        .collect();
    (layers, model.targeted_modules(targets))
}

fn probe(module_set: &str, targets: &Targets) -> Probe {
    use table_models::*;
    match module_set {
        "llama" => probe_model(llama(2), targets),
        "llama4" => probe_model(llama(4), targets),
        "flat" => probe_model(flat(), targets),
        "moe" => probe_model(moe(), targets),
        "moe_flat" => probe_model(moe_flat(), targets),
        "gpt2" => probe_model(gpt2(), targets),
        "t5" => probe_model(t5(), targets),
        "modulelist" => probe_model(modulelist(), targets),
        "suffixes" => probe_model(suffixes(), targets),
        "vlm" => probe_model(vlm(), targets),
        "nested" => probe_model(nested(), targets),
        other => panic!("no Rust model for module set {other:?}"),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected a list, got {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// PEFT's config fields as the crate's builder calls.
fn builder_targets(config: &Value) -> Targets {
    let mut targets = match &config["target_modules"] {
        Value::String(s) if s.eq_ignore_ascii_case("all-linear") => all_linear(),
        Value::String(s) => regex(s),
        names @ Value::Array(_) => modules(strings(names)),
        other => panic!("target_modules {other}"),
    };
    match config.get("exclude_modules") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => targets = targets.exclude_regex(s),
        Some(names) => targets = targets.exclude(strings(names)),
    }
    match config.get("layers_to_transform") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => targets = targets.layers([n.as_u64().unwrap() as usize]),
        // An empty list is no filter, as PEFT reads it.
        Some(Value::Array(list)) if list.is_empty() => {}
        Some(Value::Array(list)) => targets = targets.layers(list.iter().map(|n| n.as_u64().unwrap() as usize)),
        Some(other) => panic!("layers_to_transform {other}"),
    }
    match config.get("layers_pattern") {
        None | Some(Value::Null) => {}
        // PEFT's "" is falsy: no pattern (the builder's is no patterns at all).
        Some(Value::String(s)) if s.is_empty() => targets = targets.layers_pattern(Vec::<String>::new()),
        Some(Value::String(s)) => targets = targets.layers_pattern([s]),
        Some(patterns) => targets = targets.layers_pattern(strings(patterns)),
    }
    targets
}

/// The same fields read as a LoRA adapter config file is read.
fn loader_targets(config: &Value) -> peft_core::Result<Targets> {
    let fields: TargetFields = serde_json::from_value(config.clone()).unwrap();
    fields.into_targets()
}

/// What a case expects of the crate: the targeted paths, sorted, or an error.
#[derive(Debug, PartialEq)]
enum Outcome {
    Targeted(Vec<String>),
    Error,
}

impl Outcome {
    fn of(result: &peft_core::Result<Vec<String>>) -> Outcome {
        match result {
            Ok(paths) => Outcome::Targeted(paths.clone()),
            Err(_) => Outcome::Error,
        }
    }

    fn targets(&self, path: &str) -> bool {
        match self {
            Outcome::Targeted(paths) => paths.iter().any(|p| p == path),
            Outcome::Error => false,
        }
    }
}

/// PEFT's outcome of a case: injection failed (or the config was refused),
/// or these modules were wrapped.
fn peft_outcome(case: &Value) -> Outcome {
    let peft = &case["peft"];
    if !peft["config_error"].is_null() || !peft["error"].is_null() {
        Outcome::Error
    } else {
        Outcome::Targeted(strings(&peft["targeted"]))
    }
}

#[test]
fn targets_agree_with_peft_table() {
    let table = read_json(fixture_path("peft_target_matching.json"));
    assert_eq!(table["versions"]["peft"], "0.21.2", "the table's PEFT version");
    let cases = table["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    let (mut rows, mut marked, mut still_divergent) = (0, 0, Vec::new());

    for case in cases {
        let id = case["id"].as_str().unwrap();
        let set_name = case["module_set"].as_str().unwrap();
        let set = &table["module_sets"][set_name];
        let config = &case["config"];
        let peft = peft_outcome(case);
        // PEFT's decision for each module (for an injection that failed, its
        // per-module rule; null where PEFT refused the config).
        let peft_rows: Vec<(String, Option<bool>)> = case["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap().to_owned(), m["peft"].as_bool()))
            .collect();
        rows += peft_rows.len();

        // What the crate must do: PEFT's decisions, or the case's `rust` block.
        let rust = case.get("rust");
        let (expected, per_module): (Outcome, Vec<(String, bool)>) = match rust {
            None => {
                assert!(
                    case["peft"]["config_error"].is_null(),
                    "{id}: PEFT refused the config, and the case has no `rust` block"
                );
                let per_module = peft_rows.iter().map(|(n, d)| (n.clone(), d.unwrap())).collect();
                (peft, per_module)
            }
            Some(rust) => {
                marked += 1;
                let expected = if rust["error"] == true {
                    Outcome::Error
                } else {
                    Outcome::Targeted(strings(&rust["targeted"]))
                };
                let per_module = peft_rows
                    .iter()
                    .map(|(n, _)| (n.clone(), expected.targets(n)))
                    .collect();
                (expected, per_module)
            }
        };
        let kind = rust.map_or("", |r| r["kind"].as_str().unwrap());
        assert!(
            ["", "documented", "extension", "known_divergence"].contains(&kind),
            "{id}: unknown kind {kind:?}"
        );

        // The module set, as the JSON lists it: path, role, kind.
        let candidates: Vec<(String, Role, LayerKind)> = set["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let name = m["name"].as_str().unwrap().to_owned();
                let role = if set["output_head"].as_str() == Some(&name) {
                    Role::OutputHead
                } else {
                    Role::Hidden
                };
                let kind = match m["kind"].as_str().unwrap() {
                    "linear" => LayerKind::Linear,
                    "embedding" => LayerKind::Embedding,
                    other => panic!("{other}"),
                };
                (name, role, kind)
            })
            .collect();

        // A config PEFT's LoraConfig refuses is refused when read from a
        // file, as PEFT refuses it; the builder takes it (an extension).
        let loaded = loader_targets(config);
        if !case["peft"]["config_error"].is_null() {
            match &loaded {
                Err(peft_core::PeftError::InvalidConfig { .. }) => {}
                other => failures.push(format!(
                    "case {id}: PEFT refuses the config ({}), the crate's config file reading gives {other:?}",
                    case["peft"]["config_error"]
                )),
            }
        }
        let mut ways = vec![("builder", builder_targets(config))];
        ways.extend(loaded.ok().map(|targets| ("adapter config", targets)));
        for (how, targets) in ways {
            let context = format!("case {id} ({how}: {targets}) on {set_name}");
            let (layers, result) = probe(set_name, &targets);
            let mut sorted_candidates = candidates.clone();
            sorted_candidates.sort_by(|a, b| a.0.cmp(&b.0));
            let mut sorted_layers = layers.clone();
            sorted_layers.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(
                sorted_layers, sorted_candidates,
                "the Rust model of {set_name} has other layers"
            );

            // Row by row: Targets::matches_layer.
            for (name, wanted) in &per_module {
                let (_, role, kind) = candidates.iter().find(|c| &c.0 == name).unwrap();
                let got = targets.matches_layer(name, *role, *kind);
                if got != *wanted {
                    failures.push(format!("{context}: {name}: crate {got}, expected {wanted}"));
                }
            }
            // The whole case: the model's targeted_modules, and Targets::resolve
            // over the table's own list of modules.
            let outcome = Outcome::of(&result);
            let resolved = targets
                .resolve(candidates.iter().map(|(n, r, k)| (n.as_str(), *r, *k)))
                .map(|indices| {
                    let mut paths: Vec<String> = indices.into_iter().map(|i| candidates[i].0.clone()).collect();
                    paths.sort();
                    paths
                });
            if outcome != expected {
                failures.push(format!(
                    "{context}: targeted_modules gives {outcome:?}, expected {expected:?}"
                ));
            }
            if Outcome::of(&resolved) != outcome {
                failures.push(format!(
                    "{context}: resolve gives {:?}, targeted_modules {outcome:?}",
                    Outcome::of(&resolved)
                ));
            }
            if kind == "known_divergence" && outcome == peft_outcome(case) {
                failures.push(format!(
                    "{context}: marked as a known divergence, but the crate now agrees with PEFT: drop its `rust` block"
                ));
            }
        }
        if kind == "known_divergence" {
            still_divergent.push(id);
        }
    }
    eprintln!(
        "{} cases, {rows} (case, module) rows; {marked} cases marked (documented, extension or known divergence); \
         known divergences: {still_divergent:?}",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
