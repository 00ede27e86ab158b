//! Loading a preference file into tokenised pairs: read, parse, template, tokenise (on all
//! cores), truncate, filter, with an on-disk cache of the result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache;
use crate::config::{DataConfig, Format};
use crate::error::{Error, Result, RowLocation, RowProblem};
use crate::reader::{for_each_row, FileKind};
use crate::schema::{PairText, Schema};
use crate::tokenize::{PairIds, PairTokenizer};

/// Label of positions that carry no loss (prompt and padding), as in Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

/// Rows parsed before a parallel tokenisation pass: enough to keep both cores busy, few
/// enough that the raw texts held at once stay small.
const CHUNK_ROWS: usize = 2048;

/// Drop reason: a response with no text (nothing to label).
pub const DROP_EMPTY_RESPONSE: &str = "empty_response";
/// Drop reason: a prompt with no tokens (the first response token would have no logit).
pub const DROP_EMPTY_PROMPT: &str = "empty_prompt";
/// Drop reason: chosen and rejected sequences identical (after truncation).
pub const DROP_IDENTICAL: &str = "identical_responses";

/// One tokenised sequence, prompt then response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSequence {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// Same length as `input_ids` (Hugging Face alignment: `labels[i]` is the id at `i`, the
    /// loss shifts): the id on response positions, [`IGNORE_INDEX`] on prompt positions.
    pub labels: Vec<i64>,
}

impl TokenizedSequence {
    fn new(prompt: &[i64], response: &[i64]) -> Self {
        let mut input_ids = Vec::with_capacity(prompt.len() + response.len());
        input_ids.extend_from_slice(prompt);
        input_ids.extend_from_slice(response);
        let mut labels = vec![IGNORE_INDEX; prompt.len()];
        labels.extend_from_slice(response);
        Self { input_ids, labels }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens (never true for a loaded pair).
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// One preference pair ready to batch. Both sequences start with the same `prompt_len`
/// prompt ids and carry at least one labelled token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairExample {
    /// Stable id: the first 8 bytes (big-endian) of the SHA-256 of the pair's parsed texts,
    /// independent of tokenizer, template and truncation. Identical rows share an id.
    pub id: u64,
    /// Prompt tokens at the start of both sequences.
    pub prompt_len: usize,
    /// Prompt + chosen response.
    pub chosen: TokenizedSequence,
    /// Prompt + rejected response.
    pub rejected: TokenizedSequence,
}

impl PairExample {
    /// The longer of the two sequence lengths (what the pair costs in a padded batch).
    pub fn len(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }

    /// Whether both sequences are empty (never true for a loaded pair).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What happened to the rows of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The file read.
    pub path: PathBuf,
    /// The row schema used: the configured one, or the one detected from the first row.
    pub format: Format,
    /// Rows in the file (bad ones included).
    pub rows_read: usize,
    /// Pairs kept.
    pub kept: usize,
    /// Pairs dropped after tokenisation, by reason (`empty_response`, `empty_prompt`,
    /// `identical_responses`).
    pub dropped: BTreeMap<String, usize>,
    /// Rows skipped under `skip_bad_rows`, by [`RowProblem::kind`].
    pub bad_rows: BTreeMap<String, usize>,
    /// Kept pairs of which at least one sequence was truncated.
    pub truncated: usize,
}

impl LoadReport {
    /// One line: read, kept, truncated, dropped and skipped counts.
    pub fn summary(&self) -> String {
        let counts = |map: &BTreeMap<String, usize>| {
            if map.is_empty() {
                "none".to_string()
            } else {
                map.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            }
        };
        format!(
            "{} rows read, {} pairs kept ({} truncated), dropped: {}, bad rows skipped: {}",
            self.rows_read,
            self.kept,
            self.truncated,
            counts(&self.dropped),
            counts(&self.bad_rows)
        )
    }
}

/// The tokenised pairs of one file and what happened to its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairDataset {
    /// Kept pairs, in file order.
    pub examples: Vec<PairExample>,
    /// Counts of rows read, kept, dropped and skipped.
    pub report: LoadReport,
}

/// Token limits applied per pair, before padding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_length: usize,
    pub max_prompt_length: usize,
}

/// What truncation and filtering make of one pair's ids.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Kept { example: PairExample, truncated: bool },
    Dropped(&'static str),
}

/// Truncates and filters one pair. The prompt keeps its last `max_prompt_length` tokens;
/// then each response keeps its first `max_length - prompt_len` tokens, so both sequences
/// fit even when only one response is long, and the prompt is cut the same way in both. A
/// truncated response loses its end-of-turn token. `validate` guarantees
/// `max_prompt_length < max_length`, so at least one response token always remains.
pub(crate) fn truncate_pair(id: u64, ids: PairIds, limits: Limits) -> Outcome {
    if ids.chosen.is_empty() || ids.rejected.is_empty() {
        return Outcome::Dropped(DROP_EMPTY_RESPONSE);
    }
    if ids.prompt.is_empty() {
        return Outcome::Dropped(DROP_EMPTY_PROMPT);
    }
    let prompt_len = ids.prompt.len().min(limits.max_prompt_length);
    let prompt = &ids.prompt[ids.prompt.len() - prompt_len..];
    let room = limits.max_length - prompt_len;
    let chosen = &ids.chosen[..ids.chosen.len().min(room)];
    let rejected = &ids.rejected[..ids.rejected.len().min(room)];
    if chosen == rejected {
        return Outcome::Dropped(DROP_IDENTICAL);
    }
    let truncated = prompt_len < ids.prompt.len()
        || chosen.len() < ids.chosen.len()
        || rejected.len() < ids.rejected.len();
    let example = PairExample {
        id,
        prompt_len,
        chosen: TokenizedSequence::new(prompt, chosen),
        rejected: TokenizedSequence::new(prompt, rejected),
    };
    Outcome::Kept { example, truncated }
}

/// The stable id of a pair: SHA-256 of its parsed texts (roles and contents), first 8 bytes.
pub(crate) fn pair_id(pair: &PairText) -> u64 {
    let bytes = serde_json::to_vec(pair).expect("pair texts serialise");
    let digest = Sha256::digest(&bytes);
    u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// Reads `path` (.jsonl, .json or .parquet) and tokenises its pairs with `config`'s schema
/// and limits. The result is cached under `cache_dir` (default
/// `$HOME/.cache/caldpo/tokenized`), keyed by the file's bytes, the tokenizer fingerprint,
/// the schema and limits and this crate's version; a second load reads the cache. Fails on
/// the first bad row unless `skip_bad_rows`, and when no pair is left.
pub fn load_pairs(
    path: &Path,
    config: &DataConfig,
    tokenizer: &PairTokenizer,
    cache_dir: Option<&Path>,
) -> Result<PairDataset> {
    config.validate()?;
    FileKind::of(path)?;
    let cache_file = cache::entry(path, config, tokenizer, cache_dir)?;
    if let Some(file) = &cache_file {
        if let Some(mut dataset) = cache::read(file) {
            dataset.report.path = path.to_path_buf();
            return Ok(dataset);
        }
    }
    let dataset = load_uncached(path, config, tokenizer)?;
    if let Some(file) = &cache_file {
        // A cache that cannot be written only costs the next start its speed.
        let _ = cache::write(file, &dataset);
    }
    Ok(dataset)
}

fn load_uncached(
    path: &Path,
    config: &DataConfig,
    tokenizer: &PairTokenizer,
) -> Result<PairDataset> {
    let limits =
        Limits { max_length: config.max_length, max_prompt_length: config.max_prompt_length };
    let mut loader = Loader {
        schema: Schema::new(config.format, &config.columns, !tokenizer.has_template()),
        resolved: false,
        skip_bad_rows: config.skip_bad_rows,
        tokenizer,
        limits,
        chunk: Vec::with_capacity(CHUNK_ROWS),
        examples: Vec::new(),
        report: LoadReport { path: path.to_path_buf(), ..LoadReport::default() },
    };
    for_each_row(path, &mut |location, row| loader.accept(location, row))?;
    loader.flush()?;
    let Loader { examples, mut report, schema, .. } = loader;
    report.kept = examples.len();
    report.format = schema.format();
    if examples.is_empty() {
        return Err(Error::EmptyDataset { path: path.to_path_buf(), summary: report.summary() });
    }
    Ok(PairDataset { examples, report })
}

struct Loader<'a> {
    schema: Schema,
    resolved: bool,
    skip_bad_rows: bool,
    tokenizer: &'a PairTokenizer,
    limits: Limits,
    chunk: Vec<(RowLocation, PairText)>,
    examples: Vec<PairExample>,
    report: LoadReport,
}

impl Loader<'_> {
    fn accept(
        &mut self,
        location: RowLocation,
        row: std::result::Result<serde_json::Map<String, serde_json::Value>, RowProblem>,
    ) -> Result<()> {
        self.report.rows_read += 1;
        let parsed = row.and_then(|row| {
            if !self.resolved {
                self.schema.resolve(&row)?;
                self.resolved = true;
            }
            self.schema.parse(row)
        });
        match parsed {
            Ok(pair) => self.chunk.push((location, pair)),
            Err(problem) => self.bad_row(location, problem)?,
        }
        if self.chunk.len() >= CHUNK_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn bad_row(&mut self, location: RowLocation, problem: RowProblem) -> Result<()> {
        if !self.skip_bad_rows {
            return Err(Error::Row { location, problem });
        }
        *self.report.bad_rows.entry(problem.kind().to_string()).or_default() += 1;
        Ok(())
    }

    /// Tokenises the pending rows on all cores, keeping file order.
    fn flush(&mut self) -> Result<()> {
        let (tokenizer, limits) = (self.tokenizer, self.limits);
        let outcomes: Vec<_> = std::mem::take(&mut self.chunk)
            .into_par_iter()
            .map(|(location, pair)| {
                let id = pair_id(&pair);
                let outcome =
                    tokenizer.encode_pair(&pair).map(|ids| truncate_pair(id, ids, limits));
                (location, outcome)
            })
            .collect();
        for (location, outcome) in outcomes {
            match outcome {
                Ok(Outcome::Kept { example, truncated }) => {
                    self.report.truncated += usize::from(truncated);
                    self.examples.push(example);
                }
                Ok(Outcome::Dropped(reason)) => {
                    *self.report.dropped.entry(reason.to_string()).or_default() += 1;
                }
                Err(problem) => self.bad_row(location, problem)?,
            }
        }
        Ok(())
    }
}

/// Deterministic held-out split: each pair is ranked by a hash of its id and `seed`, and the
/// `round(fraction * n)` lowest-ranked pairs (at least one when `fraction > 0`) go to eval.
/// Returns (train, eval); both keep file order and a copy of the report with `kept` set to
/// their size (`rows_read`, `dropped` and `bad_rows` describe the whole file). Fails when
/// `fraction` is outside [0, 1) or the split would leave the training set empty.
pub fn split_eval(
    data: PairDataset,
    fraction: f64,
    seed: u64,
) -> Result<(PairDataset, PairDataset)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::Config(format!("eval_fraction must be in [0, 1), got {fraction}")));
    }
    let n = data.examples.len();
    let wanted = (fraction * n as f64).round() as usize;
    let n_eval = if fraction > 0.0 { wanted.max(1) } else { 0 };
    if n_eval >= n && n_eval > 0 {
        return Err(Error::Config(format!(
            "eval_fraction {fraction} of {n} pairs leaves no training pair"
        )));
    }
    let mut ranked: Vec<(u64, usize)> = data
        .examples
        .iter()
        .enumerate()
        .map(|(index, example)| (split_rank(example.id, seed), index))
        .collect();
    ranked.sort_unstable();
    let mut in_eval = vec![false; n];
    for &(_, index) in &ranked[..n_eval] {
        in_eval[index] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (example, held_out) in data.examples.into_iter().zip(in_eval) {
        if held_out {
            eval.push(example);
        } else {
            train.push(example);
        }
    }
    let subset = |examples: Vec<PairExample>| {
        let report = LoadReport { kept: examples.len(), ..data.report.clone() };
        PairDataset { examples, report }
    };
    Ok((subset(train), subset(eval)))
}

fn split_rank(id: u64, seed: u64) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(b"caldpo-eval-split\0");
    hasher.update(id.to_le_bytes());
    hasher.update(seed.to_le_bytes());
    u64::from_be_bytes(hasher.finalize()[..8].try_into().expect("32-byte digest"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_length: 8, max_prompt_length: 4 };

    fn ids(prompt: &[i64], chosen: &[i64], rejected: &[i64]) -> PairIds {
        PairIds { prompt: prompt.to_vec(), chosen: chosen.to_vec(), rejected: rejected.to_vec() }
    }

    fn kept(outcome: Outcome) -> (PairExample, bool) {
        match outcome {
            Outcome::Kept { example, truncated } => (example, truncated),
            Outcome::Dropped(reason) => panic!("dropped: {reason}"),
        }
    }

    #[test]
    fn short_pair_is_untouched_and_labels_cover_the_response() {
        let (example, truncated) =
            kept(truncate_pair(7, ids(&[1, 2], &[3, 9], &[4, 5, 9]), LIMITS));
        assert!(!truncated);
        assert_eq!(example.prompt_len, 2);
        assert_eq!(example.chosen.input_ids, [1, 2, 3, 9]);
        assert_eq!(example.chosen.labels, [-100, -100, 3, 9]);
        assert_eq!(example.rejected.input_ids, [1, 2, 4, 5, 9]);
        assert_eq!(example.rejected.labels, [-100, -100, 4, 5, 9]);
        assert_eq!(example.len(), 5);
    }

    #[test]
    fn long_prompt_keeps_its_end_and_long_response_its_start() {
        // Prompt 1..=6 keeps its last 4 tokens [3, 4, 5, 6]; 8 - 4 = 4 response tokens remain.
        let outcome =
            truncate_pair(0, ids(&[1, 2, 3, 4, 5, 6], &[10, 9], &[20, 21, 22, 23, 24, 9]), LIMITS);
        let (example, truncated) = kept(outcome);
        assert!(truncated);
        assert_eq!(example.prompt_len, 4);
        assert_eq!(example.chosen.input_ids, [3, 4, 5, 6, 10, 9]);
        assert_eq!(example.rejected.input_ids, [3, 4, 5, 6, 20, 21, 22, 23]);
        assert_eq!(example.rejected.labels, [-100, -100, -100, -100, 20, 21, 22, 23]);
    }

    #[test]
    fn empty_and_identical_pairs_are_dropped() {
        let drop = |o: Outcome| match o {
            Outcome::Dropped(reason) => reason,
            Outcome::Kept { .. } => panic!("kept"),
        };
        assert_eq!(drop(truncate_pair(0, ids(&[1], &[], &[4, 9]), LIMITS)), DROP_EMPTY_RESPONSE);
        assert_eq!(drop(truncate_pair(0, ids(&[], &[3, 9], &[4, 9]), LIMITS)), DROP_EMPTY_PROMPT);
        assert_eq!(drop(truncate_pair(0, ids(&[1], &[3, 9], &[3, 9]), LIMITS)), DROP_IDENTICAL);
        // Identical only after truncation: room is 8 - 4 = 4 tokens, both start 10 11 12 13.
        let outcome = truncate_pair(
            0,
            ids(&[1, 2, 3, 4], &[10, 11, 12, 13, 14], &[10, 11, 12, 13, 15]),
            LIMITS,
        );
        assert_eq!(drop(outcome), DROP_IDENTICAL);
    }

    fn dataset(n: usize) -> PairDataset {
        let examples = (0..n as u64)
            .map(|id| {
                let sequence = TokenizedSequence::new(&[1], &[2]);
                let rejected = TokenizedSequence::new(&[1], &[3]);
                PairExample { id, prompt_len: 1, chosen: sequence, rejected }
            })
            .collect();
        PairDataset { examples, report: LoadReport { kept: n, ..LoadReport::default() } }
    }

    #[test]
    fn eval_split_is_deterministic_disjoint_and_sized() {
        let (train, eval) = split_eval(dataset(100), 0.1, 3).unwrap();
        assert_eq!((train.examples.len(), eval.examples.len()), (90, 10));
        assert_eq!((train.report.kept, eval.report.kept), (90, 10));
        let (train_again, eval_again) = split_eval(dataset(100), 0.1, 3).unwrap();
        assert_eq!(eval.examples, eval_again.examples);
        assert_eq!(train.examples, train_again.examples);
        let (_, other_seed) = split_eval(dataset(100), 0.1, 4).unwrap();
        assert_ne!(eval.examples, other_seed.examples);
        let mut ids: Vec<u64> = train.examples.iter().chain(&eval.examples).map(|e| e.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..100).collect::<Vec<_>>());
        // A tiny fraction still holds out one pair; none at all with 0.
        assert_eq!(split_eval(dataset(5), 0.01, 0).unwrap().1.examples.len(), 1);
        assert_eq!(split_eval(dataset(5), 0.0, 0).unwrap().1.examples.len(), 0);
        assert!(split_eval(dataset(1), 0.5, 0).is_err());
    }
}
