//! Developer tasks for caldpo: libtorch install, test assets, the test suite and the demo.
//!
//! Every cargo command started from here runs with `LIBTORCH` pointing at a checked
//! libtorch 2.11.0, so a fresh machine needs nothing but the Rust toolchain, Python 3 with
//! pip, and apt (for gloo's headers).

mod assets;
mod demo;
mod gloo;
mod libtorch;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::libtorch::Variant;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "caldpo developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make libtorch 2.11.0 available (respects an existing LIBTORCH after a version check),
    /// with gloo's headers for the c10d shim.
    Libtorch {
        /// cpu: the torch wheel without dependencies plus the CUDA runtime and CUPTI it links;
        /// cu130: the wheel's full CUDA 13.0 dependency set.
        #[arg(long, value_enum, default_value_t = Variant::Cpu)]
        variant: Variant,
        /// Install directory (default: ~/.cache/caldpo/libtorch-2.11.0-VARIANT).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Fetch the SmolLM2 GGUF and the demo preference files (pinned sha256) into the cache.
    Assets,
    /// Format check, clippy with -D warnings and the whole test suite.
    Test,
    /// The main job: Cal-DPO against DPO on SmolLM2-135M-Instruct, plot and summary.
    Demo {
        /// Optimiser steps per run (default: the configs' own).
        #[arg(long)]
        max_steps: Option<usize>,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Libtorch { variant, dir } => libtorch::ensure(variant, dir.as_deref()).map(drop),
        Task::Assets => {
            let libtorch = libtorch::ensure(Variant::Cpu, None)?;
            assets::ensure_downloads()?;
            build_all(&libtorch)?;
            assets::ensure_imported_model()
        }
        Task::Test => test(),
        Task::Demo { max_steps } => demo::run(max_steps),
    }
}

fn test() -> Result<()> {
    let started = Instant::now();
    let libtorch = libtorch::ensure(Variant::Cpu, None)?;
    assets::ensure_downloads()?;
    cargo(&libtorch, &["fmt", "--all", "--check"])?;
    build_all(&libtorch)?;
    assets::ensure_imported_model()?;
    cargo(&libtorch, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&libtorch, &["test", "--workspace"])?;
    println!("xtask test: all checks passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Builds every target of the workspace, the `caldpo` binary included.
///
/// Always the whole workspace with all targets: cargo unifies features over the packages
/// of one invocation, and a narrower selection would change the features of torch-sys's
/// build dependencies and recompile its C++ wrapper (minutes) for nothing.
fn build_all(libtorch: &Path) -> Result<()> {
    cargo(libtorch, &["test", "--workspace", "--no-run"])
}

/// The `caldpo` binary that [`build_all`] leaves behind.
fn caldpo_binary() -> PathBuf {
    workspace_root().join("target").join("debug").join("caldpo")
}

/// The workspace root (the parent of this crate's manifest directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").into()
}

/// Where downloads, libtorch and imported models are cached: `$CALDPO_CACHE`, else
/// `~/.cache/caldpo`, outside the source tree so that `git clean` never costs a download.
fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CALDPO_CACHE") {
        return Ok(dir.into());
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set CALDPO_CACHE instead")?;
    Ok(PathBuf::from(home).join(".cache").join("caldpo"))
}

/// A `cargo` command in the workspace root with libtorch and the asset cache in its
/// environment. Test binaries find libtorch through LD_LIBRARY_PATH; the `caldpo` binary
/// itself carries an rpath and needs nothing.
fn cargo_command(libtorch: &Path, args: &[&str]) -> Result<Command> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(args)
        .current_dir(workspace_root())
        .env("LIBTORCH", libtorch)
        .env("LD_LIBRARY_PATH", library_path(libtorch))
        .env("CALDPO_ASSETS", assets::assets_dir()?);
    Ok(command)
}

/// libtorch's lib directory ahead of any existing LD_LIBRARY_PATH.
fn library_path(libtorch: &Path) -> std::ffi::OsString {
    let mut paths = vec![libtorch.join("lib")];
    if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn cargo(libtorch: &Path, args: &[&str]) -> Result<()> {
    let mut command = cargo_command(libtorch, args)?;
    status(&mut command)
}

/// Runs a command, failing with its command line when it exits non-zero.
fn status(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let status = command.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}
