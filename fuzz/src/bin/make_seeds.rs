//! Writes the seed corpora under `fuzz/seeds/`, from the fixtures and from
//! adapters the fuzz model saves itself, so that every seed loads onto the
//! fuzz model (checked here) and the fuzzer starts at the end of the loading
//! path rather than at its first check.
//!
//! Run by hand after changing the model, the cases or the input format
//! (from `fuzz/`): `cargo +nightly run --release --features make-seeds --bin make_seeds`.
//! The output is deterministic up to the random init of the adapters the
//! model saves.

use std::fs;
use std::path::{Path, PathBuf};

use peft_core::PeftModel;
use peft_fuzz::{cases, flags, rust_configs, templates, LoadInput};
use serde_json::Value;

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().expect("a seed file has a folder")).expect("creating the seed folder");
    fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("../tests/fixtures");
    let seeds = root.join("seeds");
    for target in ["config", "load_adapter", "load_weights"] {
        let dir = seeds.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("clearing the old seeds");
        }
    }

    // Every config file in the fixtures, verbatim, for the config target
    // (most target models other than the fuzz model: they still parse).
    let mut fixture_configs: Vec<PathBuf> = fs::read_dir(&fixtures)
        .expect("tests/fixtures")
        .flat_map(|case| {
            fs::read_dir(case.expect("a fixture folder").path())
                .into_iter()
                .flatten()
        })
        .map(|entry| entry.expect("a fixture entry").path().join(peft_core::CONFIG_FILE))
        .filter(|path| path.is_file())
        .collect();
    fixture_configs.sort();
    for path in &fixture_configs {
        let case = path.parent().and_then(Path::parent).and_then(Path::file_name);
        let folder = path.parent().and_then(Path::file_name);
        let (Some(case), Some(folder)) = (case, folder) else {
            continue;
        };
        let name = format!("fixture_{}_{}.json", case.to_string_lossy(), folder.to_string_lossy());
        write(
            &seeds.join("config").join(name),
            &fs::read(path).expect("a fixture config"),
        );
    }

    let saved_dir = std::env::temp_dir().join(format!("peft-fuzz-seeds-{}", std::process::id()));
    let model = &templates().bare.model;
    let configs = rust_configs();
    for (index, case) in cases().iter().enumerate() {
        let weights = match case.fixture {
            Some(dir) => fs::read(fixtures.join(dir).join(peft_core::WEIGHTS_FILE)).expect("a fixture's weights"),
            None => {
                let (_, config) = configs
                    .iter()
                    .find(|(name, _)| *name == case.name)
                    .expect("a Rust case");
                let mut adapted = model.clone();
                adapted
                    .add_adapter("default", config.as_ref())
                    .expect("a known-good config adds");
                let dir = saved_dir.join(case.name);
                adapted.save_adapter(&dir, "default").expect("saving the adapter");
                // The table's text must be what saving writes.
                let saved = fs::read_to_string(dir.join(peft_core::CONFIG_FILE)).expect("the saved config");
                let parse = |text: &str| serde_json::from_str::<Value>(text).expect("JSON");
                assert_eq!(
                    parse(&saved),
                    parse(&case.config),
                    "{}: saved config differs",
                    case.name
                );
                fs::read(dir.join(peft_core::WEIGHTS_FILE)).expect("the saved weights")
            }
        };
        model
            .clone()
            .load_adapter_from_bytes(&case.config, &weights, "default")
            .unwrap_or_else(|e| panic!("{}: the seed does not load: {e}", case.name));

        write(
            &seeds.join("config").join(format!("{}.json", case.name)),
            case.config.as_bytes(),
        );
        let on_adapted = flags::ADAPTED | 1; // as "other", beside the template's adapters
        for (suffix, flag_bits) in [("", 0), ("_on_adapted", on_adapted)] {
            let seed = LoadInput::encode(flag_bits, &case.config, &weights);
            write(
                &seeds.join("load_adapter").join(format!("{}{suffix}", case.name)),
                &seed,
            );
        }
        let selector = u8::try_from(index).expect("at most 16 cases");
        let mut seed = vec![selector];
        seed.extend_from_slice(&weights);
        write(&seeds.join("load_weights").join(case.name), &seed);
        println!(
            "{:>2} {:<24} config {:>5} B, weights {:>5} B",
            index,
            case.name,
            case.config.len(),
            weights.len()
        );
    }
    let _ = fs::remove_dir_all(&saved_dir);
}
