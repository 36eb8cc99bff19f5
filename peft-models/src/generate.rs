//! Text generation: greedy or sampled (temperature, top-k, top-p, a seed),
//! one token at a time through the KV cache, until an end token or a
//! number of new tokens.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use peft_models::generate::{generate, GenerateOptions};
//! use peft_models::AutoModel;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = AutoModel::from_dir("path/to/checkpoint", DType::F32, &Device::Cpu)?;
//! let options = GenerateOptions { max_new_tokens: 20, ..GenerateOptions::default() };
//! let generated = generate(&model, &[1, 17, 33], &options, |token| print!("{token} "))?;
//! assert!(generated.tokens.len() <= 20);
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Device, IndexOp, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::auto::AutoModel;
use crate::error::{ModelError, Result};
use crate::llama::KvCache;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 (the default): greedy, the most likely token. Above 0: the logits
    /// are divided by it and a token is drawn.
    pub temperature: f64,
    /// Draw among the `k` most likely tokens only.
    pub top_k: Option<usize>,
    /// Draw among the most likely tokens whose probabilities first add up
    /// to at least `p` (nucleus sampling).
    pub top_p: Option<f64>,
    /// The seed of the draws: the same seed gives the same text.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// What [`generate`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to add (default 64).
    pub max_new_tokens: usize,
    /// How each token is chosen (default greedy).
    pub sampling: Sampling,
    /// Tokens that end the text (the tokenizer's EOS); the stop token is
    /// kept as the last token.
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: Sampling::default(),
            stop_tokens: Vec::new(),
        }
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens, the stop token included when one ended the text.
    pub tokens: Vec<u32>,
    /// Whether a stop token ended the text (rather than `max_new_tokens`).
    pub stopped: bool,
}

/// Continues `prompt`, calling `on_token` with each new token as it is
/// chosen (for streaming). Refuses an empty prompt and one that, with
/// `max_new_tokens`, would pass the model's positions.
pub fn generate(
    model: &AutoModel,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generated> {
    if prompt.is_empty() {
        return Err(ModelError::Generation {
            reason: "the prompt has no token".to_owned(),
        });
    }
    if let Some(max) = model.max_positions() {
        let needed = prompt.len() + options.max_new_tokens;
        if needed > max {
            return Err(ModelError::Generation {
                reason: format!(
                    "the prompt ({} tokens) and max_new_tokens ({}) need {needed} positions; the model has {max}",
                    prompt.len(),
                    options.max_new_tokens
                ),
            });
        }
    }
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(options.sampling.seed);
    let mut cache = KvCache::default();
    let mut generated = Generated {
        tokens: Vec::new(),
        stopped: false,
    };
    let mut input = prompt.to_vec();
    while generated.tokens.len() < options.max_new_tokens {
        let ids = Tensor::new(input.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.forward_with_cache(&ids, &mut cache)?;
        let last = logits.i((0, logits.dim(1)? - 1))?;
        let token = next_token(&last, &options.sampling, &mut rng)?;
        on_token(token);
        generated.tokens.push(token);
        if options.stop_tokens.contains(&token) {
            generated.stopped = true;
            break;
        }
        input = vec![token];
    }
    Ok(generated)
}

/// The next token from the logits `[vocab]` of the last position.
fn next_token(logits: &Tensor, sampling: &Sampling, rng: &mut StdRng) -> Result<u32> {
    if sampling.temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let logits: Vec<f32> = (logits.to_dtype(DType::F32)? / sampling.temperature)?.to_vec1()?;
    // Tokens by falling logit, then kept by top-k and top-p.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = sampling.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| f64::from(logits[i] - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = sampling.top_p {
        let mut sum = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                sum += p;
                sum >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (&token, p) in order.iter().zip(&probs) {
        if draw < *p {
            return Ok(token as u32);
        }
        draw -= p;
    }
    Ok(order[order.len() - 1] as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_its_filters() {
        let logits = Tensor::new(&[0f32, 3.0, 1.0, 2.9], &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let greedy = Sampling::default();
        assert_eq!(next_token(&logits, &greedy, &mut rng).unwrap(), 1);
        // top-k 2 draws only tokens 1 and 3, and both of them.
        let top2 = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            ..Sampling::default()
        };
        let drawn: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| next_token(&logits, &top2, &mut rng).unwrap())
            .collect();
        assert_eq!(drawn, [1, 3].into());
        // top-p that the first token alone reaches: always that token.
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: Some(0.01),
            ..Sampling::default()
        };
        assert!((0..50).all(|_| next_token(&logits, &nucleus, &mut rng).unwrap() == 1));
        // The same seed draws the same tokens.
        let warm = Sampling {
            temperature: 2.0,
            seed: 3,
            ..Sampling::default()
        };
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| next_token(&logits, &warm, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
