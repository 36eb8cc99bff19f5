//! `peft`: Hugging Face checkpoints and PEFT adapters from the command line.
//! A thin layer over `peft-models` and `peft-core`: every subcommand is a
//! library call and a print.
//!
//! Errors go to stderr with their cause chain and exit with status 1;
//! usage errors exit with status 2 (clap's convention, as cargo's).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use peft_core::{all_linear, PeftModel};
use peft_models::generate::{generate, GenerateOptions, Sampling};
use peft_models::hub::HubOptions;
use peft_models::tokenizer::{Message, Tokenizer};
use peft_models::AutoModel;
use serde_json::json;

mod combine;
mod convert;
mod export_gguf;
mod inspect;
mod merge;
mod train;

/// Hugging Face checkpoints with PEFT adapters, no Python.
///
/// A model is a checkpoint folder as transformers saves it: config.json and
/// model.safetensors (or shards with model.safetensors.index.json), or a Hub
/// id (org/name) already in the local Hugging Face cache. Adapters are
/// folders as PEFT's save_pretrained writes them.
#[derive(Parser)]
#[command(name = "peft", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What a checkpoint is: architecture, parameters, dtype, and the
    /// layers `all-linear` adapts.
    ///
    /// Example: peft info --model tests/fixtures/llama_lora_all_linear
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt, greedy or sampled: text (--prompt), a chat message
    /// rendered with the model's chat template (--chat), or token ids
    /// (--prompt-ids). Text is printed as it comes; ids without a tokenizer.
    ///
    /// Example: peft generate --model tests/fixtures/llama_lora_all_linear
    ///          --adapter tests/fixtures/llama_lora_all_linear/adapter --prompt-ids 1,17,33,8
    Generate(Box<GenerateArgs>),
    /// Train an adapter on a jsonl data set; the output folder is a PEFT
    /// adapter folder (peft generate --adapter, PeftModel.from_pretrained).
    ///
    /// Example: peft train --model tests/fixtures/llama_with_tokenizer
    ///          --data tests/fixtures/train_data --steps 50 --out /tmp/adapter
    ///
    /// Ctrl-C finishes the step, writes OUT/checkpoint-STEP/ and exits;
    /// --resume OUT/checkpoint-STEP continues exactly.
    Train(Box<train::TrainArgs>),
    /// Merge adapters into a checkpoint and write a transformers-loadable
    /// folder (the same shards and index), tensor by tensor: any
    /// architecture, every kind PEFT's merge_and_unload merges.
    ///
    /// Example: peft merge --model tests/fixtures/merge_cases/llama
    ///          --adapter tests/fixtures/merge_cases/lora/adapter --out /tmp/merged
    Merge(Box<merge::MergeArgs>),
    /// Describe an adapter folder without its base model (kind, PEFT fields,
    /// modules, parameters, dtypes, the norm of each module's change) and
    /// list every problem loading it would meet; exit status 1 if any.
    ///
    /// Example: peft inspect tests/fixtures/merge_cases/loha/adapter
    Inspect(inspect::InspectArgs),
    /// Convert an adapter of any kind (LoHa, LoKr, DoRA, IA³, LoRA) to a plain
    /// LoRA adapter of rank R, by a truncated SVD of each module's change;
    /// prints each module's relative error.
    ///
    /// Example: peft convert --adapter tests/fixtures/merge_cases/loha/adapter
    ///          --to lora --rank 8 --out /tmp/loha-as-lora
    Convert(Box<convert::ConvertArgs>),
    /// Combine LoRA adapters into a new adapter with no base model, as
    /// PEFT's add_weighted_adapter: linear, cat, svd, ties, dare_*,
    /// magnitude_prune and their SVD forms.
    ///
    /// Example: peft combine --adapter tests/fixtures/weighted_adapters/adapters/a
    ///          --adapter tests/fixtures/weighted_adapters/adapters/b --weights 0.7,0.3
    ///          --combination ties --density 0.5 --out /tmp/ties
    Combine(Box<combine::CombineArgs>),
    /// Write a PEFT LoRA adapter as llama.cpp's LoRA adapter GGUF, as
    /// llama.cpp's convert_lora_to_gguf.py writes it (llama-cli --lora FILE).
    ///
    /// Example: peft export-gguf --adapter tests/fixtures/llama_lora_all_linear/adapter
    ///          --model tests/fixtures/llama_lora_all_linear --out /tmp/adapter.gguf
    ExportGguf(Box<export_gguf::ExportGgufArgs>),
    /// The next-token loss and perplexity on a jsonl file of {"text": ...}
    /// lines, each tokenized alone with the tokenizer's special tokens.
    ///
    /// Example: peft eval --model DIR --data valid.jsonl --json
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// A PEFT adapter folder or Hub id (org/name) to apply.
        #[arg(long, value_name = "DIR|ORG/NAME")]
        adapter: Option<PathBuf>,
        /// The jsonl data file.
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
        /// Print one JSON object (loss, perplexity, tokens).
        #[arg(long)]
        json: bool,
    },
}

/// `peft generate`'s flags.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat", "prompt_ids"])))]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A PEFT adapter folder or Hub id (org/name) to apply (unmerged):
    /// from the Hugging Face cache or downloaded into it, as --model.
    #[arg(long, value_name = "DIR|ORG/NAME")]
    adapter: Option<PathBuf>,
    /// The prompt as text, tokenized with the model's tokenizer (with its
    /// special tokens, BOS for most).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template and the
    /// assistant's turn opened.
    #[arg(long, value_name = "TEXT")]
    chat: Option<String>,
    /// The prompt as token ids, comma separated (`1,17,33`).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// The most tokens to add.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy; above 0 the logits are divided by it and a token drawn.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Draw among the most likely tokens that add up to this probability.
    #[arg(long)]
    top_p: Option<f64>,
    /// Draw among this many most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// The seed of the draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Token ids that end the text (comma separated); by default the
    /// tokenizer's end-of-sequence token.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    stop_ids: Option<Vec<u32>>,
    /// Never stop early: generate exactly --max-new-tokens tokens.
    #[arg(long, conflicts_with = "stop_ids")]
    ignore_eos: bool,
    /// Print one JSON object (prompt_ids, generated_ids, text,
    /// tokens_per_second) instead of streaming.
    #[arg(long)]
    json: bool,
}

/// Where the model is and how to load it.
#[derive(clap::Args)]
struct ModelArgs {
    /// A checkpoint folder, or a Hub id (org/name): taken from the Hugging
    /// Face cache (HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub) or downloaded into it (safetensors weights
    /// and tokenizer files; HF_TOKEN for gated models, HF_ENDPOINT for
    /// another Hub, HF_HUB_OFFLINE=1 for the cache only).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    model: String,
    /// The revision of a Hub id: a branch, a tag or a commit hash.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The dtype to load the weights in.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Quantize every linear layer but the head after loading (QLoRA); needs
    /// --dtype f32 and layer widths that are multiples of the block (32 for
    /// q8_0 and q4_0, 256 for q4k).
    #[arg(long, value_enum)]
    quantize: Option<Quantize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Quantize {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4k")]
    Q4k,
}

impl Quantize {
    fn ggml(self) -> GgmlDType {
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
            Quantize::Q4k => GgmlDType::Q4K,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Train(_)) {
        // Before any thread exists: glibc's malloc and candle's pool settings.
        peft_models::train::tune_runtime();
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = format!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!("\n  caused by: {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::from(1)
        }
    }
}

fn load(args: &ModelArgs) -> Result<AutoModel, peft_models::ModelError> {
    let dir = model_dir(args)?;
    let mut model = AutoModel::from_dir(dir, args.dtype.candle(), &Device::Cpu)?;
    if let Some(quantize) = args.quantize {
        model.quantize(quantize.ggml())?;
    }
    Ok(model)
}

fn run(command: Command) -> CliResult {
    match command {
        Command::Info { model: args, json } => info(&args, json),
        Command::Generate(args) => generate_command(&args),
        Command::Train(args) => train::train_command(*args),
        Command::Merge(args) => merge::merge_command(*args),
        Command::Inspect(args) => inspect::inspect_command(args),
        Command::Convert(args) => convert::convert_command(*args),
        Command::Combine(args) => combine::combine_command(*args),
        Command::ExportGguf(args) => export_gguf::export_gguf_command(*args),
        Command::Eval {
            model: args,
            adapter,
            data,
            json,
        } => {
            let mut model = load(&args)?;
            if let Some(adapter) = adapter {
                model.load_adapter(adapter_dir(&adapter)?, "default")?;
            }
            let tokenizer = Tokenizer::from_dir(model_dir(&args)?)?;
            let texts = peft_models::eval::read_texts(&data)?;
            let report = peft_models::eval::evaluate(&model, &tokenizer, &texts)?;
            let mut out = std::io::stdout().lock();
            if json {
                let report = json!({
                    "loss": report.loss,
                    "perplexity": report.perplexity,
                    "tokens": report.tokens,
                    "lines": texts.len(),
                });
                writeln!(out, "{report}")?;
            } else {
                writeln!(out, "loss:       {:.6}", report.loss)?;
                writeln!(out, "perplexity: {:.4}", report.perplexity)?;
                writeln!(out, "tokens:     {} (in {} lines)", report.tokens, texts.len())?;
            }
            Ok(())
        }
    }
}

fn generate_command(args: &GenerateArgs) -> CliResult {
    let mut model = load(&args.model)?;
    if let Some(adapter) = &args.adapter {
        model.load_adapter(adapter_dir(adapter)?, "default")?;
    }
    // A tokenizer is needed for text in or out; ids alone work without one.
    let tokenizer = match Tokenizer::from_dir(model_dir(&args.model)?) {
        Ok(tokenizer) => Some(tokenizer),
        Err(_) if args.prompt_ids.is_some() => None,
        Err(error) => return Err(error.into()),
    };
    let prompt_ids = match (&args.prompt, &args.chat, &args.prompt_ids, &tokenizer) {
        (_, _, Some(ids), _) => ids.clone(),
        (Some(text), _, _, Some(tokenizer)) => tokenizer.encode(text, true)?,
        (_, Some(message), _, Some(tokenizer)) => {
            let messages = [Message {
                role: "user".to_owned(),
                content: message.clone(),
            }];
            tokenizer.chat_ids(&messages, true)?
        }
        _ => return Err("give --prompt, --chat or --prompt-ids".into()),
    };
    let stop_tokens = match (&args.stop_ids, &tokenizer) {
        _ if args.ignore_eos => Vec::new(),
        (Some(ids), _) => ids.clone(),
        (None, Some(tokenizer)) => tokenizer.eos_token_id().into_iter().collect(),
        (None, None) => Vec::new(),
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens,
    };
    let mut out = std::io::stdout().lock();
    let started = Instant::now();
    let (mut tokens, mut printed) = (Vec::new(), String::new());
    let generated = generate(&model, &prompt_ids, &options, |token| {
        tokens.push(token);
        if args.json {
            return;
        }
        // Streamed as it is chosen: the text when there is a tokenizer (a
        // byte-level token may end inside a character: printed once whole).
        match &tokenizer {
            Some(tokenizer) => {
                if let Ok(text) = tokenizer.decode(&tokens, true) {
                    if let Some(new) = text
                        .strip_prefix(printed.as_str())
                        .filter(|new| !new.contains('\u{fffd}'))
                    {
                        let _ = write!(out, "{new}");
                        printed = text;
                    }
                }
            }
            None => {
                let _ = write!(out, "{token} ");
            }
        }
        let _ = out.flush();
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let tokens_per_second = generated.tokens.len() as f64 / seconds.max(1e-9);
    let text = match &tokenizer {
        Some(tokenizer) => Some(tokenizer.decode(&generated.tokens, true)?),
        None => None,
    };
    if args.json {
        let report = json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generated.tokens,
            "text": text,
            "stopped": generated.stopped,
            "tokens_per_second": tokens_per_second,
        });
        writeln!(out, "{report}")?;
    } else {
        if let Some(rest) = text.as_deref().and_then(|text| text.strip_prefix(printed.as_str())) {
            write!(out, "{rest}")?;
        }
        writeln!(out)?;
        eprintln!(
            "{} tokens in {seconds:.2} s ({tokens_per_second:.1} tokens/s)",
            generated.tokens.len()
        );
    }
    Ok(())
}

/// The checkpoint folder `args` names (a Hub id from the cache, or
/// downloaded into it, with progress bars when a person is watching).
fn model_dir(args: &ModelArgs) -> Result<PathBuf, peft_models::ModelError> {
    let options = HubOptions {
        progress: std::io::stdout().is_terminal(),
        ..HubOptions::from_env()
    };
    peft_models::hub::resolve_with(&args.model, Some(&args.revision), &options)
}

/// The adapter folder `adapter` names: the folder, or a Hub id (org/name)
/// from the Hugging Face cache or downloaded into it, as `--model` is.
fn adapter_dir(adapter: &std::path::Path) -> Result<PathBuf, peft_models::ModelError> {
    let options = HubOptions {
        progress: std::io::stdout().is_terminal(),
        ..HubOptions::from_env()
    };
    peft_models::hub::resolve_adapter_with(&adapter.to_string_lossy(), None, &options)
}

fn info(args: &ModelArgs, json: bool) -> CliResult {
    let model = load(args)?;
    let parameters = model.num_parameters();
    let targets = model.targeted_modules(&all_linear())?;
    let mut out = std::io::stdout().lock();
    if json {
        let report = json!({
            "model_type": model.model_type(),
            "dtype": args.dtype.name(),
            "quantized": model.layers().iter().filter(|l| l.layer.is_quantized()).count(),
            "parameters": parameters.total,
            "max_positions": model.max_positions(),
            "all_linear": targets,
        });
        writeln!(out, "{report}")?;
        return Ok(());
    }
    writeln!(out, "model_type:    {}", model.model_type())?;
    writeln!(out, "dtype:         {}", args.dtype.name())?;
    writeln!(out, "parameters:    {}", parameters.total)?;
    if let Some(max) = model.max_positions() {
        writeln!(out, "max positions: {max}")?;
    }
    writeln!(out, "all-linear adapts {} layers:", targets.len())?;
    for target in targets {
        writeln!(out, "  {target}")?;
    }
    Ok(())
}
