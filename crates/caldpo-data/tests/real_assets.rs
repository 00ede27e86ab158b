//! The real demo data with the real SmolLM2 tokenizer (from `cargo xtask assets`), against
//! tests/fixtures/real_expected.json, which tests/fixtures/real_reference.py computed with
//! transformers' apply_chat_template and the Python tokenizers binding.

mod common;

use std::path::Path;
use std::time::Instant;

use caldpo_data::{inspect, load_pairs, DataConfig, PairDataset, PairTokenizer, LABELS_BEGIN};
use common::{asset, config, fixtures};
use serde_json::Value;

fn smollm2() -> PairTokenizer {
    let dir = asset("smollm2-135m-instruct/tokenizer.json").parent().unwrap().to_path_buf();
    asset("smollm2-135m-instruct/tokenizer_config.json");
    PairTokenizer::from_model_dir(&dir, "auto").unwrap()
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("real_expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ints(value: &Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

/// No truncation: every length is the full one.
fn untruncated() -> DataConfig {
    config(1 << 20, 1 << 19)
}

fn load(path: &Path, config: &DataConfig, tokenizer: &PairTokenizer) -> PairDataset {
    let cache = tempfile::tempdir().unwrap();
    load_pairs(path, config, tokenizer, Some(cache.path())).unwrap()
}

/// Every pair's prompt, chosen and rejected token counts and the first pair's ids equal the
/// reference's.
fn check_against_reference(file: &str) {
    let tokenizer = smollm2();
    let expected = &reference()[file];
    let dataset = load(&asset(file), &untruncated(), &tokenizer);
    let n = expected["pairs"].as_u64().unwrap() as usize;
    assert_eq!(dataset.report.rows_read, n, "{file}");
    assert_eq!(dataset.examples.len(), n, "{file}: {}", dataset.report.summary());
    let lengths = |f: fn(&caldpo_data::PairExample) -> usize| -> Vec<i64> {
        dataset.examples.iter().map(|e| f(e) as i64).collect()
    };
    assert_eq!(lengths(|e| e.prompt_len), ints(&expected["prompt_lengths"]), "{file} prompts");
    assert_eq!(
        lengths(|e| e.chosen.len() - e.prompt_len),
        ints(&expected["chosen_lengths"]),
        "{file}"
    );
    assert_eq!(
        lengths(|e| e.rejected.len() - e.prompt_len),
        ints(&expected["rejected_lengths"]),
        "{file}"
    );
    let first = &dataset.examples[0];
    let prompt = ints(&expected["first_pair"]["prompt"]);
    let chosen = [prompt.clone(), ints(&expected["first_pair"]["chosen"])].concat();
    let rejected = [prompt.clone(), ints(&expected["first_pair"]["rejected"])].concat();
    assert_eq!(first.chosen.input_ids, chosen, "{file}: first chosen");
    assert_eq!(first.rejected.input_ids, rejected, "{file}: first rejected");
}

#[test]
fn capital_of_france_prompt_reproduces_the_published_ids() {
    let ids = smollm2().encode_prompt("What is the capital of France?").unwrap();
    // REAL-INPUTS.md: 37 ids beginning with the default system turn; then the user turn
    // alone and the generation prompt, whose ids it lists separately.
    assert_eq!(ids.len(), 37);
    assert_eq!(ids[..7], [1, 9690, 198, 2683, 359, 253, 5356]);
    assert_eq!(ids[21..33], [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]);
    assert_eq!(ids[33..], [1, 520, 9531, 198]);
    assert_eq!(ids, ints(&reference()["capital_prompt"]));
    let tokenizer = smollm2();
    assert_eq!(tokenizer.eos_token_ids(), [2]);
    assert_eq!(tokenizer.pad_token_id(), 2);
}

#[test]
fn dpo_en_demo_matches_the_reference() {
    check_against_reference("dpo_en_demo.json");
}

#[test]
fn dpo_zh_demo_matches_the_reference() {
    check_against_reference("dpo_zh_demo.json");
}

#[test]
fn v1_dpo_demo_matches_the_reference() {
    check_against_reference("v1_dpo_demo.jsonl");
}

#[test]
fn dpo_en_demo_loads_whole_at_default_limits_and_caches() {
    let tokenizer = smollm2();
    let cache = tempfile::tempdir().unwrap();
    let path = asset("dpo_en_demo.json");
    let limits = DataConfig::default();
    let started = Instant::now();
    let first = load_pairs(&path, &limits, &tokenizer, Some(cache.path())).unwrap();
    let tokenising = started.elapsed();
    let started = Instant::now();
    let second = load_pairs(&path, &limits, &tokenizer, Some(cache.path())).unwrap();
    let cached = started.elapsed();
    eprintln!("dpo_en_demo.json: tokenised in {tokenising:?}, from the cache in {cached:?}");
    assert_eq!(first, second);
    assert_eq!(first.report.rows_read, 300);
    assert_eq!(first.report.kept, 300, "{}", first.report.summary());
    // Reference: pairs whose prompt + longer response exceed 1024 tokens (or whose prompt
    // exceeds 512) are the truncated ones.
    let expected = &reference()["dpo_en_demo.json"];
    let (prompts, chosen, rejected) = (
        ints(&expected["prompt_lengths"]),
        ints(&expected["chosen_lengths"]),
        ints(&expected["rejected_lengths"]),
    );
    let truncated = (0..300)
        .filter(|&i| prompts[i] > 512 || prompts[i].min(512) + chosen[i].max(rejected[i]) > 1024)
        .count();
    assert_eq!(first.report.truncated, truncated);
    for example in &first.examples {
        assert!(example.len() <= 1024 && example.prompt_len <= 512);
    }
}

#[test]
fn inspect_reports_the_reference_percentiles() {
    let tokenizer = smollm2();
    let config = DataConfig { train: asset("dpo_en_demo.json"), ..untruncated() };
    let report = inspect(&config, &tokenizer, 4).unwrap();
    let expected = &reference()["dpo_en_demo.json"];
    // Nearest-rank p50 of 300 values is the 150th smallest.
    let mut prompts = ints(&expected["prompt_lengths"]);
    prompts.sort_unstable();
    let line = report.lines().find(|l| l.starts_with("prompt ")).unwrap();
    let p50: i64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(p50, prompts[149], "{report}");
    assert!(report.contains("rows read: 300, pairs kept: 300"), "{report}");
    assert!(report.contains("format: sharegpt (detected)"), "{report}");
    assert!(report.contains(LABELS_BEGIN), "{report}");
    assert!(report.contains("<|im_start|>assistant\n\n▶▶▶"), "{report}");
    eprintln!("{report}");
}
