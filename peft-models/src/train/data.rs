//! Training data: jsonl files in mlx-lm's formats, tokenized, masked and
//! batched.
//!
//! Each line is one example, in one of three formats (all lines of a file
//! need not share one):
//!
//! | line | tokens | predicted with `mask_prompt` |
//! | --- | --- | --- |
//! | `{"text": ...}` | the text with the tokenizer's special tokens, EOS appended | every token |
//! | `{"prompt": ..., "completion": ...}` | the chat template over a user and an assistant message; without a template, prompt then completion then EOS | the completion's tokens |
//! | `{"messages": [{"role": ..., "content": ...}, ...]}` | the chat template | the assistant turns' tokens |
//!
//! Without `mask_prompt` every token but the first is predicted. Examples
//! longer than `max_seq_len` tokens are cut to it (as mlx-lm does); one
//! whose predicted tokens all lie past the cut is left out, and
//! [`Dataset::skipped_lines`] names it.
//!
//! # Padding
//!
//! A batch is padded on the right to its longest example. The models'
//! attention is causal, so a real token never attends to the padding after
//! it: right padding changes no real token's logits, and the padded
//! positions are left out of the loss by their zero weight. This is why the
//! models need no attention mask argument.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::tokenizer::{Message, Tokenizer};

/// How examples become token sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOptions {
    /// Count only completion / assistant tokens in the loss.
    pub mask_prompt: bool,
    /// Cut examples to this many tokens.
    pub max_seq_len: usize,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Per token: whether the loss predicts it (the first token never is).
    pub predicted: Vec<bool>,
    /// The line of the file it came from (1-based).
    pub line: usize,
}

impl Example {
    /// How many of its tokens the loss predicts.
    pub fn predicted_tokens(&self) -> usize {
        self.predicted.iter().skip(1).filter(|&&p| p).count()
    }
}

/// A data file read whole: every line checked before any is used.
#[derive(Debug, Clone)]
pub struct Dataset {
    path: PathBuf,
    examples: Vec<Example>,
    skipped: Vec<usize>,
    truncated: usize,
}

/// Where `train.jsonl` and `valid.jsonl` are, in a `--data` folder.
pub fn data_files(dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let train = dir.join("train.jsonl");
    if !train.is_file() {
        return Err(ModelError::MissingFile {
            path: train,
            what: "training data (train.jsonl in the --data folder)",
        });
    }
    let valid = dir.join("valid.jsonl");
    Ok((train, valid.is_file().then_some(valid)))
}

impl Dataset {
    /// Reads, tokenizes and checks every line of `path`. A bad line is an
    /// error naming the file and line: not JSON, no known format, a missing
    /// or non-string field, an empty completion, a conversation the chat
    /// template rejects, an example with nothing to predict.
    pub fn from_jsonl(path: &Path, tokenizer: &Tokenizer, options: &DataOptions) -> Result<Self> {
        let content = crate::checkpoint::read_text(path, "data file")?;
        if options.max_seq_len < 2 {
            return Err(ModelError::Data {
                path: path.to_path_buf(),
                line: 0,
                reason: format!("max_seq_len {} leaves nothing to predict", options.max_seq_len),
            });
        }
        let (mut examples, mut skipped, mut truncated) = (Vec::new(), Vec::new(), 0);
        for (number, text) in content.lines().enumerate() {
            if text.trim().is_empty() {
                continue;
            }
            let line = number + 1;
            let bad = |reason: String| ModelError::Data {
                path: path.to_path_buf(),
                line,
                reason,
            };
            let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
            let (mut ids, mut predicted) = tokenize(&value, tokenizer, options.mask_prompt).map_err(|e| match e {
                LineError::Bad(reason) => bad(reason),
                LineError::Model(e) => bad(e.to_string()),
            })?;
            if predicted.iter().skip(1).all(|&p| !p) {
                return Err(bad(format!("nothing to predict ({} tokens)", ids.len())));
            }
            if ids.len() > options.max_seq_len {
                truncated += 1;
                ids.truncate(options.max_seq_len);
                predicted.truncate(options.max_seq_len);
            }
            let example = Example { ids, predicted, line };
            if example.predicted_tokens() == 0 {
                // Its completion lies past max_seq_len: nothing to learn.
                skipped.push(line);
                continue;
            }
            examples.push(example);
        }
        if examples.is_empty() {
            return Err(ModelError::Data {
                path: path.to_path_buf(),
                line: 0,
                reason: if skipped.is_empty() {
                    "no example".to_owned()
                } else {
                    format!(
                        "no example has a token to predict within max_seq_len {}",
                        options.max_seq_len
                    )
                },
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            examples,
            skipped,
            truncated,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines left out because cutting them to `max_seq_len` left no
    /// completion or assistant token to predict.
    pub fn skipped_lines(&self) -> &[usize] {
        &self.skipped
    }

    /// How many examples were cut to `max_seq_len`.
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// The examples, in file order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// How many examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is none (never, once read).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Batches per epoch: the last one may be smaller.
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.examples.len().div_ceil(batch_size.max(1))
    }

    /// The example indices of batch `index` of epoch `epoch`: epochs are
    /// shuffled by `(seed, epoch)`, so any batch can be found again from
    /// its position alone (this is how a resumed run continues exactly).
    pub fn batch_indices(&self, seed: u64, epoch: usize, index: usize, batch_size: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        let start = index * batch_size;
        order[start.min(order.len())..(start + batch_size).min(order.len())].to_vec()
    }
}

/// A padded batch: inputs and targets shifted by one position.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, t]` u32 token ids.
    pub inputs: Tensor,
    /// `[batch, t]` u32: the token each position predicts.
    pub targets: Tensor,
    /// `[batch, t]` f32: 1 where the position counts in the loss, 0 for
    /// prompt tokens under `mask_prompt` and for padding.
    pub weights: Tensor,
    /// Positions that count (the sum of `weights`).
    pub tokens: usize,
    /// Every position, padding included (`batch * t`).
    pub positions: usize,
}

impl Batch {
    /// The examples padded on the right (with id 0; padding never counts).
    pub fn new(examples: &[&Example], device: &Device) -> Result<Self> {
        let t = examples.iter().map(|e| e.ids.len() - 1).max().unwrap_or(0);
        let (mut inputs, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        let mut tokens = 0;
        for example in examples {
            let n = example.ids.len() - 1;
            inputs.extend_from_slice(&example.ids[..n]);
            targets.extend_from_slice(&example.ids[1..]);
            for &p in &example.predicted[1..] {
                weights.push(if p { 1f32 } else { 0.0 });
                tokens += usize::from(p);
            }
            inputs.extend(std::iter::repeat_n(0, t - n));
            targets.extend(std::iter::repeat_n(0, t - n));
            weights.extend(std::iter::repeat_n(0.0, t - n));
        }
        let shape = (examples.len(), t);
        Ok(Self {
            inputs: Tensor::from_vec(inputs, shape, device)?,
            targets: Tensor::from_vec(targets, shape, device)?,
            weights: Tensor::from_vec(weights, shape, device)?,
            tokens,
            positions: examples.len() * t,
        })
    }
}

/// Why a line is bad: a message, or the tokenizer's error (boxed: it is
/// large, and rare).
enum LineError {
    Bad(String),
    Model(Box<ModelError>),
}

impl From<ModelError> for LineError {
    fn from(e: ModelError) -> Self {
        LineError::Model(Box::new(e))
    }
}

fn string_field<'v>(value: &'v Value, key: &str) -> std::result::Result<&'v str, LineError> {
    match value.get(key) {
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(LineError::Bad(format!("`{key}` is not a string but {other}"))),
        None => Err(LineError::Bad(format!("no `{key}` field"))),
    }
}

/// The ids of one line and which of them the loss predicts.
fn tokenize(
    value: &Value,
    tokenizer: &Tokenizer,
    mask_prompt: bool,
) -> std::result::Result<(Vec<u32>, Vec<bool>), LineError> {
    let eos = tokenizer.eos_token_id();
    if value.get("messages").is_some() {
        let messages: Vec<Message> = serde_json::from_value(value["messages"].clone()).map_err(|e| {
            LineError::Bad(format!(
                "`messages` is not a list of {{\"role\": ..., \"content\": ...}}: {e}"
            ))
        })?;
        if messages.is_empty() {
            return Err(LineError::Bad("`messages` is empty".to_owned()));
        }
        return chat(tokenizer, &messages, mask_prompt);
    }
    if value.get("prompt").is_some() || value.get("completion").is_some() {
        let prompt = string_field(value, "prompt")?;
        let completion = string_field(value, "completion")?;
        if completion.is_empty() {
            return Err(LineError::Bad("`completion` is empty".to_owned()));
        }
        if tokenizer.has_chat_template() {
            let messages = [
                Message {
                    role: "user".to_owned(),
                    content: prompt.to_owned(),
                },
                Message {
                    role: "assistant".to_owned(),
                    content: completion.to_owned(),
                },
            ];
            return chat(tokenizer, &messages, mask_prompt);
        }
        let mut ids = tokenizer.encode(prompt, true)?;
        let prompt_len = ids.len();
        ids.extend(tokenizer.encode(completion, false)?);
        ids.extend(eos.filter(|&e| ids.last() != Some(&e)));
        let predicted = (0..ids.len()).map(|i| !mask_prompt || i >= prompt_len).collect();
        return Ok((ids, predicted));
    }
    if value.get("text").is_some() {
        let mut ids = tokenizer.encode(string_field(value, "text")?, true)?;
        ids.extend(eos.filter(|&e| ids.last() != Some(&e)));
        let predicted = vec![true; ids.len()];
        return Ok((ids, predicted));
    }
    Err(LineError::Bad(
        "no `text`, `prompt` and `completion`, or `messages` field".to_owned(),
    ))
}

/// A conversation through the chat template. With `mask_prompt`, an
/// assistant message's tokens are those between the conversation before it
/// rendered with the generation prompt and the conversation up to it.
fn chat(
    tokenizer: &Tokenizer,
    messages: &[Message],
    mask_prompt: bool,
) -> std::result::Result<(Vec<u32>, Vec<bool>), LineError> {
    let ids = tokenizer.chat_ids(messages, false)?;
    if !mask_prompt {
        return Ok((ids.clone(), vec![true; ids.len()]));
    }
    let mut predicted = vec![false; ids.len()];
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let before = tokenizer.chat_ids(&messages[..i], true)?;
        let through = tokenizer.chat_ids(&messages[..=i], false)?;
        if !through.starts_with(&before) || !ids.starts_with(&through) {
            return Err(LineError::Bad(format!(
                "the chat template does not render the conversation before message {i} as a prefix of it, \
                 so its assistant tokens cannot be told apart (train without mask_prompt)"
            )));
        }
        predicted[before.len()..through.len()].fill(true);
    }
    Ok((ids, predicted))
}
