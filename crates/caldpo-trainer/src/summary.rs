//! `caldpo summary`: held-out metrics before and after training for each run, with standard
//! errors, and what happened to the chosen reward.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

/// The first and last evaluation lines of a run.
struct Evaluations {
    label: String,
    first: Value,
    last: Value,
}

fn read(run_dir: &Path) -> Result<Evaluations> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let evals: Vec<Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|value| value.get("eval_loss").is_some())
        .collect();
    let first = evals
        .first()
        .cloned()
        .with_context(|| format!("{}: no evaluation lines", path.display()))?;
    let last = evals.last().cloned().expect("non-empty");
    let label = run_dir.file_name().unwrap_or(run_dir.as_os_str()).to_string_lossy().to_string();
    Ok(Evaluations { label, first, last })
}

fn cell(line: &Value, key: &str) -> String {
    let value = line[format!("eval_{key}")].as_f64().unwrap_or(f64::NAN);
    match line[format!("eval_{key}_stderr")].as_f64() {
        Some(se) => format!("{value:+.3} ± {se:.3}"),
        None => format!("{value:+.3}"),
    }
}

/// A Markdown table of every run, then one sentence per run on its chosen reward.
pub fn render(run_dirs: &[PathBuf]) -> Result<String> {
    let runs: Vec<Evaluations> = run_dirs.iter().map(|dir| read(dir)).collect::<Result<_>>()?;
    let mut out = String::new();
    writeln!(out, "| run | when | step | pairs | reward accuracy | chosen reward | rejected reward | margin |")?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    for run in &runs {
        for (when, line) in [("before", &run.first), ("after", &run.last)] {
            writeln!(
                out,
                "| {} | {when} | {} | {} | {} | {} | {} | {} |",
                run.label,
                line["step"],
                line["eval_pairs"].as_f64().unwrap_or(f64::NAN),
                cell(line, "rewards/accuracies"),
                cell(line, "rewards/chosen"),
                cell(line, "rewards/rejected"),
                cell(line, "rewards/margins"),
            )?;
        }
    }
    writeln!(out)?;
    for run in &runs {
        let before = run.first["eval_rewards/chosen"].as_f64().unwrap_or(f64::NAN);
        let after = run.last["eval_rewards/chosen"].as_f64().unwrap_or(f64::NAN);
        let se = run.last["eval_rewards/chosen_stderr"].as_f64().unwrap_or(f64::NAN);
        let direction = if after - before > 2.0 * se {
            "rose"
        } else if before - after > 2.0 * se {
            "fell"
        } else {
            "did not move beyond two standard errors"
        };
        writeln!(
            out,
            "{}: the held-out chosen reward {direction} ({before:+.3} -> {after:+.3}, stderr {se:.3}).",
            run.label
        )?;
    }
    Ok(out)
}
