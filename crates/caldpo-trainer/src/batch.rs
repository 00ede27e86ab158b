//! A pair batch on the training device, and the policy's log-probs for it.

use anyhow::Result;
use caldpo_core::{sequence_logps_from_hidden, SequenceLogps};
use caldpo_data::PairBatch;
use caldpo_models::CausalLm;
use tch::{Device, Tensor};

/// A [`PairBatch`] moved to the device: rows [0, B) chosen, [B, 2B) rejected.
pub struct DeviceBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub position_ids: Tensor,
    pub labels: Tensor,
    pub pair_ids: Vec<u64>,
    pub num_pairs: usize,
    pub num_tokens: usize,
    pub device: Device,
}

impl DeviceBatch {
    pub fn new(batch: PairBatch, device: Device) -> Self {
        Self {
            input_ids: batch.input_ids.to_device(device),
            attention_mask: batch.attention_mask.to_device(device),
            position_ids: batch.position_ids.to_device(device),
            labels: batch.labels.to_device(device),
            pair_ids: batch.pair_ids,
            num_pairs: batch.num_pairs,
            num_tokens: batch.num_tokens,
            device,
        }
    }
}

/// Completion log-probs of every row, through the LM head in chunks of `chunk_tokens`
/// completion tokens so that no [batch, seq_len, vocab] tensor is ever built.
pub fn policy_logps(
    model: &CausalLm,
    batch: &DeviceBatch,
    chunk_tokens: i64,
) -> Result<SequenceLogps> {
    let hidden = model.forward_hidden(&batch.input_ids, &batch.attention_mask, &batch.position_ids);
    Ok(sequence_logps_from_hidden(&hidden, &model.lm_head(), &batch.labels, chunk_tokens)?)
}
