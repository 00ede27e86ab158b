//! Data-parallel runs of `caldpo train` over Gloo on the CPU: two ranks against one process,
//! a rank that dies or freezes, and an epoch that does not split evenly.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_close, assert_ok, metrics, Fixture};
use tch::Tensor;

/// A broken run fails within a minute, not after the default ten.
const QUICK_FAILURE: &str = "[distributed]\ntimeout_s = 60\n";

/// The parameters of RUN_DIR/final, by name.
fn final_parameters(run: &Path) -> Vec<(String, Tensor)> {
    let mut tensors = Tensor::read_safetensors(run.join("final/model.safetensors")).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn two_ranks_with_batch_two_match_one_process_with_batch_four() {
    // Rank 0 takes the first two pairs of each step of four and rank 1 the other two; the
    // summed gradients, each normalised by the step's four pairs, equal one batch of four.
    let fixture = Fixture::new(QUICK_FAILURE);
    let single = ["--set", "train.grad_accum=1"];
    let two = fixture
        .train("two", &[&single[..], &["--nproc", "2", "--set", "train.batch_size=2"]].concat());
    assert_ok(&two);
    assert_ok(&fixture.train("one", &[&single[..], &["--set", "train.batch_size=4"]].concat()));

    let (two, one) = (fixture.path("two"), fixture.path("one"));
    let (two_lines, one_lines) = (metrics(&two), metrics(&one));
    assert_eq!(two_lines.len(), 6);
    for (a, b) in two_lines.iter().zip(&one_lines) {
        assert_close(a, b, 1e-4);
    }
    for ((name, a), (other, b)) in final_parameters(&two).iter().zip(&final_parameters(&one)) {
        assert_eq!(name, other);
        let difference = f64::try_from((a - b).abs().max()).unwrap();
        assert!(difference < 1e-5, "{name}: parameters differ by {difference}");
    }
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["world_size"], 2);
    assert_eq!(plan["backend"], "gloo");
    assert_eq!(plan["devices"], serde_json::json!(["cpu", "cpu"]));
    assert_eq!(plan["effective_batch"], 4);
}

#[test]
fn nine_pairs_over_two_ranks_are_counted_as_nine() {
    // Nine pairs, five a rank: one step an epoch, rank 0 with five pairs and rank 1 with four.
    // The held-out file holds the same nine with chosen and rejected swapped in every other
    // pair, so that the trained policy gets some of them wrong; evaluated two per batch, five
    // pairs fall to rank 0 and four to rank 1 again.
    let fixture = Fixture::new(QUICK_FAILURE);
    let text = std::fs::read_to_string(fixture.path("pairs.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> =
        text.lines().take(9).map(|line| serde_json::from_str(line).unwrap()).collect();
    let (train, held_out) = (fixture.path("nine.jsonl"), fixture.path("nine-swapped.jsonl"));
    let lines = |rows: &[serde_json::Value]| {
        rows.iter().map(|row| row.to_string() + "\n").collect::<String>()
    };
    std::fs::write(&train, lines(&rows)).unwrap();
    let swapped: Vec<serde_json::Value> = rows
        .iter()
        .enumerate()
        .map(|(index, row)| match index % 2 {
            0 => serde_json::json!({
                "prompt": row["prompt"], "chosen": row["rejected"], "rejected": row["chosen"]
            }),
            _ => row.clone(),
        })
        .collect();
    std::fs::write(&held_out, lines(&swapped)).unwrap();
    let data = format!("data.train={}", train.display());
    let eval = format!("data.eval={}", held_out.display());
    let common = [
        "--set",
        &data,
        "--set",
        &eval,
        "--set",
        "eval.at_end=true",
        "--set",
        "eval.batch_size=2",
        "--set",
        "train.grad_accum=1",
        "--set",
        "train.max_steps=3",
    ];
    let ranks = ["--nproc", "2", "--set", "train.batch_size=5"];
    assert_ok(&fixture.train("two", &[&common[..], &ranks].concat()));
    assert_ok(&fixture.train("one", &[&common[..], &["--set", "train.batch_size=10"]].concat()));

    let (two, one) = (metrics(&fixture.path("two")), metrics(&fixture.path("one")));
    let train: Vec<_> = two.iter().filter(|line| line.get("loss").is_some()).collect();
    assert_eq!(train.len(), 3);
    for line in &train {
        assert_eq!(line["pairs"], 9.0, "{line}");
    }
    let eval = two.iter().find(|line| line.get("eval_loss").is_some()).unwrap();
    assert_eq!(eval["eval_pairs"], 9.0);
    // A multiple of 1/9 that is neither 0 nor 1 shows the pairs of both ranks were counted,
    // each once.
    let correct = eval["eval_rewards/accuracies"].as_f64().unwrap() * 9.0;
    assert!((correct - correct.round()).abs() < 1e-9, "{correct} / 9");
    assert!(correct.round() > 0.0 && correct.round() < 9.0, "{correct} / 9");
    for (a, b) in two.iter().zip(&one) {
        assert_close(a, b, 1e-4);
    }
}

#[test]
fn a_write_that_fails_on_rank_zero_stops_every_rank_at_once() {
    // A file where rank 0 puts the final model's staging directory makes that write fail at
    // the end of the resumed run. Rank 1 must hear of it in the same collective and say so,
    // rather than wait for rank 0 in the next one.
    let fixture = Fixture::new(QUICK_FAILURE);
    let ranks = ["--nproc", "2", "--set", "train.batch_size=2", "--set", "train.grad_accum=1"];
    assert_ok(&fixture.train("blocked", &[&ranks[..], &["--stop-after", "2"]].concat()));
    let run = fixture.path("blocked");
    std::fs::write(run.join("final.partial"), "not a directory").unwrap();
    let started = Instant::now();
    let args = ["train", "--resume", run.to_str().unwrap()];
    let output = common::caldpo(&[&args[..], &ranks].concat(), &fixture.path("cache"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("error (rank 0): cannot write the final model"), "{stderr}");
    assert!(
        stderr.contains("error (rank 1): another rank could not write the final model"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(!run.join("final").exists());
    assert_checkpoints_complete(&run);
}

/// A free local port for a rendezvous.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts rank `rank` of two with torchrun's environment, training without end.
fn start_rank(fixture: &Fixture, rank: usize, port: u16) -> Child {
    start_rank_with(fixture, rank, port, &[])
}

/// `start_rank` with extra arguments.
fn start_rank_with(fixture: &Fixture, rank: usize, port: u16, args: &[&str]) -> Child {
    let env = [
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
    ];
    start_endless(fixture, &fixture.path("endless"), &env, args)
}

/// `caldpo train` into `run` without end, with extra environment and arguments; stderr is
/// piped.
fn start_endless(fixture: &Fixture, run: &Path, env: &[(&str, String)], args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_caldpo"))
        .args(["train", fixture.config.to_str().unwrap()])
        .args(["--set", &format!("train.output_dir={}", run.display())])
        .args(["--set", "train.max_steps=100000", "--set", "train.epochs=100000"])
        .args(args)
        .env("CALDPO_CACHE", fixture.path("cache"))
        .env("CALDPO_LOG", "warn")
        // `--nproc` keeps a MASTER_PORT it inherits; concurrent tests must not share one.
        .env_remove("MASTER_PORT")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the first logged step of RUN_DIR.
fn wait_for_first_step(run: &Path) {
    let file = run.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
        assert!(Instant::now() < deadline, "no step was logged");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every checkpoint directory of RUN_DIR that looks complete is complete.
fn assert_checkpoints_complete(run: &Path) {
    for entry in std::fs::read_dir(run).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if name.starts_with("checkpoint-") && !name.ends_with(".partial") {
            for file in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
                assert!(run.join(&name).join(file).exists(), "{name} lacks {file}");
            }
        }
    }
}

/// Sends `signal` to rank 1 once rank 0 has logged a step; returns rank 0's exit status,
/// its stderr and how long it took to stop after the signal.
fn disturb_rank_one(fixture: &Fixture, signal: i32) -> (bool, String, Duration) {
    let port = free_port();
    let rank0 = start_rank(fixture, 0, port);
    let mut rank1 = start_rank(fixture, 1, port);
    wait_for_first_step(&fixture.path("endless"));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(rank1.id() as i32, signal) };
    let signalled = Instant::now();
    let output = rank0.wait_with_output().unwrap();
    let elapsed = signalled.elapsed();
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).to_string(), elapsed)
}

#[test]
fn a_killed_rank_fails_the_job_with_its_name_within_the_timeout() {
    let fixture = Fixture::new("[distributed]\ntimeout_s = 20\n\n[checkpoint]\nevery_steps = 2\n");
    let (success, stderr, elapsed) = disturb_rank_one(&fixture, libc::SIGKILL);
    assert!(!success, "{stderr}");
    assert!(stderr.contains("error (rank 0)"), "{stderr}");
    assert!(stderr.contains("rank 1 is not responding"), "{stderr}");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert_checkpoints_complete(&fixture.path("endless"));
}

#[test]
fn a_frozen_rank_fails_the_job_with_its_name_after_the_timeout() {
    // SIGSTOP freezes rank 1 without closing its connections: only the timeout can tell.
    let fixture = Fixture::new("[distributed]\ntimeout_s = 4\n");
    let (success, stderr, elapsed) = disturb_rank_one(&fixture, libc::SIGSTOP);
    assert!(!success, "{stderr}");
    assert!(stderr.contains("rank 1 is not responding"), "{stderr}");
    assert!(elapsed < Duration::from_secs(4 + 10), "took {elapsed:?}");
}

#[test]
fn a_live_rank_that_never_reaches_a_collective_is_named_after_the_timeout() {
    // Rank 1 reads its pairs from a pipe nobody writes: it joins the rendezvous, its heartbeat
    // keeps ticking, and it never reaches the broadcast of the parameters.
    let fixture = Fixture::new("[distributed]\ntimeout_s = 4\n");
    let pipe = fixture.path("stuck.jsonl");
    let path = std::ffi::CString::new(pipe.to_str().unwrap()).unwrap();
    // SAFETY: a valid C path; the FIFO lives in the test's temporary directory.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let port = free_port();
    let rank0 = start_rank(&fixture, 0, port);
    let stuck = format!("data.train={}", pipe.display());
    let mut rank1 = start_rank_with(&fixture, 1, port, &["--set", &stuck]);
    let started = Instant::now();
    let output = rank0.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("broadcast of the parameters failed on rank 0"), "{stderr}");
    assert!(stderr.contains("rank 1 is alive but did not reach this collective"), "{stderr}");
    assert!(elapsed < Duration::from_secs(4 + 15), "took {elapsed:?}");
}

#[test]
fn a_signal_to_the_local_launcher_stops_every_rank_with_a_checkpoint() {
    let fixture = Fixture::new(QUICK_FAILURE);
    let run = fixture.path("interrupted");
    let launcher = start_endless(&fixture, &run, &[], &["--nproc", "2"]);
    wait_for_first_step(&run);
    // SAFETY: signalling our own child, the launcher alone (not its process group).
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let output = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("error: interrupted; the ranks stopped after their checkpoint"),
        "{stderr}"
    );
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    assert_checkpoints_complete(&run);
    let complete = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().to_string();
            name.starts_with("checkpoint-") && !name.ends_with(".partial")
        })
        .count();
    assert_eq!(complete, 1);
}

/// The pid of the child of `parent` whose environment says RANK=`rank`.
fn child_with_rank(parent: u32, rank: usize) -> Option<i32> {
    let wanted = format!("RANK={rank}");
    std::fs::read_dir("/proc").ok()?.filter_map(|entry| entry.ok()).find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // The parent pid is the second field after the parenthesised command name.
        let ppid: u32 = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let has_rank = environ.split(|byte| *byte == 0).any(|var| var == wanted.as_bytes());
        (ppid == parent && has_rank).then_some(pid)
    })
}

#[test]
fn the_local_launcher_names_the_rank_that_was_killed() {
    let fixture = Fixture::new("[distributed]\ntimeout_s = 20\n");
    let run = fixture.path("launched");
    let launcher = start_endless(&fixture, &run, &[], &["--nproc", "2"]);
    wait_for_first_step(&run);
    let rank1 = child_with_rank(launcher.id(), 1).expect("the launcher started rank 1");
    // SAFETY: signalling a process this test started (through the launcher).
    unsafe { libc::kill(rank1, libc::SIGKILL) };
    let signalled = Instant::now();
    let output = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 of 2 was killed by signal 9"), "{stderr}");
    assert!(signalled.elapsed() < Duration::from_secs(20), "took {:?}", signalled.elapsed());
}

#[test]
fn a_second_signal_to_the_local_launcher_kills_ranks_stuck_in_a_collective() {
    // Rank 1 is frozen, so rank 0 waits for it in a collective after the first signal; the
    // second ends the job long before the 60 s timeout.
    let fixture = Fixture::new(QUICK_FAILURE);
    let run = fixture.path("stuck");
    let launcher = start_endless(&fixture, &run, &[], &["--nproc", "2"]);
    wait_for_first_step(&run);
    let rank1 = child_with_rank(launcher.id(), 1).expect("the launcher started rank 1");
    // SAFETY: signalling processes this test started (directly or through the launcher).
    unsafe {
        libc::kill(rank1, libc::SIGSTOP);
        libc::kill(launcher.id() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_secs(2));
    let signalled = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let output = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("was killed by signal 9; the job failed"), "{stderr}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "took {:?}", signalled.elapsed());
    assert_checkpoints_complete(&run);
}

#[test]
fn the_local_launcher_keeps_the_port_the_user_exported() {
    // The exported port is taken by another listener, so rank 0 cannot serve the store there,
    // and says so: proof that the launcher used that port and not a free one of its own.
    let fixture = Fixture::new("[distributed]\ntimeout_s = 5\n");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let run = fixture.path("taken");
    let launcher =
        start_endless(&fixture, &run, &[("MASTER_PORT", port.clone())], &["--nproc", "2"]);
    let output = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!run.join("metrics.jsonl").exists(), "{stderr}");
}

#[test]
fn a_store_that_never_answers_fails_the_rank_within_the_timeout() {
    // A listener that accepts connections but never speaks, as a frozen rank 0 would.
    let fixture = Fixture::new("[distributed]\ntimeout_s = 3\n");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let output = start_rank(&fixture, 1, port).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let expected = format!("something listens at 127.0.0.1:{port} but does not answer as a store");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

#[test]
fn a_rank_that_never_joins_is_named_at_the_rendezvous() {
    let fixture = Fixture::new("[distributed]\ntimeout_s = 3\n");
    let output = start_rank(&fixture, 0, free_port()).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("ranks that never joined: 1"), "{stderr}");
}

#[test]
fn a_resume_keeps_the_trajectory_at_another_world_size_with_the_same_step() {
    // Two ranks stop after step 4 with a half-full log window (logged every 3 steps); one
    // process resumes with batch 4, the same four pairs a step. The window summed over both
    // ranks travels in the checkpoint, so the lines equal an uninterrupted two-rank run.
    let fixture = Fixture::new(QUICK_FAILURE);
    let config = std::fs::read_to_string(&fixture.config).unwrap();
    let config = config.replace("[log]\nevery_steps = 1\n", "[log]\nevery_steps = 3\n");
    std::fs::write(&fixture.config, config).unwrap();
    let ranks = ["--nproc", "2", "--set", "train.batch_size=2", "--set", "train.grad_accum=1"];
    assert_ok(&fixture.train("whole", &ranks));
    assert_ok(&fixture.train("split", &[&ranks[..], &["--stop-after", "4"]].concat()));
    let split = fixture.path("split");
    let resume = |batch: &str| {
        let batch = format!("train.batch_size={batch}");
        let args = ["train", "--resume", split.to_str().unwrap(), "--set", &batch];
        common::caldpo(
            &[&args[..], &["--set", "train.grad_accum=1"]].concat(),
            &fixture.path("cache"),
        )
    };
    let refused = resume("3");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("4 pairs per step, this run has 3"));
    let kept = std::fs::read_to_string(split.join("config.toml")).unwrap();
    assert!(kept.contains("batch_size = 2"), "a refused resume rewrote config.toml:\n{kept}");
    assert_ok(&resume("4"));

    let (whole, split) = (metrics(&fixture.path("whole")), metrics(&split));
    assert_eq!(whole.len(), 2, "steps 3 and 6 are logged");
    assert_eq!(whole.len(), split.len());
    for (a, b) in whole.iter().zip(&split) {
        assert_close(a, b, 1e-4);
    }
}
