//! RUN_DIR/checkpoint-N: the HF-format policy plus everything needed to continue exactly.
//!
//! A checkpoint is written into `checkpoint-N.partial` and renamed into place, so a crash or
//! a signal mid-write never leaves a directory that looks complete.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use caldpo_models::CausalLm;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::optim::Optimizer;

/// Where training stands, and the metrics window not yet logged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Epoch and step index within it of the next step to run.
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub seed: u64,
    /// Steps skipped for non-finite values.
    pub skipped_steps: usize,
    /// The reward tracker's sums since the last log line, so that the first line after a
    /// resume averages the same window as an uninterrupted run.
    pub window_sums: Vec<f64>,
    pub window_grad_norm: f64,
    pub window_steps: usize,
    /// Pairs per optimiser step (all ranks) when the checkpoint was written: the data order
    /// depends on it, so a resume must keep it. 0 in checkpoints that predate the field.
    #[serde(default)]
    pub effective_batch: usize,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Writes RUN_DIR/checkpoint-{state.step} and removes the oldest beyond `keep_last`.
pub fn save(
    run_dir: &Path,
    policy: &CausalLm,
    model_source: &Path,
    optimizer: &Optimizer,
    state: &TrainerState,
    config_toml: &str,
    keep_last: usize,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.step);
    let partial = run_dir.join(format!("{name}.partial"));
    let target = run_dir.join(&name);
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&partial)?;
    policy.save_pretrained(&partial, model_source)?;
    let optimizer_state = optimizer.state();
    Tensor::write_safetensors(&optimizer_state, partial.join(OPTIMIZER_FILE))?;
    std::fs::write(partial.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    std::fs::write(partial.join("config.toml"), config_toml)?;
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&partial, &target)
        .with_context(|| format!("cannot move {} into place", partial.display()))?;
    prune(run_dir, keep_last)?;
    Ok(target)
}

/// The complete checkpoint-N directories of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir) else { return Ok(found) };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
        let step = name.strip_prefix("checkpoint-").and_then(|step| step.parse::<usize>().ok());
        if let Some(step) = step {
            if path.join(STATE_FILE).exists() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn prune(run_dir: &Path, keep_last: usize) -> Result<()> {
    let checkpoints = list(run_dir)?;
    let excess = checkpoints.len().saturating_sub(keep_last.max(1));
    for (_, path) in &checkpoints[..excess] {
        std::fs::remove_dir_all(path)
            .with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

/// Reads the trainer state and optimiser tensors of a checkpoint.
pub fn load(dir: &Path) -> Result<(TrainerState, Vec<(String, Tensor)>)> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a caldpo trainer state", state_path.display()))?;
    let optimizer = Tensor::read_safetensors(dir.join(OPTIMIZER_FILE))
        .with_context(|| format!("cannot read {}", dir.join(OPTIMIZER_FILE).display()))?;
    Ok((state, optimizer))
}
