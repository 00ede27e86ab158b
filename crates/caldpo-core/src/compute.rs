//! From sequence log-probs to per-pair losses, rewards and components.

use tch::Tensor;

use crate::{ChosenRejected, Error, Loss, Result, SequenceLogps};

/// The metrics every loss reports, in [`ResolvedLoss::metric_names`] order.
pub const PAIR_METRICS: [&str; 9] = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
];

/// Metric name of the weighted SFT term.
pub const SFT_METRIC: &str = "loss/sft";

/// A validated loss configuration: the loss, the SFT weight, and the configuration keys
/// that the loss type does not read (for the caller to warn about).
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedLoss {
    /// The loss and its hyper-parameters.
    pub loss: Loss,
    /// Weight of the chosen response's mean token NLL added to the loss (0 = none).
    pub sft_weight: f64,
    /// Keys given in `[loss]` that this loss type does not read.
    pub ignored_keys: Vec<&'static str>,
}

/// What [`ResolvedLoss::compute`] returns for a batch of pairs.
#[derive(Debug)]
pub struct LossOutput {
    /// Per-pair total loss `[batch]`, SFT term included; carries gradients.
    pub losses: Tensor,
    /// The loss's own per-pair components `[batch]`, detached, under their metric names.
    pub components: Vec<(&'static str, Tensor)>,
    /// `beta` times the log-ratios the loss uses (SimPO: times the mean policy log-probs),
    /// `[batch]` each, detached.
    pub rewards: ChosenRejected<Tensor>,
}

impl ResolvedLoss {
    /// Per-pair losses, components and rewards.
    ///
    /// `policy` holds the policy's log-probs (with gradients) for the chosen and the rejected
    /// responses, `[batch]` each; `reference` the reference model's, which must be given
    /// for every loss but SimPO (SimPO ignores it). No gradient flows into the reference.
    pub fn compute(
        &self,
        policy: &ChosenRejected<SequenceLogps>,
        reference: Option<&ChosenRejected<SequenceLogps>>,
    ) -> Result<LossOutput> {
        let batch = check_pair("policy log-probs", policy, None)?;
        let implicit = self.implicit_inputs(policy, reference, batch)?;

        let preference_losses = self.loss.per_pair(&implicit);
        let mut components = self.loss.components(&implicit);
        // Out of place: some losses (the hinge's relu) keep their output for the backward pass.
        let losses = if self.sft_weight > 0.0 {
            let sft = -policy.chosen.mean() * self.sft_weight;
            components.push((SFT_METRIC, sft.detach()));
            preference_losses + sft
        } else {
            preference_losses
        };

        let beta = self.loss.beta();
        let rewards = implicit.map(|values| (values * beta).detach());
        Ok(LossOutput { losses, components, rewards })
    }

    /// The log-probs the loss uses for one response set: sums, or means over completion
    /// tokens when [`Loss::uses_mean_logps`].
    pub fn logps(&self, logps: &SequenceLogps) -> Tensor {
        if self.loss.uses_mean_logps() {
            logps.mean()
        } else {
            logps.sum.shallow_clone()
        }
    }

    /// Names of the per-pair components in [`LossOutput::components`], in order.
    pub fn component_names(&self) -> Vec<&'static str> {
        let mut names = self.loss.component_names().to_vec();
        if self.sft_weight > 0.0 {
            names.push(SFT_METRIC);
        }
        names
    }

    /// Every metric a [`RewardTracker`](crate::RewardTracker) reports for this loss, in
    /// order: [`PAIR_METRICS`], then the components.
    pub fn metric_names(&self) -> Vec<&'static str> {
        PAIR_METRICS.into_iter().chain(self.component_names()).collect()
    }

    /// What the loss compares: the log-ratios, or SimPO's mean policy log-probs.
    fn implicit_inputs(
        &self,
        policy: &ChosenRejected<SequenceLogps>,
        reference: Option<&ChosenRejected<SequenceLogps>>,
        batch: i64,
    ) -> Result<ChosenRejected<Tensor>> {
        let policy_logps = policy.as_ref().map(|logps| self.logps(logps));
        if !self.loss.needs_reference() {
            return Ok(policy_logps);
        }
        let reference = reference.ok_or(Error::MissingReference { loss: self.loss.name() })?;
        check_pair("reference log-probs", reference, Some(batch))?;
        let device = policy.chosen.sum.device();
        if reference.chosen.sum.device() != device {
            let actual = reference.chosen.sum.device();
            return Err(Error::Device { what: "reference log-probs", expected: device, actual });
        }

        let reference_logps = reference.as_ref().map(|logps| self.logps(logps).detach());
        Ok(ChosenRejected {
            chosen: policy_logps.chosen - reference_logps.chosen,
            rejected: policy_logps.rejected - reference_logps.rejected,
        })
    }
}

/// Checks both halves of a pair of log-probs (of `batch` pairs when given); returns the
/// number of pairs.
fn check_pair(
    what: &'static str,
    pair: &ChosenRejected<SequenceLogps>,
    batch: Option<i64>,
) -> Result<i64> {
    let batch = pair.chosen.check(what, batch)?;
    pair.rejected.check(what, Some(batch))?;
    let (expected, actual) = (pair.chosen.sum.device(), pair.rejected.sum.device());
    if actual != expected {
        return Err(Error::Device { what, expected, actual });
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::{LossConfig, LossKind};

    /// Sequence log-probs with the given sums and token counts (f64, no mean logit).
    fn logps(sums: &[f64], counts: &[f64]) -> SequenceLogps {
        SequenceLogps {
            sum: Tensor::from_slice(sums),
            token_count: Tensor::from_slice(counts),
            mean_logit: Tensor::zeros([sums.len() as i64], (Kind::Double, Device::Cpu)),
        }
    }

    fn pair_of(chosen: SequenceLogps, rejected: SequenceLogps) -> ChosenRejected<SequenceLogps> {
        ChosenRejected::new(chosen, rejected)
    }

    fn resolved(text: &str) -> ResolvedLoss {
        toml::from_str::<LossConfig>(text).unwrap().resolve().unwrap()
    }

    fn values(xs: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&xs.to_kind(Kind::Double)).unwrap()
    }

    fn assert_values(actual: &Tensor, expected: &[f64]) {
        let actual = values(actual);
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-9 * (1.0 + e.abs()), "{actual:?} vs {expected:?}");
        }
    }

    #[test]
    fn policy_equal_to_reference_gives_the_identity_loss_and_zero_rewards() {
        use std::f64::consts::LN_2;
        // dpo: ln 2; ipo at beta 0.1: 1/(4 * 0.01) = 25; cal_dpo at beta 0.1, lambda 1,
        // s 0.5: ln 2 + ((0.5)^2 + (0.5)^2) / 0.01 = 50.693147; hinge: 1.
        let cases = [
            ("type = 'dpo'", LN_2),
            ("type = 'ipo'", 25.0),
            ("type = 'cal_dpo'", 50.0 + LN_2), // 50.693147
            ("type = 'hinge'", 1.0),
        ];
        let policy =
            pair_of(logps(&[-12.0, -3.5], &[4.0, 7.0]), logps(&[-20.0, -1.0], &[5.0, 1.0]));
        let reference =
            pair_of(logps(&[-12.0, -3.5], &[4.0, 7.0]), logps(&[-20.0, -1.0], &[5.0, 1.0]));
        for (text, expected) in cases {
            let output = resolved(text).compute(&policy, Some(&reference)).unwrap();
            assert_values(&output.losses, &[expected, expected]);
            assert_values(&output.rewards.chosen, &[0.0, 0.0]);
            assert_values(&output.rewards.rejected, &[0.0, 0.0]);
        }
    }

    #[test]
    fn ipo_averages_log_probs_over_completion_tokens() {
        // One pair, beta (tau) 0.5, target margin 1. Chosen: 4 tokens, each +0.5 above the
        // reference (policy -2 = 4 * -0.5, reference -4 = 4 * -1). Rejected: 2 tokens, each
        // -0.25 (policy -2.5 = 2 * -1.25, reference -2 = 2 * -1).
        // Averaged: delta = 0.5 - (-0.25) = 0.75, loss (0.75 - 1)^2 = 0.0625.
        // Summed: delta = 2 - (-0.5) = 2.5, loss (2.5 - 1)^2 = 2.25.
        let policy = pair_of(logps(&[-2.0], &[4.0]), logps(&[-2.5], &[2.0]));
        let reference = pair_of(logps(&[-4.0], &[4.0]), logps(&[-2.0], &[2.0]));
        let averaged = resolved("type = 'ipo'\nbeta = 0.5").compute(&policy, Some(&reference));
        let averaged = averaged.unwrap();
        assert_values(&averaged.losses, &[0.0625]);
        // Rewards use the same averaged log-ratios: 0.5 * 0.5 and 0.5 * -0.25.
        assert_values(&averaged.rewards.chosen, &[0.25]);
        assert_values(&averaged.rewards.rejected, &[-0.125]);

        let summed = resolved("type = 'ipo'\nbeta = 0.5\nipo_average = false");
        let summed = summed.compute(&policy, Some(&reference)).unwrap();
        assert_values(&summed.losses, &[2.25]);
        assert_values(&summed.rewards.chosen, &[1.0]);
    }

    #[test]
    fn rewards_are_beta_times_summed_log_ratios() {
        // dpo beta 0.1: chosen ratio -10 - (-12) = 2, rejected -30 - (-25) = -5.
        let policy = pair_of(logps(&[-10.0], &[4.0]), logps(&[-30.0], &[6.0]));
        let reference = pair_of(logps(&[-12.0], &[4.0]), logps(&[-25.0], &[6.0]));
        let output = resolved("type = 'dpo'").compute(&policy, Some(&reference)).unwrap();
        assert_values(&output.rewards.chosen, &[0.2]);
        assert_values(&output.rewards.rejected, &[-0.5]);
        // -ln sigma(0.1 * 7) = ln(1 + e^-0.7).
        assert_values(&output.losses, &[(1.0 + (-0.7f64).exp()).ln()]);
        assert!(output.components.is_empty());
        assert!(!output.rewards.chosen.requires_grad());
    }

    #[test]
    fn simpo_needs_no_reference_and_rewards_mean_policy_log_probs() {
        // beta 2, gamma 0.5; means -1 (sum -3 over 3) and -1.5 (sum -6 over 4):
        // 2 * 0.5 - 0.5 = 0.5, loss ln(1 + e^-0.5); rewards 2 * mean: -2 and -3.
        let policy = pair_of(logps(&[-3.0], &[3.0]), logps(&[-6.0], &[4.0]));
        let output = resolved("type = 'simpo'").compute(&policy, None).unwrap();
        assert_values(&output.losses, &[(1.0 + (-0.5f64).exp()).ln()]);
        assert_values(&output.rewards.chosen, &[-2.0]);
        assert_values(&output.rewards.rejected, &[-3.0]);
    }

    #[test]
    fn cal_dpo_components_add_up_and_are_named() {
        // beta 0.5 (targets +-1), lambda 1: l_w = 1 - 0 = 1, l_l = -3 - (-1) = -2.
        // contrastive -ln sigma(3) = ln(1 + e^-3); calibration (1 - 1)^2 + (-2 + 1)^2 = 1.
        // sft 0.5: the chosen sum 1 over 2 tokens is a mean NLL of -0.5 (a positive
        // log-prob is unrealistic but fine for the arithmetic), so the term is -0.25.
        let policy = pair_of(logps(&[1.0], &[2.0]), logps(&[-3.0], &[1.0]));
        let reference = pair_of(logps(&[0.0], &[2.0]), logps(&[-1.0], &[1.0]));
        let loss = resolved("type = 'cal_dpo'\nbeta = 0.5\nsft_weight = 0.5");
        let output = loss.compute(&policy, Some(&reference)).unwrap();
        let contrastive = (1.0 + (-3.0f64).exp()).ln();
        let names: Vec<_> = output.components.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, loss.component_names());
        let expected = [contrastive, 1.0, 1.0, -2.0, -0.25];
        for ((name, value), expected) in output.components.iter().zip(expected) {
            assert_values(value, &[expected]);
            assert!(!value.requires_grad(), "{name}");
        }
        assert_values(&output.losses, &[contrastive + 1.0 - 0.25]);
        assert_eq!(&loss.metric_names()[..PAIR_METRICS.len()], PAIR_METRICS);
        assert_eq!(loss.metric_names().len(), PAIR_METRICS.len() + 5);
    }

    #[test]
    fn sft_term_is_the_mean_negative_log_likelihood_of_the_chosen_response() {
        // Chosen sum -6 over 3 tokens: NLL 2 per token; weight 0.25 adds 0.5 to hinge's
        // max(0, 1 - 0.1 * 0) = 1.
        let policy = pair_of(logps(&[-6.0], &[3.0]), logps(&[-9.0], &[3.0]));
        let output = resolved("type = 'hinge'\nsft_weight = 0.25").compute(&policy, Some(&policy));
        let output = output.unwrap();
        assert_values(&output.losses, &[1.5]);
        assert_eq!(output.components.len(), 1);
        assert_eq!(output.components[0].0, SFT_METRIC);
        assert_values(&output.components[0].1, &[0.5]);
    }

    /// The total loss of `config` as a function of the four summed log-probs.
    fn total(
        loss: &ResolvedLoss,
        policy_sums: [&Tensor; 2],
        reference_sums: [f64; 2],
        counts: [f64; 2],
    ) -> Tensor {
        let with_counts = |sum: &Tensor, count: f64| SequenceLogps {
            sum: sum.shallow_clone(),
            token_count: Tensor::from_slice(&[count]),
            mean_logit: Tensor::from_slice(&[0.0]),
        };
        let policy =
            pair_of(with_counts(policy_sums[0], counts[0]), with_counts(policy_sums[1], counts[1]));
        let reference = pair_of(
            with_counts(&Tensor::from_slice(&[reference_sums[0]]), counts[0]),
            with_counts(&Tensor::from_slice(&[reference_sums[1]]), counts[1]),
        );
        loss.compute(&policy, Some(&reference)).unwrap().losses.sum(Kind::Double)
    }

    #[test]
    fn gradients_match_finite_differences_for_every_loss() {
        let configs = [
            "type = 'dpo'\nbeta = 0.3\nlabel_smoothing = 0.1",
            "type = 'robust'\nbeta = 0.3\nlabel_smoothing = 0.2",
            "type = 'ipo'\nbeta = 0.4",
            "type = 'ipo'\nbeta = 0.4\nipo_average = false",
            "type = 'hinge'\nbeta = 0.2",
            "type = 'cal_dpo'\nbeta = 0.5\ncal_weight = 0.7\nshift = 0.3",
            "type = 'sppo_hard'\nbeta = 0.5",
            "type = 'nca_pair'\nbeta = 0.6",
            "type = 'simpo'\ngamma = 0.3",
            "type = 'cal_dpo'\nsft_weight = 0.4",
        ];
        let (reference, counts) = ([-7.0, -11.0], [3.0, 5.0]);
        for text in configs {
            let loss = resolved(text);
            let point = [-6.1, -12.3];
            let chosen = Tensor::from_slice(&[point[0]]).set_requires_grad(true);
            let rejected = Tensor::from_slice(&[point[1]]).set_requires_grad(true);
            total(&loss, [&chosen, &rejected], reference, counts).backward();
            let analytic = [chosen.grad().double_value(&[0]), rejected.grad().double_value(&[0])];

            let at = |c: f64, r: f64| {
                let sums = [Tensor::from_slice(&[c]), Tensor::from_slice(&[r])];
                total(&loss, [&sums[0], &sums[1]], reference, counts).double_value(&[])
            };
            let h = 1e-6;
            let numeric = [
                (at(point[0] + h, point[1]) - at(point[0] - h, point[1])) / (2.0 * h),
                (at(point[0], point[1] + h) - at(point[0], point[1] - h)) / (2.0 * h),
            ];
            for (a, n) in analytic.iter().zip(numeric) {
                assert!(a.abs() > 1e-3, "{text}: a vanishing gradient checks nothing");
                assert!(
                    (a - n).abs() < 1e-6 * (1.0 + n.abs()),
                    "{text}: {analytic:?} vs {numeric:?}"
                );
            }
        }
    }

    #[test]
    fn no_gradient_reaches_the_reference() {
        let policy = pair_of(logps(&[-1.0], &[1.0]), logps(&[-2.0], &[1.0]));
        let reference_sum = Tensor::from_slice(&[-1.5]).set_requires_grad(true);
        let reference = pair_of(
            SequenceLogps { sum: reference_sum.shallow_clone(), ..logps(&[0.0], &[1.0]) },
            logps(&[-2.5], &[1.0]),
        );
        let output = resolved("type = 'dpo'").compute(&policy, Some(&reference)).unwrap();
        assert!(!output.losses.requires_grad());
    }

    #[test]
    fn missing_or_mismatched_inputs_are_typed_errors() {
        let policy = pair_of(logps(&[-1.0, -2.0], &[1.0, 1.0]), logps(&[-2.0, -3.0], &[1.0, 1.0]));
        let cal = LossConfig::of_kind(LossKind::CalDpo).resolve().unwrap();
        let error = cal.compute(&policy, None).unwrap_err();
        assert!(matches!(error, Error::MissingReference { loss: "cal_dpo" }), "{error}");

        let short = pair_of(logps(&[-1.0], &[1.0]), logps(&[-2.0], &[1.0]));
        let error = cal.compute(&policy, Some(&short)).unwrap_err();
        assert!(matches!(error, Error::Shape { what: "reference log-probs", .. }), "{error}");
        assert!(error.to_string().contains("[2]") && error.to_string().contains("[1]"));

        let uneven = pair_of(logps(&[-1.0, -2.0], &[1.0, 1.0]), logps(&[-2.0], &[1.0]));
        let error = cal.compute(&uneven, None).unwrap_err();
        assert!(matches!(error, Error::Shape { what: "policy log-probs", .. }), "{error}");

        let integer = SequenceLogps {
            sum: Tensor::from_slice(&[-1i64, -2]),
            ..logps(&[0.0, 0.0], &[1.0, 1.0])
        };
        let error = cal.compute(&pair_of(integer, logps(&[-2.0, -3.0], &[1.0, 1.0])), None);
        assert!(matches!(error.unwrap_err(), Error::Dtype { actual: Kind::Int64, .. }));
    }
}
