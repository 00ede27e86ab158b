//! `caldpo`: train language models on preference pairs with Cal-DPO, DPO, IPO and more.

mod batch;
mod c10d;
mod checkpoint;
mod config;
mod device;
mod dist;
mod eval;
mod launch;
mod metrics;
mod optim;
mod plan;
mod plot;
mod reference;
mod setup;
mod summary;
mod train;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use caldpo_data::PairTokenizer;
use caldpo_models::GenerationOptions;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::dist::{Comm, WorldInfo};

#[derive(Parser)]
#[command(
    name = "caldpo",
    version,
    about = "Preference optimisation (Cal-DPO, DPO, IPO, ...) on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a policy on preference pairs.
    Train {
        /// The TOML configuration (optional with --resume: the run's config.toml).
        config: Option<PathBuf>,
        /// Override one key, e.g. --set loss.type=dpo (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue the run in RUN_DIR from its newest complete checkpoint.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Empty a non-empty output_dir that holds an earlier run.
        #[arg(long)]
        overwrite: bool,
        /// Start N local ranks (data-parallel over this host's GPUs, or CPU processes).
        #[arg(long, default_value_t = 1, value_name = "N")]
        nproc: usize,
        /// Checkpoint and exit after N optimiser steps of this invocation, to be continued
        /// with --resume (for jobs with a time limit).
        #[arg(long, value_name = "N")]
        stop_after: Option<usize>,
    },
    /// Held-out reward accuracy, margins and rewards of a model against its reference.
    Eval {
        config: PathBuf,
        /// Evaluate this model instead of [model] path (e.g. RUN_DIR/final).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Generate a response to one prompt through the model's chat template.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// auto (the tokenizer's), none (plain text) or a .jinja file.
        #[arg(long, default_value = "auto")]
        chat_template: String,
    },
    /// Convert a GGUF file into an HF folder (config, safetensors, tokenizer).
    ImportGguf { gguf: PathBuf, out_dir: PathBuf },
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Plot reward curves of one or more runs.
    Plot {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output .png or .svg.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Held-out metrics before and after training, per run.
    Summary {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Pairs read and kept, drops by reason, length percentiles and one rendered example.
    Inspect {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

fn main() {
    // A panic is a bug in caldpo, not bad input: say so in one line, without a backtrace.
    std::panic::set_hook(Box::new(|info| eprintln!("caldpo: internal error: {info}")));
    // In a world of several ranks, messages say which rank they come from.
    let rank = WorldInfo::from_env(|name| std::env::var(name).ok())
        .ok()
        .filter(|info| info.world_size > 1)
        .map(|info| info.rank);
    init_tracing(rank);
    device::load_cuda_backend();
    if let Err(err) = run(Cli::parse()) {
        let line = match rank {
            Some(rank) => format!("error (rank {rank}): {err:#}\n"),
            None => format!("error: {err:#}\n"),
        };
        // One write: the ranks of a job share a terminal or log, and a line printed piece by
        // piece would interleave with the others' (a pipe keeps writes of a few KiB whole).
        let _ = std::io::stderr().write_all(line.as_bytes());
        std::process::exit(1);
    }
}

/// Info-level logs from rank 0 only (the others would repeat it); warnings from every rank.
fn init_tracing(rank: Option<usize>) {
    let default = if rank.unwrap_or(0) == 0 { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CALDPO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { config, overrides, resume, overwrite, nproc, stop_after } => {
            let info = WorldInfo::from_env(|name| std::env::var(name).ok())?;
            let launched = std::env::var_os(launch::LAUNCHED_VAR).is_some();
            if nproc > 1 && !launched {
                if info.world_size > 1 {
                    bail!(
                        "--nproc {nproc} starts its own ranks, but this process is already rank \
                         {} of {} (torchrun or SLURM); drop --nproc",
                        info.rank,
                        info.world_size
                    );
                }
                return launch::local(nproc);
            }
            if nproc == 0 {
                bail!("--nproc must be at least 1");
            }
            let args = train::TrainArgs { config, overrides, resume, overwrite, stop_after };
            let run_dir = train::run(args, info)?;
            if info.rank == 0 {
                println!("run finished: {}", run_dir.display());
            }
            Ok(())
        }
        Command::Eval { config, model, json, overrides } => {
            evaluate(&config, model.as_deref(), json, &overrides)
        }
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            chat_template,
        } => {
            let device = device::select(config::DeviceChoice::Auto, 0)?;
            let (dir, policy) = train::open_policy(&model, device)?;
            let tokenizer = PairTokenizer::from_model_dir(&dir, &chat_template)?;
            let prompt_ids = tokenizer.encode_prompt(&prompt)?;
            let options = GenerationOptions {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                eos_token_ids: tokenizer.eos_token_ids(),
                pad_token_id: tokenizer.pad_token_id(),
            };
            let mut response = tch::no_grad(|| policy.generate(&[prompt_ids], &options))?.remove(0);
            // The end-of-turn token is not part of the answer.
            if response.last().is_some_and(|id| options.eos_token_ids.contains(id)) {
                response.pop();
            }
            println!("{}", tokenizer.decode(&response)?);
            Ok(())
        }
        Command::ImportGguf { gguf, out_dir } => {
            caldpo_models::import_gguf(&gguf, &out_dir)
                .with_context(|| format!("cannot import {}", gguf.display()))?;
            println!("wrote {}", out_dir.display());
            Ok(())
        }
        Command::Data { command: DataCommand::Inspect { config, overrides } } => {
            let config = Config::load(&config, &overrides)?;
            let model_dir = caldpo_models::resolve_model_dir(&config.model.path)?;
            let tokenizer = PairTokenizer::from_model_dir(&model_dir, &config.data.chat_template)?;
            print!("{}", caldpo_data::inspect(&config.data, &tokenizer, config.train.batch_size)?);
            Ok(())
        }
        Command::Plot { runs, output } => {
            plot::plot(&runs, &output)?;
            println!("wrote {}", output.display());
            Ok(())
        }
        Command::Summary { runs } => {
            print!("{}", summary::render(&runs)?);
            Ok(())
        }
    }
}

/// `caldpo eval`: the config's reference, loss and held-out pairs against `model` (default
/// the config's policy).
fn evaluate(
    config_path: &Path,
    model: Option<&Path>,
    json: bool,
    overrides: &[String],
) -> Result<()> {
    let config = Config::load(config_path, overrides)?;
    let comm = Comm::single();
    let loss = config.loss.resolve()?;
    let device = device::select(config.model.device, 0)?;
    let model_dir = caldpo_models::resolve_model_dir(&config.model.path)?;
    let tokenizer = PairTokenizer::from_model_dir(&model_dir, &config.data.chat_template)?;
    let (_, eval_pairs) = setup::load_data(&config, &tokenizer)?;
    if eval_pairs.is_empty() {
        bail!(
            "no held-out pairs: set [data] eval or [data] eval_fraction in {}",
            config_path.display()
        );
    }
    let policy_path = model.unwrap_or(&config.model.path);
    let (_, policy) = train::open_policy(policy_path, device)?;
    let splits = [("train", Vec::new()), ("eval", eval_pairs.iter().collect())];
    let reference =
        setup::build_reference(&config, &loss, &model_dir, &tokenizer, splits, device, &comm)?;
    let evaluator = eval::Evaluator::new(&config, eval_pairs, tokenizer);
    let result = evaluator.run(&policy, &reference, &loss, &comm)?.expect("pairs checked above");
    if json {
        println!("{}", serde_json::to_string_pretty(&result.metrics)?);
    } else {
        print_table(&result.metrics);
    }
    Ok(())
}

fn print_table(metrics: &BTreeMap<String, f64>) {
    let width = metrics.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in metrics {
        println!("{key:<width$}  {value:>12.6}");
    }
}

/// Caches (reference log-probs, imported models): `$CALDPO_CACHE`, else `~/.cache/caldpo`.
fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CALDPO_CACHE") {
        return Ok(dir.into());
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set CALDPO_CACHE instead")?;
    Ok(PathBuf::from(home).join(".cache").join("caldpo"))
}
