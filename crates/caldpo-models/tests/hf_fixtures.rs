//! Each architecture against the logits and greedy continuations transformers computed
//! for the same tiny checkpoint (tests/fixtures/make_fixtures.py).

mod common;

use caldpo_models::GenerationOptions;
use common::{expected, load, max_relative_error};

/// f32 logits at non-pad positions agree within 1e-4 relative (absolute below 1).
const TOLERANCE: f64 = 1e-4;

fn check_logits(name: &str) {
    let model = load(name);
    let e = expected(name);
    let logits = model.forward(&e.input_ids, &e.attention_mask, &e.position_ids);
    assert_eq!(logits.size(), e.logits.size());
    let error = max_relative_error(&logits, &e.logits, &e.attention_mask);
    println!("{name}: max relative error {error:e}");
    assert!(error < TOLERANCE, "{name}: logits differ from transformers by {error:e}");
}

fn check_greedy(name: &str) {
    let model = load(name);
    let e = expected(name);
    let opts = GenerationOptions { max_new_tokens: 6, ..GenerationOptions::default() };
    // Both prompts in one left-padded batch; transformers generated each alone.
    let generated = model.generate(&e.prompts, &opts).unwrap();
    assert_eq!(generated, e.greedy, "{name}");
}

macro_rules! architecture_tests {
    ($($module:ident => $fixture:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            fn logits_match_transformers() {
                super::check_logits($fixture);
            }

            #[test]
            fn batched_greedy_matches_transformers() {
                super::check_greedy($fixture);
            }
        }
    )*};
}

architecture_tests! {
    llama => "llama",
    llama3_rope_scaling => "llama3_rope",
    qwen2_bf16_sharded => "qwen2_bf16_sharded",
    mistral_sliding_window => "mistral_window",
    gpt_neox_parallel => "gpt_neox",
    gpt_neox_sequential => "gpt_neox_sequential",
    gpt2 => "gpt2",
}
