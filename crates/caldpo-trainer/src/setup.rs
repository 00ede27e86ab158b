//! Everything a run needs before its first step: device, model folder, tokeniser, pairs,
//! policy, reference and loss. Every input is checked here, before any compute starts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use caldpo_core::ResolvedLoss;
use caldpo_data::{load_pairs, split_eval, PairDataset, PairExample, PairSampler, PairTokenizer};
use caldpo_models::{resolve_model_dir, CausalLm};
use tch::{Device, Kind};

use crate::config::{Config, Precision};
use crate::dist::Comm;
use crate::plan::Plan;
use crate::reference::{self, Reference, ReferenceCache};

pub struct Setup {
    pub device: Device,
    /// The HF folder of the initial policy (a .gguf is imported into the cache first).
    pub model_dir: PathBuf,
    pub tokenizer: PairTokenizer,
    pub train: Vec<PairExample>,
    pub eval: Vec<PairExample>,
    pub policy: CausalLm,
    pub reference: Reference,
    pub loss: ResolvedLoss,
}

impl Setup {
    /// `resume`: a checkpoint directory whose weights replace the initial policy's. The
    /// reference always comes from the initial model, so it stays anchored across resumes.
    pub fn new(
        config: &Config,
        comm: &Comm,
        device: Device,
        resume: Option<&Path>,
    ) -> Result<Setup> {
        let loss = config.loss.resolve().context("[loss]")?;
        if !loss.ignored_keys.is_empty() && comm.is_main() {
            tracing::warn!(
                "[loss] type {:?} does not use {}; ignored",
                config.loss.kind,
                loss.ignored_keys.join(", ")
            );
        }
        require_exists(&config.model.path, "[model] path")?;
        require_exists(&config.data.train, "[data] train")?;
        if let Some(eval) = &config.data.eval {
            require_exists(eval, "[data] eval")?;
        }
        let model_dir = resolve_model_dir(&config.model.path)?;
        let tokenizer = PairTokenizer::from_model_dir(&model_dir, &config.data.chat_template)?;
        let (train, eval) = load_data(config, &tokenizer)?;

        let policy_dir = resume.unwrap_or(&model_dir);
        let policy = CausalLm::load(policy_dir, device, Kind::Float)
            .with_context(|| format!("cannot load the policy from {}", policy_dir.display()))?;
        comm.broadcast_parameters(&policy)?;
        let visited = visited_pairs(config, comm.world_size(), &train);
        let splits = [("train", visited), ("eval", eval.iter().collect())];
        let reference =
            build_reference(config, &loss, &model_dir, &tokenizer, splits, device, comm)?;
        Ok(Setup { device, model_dir, tokenizer, train, eval, policy, reference, loss })
    }
}

fn require_exists(path: &Path, key: &str) -> Result<()> {
    if !path.exists() {
        bail!("{key} = {}: no such file or directory", path.display());
    }
    Ok(())
}

/// Train and held-out pairs: `[data] eval` when given, else `eval_fraction` of the train
/// file split off deterministically by pair id and seed.
pub fn load_data(
    config: &Config,
    tokenizer: &PairTokenizer,
) -> Result<(Vec<PairExample>, Vec<PairExample>)> {
    let train = load_pairs(&config.data.train, &config.data, tokenizer, None)?;
    report(&train);
    let (train, eval) = match &config.data.eval {
        Some(path) => {
            let eval = load_pairs(path, &config.data, tokenizer, None)?;
            report(&eval);
            (train, eval)
        }
        None if config.data.eval_fraction > 0.0 => {
            split_eval(train, config.data.eval_fraction, config.train.seed)?
        }
        None => {
            let report = train.report.clone();
            (train, PairDataset { examples: Vec::new(), report })
        }
    };
    tracing::info!(
        "{} training pairs, {} held-out pairs",
        train.examples.len(),
        eval.examples.len()
    );
    Ok((train.examples, eval.examples))
}

fn report(data: &PairDataset) {
    let report = &data.report;
    tracing::info!(
        "{}: {} rows read, {} pairs kept, dropped {:?}, bad rows {:?}",
        report.path.display(),
        report.rows_read,
        report.kept,
        report.dropped,
        report.bad_rows
    );
}

fn kind_of(precision: Precision) -> Kind {
    match precision {
        Precision::F32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    }
}

/// The reference model folder, the initial policy's when `[reference] path` is empty.
fn reference_dir(config: &Config, model_dir: &Path) -> Result<PathBuf> {
    if config.reference.path.as_os_str().is_empty() {
        return Ok(model_dir.to_path_buf());
    }
    require_exists(&config.reference.path, "[reference] path")?;
    Ok(resolve_model_dir(&config.reference.path)?)
}

pub fn build_reference(
    config: &Config,
    loss: &ResolvedLoss,
    model_dir: &Path,
    tokenizer: &PairTokenizer,
    splits: [(&str, Vec<&PairExample>); 2],
    device: Device,
    comm: &Comm,
) -> Result<Reference> {
    if !loss.loss.needs_reference() {
        return Ok(Reference::None);
    }
    let dir = reference_dir(config, model_dir)?;
    let kind = kind_of(config.reference.dtype);
    let mut model = CausalLm::load(&dir, device, kind)
        .with_context(|| format!("cannot load the reference from {}", dir.display()))?;
    model.freeze();
    if !config.reference.precompute {
        return Ok(Reference::Model(Box::new(model)));
    }

    let data = &config.data;
    let data_key = format!(
        "{}|{}|{}|{}|{:?}|{:?}",
        tokenizer.fingerprint(),
        data.chat_template,
        data.max_length,
        data.max_prompt_length,
        data.format,
        data.columns
    );
    let cache_dir = reference::cache_dir(&dir, kind, &data_key)?;
    let batch = config.eval.batch_size.max(config.train.batch_size);
    let chunk = config.train.logps_chunk_tokens;
    let pad = tokenizer.pad_token_id();
    let mut cache: Option<ReferenceCache> = None;
    for (split, examples) in splits {
        let file = cache_dir.join(format!("{split}.safetensors"));
        let (built, computed) =
            ReferenceCache::build(&file, &examples, &model, batch, pad, chunk, comm)?;
        tracing::info!(
            "reference log-probs for {} {split} pairs: {} computed, {} from {}",
            examples.len(),
            computed,
            examples.len() - computed.min(examples.len()),
            file.display()
        );
        cache = Some(match cache {
            Some(previous) => previous.merge(built),
            None => built,
        });
    }
    Ok(Reference::Cached(cache.expect("two splits were cached")))
}

/// The training pairs that the run's steps will visit, in no particular order. When
/// max_steps ends a run before the epochs do, precomputing reference log-probs for the
/// other pairs would be wasted work.
fn visited_pairs<'a>(
    config: &Config,
    world_size: usize,
    train: &'a [PairExample],
) -> Vec<&'a PairExample> {
    let plan = Plan::new(config, world_size, train.len(), 0);
    let lengths = train.iter().map(PairExample::len).collect();
    let sampler = PairSampler::new(lengths, plan.effective_batch, config.train.seed);
    let mut seen = vec![false; train.len()];
    let mut steps = 0;
    'epochs: for epoch in 0.. {
        for group in sampler.epoch(epoch) {
            if steps == plan.total_steps || seen.iter().all(|s| *s) {
                break 'epochs;
            }
            group.iter().for_each(|index| seen[*index] = true);
            steps += 1;
        }
    }
    train.iter().zip(seen).filter(|(_, seen)| *seen).map(|(pair, _)| pair).collect()
}

/// Loads a model folder (or .gguf) for evaluation or generation on the best device.
pub fn open_policy(path: &Path, device: Device) -> Result<(PathBuf, CausalLm)> {
    require_exists(path, "model")?;
    let dir = resolve_model_dir(path)?;
    let mut model = CausalLm::load(&dir, device, Kind::Float)
        .with_context(|| format!("cannot load a model from {}", dir.display()))?;
    model.freeze();
    Ok((dir, model))
}
