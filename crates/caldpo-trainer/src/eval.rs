//! Held-out evaluation (the same metrics as training, plus standard errors) and samples.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use caldpo_core::{ResolvedLoss, RewardTracker};
use caldpo_data::{collate, PairExample, PairTokenizer};
use caldpo_models::{CausalLm, GenerationOptions};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::batch::{policy_logps, DeviceBatch};
use crate::config::Config;
use crate::dist::Comm;
use crate::reference::Reference;

/// Metrics of one evaluation, keyed as in training (`loss`, `rewards/chosen`, ...) plus
/// `pairs` and `*_stderr` for the reward statistics.
pub struct EvalResult {
    pub metrics: BTreeMap<String, f64>,
}

/// One generated response.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub step: usize,
    pub pair_id: String,
    pub prompt: String,
    pub response: String,
}

pub struct Evaluator {
    pairs: Vec<PairExample>,
    tokenizer: PairTokenizer,
    batch_size: usize,
    chunk_tokens: i64,
    samples: usize,
    max_new_tokens: usize,
}

/// The reward statistics whose standard errors are reported, as sums and sums of squares so
/// that they reduce across ranks exactly.
const SPREAD_KEYS: [&str; 4] =
    ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"];

impl Evaluator {
    pub fn new(config: &Config, pairs: Vec<PairExample>, tokenizer: PairTokenizer) -> Self {
        let batch_size = match config.eval.batch_size {
            0 => config.train.batch_size,
            size => size,
        };
        Self {
            pairs,
            tokenizer,
            batch_size,
            chunk_tokens: config.train.logps_chunk_tokens,
            samples: config.eval.samples,
            max_new_tokens: config.eval.max_new_tokens,
        }
    }

    /// Evaluates this rank's share of the held-out pairs; `None` when there are none.
    pub fn run(
        &self,
        policy: &CausalLm,
        reference: &Reference,
        loss: &ResolvedLoss,
        comm: &Comm,
    ) -> Result<Option<EvalResult>> {
        if self.pairs.is_empty() {
            return Ok(None);
        }
        let device = policy.device();
        let mut tracker = RewardTracker::new(loss, device);
        let mut spread = Tensor::zeros([2 * SPREAD_KEYS.len() as i64], (Kind::Double, device));
        let indices: Vec<usize> = (0..self.pairs.len()).collect();
        let mine =
            caldpo_data::shard_step(&indices, comm.rank(), comm.world_size(), self.batch_size);
        for batch_indices in mine {
            let examples: Vec<&PairExample> =
                batch_indices.iter().map(|i| &self.pairs[*i]).collect();
            let batch = DeviceBatch::new(collate(&examples, self.tokenizer.pad_token_id()), device);
            tch::no_grad(|| -> Result<()> {
                let logps = policy_logps(policy, &batch, self.chunk_tokens)?.split_pairs();
                let reference_logps = reference.logps(&batch, self.chunk_tokens)?;
                let output = loss.compute(&logps, reference_logps.as_ref())?;
                tracker.update(&output, &logps);
                let chosen = output.rewards.chosen.to_kind(Kind::Double);
                let rejected = output.rewards.rejected.to_kind(Kind::Double);
                let margins = &chosen - &rejected;
                let correct = chosen.gt_tensor(&rejected).to_kind(Kind::Double);
                let columns = [&chosen, &rejected, &margins, &correct];
                let sums: Vec<Tensor> = columns
                    .iter()
                    .flat_map(|column| {
                        [column.sum(Kind::Double), column.square().sum(Kind::Double)]
                    })
                    .collect();
                spread += Tensor::stack(&sums, 0);
                Ok(())
            })?;
        }
        comm.all_reduce_sum(tracker.sums_mut())?;
        comm.all_reduce_sum(&mut spread)?;
        let snapshot = tracker.snapshot();
        let mut metrics = snapshot.means;
        let spread = Vec::<f64>::try_from(spread.to_device(Device::Cpu))?;
        // Counted on the devices and summed over ranks, so a lost shard would show here.
        let pairs = snapshot.pairs;
        for (i, key) in SPREAD_KEYS.iter().enumerate() {
            metrics.insert(
                format!("{key}_stderr"),
                standard_error(spread[2 * i], spread[2 * i + 1], pairs),
            );
        }
        metrics.insert("pairs".into(), pairs);
        Ok(Some(EvalResult { metrics }))
    }

    /// Greedy responses to the first `[eval] samples` held-out prompts.
    pub fn samples(&self, policy: &CausalLm, step: usize, seed: u64) -> Result<Vec<Sample>> {
        let chosen: Vec<&PairExample> = self.pairs.iter().take(self.samples).collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let prompts: Vec<Vec<i64>> =
            chosen.iter().map(|pair| pair.chosen.input_ids[..pair.prompt_len].to_vec()).collect();
        let options = GenerationOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed,
            eos_token_ids: self.tokenizer.eos_token_ids(),
            pad_token_id: self.tokenizer.pad_token_id(),
        };
        let responses = tch::no_grad(|| policy.generate(&prompts, &options))?;
        chosen
            .iter()
            .zip(prompts.iter().zip(responses))
            .map(|(pair, (prompt, response))| {
                Ok(Sample {
                    step,
                    pair_id: format!("{:016x}", pair.id),
                    prompt: self.tokenizer.decode(prompt)?,
                    response: self.tokenizer.decode(&response)?,
                })
            })
            .collect()
    }
}

/// Standard error of a mean from a sum and a sum of squares over `n` values (sample
/// standard deviation with n - 1).
fn standard_error(sum: f64, sum_squares: f64, n: f64) -> f64 {
    if n < 2.0 {
        return f64::NAN;
    }
    let mean = sum / n;
    let variance = ((sum_squares - n * mean * mean) / (n - 1.0)).max(0.0);
    (variance / n).sqrt()
}

/// Appends samples to RUN_DIR/samples.jsonl.
pub fn append_samples(run_dir: &Path, samples: &[Sample]) -> Result<()> {
    if samples.is_empty() {
        return Ok(());
    }
    let path = run_dir.join("samples.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    for sample in samples {
        writeln!(file, "{}", serde_json::to_string(sample)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::standard_error;

    #[test]
    fn standard_error_of_known_values() {
        // Values 1, 2, 3, 4: mean 2.5, sample variance 5/3, stderr sqrt(5/3/4) = 0.645497.
        let se = standard_error(10.0, 30.0, 4.0);
        assert!((se - 0.6454972243679028).abs() < 1e-12, "{se}");
    }
}
