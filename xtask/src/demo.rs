//! The main job: Cal-DPO against DPO on SmolLM2-135M-Instruct with the real demo pairs.
//!
//! Both runs share data, seed, optimiser and steps; only `[loss]` differs between the two
//! configs. The xtask points them at the cached assets with `--set`, then plots both runs
//! and prints the held-out summary. Wall time is reported per phase.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::assets::{self, IMPORTED_MODEL};
use crate::libtorch::{self, Variant};

const RUNS: &[(&str, &str)] =
    &[("cal-dpo", "configs/smollm2-cal-dpo.toml"), ("dpo", "configs/smollm2-dpo.toml")];

pub fn run(max_steps: Option<usize>) -> Result<()> {
    let mut phases: Vec<(&str, Duration)> = Vec::new();

    let started = Instant::now();
    let libtorch = libtorch::ensure(Variant::Cpu, None)?;
    assets::ensure_downloads()?;
    phases.push(("download", started.elapsed()));

    let started = Instant::now();
    crate::build_all(&libtorch)?;
    assets::ensure_imported_model()?;
    phases.push(("compile + import", started.elapsed()));

    let root = crate::workspace_root();
    let caldpo = crate::caldpo_binary();
    let assets = assets::assets_dir()?;
    let model = assets.join(IMPORTED_MODEL);
    let pairs = assets.join("dpo_en_demo.json");
    let runs = root.join("runs/demo");

    let started = Instant::now();
    for (name, config) in RUNS {
        let mut train = std::process::Command::new(&caldpo);
        train
            .current_dir(&root)
            .args(["train", config, "--overwrite"])
            .args(["--set", &format!("model.path={}", path_str(&model)?)])
            .args(["--set", &format!("data.train={}", path_str(&pairs)?)])
            .args(["--set", &format!("train.output_dir={}", path_str(&runs.join(name))?)]);
        if let Some(steps) = max_steps {
            train.args(["--set", &format!("train.max_steps={steps}")]);
        }
        crate::status(&mut train).with_context(|| format!("the {name} run failed"))?;
    }
    phases.push(("training + evaluation", started.elapsed()));

    let run_dirs: Vec<String> =
        RUNS.iter().map(|(name, _)| path_str(&runs.join(name))).collect::<Result<_>>()?;
    let plot = path_str(&runs.join("reward_curves.png"))?;
    let mut command = std::process::Command::new(&caldpo);
    command.current_dir(&root).arg("plot").args(&run_dirs).args(["-o", &plot]);
    crate::status(&mut command)?;
    let mut command = std::process::Command::new(&caldpo);
    command.current_dir(&root).arg("summary").args(&run_dirs);
    crate::status(&mut command)?;

    println!("\nwall time by phase:");
    for (phase, elapsed) in phases {
        println!("  {phase:<24} {:>7.1} min", elapsed.as_secs_f64() / 60.0);
    }
    println!("plot: {plot}");
    Ok(())
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str().map(str::to_string).with_context(|| format!("non-UTF-8 path {}", path.display()))
}
