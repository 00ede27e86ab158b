//! Pure tensor math of caldpo: sequence log-probabilities, preference losses and a
//! device-side metrics tracker.
//!
//! The pieces fit together as one training step uses them:
//!
//! 1. [`sequence_logps_from_hidden`] (or [`sequence_logps`]) turns the model output of a
//!    padded pair batch `[2 * pairs, seq_len]` into per-sequence log-probs, and
//!    [`SequenceLogps::split_pairs`] separates chosen from rejected rows.
//! 2. [`LossConfig::resolve`] validates the `[loss]` table into a [`ResolvedLoss`], whose
//!    [`ResolvedLoss::compute`] gives per-pair losses, components and rewards.
//! 3. [`RewardTracker::update`] adds them to device-side sums that reach the host once per
//!    log step.
//!
//! This crate does no IO, chooses no device and logs nothing.
//!
//! ```
//! use caldpo_core::{sequence_logps, LossConfig, RewardTracker, IGNORE_INDEX};
//! use tch::{Device, Kind, Tensor};
//!
//! let loss = LossConfig::default().resolve()?; // cal_dpo, beta 0.1
//!
//! // One pair: row 0 is the chosen sequence, row 1 the rejected one; the first two labels
//! // belong to the prompt.
//! let ignore = IGNORE_INDEX;
//! let labels = Tensor::from_slice2(&[[ignore, ignore, 3, 5], [ignore, ignore, 6, 1]]);
//! let logits = Tensor::randn([2, 4, 8], (Kind::Float, Device::Cpu));
//! let policy = sequence_logps(&logits, &labels)?.split_pairs();
//! let reference = tch::no_grad(|| sequence_logps(&logits, &labels))?.split_pairs();
//!
//! let output = loss.compute(&policy, Some(&reference))?;
//! let mut tracker = RewardTracker::new(&loss, Device::Cpu);
//! tracker.update(&output, &policy);
//! let metrics = tracker.summary(); // one host sync
//!
//! // The policy is its own reference: Cal-DPO's starting value, ln 2 + 50.
//! assert!((metrics["loss"] - loss.loss.identity_loss().unwrap()).abs() < 1e-4);
//! assert_eq!(metrics["rewards/margins"], 0.0);
//! # Ok::<(), caldpo_core::Error>(())
//! ```

#![warn(missing_docs)]

mod compute;
mod config;
mod error;
mod logps;
mod loss;
mod pair;
mod tracker;

pub use compute::{LossOutput, ResolvedLoss, PAIR_METRICS, SFT_METRIC};
pub use config::{LossConfig, LossKind};
pub use error::{Error, Result};
pub use logps::{
    sequence_logps, sequence_logps_from_hidden, SequenceLogps, IGNORE_INDEX, LOGITS_CHUNK_ELEMENTS,
};
pub use loss::{cal_dpo, dpo, hinge, ipo, nca_pair, robust, simpo, sppo_hard, CalDpoTerms, Loss};
pub use pair::ChosenRejected;
pub use tracker::{RewardTracker, TrackerSnapshot};
