//! Parameters, gradients, frozen copies, saving and generation options, on the tiny
//! fixtures.

mod common;

use std::collections::HashMap;
use std::path::Path;

use caldpo_models::{CausalLm, Device, Error, GenerationOptions, Kind};
use common::{expected, fixture, load, max_relative_error};
use tch::Tensor;

fn logits_of(model: &CausalLm, name: &str) -> Tensor {
    let e = expected(name);
    model.forward(&e.input_ids, &e.attention_mask, &e.position_ids)
}

/// Raw bytes, dtype and shape of every tensor of a safetensors file (or of all shards).
fn raw_tensors(paths: &[std::path::PathBuf]) -> HashMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    for path in paths {
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in file.tensors() {
            let entry =
                (format!("{:?}", view.dtype()), view.shape().to_vec(), view.data().to_vec());
            out.insert(name, entry);
        }
    }
    out
}

fn safetensors_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("model") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn parameters_are_named_leaves_with_gradients() {
    let model = load("llama");
    let params = model.named_parameters();
    // embed, 2 x (2 norms + 4 attention + 3 mlp), final norm, lm_head.
    assert_eq!(params.len(), 1 + 2 * 9 + 1 + 1);
    assert_eq!(params[0].0, "model.embed_tokens.weight");
    assert_eq!(params.last().unwrap().0, "lm_head.weight");
    assert!(params.iter().all(|(_, t)| t.requires_grad() && t.is_leaf()));

    let logits = logits_of(&model, "llama");
    logits.sum(Kind::Float).backward();
    for (name, tensor) in &params {
        let grad = tensor.grad();
        assert!(grad.defined(), "{name} has no gradient");
        assert_eq!(grad.size(), tensor.size());
    }
}

#[test]
fn tied_head_is_listed_once_and_shares_the_embedding() {
    let model = load("llama3_rope");
    let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
    let embedding = &model.named_parameters()[0].1;
    let head = model.lm_head();
    assert_eq!(head.data_ptr(), embedding.data_ptr());

    // The gradient of the embedding collects both uses: input lookup and LM head.
    let logits = logits_of(&model, "llama3_rope");
    logits.sum(Kind::Float).backward();
    let grad = embedding.grad();
    assert!(grad.defined());
    assert!(head.grad().equal(&grad));
}

#[test]
fn in_place_update_under_no_grad_changes_the_model() {
    let model = load("llama");
    let before = logits_of(&model, "llama");
    tch::no_grad(|| {
        let (_, mut norm) =
            model.named_parameters().into_iter().find(|(n, _)| n == "model.norm.weight").unwrap();
        let _ = norm.g_mul_scalar_(2.0);
    });
    let after = logits_of(&model, "llama");
    assert!(!before.allclose(&after, 1e-3, 1e-3, false));
}

#[test]
fn hidden_states_through_the_head_are_the_logits() {
    let model = load("gpt_neox");
    let e = expected("gpt_neox");
    let hidden = model.forward_hidden(&e.input_ids, &e.attention_mask, &e.position_ids);
    assert_eq!(hidden.size(), vec![2, 10, 32]);
    let logits = hidden.matmul(&model.lm_head().tr());
    assert!(max_relative_error(&logits, &e.logits, &e.attention_mask) < 1e-4);
}

#[test]
fn frozen_copy_is_deep_gradient_free_and_equal() {
    let model = load("qwen2_bf16_sharded");
    let reference = model.frozen_copy(Kind::Float).unwrap();
    assert!(reference.is_frozen());
    assert!(reference.named_parameters().iter().all(|(_, t)| !t.requires_grad()));

    let logits = logits_of(&reference, "qwen2_bf16_sharded");
    assert!(!logits.requires_grad(), "a frozen model must never record a graph");
    assert!(logits.equal(&logits_of(&model, "qwen2_bf16_sharded")));

    // Deep: updating the policy leaves the reference as it was.
    tch::no_grad(|| {
        for (_, mut t) in model.named_parameters() {
            let _ = t.g_add_scalar_(0.5);
        }
    });
    assert!(logits.equal(&logits_of(&reference, "qwen2_bf16_sharded")));
}

#[test]
fn bf16_reference_is_close_to_f32() {
    let model = load("llama");
    let reference = model.frozen_copy(Kind::BFloat16).unwrap();
    assert!(reference.named_parameters().iter().all(|(_, t)| t.kind() == Kind::BFloat16));
    let e = expected("llama");
    let logits = reference.forward(&e.input_ids, &e.attention_mask, &e.position_ids);
    assert_eq!(logits.kind(), Kind::BFloat16);
    // bf16 keeps 8 bits of mantissa: a few percent of error through two layers.
    let error = max_relative_error(&logits.to_kind(Kind::Float), &e.logits, &e.attention_mask);
    assert!(error < 0.1, "bf16 logits off by {error}");
}

#[test]
fn load_in_bf16() {
    let model = CausalLm::load(&fixture("gpt2"), Device::Cpu, Kind::BFloat16).unwrap();
    assert_eq!(model.kind(), Kind::BFloat16);
    assert!(model.named_parameters().iter().all(|(_, t)| t.kind() == Kind::BFloat16));
}

#[test]
fn gpt2_names_without_the_transformer_prefix_load() {
    // The original GPT-2 files on the hub store `h.0.attn.c_attn.weight`, not
    // `transformer.h.0.attn.c_attn.weight`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("gpt2").join("config.json"), dir.path().join("config.json")).unwrap();
    let tensors = Tensor::read_safetensors(fixture("gpt2").join("model.safetensors")).unwrap();
    let renamed: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(name, t)| (name.trim_start_matches("transformer.").to_string(), t))
        .collect();
    assert!(renamed.iter().any(|(name, _)| name == "h.0.attn.c_attn.weight"));
    Tensor::write_safetensors(&renamed, dir.path().join("model.safetensors")).unwrap();

    let model = CausalLm::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(model.named_parameters()[0].0, "transformer.wte.weight");
    let e = expected("gpt2");
    let error = max_relative_error(&logits_of(&model, "gpt2"), &e.logits, &e.attention_mask);
    assert!(error < 1e-4);
}

#[test]
fn freeze_turns_gradients_off() {
    let mut model = load("gpt2");
    model.freeze();
    assert!(model.named_parameters().iter().all(|(_, t)| !t.requires_grad()));
    assert!(!logits_of(&model, "gpt2").requires_grad());
}

#[test]
fn save_then_load_is_bit_identical_with_source_names() {
    for name in ["llama", "llama3_rope", "qwen2_bf16_sharded", "gpt_neox", "gpt2"] {
        let source = fixture(name);
        let model = load(name);
        let out = tempfile::tempdir().unwrap();
        model.save_pretrained(out.path(), &source).unwrap();

        // The stored tensors are the source's, byte for byte, in the source dtype (bf16
        // for the qwen2 fixture, whose shards become one file).
        let saved = raw_tensors(&safetensors_files(out.path()));
        let original = raw_tensors(&safetensors_files(&source));
        let mut saved_names: Vec<_> = saved.keys().collect();
        let mut original_names: Vec<_> = original.keys().collect();
        saved_names.sort();
        original_names.sort();
        assert_eq!(saved_names, original_names, "{name}");
        for (tensor, entry) in &original {
            assert!(saved[tensor] == *entry, "{name}: {tensor} differs");
        }

        let reloaded = CausalLm::load(out.path(), Device::Cpu, Kind::Float).unwrap();
        for ((a_name, a), (b_name, b)) in
            model.named_parameters().iter().zip(reloaded.named_parameters())
        {
            assert_eq!(*a_name, b_name);
            assert!(a.equal(&b), "{name}: {a_name} changed");
        }
        assert_eq!(model.config(), reloaded.config());
    }
}

#[test]
fn save_writes_a_chosen_dtype_and_copies_tokenizer_files() {
    let source = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama").join(file), source.path().join(file)).unwrap();
    }
    std::fs::write(source.path().join("tokenizer.json"), "{\"fake\": 1}").unwrap();
    std::fs::write(source.path().join("generation_config.json"), "{}").unwrap();
    let model = CausalLm::load(source.path(), Device::Cpu, Kind::Float).unwrap();

    let out = tempfile::tempdir().unwrap();
    model.save_pretrained_as(out.path(), source.path(), Kind::BFloat16).unwrap();
    let saved = raw_tensors(&safetensors_files(out.path()));
    assert!(saved.values().all(|(dtype, _, _)| dtype == "BF16"));
    assert_eq!(
        std::fs::read_to_string(out.path().join("tokenizer.json")).unwrap(),
        "{\"fake\": 1}"
    );
    assert!(out.path().join("generation_config.json").is_file());
    assert!(!out.path().join("tokenizer_config.json").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["dtype"], "bfloat16");

    // Saving into the source folder itself keeps its tokenizer files.
    model.save_pretrained(source.path(), source.path()).unwrap();
    assert!(source.path().join("tokenizer.json").is_file());
}

#[test]
fn generation_stops_after_eos() {
    let model = load("llama");
    let e = expected("llama");
    // Greedy continuation of prompt 0 is known; make its third token the EOS.
    let eos = e.greedy[0][2];
    let stop = e.greedy[0].iter().position(|&t| t == eos).unwrap();
    let opts =
        GenerationOptions { max_new_tokens: 6, eos_token_ids: vec![eos], ..Default::default() };
    let out = model.generate(&e.prompts, &opts).unwrap();
    assert_eq!(out[0], e.greedy[0][..=stop].to_vec());
    // The other row stops at its own first `eos`, if any.
    let other_stop = e.greedy[1].iter().position(|&t| t == eos).map_or(6, |i| i + 1);
    assert_eq!(out[1], e.greedy[1][..other_stop].to_vec());
}

#[test]
fn sampling_is_seeded_and_a_tiny_nucleus_is_greedy() {
    let model = load("mistral_window");
    let e = expected("mistral_window");
    let sampled = |seed: u64, top_p: f64| {
        let opts = GenerationOptions {
            max_new_tokens: 6,
            temperature: 0.8,
            top_p,
            seed,
            ..Default::default()
        };
        model.generate(&e.prompts, &opts).unwrap()
    };
    assert_eq!(sampled(3, 0.9), sampled(3, 0.9));
    // A nucleus of mass 1e-9 holds only the most likely token.
    assert_eq!(sampled(3, 1e-9), e.greedy);
    assert!(sampled(3, 1.0).iter().all(|row| row.len() == 6));
}

#[test]
fn frozen_model_generates() {
    let reference = load("gpt2").frozen_copy(Kind::Float).unwrap();
    let e = expected("gpt2");
    let out = reference.generate(&e.prompts, &GenerationOptions::greedy(6, vec![])).unwrap();
    assert_eq!(out, e.greedy);
}

#[test]
fn generation_rejects_bad_options() {
    let model = load("gpt2");
    let bad_top_p = GenerationOptions { top_p: 0.0, ..Default::default() };
    assert!(matches!(model.generate(&[vec![1]], &bad_top_p), Err(Error::InvalidArgument(_))));
    let empty = model.generate(&[vec![]], &GenerationOptions::default());
    assert!(empty.unwrap_err().to_string().contains("empty"));
    let out_of_vocab = model.generate(&[vec![96]], &GenerationOptions::default());
    assert!(out_of_vocab.unwrap_err().to_string().contains("96"));
    // GPT-2 has 32 learned positions.
    let too_long = GenerationOptions { max_new_tokens: 40, ..Default::default() };
    assert!(model.generate(&[vec![1]], &too_long).unwrap_err().to_string().contains("positions"));
}

#[test]
fn bad_inputs_are_reported() {
    let model = load("llama");
    let ids = Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu));
    let short = Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu));
    let err = model.f_forward_hidden(&ids, &short, &ids).unwrap_err().to_string();
    assert!(err.contains("attention_mask") && err.contains("[2, 3]"), "{err}");
    let floats = ids.to_kind(Kind::Float);
    let err = model.f_forward_hidden(&floats, &ids, &ids).unwrap_err().to_string();
    assert!(err.contains("input_ids must be int64"), "{err}");
}

/// Copies a fixture into a temp dir with config.json edited by `edit`.
fn with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(name).join("model.safetensors"), dir.path().join("model.safetensors"))
        .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn checkpoint_errors_name_the_problem() {
    let load_err = |dir: &tempfile::TempDir| {
        CausalLm::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err().to_string()
    };

    let dir = with_config("llama", |c| c["model_type"] = "t5".into());
    let err = load_err(&dir);
    assert!(err.contains("t5") && err.contains("gpt_neox"), "{err}");

    let dir = with_config("llama", |c| c["intermediate_size"] = 40.into());
    let err = load_err(&dir);
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[40, 32]"),
        "{err}"
    );

    let dir = with_config("llama", |c| c["num_hidden_layers"] = 3.into());
    let err = load_err(&dir);
    assert!(err.contains("model.layers.2.input_layernorm.weight"), "{err}");

    let dir = with_config("llama", |c| c["num_hidden_layers"] = 1.into());
    let err = load_err(&dir);
    assert!(err.contains("unexpected") && err.contains("model.layers.1."), "{err}");

    let dir = with_config("llama", |_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));
}
