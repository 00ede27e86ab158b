//! Every loss against values computed independently by `fixtures/make_loss_values.py`
//! (plain Python floats, no libtorch).

use std::collections::BTreeMap;

use caldpo_core::{ChosenRejected, LossConfig, SequenceLogps};
use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Deserialize)]
struct Fixture {
    pairs: Vec<Pair>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Pair {
    pc: f64,
    pr: f64,
    rc: f64,
    rr: f64,
    nc: f64,
    nr: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: LossConfig,
    expected: Vec<Expected>,
}

#[derive(Deserialize)]
struct Expected {
    loss: f64,
    rewards_chosen: f64,
    rewards_rejected: f64,
    components: BTreeMap<String, f64>,
}

fn load() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/loss_values.json");
    let text = std::fs::read_to_string(path).expect("tests/fixtures/loss_values.json");
    serde_json::from_str(&text).expect("a valid loss fixture")
}

fn column(pairs: &[Pair], field: impl Fn(&Pair) -> f64) -> Tensor {
    Tensor::from_slice(&pairs.iter().map(field).collect::<Vec<_>>())
}

fn sequence(pairs: &[Pair], sum: fn(&Pair) -> f64, count: fn(&Pair) -> f64) -> SequenceLogps {
    SequenceLogps {
        sum: column(pairs, sum),
        token_count: column(pairs, count),
        mean_logit: Tensor::zeros([pairs.len() as i64], (Kind::Double, tch::Device::Cpu)),
    }
}

fn values(xs: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(xs).unwrap()
}

fn assert_close(case: &str, what: &str, actual: f64, expected: f64) {
    let tolerance = 1e-10 * (1.0 + expected.abs());
    assert!((actual - expected).abs() <= tolerance, "{case} {what}: {actual} vs {expected}");
}

#[test]
fn every_loss_matches_the_python_reference() {
    let fixture = load();
    let pairs = &fixture.pairs;
    let policy = ChosenRejected::new(
        sequence(pairs, |p| p.pc, |p| p.nc),
        sequence(pairs, |p| p.pr, |p| p.nr),
    );
    let reference = ChosenRejected::new(
        sequence(pairs, |p| p.rc, |p| p.nc),
        sequence(pairs, |p| p.rr, |p| p.nr),
    );
    assert_eq!(fixture.cases.len(), 13);

    for case in &fixture.cases {
        let loss = case.config.resolve().unwrap();
        let output = loss.compute(&policy, Some(&reference)).unwrap();
        let (losses, chosen, rejected) = (
            values(&output.losses),
            values(&output.rewards.chosen),
            values(&output.rewards.rejected),
        );
        for (i, expected) in case.expected.iter().enumerate() {
            let name = format!("{} pair {i}", case.name);
            assert_close(&name, "loss", losses[i], expected.loss);
            assert_close(&name, "rewards/chosen", chosen[i], expected.rewards_chosen);
            assert_close(&name, "rewards/rejected", rejected[i], expected.rewards_rejected);

            let names: Vec<_> = output.components.iter().map(|(name, _)| *name).collect();
            let expected_names: Vec<_> = expected.components.keys().map(String::as_str).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, expected_names, "{name}");
            for (component, tensor) in &output.components {
                let value = values(tensor)[i];
                assert_close(&name, component, value, expected.components[*component]);
            }
        }
    }
}
