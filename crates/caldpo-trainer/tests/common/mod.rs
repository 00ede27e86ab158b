//! Shared helpers: a tiny random Llama with the data crate's ChatML test tokenizer, a small
//! pairs file, and a way to run the real `caldpo` binary on them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tch::{Device, Kind, Tensor};

const HIDDEN: i64 = 32;
const INTERMEDIATE: i64 = 48;
const LAYERS: i64 = 2;
/// The ChatML test tokenizer has 420 tokens; the embedding is padded to 448.
const VOCAB: i64 = 448;

/// The data crate's ChatML test tokenizer (SmolLM2's template, a tiny byte-level BPE).
fn tokenizer_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../caldpo-data/tests/fixtures/tokenizers/chatml")
}

/// Writes a tiny Llama (2 layers, hidden 32, grouped-query attention, tied embeddings) with
/// weights drawn from a fixed seed, plus the tokenizer files, into `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-llama");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_fixture().join(file), model.join(file)).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32"
    });
    std::fs::write(model.join("config.json"), serde_json::to_string_pretty(&config).unwrap())
        .unwrap();

    tch::manual_seed(7);
    let options = (Kind::Float, Device::Cpu);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut add = |name: String, shape: &[i64], norm: bool| {
        let tensor =
            if norm { Tensor::ones(shape, options) } else { Tensor::randn(shape, options) * 0.1 };
        tensors.push((name, tensor));
    };
    add("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], false);
    for layer in 0..LAYERS {
        let prefix = format!("model.layers.{layer}");
        add(format!("{prefix}.input_layernorm.weight"), &[HIDDEN], true);
        add(format!("{prefix}.post_attention_layernorm.weight"), &[HIDDEN], true);
        add(format!("{prefix}.self_attn.q_proj.weight"), &[32, HIDDEN], false);
        add(format!("{prefix}.self_attn.k_proj.weight"), &[16, HIDDEN], false);
        add(format!("{prefix}.self_attn.v_proj.weight"), &[16, HIDDEN], false);
        add(format!("{prefix}.self_attn.o_proj.weight"), &[HIDDEN, 32], false);
        add(format!("{prefix}.mlp.gate_proj.weight"), &[INTERMEDIATE, HIDDEN], false);
        add(format!("{prefix}.mlp.up_proj.weight"), &[INTERMEDIATE, HIDDEN], false);
        add(format!("{prefix}.mlp.down_proj.weight"), &[HIDDEN, INTERMEDIATE], false);
    }
    add("model.norm.weight".into(), &[HIDDEN], true);
    Tensor::write_safetensors(&tensors, model.join("model.safetensors")).unwrap();
    model
}

/// Twelve explicit-prompt pairs of varied lengths.
pub fn pairs_file(dir: &Path) -> PathBuf {
    let path = dir.join("pairs.jsonl");
    let mut lines = String::new();
    for k in 0..12 {
        let row = serde_json::json!({
            "prompt": format!("What is {k} plus {k}?"),
            "chosen": format!("It is {}.", 2 * k),
            "rejected": format!("I think it is {}, but {} is also possible.", 2 * k + 1, k + 7).repeat(1 + k % 3),
        });
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    std::fs::write(&path, lines).unwrap();
    path
}

/// A config for the tiny model: batch 2, accumulation 2, log every step.
pub fn config_file(dir: &Path, model: &Path, pairs: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[model]\npath = {model:?}\ndevice = \"cpu\"\n\n[data]\ntrain = {pairs:?}\n\
         max_length = 96\nmax_prompt_length = 64\n\n[optim]\nlr = 1e-3\nwarmup_steps = 1\n\n\
         [train]\nbatch_size = 2\ngrad_accum = 2\nmax_steps = 6\nseed = 3\n\n[eval]\n\
         at_start = false\nat_end = false\n\n[log]\nevery_steps = 1\n\n{extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the caldpo binary with a private cache directory.
pub fn caldpo(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caldpo"))
        .args(args)
        .env("CALDPO_CACHE", cache)
        .env("CALDPO_LOG", "warn")
        // `--nproc` keeps a MASTER_PORT it inherits; concurrent tests must not share one.
        .env_remove("MASTER_PORT")
        .output()
        .expect("the caldpo binary runs")
}

/// Asserts success, showing stderr otherwise.
pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "caldpo failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The lines of RUN_DIR/metrics.jsonl.
pub fn metrics(run_dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Metrics that must be reproducible (everything but wall-clock throughput).
pub fn reproducible(line: &Value) -> Vec<(String, f64)> {
    let object = line.as_object().unwrap();
    object
        .iter()
        .filter(|(key, _)| !key.ends_with("per_second"))
        .map(|(key, value)| (key.clone(), value.as_f64().unwrap_or(f64::NAN)))
        .collect()
}

/// Asserts two metric lines agree to a relative tolerance.
pub fn assert_close(a: &Value, b: &Value, tolerance: f64) {
    let (a, b) = (reproducible(a), reproducible(b));
    assert_eq!(a.len(), b.len(), "different keys: {a:?} vs {b:?}");
    for ((key, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(key, other);
        let scale = x.abs().max(y.abs()).max(1e-6);
        assert!((x - y).abs() / scale <= tolerance, "{key}: {x} vs {y}");
    }
}

/// A tiny model, the twelve pairs and a config in a temporary directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: std::path::PathBuf,
}

impl Fixture {
    pub fn new(extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let pairs = pairs_file(dir.path());
        let config = config_file(dir.path(), &model, &pairs, extra);
        Fixture { dir, config }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// `caldpo train` into RUN_DIR `run` with extra arguments.
    pub fn train(&self, run: &str, args: &[&str]) -> std::process::Output {
        let run_dir = self.path(run);
        let output_dir = format!("train.output_dir={}", run_dir.display());
        let config = self.config.to_str().unwrap();
        let mut all = vec!["train", config, "--set", &output_dir];
        all.extend_from_slice(args);
        caldpo(&all, &self.path("cache"))
    }
}
