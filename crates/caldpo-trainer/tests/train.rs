//! End-to-end runs of `caldpo train` on a tiny model on the CPU.

mod common;

use common::{assert_close, assert_ok, caldpo, metrics, Fixture};

fn first_loss(fixture: &Fixture, run: &str, loss: &str) -> f64 {
    let output = fixture.train(run, &["--set", loss, "--set", "train.max_steps=2"]);
    assert_ok(&output);
    metrics(&fixture.path(run))[0]["loss"].as_f64().unwrap()
}

#[test]
fn first_step_loss_is_the_identity_of_each_loss() {
    // At step 1 the policy is the reference, so every log-ratio is 0:
    // dpo: -log sigmoid(0) = ln 2; cal_dpo (beta 0.1, lambda 1, s 0.5):
    // ln 2 + (0 - 5)^2 + (0 + 5)^2 = ln 2 + 50; ipo (tau 0.1): (0 - 1/(2 tau))^2 = 25.
    let fixture = Fixture::new("");
    let ln2 = std::f64::consts::LN_2;
    let cases =
        [("loss.type=dpo", ln2), ("loss.type=cal_dpo", ln2 + 50.0), ("loss.type=ipo", 25.0)];
    for (index, (loss, expected)) in cases.iter().enumerate() {
        let actual = first_loss(&fixture, &format!("run{index}"), loss);
        assert!((actual - expected).abs() < 1e-5, "{loss}: {actual} vs {expected}");
    }
}

#[test]
fn resume_reproduces_an_uninterrupted_run() {
    // 12 pairs, 4 pairs a step: 3 steps an epoch. Stopping after step 4 lands mid-epoch, and
    // logging every 3 steps leaves a half-full log window in the checkpoint.
    let fixture = Fixture::new("[log]\nevery_steps = 3\n");
    let fixture_config = std::fs::read_to_string(&fixture.config).unwrap();
    std::fs::write(&fixture.config, fixture_config.replace("[log]\nevery_steps = 1\n", ""))
        .unwrap();
    assert_ok(&fixture.train("whole", &[]));
    assert_ok(&fixture.train("split", &["--stop-after", "4"]));
    let split = fixture.path("split");
    assert!(split.join("checkpoint-4").is_dir());
    let resumed = caldpo(&["train", "--resume", split.to_str().unwrap()], &fixture.path("cache"));
    assert_ok(&resumed);

    let (whole, split) = (metrics(&fixture.path("whole")), metrics(&split));
    assert_eq!(whole.len(), 2, "steps 3 and 6 are logged");
    assert_eq!(whole.len(), split.len());
    for (a, b) in whole.iter().zip(&split) {
        assert_close(a, b, 1e-6);
    }
}

#[test]
fn precomputed_reference_gives_the_same_trajectory() {
    let fixture = Fixture::new("");
    assert_ok(&fixture.train("live", &["--set", "loss.type=dpo"]));
    let precompute = ["--set", "loss.type=dpo", "--set", "reference.precompute=true"];
    assert_ok(&fixture.train("cached", &precompute));
    let (live, cached) = (metrics(&fixture.path("live")), metrics(&fixture.path("cached")));
    assert_eq!(live.len(), 6);
    for (a, b) in live.iter().zip(&cached) {
        assert_close(a, b, 1e-4);
    }
    // The cache is the reference, not the moving policy: after one update the loss leaves ln 2.
    let second = cached[1]["loss"].as_f64().unwrap();
    assert!((second - std::f64::consts::LN_2).abs() > 1e-4, "{second}");

    // A second run reads the cache (same reference, data and tokenisation) and matches again.
    assert_ok(&fixture.train("cached-again", &precompute));
    let again = metrics(&fixture.path("cached-again"));
    for (a, b) in cached.iter().zip(&again) {
        assert_close(a, b, 1e-9);
    }
}

#[test]
fn a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint() {
    // lr 1e30 turns the weights to +-1e30 after one AdamW step; the next forward overflows.
    let fixture = Fixture::new("[checkpoint]\nevery_steps = 1\nkeep_last = 5\n");
    let output =
        fixture.train("blowup", &["--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Norms keep the loss finite; the backward pass is what overflows.
    assert!(stderr.contains("error: step 2: the gradient is not finite"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let run = fixture.path("blowup");
    assert!(run.join("checkpoint-1/model.safetensors").exists());
    assert!(!run.join("checkpoint-2").exists());
}

#[test]
fn bad_config_fails_with_one_line_before_any_compute() {
    let fixture = Fixture::new("[checkpoint]\nevery_step = 3\n");
    let output = fixture.train("typo", &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("did you mean `every_steps`?"), "{stderr}");

    let missing = Fixture::new("");
    let output = missing.train("nomodel", &["--set", "model.path=/nonexistent/model"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("[model] path = /nonexistent/model"), "{stderr}");
    assert!(!missing.path("nomodel").join("metrics.jsonl").exists());
}

#[test]
fn a_finished_run_writes_a_loadable_final_model() {
    let fixture = Fixture::new("[eval]\nat_end = true\nsamples = 1\nmax_new_tokens = 4\n");
    let fixture_config = std::fs::read_to_string(&fixture.config).unwrap();
    let without_eval = fixture_config.replace("[eval]\nat_start = false\nat_end = false\n", "");
    std::fs::write(&fixture.config, without_eval).unwrap();
    let output = fixture.train("done", &["--set", "data.eval_fraction=0.25"]);
    assert_ok(&output);
    let run = fixture.path("done");
    for file in [
        "config.toml",
        "plan.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "samples.jsonl",
    ] {
        assert!(run.join(file).exists(), "{file} is missing");
    }
    let lines = metrics(&run);
    let evals: Vec<_> = lines.iter().filter(|line| line.get("eval_loss").is_some()).collect();
    // Evaluations before the first step and after the last; 12 pairs, a quarter (3) held out.
    assert_eq!(evals.len(), 2);
    assert_eq!((evals[0]["step"].as_u64(), evals[1]["step"].as_u64()), (Some(0), Some(6)));
    assert_eq!(evals[0]["eval_pairs"].as_f64(), Some(3.0));
    // Before training the policy is its own reference: every reward is exactly 0.
    assert_eq!(evals[0]["eval_rewards/chosen"].as_f64(), Some(0.0));
    let generated = caldpo(
        &[
            "generate",
            "--model",
            run.join("final").to_str().unwrap(),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "3",
        ],
        &fixture.path("cache"),
    );
    assert_ok(&generated);
}

#[test]
fn gradient_accumulation_gives_the_same_update_as_one_batch() {
    // Each micro-batch's summed loss is divided by the pairs of the whole step, so batch 4
    // and batch 2 x accumulation 2 must produce the same parameters and metrics.
    let fixture = Fixture::new("");
    assert_ok(
        &fixture.train("accum", &["--set", "train.batch_size=2", "--set", "train.grad_accum=2"]),
    );
    assert_ok(
        &fixture.train("whole", &["--set", "train.batch_size=4", "--set", "train.grad_accum=1"]),
    );
    let (accum, whole) = (metrics(&fixture.path("accum")), metrics(&fixture.path("whole")));
    assert_eq!(accum.len(), 6);
    for (a, b) in accum.iter().zip(&whole) {
        assert_close(a, b, 1e-4);
    }
}

#[test]
fn sigint_finishes_the_step_writes_a_checkpoint_and_exits() {
    let fixture = Fixture::new("");
    let run = fixture.path("interrupted");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_caldpo"))
        .args(["train", fixture.config.to_str().unwrap()])
        .args(["--set", &format!("train.output_dir={}", run.display())])
        .args(["--set", "train.max_steps=100000", "--set", "train.epochs=100000"])
        .env("CALDPO_CACHE", fixture.path("cache"))
        .env("CALDPO_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first logged step, then interrupt as Ctrl-C would.
    let metrics_file = run.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::metadata(&metrics_file).is_ok_and(|m| m.len() > 0) {
        assert!(std::time::Instant::now() < deadline, "no step was logged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    let checkpoints: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with("checkpoint-") && !name.ends_with(".partial"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert!(run.join(&checkpoints[0]).join("model.safetensors").exists());
}
