//! Batched generation with a key/value cache: greedy or nucleus sampling.
//!
//! Prompts of different lengths are left-padded into one batch; the padding is masked out
//! of attention and each row's positions start at 0 on its first real token, so every row
//! sees exactly what it would see alone. Sampling draws from caldpo's own seeded
//! generator on the host, so results do not depend on libtorch's global RNG (which the
//! trainer owns) and generation does not disturb it.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::CausalLm;

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOptions {
    /// Most tokens generated per prompt (default 128).
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy decoding (default 0).
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to at
    /// least `top_p` (default 1.0 = the whole vocabulary). Ignored when greedy.
    pub top_p: f64,
    /// Seed of the sampling generator (default 0).
    pub seed: u64,
    /// Generation of a row stops after any of these tokens (default none).
    pub eos_token_ids: Vec<i64>,
    /// Fills the left padding of short prompts (default 0); it is masked, so any valid id
    /// works.
    pub pad_token_id: i64,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: vec![],
            pad_token_id: 0,
        }
    }
}

impl GenerationOptions {
    /// Greedy decoding of at most `max_new_tokens`, stopping at the config's EOS tokens.
    pub fn greedy(max_new_tokens: usize, eos_token_ids: Vec<i64>) -> Self {
        Self { max_new_tokens, eos_token_ids, ..Self::default() }
    }

    fn check(&self, vocab_size: i64) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidArgument(message));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return invalid(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0..vocab_size).contains(&self.pad_token_id) {
            return invalid(format!(
                "pad_token_id {} is outside the vocabulary",
                self.pad_token_id
            ));
        }
        Ok(())
    }
}

impl CausalLm {
    /// Continues each prompt (token ids, without padding) and returns the new tokens only,
    /// one list per prompt. A row ends after an EOS token (which is included) or after
    /// `max_new_tokens`. Runs under `no_grad`.
    pub fn generate(
        &self,
        prompts: &[Vec<i64>],
        opts: &GenerationOptions,
    ) -> Result<Vec<Vec<i64>>> {
        let config = self.config();
        opts.check(config.vocab_size)?;
        check_prompts(prompts, config.vocab_size)?;
        if config.model_type == "gpt2" {
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
            if (longest + opts.max_new_tokens) as i64 > config.max_position_embeddings {
                return Err(Error::InvalidArgument(format!(
                    "prompt ({longest} tokens) plus max_new_tokens ({}) exceeds the {} learned \
                     positions of this model",
                    opts.max_new_tokens, config.max_position_embeddings
                )));
            }
        }
        if prompts.is_empty() || opts.max_new_tokens == 0 {
            return Ok(vec![vec![]; prompts.len()]);
        }
        Ok(tch::no_grad(|| self.decode(prompts, opts)))
    }

    fn decode(&self, prompts: &[Vec<i64>], opts: &GenerationOptions) -> Vec<Vec<i64>> {
        let device = self.device();
        let batch = prompts.len();
        let (ids, mask) = left_pad(prompts, opts.pad_token_id);
        let mut key_mask = mask.to_device(device);
        let mut positions = (key_mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
        let mut cache = self.new_cache();
        let mut rng = SplitMix64::new(opts.seed);

        let hidden = self.forward_cached(&ids.to_device(device), &positions, &key_mask, &mut cache);
        let mut logits = self.last_logits(&hidden);
        let mut outputs = vec![Vec::new(); batch];
        let mut finished = vec![false; batch];

        for step in 0..opts.max_new_tokens {
            // One host sync per step: the next tokens decide which rows have finished.
            let next = choose(&logits, opts, &mut rng);
            let mut fed = Vec::with_capacity(batch);
            for (row, &token) in next.iter().enumerate() {
                if finished[row] {
                    fed.push(opts.pad_token_id);
                    continue;
                }
                outputs[row].push(token);
                finished[row] = opts.eos_token_ids.contains(&token);
                fed.push(token);
            }
            if finished.iter().all(|&f| f) || step + 1 == opts.max_new_tokens {
                break;
            }

            let new_ids = Tensor::from_slice(&fed).view([batch as i64, 1]).to_device(device);
            positions = positions.narrow(1, positions.size()[1] - 1, 1) + 1;
            key_mask = Tensor::cat(&[key_mask, new_ids.ones_like()], 1);
            let hidden = self.forward_cached(&new_ids, &positions, &key_mask, &mut cache);
            logits = self.last_logits(&hidden);
        }
        outputs
    }

    /// f32 logits `[batch, vocab]` at the last position.
    fn last_logits(&self, hidden: &Tensor) -> Tensor {
        let last = hidden.narrow(1, hidden.size()[1] - 1, 1).squeeze_dim(1);
        last.linear::<Tensor>(self.backbone_lm_head(), None).to_kind(Kind::Float)
    }
}

fn check_prompts(prompts: &[Vec<i64>], vocab_size: i64) -> Result<()> {
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument(format!("prompt {i} is empty")));
        }
        if let Some(bad) = prompt.iter().find(|id| !(0..vocab_size).contains(*id)) {
            return Err(Error::InvalidArgument(format!(
                "prompt {i} holds token id {bad}, outside the vocabulary of {vocab_size}"
            )));
        }
    }
    Ok(())
}

/// Left-pads the prompts: ids and mask, both `[batch, longest]` int64 on the host.
fn left_pad(prompts: &[Vec<i64>], pad: i64) -> (Tensor, Tensor) {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * longest);
    let mut mask = Vec::with_capacity(prompts.len() * longest);
    for prompt in prompts {
        let padding = longest - prompt.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(prompt.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, padding).chain(std::iter::repeat_n(1, prompt.len())));
    }
    let shape = [prompts.len() as i64, longest as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}

/// The next token of every row: the argmax when greedy, else a draw from the
/// temperature-scaled distribution restricted to the nucleus.
fn choose(logits: &Tensor, opts: &GenerationOptions, rng: &mut SplitMix64) -> Vec<i64> {
    if opts.temperature == 0.0 {
        return Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))
            .expect("argmax gives int64 ids");
    }
    let probs = (logits / opts.temperature).softmax(-1, Kind::Float);
    let (sorted, order) = probs.sort(-1, true);
    let sorted = nucleus(&sorted, opts.top_p).to_device(tch::Device::Cpu);
    let order = order.to_device(tch::Device::Cpu);
    let batch = sorted.size()[0];
    (0..batch)
        .map(|row| {
            let weights = Vec::<f32>::try_from(sorted.get(row)).expect("f32 probabilities");
            let index = rng.draw(&weights);
            order.int64_value(&[row, index as i64])
        })
        .collect()
}

/// Zeroes the tail of descending `sorted` probabilities beyond the smallest prefix whose
/// mass reaches `top_p` (the token that crosses `top_p` is kept, as in transformers).
fn nucleus(sorted: &Tensor, top_p: f64) -> Tensor {
    if top_p >= 1.0 {
        return sorted.shallow_clone();
    }
    let mass_before = sorted.cumsum(-1, Kind::Float) - sorted;
    sorted.masked_fill(&mass_before.ge(top_p), 0.0)
}

/// SplitMix64 (Steele, Lea and Flood 2014): a small, well-mixed generator that makes
/// sampling reproducible from the seed alone.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index drawn with probability proportional to `weights` (not all zero).
    fn draw(&mut self, weights: &[f32]) -> usize {
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        let mut target = self.next_f64() * total;
        let mut last_positive = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                last_positive = i;
                target -= w as f64;
                if target < 0.0 {
                    return i;
                }
            }
        }
        // Rounding can leave a sliver of mass; it belongs to the last possible token.
        last_positive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_keeps_the_token_that_crosses_top_p() {
        // Masses before each token: 0, 0.5, 0.8, 0.9. With top_p 0.75 the first two stay
        // (0 and 0.5 are below 0.75); the second one crosses 0.75.
        let sorted = Tensor::from_slice(&[0.5f32, 0.3, 0.1, 0.1]).view([1, 4]);
        let kept = Vec::<f32>::try_from(nucleus(&sorted, 0.75).view([4])).unwrap();
        assert_eq!(kept, vec![0.5, 0.3, 0.0, 0.0]);
    }

    #[test]
    fn draw_follows_the_weights() {
        // Weights 1:3 over 20000 draws: the second index comes up 75% of the time; the
        // standard deviation of the fraction is sqrt(0.75 * 0.25 / 20000) = 0.003.
        let mut rng = SplitMix64::new(7);
        let hits = (0..20_000).filter(|_| rng.draw(&[1.0, 3.0, 0.0]) == 1).count();
        let fraction = hits as f64 / 20_000.0;
        assert!((fraction - 0.75).abs() < 0.015, "{fraction}");
    }

    #[test]
    fn draw_never_picks_a_zero_weight() {
        let mut rng = SplitMix64::new(1);
        assert!((0..1000).all(|_| rng.draw(&[0.0, 2.0, 0.0]) == 1));
    }

    #[test]
    fn left_padding_layout() {
        let (ids, mask) = left_pad(&[vec![5, 6, 7], vec![9]], 0);
        assert_eq!(Vec::<i64>::try_from(ids.view([6])).unwrap(), vec![5, 6, 7, 0, 0, 9]);
        assert_eq!(Vec::<i64>::try_from(mask.view([6])).unwrap(), vec![1, 1, 1, 0, 0, 1]);
    }
}
