//! The `[loss]` table of the configuration, and its validation into a [`Loss`].

use serde::{Deserialize, Serialize};

use crate::{Error, Loss, ResolvedLoss, Result};

/// The loss types, as written in `type = "..."`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Direct preference optimisation (Rafailov et al. 2023).
    Dpo,
    /// Calibrated DPO (Xiao et al. 2024), the default.
    #[default]
    CalDpo,
    /// Identity preference optimisation (Azar et al. 2023).
    Ipo,
    /// Robust DPO under label noise (Chowdhury et al. 2024).
    Robust,
    /// Hinge loss (RSO, Liu et al. 2023).
    Hinge,
    /// Self-play preference optimisation with hard probabilities (Wu et al. 2024).
    SppoHard,
    /// Noise contrastive alignment on pairs (Chen et al. 2024).
    NcaPair,
    /// Simple preference optimisation, reference-free (Meng et al. 2024).
    Simpo,
}

impl LossKind {
    /// Every loss type.
    pub const ALL: [LossKind; 8] = [
        LossKind::Dpo,
        LossKind::CalDpo,
        LossKind::Ipo,
        LossKind::Robust,
        LossKind::Hinge,
        LossKind::SppoHard,
        LossKind::NcaPair,
        LossKind::Simpo,
    ];

    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Dpo => "dpo",
            LossKind::CalDpo => "cal_dpo",
            LossKind::Ipo => "ipo",
            LossKind::Robust => "robust",
            LossKind::Hinge => "hinge",
            LossKind::SppoHard => "sppo_hard",
            LossKind::NcaPair => "nca_pair",
            LossKind::Simpo => "simpo",
        }
    }

    /// Whether this loss type reads `key`.
    fn uses(self, key: Key) -> bool {
        match key {
            Key::Beta | Key::SftWeight => true,
            Key::LabelSmoothing => matches!(self, LossKind::Dpo | LossKind::Robust),
            Key::Shift | Key::CalWeight => self == LossKind::CalDpo,
            Key::Gamma => self == LossKind::Simpo,
            Key::IpoAverage => self == LossKind::Ipo,
        }
    }

    fn default_beta(self) -> f64 {
        if self == LossKind::Simpo {
            2.0
        } else {
            0.1
        }
    }
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The `[loss]` table. Every key but `type` is optional; a missing key takes its default.
///
/// A key that the chosen type does not read is accepted and listed in
/// [`ResolvedLoss::ignored_keys`], so switching `type` is a one-line change; an unknown key
/// is a deserialisation error.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// The loss type; default `cal_dpo`.
    #[serde(rename = "type", default)]
    pub kind: LossKind,
    /// Inverse temperature (dpo, robust, hinge, nca_pair, simpo), calibration scale (cal_dpo,
    /// sppo_hard) or IPO's tau; also scales the logged rewards. Default 0.1, simpo 2.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// Probability that a preference label is flipped (dpo, robust); in [0, 0.5). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// Cal-DPO's reward centre s: targets (1 - s)/beta and -s/beta; in [0, 1]. Default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
    /// Cal-DPO's calibration weight lambda; >= 0. Default 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cal_weight: Option<f64>,
    /// SimPO's target reward margin; >= 0. Default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// Weight of the chosen response's mean token NLL added to any loss; >= 0. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sft_weight: Option<f64>,
    /// IPO: average log-probs over completion tokens (true) or sum them. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipo_average: Option<bool>,
}

impl Default for LossConfig {
    /// Cal-DPO with every key at its default.
    fn default() -> Self {
        Self::of_kind(LossKind::CalDpo)
    }
}

/// The keys of the `[loss]` table besides `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Beta,
    LabelSmoothing,
    Shift,
    CalWeight,
    Gamma,
    SftWeight,
    IpoAverage,
}

impl Key {
    const ALL: [Key; 7] = [
        Key::Beta,
        Key::LabelSmoothing,
        Key::Shift,
        Key::CalWeight,
        Key::Gamma,
        Key::SftWeight,
        Key::IpoAverage,
    ];

    fn name(self) -> &'static str {
        match self {
            Key::Beta => "beta",
            Key::LabelSmoothing => "label_smoothing",
            Key::Shift => "shift",
            Key::CalWeight => "cal_weight",
            Key::Gamma => "gamma",
            Key::SftWeight => "sft_weight",
            Key::IpoAverage => "ipo_average",
        }
    }
}

const DEFAULT_LABEL_SMOOTHING: f64 = 0.0;
const DEFAULT_SHIFT: f64 = 0.5;
const DEFAULT_CAL_WEIGHT: f64 = 1.0;
const DEFAULT_GAMMA: f64 = 0.5;
const DEFAULT_SFT_WEIGHT: f64 = 0.0;
const DEFAULT_IPO_AVERAGE: bool = true;

impl LossConfig {
    /// A configuration of `kind` with every key left to its default.
    pub fn of_kind(kind: LossKind) -> Self {
        Self {
            kind,
            beta: None,
            label_smoothing: None,
            shift: None,
            cal_weight: None,
            gamma: None,
            sft_weight: None,
            ipo_average: None,
        }
    }

    /// Validates the keys and resolves them, defaults filled in, into a [`ResolvedLoss`].
    ///
    /// Every key that is present is validated, read or not, so that a value stays valid
    /// when `type` changes.
    pub fn resolve(&self) -> Result<ResolvedLoss> {
        self.validate()?;
        let beta = self.beta_or_default();
        let label_smoothing = self.label_smoothing.unwrap_or(DEFAULT_LABEL_SMOOTHING);
        let loss = match self.kind {
            LossKind::Dpo => Loss::Dpo { beta, label_smoothing },
            LossKind::CalDpo => Loss::CalDpo {
                beta,
                shift: self.shift.unwrap_or(DEFAULT_SHIFT),
                cal_weight: self.cal_weight.unwrap_or(DEFAULT_CAL_WEIGHT),
            },
            LossKind::Ipo => {
                Loss::Ipo { tau: beta, average: self.ipo_average.unwrap_or(DEFAULT_IPO_AVERAGE) }
            }
            LossKind::Robust => Loss::Robust { beta, label_smoothing },
            LossKind::Hinge => Loss::Hinge { beta },
            LossKind::SppoHard => Loss::SppoHard { beta },
            LossKind::NcaPair => Loss::NcaPair { beta },
            LossKind::Simpo => Loss::Simpo { beta, gamma: self.gamma.unwrap_or(DEFAULT_GAMMA) },
        };
        Ok(ResolvedLoss {
            loss,
            sft_weight: self.sft_weight.unwrap_or(DEFAULT_SFT_WEIGHT),
            ignored_keys: self.ignored_keys(),
        })
    }

    /// The configuration with the default of every key that the chosen type reads filled
    /// in: what `RUN_DIR/config.toml` records.
    ///
    /// Keys the type does not read are kept as given (absent when not given), so the
    /// written file warns about exactly what the user wrote and nothing more.
    pub fn with_defaults(&self) -> LossConfig {
        let kind = self.kind;
        let fill = |key: Key, given: Option<f64>, default: f64| {
            given.or_else(|| kind.uses(key).then_some(default))
        };
        LossConfig {
            kind,
            beta: Some(self.beta_or_default()),
            label_smoothing: fill(
                Key::LabelSmoothing,
                self.label_smoothing,
                DEFAULT_LABEL_SMOOTHING,
            ),
            shift: fill(Key::Shift, self.shift, DEFAULT_SHIFT),
            cal_weight: fill(Key::CalWeight, self.cal_weight, DEFAULT_CAL_WEIGHT),
            gamma: fill(Key::Gamma, self.gamma, DEFAULT_GAMMA),
            sft_weight: Some(self.sft_weight.unwrap_or(DEFAULT_SFT_WEIGHT)),
            ipo_average: self
                .ipo_average
                .or_else(|| kind.uses(Key::IpoAverage).then_some(DEFAULT_IPO_AVERAGE)),
        }
    }

    fn beta_or_default(&self) -> f64 {
        self.beta.unwrap_or(self.kind.default_beta())
    }

    fn is_set(&self, key: Key) -> bool {
        match key {
            Key::Beta => self.beta.is_some(),
            Key::LabelSmoothing => self.label_smoothing.is_some(),
            Key::Shift => self.shift.is_some(),
            Key::CalWeight => self.cal_weight.is_some(),
            Key::Gamma => self.gamma.is_some(),
            Key::SftWeight => self.sft_weight.is_some(),
            Key::IpoAverage => self.ipo_average.is_some(),
        }
    }

    /// The keys given that the chosen type does not read, in table order.
    fn ignored_keys(&self) -> Vec<&'static str> {
        Key::ALL
            .into_iter()
            .filter(|&key| self.is_set(key) && !self.kind.uses(key))
            .map(Key::name)
            .collect()
    }

    fn validate(&self) -> Result<()> {
        check(Key::Beta, self.beta, "finite and > 0", |v| v > 0.0)?;
        check(Key::LabelSmoothing, self.label_smoothing, "in [0, 0.5)", |v| {
            (0.0..0.5).contains(&v)
        })?;
        check(Key::Shift, self.shift, "in [0, 1]", |v| (0.0..=1.0).contains(&v))?;
        check(Key::CalWeight, self.cal_weight, "finite and >= 0", |v| v >= 0.0)?;
        check(Key::Gamma, self.gamma, "finite and >= 0", |v| v >= 0.0)?;
        check(Key::SftWeight, self.sft_weight, "finite and >= 0", |v| v >= 0.0)
    }
}

/// Fails when `value` is given and is not finite or not `valid`.
fn check(
    key: Key,
    value: Option<f64>,
    requirement: &'static str,
    valid: impl Fn(f64) -> bool,
) -> Result<()> {
    match value {
        Some(value) if !(value.is_finite() && valid(value)) => {
            Err(Error::InvalidConfig { key: key.name(), value, requirement })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<LossConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_per_type() {
        let cal = parse("").unwrap().resolve().unwrap();
        assert_eq!(cal.loss, Loss::CalDpo { beta: 0.1, shift: 0.5, cal_weight: 1.0 });
        assert_eq!(cal.sft_weight, 0.0);
        assert!(cal.ignored_keys.is_empty());
        assert_eq!(LossConfig::default().resolve().unwrap(), cal);

        let expected = [
            (LossKind::Dpo, Loss::Dpo { beta: 0.1, label_smoothing: 0.0 }),
            (LossKind::Ipo, Loss::Ipo { tau: 0.1, average: true }),
            (LossKind::Robust, Loss::Robust { beta: 0.1, label_smoothing: 0.0 }),
            (LossKind::Hinge, Loss::Hinge { beta: 0.1 }),
            (LossKind::SppoHard, Loss::SppoHard { beta: 0.1 }),
            (LossKind::NcaPair, Loss::NcaPair { beta: 0.1 }),
            (LossKind::Simpo, Loss::Simpo { beta: 2.0, gamma: 0.5 }),
        ];
        for (kind, loss) in expected {
            let text = format!("type = '{kind}'");
            assert_eq!(parse(&text).unwrap().resolve().unwrap().loss, loss);
            assert_eq!(loss.name(), kind.name());
        }
    }

    #[test]
    fn given_values_are_used() {
        let text =
            "type = 'cal_dpo'\nbeta = 0.05\nshift = 0.25\ncal_weight = 0.5\nsft_weight = 0.1";
        let resolved = parse(text).unwrap().resolve().unwrap();
        assert_eq!(resolved.loss, Loss::CalDpo { beta: 0.05, shift: 0.25, cal_weight: 0.5 });
        assert_eq!(resolved.sft_weight, 0.1);
        let ipo = parse("type = 'ipo'\nbeta = 0.3\nipo_average = false").unwrap().resolve();
        assert_eq!(ipo.unwrap().loss, Loss::Ipo { tau: 0.3, average: false });
    }

    #[test]
    fn keys_the_type_does_not_read_are_reported_as_ignored() {
        let text = "type = 'dpo'\nbeta = 0.2\nshift = 0.5\ngamma = 1.0\nipo_average = true\n\
                    label_smoothing = 0.1\nsft_weight = 0.3";
        let resolved = parse(text).unwrap().resolve().unwrap();
        assert_eq!(resolved.ignored_keys, ["shift", "gamma", "ipo_average"]);
        assert_eq!(resolved.loss, Loss::Dpo { beta: 0.2, label_smoothing: 0.1 });

        let swapped = text.replace("'dpo'", "'cal_dpo'");
        let resolved = parse(&swapped).unwrap().resolve().unwrap();
        assert_eq!(resolved.ignored_keys, ["label_smoothing", "gamma", "ipo_average"]);
    }

    #[test]
    fn unknown_keys_and_types_are_errors() {
        let error = parse("type = 'dpo'\nbetta = 0.1").unwrap_err().to_string();
        assert!(error.contains("betta"), "{error}");
        let error = parse("type = 'kto'").unwrap_err().to_string();
        assert!(error.contains("kto") && error.contains("cal_dpo"), "{error}");
    }

    #[test]
    fn out_of_range_values_are_typed_errors() {
        let cases = [
            ("beta = 0.0", "beta"),
            ("beta = -1.0", "beta"),
            ("beta = nan", "beta"),
            ("label_smoothing = 0.5", "label_smoothing"),
            ("label_smoothing = -0.1", "label_smoothing"),
            ("shift = 1.5", "shift"),
            ("cal_weight = -1.0", "cal_weight"),
            ("gamma = -0.5", "gamma"),
            ("sft_weight = inf", "sft_weight"),
        ];
        for (line, key) in cases {
            // Even a key the type ignores must be valid, so that swapping type keeps working.
            let error = parse(&format!("type = 'hinge'\n{line}")).unwrap().resolve().unwrap_err();
            assert!(matches!(error, Error::InvalidConfig { key: k, .. } if k == key), "{line}");
            assert!(error.to_string().starts_with(&format!("loss.{key} = ")), "{error}");
        }
        assert!(parse("label_smoothing = 0.49").unwrap().resolve().is_ok());
    }

    #[test]
    fn with_defaults_fills_what_the_type_reads_and_round_trips() {
        let config = parse("type = 'dpo'\ngamma = 1.0").unwrap();
        let filled = config.with_defaults();
        let expected = LossConfig {
            beta: Some(0.1),
            label_smoothing: Some(0.0),
            gamma: Some(1.0),
            sft_weight: Some(0.0),
            ..LossConfig::of_kind(LossKind::Dpo)
        };
        assert_eq!(filled, expected);

        for kind in LossKind::ALL {
            let config = LossConfig::of_kind(kind);
            let filled = config.with_defaults();
            assert!(filled.resolve().unwrap().ignored_keys.is_empty(), "{kind}");
            let text = toml::to_string(&filled).unwrap();
            let reparsed = parse(&text).unwrap();
            assert_eq!(reparsed, filled, "{text}");
            assert_eq!(reparsed.resolve().unwrap(), config.resolve().unwrap(), "{text}");
        }
        let simpo = LossConfig::of_kind(LossKind::Simpo).with_defaults();
        assert_eq!((simpo.beta, simpo.gamma), (Some(2.0), Some(0.5)));
    }
}
