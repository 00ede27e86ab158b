//! The on-disk cache of tokenised datasets.

mod common;

use std::fs;

use caldpo_data::load_pairs;
use common::{config, data, tokenizer};

fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn second_load_reads_the_cache_and_keys_follow_every_input() {
    let cache = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer("chatml", "auto");
    let limits = config(64, 32);
    let first =
        load_pairs(&data("sharegpt.json"), &limits, &tokenizer, Some(cache.path())).unwrap();
    let files = entries(cache.path());
    assert_eq!(files.len(), 1, "one entry, no temporary left: {files:?}");
    assert_eq!(files[0].file_name().unwrap().len(), 64, "named by a hex SHA-256");

    // Same inputs: served from the cache, equal in every field.
    let second =
        load_pairs(&data("sharegpt.json"), &limits, &tokenizer, Some(cache.path())).unwrap();
    assert_eq!(second, first);
    assert_eq!(entries(cache.path()).len(), 1);

    // Prove the second load came from the cache: a cache entry whose pairs were altered is
    // what load_pairs returns. Flip the last byte (a token id of the last pair's rejected
    // sequence) and expect exactly that change.
    let mut bytes = fs::read(&files[0]).unwrap();
    let last = bytes.len() - 4;
    bytes[last] ^= 1;
    fs::write(&files[0], &bytes).unwrap();
    let altered =
        load_pairs(&data("sharegpt.json"), &limits, &tokenizer, Some(cache.path())).unwrap();
    let mut expected = first.clone();
    let rejected = &mut expected.examples.last_mut().unwrap().rejected;
    *rejected.input_ids.last_mut().unwrap() ^= 1;
    *rejected.labels.last_mut().unwrap() ^= 1;
    assert_eq!(altered, expected);

    // A truncated entry is ignored and rewritten.
    fs::write(&files[0], &bytes[..bytes.len() / 2]).unwrap();
    let rebuilt =
        load_pairs(&data("sharegpt.json"), &limits, &tokenizer, Some(cache.path())).unwrap();
    assert_eq!(rebuilt, first);

    // Other limits, another template, another file: new entries.
    load_pairs(&data("sharegpt.json"), &config(4096, 2048), &tokenizer, Some(cache.path()))
        .unwrap();
    let no_eos = common::tokenizer("chatml", "no_eos.jinja");
    load_pairs(&data("sharegpt.json"), &limits, &no_eos, Some(cache.path())).unwrap();
    load_pairs(&data("conversational.jsonl"), &limits, &tokenizer, Some(cache.path())).unwrap();
    assert_eq!(entries(cache.path()).len(), 4);
}

#[test]
fn same_bytes_under_another_name_share_the_entry_and_report_their_own_path() {
    let cache = tempfile::tempdir().unwrap();
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("copy.json");
    fs::copy(data("sharegpt.json"), &copy).unwrap();
    let tokenizer = tokenizer("chatml", "auto");
    let original =
        load_pairs(&data("sharegpt.json"), &config(64, 32), &tokenizer, Some(cache.path()))
            .unwrap();
    let copied = load_pairs(&copy, &config(64, 32), &tokenizer, Some(cache.path())).unwrap();
    assert_eq!(entries(cache.path()).len(), 1);
    assert_eq!(copied.examples, original.examples);
    assert_eq!(copied.report.path, copy);
}
