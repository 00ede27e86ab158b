//! The process group of a run: rank, world size and the collectives the training loop uses.
//!
//! A single process is a world of one, where every collective is the identity. A larger world
//! runs c10d (Gloo on the CPU, NCCL on GPUs) through the shim in `c10d`. Before every
//! collective a rank records in the rendezvous store how many collectives it has entered, and
//! a heartbeat thread in each rank ticks there every second, so that a failed or timed-out
//! collective can name the rank that died (its heartbeat stopped) or hangs (it is alive but
//! never entered the collective).

use std::cell::Cell;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use caldpo_models::CausalLm;
use tch::{Device, Kind, Tensor};

use crate::c10d::{self, GroupOptions, ProcessGroup};
use crate::config::{Backend, DistributedSection};

/// Rank and world of this process, from torchrun's or SLURM's environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldInfo {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
}

impl WorldInfo {
    /// RANK, WORLD_SIZE, LOCAL_RANK (torchrun), falling back to SLURM_PROCID, SLURM_NTASKS,
    /// SLURM_LOCALID; a world of one when neither is set.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<WorldInfo> {
        let read = |names: [&str; 2], default: usize| -> Result<usize> {
            for name in names {
                if let Some(value) = get(name) {
                    return value.trim().parse().map_err(|_| {
                        anyhow!("environment variable {name}={value:?} is not a number")
                    });
                }
            }
            Ok(default)
        };
        let world_size = read(["WORLD_SIZE", "SLURM_NTASKS"], 1)?;
        let rank = read(["RANK", "SLURM_PROCID"], 0)?;
        let local_rank = read(["LOCAL_RANK", "SLURM_LOCALID"], rank)?;
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} does not fit world size {world_size}");
        }
        Ok(WorldInfo { rank, world_size, local_rank })
    }
}

/// The process group of a world larger than one.
struct Group {
    group: ProcessGroup,
    backend: &'static str,
    /// MASTER_ADDR:MASTER_PORT, for messages.
    endpoint: String,
    /// Prefix of this job's keys in the store.
    prefix: String,
    /// Collectives this rank has entered.
    entered: Cell<i64>,
}

/// What every rank learns at the end of a step's backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepAgreement {
    /// The loss and gradient norm are finite on every rank.
    pub finite: bool,
    /// Some rank was asked to stop (SIGINT or SIGTERM).
    pub stop: bool,
}

/// The collectives of a run.
pub struct Comm {
    info: WorldInfo,
    group: Option<Group>,
    /// Where the rank's tensors live; small collective buffers are made there.
    device: Device,
}

/// How long a heartbeat is watched before its rank is called dead; it ticks every second.
const HEARTBEAT_WATCH: Duration = Duration::from_millis(2500);

impl Comm {
    /// A world of one process.
    pub fn single() -> Comm {
        let info = WorldInfo { rank: 0, world_size: 1, local_rank: 0 };
        Comm { info, group: None, device: Device::Cpu }
    }

    /// Joins the world `info` describes, at MASTER_ADDR:MASTER_PORT from the environment; a
    /// world of one needs neither.
    pub fn connect(info: WorldInfo, settings: &DistributedSection, device: Device) -> Result<Comm> {
        if info.world_size == 1 {
            return Ok(Comm { info, group: None, device });
        }
        let addr = std::env::var("MASTER_ADDR").map_err(|_| {
            anyhow!(
                "WORLD_SIZE={} but MASTER_ADDR is not set: every rank needs the address of rank \
                 0's host (torchrun sets it; under SLURM, export it in the batch script)",
                info.world_size
            )
        })?;
        let port = std::env::var("MASTER_PORT").unwrap_or_else(|_| "29500".into());
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| anyhow!("environment variable MASTER_PORT={port:?} is not a port"))?;
        let nccl_device = match (settings.backend, device) {
            (Backend::Nccl, Device::Cuda(index)) => Some(index),
            (Backend::Auto, Device::Cuda(index)) if c10d::has_nccl() => Some(index),
            (Backend::Nccl, _) => bail!("[distributed] backend = \"nccl\" needs CUDA devices"),
            _ => None,
        };
        if nccl_device.is_some() && !c10d::has_nccl() {
            bail!(
                "[distributed] backend = \"nccl\": this caldpo was built against CPU libtorch, \
                 without NCCL; rebuild it after `cargo xtask libtorch --variant cu130`"
            );
        }
        if nccl_device.is_none() && device.is_cuda() {
            tracing::warn!(
                "reducing CUDA tensors through Gloo: every collective copies to the CPU"
            );
        }
        // torchrun serves the store itself (TORCHELASTIC_USE_AGENT_STORE) and counts its
        // restarts; keys carry the count so a restarted job never reads a stale heartbeat.
        let agent_store =
            std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|value| value == "True");
        let restart = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|_| "0".into());
        let prefix = format!("caldpo/{}", restart.trim());
        let options = GroupOptions {
            master_addr: &addr,
            master_port: port,
            serve_store: info.rank == 0 && !agent_store,
            key_prefix: &prefix,
            rank: info.rank,
            world_size: info.world_size,
            timeout: Duration::from_secs(settings.timeout_s),
            nccl_device,
        };
        let endpoint = format!("{addr}:{port}");
        let bucket_bytes = (settings.bucket_mb as i64) << 20;
        let group = ProcessGroup::new(&options, bucket_bytes).with_context(|| {
            format!(
                "rank {} of {} could not join the rendezvous at {endpoint} within {} s",
                info.rank, info.world_size, settings.timeout_s
            )
        })?;
        let backend = if nccl_device.is_some() { "nccl" } else { "gloo" };
        let group = Group { group, backend, endpoint, prefix, entered: Cell::new(0) };
        Ok(Comm { info, group: Some(group), device })
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }

    pub fn world_size(&self) -> usize {
        self.info.world_size
    }

    /// This rank's index on its host.
    pub fn local_rank(&self) -> usize {
        self.info.local_rank
    }

    /// Rank 0 alone writes files.
    pub fn is_main(&self) -> bool {
        self.info.rank == 0
    }

    /// `gloo`, `nccl`, or `none` in a world of one.
    pub fn backend(&self) -> &'static str {
        self.group.as_ref().map_or("none", |group| group.backend)
    }

    /// Runs collective `what` when there is a group: counts it in the store first, and turns
    /// a failure into an error that names the missing rank. The count is one round trip to
    /// the store a collective, a few a step: the price of telling a hung rank from a dead one.
    fn collective(&self, what: &str, run: impl FnOnce(&ProcessGroup) -> Result<()>) -> Result<()> {
        let Some(group) = &self.group else { return Ok(()) };
        let entered = group.entered.get() + 1;
        group.entered.set(entered);
        let rank = self.info.rank;
        if let Err(err) =
            group.group.store_set(&format!("{}/entered/{rank}", group.prefix), entered)
        {
            bail!("{what} on rank {rank}: {}\n(c10d: {err})", store_lost(group));
        }
        run(&group.group).map_err(|err| {
            anyhow!(
                "{what} failed on rank {rank}: {}\n(c10d: {err})",
                self.diagnose(group, entered)
            )
        })
    }

    /// Which rank made collective number `entered` fail: one whose heartbeat stopped, else
    /// one that is alive but never entered it.
    fn diagnose(&self, group: &Group, entered: i64) -> String {
        let others: Vec<usize> =
            (0..self.info.world_size).filter(|rank| *rank != self.info.rank).collect();
        let read = |what: &str| -> Result<Vec<i64>> {
            others
                .iter()
                .map(|rank| {
                    let key = format!("{}/{what}/{rank}", group.prefix);
                    Ok(group.group.store_get(&key)?.unwrap_or(0))
                })
                .collect()
        };
        let Ok(before) = read("heartbeat") else { return store_lost(group) };
        std::thread::sleep(HEARTBEAT_WATCH);
        let (Ok(after), Ok(progress)) = (read("heartbeat"), read("entered")) else {
            return store_lost(group);
        };
        let dead: Vec<usize> = (0..others.len()).filter(|i| after[*i] <= before[*i]).collect();
        if !dead.is_empty() {
            let whose = if dead.len() == 1 { "its heartbeat" } else { "their heartbeats" };
            return format!(
                "{} not responding: {whose} stopped (the process died, was killed or is \
                 frozen)",
                name_ranks(dead.iter().map(|i| others[*i]))
            );
        }
        let behind: Vec<usize> = (0..others.len()).filter(|i| progress[*i] < entered).collect();
        if !behind.is_empty() {
            // Rank 0 alone writes checkpoints and samples while the others wait.
            let hint = if behind.iter().any(|i| others[*i] == 0) {
                "; if rank 0 was writing a checkpoint or generating samples, raise \
                 [distributed] timeout_s"
            } else {
                ""
            };
            return format!(
                "{} alive but did not reach this collective within [distributed] timeout_s: it \
                 hangs, or works far slower than this rank{hint}",
                name_ranks(behind.iter().map(|i| others[*i]))
            );
        }
        "every rank is alive and reached this collective; the connection between them failed".into()
    }

    /// True on every rank when `flag` is true on any.
    pub fn any(&self, flag: bool) -> Result<bool> {
        if self.group.is_none() {
            return Ok(flag);
        }
        let count = Tensor::from(f32::from(u8::from(flag))).to_device(self.device);
        self.collective("agreeing on a stop", |group| group.all_reduce(&[&count], false))?;
        Ok(f64::try_from(&count)? > 0.0)
    }

    /// Runs `work` (`what`, for messages) on the ranks where `here` holds, rank 0 writing a
    /// checkpoint say, and fails on every rank when it failed on any: a rank that stopped
    /// alone would leave the others waiting in their next collective, and blaming it, until
    /// the timeout. Also a barrier: no rank goes on before the work is done.
    pub fn run_where(
        &self,
        here: bool,
        what: &str,
        work: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let result = if here { work() } else { Ok(()) };
        if self.any(result.is_err())? {
            result?;
            bail!("another rank could not {what}");
        }
        Ok(())
    }

    /// Whether a device scalar is finite on every rank, and whether any rank was asked to
    /// stop: both in one reduction and one host sync.
    pub fn agree_on_step(&self, value: &Tensor, stop: bool) -> Result<StepAgreement> {
        let bad = value.isfinite().logical_not().to_kind(Kind::Float).reshape([1]);
        let stop = Tensor::from_slice(&[f32::from(u8::from(stop))]).to_device(value.device());
        let flags = Tensor::cat(&[bad, stop], 0);
        self.collective("agreeing on the step", |group| group.all_reduce(&[&flags], false))?;
        let flags = Vec::<f32>::try_from(flags.to_device(Device::Cpu))?;
        Ok(StepAgreement { finite: flags[0] == 0.0, stop: flags[1] > 0.0 })
    }

    /// Sums every parameter's gradient across ranks. A parameter without a gradient (on a
    /// rank without pairs in this step) gets zeros first, so every rank reduces the same
    /// buckets.
    pub fn all_reduce_gradients<'a>(
        &self,
        parameters: impl Iterator<Item = &'a Tensor>,
    ) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let parameters: Vec<&Tensor> = parameters.collect();
        let missing: Vec<Tensor> = parameters
            .iter()
            .filter(|parameter| !parameter.grad().defined())
            .map(|parameter| parameter.sum(Kind::Float) * 0.0)
            .collect();
        if !missing.is_empty() {
            Tensor::stack(&missing, 0).sum(Kind::Float).backward();
        }
        let grads: Vec<Tensor> = parameters.iter().map(|parameter| parameter.grad()).collect();
        let grads: Vec<&Tensor> = grads.iter().collect();
        self.collective("all-reduce of the gradients", |group| group.all_reduce(&grads, false))
    }

    /// Sums a tensor across ranks in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let tensor = &*tensor;
        self.collective("all-reduce of the metrics", |group| group.all_reduce(&[tensor], false))
    }

    /// Every rank's `tensor` (the same shape on all), stacked as [world, *shape].
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        if self.group.is_none() {
            return Ok(tensor.unsqueeze(0));
        }
        let mut gathered = None;
        self.collective("all-gather", |group| {
            gathered = Some(group.all_gather(tensor, self.info.world_size)?);
            Ok(())
        })?;
        Ok(gathered.expect("a successful all-gather has an output"))
    }

    /// Copies rank 0's parameters to every rank.
    pub fn broadcast_parameters(&self, model: &CausalLm) -> Result<()> {
        let parameters: Vec<Tensor> =
            model.named_parameters().into_iter().map(|(_, tensor)| tensor).collect();
        let parameters: Vec<&Tensor> = parameters.iter().collect();
        tch::no_grad(|| {
            self.collective("broadcast of the parameters", |group| group.broadcast(&parameters, 0))
        })
    }
}

fn store_lost(group: &Group) -> String {
    format!(
        "the rendezvous store at {} is unreachable: rank 0 (or the launcher that serves it) \
         died, or its host is down",
        group.endpoint
    )
}

/// "rank 1 is" or "ranks 1, 3 are".
fn name_ranks(ranks: impl Iterator<Item = usize>) -> String {
    let list: Vec<String> = ranks.map(|rank| rank.to_string()).collect();
    match list.as_slice() {
        [one] => format!("rank {one} is"),
        _ => format!("ranks {} are", list.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(key, _)| *key == name).map(|(_, value)| value.to_string())
    }

    #[test]
    fn torchrun_then_slurm_then_single() {
        let torchrun = [("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")];
        assert_eq!(
            WorldInfo::from_env(env(&torchrun)).unwrap(),
            WorldInfo { rank: 3, world_size: 4, local_rank: 1 }
        );
        let slurm = [("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1")];
        assert_eq!(
            WorldInfo::from_env(env(&slurm)).unwrap(),
            WorldInfo { rank: 5, world_size: 8, local_rank: 1 }
        );
        assert_eq!(WorldInfo::from_env(env(&[])).unwrap().world_size, 1);
        assert!(WorldInfo::from_env(env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).is_err());
    }
}
