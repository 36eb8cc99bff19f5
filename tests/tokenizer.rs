//! `peft_models::tokenizer` against transformers 5.24 on a tiny byte-level
//! BPE tokenizer trained with the `tokenizers` library
//! (`tests/fixtures/tokenizer_chat/`, see its `CASE.md`): ids with and
//! without special tokens, decoding, and chat templates (from
//! `tokenizer_config.json` and from `chat_template.jinja`) rendered and
//! encoded as `apply_chat_template` does.

use peft_models::tokenizer::{Message, Tokenizer};
use serde_json::Value;

mod support;
use support::{fixture_path, read_json};

fn cases() -> Value {
    read_json(fixture_path("tokenizer_chat").join("cases.json"))
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn encoding_and_decoding_match_transformers() {
    let tokenizer = Tokenizer::from_dir(fixture_path("tokenizer_chat")).unwrap();
    assert_eq!(tokenizer.eos_token_id(), Some(1));
    for case in cases()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text, true).unwrap(), ids(&case["ids"]), "{text:?}");
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{text:?} without special tokens"
        );
        let with_special = ids(&case["ids"]);
        assert_eq!(
            tokenizer.decode(&with_special, false).unwrap(),
            case["decode"],
            "{text:?}"
        );
        assert_eq!(
            tokenizer.decode(&with_special, true).unwrap(),
            case["decode_skip_special"],
            "{text:?} skipping special tokens"
        );
    }
}

#[test]
fn chat_templates_render_and_encode_as_apply_chat_template() {
    // The template in tokenizer_config.json, and in chat_template.jinja (what
    // transformers 5 writes by default).
    for folder in [
        fixture_path("tokenizer_chat"),
        fixture_path("tokenizer_chat").join("template_file"),
    ] {
        let tokenizer = Tokenizer::from_dir(&folder).unwrap();
        assert!(tokenizer.has_chat_template());
        for case in cases()["chat"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            for (prompt, suffix) in [(true, "add_generation_prompt"), (false, "no_generation_prompt")] {
                let text = tokenizer.apply_chat_template(&messages, prompt).unwrap();
                assert_eq!(text, case[format!("text_{suffix}")], "{name} ({suffix})");
                assert_eq!(
                    tokenizer.chat_ids(&messages, prompt).unwrap(),
                    ids(&case[format!("ids_{suffix}")]),
                    "{name} ({suffix})"
                );
            }
        }
    }
}

#[test]
fn eval_lines_are_tokenized_alone_with_bos() {
    let tokenizer = Tokenizer::from_dir(fixture_path("tokenizer_chat")).unwrap();
    for line in cases()["eval"]["lines"].as_array().unwrap() {
        let text = line["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text, true).unwrap(), ids(&line["ids"]), "{text:?}");
    }
}

#[test]
fn a_folder_without_a_tokenizer_is_named() {
    let dir = fixture_path("llama_lora_all_linear");
    match Tokenizer::from_dir(&dir) {
        Err(peft_models::ModelError::MissingFile { path, what }) => {
            assert_eq!(path, dir.join("tokenizer.json"));
            assert_eq!(what, "tokenizer.json");
        }
        other => panic!("{other:?}"),
    }
}

/// `tests/fixtures/llama_with_tokenizer`: a Llama with this tokenizer (vocab
/// 300) and its PEFT adapter; expected values from transformers.
mod with_a_model {
    use candle_core::{DType, Device};
    use peft_core::prelude::*;
    use peft_models::eval::{evaluate, read_texts};
    use peft_models::generate::{generate, GenerateOptions};
    use peft_models::tokenizer::{Message, Tokenizer};
    use peft_models::AutoModel;

    use super::ids;
    use super::support::{fixture_path, read_json};

    #[test]
    fn eval_loss_matches_transformers() {
        let dir = fixture_path("llama_with_tokenizer");
        let expected = read_json(dir.join("expected.json"));
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let texts = read_texts(&dir.join("eval.jsonl")).unwrap();
        let mut model = AutoModel::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        for (key, adapter) in [("eval_base", false), ("eval_adapted", true)] {
            if adapter {
                model.load_adapter(dir.join("adapter"), "default").unwrap();
            }
            let report = evaluate(&model, &tokenizer, &texts).unwrap();
            let want = &expected[key];
            assert_eq!(report.tokens as u64, want["tokens"].as_u64().unwrap(), "{key}");
            assert!(
                (report.loss - want["loss"].as_f64().unwrap()).abs() < 1e-5,
                "{key}: {report:?}"
            );
            let perplexity = want["perplexity"].as_f64().unwrap();
            assert!(((report.perplexity - perplexity) / perplexity).abs() < 1e-5, "{key}");
        }
    }

    #[test]
    fn text_and_chat_prompts_continue_as_transformers() {
        let dir = fixture_path("llama_with_tokenizer");
        let expected = read_json(dir.join("expected.json"));
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let mut model = AutoModel::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        let chat = &expected["chat"];
        let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let chat_ids = tokenizer.chat_ids(&messages, true).unwrap();
        assert_eq!(chat_ids, ids(&chat["prompt_ids"]));
        let prompt = &expected["prompt"];
        let prompt_ids = tokenizer.encode(prompt["text"].as_str().unwrap(), true).unwrap();
        assert_eq!(prompt_ids, ids(&prompt["prompt_ids"]));
        let options = GenerateOptions {
            max_new_tokens: 10,
            ..GenerateOptions::default()
        };
        for which in ["base", "adapted"] {
            if which == "adapted" {
                model.load_adapter(dir.join("adapter"), "default").unwrap();
            }
            for (case, input) in [(chat, &chat_ids), (prompt, &prompt_ids)] {
                let generated = generate(&model, input, &options, |_| {}).unwrap();
                assert_eq!(
                    generated.tokens,
                    ids(&case[format!("generated_ids_{which}")]),
                    "{which}"
                );
                let text = tokenizer.decode(&generated.tokens, true).unwrap();
                assert_eq!(text, case[format!("text_{which}")], "{which}");
            }
        }
    }

    #[test]
    fn bad_data_lines_name_the_file_and_line() {
        let dir = super::support::scratch("tokenizer", "bad-data");
        let cases = [
            ("{\"text\": \"fine\"}\nnot json\n", 2, "not JSON"),
            ("{\"text\": \"fine\"}\n\n{\"prompt\": \"x\"}\n", 3, "no `text`"),
            ("{\"text\": 5}\n", 1, "not a string"),
        ];
        for (content, line, reason) in cases {
            let path = dir.join("data.jsonl");
            std::fs::write(&path, content).unwrap();
            match read_texts(&path) {
                Err(peft_models::ModelError::Data {
                    path: at,
                    line: l,
                    reason: r,
                }) => {
                    assert_eq!((at, l), (path.clone(), line));
                    assert!(r.contains(reason), "{r}");
                }
                other => panic!("{content:?}: {other:?}"),
            }
        }
        assert!(matches!(
            read_texts(&dir.join("missing.jsonl")),
            Err(peft_models::ModelError::MissingFile { .. })
        ));
    }
}
