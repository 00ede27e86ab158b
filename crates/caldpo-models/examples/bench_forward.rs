//! Times SmolLM2-135M on this machine: one forward and one forward+backward of 4 sequences
//! of 256 tokens, and the fraction of a reference f32 matmul throughput that is.
//!
//! `cargo run --release -p caldpo-models --example bench_forward -- [MODEL_DIR] [GFLOPS]`
//! (MODEL_DIR defaults to `$CALDPO_ASSETS/smollm2-135m-instruct`, GFLOPS to 125, the f32
//! matmul throughput measured on the project's 2-core machine).

use std::path::PathBuf;
use std::time::Instant;

use caldpo_models::{CausalLm, Device, Kind};
use tch::Tensor;

const BATCH: i64 = 4;
const SEQ_LEN: i64 = 256;
const REPEATS: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = match args.next() {
        Some(dir) => PathBuf::from(dir),
        None => assets_dir().join("smollm2-135m-instruct"),
    };
    let peak_gflops: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(125.0);
    let device = Device::cuda_if_available();

    let start = Instant::now();
    let model = CausalLm::load(&dir, device, Kind::Float)?;
    println!(
        "load: {:.2?} ({} parameters, {device:?}, {} threads)",
        start.elapsed(),
        model.num_parameters(),
        tch::get_num_threads()
    );

    let input_ids =
        Tensor::randint(model.config().vocab_size, [BATCH, SEQ_LEN], (Kind::Int64, device));
    let mask = input_ids.ones_like();
    let positions = Tensor::arange(SEQ_LEN, (Kind::Int64, device)).unsqueeze(0).repeat([BATCH, 1]);
    let tokens = (BATCH * SEQ_LEN) as f64;
    // 2 FLOP per parameter per token forward (the tied head counted once, as in
    // REAL-INPUTS.md); the backward costs twice the forward.
    let forward_gflop = 2.0 * model.num_parameters() as f64 * tokens / 1e9;

    let forward = || {
        tch::no_grad(|| {
            let _ = model.forward(&input_ids, &mask, &positions).sum(Kind::Float).double_value(&[]);
        })
    };
    let forward_backward = || {
        let loss = model.forward(&input_ids, &mask, &positions).mean(Kind::Float);
        loss.backward();
        for (_, p) in model.named_parameters() {
            let _ = p.grad().zero_();
        }
    };
    report("forward", forward_gflop, peak_gflops, time(forward));
    report("forward+backward", 3.0 * forward_gflop, peak_gflops, time(forward_backward));
    Ok(())
}

/// Best of `REPEATS` timings after one warm-up run, in seconds.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn report(what: &str, gflop: f64, peak: f64, seconds: f64) {
    let rate = gflop / seconds;
    println!(
        "{what}: {seconds:.3} s for {BATCH} x {SEQ_LEN} tokens, {gflop:.0} GFLOP, {rate:.1} GFLOP/s = {:.0}% of {peak} GFLOP/s, {:.0} tokens/s",
        100.0 * rate / peak,
        (BATCH * SEQ_LEN) as f64 / seconds
    );
}

fn assets_dir() -> PathBuf {
    match std::env::var_os("CALDPO_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/caldpo/assets")
        }
    }
}
