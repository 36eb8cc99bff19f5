//! Next-token loss on a data set: `peft eval`.
//!
//! Each line of a jsonl file is `{"text": ...}`, tokenized alone with the
//! tokenizer's default special tokens (BOS, for most); every position
//! predicts the next token of its line, and the loss is the mean
//! cross-entropy over all those predictions of all lines together (in
//! f64), as `transformers` computes it with `labels = input_ids` summed
//! over the lines and divided by their predicted tokens.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;

use crate::auto::AutoModel;
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalReport {
    /// Mean next-token cross-entropy, in nats.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// How many tokens were predicted.
    pub tokens: usize,
}

/// The `text` of every line of a jsonl file. A bad line is an error naming
/// the file and the line (1-based): not JSON, no `text`, `text` not a string.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let content = crate::checkpoint::read_text(path, "data file")?;
    let mut texts = Vec::new();
    for (number, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| ModelError::Data {
            path: path.to_path_buf(),
            line: number + 1,
            reason,
        };
        let value: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        match value.get("text") {
            Some(Value::String(text)) => texts.push(text.clone()),
            Some(other) => return Err(bad(format!("`text` is not a string but {other}"))),
            None => return Err(bad("no `text` field".to_owned())),
        }
    }
    Ok(texts)
}

/// The next-token loss of `model` on `texts`.
pub fn evaluate(model: &AutoModel, tokenizer: &Tokenizer, texts: &[String]) -> Result<EvalReport> {
    let (mut total, mut tokens) = (0f64, 0usize);
    for text in texts {
        let ids = tokenizer.encode(text, true)?;
        if ids.len() < 2 {
            continue;
        }
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input)?.i(0)?.to_dtype(DType::F64)?;
        let rows: Vec<Vec<f64>> = logits.to_vec2()?;
        for (position, &target) in ids.iter().skip(1).enumerate() {
            let row = &rows[position];
            let Some(&target_logit) = row.get(target as usize) else {
                return Err(ModelError::Eval {
                    reason: format!(
                        "token {target} is outside the model's vocabulary of {}: the tokenizer is another model's",
                        row.len()
                    ),
                });
            };
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            total += log_sum - target_logit;
            tokens += 1;
        }
    }
    if tokens == 0 {
        return Err(ModelError::Eval {
            reason: "no line has two tokens to predict one from".to_owned(),
        });
    }
    let loss = total / tokens as f64;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}
