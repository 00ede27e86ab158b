//! Padding, sampling and sharding on loaded fixture pairs.

mod common;

use std::collections::BTreeSet;

use caldpo_data::{collate, shard_step, PairExample, PairSampler, IGNORE_INDEX};
use common::{config, data, load, tokenizer};
use tch::Tensor;

fn rows(tensor: &Tensor) -> Vec<Vec<i64>> {
    let (n, width) = tensor.size2().unwrap();
    let flat: Vec<i64> = Vec::try_from(tensor.reshape([-1])).unwrap();
    (0..n as usize).map(|r| flat[r * width as usize..(r + 1) * width as usize].to_vec()).collect()
}

fn pairs() -> Vec<PairExample> {
    load(&data("conversational.jsonl"), &config(4096, 2048), &tokenizer("chatml", "auto")).examples
}

#[test]
fn collate_stacks_chosen_then_rejected_with_right_padding() {
    let pairs = pairs();
    let batch = collate(&[&pairs[0], &pairs[2]], 2);
    let width = pairs[0].len().max(pairs[2].len());
    assert_eq!(batch.input_ids.size(), [4, width as i64]);
    assert_eq!(batch.input_ids.kind(), tch::Kind::Int64);
    assert_eq!(batch.num_pairs, 2);
    assert_eq!(batch.pair_ids, [pairs[0].id, pairs[2].id]);
    let expected = [&pairs[0].chosen, &pairs[2].chosen, &pairs[0].rejected, &pairs[2].rejected];
    assert_eq!(batch.num_tokens, expected.iter().map(|s| s.len()).sum::<usize>());
    let (ids, mask, positions, labels) = (
        rows(&batch.input_ids),
        rows(&batch.attention_mask),
        rows(&batch.position_ids),
        rows(&batch.labels),
    );
    for (row, sequence) in expected.iter().enumerate() {
        let len = sequence.len();
        assert_eq!(ids[row][..len], sequence.input_ids);
        assert_eq!(labels[row][..len], sequence.labels);
        assert!(ids[row][len..].iter().all(|&id| id == 2));
        assert!(labels[row][len..].iter().all(|&l| l == IGNORE_INDEX));
        assert!(
            mask[row][..len].iter().all(|&m| m == 1) && mask[row][len..].iter().all(|&m| m == 0)
        );
        assert_eq!(positions[row][..len], (0..len as i64).collect::<Vec<_>>());
    }
}

#[test]
fn a_pair_batched_alone_or_beside_a_longer_one_has_the_same_rows() {
    let pairs = pairs();
    // Pair 0 is short; pair 3 has a prompt of over a thousand tokens.
    let (short, long) = (&pairs[0], &pairs[3]);
    assert!(long.len() > 10 * short.len());
    let alone = collate(&[short], 2);
    let beside = collate(&[short, long], 2);
    for (tensor_alone, tensor_beside) in [
        (&alone.input_ids, &beside.input_ids),
        (&alone.attention_mask, &beside.attention_mask),
        (&alone.position_ids, &beside.position_ids),
        (&alone.labels, &beside.labels),
    ] {
        let (a, b) = (rows(tensor_alone), rows(tensor_beside));
        // Alone: rows [chosen, rejected]; beside: [chosen short, chosen long, rejected short, ...].
        for (row_alone, row_beside) in [(0, 0), (1, 2)] {
            let width = a[row_alone].len();
            assert_eq!(a[row_alone], b[row_beside][..width]);
        }
    }
    let mask = rows(&beside.attention_mask);
    assert!(mask[0][short.len()..].iter().all(|&m| m == 0));
}

#[test]
fn empty_batch_is_empty() {
    let batch = collate(&[], 0);
    assert_eq!(batch.input_ids.size(), [0, 0]);
    assert_eq!((batch.num_pairs, batch.num_tokens), (0, 0));
}

#[test]
fn sampler_and_shards_agree_across_parallel_layouts() {
    let pairs = pairs();
    let lengths: Vec<usize> = pairs.iter().map(PairExample::len).collect();
    // 4 pairs per step, whether 1 rank x batch 4, 1 rank x batch 2 x accum 2, or 2 ranks x 2.
    let sampler = PairSampler::new(lengths, 4, 7);
    for step in sampler.epoch(0) {
        let one_by_four: BTreeSet<usize> =
            shard_step(&step, 0, 1, 4).concat().into_iter().collect();
        let accumulated: BTreeSet<usize> =
            shard_step(&step, 0, 1, 2).concat().into_iter().collect();
        let two_ranks: BTreeSet<usize> =
            (0..2).flat_map(|rank| shard_step(&step, rank, 2, 2).concat()).collect();
        assert_eq!(one_by_four, accumulated);
        assert_eq!(one_by_four, two_ranks);
        assert_eq!(one_by_four.len(), step.len());
    }
}
