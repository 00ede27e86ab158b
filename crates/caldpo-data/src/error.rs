//! The crate's error type: every message names the file, and for a bad row the line, element
//! or row and the field involved.

use std::fmt;
use std::path::PathBuf;

/// Errors of caldpo-data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// One row of a preference file is unusable (and `skip_bad_rows` is off, or the file cannot
    /// be read past it).
    #[error("{location}: {problem}")]
    Row {
        /// Where the row is.
        location: RowLocation,
        /// What is wrong with it.
        problem: RowProblem,
    },
    /// A whole file is unusable: unknown extension, broken Parquet footer, no rows.
    #[error("{}: {message}", path.display())]
    File {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The `[data]` configuration is invalid.
    #[error("invalid [data] config: {0}")]
    Config(String),
    /// The tokenizer files of a model directory are missing or invalid.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The file involved (tokenizer.json, tokenizer_config.json or a .jinja template).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A chat template failed to compile or render outside of any data row.
    #[error("chat template: {0}")]
    Template(String),
    /// The tokenizer failed to encode or decode outside of any data row.
    #[error("tokenizer: {0}")]
    Encode(String),
    /// Nothing is left to train on after parsing and filtering.
    #[error("{}: no usable pairs ({summary})", path.display())]
    EmptyDataset {
        /// The file involved.
        path: PathBuf,
        /// Rows read, drops and bad rows by reason.
        summary: String,
    },
}

/// Result alias of caldpo-data.
pub type Result<T> = std::result::Result<T, Error>;

/// Where a row sits in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLocation {
    /// The file, as given.
    pub path: PathBuf,
    /// The position inside it.
    pub position: RowPosition,
}

/// A row's position inside a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowPosition {
    /// A JSON Lines line, counted from 1 as editors do.
    Line(usize),
    /// A JSON array element, counted from 0 as `datasets` indexes rows.
    Element(usize),
    /// A Parquet row, counted from 0 as `datasets` indexes rows.
    Row(usize),
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match self.position {
            RowPosition::Line(line) => write!(f, "{path}:{line}"),
            RowPosition::Element(index) => write!(f, "{path}: element {index}"),
            RowPosition::Row(index) => write!(f, "{path}: row {index}"),
        }
    }
}

/// What is wrong with one row. [`RowProblem::kind`] is the key under which skipped rows are
/// counted in [`crate::LoadReport::bad_rows`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowProblem {
    /// A required field is absent.
    MissingField {
        /// The field as named in the file (`"question" (mapped to "prompt")` when renamed).
        field: String,
        /// The fields the row does have, as named in the file.
        found: Vec<String>,
    },
    /// A field has the wrong JSON type.
    WrongType {
        /// The field, with the path into it (`chosen[1].content`).
        field: String,
        /// What was expected.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A field has the right type but a value caldpo cannot use (an unknown role, an image
    /// content part, HH transcripts whose prompts differ).
    BadValue {
        /// The field, with the path into it.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The row is not valid JSON (or the file ends inside it).
    InvalidJson(String),
    /// The row is not valid UTF-8.
    InvalidUtf8(String),
    /// The tokenizer failed on this row's text.
    Tokenizer(String),
    /// The chat template failed on this row, or rendered the prompt differently on its own
    /// than at the start of the whole conversation.
    Template(String),
}

impl RowProblem {
    /// A short stable key for counting skipped rows by reason.
    pub fn kind(&self) -> &'static str {
        match self {
            RowProblem::MissingField { .. } => "missing_field",
            RowProblem::WrongType { .. } => "wrong_type",
            RowProblem::BadValue { .. } => "bad_value",
            RowProblem::InvalidJson(_) => "invalid_json",
            RowProblem::InvalidUtf8(_) => "invalid_utf8",
            RowProblem::Tokenizer(_) => "tokenizer",
            RowProblem::Template(_) => "template",
        }
    }
}

impl fmt::Display for RowProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowProblem::MissingField { field, found } => {
                write!(f, "field {field} is missing (found: {})", found.join(", "))
            }
            RowProblem::WrongType { field, expected, found } => {
                write!(f, "field \"{field}\" is {found}, expected {expected}")
            }
            RowProblem::BadValue { field, message } => write!(f, "field \"{field}\": {message}"),
            RowProblem::InvalidJson(message) => write!(f, "invalid JSON: {message}"),
            RowProblem::InvalidUtf8(message) => write!(f, "invalid UTF-8: {message}"),
            RowProblem::Tokenizer(message) => write!(f, "tokenizer: {message}"),
            RowProblem::Template(message) => write!(f, "chat template: {message}"),
        }
    }
}
