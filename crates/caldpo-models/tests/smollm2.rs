//! The real SmolLM2-135M-Instruct, imported from its GGUF file (assets, see
//! REAL-INPUTS.md). The expected values were computed by transformers on the imported
//! folder (tests/fixtures/check_hf_load.py) and agree with REAL-INPUTS.md.

mod common;

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use caldpo_models::{import_gguf, CausalLm, Device, GenerationOptions, Kind};
use common::asset;
use tch::Tensor;
use tokenizers::Tokenizer;

/// The GGUF file imported once per test run into a temporary folder.
fn imported() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        import_gguf(&asset("SmolLM2-135M-Instruct.Q4_1.gguf"), dir.path()).unwrap();
        dir
    })
    .path()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(imported().join("tokenizer.json")).unwrap()
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Vec<i64> {
    let encoding = tokenizer.encode(text, false).unwrap();
    encoding.get_ids().iter().map(|&id| id as i64).collect()
}

/// Runs `f` with the model, loaded once and shared by the tests of this file.
fn with_model<T>(f: impl FnOnce(&CausalLm) -> T) -> T {
    static MODEL: Mutex<Option<CausalLm>> = Mutex::new(None);
    let mut guard = MODEL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let model =
        guard.get_or_insert_with(|| CausalLm::load(imported(), Device::Cpu, Kind::Float).unwrap());
    f(model)
}

/// The ChatML prompt for the France question, rendered by hand: SmolLM2's template
/// inserts this default system turn when the conversation has none.
const FRANCE_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
<|im_start|>assistant\n";

#[test]
fn config_matches_the_architecture() {
    with_model(|model| {
        let c = model.config();
        assert_eq!((c.model_type.as_str(), c.vocab_size, c.hidden_size), ("llama", 49152, 576));
        assert_eq!((c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads), (30, 9, 3));
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id),
            (Some(1), vec![2], Some(2))
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(model.num_parameters(), 134_515_008);
    });
}

#[test]
fn rebuilt_tokenizer_encodes_reference_ids() {
    let ids = encode(&tokenizer(), "Hello world! 12345 <|im_start|>user\nHi<|im_end|>");
    assert_eq!(ids, vec![19556, 905, 17, 216, 33, 34, 35, 36, 37, 216, 1, 4093, 198, 26843, 2]);
}

#[test]
fn tokenizer_config_carries_template_and_special_tokens() {
    let text = std::fs::read_to_string(imported().join("tokenizer_config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["bos_token"], "<|im_start|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["pad_token"], "<|im_end|>");
    assert_eq!(config["add_bos_token"], false);
    for id in 0..17 {
        assert_eq!(config["added_tokens_decoder"][id.to_string()]["special"], true, "token {id}");
    }

    // The GGUF's own chat template renders exactly the hand-written prompt.
    let mut env = minijinja::Environment::new();
    env.add_template("chat", config["chat_template"].as_str().unwrap()).unwrap();
    let rendered = env
        .get_template("chat")
        .unwrap()
        .render(minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => "What is the capital of France?" }],
            add_generation_prompt => true,
        })
        .unwrap();
    assert_eq!(rendered, FRANCE_PROMPT);
}

#[test]
fn chat_prompt_tokenises_to_reference_ids() {
    let ids = encode(&tokenizer(), FRANCE_PROMPT);
    // REAL-INPUTS.md: 37 ids; the system turn's start, then the user turn, then the
    // generation prompt.
    assert_eq!(ids.len(), 37);
    assert_eq!(ids[..7], [1, 9690, 198, 2683, 359, 253, 5356]);
    assert_eq!(ids[21..33], [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]);
    assert_eq!(ids[33..], [1, 520, 9531, 198]);
}

#[test]
fn perplexity_on_wiki_demo() {
    let text = std::fs::read_to_string(asset("wiki_demo.txt")).unwrap();
    let mut ids = encode(&tokenizer(), &text);
    ids.truncate(1024);
    let input_ids = Tensor::from_slice(&ids).view([1, 1024]);
    let mask = input_ids.ones_like();
    let positions = Tensor::arange(1024, (Kind::Int64, Device::Cpu)).view([1, 1024]);

    let nll = with_model(|model| {
        tch::no_grad(|| {
            let logits = model.forward(&input_ids, &mask, &positions);
            let log_probs = logits.narrow(1, 0, 1023).log_softmax(-1, Kind::Float);
            let targets = input_ids.narrow(1, 1, 1023).unsqueeze(-1);
            -log_probs.gather(-1, &targets, false).mean(Kind::Float).double_value(&[])
        })
    });
    // transformers on the same folder: mean NLL 2.961602, perplexity 19.3289.
    let perplexity = nll.exp();
    assert!((perplexity - 19.3289).abs() < 0.01, "perplexity {perplexity}");
}

#[test]
fn greedy_answer_names_paris() {
    let tokenizer = tokenizer();
    let prompt = encode(&tokenizer, FRANCE_PROMPT);
    let answer = with_model(|model| {
        model.generate(&[prompt], &GenerationOptions::greedy(24, vec![2])).unwrap()
    });
    let ids: Vec<u32> = answer[0].iter().map(|&id| id as u32).collect();
    let text = tokenizer.decode(&ids, true).unwrap();
    // transformers' greedy answer on the same folder.
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(answer[0].last(), Some(&2), "stops at <|im_end|>");
}

#[test]
fn ragged_batch_generates_as_each_prompt_alone() {
    let tokenizer = tokenizer();
    let prompts = vec![
        encode(&tokenizer, FRANCE_PROMPT),
        encode(&tokenizer, "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"),
        encode(&tokenizer, "The quick brown fox"),
    ];
    let opts = GenerationOptions::greedy(8, vec![2]);
    let (batched, alone) = with_model(|model| {
        let batched = model.generate(&prompts, &opts).unwrap();
        let alone: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| model.generate(std::slice::from_ref(p), &opts).unwrap().remove(0))
            .collect();
        (batched, alone)
    });
    assert_eq!(batched, alone);
}
