//! The `peft` binary on the transformers fixtures: what it prints, with
//! `--json`, and its exit codes (0, 1 on error with the cause on stderr,
//! 2 on a usage error).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, IndexOp};
use serde_json::Value;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(case)
}

fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap()
}

fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `name` of the case's io.safetensors as ids, row 0.
fn fixture_ids(case: &str, name: &str) -> Vec<u32> {
    let io = candle_core::safetensors::load(fixture(case).join("io.safetensors"), &Device::Cpu).unwrap();
    io[name].to_dtype(DType::U32).unwrap().i(0).unwrap().to_vec1().unwrap()
}

#[test]
fn info_lists_what_all_linear_adapts() {
    let case = "llama_lora_all_linear";
    let model = fixture(case);
    let report = json_of(&peft(&["info", "--model", model.to_str().unwrap(), "--json"]));
    assert_eq!(report["model_type"], "llama");
    assert_eq!(report["max_positions"], 64);
    let targets: Value = serde_json::from_str(&std::fs::read_to_string(model.join("targets.json")).unwrap()).unwrap();
    assert_eq!(report["all_linear"], targets["targets"]);

    let text = peft(&["info", "--model", model.to_str().unwrap()]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("all-linear adapts 14 layers") && text.contains("model.layers.1.mlp.up_proj"),
        "{text}"
    );
}

#[test]
fn generate_continues_as_transformers_does() {
    for case in [
        "mistral_lora_all_linear",
        "qwen2_lora_all_linear",
        "qwen3_lora_all_linear",
    ] {
        let model = fixture(case);
        let adapter = model.join("adapter");
        let prompt: Vec<String> = fixture_ids(case, "generate_prompt")
            .iter()
            .map(u32::to_string)
            .collect();
        let prompt = prompt.join(",");
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &prompt,
            "--max-new-tokens",
            "12",
            "--json",
        ];
        for (adapted, expected) in [(false, "generate_base"), (true, "generate_adapted")] {
            if adapted {
                args.extend(["--adapter", adapter.to_str().unwrap()]);
            }
            let report = json_of(&peft(&args));
            let expected = fixture_ids(case, expected);
            let generated: Vec<u32> = serde_json::from_value(report["generated_ids"].clone()).unwrap();
            assert_eq!(generated, expected[4..], "{case} (adapter: {adapted})");
            assert!(report["tokens_per_second"].as_f64().unwrap() > 0.0);
        }
    }
}

#[test]
fn errors_exit_1_with_the_cause_and_usage_errors_exit_2() {
    let missing = fixture("no_such_model");
    let output = peft(&["info", "--model", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with("error: ") && stderr.contains("no_such_model: checkpoint folder"),
        "{stderr}"
    );
    // A folder without config.json (an adapter folder, say).
    let adapter = fixture("llama_lora_all_linear").join("adapter");
    let output = peft(&["info", "--model", adapter.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("config.json not found"));

    let model = fixture("llama_lora_all_linear");
    let output = peft(&["generate", "--model", model.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--prompt-ids"));

    let output = peft(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "100",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("positions"));
}

#[test]
fn hub_ids_come_from_the_cache_the_environment_names() {
    // A Hugging Face cache laid out as huggingface_hub does, holding a fixture.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-hub-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let repo = cache.join("models--tiny-org--tiny-llama");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama_lora_all_linear").join(file), snapshot.join(file)).unwrap();
    }
    // A Hub that refuses connections: a port just freed.
    let dead_endpoint = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let run = |model: &str, offline: &str| {
        Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["info", "--model", model, "--json"])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", offline)
            .env("HF_ENDPOINT", &dead_endpoint)
            .output()
            .unwrap()
    };
    assert_eq!(json_of(&run("tiny-org/tiny-llama", "1"))["model_type"], "llama");
    assert_eq!(json_of(&run("tiny-org/tiny-llama", "0"))["model_type"], "llama");
    // Not cached: offline says so; online says what it could not download.
    for (offline, says) in [("1", "offline"), ("0", "could not download")] {
        let missing = run("tiny-org/not-there", offline);
        assert_eq!(missing.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&missing.stderr);
        assert!(
            stderr.contains("tiny-org/not-there") && stderr.contains(cache.to_str().unwrap()) && stderr.contains(says),
            "{stderr}"
        );
    }
}

#[test]
fn quantize_at_load() {
    let model = fixture("llama_lora_all_linear");
    let model = model.to_str().unwrap();
    let report = json_of(&peft(&["info", "--model", model, "--quantize", "q8_0", "--json"]));
    assert_eq!(report["quantized"], 14);
    // Q4K blocks are 256 wide: this 32-wide model cannot take them.
    let output = peft(&["info", "--model", model, "--quantize", "q4k"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("256"));
}

#[test]
fn text_chat_and_eval_with_the_checkpoints_tokenizer() {
    let dir = fixture("llama_with_tokenizer");
    let model = dir.to_str().unwrap();
    let adapter = dir.join("adapter");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for (flag, key, text) in [("--chat", "chat", "hello robot"), ("--prompt", "prompt", "The robot")] {
        let report = json_of(&peft(&[
            "generate",
            "--model",
            model,
            flag,
            text,
            "--max-new-tokens",
            "10",
            "--ignore-eos",
            "--json",
        ]));
        assert_eq!(report["prompt_ids"], expected[key]["prompt_ids"], "{flag}");
        assert_eq!(report["generated_ids"], expected[key]["generated_ids_base"], "{flag}");
        assert_eq!(report["text"], expected[key]["text_base"], "{flag}");
    }
    let data = dir.join("eval.jsonl");
    for (adapted, key) in [(false, "eval_base"), (true, "eval_adapted")] {
        let mut args = vec!["eval", "--model", model, "--data", data.to_str().unwrap(), "--json"];
        if adapted {
            args.extend(["--adapter", adapter.to_str().unwrap()]);
        }
        let report = json_of(&peft(&args));
        assert_eq!(report["tokens"], expected[key]["tokens"]);
        let loss = report["loss"].as_f64().unwrap();
        assert!(
            (loss - expected[key]["loss"].as_f64().unwrap()).abs() < 1e-5,
            "{key}: {loss}"
        );
    }
    // Text needs a tokenizer: a checkpoint without one says so.
    let bare = fixture("llama_lora_all_linear");
    let output = peft(&["generate", "--model", bare.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("tokenizer.json not found"));
}

/// A fresh folder under the target dir for one test's outputs.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The last line of stdout, as JSON.
fn last_json_line(output: &Output) -> Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `peft train` on the tiny Llama with a tokenizer, `data` and `out`, then `extra`.
fn train_command(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let model = fixture("llama_with_tokenizer");
    let mut command = Command::new(env!("CARGO_BIN_EXE_peft"));
    command.args(["train", "--model", model.to_str().unwrap()]);
    command.args(["--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    command.args(extra);
    command
}

fn peft_train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    train_command(data, out, extra).output().unwrap()
}

/// The settings of the resume test's runs.
const TWELVE_STEPS: &[&str] = &[
    "--steps",
    "12",
    "--batch-size",
    "3",
    "--learning-rate",
    "1e-3",
    "--save-every",
    "6",
    "--dropout",
    "0.05",
    "--json",
];

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn train_writes_an_adapter_that_generate_and_eval_load_and_resumes_exactly() {
    let model = fixture("llama_with_tokenizer");
    let data = fixture("train_data");
    let out = scratch("train_straight");
    let done = last_json_line(&peft_train(&data, &out, TWELVE_STEPS));
    assert_eq!(done["event"], "done");
    assert_eq!(done["steps"], 12);
    assert_eq!(done["interrupted"], false);
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "train_args.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let (model, adapter) = (model.to_str().unwrap(), out.to_str().unwrap());
    let generated = json_of(&peft(&[
        "generate",
        "--model",
        model,
        "--adapter",
        adapter,
        "--chat",
        "Say hello.",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(generated["generated_ids"].as_array().unwrap().len(), 4);
    let eval = fixture("llama_with_tokenizer").join("eval.jsonl");
    let evaluated = json_of(&peft(&[
        "eval",
        "--model",
        model,
        "--adapter",
        adapter,
        "--data",
        eval.to_str().unwrap(),
        "--json",
    ]));
    assert!(evaluated["loss"].as_f64().unwrap().is_finite());

    // Resumed from step 6 into another folder: the same final bytes.
    let resumed = scratch("train_resumed");
    let checkpoint = out.join("checkpoint-6");
    let resume = [TWELVE_STEPS, &["--resume", checkpoint.to_str().unwrap()]].concat();
    assert_eq!(last_json_line(&peft_train(&data, &resumed, &resume))["steps"], 12);
    let bytes = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&out), bytes(&resumed));

    // Other settings are refused, naming the one that differs.
    let refused = peft_train(&data, &resumed, &[resume.as_slice(), &["--seed", "3"]].concat());
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("cannot resume") && stderr.contains("`seed`"),
        "{stderr}"
    );
}

#[test]
fn train_reads_a_config_file_under_the_flags_and_names_bad_input() {
    let data = fixture("train_data");
    let out = scratch("train_config");
    let config = out.join("config.yaml");
    std::fs::write(
        &config,
        "steps: 3\nlearning_rate: 0.5\nbatch-size: 2\nkind: loha\nrank: 2\n",
    )
    .unwrap();
    let config_flag = ["--config", config.to_str().unwrap()];
    let done = last_json_line(&peft_train(
        &data,
        &out,
        &[&config_flag[..], &["--learning-rate", "0.01", "--json"]].concat(),
    ));
    assert_eq!(done["steps"], 3);
    let recorded = read_json(&out.join("train_args.json"));
    assert_eq!(recorded["learning-rate"], 0.01); // the flag wins
    assert_eq!(recorded["batch-size"], 2); // the file fills in
    assert_eq!(read_json(&out.join("adapter_config.json"))["peft_type"], "LOHA");

    // A key that is no flag.
    std::fs::write(&config, "stepz: 3\n").unwrap();
    let output = peft_train(&data, &out, &config_flag);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.yaml") && stderr.contains("stepz"), "{stderr}");

    // A bad data line: file and line.
    let bad = scratch("train_bad_data");
    let lines = "{\"text\": \"fine\"}\n{\"prompt\": \"q\", \"completion\": \"\"}\n";
    std::fs::write(bad.join("train.jsonl"), lines).unwrap();
    let output = peft_train(&bad, &bad, &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("train.jsonl:2: `completion` is empty"), "{stderr}");
    assert!(!bad.join("adapter_model.safetensors").exists());
}

#[cfg(unix)]
#[test]
fn ctrl_c_finishes_the_step_and_writes_a_checkpoint() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let out = scratch("train_interrupted");
    let mut child = train_command(
        &fixture("train_data"),
        &out,
        &["--steps", "1000000", "--log-every", "1", "--json"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Wait for a step, then interrupt.
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "step");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<Value> = lines
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect();
    assert!(child.wait().unwrap().success());
    let done = rest.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["interrupted"], true);
    let steps = done["steps"].as_u64().unwrap();
    let checkpoint = out.join(format!("checkpoint-{steps}"));
    assert_eq!(done["adapter"], checkpoint.to_str().unwrap());
    for file in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(checkpoint.join(file).is_file(), "{file}");
    }
}

#[test]
fn train_goes_on_from_a_peft_adapter_over_a_quantized_base() {
    let adapter = fixture("llama_with_tokenizer").join("adapter");
    let data = fixture("train_data");
    let out = scratch("train_qlora_from_adapter");
    let from_adapter = ["--adapter", adapter.to_str().unwrap()];
    let extra = [
        "--quantize",
        "q4_0",
        "--steps",
        "3",
        "--learning-rate",
        "1e-2",
        "--json",
    ];
    let done = last_json_line(&peft_train(&data, &out, &[&from_adapter[..], &extra].concat()));
    assert_eq!(done["steps"], 3);
    let config = |dir: &Path| read_json(&dir.join("adapter_config.json"));
    assert_eq!(config(&out)["r"], config(&adapter)["r"]);
    let targets = |dir: &Path| {
        let config = config(dir);
        let mut names: Vec<&str> = config["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        names.sort();
        names.join(",")
    };
    assert_eq!(targets(&out), targets(&adapter)); // PEFT wrote a set, in any order
    let bytes = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_ne!(bytes(&out), bytes(&adapter), "the adapter trained");

    // Adapter flags do not go with --adapter: a usage error.
    let output = peft_train(&data, &out, &[&from_adapter[..], &["--rank", "3"]].concat());
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn merge_writes_a_checkpoint_folder_and_refuses_to_overwrite_one() {
    let cases = fixture("merge_cases");
    let out = scratch("merge").join("merged");
    let (model, adapter) = (cases.join("llama"), cases.join("lora/adapter"));
    let args = [
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    let report = json_of(&peft(&args));
    assert_eq!(report["shards"], 3);
    assert_eq!(report["merged_modules"].as_array().unwrap().len(), 14);
    let again = peft(&args);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(peft(&[&args[..], &["--force"]].concat()).status.success());
    // Two weights for one adapter: refused.
    let output = peft(&[&args[..], &["--force", "--weights", "0.5,0.5"]].concat());
    assert_eq!(output.status.code(), Some(1));
}

/// The disk fills up part way (a file size limit on the child): no output
/// folder appears, complete-looking or not.
#[cfg(unix)]
#[test]
fn a_merge_that_fails_part_way_leaves_no_output_folder() {
    let cases = fixture("merge_cases");
    let dir = scratch("merge_disk_full");
    let out = dir.join("merged");
    let status = Command::new("sh")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 30; exec \"$@\"",
            "sh",
            env!("CARGO_BIN_EXE_peft"),
            "merge",
        ])
        .args(["--model", cases.join("llama").to_str().unwrap()])
        .args([
            "--adapter",
            cases.join("lora/adapter").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!status.status.success(), "the limit did not bite");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(stderr.contains("error:"), "{stderr}");
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn adapters_by_hub_id_come_from_the_cache() {
    // A cache holding a PEFT adapter repository, laid out as huggingface_hub does.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-hub-adapter-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let repo = cache.join("models--tiny-org--tiny-adapter");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let adapter = fixture("llama_lora_all_linear").join("adapter");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(file), snapshot.join(file)).unwrap();
    }
    let model = fixture("llama_lora_all_linear");
    let run = |adapter: &str| {
        Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["generate", "--model", model.to_str().unwrap(), "--adapter", adapter])
            .args(["--prompt-ids", "1,17,33,8", "--max-new-tokens", "6", "--json"])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let by_id = json_of(&run("tiny-org/tiny-adapter"));
    let by_folder = json_of(&run(adapter.to_str().unwrap()));
    assert_eq!(by_id["generated_ids"], by_folder["generated_ids"]);
    let missing = run("tiny-org/no-adapter");
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("tiny-org/no-adapter") && stderr.contains("offline"),
        "{stderr}"
    );
}
