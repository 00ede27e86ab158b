//! The process group of a run: rank, world size and the collectives the training loop uses.
//!
//! A single process is a world of one, where every collective is the identity.

use anyhow::{bail, Result};
use caldpo_models::CausalLm;
use tch::Tensor;

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
                        anyhow::anyhow!("environment variable {name}={value:?} is not a number")
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

/// The collectives of a run.
pub struct Comm {
    info: WorldInfo,
}

impl Comm {
    /// A world of one process.
    pub fn single() -> Comm {
        Comm { info: WorldInfo { rank: 0, world_size: 1, local_rank: 0 } }
    }

    /// The process group described by the environment.
    pub fn from_env() -> Result<Comm> {
        let info = WorldInfo::from_env(|name| std::env::var(name).ok())?;
        if info.world_size > 1 {
            // FIXME(#8): data-parallel training over c10d is not built yet.
            bail!(
                "WORLD_SIZE={} asks for data-parallel training, which this build of caldpo \
                 does not support yet; run a single process",
                info.world_size
            );
        }
        Ok(Comm { info })
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }

    pub fn world_size(&self) -> usize {
        self.info.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.info.local_rank
    }

    /// Rank 0 alone writes files.
    pub fn is_main(&self) -> bool {
        self.info.rank == 0
    }

    pub fn barrier(&self) -> Result<()> {
        Ok(())
    }

    /// True on every rank when `flag` is true on any.
    pub fn any(&self, flag: bool) -> Result<bool> {
        Ok(flag)
    }

    /// Whether a device scalar is finite on every rank (a host sync).
    pub fn all_finite(&self, value: &Tensor) -> Result<bool> {
        Ok(bool::try_from(value.isfinite().all())?)
    }

    /// Sums every parameter's gradient across ranks.
    pub fn all_reduce_gradients<'a>(
        &self,
        _parameters: impl Iterator<Item = &'a Tensor>,
    ) -> Result<()> {
        Ok(())
    }

    /// Sums a tensor across ranks in place.
    pub fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<()> {
        Ok(())
    }

    /// Copies rank 0's parameters to every rank.
    pub fn broadcast_parameters(&self, _model: &CausalLm) -> Result<()> {
        Ok(())
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
