//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use caldpo_models::{CausalLm, Device, Kind};
use tch::Tensor;

/// A fixture folder made by tests/fixtures/make_fixtures.py.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn load(name: &str) -> CausalLm {
    CausalLm::load(&fixture(name), Device::Cpu, Kind::Float).unwrap()
}

/// Inputs and transformers' outputs for one fixture.
pub struct Expected {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub position_ids: Tensor,
    pub logits: Tensor,
    pub prompts: Vec<Vec<i64>>,
    pub greedy: Vec<Vec<i64>>,
}

pub fn expected(name: &str) -> Expected {
    let dir = fixture(name);
    let mut tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap().into_iter().collect();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let lists = |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(json[key].clone()).unwrap() };
    Expected {
        input_ids: tensors.remove("input_ids").unwrap(),
        attention_mask: tensors.remove("attention_mask").unwrap(),
        position_ids: tensors.remove("position_ids").unwrap(),
        logits: tensors.remove("logits").unwrap(),
        prompts: lists("prompts"),
        greedy: lists("greedy"),
    }
}

/// Largest `|actual - expected| / max(|expected|, 1)` over the positions where `mask` is 1.
pub fn max_relative_error(actual: &Tensor, expected: &Tensor, mask: &Tensor) -> f64 {
    let keep = mask.ne(0).unsqueeze(-1).expand_as(expected);
    let diff = (actual - expected).abs().masked_select(&keep);
    let scale = expected.abs().clamp_min(1.0).masked_select(&keep);
    (diff / scale).max().double_value(&[])
}

/// The assets folder: `$CALDPO_ASSETS`, else `$HOME/.cache/caldpo/assets`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("CALDPO_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/caldpo/assets"),
    }
}

/// A file of the assets folder; panics with the command that fetches it when missing.
pub fn asset(name: &str) -> PathBuf {
    let path = assets_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo xtask assets`", path.display());
    path
}
