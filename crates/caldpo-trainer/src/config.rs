//! The training configuration: one serde struct per TOML table, each field documented with
//! its default, then validated into a [`Plan`](crate::plan::Plan).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use caldpo_core::LossConfig;
use caldpo_data::DataConfig;
use serde::{Deserialize, Serialize};

/// The whole `caldpo train` configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelSection,
    pub reference: ReferenceSection,
    pub data: DataConfig,
    pub loss: LossConfig,
    pub optim: OptimSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub log: LogSection,
    pub checkpoint: CheckpointSection,
    pub distributed: DistributedSection,
}

/// `[model]`: the policy to train.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// HF model folder or a `.gguf` file (imported once into the cache). Required.
    pub path: PathBuf,
    /// Compute precision: `f32` (default) or `bf16` (bf16 autocast on CUDA with f32 master
    /// weights; on CPU bf16 is accepted but runs in f32, which is faster there).
    pub dtype: Precision,
    /// `auto` (default: CUDA when available, else CPU), `cpu` or `cuda`.
    pub device: DeviceChoice,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { path: PathBuf::new(), dtype: Precision::F32, device: DeviceChoice::Auto }
    }
}

/// `[reference]`: the model the log-ratios are measured against.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReferenceSection {
    /// Another model folder or `.gguf`; empty (default) = a frozen copy of the initial policy.
    pub path: PathBuf,
    /// Weights of the reference: `f32` (default) or `bf16` (halves its memory).
    pub dtype: Precision,
    /// Compute reference log-probs once before training and cache them on disk (default
    /// false). Saves one forward pass per step and the reference's memory.
    pub precompute: bool,
}

impl Default for ReferenceSection {
    fn default() -> Self {
        Self { path: PathBuf::new(), dtype: Precision::F32, precompute: false }
    }
}

/// `[optim]`: optimiser, schedule and clipping.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// `adamw` (default) or `rmsprop`.
    pub name: OptimizerName,
    /// Peak learning rate (default 1e-6).
    pub lr: f64,
    /// Decoupled weight decay (default 0.0); never applied to norms and biases.
    pub weight_decay: f64,
    /// AdamW's beta1 (default 0.9).
    pub beta1: f64,
    /// AdamW's beta2 (default 0.999).
    pub beta2: f64,
    /// Denominator epsilon of AdamW and RMSprop (default 1e-8).
    pub eps: f64,
    /// RMSprop's smoothing constant (default 0.99).
    pub alpha: f64,
    /// `constant`, `linear` (default) or `cosine` decay after warmup.
    pub schedule: Schedule,
    /// Linear warmup in optimiser steps (default 0); wins over warmup_ratio when non-zero.
    pub warmup_steps: usize,
    /// Linear warmup as a fraction of total steps (default 0.0).
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this value (default 1.0; 0 disables clipping).
    pub max_grad_norm: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            name: OptimizerName::Adamw,
            lr: 1e-6,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            alpha: 0.99,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

/// `[train]`: run directory, batch and length of the run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// The run directory itself (default `runs/caldpo`).
    pub output_dir: PathBuf,
    /// Seed of the sampling order, the held-out split and generation (default 42).
    pub seed: u64,
    /// Pairs per micro-batch per rank (default 4).
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step (default 1).
    pub grad_accum: usize,
    /// Passes over the training pairs (default 1).
    pub epochs: usize,
    /// Stop after this many optimiser steps; 0 (default) = run all epochs.
    pub max_steps: usize,
    /// Completion tokens per chunk through the LM head when computing log-probs (default
    /// 1024): bounds the [tokens, vocab] block that is alive at once.
    pub logps_chunk_tokens: i64,
    /// Skip (and count) optimiser steps whose loss or gradient is not finite instead of
    /// stopping the run (default false).
    pub skip_nonfinite_steps: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/caldpo"),
            seed: 42,
            batch_size: 4,
            grad_accum: 1,
            epochs: 1,
            max_steps: 0,
            logps_chunk_tokens: 1024,
            skip_nonfinite_steps: false,
        }
    }
}

/// `[eval]`: held-out evaluation and samples.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every N optimiser steps; 0 (default) = only at start and end.
    pub every_steps: usize,
    /// Evaluate before the first step (default true).
    pub at_start: bool,
    /// Evaluate after the last step (default true).
    pub at_end: bool,
    /// Pairs per evaluation batch; 0 (default) = train.batch_size.
    pub batch_size: usize,
    /// Held-out prompts to generate responses for at each evaluation, written to
    /// RUN_DIR/samples.jsonl (default 0 = none).
    pub samples: usize,
    /// Maximum new tokens per sample (default 64).
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every_steps: 0,
            at_start: true,
            at_end: true,
            batch_size: 0,
            samples: 0,
            max_new_tokens: 64,
        }
    }
}

/// `[log]`: metrics cadence.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Append a metrics line every N optimiser steps (default 5); the line averages the
    /// window since the previous one.
    pub every_steps: usize,
}

impl Default for LogSection {
    fn default() -> Self {
        Self { every_steps: 5 }
    }
}

/// `[checkpoint]`: intermediate checkpoints.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Write RUN_DIR/checkpoint-N every N optimiser steps; 0 (default) = only at the end.
    pub every_steps: usize,
    /// How many checkpoint-N directories to keep (default 2; final/ is not counted).
    pub keep_last: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { every_steps: 0, keep_last: 2 }
    }
}

/// `[distributed]`: data-parallel settings, used when WORLD_SIZE > 1.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedSection {
    /// `auto` (default: nccl for CUDA, gloo for CPU), `nccl` or `gloo`.
    pub backend: Backend,
    /// Seconds a collective may wait for the other ranks before the job fails (default 600).
    pub timeout_s: u64,
    /// Gradients (and the parameters broadcast at start) travel in buckets of at most this
    /// many MiB (default 25).
    pub bucket_mb: u64,
}

/// A day: longer than any checkpoint write, short enough that a hang still ends.
const MAX_TIMEOUT_S: u64 = 86_400;
/// 4 GiB: far above any bucket size that still overlaps or saves anything.
const MAX_BUCKET_MB: u64 = 4096;

impl Default for DistributedSection {
    fn default() -> Self {
        Self { backend: Backend::Auto, timeout_s: 600, bucket_mb: 25 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Adamw,
    Rmsprop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Auto,
    Nccl,
    Gloo,
}

impl Config {
    /// Reads a TOML file, applies `--set key=value` overrides and checks every key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Parses TOML text named `origin` in messages.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let mut table: toml::Table = text.parse().map_err(|err: toml::de::Error| {
            anyhow::anyhow!("{origin}:{}: {}", line_of(text, err.span()), err.message())
        })?;
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
        }
        // Re-serialise so that errors after an override still point at a line.
        let merged = toml::to_string(&table)?;
        let config: Config = toml::from_str(&merged).map_err(|err| {
            let where_ = if overrides.is_empty() {
                format!("{origin}:{}", line_of(text, err.span()))
            } else {
                format!("{origin} (with --set)")
            };
            anyhow::anyhow!("{where_}: {}", with_suggestion(err.message()))
        })?;
        config.validate().with_context(|| format!("{origin}: invalid configuration"))?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges, required keys and combinations.
    pub fn validate(&self) -> Result<()> {
        if self.model.path.as_os_str().is_empty() {
            bail!("[model] path is required (an HF model folder or a .gguf file)");
        }
        if self.data.train.as_os_str().is_empty() {
            bail!("[data] train is required (a .jsonl, .json or .parquet file)");
        }
        self.data.validate()?;
        self.loss.resolve()?;
        let train = &self.train;
        if train.batch_size == 0 || train.grad_accum == 0 {
            bail!("[train] batch_size and grad_accum must be at least 1");
        }
        if train.epochs == 0 && train.max_steps == 0 {
            bail!("[train] epochs and max_steps are both 0: nothing to train");
        }
        if train.logps_chunk_tokens <= 0 {
            bail!("[train] logps_chunk_tokens must be positive");
        }
        let optim = &self.optim;
        if !(optim.lr > 0.0 && optim.lr.is_finite()) {
            bail!("[optim] lr must be positive, got {}", optim.lr);
        }
        if !(0.0..1.0).contains(&optim.warmup_ratio) {
            bail!("[optim] warmup_ratio must be in [0, 1), got {}", optim.warmup_ratio);
        }
        if optim.max_grad_norm < 0.0 || optim.weight_decay < 0.0 {
            bail!("[optim] max_grad_norm and weight_decay must not be negative");
        }
        if self.log.every_steps == 0 {
            bail!("[log] every_steps must be at least 1");
        }
        // c10d reads a zero timeout as none at all, and a rank could then hang for ever; the
        // upper bounds keep the millisecond and byte counts far from overflow.
        let distributed = &self.distributed;
        if !(1..=MAX_TIMEOUT_S).contains(&distributed.timeout_s) {
            bail!(
                "[distributed] timeout_s must be between 1 and {MAX_TIMEOUT_S} seconds, got {}",
                distributed.timeout_s
            );
        }
        if !(1..=MAX_BUCKET_MB).contains(&distributed.bucket_mb) {
            bail!(
                "[distributed] bucket_mb must be between 1 and {MAX_BUCKET_MB}, got {}",
                distributed.bucket_mb
            );
        }
        Ok(())
    }

    /// The configuration with every default filled in, as TOML: valid input to
    /// `caldpo train` as it stands.
    pub fn to_toml(&self) -> Result<String> {
        let mut filled = self.clone();
        filled.loss = self.loss.with_defaults();
        Ok(toml::to_string(&filled)?)
    }
}

/// Applies `section.key=value` (value parsed as TOML, else taken as a string).
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment}: expected key=value"))?;
    let value = parse_value(raw.trim());
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|last| !last.is_empty() && !parts.is_empty());
    let last = last.with_context(|| format!("--set {assignment}: expected section.key=value"))?;
    let mut current = table;
    for part in parts {
        let entry = current.entry(part).or_insert_with(|| toml::Value::Table(Default::default()));
        current = entry
            .as_table_mut()
            .with_context(|| format!("--set {assignment}: {part} is not a table"))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let probe = format!("value = {raw}");
    match probe.parse::<toml::Table>() {
        Ok(mut table) => table.remove("value").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// 1-based line of a byte span's start.
fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    let start = span.map_or(0, |span| span.start).min(text.len());
    text[..start].matches('\n').count() + 1
}

/// Adds "did you mean" to serde's unknown-field message, which lists the valid keys.
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let candidates = expected.split('`').skip(1).step_by(2);
    let best = candidates
        .map(|candidate| (strsim::jaro_winkler(unknown, candidate), candidate))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, candidate)) if score > 0.7 => {
            format!("{message} (did you mean `{candidate}`?)")
        }
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n";

    #[test]
    fn unknown_key_names_the_line_and_suggests() {
        let text = format!("{MINIMAL}[optim]\nlr = 1e-5\nwarmup_step = 3\n");
        let err = Config::parse(&text, "cfg.toml", &[]).unwrap_err().to_string();
        // The typo is on line 7 of the text above.
        assert!(err.starts_with("cfg.toml:7:"), "{err}");
        assert!(err.contains("warmup_step"), "{err}");
        assert!(err.contains("did you mean `warmup_steps`?"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let text = format!("{MINIMAL}[train]\nbatch_size = \"four\"\n");
        let err = Config::parse(&text, "cfg.toml", &[]).unwrap_err().to_string();
        assert!(err.starts_with("cfg.toml:6:"), "{err}");
    }

    #[test]
    fn prompt_length_must_be_below_max_length() {
        let text = format!("{MINIMAL}max_length = 128\nmax_prompt_length = 128\n");
        let err = Config::parse(&text, "cfg.toml", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("max_prompt_length"), "{err:#}");
    }

    #[test]
    fn distributed_bounds_name_the_field() {
        for (line, field) in [
            ("timeout_s = 0", "timeout_s must be between 1 and 86400"),
            ("timeout_s = 90000", "timeout_s must be between 1 and 86400"),
            ("bucket_mb = 0", "bucket_mb must be between 1 and 4096"),
        ] {
            let text = format!("{MINIMAL}[distributed]\n{line}\n");
            let err = format!("{:#}", Config::parse(&text, "cfg.toml", &[]).unwrap_err());
            assert!(err.contains(&format!("[distributed] {field}")), "{err}");
        }
    }

    #[test]
    fn set_overrides_a_dotted_key_and_swaps_the_loss() {
        let overrides = ["loss.type=dpo".to_string(), "optim.lr=3e-6".to_string()];
        let config = Config::parse(MINIMAL, "cfg.toml", &overrides).unwrap();
        assert_eq!(config.optim.lr, 3e-6);
        assert_eq!(config.loss.with_defaults().kind, caldpo_core::LossKind::Dpo);
    }

    #[test]
    fn written_config_reads_back_identically() {
        let config = Config::parse(MINIMAL, "cfg.toml", &[]).unwrap();
        let written = config.to_toml().unwrap();
        let again = Config::parse(&written, "config.toml", &[]).unwrap();
        assert_eq!(written, again.to_toml().unwrap());
    }
}
