//! Peak host memory and time of the log-prob paths, one configuration per process.
//!
//! ```text
//! cargo run -p caldpo-core --release --example logps_memory -- PATH SEQUENCES GRAD
//! ```
//!
//! PATH is `naive` (full logits, full log-softmax), `logits` ([`sequence_logps`] on full
//! logits) or `hidden` ([`sequence_logps_from_hidden`]); SEQUENCES the batch of 1024-token
//! sequences whose second half is the completion; GRAD `grad` or `no_grad`. Sizes are
//! SmolLM2-135M's (hidden 576, vocab 49 152), in f32 on the CPU. Prints the growth of the
//! peak resident set (VmHWM) over the inputs, and the time of forward plus backward.

use std::time::Instant;

use caldpo_core::{sequence_logps, sequence_logps_from_hidden, IGNORE_INDEX};
use tch::{Device, Kind, Tensor};

const SEQ_LEN: i64 = 1024;
const WIDTH: i64 = 576;
const VOCAB: i64 = 49_152;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap_or("VmHWM: 0 kB");
    let kib: f64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}

fn naive(logits: &Tensor, labels: &Tensor) -> Tensor {
    let targets = labels.narrow(1, 1, SEQ_LEN - 1);
    let scored = targets.ne(IGNORE_INDEX);
    let safe = targets.where_self(&scored, &Tensor::from(0i64));
    let log_probs = logits.narrow(1, 0, SEQ_LEN - 1).log_softmax(-1, Kind::Float);
    let per_token = log_probs.gather(2, &safe.unsqueeze(2), false).squeeze_dim(2);
    (per_token * scored.to_kind(Kind::Float)).sum_dim_intlist(1, false, Kind::Float)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map(String::as_str).unwrap_or("hidden");
    let sequences: i64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2);
    let grad = args.get(3).map(String::as_str) != Some("no_grad");
    tch::manual_seed(0);

    let options = (Kind::Float, Device::Cpu);
    let hidden = Tensor::randn([sequences, SEQ_LEN, WIDTH], options).set_requires_grad(grad);
    let head = (Tensor::randn([VOCAB, WIDTH], options) * 0.05).set_requires_grad(grad);
    let labels = Tensor::randint(VOCAB, [sequences, SEQ_LEN], (Kind::Int64, Device::Cpu));
    let _ = labels.narrow(1, 0, SEQ_LEN / 2).fill_(IGNORE_INDEX);
    let before = peak_rss_mib();

    let started = Instant::now();
    let _no_grad = (!grad).then(tch::no_grad_guard);
    let sums = match path {
        "naive" => naive(&hidden.matmul(&head.tr()), &labels),
        "logits" => sequence_logps(&hidden.matmul(&head.tr()), &labels).unwrap().sum,
        _ => sequence_logps_from_hidden(&hidden, &head, &labels, 1024).unwrap().sum,
    };
    if grad {
        sums.sum(Kind::Float).backward();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{path:>6} sequences={sequences} {}: peak +{:.0} MiB, {seconds:.2} s, sum[0]={:.3}",
        if grad { "grad" } else { "no_grad" },
        peak_rss_mib() - before,
        sums.double_value(&[0]),
    );
}
