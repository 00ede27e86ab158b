//! Length-grouped, seeded, resumable order of optimiser steps, and sharding of one step
//! across ranks and micro-batches.

/// Mega-batches span this many optimiser steps: long enough that sorting inside them groups
/// similar lengths, short enough that the order stays random across the epoch (the choice of
/// Hugging Face's `LengthGroupedSampler`).
const STEPS_PER_MEGA_BATCH: usize = 50;

/// Yields each epoch as a list of optimiser steps, each a group of `pairs_per_step` dataset
/// indices (= batch_size x grad_accum x world_size; the last group of an epoch may be
/// smaller). Every pair appears exactly once per epoch.
///
/// Order: the indices are shuffled with (seed, epoch); cut into mega-batches of
/// 50 x `pairs_per_step`; each mega-batch is sorted by length, longest first, and cut into
/// step groups; the full groups are shuffled, then the group holding the longest pair is
/// moved to the front (an out-of-memory error shows at the first step, not hours in) and a
/// short final group stays last. The order depends only on the lengths, `pairs_per_step`,
/// the seed and the epoch, so training resumes from (epoch, step index) by recomputing
/// `epoch(e)` and skipping the first steps.
#[derive(Debug, Clone)]
pub struct PairSampler {
    lengths: Vec<usize>,
    pairs_per_step: usize,
    seed: u64,
}

impl PairSampler {
    /// A sampler over pairs of these lengths ([`crate::PairExample::len`]).
    ///
    /// # Panics
    /// When `pairs_per_step` is 0.
    pub fn new(lengths: Vec<usize>, pairs_per_step: usize, seed: u64) -> Self {
        assert!(pairs_per_step > 0, "pairs_per_step must be at least 1");
        Self { lengths, pairs_per_step, seed }
    }

    /// Optimiser steps per epoch: ceil(pairs / pairs_per_step).
    pub fn steps_per_epoch(&self) -> usize {
        self.lengths.len().div_ceil(self.pairs_per_step)
    }

    /// The step groups of one epoch, in order.
    pub fn epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut rng =
            SplitMix64::new(self.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        rng.shuffle(&mut order);
        let mut groups: Vec<Vec<usize>> = Vec::with_capacity(self.steps_per_epoch());
        for mega_batch in order.chunks_mut(STEPS_PER_MEGA_BATCH * self.pairs_per_step) {
            // Stable sort: equal lengths keep their shuffled order.
            mega_batch.sort_by_key(|&index| std::cmp::Reverse(self.lengths[index]));
            groups.extend(mega_batch.chunks(self.pairs_per_step).map(<[usize]>::to_vec));
        }
        let short_tail = match groups.last() {
            Some(last) if last.len() < self.pairs_per_step => groups.pop(),
            _ => None,
        };
        rng.shuffle(&mut groups);
        self.longest_first(&mut groups);
        groups.extend(short_tail);
        groups
    }

    fn longest_first(&self, groups: &mut [Vec<usize>]) {
        let longest = groups
            .iter()
            .enumerate()
            .max_by_key(|(at, group)| {
                let max = group.iter().map(|&index| self.lengths[index]).max().unwrap_or(0);
                (max, std::cmp::Reverse(*at))
            })
            .map(|(at, _)| at);
        if let Some(at) = longest {
            groups.swap(0, at);
        }
    }
}

/// This rank's micro-batches of one optimiser step. The step is split into `world_size`
/// contiguous shares whose sizes differ by at most one (equal when divisible; the first
/// ranks take the extra pairs), and this rank's share is cut into micro-batches of
/// `batch_size` pairs with a smaller last one. A rank with no pairs in a short last step gets
/// an empty list. Because shares and micro-batches are contiguous slices of the step, any
/// split of the same step (1 rank x batch 4, 1 rank x batch 2 x accumulation 2, 2 ranks x
/// batch 2) covers the same pairs.
///
/// # Panics
/// When `world_size` or `batch_size` is 0, or `rank >= world_size`.
pub fn shard_step(
    step: &[usize],
    rank: usize,
    world_size: usize,
    batch_size: usize,
) -> Vec<Vec<usize>> {
    assert!(world_size > 0 && rank < world_size, "rank {rank} outside world of {world_size}");
    assert!(batch_size > 0, "batch_size must be at least 1");
    let base = step.len() / world_size;
    let extra = step.len() % world_size;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    step[start..start + len].chunks(batch_size).map(<[usize]>::to_vec).collect()
}

/// SplitMix64 (Steele, Lea and Flood 2014): a small, fast generator whose output is fixed by
/// its seed on every platform, which is all a reproducible data order needs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..bound (Lemire's multiply-shift; the bias is below 2^-32 for the
    /// bounds of a dataset).
    fn below(&mut self, bound: usize) -> usize {
        ((u128::from(self.next_u64()) * bound as u128) >> 64) as usize
    }

    /// Fisher-Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of the reference C implementation (Vigna's splitmix64.c) seeded
        // with 0: e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
    }

    fn lengths(n: usize) -> Vec<usize> {
        (0..n).map(|i| (i * 37) % 101 + 1).collect()
    }

    #[test]
    fn every_pair_once_per_epoch_and_short_group_last() {
        let sampler = PairSampler::new(lengths(1003), 8, 5);
        assert_eq!(sampler.steps_per_epoch(), 126);
        for epoch in 0..3 {
            let steps = sampler.epoch(epoch);
            assert_eq!(steps.len(), 126);
            assert!(steps[..125].iter().all(|s| s.len() == 8));
            assert_eq!(steps[125].len(), 1003 - 125 * 8);
            let mut seen: Vec<usize> = steps.concat();
            seen.sort_unstable();
            assert_eq!(seen, (0..1003).collect::<Vec<_>>());
        }
    }

    #[test]
    fn order_is_deterministic_and_changes_with_epoch_and_seed() {
        let a = PairSampler::new(lengths(500), 4, 1);
        assert_eq!(a.epoch(2), a.clone().epoch(2));
        assert_ne!(a.epoch(0), a.epoch(1));
        assert_ne!(a.epoch(0), PairSampler::new(lengths(500), 4, 2).epoch(0));
    }

    #[test]
    fn longest_pair_comes_first_and_grouping_cuts_padding() {
        let lengths = lengths(2000);
        let sampler = PairSampler::new(lengths.clone(), 8, 0);
        let steps = sampler.epoch(0);
        let max = *lengths.iter().max().unwrap();
        assert!(steps[0].iter().any(|&i| lengths[i] == max));
        // Padding = sum over groups of (group max * size - sum of lengths).
        let padding = |groups: &[Vec<usize>]| -> usize {
            groups
                .iter()
                .map(|g| {
                    let top = g.iter().map(|&i| lengths[i]).max().unwrap();
                    g.iter().map(|&i| top - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let sequential: Vec<Vec<usize>> =
            (0..2000).collect::<Vec<_>>().chunks(8).map(<[usize]>::to_vec).collect();
        // Lengths cycle through 1..=101 in a scrambled order, so consecutive groups of 8
        // pad heavily; sorted mega-batches of 400 pairs pad only between neighbours.
        assert!(padding(&steps) * 10 < padding(&sequential));
    }

    #[test]
    fn empty_dataset_has_no_steps() {
        let sampler = PairSampler::new(Vec::new(), 4, 0);
        assert_eq!(sampler.steps_per_epoch(), 0);
        assert!(sampler.epoch(0).is_empty());
    }

    #[test]
    fn shards_of_one_step_cover_the_same_pairs() {
        let step = [11, 12, 13, 14];
        let single = shard_step(&step, 0, 1, 4);
        assert_eq!(single, [vec![11, 12, 13, 14]]);
        let accumulated = shard_step(&step, 0, 1, 2);
        assert_eq!(accumulated, [vec![11, 12], vec![13, 14]]);
        let ranks = [shard_step(&step, 0, 2, 2), shard_step(&step, 1, 2, 2)];
        assert_eq!(ranks, [vec![vec![11, 12]], vec![vec![13, 14]]]);
        let as_set = |batches: &[Vec<usize>]| batches.concat().into_iter().collect::<BTreeSet<_>>();
        assert_eq!(as_set(&single), as_set(&accumulated));
        assert_eq!(as_set(&single), as_set(&ranks.concat()));
    }

    #[test]
    fn nine_pairs_over_two_ranks_are_covered_once() {
        // batch 2 x accum 1 x 2 ranks = 4 pairs per step: steps of 4, 4 and 1 pairs.
        let sampler = PairSampler::new(vec![5, 3, 9, 1, 7, 2, 8, 4, 6], 4, 11);
        let steps = sampler.epoch(0);
        assert_eq!(steps.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 1]);
        let mut seen = Vec::new();
        for step in &steps {
            for rank in 0..2 {
                for batch in shard_step(step, rank, 2, 2) {
                    assert!(!batch.is_empty() && batch.len() <= 2);
                    seen.extend(batch);
                }
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..9).collect::<Vec<_>>());
        // The last step has one pair: rank 0 takes it, rank 1 gets nothing and no panic.
        assert_eq!(shard_step(&steps[2], 0, 2, 2).len(), 1);
        assert!(shard_step(&steps[2], 1, 2, 2).is_empty());
    }

    #[test]
    fn uneven_shares_differ_by_at_most_one() {
        let step: Vec<usize> = (0..7).collect();
        let shares: Vec<Vec<Vec<usize>>> = (0..3).map(|r| shard_step(&step, r, 3, 2)).collect();
        assert_eq!(shares[0], [vec![0, 1], vec![2]]);
        assert_eq!(shares[1], [vec![3, 4]]);
        assert_eq!(shares[2], [vec![5, 6]]);
    }
}
