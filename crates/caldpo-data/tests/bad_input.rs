//! Bad rows and files: each error names the file, the line, element or row, and the field;
//! `skip_bad_rows` counts them by reason instead.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use caldpo_data::{load_pairs, DataConfig, Error};
use common::{config, fixtures, load, tokenizer};

fn bad(name: &str) -> PathBuf {
    fixtures().join("bad").join(name)
}

fn error(name: &str, config: &DataConfig) -> String {
    let cache = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer("chatml", "auto");
    match load_pairs(&bad(name), config, &tokenizer, Some(cache.path())) {
        Ok(dataset) => panic!("{name} loaded: {:?}", dataset.report),
        Err(e) => e.to_string(),
    }
}

fn strict() -> DataConfig {
    config(1024, 512)
}

fn skipping() -> DataConfig {
    DataConfig { skip_bad_rows: true, ..strict() }
}

/// The path as the errors print it.
fn shown(name: &str) -> String {
    bad(name).display().to_string()
}

#[test]
fn missing_field_names_line_field_and_what_was_found() {
    assert_eq!(
        error("missing_field.jsonl", &strict()),
        format!(
            "{}:3: field \"chosen\" is missing (found: prompt, response_a, response_b)",
            shown("missing_field.jsonl")
        )
    );
}

#[test]
fn wrong_type_names_the_field_and_both_types() {
    assert_eq!(
        error("wrong_type.jsonl", &strict()),
        format!("{}:2: field \"chosen\" is a number, expected a string", shown("wrong_type.jsonl"))
    );
}

#[test]
fn invalid_json_and_invalid_utf8_name_their_line() {
    let message = error("invalid_json.jsonl", &strict());
    assert!(
        message.starts_with(&format!("{}:2: invalid JSON: ", shown("invalid_json.jsonl"))),
        "{message}"
    );
    let message = error("invalid_utf8.jsonl", &strict());
    assert!(
        message.starts_with(&format!("{}:2: invalid UTF-8: ", shown("invalid_utf8.jsonl"))),
        "{message}"
    );
    let message = error("invalid_utf8.json", &strict());
    assert!(
        message.starts_with(&format!("{}: element 1: invalid UTF-8", shown("invalid_utf8.json"))),
        "{message}"
    );
}

#[test]
fn truncated_files_name_the_cut_row() {
    let message = error("truncated.jsonl", &strict());
    assert!(
        message.starts_with(&format!("{}:3: invalid JSON: ", shown("truncated.jsonl"))),
        "{message}"
    );
    let message = error("truncated.json", &strict());
    assert!(
        message.starts_with(&format!(
            "{}: element 2: invalid JSON: the file ends inside",
            shown("truncated.json")
        )),
        "{message}"
    );
    // A JSON array cannot be resynchronised after a syntax error: fatal even when skipping.
    assert!(error("truncated.json", &skipping()).contains("element 2"));
    let message = error("truncated.parquet", &skipping());
    assert!(
        message.starts_with(&format!("{}: cannot read Parquet", shown("truncated.parquet"))),
        "{message}"
    );
}

#[test]
fn wrong_json_shapes() {
    assert_eq!(
        error("wrong_element.json", &strict()),
        format!(
            "{}: element 1: invalid JSON: the element is a number, expected an object",
            shown("wrong_element.json")
        )
    );
    let message = error("not_array.json", &strict());
    assert!(
        message.starts_with(&format!("{}: expected a JSON array", shown("not_array.json"))),
        "{message}"
    );
    let dataset = load(&bad("wrong_element.json"), &skipping(), &tokenizer("chatml", "auto"));
    assert_eq!(dataset.report.kept, 2);
    assert_eq!(dataset.report.bad_rows, BTreeMap::from([("invalid_json".to_string(), 1)]));
}

#[test]
fn template_that_cannot_continue_the_prompt() {
    let message = error("template_mismatch.jsonl", &strict());
    assert!(
        message.starts_with(&format!(
            "{}:1: chat template: the prompt rendered",
            shown("template_mismatch.jsonl")
        )),
        "{message}"
    );
    assert!(message.contains("chosen response"), "{message}");
}

#[test]
fn empty_results_are_errors() {
    let message = error("empty.jsonl", &strict());
    assert_eq!(
        message,
        format!(
            "{}: no usable pairs (0 rows read, 0 pairs kept (0 truncated), dropped: none, bad rows \
             skipped: none)",
            shown("empty.jsonl")
        )
    );
    let message = error("all_dropped.jsonl", &strict());
    assert!(message.contains("dropped: identical_responses 1"), "{message}");
    let message = error("all_dropped.csv", &strict());
    assert!(message.contains("unknown file extension"), "{message}");
}

#[test]
fn skip_bad_rows_counts_each_reason() {
    // mixed.jsonl: 2 good rows; "rejected" missing; chosen a list; a cut-off object; a row
    // that is a list.
    let dataset = load(&bad("mixed.jsonl"), &skipping(), &tokenizer("chatml", "auto"));
    assert_eq!(dataset.report.rows_read, 6);
    assert_eq!(dataset.report.kept, 2);
    let expected = BTreeMap::from([
        ("invalid_json".to_string(), 2),
        ("missing_field".to_string(), 1),
        ("wrong_type".to_string(), 1),
    ]);
    assert_eq!(dataset.report.bad_rows, expected);
    // Without skipping, the first bad row (line 2) stops the load.
    assert!(
        error("mixed.jsonl", &strict()).contains("mixed.jsonl:2: field \"rejected\" is missing")
    );
    let dataset = load(&bad("invalid_utf8.jsonl"), &skipping(), &tokenizer("chatml", "auto"));
    assert_eq!(dataset.report.bad_rows, BTreeMap::from([("invalid_utf8".to_string(), 1)]));
}

#[test]
fn invalid_config_is_rejected_before_reading() {
    let mut config = strict();
    config.max_prompt_length = 1024;
    let cache = tempfile::tempdir().unwrap();
    let err =
        load_pairs(&bad("empty.jsonl"), &config, &tokenizer("chatml", "auto"), Some(cache.path()))
            .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        caldpo_data::PairTokenizer::from_model_dir(dir.path(), "auto").err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::copy(
        fixtures().join("tokenizers/chatml/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"eos_token\": \"<|im_end|>\"}")
        .unwrap();
    let err =
        caldpo_data::PairTokenizer::from_model_dir(dir.path(), "auto").err().unwrap().to_string();
    assert!(err.contains("no chat_template"), "{err}");
    assert!(caldpo_data::PairTokenizer::from_model_dir(dir.path(), "none").is_ok());
    let err = caldpo_data::PairTokenizer::from_model_dir(dir.path(), "missing.jinja")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing.jinja"), "{err}");
}
