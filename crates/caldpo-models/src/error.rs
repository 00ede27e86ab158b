//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while loading, importing, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },

    /// config.json lacks a field or holds a value caldpo cannot use.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config.json involved.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },

    /// config.json names an architecture caldpo does not implement.
    #[error("unsupported model_type `{model_type}` (supported: {})", supported.join(", "))]
    UnsupportedModelType {
        /// The `model_type` found.
        model_type: String,
        /// The `model_type` values caldpo implements.
        supported: Vec<&'static str>,
    },

    /// A safetensors file is malformed or holds a dtype caldpo cannot read.
    #[error("{}: {message}", path.display())]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The checkpoint lacks a tensor the architecture needs.
    #[error("checkpoint in {} has no tensor `{name}`", dir.display())]
    MissingTensor {
        /// The HF name of the tensor.
        name: String,
        /// The model folder.
        dir: PathBuf,
    },

    /// The checkpoint holds tensors the architecture does not use.
    #[error("checkpoint in {} has unexpected tensors: {}", dir.display(), names.join(", "))]
    UnexpectedTensors {
        /// The HF names of the unused tensors (the first few).
        names: Vec<String>,
        /// The model folder.
        dir: PathBuf,
    },

    /// A tensor's shape disagrees with config.json.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        /// The HF name of the tensor.
        name: String,
        /// The shape config.json implies.
        expected: Vec<i64>,
        /// The shape found in the file.
        actual: Vec<i64>,
    },

    /// A GGUF file is malformed or uses a feature the importer does not support.
    #[error("{}: {message}", path.display())]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A GGUF tensor is stored in a quantisation the importer cannot expand.
    #[error("unsupported ggml type {ggml_type} ({type_name}) for tensor `{tensor}`; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1")]
    UnsupportedGgmlType {
        /// The GGUF tensor name.
        tensor: String,
        /// The numeric ggml type.
        ggml_type: u32,
        /// The ggml name of the type, when known.
        type_name: &'static str,
    },

    /// The tokenizer could not be built or written.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An argument is out of range (a generation option, an input shape, a dtype).
    #[error("{0}")]
    InvalidArgument(String),

    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the path to an I/O error.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}
