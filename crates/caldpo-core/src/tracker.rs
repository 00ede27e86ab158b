//! Device-side accumulation of training metrics.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::{ChosenRejected, LossOutput, ResolvedLoss, SequenceLogps};

/// Sums per-pair metrics on the device across micro-batches and log steps.
///
/// All sums live in one f64 tensor: one entry per metric name, then the pair count. Summing
/// that tensor across ranks (an all-reduce) gives exactly what one process that saw every
/// pair would hold, and reading it is one device-to-host copy.
#[derive(Debug)]
pub struct RewardTracker {
    names: Vec<&'static str>,
    uses_mean_logps: bool,
    /// `[names.len() + 1]` f64: the sum of each metric over pairs, then the pair count.
    sums: Tensor,
}

/// Means over the pairs seen, and how many there were; read with one host sync.
#[derive(Clone, Debug, PartialEq)]
pub struct TrackerSnapshot {
    /// Number of pairs accumulated.
    pub pairs: f64,
    /// Each metric's mean over those pairs (empty when there were none).
    pub means: BTreeMap<String, f64>,
}

impl RewardTracker {
    /// An empty tracker for the metrics of `loss`, keeping its sums on `device`.
    pub fn new(loss: &ResolvedLoss, device: Device) -> Self {
        let names = loss.metric_names();
        let sums = Tensor::zeros([names.len() as i64 + 1], (Kind::Double, device));
        Self { names, uses_mean_logps: loss.loss.uses_mean_logps(), sums }
    }

    /// The metric names, in the order of [`RewardTracker::sums`].
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Adds one micro-batch: the loss output and the policy log-probs it came from.
    ///
    /// Runs on the device and never syncs with the host.
    ///
    /// # Panics
    ///
    /// When `output` and `policy` are not from the same batch, or `output` came from a loss
    /// with other components than the tracker's.
    pub fn update(&mut self, output: &LossOutput, policy: &ChosenRejected<SequenceLogps>) {
        let _no_grad = tch::no_grad_guard();
        let rows = self.per_pair_rows(output, policy);
        let per_pair = Tensor::stack(&rows, 0);
        let batch_sums = per_pair.sum_dim_intlist(1, false, Kind::Double);
        self.sums += batch_sums.to_device(self.sums.device());
    }

    /// The metric sums then the pair count, `[names + 1]` f64, for an all-reduce (sum)
    /// across ranks.
    pub fn sums(&self) -> &Tensor {
        &self.sums
    }

    /// Mutable access to the sums, for an in-place all-reduce.
    pub fn sums_mut(&mut self) -> &mut Tensor {
        &mut self.sums
    }

    /// The mean of each metric over the pairs seen since the last reset; empty when no pair
    /// was seen. One host sync.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        self.snapshot().means
    }

    /// The means and the pair count together, with one host sync.
    pub fn snapshot(&self) -> TrackerSnapshot {
        // The one deliberate host sync of a log step.
        let host = self.sums.to_device(Device::Cpu);
        let values = Vec::<f64>::try_from(&host).expect("a 1-D f64 tensor converts to Vec<f64>");
        let (pairs, sums) = values.split_last().expect("the pair count is always present");
        let pairs = *pairs;
        let means = if pairs > 0.0 {
            self.names.iter().zip(sums).map(|(name, sum)| (name.to_string(), sum / pairs)).collect()
        } else {
            BTreeMap::new()
        };
        TrackerSnapshot { pairs, means }
    }

    /// Number of pairs accumulated; syncs with the host.
    pub fn pair_count(&self) -> f64 {
        self.snapshot().pairs
    }

    /// Forgets everything accumulated.
    pub fn reset(&mut self) {
        let _ = self.sums.zero_();
    }

    /// One f64 `[batch]` row per metric name, then a row of ones that sums to the pair count.
    fn per_pair_rows(
        &self,
        output: &LossOutput,
        policy: &ChosenRejected<SequenceLogps>,
    ) -> Vec<Tensor> {
        let logps = policy.as_ref().map(|logps| {
            if self.uses_mean_logps {
                logps.mean()
            } else {
                logps.sum.shallow_clone()
            }
        });
        let rewards = &output.rewards;
        let mut rows = vec![
            output.losses.detach(),
            rewards.chosen.shallow_clone(),
            rewards.rejected.shallow_clone(),
            &rewards.chosen - &rewards.rejected,
            rewards.chosen.gt_tensor(&rewards.rejected),
            logps.chosen,
            logps.rejected,
            policy.chosen.mean_logit.shallow_clone(),
            policy.rejected.mean_logit.shallow_clone(),
        ];
        let component_names = &self.names[rows.len()..];
        let output_names: Vec<_> = output.components.iter().map(|(name, _)| *name).collect();
        assert_eq!(component_names, output_names, "loss output from another loss");
        rows.extend(output.components.iter().map(|(_, values)| values.shallow_clone()));
        rows.push(output.losses.ones_like());

        let device = output.losses.device();
        rows.into_iter().map(|row| row.to_device(device).to_kind(Kind::Double)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LossConfig, LossKind};

    fn logps(sums: &[f64], counts: &[f64], mean_logits: &[f64]) -> SequenceLogps {
        SequenceLogps {
            sum: Tensor::from_slice(sums).to_kind(Kind::Float),
            token_count: Tensor::from_slice(counts).to_kind(Kind::Float),
            mean_logit: Tensor::from_slice(mean_logits).to_kind(Kind::Float),
        }
    }

    struct Batch {
        policy: ChosenRejected<SequenceLogps>,
        reference: ChosenRejected<SequenceLogps>,
    }

    /// Four pairs; rows `range` of them.
    fn batch(range: std::ops::Range<usize>) -> Batch {
        let policy_chosen = [-10.0, -20.0, -5.0, -8.0];
        let policy_rejected = [-12.0, -18.0, -6.0, -9.0];
        let reference_chosen = [-11.0, -19.0, -5.0, -8.5];
        let reference_rejected = [-11.0, -19.0, -6.0, -9.0];
        let counts = [4.0, 5.0, 2.0, 3.0];
        let chosen_logits = [0.5, -1.0, 2.0, 0.25];
        let rejected_logits = [1.5, 0.0, -2.0, 0.75];
        let zeros = [0.0; 4];
        let r = range;
        Batch {
            policy: ChosenRejected::new(
                logps(&policy_chosen[r.clone()], &counts[r.clone()], &chosen_logits[r.clone()]),
                logps(&policy_rejected[r.clone()], &counts[r.clone()], &rejected_logits[r.clone()]),
            ),
            reference: ChosenRejected::new(
                logps(&reference_chosen[r.clone()], &counts[r.clone()], &zeros[r.clone()]),
                logps(&reference_rejected[r.clone()], &counts[r.clone()], &zeros[r]),
            ),
        }
    }

    fn track(loss: &ResolvedLoss, tracker: &mut RewardTracker, batch: &Batch) {
        let output = loss.compute(&batch.policy, Some(&batch.reference)).unwrap();
        tracker.update(&output, &batch.policy);
    }

    #[test]
    fn hand_computed_summary() {
        // dpo, beta 0.1. Log-ratios: chosen [1, -1, 0, 0.5], rejected [-1, 1, 0, 0].
        // Rewards chosen [0.1, -0.1, 0, 0.05], rejected [-0.1, 0.1, 0, 0]: means 0.0125
        // and 0; margins [0.2, -0.2, 0, 0.05] mean 0.0125; accuracies: strictly greater in
        // pairs 0 and 3 only (pair 2 ties), so 2/4 = 0.5.
        // logps (sums): chosen mean -43/4 = -10.75, rejected -45/4 = -11.25.
        // logits: chosen (0.5 - 1 + 2 + 0.25)/4 = 0.4375, rejected (1.5 + 0 - 2 + 0.75)/4
        // = 0.0625. loss: mean of ln(1 + e^(-0.1 * delta)) over delta [2, -2, 0, 0.5].
        let loss = LossConfig::of_kind(LossKind::Dpo).resolve().unwrap();
        let mut tracker = RewardTracker::new(&loss, Device::Cpu);
        track(&loss, &mut tracker, &batch(0..4));
        let summary = tracker.summary();

        let dpo = |delta: f64| (1.0 + (-0.1 * delta).exp()).ln();
        let expected = [
            ("loss", (dpo(2.0) + dpo(-2.0) + dpo(0.0) + dpo(0.5)) / 4.0),
            ("rewards/chosen", 0.0125),
            ("rewards/rejected", 0.0),
            ("rewards/margins", 0.0125),
            ("rewards/accuracies", 0.5),
            ("logps/chosen", -10.75),
            ("logps/rejected", -11.25),
            ("logits/chosen", 0.4375),
            ("logits/rejected", 0.0625),
        ];
        assert_eq!(summary.len(), expected.len());
        for (name, value) in expected {
            assert!((summary[name] - value).abs() < 1e-6, "{name}: {} vs {value}", summary[name]);
        }
        assert_eq!(tracker.pair_count(), 4.0);
    }

    #[test]
    fn micro_batches_and_ranks_sum_to_the_combined_batch() {
        let config = LossConfig { sft_weight: Some(0.2), ..LossConfig::of_kind(LossKind::CalDpo) };
        let loss = config.resolve().unwrap();
        let mut whole = RewardTracker::new(&loss, Device::Cpu);
        track(&loss, &mut whole, &batch(0..4));

        let mut accumulated = RewardTracker::new(&loss, Device::Cpu);
        track(&loss, &mut accumulated, &batch(0..1));
        track(&loss, &mut accumulated, &batch(1..4));

        // Two ranks, each with half the pairs, then a sum all-reduce.
        let mut rank0 = RewardTracker::new(&loss, Device::Cpu);
        let mut rank1 = RewardTracker::new(&loss, Device::Cpu);
        track(&loss, &mut rank0, &batch(0..2));
        track(&loss, &mut rank1, &batch(2..4));
        let reduced = rank0.sums() + rank1.sums();
        rank0.sums_mut().copy_(&reduced);

        let whole_sums = Vec::<f64>::try_from(whole.sums()).unwrap();
        for other in [&accumulated, &rank0] {
            let sums = Vec::<f64>::try_from(other.sums()).unwrap();
            for (a, b) in sums.iter().zip(&whole_sums) {
                assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()), "{sums:?} vs {whole_sums:?}");
            }
        }
        assert_eq!(whole.names(), loss.metric_names().as_slice());
        assert_eq!(whole_sums.len(), loss.metric_names().len() + 1);
        assert_eq!(whole_sums.last(), Some(&4.0));
        let summary = whole.summary();
        assert!(summary.contains_key("loss/calibration") && summary.contains_key("loss/sft"));
    }

    #[test]
    fn accuracies_count_only_strict_wins() {
        // Policy = reference: every reward is 0, no pair wins.
        let loss = LossConfig::of_kind(LossKind::Dpo).resolve().unwrap();
        let mut tracker = RewardTracker::new(&loss, Device::Cpu);
        let equal = batch(0..4);
        let output = loss.compute(&equal.policy, Some(&equal.policy)).unwrap();
        tracker.update(&output, &equal.policy);
        assert_eq!(tracker.summary()["rewards/accuracies"], 0.0);
    }

    #[test]
    fn mean_logps_for_ipo_and_reset() {
        // ipo averages: chosen means [-2.5, -4, -2.5, -8/3], mean over pairs
        // (-2.5 - 4 - 2.5 - 8/3) / 4 = -35/12.
        let loss = LossConfig::of_kind(LossKind::Ipo).resolve().unwrap();
        let mut tracker = RewardTracker::new(&loss, Device::Cpu);
        track(&loss, &mut tracker, &batch(0..4));
        let logps = tracker.summary()["logps/chosen"];
        assert!((logps + 35.0 / 12.0).abs() < 1e-6, "{logps}");

        tracker.reset();
        assert_eq!(tracker.pair_count(), 0.0);
        assert!(tracker.summary().is_empty());
    }
}
