//! Device choice, and loading libtorch's CUDA half at run time.
//!
//! rustc links with `--as-needed`, and caldpo references no symbol of libtorch_cuda.so, so
//! the linker drops it and CUDA would never register even on a GPU host. Linking it with
//! `--no-as-needed` is no answer either: the CPU install ships libtorch_cuda.so without
//! cuBLAS or cuDNN, and such a binary would not start. So it is opened here, before the first
//! tensor operation, from the directory libtorch_cpu.so was loaded from; when that fails the
//! binary simply runs on the CPU, silently.

use std::ffi::CString;
use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::Device;

use crate::config::DeviceChoice;

/// Opens libtorch_cuda.so next to the loaded libtorch_cpu.so, if it loads; returns whether
/// it did.
pub fn load_cuda_backend() -> bool {
    let Some(lib_dir) = loaded_libtorch_dir() else { return false };
    let path = lib_dir.join("libtorch_cuda.so");
    if !path.exists() {
        return false;
    }
    let Ok(path) = CString::new(path.to_string_lossy().as_bytes()) else { return false };
    // SAFETY: dlopen with a valid C string; the handle is intentionally never closed, since
    // the library registers CUDA kernels with libtorch for the life of the process.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

/// The directory of the libtorch_cpu.so mapped into this process, from /proc/self/maps.
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| PathBuf::from(path).parent().map(PathBuf::from))
}

/// Resolves `[model] device` for local rank `local_rank`: cuda:LOCAL_RANK on GPUs.
pub fn select(choice: DeviceChoice, local_rank: usize) -> Result<Device> {
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if !cuda => Ok(Device::Cpu),
        DeviceChoice::Cuda if !cuda => {
            bail!("[model] device = \"cuda\" but no CUDA device is available to libtorch")
        }
        DeviceChoice::Auto | DeviceChoice::Cuda => {
            let count = tch::Cuda::device_count() as usize;
            let env = |name| std::env::var(name).ok();
            let index =
                gpu_index(local_rank, count, env("CUDA_VISIBLE_DEVICES"), env("LOCAL_WORLD_SIZE"))?;
            Ok(Device::Cuda(index))
        }
    }
}

/// The GPU of local rank `local_rank` among the `count` this process sees, given
/// CUDA_VISIBLE_DEVICES and LOCAL_WORLD_SIZE.
fn gpu_index(
    local_rank: usize,
    count: usize,
    visible: Option<String>,
    local_world_size: Option<String>,
) -> Result<usize> {
    // A scheduler that gives each rank its own GPU (SLURM's --gpus-per-task=1) shows it as
    // the only device through CUDA_VISIBLE_DEVICES, whatever the local rank. torchrun and
    // --nproc say how many ranks share the host: when that is more than one, a single visible
    // GPU is shared, not owned.
    let shared_host = local_world_size
        .and_then(|value| value.trim().parse::<usize>().ok())
        .is_some_and(|ranks| ranks > 1);
    let own_gpu =
        !shared_host && visible.is_some_and(|list| !list.trim().is_empty() && !list.contains(','));
    match local_rank {
        index if index < count => Ok(index),
        _ if count == 1 && own_gpu => Ok(0),
        _ => bail!(
            "local rank {local_rank} has no GPU of its own: this host shows {count} (run at most \
             one rank per GPU)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::gpu_index;

    fn some(value: &str) -> Option<String> {
        Some(value.to_string())
    }

    #[test]
    fn each_local_rank_takes_its_own_gpu() {
        assert_eq!(gpu_index(3, 8, None, some("8")).unwrap(), 3);
        assert!(gpu_index(2, 2, some("0,1"), some("3")).is_err());
    }

    #[test]
    fn a_rank_given_one_gpu_by_the_scheduler_takes_it() {
        // SLURM with --gpus-per-task=1: local rank 5 sees one GPU, its own.
        assert_eq!(gpu_index(5, 1, some("5"), None).unwrap(), 0);
        assert_eq!(gpu_index(1, 1, some("2"), some("1")).unwrap(), 0);
    }

    #[test]
    fn ranks_sharing_one_visible_gpu_are_refused() {
        // --nproc 2 with CUDA_VISIBLE_DEVICES=0: rank 0 takes it, rank 1 has none.
        assert_eq!(gpu_index(0, 1, some("0"), some("2")).unwrap(), 0);
        let err = gpu_index(1, 1, some("0"), some("2")).unwrap_err().to_string();
        assert!(err.contains("local rank 1 has no GPU of its own"), "{err}");
    }
}
