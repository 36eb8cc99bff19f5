//! LoRA initialisations that rewrite the base weight (PiSSA, PiSSA with
//! `niter`, OLoRA) against the `pissa_olora` fixture (PEFT 0.21.2 on a
//! tiny Llama), and PEFT's conversion of such an adapter to a plain LoRA
//! on save (`path_initial_model_for_weight_conversion`).
//!
//! Singular vectors and QR columns have a per-component sign freedom that
//! LAPACK and faer resolve each their own way: factors are compared after
//! flipping row `i` of `A` and column `i` of `B` together so that the
//! largest entry of `B`'s column is positive; `B·A`, the residual and the
//! logits do not depend on it and are compared as they are.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use peft_core::prelude::*;
use peft_core::{random, PeftError, CONFIG_FILE, WEIGHTS_FILE};
use peft_models::llama::{Config, LlamaForCausalLM};

mod support;
use support::{assert_close, fixture_path, max_abs_diff, read_json_object, scratch};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DEV: Device = Device::Cpu;
const TOL: f32 = 1e-4;
const TARGETS: [&str; 4] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
];

fn case(path: &str) -> PathBuf {
    fixture_path("pissa_olora").join(path)
}

fn io(init: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(case(&format!("io_{init}.safetensors")), &DEV).unwrap()
}

fn base() -> LlamaForCausalLM {
    let cfg = Config::from_file(case("base/config.json")).unwrap();
    let tensors = candle_core::safetensors::load(case("base/model.safetensors"), &DEV).unwrap();
    LlamaForCausalLM::load(VarBuilder::from_tensors(tensors, DType::F32, &DEV), &cfg).unwrap()
}

fn logits(model: &LlamaForCausalLM, io: &HashMap<String, Tensor>) -> Tensor {
    model.forward(&io["input_ids"].to_dtype(DType::U32).unwrap()).unwrap()
}

/// The fixture's config: r = 4, lora_alpha = 8 on q_proj and v_proj.
fn config(init: LoraInit) -> LoraConfig {
    config_on(["q_proj", "v_proj"], init)
}

fn config_on<const N: usize>(targets: [&str; N], init: LoraInit) -> LoraConfig {
    LoraConfig::from(modules(targets)).rank(4).alpha(8.0).init(init)
}

/// The adapter's tensor `lora_<which>` (A or B) at `module`.
fn factor(model: &LlamaForCausalLM, module: &str, which: &str) -> Tensor {
    let suffix = format!("{module}.lora_{which}.default.weight");
    model
        .named_trainable_vars()
        .into_iter()
        .find_map(|(n, var)| n.ends_with(&suffix).then(|| var.as_tensor().clone()))
        .unwrap_or_else(|| panic!("no trainable tensor {suffix}"))
}

fn base_weight(model: &LlamaForCausalLM, module: &str) -> Tensor {
    let layers = model.layers();
    let layer = layers.iter().find(|l| l.path == module).unwrap();
    layer.layer.weight().unwrap().clone()
}

/// `A` and `B` with row `i` of `A` and column `i` of `B` negated together
/// wherever the largest-magnitude entry of `B`'s column `i` is negative.
fn sign_normalised(a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    let (out, r) = b.dims2().unwrap();
    let bv: Vec<Vec<f32>> = b.to_vec2().unwrap();
    let signs: Vec<f32> = (0..r)
        .map(|j| {
            let largest = (0..out)
                .map(|i| bv[i][j])
                .fold(0f32, |m, x| if x.abs() > m.abs() { x } else { m });
            if largest < 0.0 {
                -1.0
            } else {
                1.0
            }
        })
        .collect();
    let s = Tensor::new(signs.as_slice(), &DEV).unwrap();
    (
        a.broadcast_mul(&s.unsqueeze(1).unwrap()).unwrap(),
        b.broadcast_mul(&s.unsqueeze(0).unwrap()).unwrap(),
    )
}

/// PiSSA or OLoRA from code: factors (sign-normalised), residual and
/// logits within 1e-4 of PEFT's.
fn matches_peft(init: LoraInit, name: &str) -> TestResult {
    let io = io(name);
    let mut model = base();
    assert_close("base logits", &logits(&model, &io), &io["base_logits"], TOL)?;
    model.add_adapter("default", &config(init))?;
    let mut worst = [0f32; 3];
    for module in TARGETS {
        let (a, b) = sign_normalised(&factor(&model, module, "A"), &factor(&model, module, "B"));
        let (peft_a, peft_b) = sign_normalised(&io[&format!("{module}.A")], &io[&format!("{module}.B")]);
        worst[0] = worst[0].max(assert_close(&format!("{module} A"), &a, &peft_a, TOL)?);
        worst[1] = worst[1].max(assert_close(&format!("{module} B"), &b, &peft_b, TOL)?);
        let residual = base_weight(&model, module);
        let expected = &io[&format!("{module}.residual")];
        worst[2] = worst[2].max(assert_close(&format!("{module} residual"), &residual, expected, TOL)?);
    }
    let init_logits = assert_close("init logits", &logits(&model, &io), &io["init_logits"], TOL)?;
    eprintln!(
        "{name}: max |ours - PEFT's| A {:.1e}, B {:.1e}, residual {:.1e}, init logits {init_logits:.1e}",
        worst[0], worst[1], worst[2]
    );
    // The saved config says what PEFT's says.
    let dir = scratch("lora_init", &format!("{name}_saved"));
    model.save_adapter(&dir, "default")?;
    let saved = read_json_object(dir.join(CONFIG_FILE));
    assert_eq!(saved["init_lora_weights"], name);
    Ok(())
}

#[test]
fn pissa_matches_peft() -> TestResult {
    matches_peft(LoraInit::Pissa, "pissa")
}

#[test]
fn olora_matches_peft() -> TestResult {
    matches_peft(LoraInit::Olora, "olora")
}

/// The randomized SVD draws other numbers than torch's: what holds
/// whatever the draws is checked, and `B·A` against PEFT's, which both
/// approximate the best rank-4 part of `W`.
#[test]
fn pissa_niter_keeps_the_output_and_approximates_the_svd() -> TestResult {
    let io = io("pissa_niter_4");
    let original = base();
    let mut model = base();
    random::with_seed(7, || model.add_adapter("default", &config(LoraInit::PissaNiter(4))))?;
    let mut worst_product = 0f32;
    for module in TARGETS {
        let (a, b) = (factor(&model, module, "A"), factor(&model, module, "B"));
        let product = (b.matmul(&a)? * 2.0)?;
        let rebuilt = (base_weight(&model, module) + &product)?;
        assert_close(
            &format!("{module} residual + s·B·A"),
            &rebuilt,
            &base_weight(&original, module),
            1e-5,
        )?;
        let peft = (io[&format!("{module}.B")].matmul(&io[&format!("{module}.A")])? * 2.0)?;
        worst_product = worst_product.max(max_abs_diff(&product, &peft));
        // A's rows are orthogonal (diag(√S) times orthonormal rows).
        let gram = a.matmul(&a.t()?)?.to_vec2::<f32>()?;
        for (i, row) in gram.iter().enumerate() {
            for (j, x) in row.iter().enumerate() {
                assert!(i == j || x.abs() < 1e-4, "{module}: A A^T [{i}][{j}] = {x}");
            }
        }
    }
    assert_close("init logits vs base", &logits(&model, &io), &io["base_logits"], TOL)?;
    assert_close("init logits vs PEFT's", &logits(&model, &io), &io["init_logits"], TOL)?;
    // Four subspace iterations on these 16-wide weights find nearly the
    // exact top-4 subspace: s·B·A within 5e-2 of PEFT's (whose entries are ~0.1-1).
    assert!(worst_product < 5e-2, "s·B·A differs from PEFT's by {worst_product}");
    eprintln!("pissa_niter_4: max |s·B·A - PEFT's| = {worst_product:.1e}");
    // The same seed gives the same factors.
    let mut again = base();
    random::with_seed(7, || again.add_adapter("default", &config(LoraInit::PissaNiter(4))))?;
    for module in TARGETS {
        assert_eq!(
            max_abs_diff(&factor(&model, module, "A"), &factor(&again, module, "A")),
            0.0
        );
    }
    Ok(())
}

/// A copy of `<init>/initial` whose config says `init` (PEFT saved it with
/// `init_lora_weights = true`, for the residual base).
fn initial_saying(name: &str, init: &str) -> PathBuf {
    // Each call its own folder: tests run in parallel and `scratch` empties it.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch("lora_init", &format!("{name}_initial_{init}_{call}"));
    let mut config = read_json_object(case(&format!("{name}/initial")).join(CONFIG_FILE));
    config.insert("init_lora_weights".into(), init.into());
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    std::fs::copy(
        case(&format!("{name}/initial")).join(WEIGHTS_FILE),
        dir.join(WEIGHTS_FILE),
    )
    .unwrap();
    dir
}

/// Loading the initial adapter with a PiSSA/OLoRA config onto the
/// original base rewrites the base, then takes A and B from the file;
/// after "training" (PEFT's trained factors, read from the first halves
/// of its converted adapter), the converted save equals PEFT's files, and
/// PEFT's converted adapter on the original base gives the trained logits.
fn converts_as_peft(name: &str) -> TestResult {
    let io = io(name);
    let mut model = base();
    model.load_adapter(initial_saying(name, name), "default")?;
    let initial = candle_core::safetensors::load(case(&format!("{name}/initial")).join(WEIGHTS_FILE), &DEV)?;
    for module in TARGETS {
        let key = |w: &str| format!("base_model.model.{module}.lora_{w}.weight");
        assert_eq!(max_abs_diff(&factor(&model, module, "A"), &initial[&key("A")]), 0.0);
        assert_eq!(max_abs_diff(&factor(&model, module, "B"), &initial[&key("B")]), 0.0);
        let residual = base_weight(&model, module);
        assert_close(
            &format!("{module} residual"),
            &residual,
            &io[&format!("{module}.residual")],
            TOL,
        )?;
    }
    assert_close("logits after loading", &logits(&model, &io), &io["init_logits"], TOL)?;
    let converted_dir = case(&format!("{name}/converted"));
    let peft = candle_core::safetensors::load(converted_dir.join(WEIGHTS_FILE), &DEV)?;
    for (n, var) in model.named_trainable_vars() {
        let key = n.replace(".default.", ".");
        let key = format!("base_model.model.{key}");
        let full = &peft[&key];
        let trained = if key.contains("lora_A") {
            full.narrow(0, 0, 4)?
        } else {
            full.narrow(1, 0, 4)?
        };
        var.set(&trained)?;
    }
    assert_close("trained logits", &logits(&model, &io), &io["trained_logits"], TOL)?;
    let dir = scratch("lora_init", &format!("{name}_converted"));
    model.save_adapter_converted(&dir, "default", case(&format!("{name}/initial")))?;
    let ours = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &DEV)?;
    assert_eq!(
        ours.keys().collect::<BTreeSet<_>>(),
        peft.keys().collect::<BTreeSet<_>>()
    );
    for (key, tensor) in &peft {
        assert_eq!(ours[key].dims(), tensor.dims(), "{key}");
        assert_eq!(max_abs_diff(&ours[key], tensor), 0.0, "{key}");
    }
    let (config, peft_config) = (
        read_json_object(dir.join(CONFIG_FILE)),
        read_json_object(converted_dir.join(CONFIG_FILE)),
    );
    for field in [
        "r",
        "lora_alpha",
        "init_lora_weights",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
    ] {
        assert_eq!(config[field], peft_config[field], "{field}");
    }
    // Our converted adapter and PEFT's, each on the ORIGINAL base.
    for (what, adapter) in [("ours", dir.as_path()), ("PEFT's", converted_dir.as_path())] {
        let mut plain = base();
        plain.load_adapter(adapter, "default")?;
        let difference = assert_close(
            &format!("{what} converted adapter on the original base"),
            &logits(&plain, &io),
            &io["trained_logits"],
            TOL,
        )?;
        eprintln!("{name}: {what} converted adapter on the original base: max logits difference {difference:.1e}");
    }
    Ok(())
}

#[test]
fn pissa_converts_as_peft() -> TestResult {
    converts_as_peft("pissa")
}

#[test]
fn olora_converts_as_peft() -> TestResult {
    converts_as_peft("olora")
}

#[test]
fn init_names_read_and_written_as_peft() -> TestResult {
    for (value, init) in [
        ("pissa", LoraInit::Pissa),
        ("pissa_niter_4", LoraInit::PissaNiter(4)),
        ("olora", LoraInit::Olora),
    ] {
        assert_eq!(init.to_peft(), value);
        let mut model = base();
        model.load_adapter(initial_saying("pissa", value), "default")?;
        let dir = scratch("lora_init", &format!("names_{value}"));
        model.save_adapter(&dir, "default")?;
        assert_eq!(read_json_object(dir.join(CONFIG_FILE))["init_lora_weights"], value);
    }
    Ok(())
}

/// The adapter-file tools (`peft convert`, `merge_checkpoint` with a
/// weight) treat a PiSSA/OLoRA file as needing its base, since merging it
/// rewrites the base first: not as a plain additive delta.
#[test]
fn a_base_rewriting_adapter_file_is_not_additive() -> TestResult {
    for init in ["pissa", "pissa_niter_4", "olora"] {
        let file = peft_core::StandaloneAdapter::from_dir(initial_saying("pissa", init))?;
        assert!(!file.is_additive(), "{init}");
    }
    assert!(peft_core::StandaloneAdapter::from_dir(case("pissa/initial"))?.is_additive());
    Ok(())
}

/// Every refusal leaves the model as it was: same logits, same weights.
fn unchanged_after(
    model: &mut LlamaForCausalLM,
    attempt: impl FnOnce(&mut LlamaForCausalLM) -> PeftError,
) -> PeftError {
    let io = io("pissa");
    let before = logits(model, &io);
    let weights: Vec<Tensor> = TARGETS.iter().map(|m| base_weight(model, m)).collect();
    let error = attempt(model);
    assert_eq!(max_abs_diff(&logits(model, &io), &before), 0.0, "{error}");
    for (module, weight) in TARGETS.iter().zip(&weights) {
        assert_eq!(
            max_abs_diff(&base_weight(model, module), weight),
            0.0,
            "{module}: {error}"
        );
    }
    error
}

fn is_refused_init(error: &PeftError, module: &str) -> bool {
    matches!(error, PeftError::UnsupportedOption { field, value, .. }
        if field == "init_lora_weights" && value.contains(module))
}

#[test]
fn a_rank_beyond_the_weight_is_refused_and_changes_nothing() {
    let mut model = base();
    // v_proj is [8, 16]: no 9 singular vectors. q_proj comes first and would be rewritten.
    let error = unchanged_after(&mut model, |m| {
        m.add_adapter("default", &config(LoraInit::Pissa).rank(9)).unwrap_err()
    });
    assert!(is_refused_init(&error, "model.layers.0.self_attn.v_proj"), "{error}");
    assert!(model.adapter_names().is_empty());
}

#[test]
fn a_layer_with_merged_adapters_is_refused() {
    let mut model = base();
    let plain = LoraConfig::from(modules(["v_proj"])).rank(2).init(LoraInit::Random);
    model.add_adapter("plain", &plain).unwrap();
    model.merge().unwrap();
    let error = unchanged_after(&mut model, |m| {
        m.add_adapter("default", &config(LoraInit::Olora)).unwrap_err()
    });
    assert!(is_refused_init(&error, "model.layers.0.self_attn.v_proj"), "{error}");
}

#[test]
fn a_quantized_base_is_refused() {
    let mut model = base();
    // Q8_0 takes blocks of 32 inputs: down_proj (32 wide) can be quantized.
    for l in model.layers_mut() {
        if l.path == "model.layers.0.mlp.down_proj" {
            l.layer.quantize(candle_core::quantized::GgmlDType::Q8_0).unwrap();
        }
    }
    // q_proj comes first and would be rewritten.
    let error = unchanged_after(&mut model, |m| {
        m.add_adapter("default", &config_on(["q_proj", "down_proj"], LoraInit::Pissa))
            .unwrap_err()
    });
    assert!(is_refused_init(&error, "model.layers.0.mlp.down_proj"), "{error}");
}

#[test]
fn conversion_refuses_a_mismatched_initial_adapter() -> TestResult {
    let mut model = base();
    model.add_adapter("default", &config(LoraInit::Pissa))?;
    // Rank 2 initial adapter: shapes differ.
    let other = scratch("lora_init", "rank2_initial");
    let mut small = base();
    small.add_adapter("default", &config(LoraInit::Pissa).rank(2))?;
    small.save_adapter(&other, "default")?;
    let out = scratch("lora_init", "refused_out");
    let error = model.save_adapter_converted(&out, "default", &other).unwrap_err();
    assert!(
        matches!(&error, PeftError::ShapeMismatch { key, .. } if key.contains("lora_A")),
        "{error}"
    );
    // An initial adapter on q_proj only: v_proj's tensors are missing.
    let q_only = scratch("lora_init", "q_only_initial");
    let mut q = base();
    q.add_adapter("default", &config_on(["q_proj"], LoraInit::Pissa))?;
    q.save_adapter(&q_only, "default")?;
    let error = model.save_adapter_converted(&out, "default", &q_only).unwrap_err();
    assert!(
        matches!(&error, PeftError::MissingTensor { module, .. } if module.ends_with("v_proj")),
        "{error}"
    );
    assert!(!out.join(WEIGHTS_FILE).exists() && !out.join(CONFIG_FILE).exists());
    // DoRA: PEFT would drop the magnitude.
    let mut dora = base();
    dora.add_adapter("default", &config(LoraInit::Pissa).dora(true))?;
    let error = dora.save_adapter_converted(&out, "default", &other).unwrap_err();
    assert!(matches!(&error, PeftError::UnsupportedOption { .. }), "{error}");
    Ok(())
}

/// DoRA with PiSSA (PEFT allows it): the output starts unchanged, the
/// magnitude being the row norms of W_res + s·B·A = W.
#[test]
fn dora_with_pissa_starts_unchanged() -> TestResult {
    let io = io("pissa");
    let mut model = base();
    model.add_adapter("default", &config(LoraInit::Pissa).dora(true))?;
    assert_close(
        "DoRA + PiSSA init logits",
        &logits(&model, &io),
        &io["base_logits"],
        TOL,
    )?;
    Ok(())
}

/// Rust → Python: writes, under `target/`, what `check_in_peft.py` loads
/// in PEFT (see the fixture's CASE.md). Not a check by itself.
#[test]
#[ignore = "writes files for tests/fixtures/pissa_olora/check_in_peft.py"]
fn write_for_peft() -> TestResult {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pissa_olora_for_peft");
    let _ = std::fs::remove_dir_all(&out);
    let io = io("pissa");
    let mut model = base();
    model.add_adapter("default", &config(LoraInit::Pissa))?;
    model.save_adapter(out.join("initial"), "default")?;
    for (n, var) in model.named_trainable_vars() {
        let bump = random::with_seed(n.len() as u64, || {
            random::normal(0.0, 0.1, var.dims(), DType::F32, &DEV)
        })?;
        var.set(&(var.as_tensor() + bump)?)?;
    }
    model.save_adapter(out.join("pissa"), "default")?;
    model.save_adapter_converted(out.join("converted"), "default", out.join("initial"))?;
    candle_core::safetensors::save(
        &HashMap::from([
            ("input_ids".to_owned(), io["input_ids"].clone()),
            ("logits".to_owned(), logits(&model, &io)),
        ]),
        out.join("rust_logits.safetensors"),
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
