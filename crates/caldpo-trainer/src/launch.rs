//! `caldpo train --nproc N`: starts N local ranks of this same command and watches them, as
//! torchrun does on one node.
//!
//! Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//! MASTER_ADDR, and MASTER_PORT unless the user set it) plus a marker that tells it not to
//! launch again. The first rank to fail decides the exit status and the message; the others
//! then fail on their own (within seconds when a process died over Gloo, after
//! `[distributed] timeout_s` otherwise), and any still running after a grace period are
//! killed. A checkpoint is renamed into place only when complete, so a kill never leaves a
//! half-written one.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Set in the environment of ranks started by `--nproc`.
pub const LAUNCHED_VAR: &str = "CALDPO_LAUNCHED_RANK";

/// How long the other ranks get to notice a failed rank and exit by themselves.
const GRACE: Duration = Duration::from_secs(30);

/// Runs this process's own command line as `nproc` ranks on this host; returns when all
/// have exited.
pub fn local(nproc: usize) -> Result<()> {
    // A port the user exported is kept (the ranks check it); otherwise any free one will do.
    let port = match std::env::var("MASTER_PORT") {
        Ok(port) => port,
        Err(_) => free_port()?.to_string(),
    };
    let exe = std::env::current_exe().context("cannot find the caldpo executable")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // N ranks each starting one OpenMP thread per core would oversubscribe the CPU many
    // times over; like torchrun, share the cores unless the user chose.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() / nproc).max(1);
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| threads.to_string());
    let mut ranks: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let child = Command::new(&exe)
            .args(&args)
            .env("OMP_NUM_THREADS", &threads)
            .env(LAUNCHED_VAR, "1")
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdin(Stdio::null())
            .spawn();
        match child {
            Ok(child) => ranks.push(Some(child)),
            Err(err) => {
                kill_all(&mut ranks, libc::SIGKILL);
                bail!("cannot start rank {rank} of {nproc}: {err}");
            }
        }
    }

    // Ctrl-C in a terminal reaches every rank directly; a signal sent to the launcher alone
    // is passed on, so that the ranks checkpoint and stop together. A second one kills them,
    // for ranks stuck in a collective that would otherwise wait out the timeout.
    let signalled = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&signalled))?;
    }
    let mut forwarded = false;
    let mut failure: Option<(usize, ExitStatus, Instant)> = None;
    loop {
        for (rank, slot) in ranks.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                if !status.success() && failure.is_none() {
                    failure = Some((rank, status, Instant::now()));
                }
                *slot = None;
            }
        }
        if ranks.iter().all(Option::is_none) {
            break;
        }
        if signalled.swap(false, Ordering::Relaxed) {
            kill_all(&mut ranks, if forwarded { libc::SIGKILL } else { libc::SIGINT });
            forwarded = true;
        }
        if failure.as_ref().is_some_and(|(_, _, at)| at.elapsed() > GRACE) {
            kill_all(&mut ranks, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match failure {
        // A rank that stops on a signal checkpoints and exits with status 1; anything else is
        // a failure of its own.
        Some((_, status, _)) if forwarded && status.code() == Some(1) => {
            bail!("interrupted; the ranks stopped after their checkpoint")
        }
        Some((rank, status, _)) => {
            bail!("rank {rank} of {nproc} {}; the job failed", describe(status))
        }
        None => Ok(()),
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended abnormally".into(),
    }
}

fn kill_all(ranks: &mut [Option<Child>], signal: i32) {
    for child in ranks.iter_mut().flatten() {
        // SAFETY: signalling a child we started and have not yet reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
    }
}

/// A TCP port free on the loopback interface now, for rank 0's rendezvous store.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free local port for the rendezvous")?;
    Ok(listener.local_addr()?.port())
}
