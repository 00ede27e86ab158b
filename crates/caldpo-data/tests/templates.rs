//! Every schema, under three templates and plain text, against the ids that
//! tests/fixtures/make_fixtures.py computed with transformers' apply_chat_template (Jinja2)
//! and the Python tokenizers binding.

mod common;

use std::collections::BTreeMap;

use common::{config, data, expected, load, tokenizer, Reference};

const FILES: [&str; 6] = [
    "explicit.jsonl",
    "conversational.jsonl",
    "conversational.parquet",
    "implicit_messages.jsonl",
    "sharegpt.json",
    "hh.jsonl",
];

const CONFIGS: [(usize, usize); 2] = [(4096, 2048), (64, 32)];

/// Loads `file` with the fixture tokenizer and template and compares every kept pair and
/// every drop with the reference under `key` of expected.json.
fn check(file: &str, tokenizer_name: &str, template: &str, key: &str) {
    let expected = expected();
    let tokenizer = tokenizer(tokenizer_name, template);
    let held: Vec<usize> = expected["files"][file]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as usize)
        .collect();
    for (max_length, max_prompt_length) in CONFIGS {
        let references: Vec<Reference> = held
            .iter()
            .map(|&i| {
                Reference::from_json(&expected[key][format!("{max_length}/{max_prompt_length}")][i])
            })
            .collect();
        let dataset = load(&data(file), &config(max_length, max_prompt_length), &tokenizer);
        let what =
            format!("{file} with {tokenizer_name}/{template} at {max_length}/{max_prompt_length}");

        let kept: Vec<&Reference> =
            references.iter().filter(|r| matches!(r, Reference::Kept { .. })).collect();
        let actual: Vec<Reference> = dataset.examples.iter().map(Reference::of).collect();
        assert_eq!(actual.len(), kept.len(), "{what}: kept pairs");
        for (index, (actual, reference)) in actual.iter().zip(kept).enumerate() {
            assert_eq!(actual, reference, "{what}: kept pair {index}");
        }

        let mut dropped = BTreeMap::new();
        for reference in &references {
            if let Reference::Dropped(reason) = reference {
                *dropped.entry(reason.clone()).or_insert(0) += 1;
            }
        }
        assert_eq!(dataset.report.dropped, dropped, "{what}: drops");
        assert_eq!(dataset.report.rows_read, held.len(), "{what}: rows read");
        assert!(dataset.report.bad_rows.is_empty(), "{what}: bad rows");
    }
}

#[test]
fn chatml_template_matches_jinja2_on_every_schema() {
    for file in FILES {
        check(file, "chatml", "auto", "chatml/auto");
    }
}

#[test]
fn template_that_never_writes_eos_gets_it_appended() {
    for file in FILES {
        check(file, "chatml", "no_eos.jinja", "chatml/no_eos");
    }
}

#[test]
fn template_that_writes_bos_and_eos_with_a_bos_adding_tokenizer() {
    for file in FILES {
        check(file, "llama", "auto", "llama/auto");
    }
}

#[test]
fn plain_text_without_template() {
    check("explicit.jsonl", "llama", "none", "llama/none");
    check("explicit.jsonl", "chatml", "none", "chatml/none");
}

#[test]
fn decoded_prompt_is_the_jinja2_rendering() {
    // Pair 1 (system turn, French and Japanese text) is the second row of the
    // conversational file; byte-level BPE decodes to exactly the encoded text.
    let expected = expected();
    for (name, template) in [("chatml", "auto"), ("chatml", "no_eos.jinja"), ("llama", "auto")] {
        let tokenizer = tokenizer(name, template);
        let dataset = load(&data("conversational.jsonl"), &config(4096, 2048), &tokenizer);
        let pair = &dataset.examples[1];
        let prompt = tokenizer.decode(&pair.chosen.input_ids[..pair.prompt_len]).unwrap();
        let key = if template == "auto" { name } else { "no_eos" };
        assert_eq!(prompt, expected["rendered"][key].as_str().unwrap(), "{name}/{template}");
    }
}
