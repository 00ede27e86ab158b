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
            // A scheduler that gives each rank its own GPU (SLURM's --gpus-per-task=1) shows
            // it as the only device through CUDA_VISIBLE_DEVICES, whatever the local rank.
            let own_gpu = std::env::var("CUDA_VISIBLE_DEVICES")
                .is_ok_and(|list| !list.trim().is_empty() && !list.contains(','));
            match local_rank {
                index if index < count => Ok(Device::Cuda(index)),
                _ if count == 1 && own_gpu => Ok(Device::Cuda(0)),
                _ => bail!(
                    "local rank {local_rank} has no GPU of its own: this host shows {count} \
                     (run at most one rank per GPU)"
                ),
            }
        }
    }
}
