//! The crate's error type.

use tch::{Device, Kind};

/// Everything that can go wrong in caldpo-core.
///
/// Shape, dtype and device errors name the input, what was expected and what arrived, so a
/// message is enough to find the caller's mistake without a debugger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor has the wrong number of dimensions or the wrong sizes.
    #[error("{what}: expected shape {expected}, got {actual:?}")]
    Shape {
        /// The input, for example `labels`.
        what: &'static str,
        /// The expected shape in words, for example `[batch, seq_len] = [4, 17]`.
        expected: String,
        /// The shape that arrived.
        actual: Vec<i64>,
    },

    /// A tensor has the wrong element type.
    #[error("{what}: expected dtype {expected}, got {actual:?}")]
    Dtype {
        /// The input, for example `logits`.
        what: &'static str,
        /// The accepted element types in words.
        expected: String,
        /// The element type that arrived.
        actual: Kind,
    },

    /// Two tensors that must live together are on different devices.
    #[error("{what}: expected device {expected:?}, got {actual:?}")]
    Device {
        /// The input on the wrong device.
        what: &'static str,
        /// The device of the tensor it must match.
        expected: Device,
        /// The device it is on.
        actual: Device,
    },

    /// A completion label is not a token id of the vocabulary.
    #[error(
        "labels: completion token ids must lie in [0, {vocab}) (or equal -100 to be ignored), \
         got ids from {min} to {max}"
    )]
    LabelOutOfRange {
        /// The smallest completion label found.
        min: i64,
        /// The largest completion label found.
        max: i64,
        /// The vocabulary size of the logits.
        vocab: i64,
    },

    /// `chunk_tokens` is not a positive number.
    #[error("chunk_tokens: expected at least 1, got {0}")]
    ChunkTokens(i64),

    /// A `[loss]` setting is out of its valid range.
    #[error("loss.{key} = {value}: must be {requirement}")]
    InvalidConfig {
        /// The configuration key.
        key: &'static str,
        /// The value that was given.
        value: f64,
        /// The valid range in words.
        requirement: &'static str,
    },

    /// A loss that compares against a reference model was given no reference log-probs.
    #[error("the {loss} loss needs reference log-probs, but none were given")]
    MissingReference {
        /// The loss type.
        loss: &'static str,
    },

    /// An error raised by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
