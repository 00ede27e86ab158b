//! metrics.jsonl and the progress display.
//!
//! Metrics and logs are separate streams: metrics go to RUN_DIR/metrics.jsonl (one JSON
//! object per log step or evaluation) and to the progress bar; `tracing` carries events.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

/// One metrics line: `step` and `epoch` first, then the metrics in key order.
pub fn record(
    step: usize,
    epoch: f64,
    metrics: &BTreeMap<String, f64>,
    prefix: &str,
) -> Map<String, Value> {
    let mut line = Map::new();
    line.insert("step".into(), step.into());
    line.insert("epoch".into(), round(epoch, 4).into());
    for (key, value) in metrics {
        let value = if value.is_finite() { Value::from(*value) } else { Value::Null };
        line.insert(format!("{prefix}{key}"), value);
    }
    line
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// Appends lines to RUN_DIR/metrics.jsonl, flushing each so that a crash loses nothing
/// already logged.
pub struct MetricsWriter {
    file: File,
}

impl MetricsWriter {
    pub fn open(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, line: &Map<String, Value>) -> Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        self.file.write_all(text.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

/// Keeps only the lines of metrics.jsonl whose step is at most `step`, so that a resumed
/// run continues the file without the lines an interrupted run logged after its checkpoint.
pub fn truncate_after(run_dir: &Path, step: usize) -> Result<()> {
    let path = run_dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|line| {
            let parsed: Option<Value> = serde_json::from_str(line).ok();
            let line_step = parsed.as_ref().and_then(|value| value["step"].as_u64());
            line_step.is_some_and(|line_step| line_step as usize <= step)
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    std::fs::write(&path, kept).with_context(|| format!("cannot rewrite {}", path.display()))
}

/// A progress bar on a terminal; plain `tracing` lines at each log step otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(total_steps: usize, done: usize, enabled: bool) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::new(total_steps as u64);
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps (eta {eta}) {msg}",
        )
        .expect("static progress template");
        bar.set_style(style);
        bar.set_position(done as u64);
        Self { bar: Some(bar) }
    }

    pub fn advance(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Shows the latest logged metrics.
    pub fn show(&self, step: usize, metrics: &BTreeMap<String, f64>) {
        let loss = metrics.get("loss").copied().unwrap_or(f64::NAN);
        let accuracy = metrics.get("rewards/accuracies").copied().unwrap_or(f64::NAN);
        let chosen = metrics.get("rewards/chosen").copied().unwrap_or(f64::NAN);
        let message = format!("loss {loss:.4} acc {accuracy:.2} chosen {chosen:+.3}");
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None => tracing::info!("step {step}: {message}"),
        }
    }

    /// Prints a line above the bar, or logs it where there is no bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
