//! Preference files to tokenised, padded pair batches.
//!
//! The pipeline: a file (.jsonl, .json or .parquet) is streamed row by row; each row is read
//! with a schema ([`Format`]) into a prompt and two responses; a chat template renders them
//! and the tokenizer turns them into ids ([`PairTokenizer`]); pairs are truncated and filtered
//! ([`load_pairs`]); a seeded, length-grouped sampler orders them into optimiser steps
//! ([`PairSampler`]); [`shard_step`] gives each rank its micro-batches and [`collate`] pads
//! them into [2B, T] tensors, chosen rows first.
#![warn(missing_docs)]

mod batch;
mod cache;
mod config;
mod dataset;
mod error;
mod inspect;
mod reader;
mod sampler;
mod schema;
mod template;
mod tokenize;

pub use batch::{collate, PairBatch};
pub use config::{DataConfig, Format};
pub use dataset::{
    load_pairs, split_eval, LoadReport, PairDataset, PairExample, TokenizedSequence,
    DROP_EMPTY_PROMPT, DROP_EMPTY_RESPONSE, DROP_IDENTICAL, IGNORE_INDEX,
};
pub use error::{Error, Result, RowLocation, RowPosition, RowProblem};
pub use inspect::{inspect, LABELS_BEGIN};
pub use sampler::{shard_step, PairSampler};
pub use tokenize::PairTokenizer;
