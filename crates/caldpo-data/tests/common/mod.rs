//! Helpers shared by the integration tests: fixture paths, fixture tokenizers, the expected
//! ids written by tests/fixtures/make_fixtures.py, and the real assets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use caldpo_data::{load_pairs, DataConfig, PairDataset, PairExample, PairTokenizer};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn data(name: &str) -> PathBuf {
    fixtures().join("data").join(name)
}

/// A fixture tokenizer folder (`chatml` or `llama`) with a template (`auto`, `none`, or a
/// file under tests/fixtures/templates).
pub fn tokenizer(name: &str, template: &str) -> PairTokenizer {
    let template = match template {
        "auto" | "none" => template.to_string(),
        file => fixtures().join("templates").join(file).display().to_string(),
    };
    PairTokenizer::from_model_dir(&fixtures().join("tokenizers").join(name), &template)
        .unwrap_or_else(|e| panic!("fixture tokenizer {name}: {e}"))
}

pub fn config(max_length: usize, max_prompt_length: usize) -> DataConfig {
    DataConfig { max_length, max_prompt_length, ..DataConfig::default() }
}

/// Loads with a private cache directory, so tests never touch `$HOME`.
pub fn load(path: &Path, config: &DataConfig, tokenizer: &PairTokenizer) -> PairDataset {
    let cache = tempfile::tempdir().unwrap();
    load_pairs(path, config, tokenizer, Some(cache.path()))
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// What the reference implementation made of one pair: kept ids, or a drop reason.
#[derive(Debug, PartialEq)]
pub enum Reference {
    Kept { prompt_len: usize, chosen: (Vec<i64>, Vec<i64>), rejected: (Vec<i64>, Vec<i64>) },
    Dropped(String),
}

impl Reference {
    pub fn from_json(value: &Value) -> Self {
        if let Some(reason) = value.get("dropped") {
            return Reference::Dropped(reason.as_str().unwrap().to_string());
        }
        let ids = |key: &str| -> Vec<i64> {
            value[key].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
        };
        Reference::Kept {
            prompt_len: value["prompt_len"].as_u64().unwrap() as usize,
            chosen: (ids("chosen_input_ids"), ids("chosen_labels")),
            rejected: (ids("rejected_input_ids"), ids("rejected_labels")),
        }
    }

    pub fn of(example: &PairExample) -> Self {
        Reference::Kept {
            prompt_len: example.prompt_len,
            chosen: (example.chosen.input_ids.clone(), example.chosen.labels.clone()),
            rejected: (example.rejected.input_ids.clone(), example.rejected.labels.clone()),
        }
    }
}

/// The directory of the real assets: `$CALDPO_ASSETS`, else `$HOME/.cache/caldpo/assets`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("CALDPO_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/caldpo/assets"),
    }
}

/// A real asset, or a panic that says how to get it.
pub fn asset(name: &str) -> PathBuf {
    let path = assets_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo xtask assets`", path.display());
    path
}
