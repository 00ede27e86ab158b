//! `caldpo train`: set-up, the optimiser-step loop, logging, evaluation and checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use caldpo_core::{ChosenRejected, LossOutput, ResolvedLoss, RewardTracker, SequenceLogps};
use caldpo_data::{collate, shard_step, PairExample, PairSampler};
use caldpo_models::CausalLm;
use tch::{Device, Tensor};

use crate::batch::{policy_logps, DeviceBatch};
use crate::checkpoint::{self, TrainerState};
use crate::config::Config;
use crate::dist::{Comm, WorldInfo};
use crate::eval::{self, Evaluator};
use crate::metrics::{self, MetricsWriter, Progress};
use crate::optim::{clip_grad_norm, learning_rate, Optimizer};
use crate::plan::Plan;
use crate::reference::Reference;
use crate::setup::{self, Setup};

/// How `caldpo train` was asked to treat the output directory.
pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    pub resume: Option<PathBuf>,
    pub overwrite: bool,
    /// Stop with a checkpoint after this many steps of this invocation (time-limited jobs).
    pub stop_after: Option<usize>,
}

/// Runs training as rank `info` to the end (or to a signal) and returns the run directory.
pub fn run(args: TrainArgs, info: WorldInfo) -> Result<PathBuf> {
    let (config, resume_from) = resolve_config(&args)?;
    let device = crate::device::select(config.model.device, info.local_rank)?;
    let comm = Comm::connect(info, &config.distributed, device)?;
    let run_dir = config.train.output_dir.clone();
    let what = format!("prepare the output directory {}", run_dir.display());
    comm.run_where(comm.is_main(), &what, || {
        prepare_run_dir(&run_dir, resume_from.is_some(), args.overwrite)
    })?;

    let setup = Setup::new(&config, &comm, device, resume_from.as_deref())?;
    let mut trainer = Trainer::new(config, setup, &comm, resume_from.as_deref())?;
    trainer.train(args.stop_after)?;
    Ok(run_dir)
}

/// The configuration to use, and the checkpoint to resume from.
fn resolve_config(args: &TrainArgs) -> Result<(Config, Option<PathBuf>)> {
    let Some(run_dir) = &args.resume else {
        let path =
            args.config.as_ref().context("a config file is required (or --resume RUN_DIR)")?;
        return Ok((Config::load(path, &args.overrides)?, None));
    };
    let path = args.config.clone().unwrap_or_else(|| run_dir.join("config.toml"));
    let mut config = Config::load(&path, &args.overrides)?;
    config.train.output_dir = run_dir.clone();
    let (_, latest) = checkpoint::list(run_dir)?.pop().with_context(|| {
        format!("{}: no complete checkpoint-N to resume from", run_dir.display())
    })?;
    Ok((config, Some(latest)))
}

/// Refuses to mix two runs in one directory.
fn prepare_run_dir(run_dir: &Path, resuming: bool, overwrite: bool) -> Result<()> {
    let non_empty = std::fs::read_dir(run_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if non_empty && !resuming {
        if !overwrite {
            bail!(
                "output_dir {} is not empty; pass --resume {0} to continue it or --overwrite to \
                 start again",
                run_dir.display()
            );
        }
        let looks_like_run =
            run_dir.join("config.toml").exists() || run_dir.join("metrics.jsonl").exists();
        if !looks_like_run {
            bail!(
                "--overwrite refuses to empty {}: it does not look like a caldpo run",
                run_dir.display()
            );
        }
        std::fs::remove_dir_all(run_dir)
            .with_context(|| format!("cannot empty {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))
}

/// Values of one optimiser step kept until the step is known to be finite.
struct StepRecord {
    outputs: Vec<(LossOutput, ChosenRejected<SequenceLogps>, Vec<u64>)>,
    pairs: usize,
    tokens: usize,
}

/// What one optimiser step did on this rank.
struct StepDone {
    pairs: usize,
    tokens: usize,
    /// Some rank was asked to stop: every rank checkpoints and exits after this step.
    stop: bool,
}

struct Trainer<'a> {
    config: Config,
    config_toml: String,
    plan: Plan,
    comm: &'a Comm,
    device: Device,
    model_dir: PathBuf,
    policy: CausalLm,
    reference: Reference,
    loss: ResolvedLoss,
    optimizer: Optimizer,
    train_pairs: Vec<PairExample>,
    sampler: PairSampler,
    pad_token_id: i64,
    evaluator: Evaluator,
    tracker: RewardTracker,
    state: TrainerState,
    /// Sum of the grad norms in the current log window, on the device.
    window_grad_norm: Tensor,
    writer: Option<MetricsWriter>,
    stop: Arc<AtomicBool>,
}

impl<'a> Trainer<'a> {
    fn new(config: Config, setup: Setup, comm: &'a Comm, resume: Option<&Path>) -> Result<Self> {
        let Setup { device, model_dir, tokenizer, train, eval, policy, reference, loss } = setup;
        let mut plan = Plan::new(&config, comm.world_size(), train.len(), eval.len());
        plan.backend = comm.backend().to_string();
        plan.devices = rank_devices(comm, device)?;
        let config_toml = config.to_toml()?;
        let run_dir = &config.train.output_dir;
        let mut optimizer = Optimizer::new(&config.optim, policy.named_parameters());
        let mut state = TrainerState {
            seed: config.train.seed,
            effective_batch: plan.effective_batch,
            ..TrainerState::default()
        };
        let mut tracker = RewardTracker::new(&loss, device);
        let mut window_grad_norm = Tensor::zeros([], (tch::Kind::Double, device));
        if let Some(dir) = resume {
            let (saved, optimizer_state) = checkpoint::load(dir)?;
            if saved.effective_batch != 0 && saved.effective_batch != plan.effective_batch {
                bail!(
                    "{} was written with {} pairs per step, this run has {} (batch_size x \
                     grad_accum x world size): the data order would differ; keep the product \
                     the same when resuming, e.g. double grad_accum when halving the ranks",
                    dir.display(),
                    saved.effective_batch,
                    plan.effective_batch
                );
            }
            optimizer.load_state(&optimizer_state, saved.step as i64)?;
            // The saved window holds the sums of all ranks; rank 0 alone carries them on.
            if !saved.window_sums.is_empty() && comm.is_main() {
                let sums = Tensor::from_slice(&saved.window_sums).to_device(device);
                tch::no_grad(|| tracker.sums_mut().copy_(&sums));
            }
            let _ = window_grad_norm.fill_(saved.window_grad_norm);
            tracing::info!("resuming {} at step {}", dir.display(), saved.step);
            comm.run_where(comm.is_main(), "truncate the metrics to the checkpoint", || {
                metrics::truncate_after(run_dir, saved.step)
            })?;
            state = TrainerState { effective_batch: plan.effective_batch, ..saved };
        }

        // Written only now, so that a refused resume leaves the run's files as they were.
        if comm.is_main() {
            tracing::info!(
                "world size {}, backend {}, devices {}, effective batch {} ({} per micro-batch x \
                 {} accumulation x {} ranks)",
                plan.world_size,
                plan.backend,
                plan.devices.join(" "),
                plan.effective_batch,
                plan.batch_size,
                plan.grad_accum,
                plan.world_size
            );
            tracing::info!("plan: {}", serde_json::to_string(&plan)?);
        }
        let mut writer = None;
        comm.run_where(comm.is_main(), "write the run's config and plan", || {
            std::fs::write(run_dir.join("config.toml"), &config_toml)?;
            std::fs::write(run_dir.join("plan.json"), serde_json::to_string_pretty(&plan)?)?;
            writer = Some(MetricsWriter::open(run_dir)?);
            Ok(())
        })?;

        let lengths = train.iter().map(PairExample::len).collect();
        let sampler = PairSampler::new(lengths, plan.effective_batch, config.train.seed);
        let pad_token_id = tokenizer.pad_token_id();
        let evaluator = Evaluator::new(&config, eval, tokenizer);
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&stop))?;
        }
        Ok(Self {
            config,
            config_toml,
            plan,
            comm,
            device,
            model_dir,
            policy,
            reference,
            loss,
            optimizer,
            train_pairs: train,
            sampler,
            pad_token_id,
            evaluator,
            tracker,
            state,
            window_grad_norm,
            writer,
            stop,
        })
    }

    fn train(&mut self, stop_after: Option<usize>) -> Result<()> {
        let total = self.plan.total_steps;
        let first_step = self.state.step;
        if self.state.step == 0 && self.config.eval.at_start {
            self.evaluate(0)?;
        }
        let progress = Progress::new(total, self.state.step, self.comm.is_main());
        let mut window_started = Instant::now();
        let mut window_pairs = 0;
        let mut window_tokens = 0;
        while self.state.step < total {
            let groups = self.sampler.epoch(self.state.epoch);
            if self.state.step_in_epoch >= groups.len() {
                self.state.epoch += 1;
                self.state.step_in_epoch = 0;
                continue;
            }
            let group = groups[self.state.step_in_epoch].clone();
            let done = self.step(&group)?;
            let signalled = done.stop;
            self.state.step += 1;
            self.state.step_in_epoch += 1;
            self.state.window_steps += 1;
            window_pairs += done.pairs;
            window_tokens += done.tokens;
            progress.advance();

            let step = self.state.step;
            let last = step == total;
            if step % self.config.log.every_steps == 0 || last {
                let seconds = window_started.elapsed().as_secs_f64();
                let logged = self.log(seconds, window_pairs, window_tokens)?;
                progress.show(step, &logged);
                window_started = Instant::now();
                (window_pairs, window_tokens) = (0, 0);
            }
            let every = self.config.eval.every_steps;
            if (every > 0 && step % every == 0) || (last && self.config.eval.at_end) {
                self.evaluate(step)?;
            }
            let pause = !last && stop_after.is_some_and(|limit| step - first_step >= limit);
            let every = self.config.checkpoint.every_steps;
            if (every > 0 && step % every == 0) || last || signalled || pause {
                self.checkpoint(&progress)?;
            }
            let resume_hint = format!(
                "continue with `caldpo train --resume {}`",
                self.config.train.output_dir.display()
            );
            if signalled {
                progress.finish();
                bail!("interrupted at step {step}; {resume_hint}");
            }
            if pause {
                progress.finish();
                if self.comm.is_main() {
                    tracing::info!("stopped after step {step} as asked; {resume_hint}");
                }
                return Ok(());
            }
        }
        progress.finish();
        self.save_final()
    }

    /// One optimiser step over a group of pair indices.
    fn step(&mut self, group: &[usize]) -> Result<StepDone> {
        let lr = self.lr_at(self.state.step);
        let record = self.forward_backward(group)?;
        self.comm.all_reduce_gradients(self.optimizer.parameters())?;
        let grad_norm =
            clip_grad_norm(self.optimizer.parameters(), self.config.optim.max_grad_norm);

        let loss_sum = record
            .outputs
            .iter()
            .fold(Tensor::zeros([], (tch::Kind::Float, self.device)), |acc, (output, _, _)| {
                acc + output.losses.sum(tch::Kind::Float)
            });
        // The one deliberate host sync of every step: an update from a non-finite gradient
        // would destroy the weights, so it must be known before the optimiser runs. The same
        // reduction tells every rank whether any was signalled to stop.
        let signalled = self.stop.load(Ordering::Relaxed);
        let agreed = self.comm.agree_on_step(&(loss_sum + &grad_norm), signalled)?;
        let done = StepDone { pairs: record.pairs, tokens: record.tokens, stop: agreed.stop };
        if !agreed.finite {
            self.optimizer.zero_grad();
            if !self.config.train.skip_nonfinite_steps {
                bail!(diagnose(self.state.step + 1, &record));
            }
            self.state.skipped_steps += 1;
            tracing::warn!("{}; step skipped", diagnose(self.state.step + 1, &record));
            return Ok(done);
        }
        self.optimizer.step(lr);
        self.optimizer.zero_grad();
        for (output, policy, _) in &record.outputs {
            self.tracker.update(output, policy);
        }
        self.window_grad_norm += grad_norm.to_kind(tch::Kind::Double);
        Ok(done)
    }

    /// Forward and backward over this rank's micro-batches of the step. Each micro-batch's
    /// summed loss is divided by the pairs of the whole step (all ranks), so the gradients
    /// summed over micro-batches and ranks are the step's mean, however it is split.
    fn forward_backward(&mut self, group: &[usize]) -> Result<StepRecord> {
        let step_pairs = group.len() as f64;
        let micro_batches = shard_step(
            group,
            self.comm.rank(),
            self.comm.world_size(),
            self.config.train.batch_size,
        );
        let chunk = self.config.train.logps_chunk_tokens;
        let mut record = StepRecord { outputs: Vec::new(), pairs: 0, tokens: 0 };
        for indices in micro_batches {
            let examples: Vec<&PairExample> =
                indices.iter().map(|i| &self.train_pairs[*i]).collect();
            let batch = DeviceBatch::new(collate(&examples, self.pad_token_id), self.device);
            let autocast = self.config.model.dtype == crate::config::Precision::Bf16;
            let policy = tch::autocast(autocast, || policy_logps(&self.policy, &batch, chunk))?;
            let policy = policy.split_pairs();
            let reference = self.reference.logps(&batch, chunk)?;
            let output = self.loss.compute(&policy, reference.as_ref())?;
            (output.losses.sum(tch::Kind::Float) / step_pairs).backward();
            record.pairs += batch.num_pairs;
            record.tokens += batch.num_tokens;
            let detached = ChosenRejected {
                chosen: policy.chosen.detach(),
                rejected: policy.rejected.detach(),
            };
            record.outputs.push((output, detached, batch.pair_ids));
        }
        Ok(record)
    }

    /// Reduces the window's sums across ranks (one host sync) and appends a metrics line.
    fn log(&mut self, seconds: f64, pairs: usize, tokens: usize) -> Result<BTreeMap<String, f64>> {
        self.comm.all_reduce_sum(self.tracker.sums_mut())?;
        // What every rank processed in the window, for the rates.
        let mut processed = Tensor::from_slice(&[pairs as f64, tokens as f64]);
        self.comm.all_reduce_sum(&mut processed)?;
        let processed = Vec::<f64>::try_from(&processed)?;
        let snapshot = self.tracker.snapshot();
        let mut metrics = snapshot.means;
        metrics.insert("pairs".into(), snapshot.pairs);
        let window_steps = self.state.window_steps.max(1) as f64;
        let grad_norm = f64::try_from(&self.window_grad_norm)? / window_steps;
        let step = self.state.step;
        // The rate the window's last step used.
        let lr = self.lr_at(step - 1);
        metrics.insert("lr".into(), lr);
        metrics.insert("grad_norm".into(), grad_norm);
        metrics.insert("pairs_per_second".into(), processed[0] / seconds.max(1e-9));
        metrics.insert("tokens_per_second".into(), processed[1] / seconds.max(1e-9));
        if self.state.skipped_steps > 0 {
            metrics.insert("skipped_steps".into(), self.state.skipped_steps as f64);
        }
        let epoch = self.epoch_progress();
        if let Some(writer) = &mut self.writer {
            writer.write(&metrics::record(step, epoch, &metrics, ""))?;
        }
        self.tracker.reset();
        let _ = self.window_grad_norm.zero_();
        self.state.window_steps = 0;
        Ok(metrics)
    }

    fn evaluate(&mut self, step: usize) -> Result<()> {
        let epoch = self.epoch_progress();
        let result = self.evaluator.run(&self.policy, &self.reference, &self.loss, self.comm)?;
        let Some(result) = result else { return Ok(()) };
        tracing::info!(
            "eval at step {step}: loss {:.4}, reward accuracy {:.3}, chosen {:+.4}, rejected {:+.4}",
            result.metrics["loss"],
            result.metrics["rewards/accuracies"],
            result.metrics["rewards/chosen"],
            result.metrics["rewards/rejected"]
        );
        let what = format!("record the evaluation at step {step}");
        self.comm.run_where(self.comm.is_main(), &what, || {
            let Some(writer) = &mut self.writer else { return Ok(()) };
            writer.write(&metrics::record(step, epoch, &result.metrics, "eval_"))?;
            let samples = self.evaluator.samples(&self.policy, step, self.config.train.seed)?;
            eval::append_samples(&self.config.train.output_dir, &samples)
        })
    }

    /// Learning rate of optimiser step `step` (0-based).
    fn lr_at(&self, step: usize) -> f64 {
        let optim = &self.config.optim;
        learning_rate(optim.schedule, optim.lr, step, self.plan.warmup_steps, self.plan.total_steps)
    }

    /// Epochs completed so far, fractional within the current one.
    fn epoch_progress(&self) -> f64 {
        let within = self.state.step_in_epoch as f64 / self.plan.steps_per_epoch.max(1) as f64;
        self.state.epoch as f64 + within
    }

    fn checkpoint(&mut self, progress: &Progress) -> Result<()> {
        // Carry the unlogged window of every rank into the checkpoint (one host sync, only
        // here).
        let mut window_sums = self.tracker.sums().copy();
        self.comm.all_reduce_sum(&mut window_sums)?;
        let state = TrainerState {
            window_sums: Vec::<f64>::try_from(window_sums.to_device(Device::Cpu))?,
            window_grad_norm: f64::try_from(&self.window_grad_norm)?,
            ..self.state.clone()
        };
        let what = format!("write the checkpoint of step {}", state.step);
        self.comm.run_where(self.comm.is_main(), &what, || {
            let dir = checkpoint::save(
                &self.config.train.output_dir,
                &self.policy,
                &self.model_dir,
                &self.optimizer,
                &state,
                &self.config_toml,
                self.config.checkpoint.keep_last,
            )?;
            progress.println(&format!("checkpoint written to {}", dir.display()));
            Ok(())
        })
    }

    fn save_final(&self) -> Result<()> {
        let dir = self.config.train.output_dir.join("final");
        self.comm.run_where(self.comm.is_main(), "write the final model", || {
            write_final(&self.policy, &self.model_dir, &dir)
                .with_context(|| format!("cannot write the final model to {}", dir.display()))
        })
    }
}

/// Writes `policy` to `dir` through a `.partial` sibling, so that `dir` is never half written.
fn write_final(policy: &CausalLm, model_dir: &Path, dir: &Path) -> Result<()> {
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    policy.save_pretrained(&partial, model_dir)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&partial, dir)?;
    tracing::info!("final model written to {}", dir.display());
    Ok(())
}

/// Each rank's device, as "cpu" or "cuda:N", gathered from every rank.
fn rank_devices(comm: &Comm, device: Device) -> Result<Vec<String>> {
    let ordinal = match device {
        Device::Cuda(index) => index as i64,
        _ => -1,
    };
    let gathered = comm.all_gather(&Tensor::from_slice(&[ordinal]).to_device(device))?;
    let ordinals = Vec::<i64>::try_from(gathered.flatten(0, -1).to_device(Device::Cpu))?;
    Ok(ordinals
        .into_iter()
        .map(|ordinal| if ordinal < 0 { "cpu".to_string() } else { format!("cuda:{ordinal}") })
        .collect())
}

/// Which step, pairs and loss terms went non-finite. Runs only on the failure path, so its
/// host syncs cost nothing in a healthy run.
fn diagnose(step: usize, record: &StepRecord) -> String {
    let mut pairs = Vec::new();
    let mut terms = std::collections::BTreeSet::new();
    for (output, policy, pair_ids) in &record.outputs {
        let mut named: Vec<(&str, &Tensor)> = vec![("loss", &output.losses)];
        named.extend(output.components.iter().map(|(name, tensor)| (*name, tensor)));
        named.push(("logps/chosen", &policy.chosen.sum));
        named.push(("logps/rejected", &policy.rejected.sum));
        for (name, tensor) in named {
            let finite =
                Vec::<bool>::try_from(tensor.isfinite().to_device(Device::Cpu)).unwrap_or_default();
            for (i, ok) in finite.iter().enumerate() {
                if !ok {
                    terms.insert(name.to_string());
                    pairs.push(pair_ids[i]);
                }
            }
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    let terms: Vec<String> = terms.into_iter().collect();
    if pairs.is_empty() {
        return format!(
            "step {step}: the gradient is not finite although every loss term is (the backward \
             pass overflowed); lower [optim] lr or use dtype = \"f32\""
        );
    }
    let ids: Vec<String> = pairs.iter().map(|id| format!("{id:016x}")).collect();
    format!(
        "step {step}: non-finite values in {} for pair ids {}; the last checkpoint is intact",
        terms.join(", "),
        ids.join(", ")
    )
}

pub use setup::open_policy;
