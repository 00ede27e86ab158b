//! The preference losses, one small function each.
//!
//! Notation: `l_w` and `l_l` are the log-ratios `log pi(y|x) - log pi_ref(y|x)` of the
//! chosen and the rejected response (sums over completion tokens unless a loss says
//! otherwise), `delta = l_w - l_l`, `sigma` the logistic function. Every function takes
//! `[batch]` tensors and returns the per-pair loss `[batch]`; the mean over pairs is the
//! trainer's business.

use tch::Tensor;

use crate::ChosenRejected;

/// A preference loss with its hyper-parameters, as resolved from a
/// [`LossConfig`](crate::LossConfig).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// DPO with conservative label smoothing; see [`dpo`].
    Dpo {
        /// Inverse temperature of the sigmoid.
        beta: f64,
        /// Probability `e` that a preference label is flipped.
        label_smoothing: f64,
    },
    /// Cal-DPO; see [`cal_dpo`].
    CalDpo {
        /// Sets the calibration targets `(1 - shift) / beta` and `-shift / beta`.
        beta: f64,
        /// Centre of the ground-truth rewards: targets are 1 - shift and -shift times 1/beta.
        shift: f64,
        /// Weight `lambda` of the calibration term.
        cal_weight: f64,
    },
    /// IPO; see [`ipo`].
    Ipo {
        /// IPO's regularisation `tau` (TRL's `beta`); the target margin is `1 / (2 tau)`.
        tau: f64,
        /// Whether log-probs are averaged over completion tokens (true) or summed.
        average: bool,
    },
    /// Robust DPO; see [`robust`].
    Robust {
        /// Inverse temperature of the sigmoid.
        beta: f64,
        /// Assumed probability `e` that a preference label is flipped.
        label_smoothing: f64,
    },
    /// Hinge (RSO/SLiC); see [`hinge`].
    Hinge {
        /// Scale of the margin: the hinge is at `delta = 1 / beta`.
        beta: f64,
    },
    /// SPPO with hard win probabilities; see [`sppo_hard`].
    SppoHard {
        /// Sets the targets `+-1 / (2 beta)`.
        beta: f64,
    },
    /// NCA on pairs; see [`nca_pair`].
    NcaPair {
        /// Scale of the log-ratios.
        beta: f64,
    },
    /// SimPO (reference-free); see [`simpo`].
    Simpo {
        /// Scale of the length-normalised log-probs.
        beta: f64,
        /// Target reward margin.
        gamma: f64,
    },
}

/// Metric names of the Cal-DPO components, in the order [`Loss::components`] returns them.
const CAL_DPO_COMPONENTS: [&str; 4] =
    ["loss/contrastive", "loss/calibration", "logratio/chosen", "logratio/rejected"];

impl Loss {
    /// The loss type as written in the configuration (`cal_dpo`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Loss::Dpo { .. } => "dpo",
            Loss::CalDpo { .. } => "cal_dpo",
            Loss::Ipo { .. } => "ipo",
            Loss::Robust { .. } => "robust",
            Loss::Hinge { .. } => "hinge",
            Loss::SppoHard { .. } => "sppo_hard",
            Loss::NcaPair { .. } => "nca_pair",
            Loss::Simpo { .. } => "simpo",
        }
    }

    /// The beta that scales rewards, as in TRL (for IPO that is tau).
    pub fn beta(&self) -> f64 {
        match *self {
            Loss::Dpo { beta, .. }
            | Loss::CalDpo { beta, .. }
            | Loss::Robust { beta, .. }
            | Loss::Hinge { beta }
            | Loss::SppoHard { beta }
            | Loss::NcaPair { beta }
            | Loss::Simpo { beta, .. } => beta,
            Loss::Ipo { tau, .. } => tau,
        }
    }

    /// Whether the loss compares against a reference model (every loss but SimPO).
    pub fn needs_reference(&self) -> bool {
        !matches!(self, Loss::Simpo { .. })
    }

    /// Whether the loss (and so its rewards and `logps/*` metrics) uses log-probs averaged
    /// over completion tokens instead of summed: IPO with `average`, and SimPO.
    pub fn uses_mean_logps(&self) -> bool {
        matches!(self, Loss::Ipo { average: true, .. } | Loss::Simpo { .. })
    }

    /// The loss when the policy equals the reference (every log-ratio 0), without any SFT
    /// term: the value a run starts from. `None` for SimPO, whose value depends on the
    /// policy alone.
    pub fn identity_loss(&self) -> Option<f64> {
        let ln2 = std::f64::consts::LN_2;
        match *self {
            // sigma(0) = 1/2 on both sides, and (1 - e) + e = 1.
            Loss::Dpo { .. } => Some(ln2),
            // [(1 - e) ln 2 - e ln 2] / (1 - 2e) = ln 2.
            Loss::Robust { .. } => Some(ln2),
            // (0 - 1/(2 tau))^2.
            Loss::Ipo { tau, .. } => Some(1.0 / (4.0 * tau * tau)),
            Loss::Hinge { .. } => Some(1.0),
            // ln 2 + lambda [((1 - s)/beta)^2 + (s/beta)^2].
            Loss::CalDpo { beta, shift, cal_weight } => {
                Some(ln2 + cal_weight * ((1.0 - shift).powi(2) + shift.powi(2)) / (beta * beta))
            }
            // 2 (1/(2 beta))^2.
            Loss::SppoHard { beta } => Some(1.0 / (2.0 * beta * beta)),
            // ln 2 + ln 2 / 2 + ln 2 / 2.
            Loss::NcaPair { .. } => Some(2.0 * ln2),
            Loss::Simpo { .. } => None,
        }
    }

    /// Metric names of the per-pair components that [`Loss::components`] reports.
    pub fn component_names(&self) -> &'static [&'static str] {
        match self {
            Loss::CalDpo { .. } => &CAL_DPO_COMPONENTS,
            _ => &[],
        }
    }

    /// The per-pair loss `[batch]`.
    ///
    /// `implicit` holds what the loss compares: the log-ratios for every loss but SimPO,
    /// the mean policy log-probs for SimPO.
    pub fn per_pair(&self, implicit: &ChosenRejected<Tensor>) -> Tensor {
        match *self {
            Loss::Dpo { beta, label_smoothing } => dpo(implicit, beta, label_smoothing),
            Loss::CalDpo { beta, shift, cal_weight } => {
                let terms = cal_dpo(implicit, beta, shift, cal_weight);
                terms.contrastive + terms.calibration
            }
            Loss::Ipo { tau, .. } => ipo(implicit, tau),
            Loss::Robust { beta, label_smoothing } => robust(implicit, beta, label_smoothing),
            Loss::Hinge { beta } => hinge(implicit, beta),
            Loss::SppoHard { beta } => sppo_hard(implicit, beta),
            Loss::NcaPair { beta } => nca_pair(implicit, beta),
            Loss::Simpo { beta, gamma } => simpo(implicit, beta, gamma),
        }
    }

    /// The loss's own per-pair components, detached, named by [`Loss::component_names`].
    pub fn components(&self, implicit: &ChosenRejected<Tensor>) -> Vec<(&'static str, Tensor)> {
        let Loss::CalDpo { beta, shift, cal_weight } = *self else {
            return Vec::new();
        };
        let terms = tch::no_grad(|| cal_dpo(implicit, beta, shift, cal_weight));
        let values = [
            terms.contrastive,
            terms.calibration,
            implicit.chosen.detach(),
            implicit.rejected.detach(),
        ];
        CAL_DPO_COMPONENTS.into_iter().zip(values).collect()
    }
}

/// `chosen - rejected`.
fn margin(pair: &ChosenRejected<Tensor>) -> Tensor {
    &pair.chosen - &pair.rejected
}

/// DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) with conservative label smoothing
/// (cDPO, Mitchell 2023), as TRL's `sigmoid` loss:
///
/// `-(1 - e) log sigma(beta delta) - e log sigma(-beta delta)`.
///
/// Inputs: log-ratios `[batch]` each; `e = 0` is the paper's loss.
pub fn dpo(logratios: &ChosenRejected<Tensor>, beta: f64, label_smoothing: f64) -> Tensor {
    let scaled = margin(logratios) * beta;
    let agree = scaled.log_sigmoid() * (1.0 - label_smoothing);
    let flipped = (-&scaled).log_sigmoid() * label_smoothing;
    -(agree + flipped)
}

/// Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409: the
/// unbiased estimate of the DPO loss under label noise `e`), as TRL's `robust` loss:
///
/// `[-(1 - e) log sigma(beta delta) + e log sigma(-beta delta)] / (1 - 2e)`.
///
/// Inputs: log-ratios `[batch]` each; needs `e < 1/2`, which configuration checks.
pub fn robust(logratios: &ChosenRejected<Tensor>, beta: f64, label_smoothing: f64) -> Tensor {
    let scaled = margin(logratios) * beta;
    let agree = scaled.log_sigmoid() * (1.0 - label_smoothing);
    let flipped = (-&scaled).log_sigmoid() * label_smoothing;
    (flipped - agree) / (1.0 - 2.0 * label_smoothing)
}

/// IPO (Azar et al. 2023, arXiv 2310.12036, the empirical loss of Eq. 17), as TRL's `ipo`:
///
/// `(delta - 1 / (2 tau))^2`.
///
/// Inputs: log-ratios `[batch]` each. As in TRL (and unlike the paper, which sums), the
/// log-probs are averaged over completion tokens unless `ipo_average = false`; the caller
/// chooses which log-probs to pass.
pub fn ipo(logratios: &ChosenRejected<Tensor>, tau: f64) -> Tensor {
    (margin(logratios) - 1.0 / (2.0 * tau)).square()
}

/// Hinge loss of RSO (Liu et al. 2023, arXiv 2309.06657, the SLiC-style hinge on the
/// normalised likelihood margin, with its gamma = 1/beta), as TRL's `hinge`:
///
/// `max(0, 1 - beta delta)`.
///
/// Inputs: log-ratios `[batch]` each.
pub fn hinge(logratios: &ChosenRejected<Tensor>, beta: f64) -> Tensor {
    (-(margin(logratios) * beta) + 1.0).relu()
}

/// Per-pair terms of Cal-DPO.
pub struct CalDpoTerms {
    /// `-log sigma(delta)`, `[batch]`.
    pub contrastive: Tensor,
    /// `lambda [(l_w - (1 - s)/beta)^2 + (l_l + s/beta)^2]`, `[batch]`.
    pub calibration: Tensor,
}

/// Cal-DPO (Xiao et al., NeurIPS 2024, arXiv 2412.14516, the paper's Cal-DPO objective):
///
/// `-log sigma(delta) + lambda [(l_w - (1 - s)/beta)^2 + (l_l + s/beta)^2]`.
///
/// Inputs: log-ratios `[batch]` each (sums over completion tokens). The calibration term
/// pulls each log-ratio to the ground-truth reward divided by beta: rewards 1 and 0 centred
/// by the shift `s` (default 1/2, so the targets are `+-1/(2 beta)`). Beta sets the targets
/// only; it is not inside the sigmoid.
///
/// Differences from the authors' code: their two code bases use `lambda = 1` and
/// `lambda = 0.5` (the latter through a mean-squared error halved), hence `cal_weight`. In
/// one of them `shift = 0` switches calibration off and puts beta back into the sigmoid; in
/// caldpo the shift only moves the targets (`s = 0` gives targets `1/beta` and 0), and plain
/// DPO is `type = "dpo"`.
pub fn cal_dpo(
    logratios: &ChosenRejected<Tensor>,
    beta: f64,
    shift: f64,
    cal_weight: f64,
) -> CalDpoTerms {
    let contrastive = -margin(logratios).log_sigmoid();
    let chosen_gap = &logratios.chosen - (1.0 - shift) / beta;
    let rejected_gap = &logratios.rejected + shift / beta;
    let calibration = (chosen_gap.square() + rejected_gap.square()) * cal_weight;
    CalDpoTerms { contrastive, calibration }
}

/// SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 of
/// Algorithm 1 with P = 1 for the winner and 0 for the loser), as TRL's `sppo_hard`:
///
/// `(l_w - 1/(2 beta))^2 + (l_l + 1/(2 beta))^2`.
///
/// Inputs: log-ratios `[batch]` each. It is Cal-DPO's calibration term alone.
pub fn sppo_hard(logratios: &ChosenRejected<Tensor>, beta: f64) -> Tensor {
    let target = 1.0 / (2.0 * beta);
    (&logratios.chosen - target).square() + (&logratios.rejected + target).square()
}

/// NCA for pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
/// Explicit Rewards", arXiv 2402.05369, NCA on a winner and a loser), as TRL's `nca_pair`:
///
/// `-log sigma(beta l_w) - 1/2 log sigma(-beta l_w) - 1/2 log sigma(-beta l_l)`.
///
/// Inputs: log-ratios `[batch]` each.
pub fn nca_pair(logratios: &ChosenRejected<Tensor>, beta: f64) -> Tensor {
    let chosen = &logratios.chosen * beta;
    let rejected = &logratios.rejected * beta;
    let pull = chosen.log_sigmoid();
    let push = ((-&chosen).log_sigmoid() + (-&rejected).log_sigmoid()) * 0.5;
    -(pull + push)
}

/// SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6):
///
/// `-log sigma(beta (mean logp_w - mean logp_l) - gamma)`.
///
/// Inputs: the policy's log-probs averaged over completion tokens, `[batch]` each; there is
/// no reference model. `gamma` is the margin itself, as the paper's gamma and TRL's
/// `simpo_gamma` (TRL's CPO trainer); SimPO's optional label smoothing is not offered.
pub fn simpo(mean_logps: &ChosenRejected<Tensor>, beta: f64, gamma: f64) -> Tensor {
    -(margin(mean_logps) * beta - gamma).log_sigmoid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn pair(chosen: &[f64], rejected: &[f64]) -> ChosenRejected<Tensor> {
        ChosenRejected::new(Tensor::from_slice(chosen), Tensor::from_slice(rejected))
    }

    fn assert_values(actual: &Tensor, expected: &[f64]) {
        let actual = Vec::<f64>::try_from(actual).unwrap();
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{actual:?} vs {expected:?}");
        }
    }

    // Most inputs below make the sigmoid argument +-ln 3, where sigma(ln 3) = 3/4 and
    // sigma(-ln 3) = 1/4, so every value has a closed form.
    fn ln3() -> f64 {
        3f64.ln()
    }

    #[test]
    fn dpo_hand_values() {
        // beta 0.5, l_w = ln 3, l_l = -ln 3: beta delta = ln 3.
        // e = 0: -ln(3/4) = ln(4/3). e = 0.1: 0.9 ln(4/3) + 0.1 ln 4.
        // Second pair, delta = 0: ln 2 for any e.
        let logratios = pair(&[ln3(), 1.0], &[-ln3(), 1.0]);
        let ln2 = std::f64::consts::LN_2;
        assert_values(&dpo(&logratios, 0.5, 0.0), &[(4.0f64 / 3.0).ln(), ln2]);
        let smoothed = 0.9 * (4.0f64 / 3.0).ln() + 0.1 * 4f64.ln();
        assert_values(&dpo(&logratios, 0.5, 0.1), &[smoothed, ln2]);
    }

    #[test]
    fn robust_hand_values() {
        // beta delta = ln 3, e = 0.1: [-(0.9) ln(3/4) + 0.1 ln(1/4)] / 0.8
        //   = [0.9 ln(4/3) - 0.1 ln 4] / 0.8. At e = 0 it is DPO: ln(4/3).
        let logratios = pair(&[ln3()], &[-ln3()]);
        let expected = (0.9 * (4.0f64 / 3.0).ln() - 0.1 * 4f64.ln()) / 0.8;
        assert_values(&robust(&logratios, 0.5, 0.1), &[expected]);
        assert_values(&robust(&logratios, 0.5, 0.0), &[(4.0f64 / 3.0).ln()]);
    }

    #[test]
    fn ipo_hand_values() {
        // tau 0.5: target margin 1/(2 * 0.5) = 1. delta = 2 - (-0.5) = 2.5: 1.5^2 = 2.25;
        // delta = 1: 0.
        assert_values(&ipo(&pair(&[2.0, 0.5], &[-0.5, -0.5]), 0.5), &[2.25, 0.0]);
    }

    #[test]
    fn hinge_hand_values() {
        // beta 0.5: max(0, 1 - delta / 2) for delta = 1, 3, -2: 0.5, 0, 2.
        assert_values(&hinge(&pair(&[1.0, 2.0, -1.0], &[0.0, -1.0, 1.0]), 0.5), &[0.5, 0.0, 2.0]);
    }

    #[test]
    fn cal_dpo_hand_values() {
        // l_w = ln 3, l_l = 0: contrastive -ln sigma(ln 3) = ln(4/3) (no beta inside).
        // beta 0.5, s 0.5, lambda 1: targets +-1, calibration (ln 3 - 1)^2 + 1.
        // beta 0.5, s 0.25, lambda 0.5: targets 1.5 and -0.5,
        //   calibration 0.5 [(ln 3 - 1.5)^2 + 0.25].
        let logratios = pair(&[ln3()], &[0.0]);
        let terms = cal_dpo(&logratios, 0.5, 0.5, 1.0);
        assert_values(&terms.contrastive, &[(4.0f64 / 3.0).ln()]);
        assert_values(&terms.calibration, &[(ln3() - 1.0).powi(2) + 1.0]);
        let shifted = cal_dpo(&logratios, 0.5, 0.25, 0.5);
        assert_values(&shifted.contrastive, &[(4.0f64 / 3.0).ln()]);
        assert_values(&shifted.calibration, &[0.5 * ((ln3() - 1.5).powi(2) + 0.25)]);

        let loss = Loss::CalDpo { beta: 0.5, shift: 0.5, cal_weight: 1.0 };
        let total = (4.0f64 / 3.0).ln() + (ln3() - 1.0).powi(2) + 1.0;
        assert_values(&loss.per_pair(&logratios), &[total]);
    }

    #[test]
    fn sppo_hard_hand_values_and_equality_with_the_calibration_term() {
        // beta 0.5: targets +-1; l_w = 3, l_l = -3: 2^2 + 2^2 = 8.
        assert_values(&sppo_hard(&pair(&[3.0], &[-3.0]), 0.5), &[8.0]);

        tch::manual_seed(1);
        let random = ChosenRejected::new(
            Tensor::randn([16], (Kind::Double, Device::Cpu)) * 5.0,
            Tensor::randn([16], (Kind::Double, Device::Cpu)) * 5.0,
        );
        let calibration = cal_dpo(&random, 0.1, 0.5, 1.0).calibration;
        let sppo = sppo_hard(&random, 0.1);
        assert_eq!(
            Vec::<f64>::try_from(&sppo).unwrap(),
            Vec::<f64>::try_from(&calibration).unwrap()
        );
    }

    #[test]
    fn nca_pair_hand_values() {
        // beta 1, l_w = ln 3, l_l = -ln 3:
        // -ln(3/4) - 1/2 ln(1/4) - 1/2 ln(3/4) = 1.5 ln(4/3) + 0.5 ln 4.
        let expected = 1.5 * (4.0f64 / 3.0).ln() + 0.5 * 4f64.ln();
        assert_values(&nca_pair(&pair(&[ln3()], &[-ln3()]), 1.0), &[expected]);
    }

    #[test]
    fn simpo_hand_values() {
        // beta 2, gamma 0.5, mean logps -1 and -1 - (ln 3 + 0.5)/2:
        // 2 (ln 3 + 0.5)/2 - 0.5 = ln 3, so the loss is ln(4/3).
        let rejected = -1.0 - (ln3() + 0.5) / 2.0;
        assert_values(&simpo(&pair(&[-1.0], &[rejected]), 2.0, 0.5), &[(4.0f64 / 3.0).ln()]);
    }

    #[test]
    fn identity_losses() {
        // Policy = reference: every log-ratio is 0.
        // dpo and robust: -ln sigma(0) = ln 2. ipo at tau 0.1: (1/0.2)^2 = 25.
        // cal_dpo at beta 0.1, s 0.5, lambda 1: ln 2 + (5^2 + 5^2) = 50.693147...
        // hinge: 1. sppo_hard at beta 0.1: 5^2 + 5^2 = 50.
        // nca_pair: -ln(1/2) - 1/2 ln(1/2) - 1/2 ln(1/2) = 2 ln 2.
        let ln2 = std::f64::consts::LN_2;
        let cases = [
            (Loss::Dpo { beta: 0.1, label_smoothing: 0.2 }, ln2),
            (Loss::Robust { beta: 0.1, label_smoothing: 0.2 }, ln2),
            (Loss::Ipo { tau: 0.1, average: true }, 25.0),
            (Loss::CalDpo { beta: 0.1, shift: 0.5, cal_weight: 1.0 }, 50.0 + ln2),
            (Loss::Hinge { beta: 0.1 }, 1.0),
            (Loss::SppoHard { beta: 0.1 }, 50.0),
            (Loss::NcaPair { beta: 0.1 }, 2.0 * ln2),
        ];
        let zeros = pair(&[0.0, 0.0], &[0.0, 0.0]);
        for (loss, expected) in cases {
            assert_values(&loss.per_pair(&zeros), &[expected, expected]);
            assert!((loss.identity_loss().unwrap() - expected).abs() < 1e-12, "{loss:?}");
        }
        assert_eq!(Loss::Simpo { beta: 2.0, gamma: 0.5 }.identity_loss(), None);
    }

    #[test]
    fn properties_of_each_loss() {
        let simpo = Loss::Simpo { beta: 2.0, gamma: 0.5 };
        assert!(!simpo.needs_reference() && simpo.uses_mean_logps());
        assert!(Loss::Ipo { tau: 0.1, average: true }.uses_mean_logps());
        assert!(!Loss::Ipo { tau: 0.1, average: false }.uses_mean_logps());
        assert_eq!(Loss::Ipo { tau: 0.3, average: true }.beta(), 0.3);
        let cal = Loss::CalDpo { beta: 0.1, shift: 0.5, cal_weight: 1.0 };
        assert!(cal.needs_reference() && !cal.uses_mean_logps());
        assert_eq!(cal.component_names().len(), 4);
        assert!(Loss::Dpo { beta: 0.1, label_smoothing: 0.0 }.component_names().is_empty());
    }
}
