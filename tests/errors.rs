//! Every row of `docs/ERRORS.md`: a bad adapter file or a call in the wrong
//! state gets its typed error, and the model is exactly as it was after it.
//!
//! Each test is named in the table's last column; `every_row_names_a_test`
//! keeps the two in step.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{Device, Module, Tensor};
use peft_core::prelude::*;
use peft_core::Ia3Config;
use peft_core::{PeftError, CONFIG_FILE, WEIGHTS_FILE};
use serde_json::{json, Map, Value};

mod support;
use support::{bits, scratch};

const DEV: Device = Device::Cpu;

#[derive(Adaptable)]
struct Block {
    q: Linear,
    v: Linear,
}

#[derive(Adaptable)]
struct Net {
    layers: Vec<Block>,
    #[output_head]
    head: Linear,
}

/// A layer with fixed, distinct weights, so two nets built alike are equal.
fn fixed_linear(in_features: usize, out_features: usize, seed: f64) -> Linear {
    let weight = Tensor::arange(0f32, (in_features * out_features) as f32, &DEV)
        .and_then(|t| t.affine(0.01, seed))
        .and_then(|t| t.sin())
        .and_then(|t| t.reshape((out_features, in_features)))
        .unwrap();
    Linear::new(weight, None)
}

impl Net {
    /// Two blocks of q, v (6 -> 6) and a head 6 -> 4.
    fn new() -> Net {
        let layers = (0..2)
            .map(|i| Block {
                q: fixed_linear(6, 6, i as f64),
                v: fixed_linear(6, 6, 10.0 + i as f64),
            })
            .collect();
        Net {
            layers,
            head: fixed_linear(6, 4, 20.0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.clone();
        for block in &self.layers {
            x = (block.q.forward(&x).unwrap() + block.v.forward(&x).unwrap()).unwrap();
        }
        self.head.forward(&x).unwrap()
    }
}

fn input() -> Tensor {
    Tensor::arange(0f32, 12.0, &DEV)
        .and_then(|t| t.reshape((2, 6)))
        .and_then(|t| t.affine(0.1, -0.5))
        .unwrap()
}

/// What "the model is unchanged" compares: adapter names, which are merged,
/// every weight and the output, bit for bit (NaN compared as bits too).
#[derive(Debug, PartialEq)]
struct Snapshot {
    adapters: Vec<String>,
    merged: Vec<bool>,
    weights: Vec<Vec<u32>>,
    output: Vec<u32>,
}

fn snapshot(net: &Net) -> Snapshot {
    let layers = net.layers();
    Snapshot {
        adapters: net.adapter_names(),
        merged: layers.iter().map(|l| l.layer.is_merged()).collect(),
        weights: layers.iter().map(|l| bits(l.layer.weight().unwrap())).collect(),
        output: bits(&net.forward(&input())),
    }
}

/// Runs `operation`, which must fail, and checks that it left `net` as it was.
fn fails_unchanged<T: std::fmt::Debug>(
    net: &mut Net,
    operation: impl FnOnce(&mut Net) -> peft_core::Result<T>,
) -> PeftError {
    let before = snapshot(net);
    let error = operation(net).expect_err("the operation must fail");
    assert_eq!(snapshot(net), before, "a failed operation changed the model ({error})");
    error
}

// ---- a valid adapter and ways to spoil it ---------------------------------------

/// The two files of a valid LoRA adapter (r = 2, on every q and v) for `Net`.
struct Files {
    config: Map<String, Value>,
    weights: Vec<u8>,
}

fn valid_files() -> Files {
    let mut net = Net::new();
    net.apply_lora(LoraConfig::from(all_linear()).rank(2).init(LoraInit::Random))
        .unwrap();
    let dir = scratch("errors", &format!("valid-{:?}", std::thread::current().id()));
    net.save_adapter(&dir, "default").unwrap();
    let config = serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    let weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    Files { config, weights }
}

impl Files {
    fn config_text(&self) -> String {
        serde_json::to_string_pretty(&self.config).unwrap()
    }

    /// The safetensors header (a JSON object) and the data after it.
    fn header_and_data(&self) -> (Map<String, Value>, Vec<u8>) {
        let length = u64::from_le_bytes(self.weights[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&self.weights[8..8 + length]).unwrap();
        (header, self.weights[8 + length..].to_vec())
    }

    /// Replaces the weights file by `header` (written as given) and `data`.
    fn set_weights(&mut self, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        self.weights = bytes;
    }

    /// Edits the header's entry for `key` and writes it back.
    fn edit_tensor(&mut self, key: &str, edit: impl FnOnce(&mut Map<String, Value>)) {
        let (mut header, data) = self.header_and_data();
        edit(header[key].as_object_mut().unwrap());
        self.set_weights(&Value::Object(header).to_string(), &data);
    }

    /// Overwrites the first value of tensor `key` (an f32) with `value`.
    fn poke_f32(&mut self, key: &str, value: f32) {
        let (header, _) = self.header_and_data();
        let header_length = self.weights.len() - self.header_and_data().1.len();
        let start = header[key]["data_offsets"][0].as_u64().unwrap() as usize + header_length;
        self.weights[start..start + 4].copy_from_slice(&value.to_le_bytes());
    }
}

const KEY_A: &str = "base_model.model.layers.0.q.lora_A.weight";
const KEY_B: &str = "base_model.model.layers.0.q.lora_B.weight";

/// Loads `files` twice, from a folder and from memory, into fresh nets: both
/// must fail with the same kind of error and leave the net unchanged.
fn load_fails(files: &Files) -> PeftError {
    let dir = scratch("errors", &format!("case-{:?}", std::thread::current().id()));
    std::fs::write(dir.join(CONFIG_FILE), files.config_text()).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), &files.weights).unwrap();
    let from_folder = fails_unchanged(&mut Net::new(), |net| net.load_adapter(&dir, "default"));
    let from_memory = fails_unchanged(&mut Net::new(), |net| {
        net.load_adapter_from_bytes(&files.config_text(), &files.weights, "default")
    });
    assert_eq!(
        std::mem::discriminant(&from_folder),
        std::mem::discriminant(&from_memory),
        "{from_folder} / {from_memory}"
    );
    from_folder
}

/// [`load_fails`] for a config edited from the valid one.
fn config_fails(edit: impl FnOnce(&mut Map<String, Value>)) -> PeftError {
    let mut files = valid_files();
    edit(&mut files.config);
    load_fails(&files)
}

/// [`load_fails`] for a config file holding `text`.
fn config_text_fails(text: &str) -> PeftError {
    let files = valid_files();
    let from_memory = fails_unchanged(&mut Net::new(), |net| {
        net.load_adapter_from_bytes(text, &files.weights, "default")
    });
    let dir = scratch("errors", &format!("text-{:?}", std::thread::current().id()));
    std::fs::write(dir.join(CONFIG_FILE), text).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), &files.weights).unwrap();
    let from_folder = fails_unchanged(&mut Net::new(), |net| net.load_adapter(&dir, "default"));
    assert_eq!(
        std::mem::discriminant(&from_folder),
        std::mem::discriminant(&from_memory)
    );
    from_memory
}

fn loads(files: &Files) -> Net {
    let mut net = Net::new();
    net.load_adapter_from_bytes(&files.config_text(), &files.weights, "default")
        .unwrap();
    net
}

// ---- adapter_config.json ----------------------------------------------------------

#[test]
fn config_not_json() {
    for text in ["", "{ \"peft_type\": \"LORA\", ", "not json at all", "\u{feff}{}"] {
        let error = config_text_fails(text);
        assert!(matches!(error, PeftError::Json { .. }), "{text:?}: {error}");
        assert!(error.to_string().contains(CONFIG_FILE), "{error}");
    }
    // Valid JSON that is not an object.
    for text in ["[]", "null", "7", "\"LORA\""] {
        let error = config_text_fails(text);
        assert!(error.to_string().contains("expected a JSON object"), "{text}: {error}");
    }
    // Nesting deeper than serde_json's recursion limit is an error, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let error = config_text_fails(&format!("{{\"peft_type\": \"LORA\", \"x\": {deep}}}"));
    assert!(matches!(error, PeftError::Json { .. }), "{error}");
}

#[test]
fn errors_say_their_cause_once() {
    // The message holds the cause's text, and the error does not also hand
    // the cause out as its `source()`: a program printing the cause chain
    // (as `peft` and anyhow do) says the position once.
    let text = format!("{{\"peft_type\": \"LORA\", \"r\": {}", " ".repeat(400));
    let error = config_text_fails(&text);
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    assert!(matches!(error, PeftError::Json { .. }), "{error}");
    assert_eq!(chain.matches("line 1 column").count(), 1, "{chain}");
}

#[test]
fn config_listing_many_targets_gets_a_short_message() {
    // 200,000 target names that match nothing: the message names the first
    // few and counts the rest, instead of echoing 2 MB back.
    let names: Vec<String> = (0..200_000).map(|i| format!("blocks.{i}.attn.q_proj")).collect();
    let error = config_fails(|c| {
        c.insert("target_modules".into(), json!(names));
    });
    let message = error.to_string();
    assert!(matches!(error, PeftError::NoTargetMatched { .. }), "{message}");
    assert!(message.len() < 1_000, "{} bytes: {}", message.len(), &message[..1_000]);
    assert!(
        message.contains("\"blocks.0.attn.q_proj\"") && message.contains("and 199992 more"),
        "{message}"
    );
}

#[test]
fn config_field_of_wrong_type() {
    for (field, value) in [
        ("r", json!("8")),
        ("lora_alpha", json!([16])),
        ("lora_dropout", json!("0.1")),
        ("target_modules", json!(5)),
        ("use_rslora", json!("yes")),
        ("rank_pattern", json!([1, 2])),
        ("layers_to_transform", json!([-1])),
        ("peft_type", json!(5)),
    ] {
        let error = config_fails(|c| {
            c.insert(field.into(), value.clone());
        });
        match &error {
            PeftError::Json { field: Some(named), .. } => assert_eq!(named, field),
            other => panic!("{field} = {value}: expected a Json error naming the field, got {other:?}"),
        }
        assert!(error.to_string().contains(&format!("(field `{field}`)")), "{error}");
    }
}

#[test]
fn config_unknown_peft_type() {
    for (peft_type, shown) in [(json!("PROMPT_TUNING"), "PROMPT_TUNING"), (json!("lora"), "lora")] {
        let error = config_fails(|c| {
            c.insert("peft_type".into(), peft_type);
        });
        match &error {
            PeftError::UnsupportedPeftType { found, supported } => {
                assert_eq!(found, shown);
                assert!(supported.contains("LORA"), "{supported}");
            }
            other => panic!("expected UnsupportedPeftType, got {other:?}"),
        }
    }
    let error = config_fails(|c| {
        c.remove("peft_type");
    });
    assert!(
        matches!(&error, PeftError::UnsupportedPeftType { found, .. } if found == "null"),
        "{error}"
    );
}

#[test]
fn config_option_not_implemented() {
    for (field, value) in [
        ("use_qalora", json!(true)),
        ("layer_replication", json!([[0, 1]])),
        ("lora_bias", json!(true)),
        ("init_lora_weights", json!("corda")),
        ("ensure_weight_tying", json!(true)),
    ] {
        let error = config_fails(|c| {
            c.insert(field.into(), value.clone());
        });
        match &error {
            PeftError::UnsupportedOption { field: named, .. } => assert_eq!(named, field),
            other => panic!("{field} = {value}: expected UnsupportedOption, got {other:?}"),
        }
    }
    // The same options switched off load.
    let mut files = valid_files();
    files.config.insert("use_qalora".into(), json!(false));
    files.config.insert("layer_replication".into(), Value::Null);
    files.config.insert("modules_to_save".into(), json!([]));
    loads(&files);
}

#[test]
fn config_modules_to_save_naming_nothing() {
    // PEFT's SEQ_CLS list on a model with neither head: PEFT would go on
    // without a trained head; refused here, naming the list.
    let error = config_fails(|c| {
        c.insert("modules_to_save".into(), json!(["classifier", "score"]));
    });
    assert!(matches!(error, PeftError::NoModuleToSave { .. }), "{error}");
    assert!(error.to_string().contains("\"classifier\", \"score\""), "{error}");
}

#[test]
fn config_modules_to_save_without_its_tensor() {
    // `head` exists, so the file must hold its copy.
    let error = config_fails(|c| {
        c.insert("modules_to_save".into(), json!(["head"]));
    });
    assert!(
        matches!(&error, PeftError::MissingTensor { key, .. } if key == "base_model.model.head.weight"),
        "{error}"
    );
}

#[test]
fn config_layer_options_peft_refuses() {
    // LoraConfig's __post_init__ (PEFT 0.21): a string target_modules with
    // layers_to_transform or layers_pattern (any value but null), and
    // layers_pattern without layers_to_transform.
    for (target_modules, layers, pattern, field) in [
        (json!(".*\\.q"), json!([1]), Value::Null, "layers_to_transform"),
        (json!(".*\\.q"), json!([]), Value::Null, "layers_to_transform"),
        (json!("all-linear"), json!(0), Value::Null, "layers_to_transform"),
        (json!(".*\\.q"), Value::Null, json!("layers"), "layers_pattern"),
        (json!(".*\\.q"), Value::Null, json!([]), "layers_pattern"),
        (json!(["q"]), Value::Null, json!("layers"), "layers_pattern"),
        (json!(["q"]), Value::Null, json!(["layers"]), "layers_pattern"),
    ] {
        let error = config_fails(|c| {
            c.insert("target_modules".into(), target_modules.clone());
            c.insert("layers_to_transform".into(), layers.clone());
            c.insert("layers_pattern".into(), pattern.clone());
        });
        match &error {
            PeftError::InvalidConfig { field: f, .. } => assert_eq!(*f, field, "{error}"),
            other => panic!("{target_modules} / {layers} / {pattern}: expected InvalidConfig, got {other:?}"),
        }
        eprintln!("{error}");
    }
    // An empty layers_pattern with a list is no pattern (PEFT's default
    // rule), and an empty layers_to_transform no filter: both load.
    let mut files = valid_files();
    files.config.insert("layers_to_transform".into(), json!([]));
    files.config.insert("layers_pattern".into(), json!("layers"));
    loads(&files);
    files.config.insert("layers_pattern".into(), json!([]));
    loads(&files);
}

#[test]
fn config_rank_zero() {
    let error = config_fails(|c| {
        c.insert("r".into(), json!(0));
    });
    assert!(matches!(error, PeftError::InvalidConfig { field: "r", .. }), "{error}");
    let error = config_fails(|c| {
        c.insert("rank_pattern".into(), json!({"q": 0}));
    });
    assert!(matches!(error, PeftError::InvalidConfig { field: "r", .. }), "{error}");
}

#[test]
fn config_alpha_not_positive() {
    for alpha in [json!(-16), json!(0), json!(-0.5)] {
        let error = config_fails(|c| {
            c.insert("lora_alpha".into(), alpha.clone());
        });
        assert!(
            matches!(
                error,
                PeftError::InvalidConfig {
                    field: "lora_alpha",
                    ..
                }
            ),
            "{alpha}: {error}"
        );
    }
    let error = config_fails(|c| {
        c.insert("alpha_pattern".into(), json!({"v": -1}));
    });
    assert!(
        matches!(
            error,
            PeftError::InvalidConfig {
                field: "lora_alpha",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn config_dropout_out_of_range() {
    for dropout in [json!(1.0), json!(1.5), json!(-0.1)] {
        let error = config_fails(|c| {
            c.insert("lora_dropout".into(), dropout.clone());
        });
        assert!(
            matches!(
                error,
                PeftError::InvalidConfig {
                    field: "lora_dropout",
                    ..
                }
            ),
            "{dropout}: {error}"
        );
    }
}

#[test]
fn config_invalid_regex() {
    for (field, value) in [
        ("target_modules", json!("layers\\.(q")),
        ("exclude_modules", json!("[v")),
        ("rank_pattern", json!({"q(": 4})),
        ("alpha_pattern", json!({"*v": 4})),
    ] {
        let error = config_fails(|c| {
            c.insert(field.into(), value.clone());
        });
        assert!(matches!(error, PeftError::InvalidRegex { .. }), "{field}: {error}");
    }
}

#[test]
fn config_huge_numbers() {
    // Numbers that do not fit the field's type.
    for (field, value) in [
        ("r", "1e30"),
        ("r", "18446744073709551616"),
        ("r", "-1"),
        ("lora_alpha", "1e400"),
        ("layers_to_transform", "[99999999999999999999999]"),
    ] {
        let mut text = valid_files().config_text();
        text = text.replacen('{', &format!("{{\n  \"{field}\": {value},"), 1);
        // A later duplicate of the field would win: drop the original line.
        let original = format!("\n  \"{field}\": ");
        if let Some(at) = text.rfind(&original) {
            if at > 20 {
                let end = at + text[at + 1..].find('\n').unwrap() + 1;
                text.replace_range(at..end, "");
            }
        }
        let error = config_text_fails(&text);
        assert!(matches!(error, PeftError::Json { .. }), "{field} = {value}: {error}");
    }
    // A rank that fits but that no file of this size can back is refused
    // before anything is allocated for it.
    for r in [1_000_000_000_000_u64, 4_000_000] {
        let error = config_fails(|c| {
            c.insert("r".into(), json!(r));
        });
        match &error {
            PeftError::RankBeyondFile {
                module,
                r: asked,
                values,
            } => {
                assert_eq!((module.as_str(), *asked as u64), ("layers.0.q", r));
                assert_eq!(*values, 2 * 6 + 6 * 2, "A and B of layers.0.q");
            }
            other => panic!("r = {r}: expected RankBeyondFile, got {other:?}"),
        }
    }
    let error = config_fails(|c| {
        c.insert("rank_pattern".into(), json!({"v": 1u64 << 40}));
    });
    assert!(matches!(error, PeftError::RankBeyondFile { .. }), "{error}");
}

/// Collects the warnings logged on each thread.
struct Warnings(Mutex<HashMap<std::thread::ThreadId, Vec<String>>>);

impl log::Log for Warnings {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let mut map = self.0.lock().unwrap();
            let entry = map.entry(std::thread::current().id()).or_default();
            entry.push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

static WARNINGS: std::sync::LazyLock<Warnings> = std::sync::LazyLock::new(|| Warnings(Mutex::new(HashMap::new())));

/// The warnings `f` logs on this thread.
fn warnings_of(f: impl FnOnce()) -> Vec<String> {
    if log::set_logger(&*WARNINGS).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let id = std::thread::current().id();
    WARNINGS.0.lock().unwrap().remove(&id);
    f();
    WARNINGS.0.lock().unwrap().remove(&id).unwrap_or_default()
}

#[test]
fn config_unknown_fields() {
    let mut files = valid_files();
    let expected = loads(&files).forward(&input());
    files.config.insert("a_future_option".into(), json!({"on": true}));
    files.config.insert("another_one".into(), json!(3));
    let warnings = warnings_of(|| {
        let net = loads(&files);
        assert_eq!(
            bits(&net.forward(&input())),
            bits(&expected),
            "ignored fields change nothing"
        );
    });
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("a_future_option") && warnings[0].contains("another_one"));
    assert!(warnings[0].contains(CONFIG_FILE), "{}", warnings[0]);
    // PEFT's metadata fields warn about nothing.
    let warnings = warnings_of(|| {
        loads(&valid_files());
    });
    assert!(warnings.is_empty(), "{warnings:?}");
    // Nor does any field PEFT wrote in the fixtures of every kind: each kind
    // reads all of its own fields.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for case in [
        "loha_tiny",
        "lokr_tiny",
        "llama_ia3_all_linear",
        "dora_tiny",
        "lora_conv_tiny",
    ] {
        let path = fixtures.join(case).join("adapter").join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let warnings = warnings_of(|| {
            peft_core::config_file::parse_config(&text, &path).unwrap();
        });
        assert!(warnings.is_empty(), "{case}: {warnings:?}");
    }
}

// ---- adapter_model.safetensors ----------------------------------------------------

/// A safetensors error naming the file.
fn assert_safetensors_error(error: &PeftError) {
    match error {
        PeftError::Safetensors { path, .. } => assert!(path.ends_with(WEIGHTS_FILE), "{error}"),
        other => panic!("expected a safetensors error, got {other:?}"),
    }
}

/// A header error naming `KEY_A` and saying `problem`.
fn assert_tensor_header_error(error: &PeftError, says: &str) {
    match error {
        PeftError::TensorHeader { path, key, problem } => {
            assert!(path.ends_with(WEIGHTS_FILE), "{error}");
            assert_eq!(key, KEY_A);
            assert!(problem.contains(says), "{problem}");
        }
        other => panic!("expected a tensor header error, got {other:?}"),
    }
}

#[test]
fn weights_truncated() {
    let valid = valid_files();
    let header_length = valid.weights.len() - valid.header_and_data().1.len();
    // Cut inside the header: the safetensors crate's error.
    for cut in [0, 4, 8, 20, header_length - 1] {
        let mut files = valid_files();
        files.weights.truncate(cut);
        assert_safetensors_error(&load_fails(&files));
    }
    // Cut inside the data: the first tensor that reaches past the end is named.
    for cut in [header_length, header_length + 47, valid.weights.len() - 1] {
        let mut files = valid_files();
        files.weights.truncate(cut);
        match load_fails(&files) {
            PeftError::TensorHeader { problem, .. } => assert!(problem.contains("outside the data"), "{problem}"),
            other => panic!("cut at {cut}: expected a tensor header error, got {other:?}"),
        }
    }
}

#[test]
fn weights_header_outside_file() {
    let mut files = valid_files();
    // The header says it is longer than the file.
    files.weights[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert_safetensors_error(&load_fails(&files));
    files.weights[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_safetensors_error(&load_fails(&files));
    // A tensor's offsets point past the end of the data.
    let mut files = valid_files();
    files.edit_tensor(KEY_A, |entry| {
        entry.insert("data_offsets".into(), json!([0, 1u64 << 40]));
    });
    assert_tensor_header_error(&load_fails(&files), "outside the data");
}

#[test]
fn weights_header_lies() {
    // A shape with more values than the bytes hold.
    let mut files = valid_files();
    files.edit_tensor(KEY_A, |entry| {
        entry.insert("shape".into(), json!([2, 600]));
    });
    assert_tensor_header_error(&load_fails(&files), "needs 4800 bytes, but its offsets [0, 48] hold 48");
    // A shape whose element count overflows.
    let mut files = valid_files();
    files.edit_tensor(KEY_A, |entry| {
        entry.insert("shape".into(), json!([1u64 << 40, 1u64 << 40]));
    });
    assert_tensor_header_error(&load_fails(&files), "more values than can be addressed");
    // A dtype of another size than the bytes hold.
    let mut files = valid_files();
    files.edit_tensor(KEY_A, |entry| {
        entry.insert("dtype".into(), json!("F16"));
    });
    assert_tensor_header_error(&load_fails(&files), "of F16 needs 24 bytes");
    // A dtype safetensors does not know.
    let mut files = valid_files();
    files.edit_tensor(KEY_A, |entry| {
        entry.insert("dtype".into(), json!("F31"));
    });
    assert_tensor_header_error(&load_fails(&files), "not {dtype, shape, data_offsets}");
    // A dtype of the same size that cannot hold weights.
    let mut files = valid_files();
    files.edit_tensor(KEY_A, |entry| {
        entry.insert("dtype".into(), json!("I32"));
    });
    let error = load_fails(&files);
    assert!(
        matches!(&error, PeftError::WrongDtype { key, found } if key == KEY_A && found == "i32"),
        "{error:?}"
    );
    // The same values in another shape: the shape the module needs decides.
    let mut files = valid_files();
    files.edit_tensor(KEY_A, |entry| {
        entry.insert("shape".into(), json!([6, 2]));
    });
    let error = load_fails(&files);
    assert!(matches!(error, PeftError::ShapeMismatch { .. }), "{error}");
}

#[test]
fn weights_duplicate_keys() {
    let mut files = valid_files();
    let (header, data) = files.header_and_data();
    // serde_json writes objects without repeats: splice a repeat in by hand.
    let entry = header[KEY_B].to_string();
    let text = Value::Object(header).to_string();
    let text = text.replacen('{', &format!("{{\"{KEY_B}\":{entry},"), 1);
    files.set_weights(&text, &data);
    let error = load_fails(&files);
    assert!(
        matches!(&error, PeftError::TensorHeader { key, problem, .. } if key == KEY_B && problem.contains("twice")),
        "{error:?}"
    );
}

#[test]
fn weights_not_finite() {
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        // PEFT loads such a file; so does this crate, and forward shows it...
        let mut files = valid_files();
        files.poke_f32(KEY_B, value);
        let mut net = loads(&files);
        let y: Vec<f32> = net.forward(&input()).flatten_all().unwrap().to_vec1().unwrap();
        assert!(y.iter().any(|v| !v.is_finite()));
        // ...but merging it is refused, naming the module, and nothing merges.
        let error = fails_unchanged(&mut net, |net| net.merge());
        match &error {
            PeftError::NonFiniteWeights { module, operation } => {
                assert_eq!((module.as_str(), *operation), ("layers.0.q", "merge"));
            }
            other => panic!("expected NonFiniteWeights, got {other:?}"),
        }
        let error = fails_unchanged(&mut net, |net| net.merge_and_unload());
        assert!(matches!(error, PeftError::NonFiniteWeights { .. }), "{error}");
        // The layer-level merge refuses too.
        let error = fails_unchanged(&mut net, |net| net.layers[0].q.merge());
        assert!(matches!(error, PeftError::NonFiniteWeights { .. }), "{error}");
    }
    // A finite adapter whose scale overflows f32 when merged.
    let mut files = valid_files();
    files.config.insert("lora_alpha".into(), json!(1e300));
    let mut net = loads(&files);
    let error = fails_unchanged(&mut net, |net| net.merge());
    assert!(matches!(error, PeftError::NonFiniteWeights { .. }), "{error}");
}

#[test]
fn merge_checks_the_base_weights_too() {
    // The last layer's base weight with `value` in its first place: merging
    // checks every layer before the first changes, so a layer late in the
    // model refusing leaves the earlier ones unmerged.
    let with_base_value = |value: f32| {
        let mut net = Net::new();
        let weight = net.layers[1].v.weight().unwrap();
        let mut values: Vec<f32> = weight.flatten_all().unwrap().to_vec1().unwrap();
        values[0] = value;
        net.layers[1].v = Linear::new(Tensor::from_vec(values, (6, 6), &DEV).unwrap(), None);
        net.load_adapter_from_bytes(&valid_files().config_text(), &valid_files().weights, "default")
            .unwrap();
        net
    };
    for value in [f32::NAN, f32::INFINITY] {
        let mut net = with_base_value(value);
        let error = fails_unchanged(&mut net, |net| net.merge());
        match &error {
            PeftError::NonFiniteWeights { module, operation } => {
                assert_eq!((module.as_str(), *operation), ("layers.1.v", "merge"));
            }
            other => panic!("expected NonFiniteWeights, got {other:?}"),
        }
    }
    // Too close to f32's largest value for the adapter's bound to vouch for
    // the sum: computed before anything changes, and finite, so it merges.
    let mut net = with_base_value(3.0e38);
    let values = |net: &Net| -> Vec<f32> {
        net.layers[1]
            .v
            .weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let before = values(&net);
    net.merge().unwrap();
    assert!(net.layers[0].q.is_merged() && net.layers[1].v.is_merged());
    let merged = values(&net);
    assert_eq!(merged[0], 3.0e38);
    assert!(
        merged[1..].iter().zip(&before[1..]).any(|(m, b)| m != b),
        "the adapter changed nothing"
    );
    net.unmerge().unwrap();
    let after = values(&net);
    assert!(after
        .iter()
        .zip(&before)
        .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0)));
}

#[test]
fn weights_wrong_dtype() {
    // An integer tensor with the right shape.
    let mut files = valid_files();
    let (mut header, mut data) = files.header_and_data();
    let start = data.len();
    data.extend(std::iter::repeat_n(0u8, 2 * 6 * 8));
    header.insert(
        KEY_A.into(),
        json!({"dtype": "I64", "shape": [2, 6], "data_offsets": [start, start + 2 * 6 * 8]}),
    );
    let (header, data) = repack(header, &data);
    files.set_weights(&header, &data);
    let error = load_fails(&files);
    assert!(
        matches!(&error, PeftError::WrongDtype { key, .. } if key == KEY_A),
        "{error:?}"
    );
    assert!(error.to_string().contains("i64"), "{error}");
}

#[test]
fn weights_wrong_shape() {
    let mut net = Net::new();
    net.apply_lora(LoraConfig::from(all_linear()).rank(3)).unwrap();
    let dir = scratch("errors", "rank3");
    net.save_adapter(&dir, "default").unwrap();
    // The config says r = 2: every tensor has the wrong shape.
    let mut files = valid_files();
    files.weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let error = load_fails(&files);
    match &error {
        PeftError::ShapeMismatch { key, expected, found } => {
            assert!(key.starts_with("base_model.model.layers.0."), "{key}");
            assert_eq!(expected[0].max(expected[1]), 6);
            assert!(found.contains(&3), "{found:?}");
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn weights_missing_or_unexpected_tensors() {
    let mut files = valid_files();
    let (mut header, data) = files.header_and_data();
    header.remove(KEY_B);
    let (header, data) = repack(header, &data);
    files.set_weights(&header, &data);
    let error = load_fails(&files);
    assert!(
        matches!(&error, PeftError::MissingTensor { key, module } if key == KEY_B && module == "layers.0.q"),
        "{error:?}"
    );

    let mut files = valid_files();
    let (mut header, data) = files.header_and_data();
    let extra = header[KEY_A].clone();
    header.insert("base_model.model.layers.9.q.lora_A.weight".into(), extra);
    let (header, data) = repack(header, &data);
    files.set_weights(&header, &data);
    let error = load_fails(&files);
    match &error {
        PeftError::UnexpectedTensors { keys } => assert_eq!(keys, &["base_model.model.layers.9.q.lora_A.weight"]),
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
}

/// A header and data laid out anew, each tensor's bytes copied from where
/// its old offsets point, in key order (the safetensors crate requires the
/// data to be covered exactly).
fn repack(header: Map<String, Value>, data: &[u8]) -> (String, Vec<u8>) {
    let mut out = Map::new();
    let mut bytes = Vec::new();
    for (key, entry) in header {
        if key == "__metadata__" {
            out.insert(key, entry);
            continue;
        }
        let offsets = &entry["data_offsets"];
        let (start, end) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        let new_start = bytes.len();
        bytes.extend_from_slice(&data[start..end]);
        let mut entry = entry.as_object().unwrap().clone();
        entry.insert("data_offsets".into(), json!([new_start, bytes.len()]));
        out.insert(key, Value::Object(entry));
    }
    (Value::Object(out).to_string(), bytes)
}

// ---- adapter_model.bin (PyTorch's pickle) ------------------------------------------

/// What the hostile pickles of `tests/fixtures/bin_adapter/hostile` would
/// create if Python's pickle (or anything executing them) read them.
const PICKLE_MARKER: &str = "/tmp/peft-rs-pickle-was-executed";

#[test]
fn weights_pickle_not_a_dict_of_tensors() {
    let hostile = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bin_adapter/hostile");
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let _ = std::fs::remove_file(PICKLE_MARKER);
    // (file, the key named, words of the message)
    let cases: [(&str, Option<&str>, &str); 9] = [
        ("int_value.bin", Some("x"), "holds the integer 1, not a tensor"),
        ("nested_dict.bin", Some(key), "holds a dict, not a tensor"),
        ("list.bin", None, "holds a list, not a dict of tensors"),
        (
            "global_value.bin",
            Some(key),
            "holds a call of `posix.system`, not a tensor",
        ),
        (
            "global_top.bin",
            None,
            "holds a call of `posix.system`, not a dict of tensors",
        ),
        ("truncated.bin", None, "not a PyTorch zip archive"),
        ("legacy_format.bin", None, "PyTorch's format before 1.6"),
        ("memo_bomb.bin", None, "more than 50000000 values"),
        ("protocol0.bin", None, "is not one torch.save writes"),
    ];
    let config = valid_files().config_text();
    for (file, named, words) in cases {
        let bytes = std::fs::read(hostile.join(file)).unwrap();
        let dir = scratch("errors", &format!("pickle-{file}"));
        std::fs::write(dir.join(CONFIG_FILE), &config).unwrap();
        std::fs::write(dir.join(peft_core::PICKLE_WEIGHTS_FILE), &bytes).unwrap();
        let mut errors = vec![fails_unchanged(&mut Net::new(), |net| {
            net.load_adapter(&dir, "default")
        })];
        // In memory a zip is taken for PyTorch's file (a bare legacy pickle is not).
        if bytes.starts_with(b"PK\x03\x04") {
            errors.push(fails_unchanged(&mut Net::new(), |net| {
                net.load_adapter_from_bytes(&config, &bytes, "default")
            }));
        }
        errors.push(peft_core::StandaloneAdapter::from_dir(&dir).unwrap_err());
        for error in errors {
            let message = error.to_string();
            match &error {
                PeftError::Pickle { path, key, .. } => {
                    assert!(path.ends_with(peft_core::PICKLE_WEIGHTS_FILE), "{file}: {message}");
                    assert_eq!(key.as_deref(), named, "{file}: {message}");
                }
                other => panic!("{file}: expected PeftError::Pickle, got {other:?}"),
            }
            eprintln!("{file}: {message}");
            assert!(message.contains(words), "{file}: {message}");
            assert!(message.contains("adapter_model.bin"), "{file}: {message}");
        }
    }
    // An integer tensor: the dtype error safetensors files get.
    let dir = scratch("errors", "pickle-int-tensor");
    std::fs::write(dir.join(CONFIG_FILE), &config).unwrap();
    std::fs::copy(hostile.join("int_tensor.bin"), dir.join(peft_core::PICKLE_WEIGHTS_FILE)).unwrap();
    let error = fails_unchanged(&mut Net::new(), |net| net.load_adapter(&dir, "default"));
    assert!(
        matches!(&error, PeftError::WrongDtype { key: k, found } if k == key && found == "i64"),
        "{error}"
    );
    // Nothing of what the pickles name was run.
    assert!(!Path::new(PICKLE_MARKER).exists(), "a pickle was executed");
}

// ---- operations in the wrong state -------------------------------------------------

/// A net with two LoRA adapters, "default" and "other", both active.
fn two_adapters() -> Net {
    let mut net = Net::new();
    let config = LoraConfig::from(all_linear()).rank(2).init(LoraInit::Random);
    net.add_adapter("default", &config).unwrap();
    net.add_adapter("other", &config).unwrap();
    net
}

#[test]
fn state_delete_merged_or_absent() {
    let mut net = two_adapters();
    let error = fails_unchanged(&mut net, |net| net.delete_adapter("missing"));
    assert!(
        matches!(&error, PeftError::UnknownAdapter { adapter, known } if adapter == "missing" && known == "default, other"),
        "{error:?}"
    );
    net.merge().unwrap();
    let error = fails_unchanged(&mut net, |net| net.delete_adapter("other"));
    assert!(matches!(error, PeftError::MergeState { .. }), "{error}");
}

#[test]
fn state_unmerge_not_merged() {
    let mut net = two_adapters();
    let error = fails_unchanged(&mut net, |net| net.unmerge());
    assert!(matches!(error, PeftError::NothingToUnmerge), "{error}");
    net.merge().unwrap();
    net.unmerge().unwrap();
    let error = fails_unchanged(&mut net, |net| net.unmerge());
    assert!(matches!(error, PeftError::NothingToUnmerge), "{error}");
    // Without any adapter too.
    let error = fails_unchanged(&mut Net::new(), |net| net.unmerge());
    assert!(matches!(error, PeftError::NothingToUnmerge), "{error}");
}

#[test]
fn state_merge_twice() {
    let mut net = two_adapters();
    net.merge().unwrap();
    let error = fails_unchanged(&mut net, |net| net.merge());
    assert!(
        matches!(&error, PeftError::NothingToMerge { reason } if reason.contains("`default`, `other`")),
        "{error:?}"
    );
    let error = fails_unchanged(&mut net, |net| net.merge_adapters(&["other"]));
    assert!(matches!(error, PeftError::NothingToMerge { .. }), "{error}");
    let error = fails_unchanged(&mut net, |net| net.merge_adapters(&["missing"]));
    assert!(matches!(error, PeftError::UnknownAdapter { .. }), "{error}");
    // Nothing to merge at all.
    let error = fails_unchanged(&mut Net::new(), |net| net.merge());
    assert!(
        matches!(&error, PeftError::NothingToMerge { reason } if reason.contains("no active adapter")),
        "{error:?}"
    );
    let mut net = two_adapters();
    net.disable_adapters().unwrap();
    let error = fails_unchanged(&mut net, |net| net.merge());
    assert!(
        matches!(&error, PeftError::NothingToMerge { reason } if reason.contains("disabled")),
        "{error:?}"
    );
}

#[test]
fn state_name_exists() {
    let mut net = two_adapters();
    let error = fails_unchanged(&mut net, |net| net.apply_lora(all_linear()));
    assert!(
        matches!(&error, PeftError::AdapterExists { adapter, module } if adapter == "default" && module == "layers.0.q"),
        "{error:?}"
    );
    let files = valid_files();
    let error = fails_unchanged(&mut net, |net| {
        net.load_adapter_from_bytes(&files.config_text(), &files.weights, "other")
    });
    assert!(matches!(error, PeftError::AdapterExists { .. }), "{error}");
    // A name held on other layers is taken too: one name, one adapter.
    let mut net = Net::new();
    net.add_adapter("style", &LoraConfig::from(modules(["q"]))).unwrap();
    let error = fails_unchanged(&mut net, |net| {
        net.add_adapter("style", &LoraConfig::from(modules(["v"])))
    });
    assert!(
        matches!(&error, PeftError::AdapterExists { module, adapter } if module == "layers.0.q" && adapter == "style"),
        "{error:?}"
    );
    let error = fails_unchanged(&mut net, |net| {
        net.load_adapter_from_bytes(&files.config_text(), &files.weights, "style")
    });
    assert!(matches!(error, PeftError::AdapterExists { .. }), "{error}");
}

/// A model with other module names than the adapter was saved for.
#[derive(Adaptable)]
struct OtherNet {
    blocks: Vec<Block>,
    #[output_head]
    head: Linear,
}

#[test]
fn state_model_lacks_targets() {
    let files = valid_files();
    // None of the saved target_modules exists.
    let mut other = OtherNet {
        blocks: vec![Block {
            q: fixed_linear(6, 6, 0.0),
            v: fixed_linear(6, 6, 1.0),
        }],
        head: fixed_linear(6, 4, 2.0),
    };
    let error = other
        .load_adapter_from_bytes(&files.config_text(), &files.weights, "default")
        .unwrap_err();
    assert!(matches!(error, PeftError::NoTargetMatched { .. }), "{error}");
    assert!(other.adapter_names().is_empty());
    // Some exist (one block instead of two): the file's other tensors are refused.
    let mut net = Net::new();
    net.layers.pop();
    let error = net
        .load_adapter_from_bytes(&files.config_text(), &files.weights, "default")
        .unwrap_err();
    match &error {
        PeftError::UnexpectedTensors { keys } => {
            assert_eq!(keys.len(), 4, "A and B of layers.1.q and layers.1.v: {keys:?}");
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
    assert!(net.adapter_names().is_empty());
}

#[test]
fn state_switch_active_while_merged() {
    let mut net = two_adapters();
    let error = fails_unchanged(&mut net, |net| net.set_active_adapters(&["missing"]));
    assert!(matches!(error, PeftError::UnknownAdapter { .. }), "{error}");
    net.merge().unwrap();
    let error = fails_unchanged(&mut net, |net| net.set_active_adapters(&["default"]));
    assert!(matches!(error, PeftError::MergeState { .. }), "{error}");
}

#[test]
fn state_adapters_that_cannot_combine() {
    // DoRA after IA³ scaling the same layer's output: DoRA reads the base
    // weight and bias, which IA³ has already scaled.
    let mut net = Net::new();
    net.add_adapter("scale", &Ia3Config::from(all_linear())).unwrap();
    let dora = LoraConfig::from(all_linear()).rank(2).dora(true);
    let error = fails_unchanged(&mut net, |net| net.add_adapter("dora", &dora));
    assert!(
        matches!(&error, PeftError::IncompatibleAdapter { module, adapter, .. } if module == "layers.0.q" && adapter == "dora"),
        "{error:?}"
    );
    // Anything but an additive adapter joining merged ones.
    let mut net = two_adapters();
    net.merge().unwrap();
    let error = fails_unchanged(&mut net, |net| net.add_adapter("dora", &dora));
    assert!(matches!(error, PeftError::IncompatibleAdapter { .. }), "{error}");
    // An additive one may.
    net.add_adapter("third", &LoraConfig::from(all_linear()).rank(2))
        .unwrap();
    // A whole copy of a layer (modules_to_save) where another adapter sits,
    // and an adapter where a copy sits.
    let mut net = Net::new();
    net.add_adapter("lora", &LoraConfig::from(modules(["head"])).rank(2))
        .unwrap();
    let copy = LoraConfig::from(modules(["q"]).modules_to_save(["head"])).rank(2);
    let error = fails_unchanged(&mut net, |net| net.add_adapter("copy", &copy));
    assert!(
        matches!(&error, PeftError::IncompatibleAdapter { module, adapter, .. } if module == "head" && adapter == "copy"),
        "{error:?}"
    );
    let mut net = Net::new();
    net.add_adapter("copy", &copy).unwrap();
    let lora = LoraConfig::from(modules(["head"])).rank(2);
    let error = fails_unchanged(&mut net, |net| net.add_adapter("lora", &lora));
    assert!(matches!(error, PeftError::IncompatibleAdapter { .. }), "{error}");
}

#[test]
fn state_partial_merge_not_exact() {
    // Merging LoRA alone while DoRA stays active and unmerged: DoRA would
    // read the base weight with LoRA merged in.
    let mut net = Net::new();
    let lora = LoraConfig::from(all_linear()).rank(2).init(LoraInit::Random);
    net.add_adapter("lora", &lora).unwrap();
    net.add_adapter("dora", &lora.clone().dora(true)).unwrap();
    let error = fails_unchanged(&mut net, |net| net.merge_adapters(&["lora"]));
    match &error {
        PeftError::MergeState { module, reason } => {
            assert_eq!(module, "layers.0.q");
            assert!(reason.contains("additive"), "{reason}");
        }
        other => panic!("expected MergeState, got {other:?}"),
    }
    // Both at once, or one of two additive adapters, merge.
    net.merge_adapters(&["lora", "dora"]).unwrap();
    let mut net = two_adapters();
    net.merge_adapters(&["default"]).unwrap();
}

// ---- the table and the tests stay in step ------------------------------------------

#[test]
fn every_row_names_a_test() {
    let table = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ERRORS.md")).unwrap();
    let tests: String = [
        "tests/errors.rs",
        "tests/adapter_io.rs",
        "tests/qlora.rs",
        "tests/modules_to_save.rs",
        "tests/mixed_batch.rs",
        "tests/combine.rs",
        "tests/lora_bias.rs",
        "tests/lora_init.rs",
        "tests/trainable_tokens.rs",
    ]
    .iter()
    .map(|file| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap())
    .collect();
    let mut rows = 0;
    for line in table.lines().filter(|l| l.starts_with('|') && !l.starts_with("| ---")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Some(test) = cells
            .last()
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        let name = test.rsplit("::").next().unwrap();
        assert!(
            tests.contains(&format!("fn {name}(")),
            "docs/ERRORS.md names test `{test}`, which does not exist"
        );
        rows += 1;
    }
    assert!(rows >= 20, "docs/ERRORS.md has only {rows} rows naming a test");
    // And every test of this file is in the table.
    let own = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors.rs")).unwrap();
    for line in own.lines().filter(|l| l.starts_with("fn ") && l.ends_with("() {")) {
        let name = &line[3..line.len() - "() {".len()];
        let is_test = own.contains(&format!("#[test]\n{line}"));
        if is_test && name != "every_row_names_a_test" {
            assert!(
                table.contains(&format!("`errors::{name}`")),
                "test {name} is missing from docs/ERRORS.md"
            );
        }
    }
}
