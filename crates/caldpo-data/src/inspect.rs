//! `caldpo data inspect`: what the data pipeline makes of the configured files.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{DataConfig, Format};
use crate::dataset::{load_pairs, PairDataset, PairExample};
use crate::error::{Error, Result};
use crate::sampler::PairSampler;
use crate::tokenize::PairTokenizer;

/// Marks where the prompt ends and the labelled response begins in the rendered example.
pub const LABELS_BEGIN: &str = "▶▶▶ labels begin ▶▶▶";

/// A human-readable report on the training file (and the eval file, if set): rows read, pairs
/// kept, drops and skipped rows by reason, token length percentiles, the padding fraction
/// of micro-batches of `batch_size` pairs under the sampler, and the first pair rendered
/// with a marker where its labels begin.
pub fn inspect(
    config: &DataConfig,
    tokenizer: &PairTokenizer,
    batch_size: usize,
) -> Result<String> {
    config.validate()?;
    if config.train.as_os_str().is_empty() {
        return Err(Error::Config("data.train is not set".into()));
    }
    let batch_size = batch_size.max(1);
    let mut report = String::new();
    for path in std::iter::once(&config.train).chain(&config.eval) {
        let dataset = load_pairs(path, config, tokenizer, None)?;
        describe(&mut report, path, config, &dataset, batch_size);
        render_example(&mut report, tokenizer, &dataset.examples[0])?;
    }
    Ok(report)
}

fn describe(out: &mut String, path: &Path, config: &DataConfig, data: &PairDataset, batch: usize) {
    let r = &data.report;
    let counts = |map: &std::collections::BTreeMap<String, usize>| {
        if map.is_empty() {
            "none".to_string()
        } else {
            map.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    };
    let _ = writeln!(out, "file: {}", path.display());
    let _ = writeln!(
        out,
        "format: {}, chat_template: {}, max_length {}, max_prompt_length {}",
        format_name(r.format, config.format),
        config.chat_template,
        config.max_length,
        config.max_prompt_length
    );
    let _ = writeln!(
        out,
        "rows read: {}, pairs kept: {}, truncated: {}",
        r.rows_read, r.kept, r.truncated
    );
    let _ = writeln!(out, "dropped: {}", counts(&r.dropped));
    let _ = writeln!(out, "bad rows skipped: {}", counts(&r.bad_rows));
    let _ =
        writeln!(out, "\ntokens per pair    {:>6} {:>6} {:>6} {:>6}", "p50", "p90", "p99", "max");
    let columns: [(&str, Length); 4] = [
        ("prompt", |e| e.prompt_len),
        ("chosen response", |e| e.chosen.len() - e.prompt_len),
        ("rejected response", |e| e.rejected.len() - e.prompt_len),
        ("longer sequence", PairExample::len),
    ];
    for (name, length) in columns {
        let mut lengths: Vec<usize> = data.examples.iter().map(length).collect();
        lengths.sort_unstable();
        let p = |q| percentile(&lengths, q);
        let _ = writeln!(out, "{name:<18} {:>6} {:>6} {:>6} {:>6}", p(50), p(90), p(99), p(100));
    }
    let lengths: Vec<usize> = data.examples.iter().map(PairExample::len).collect();
    let grouped = PairSampler::new(lengths.clone(), batch, 0).epoch(0);
    let in_order: Vec<Vec<usize>> =
        (0..lengths.len()).collect::<Vec<_>>().chunks(batch).map(<[usize]>::to_vec).collect();
    let _ = writeln!(
        out,
        "\npadding at batch size {batch}: {:.1}% with length grouping, {:.1}% in file order",
        100.0 * padding_fraction(data, &grouped),
        100.0 * padding_fraction(data, &in_order)
    );
}

fn format_name(used: Format, configured: Format) -> String {
    let name = |format: Format| {
        serde_json::to_value(format)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    };
    if configured == Format::Auto {
        format!("{} (detected)", name(used))
    } else {
        name(used)
    }
}

/// One length of a pair, for the percentile table.
type Length = fn(&PairExample) -> usize;

/// Nearest-rank percentile of sorted values: the smallest value with at least q% of the
/// values at or below it.
pub(crate) fn percentile(sorted: &[usize], q: usize) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Padding cells over all cells of the [2B, T] batches of `groups`.
pub(crate) fn padding_fraction(data: &PairDataset, groups: &[Vec<usize>]) -> f64 {
    let (mut cells, mut real) = (0usize, 0usize);
    for group in groups {
        let examples: Vec<&PairExample> = group.iter().map(|&i| &data.examples[i]).collect();
        let width = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        cells += 2 * examples.len() * width;
        real += examples.iter().map(|e| e.chosen.len() + e.rejected.len()).sum::<usize>();
    }
    if cells == 0 {
        0.0
    } else {
        (cells - real) as f64 / cells as f64
    }
}

fn render_example(
    out: &mut String,
    tokenizer: &PairTokenizer,
    example: &PairExample,
) -> Result<()> {
    let prompt = &example.chosen.input_ids[..example.prompt_len];
    let _ = writeln!(out, "\nexample: first pair, id {:016x}", example.id);
    let _ = writeln!(out, "--- prompt ({} tokens, not labelled) ---", example.prompt_len);
    let _ = writeln!(out, "{}", tokenizer.decode(prompt)?);
    for (name, sequence) in [("chosen", &example.chosen), ("rejected", &example.rejected)] {
        let response = &sequence.input_ids[example.prompt_len..];
        let _ = writeln!(out, "{LABELS_BEGIN} {name}: {} labelled tokens", response.len());
        let _ = writeln!(out, "{}", tokenizer.decode(response)?);
    }
    out.push('\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        // 1..=10: p50 is the 5th value, p90 the 9th, p99 rounds up to the 10th.
        let values: Vec<usize> = (1..=10).collect();
        assert_eq!(percentile(&values, 50), 5);
        assert_eq!(percentile(&values, 90), 9);
        assert_eq!(percentile(&values, 99), 10);
        assert_eq!(percentile(&values, 100), 10);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
