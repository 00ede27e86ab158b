//! Padding pairs into one tensor batch: chosen sequences, then rejected ones.

use tch::Tensor;

use crate::dataset::{PairExample, TokenizedSequence, IGNORE_INDEX};

/// A padded batch of B pairs as CPU i64 tensors of shape [2B, T]: rows 0..B are the chosen
/// sequences and rows B..2B the rejected ones, in the same pair order. T is the longest
/// sequence of the batch; padding is on the right.
#[derive(Debug)]
pub struct PairBatch {
    /// Token ids; padding positions hold the pad id.
    pub input_ids: Tensor,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// 0..len-1 on each row's real tokens, 0 on padding: a row's positions do not depend on
    /// what it is batched with.
    pub position_ids: Tensor,
    /// Response ids; -100 on prompt and padding positions (unshifted, as in Hugging Face).
    pub labels: Tensor,
    /// The pairs' stable ids, in row order of the chosen half.
    pub pair_ids: Vec<u64>,
    /// B.
    pub num_pairs: usize,
    /// Real (non-padding) tokens over all 2B rows.
    pub num_tokens: usize,
}

/// Pads `examples` into a [`PairBatch`]. An empty slice gives [0, 0] tensors.
pub fn collate(examples: &[&PairExample], pad_token_id: i64) -> PairBatch {
    let rows: Vec<&TokenizedSequence> =
        examples.iter().map(|e| &e.chosen).chain(examples.iter().map(|e| &e.rejected)).collect();
    let width = rows.iter().map(|row| row.len()).max().unwrap_or(0);
    let cells = rows.len() * width;
    let mut input_ids = vec![pad_token_id; cells];
    let mut attention_mask = vec![0i64; cells];
    let mut position_ids = vec![0i64; cells];
    let mut labels = vec![IGNORE_INDEX; cells];
    for (row, sequence) in rows.iter().enumerate() {
        let start = row * width;
        let len = sequence.len();
        input_ids[start..start + len].copy_from_slice(&sequence.input_ids);
        labels[start..start + len].copy_from_slice(&sequence.labels);
        attention_mask[start..start + len].fill(1);
        for (position, slot) in position_ids[start..start + len].iter_mut().enumerate() {
            *slot = position as i64;
        }
    }
    let shape = [rows.len() as i64, width as i64];
    let tensor = |values: Vec<i64>| Tensor::from_slice(&values).view(shape);
    PairBatch {
        input_ids: tensor(input_ids),
        attention_mask: tensor(attention_mask),
        position_ids: tensor(position_ids),
        labels: tensor(labels),
        pair_ids: examples.iter().map(|e| e.id).collect(),
        num_pairs: examples.len(),
        num_tokens: rows.iter().map(|row| row.len()).sum(),
    }
}
