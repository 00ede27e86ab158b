//! libtorch 2.11.0 from PyPI's torch wheel.
//!
//! The wheel's libraries carry an RPATH of `$ORIGIN/../../nvidia/...`, so the install keeps
//! pip's layout: `torch/` and `nvidia/` side by side in one directory, and `LIBTORCH` is
//! its `torch/` folder (which holds `include/` and `lib/`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The libtorch version tch 0.24's torch-sys is built for.
pub const TORCH_VERSION: &str = "2.11.0";

/// Which dependency set of the torch wheel to install.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// The wheel alone plus the two CUDA libraries that libtorch_cpu.so links against.
    Cpu,
    /// The wheel with its full CUDA 13.0 dependency set, plus CUDA's compiler headers
    /// (crt, cccl) that c10d's NCCL headers need and torch does not depend on.
    Cu130,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Cpu => "cpu",
            Variant::Cu130 => "cu130",
        }
    }

    fn pip_args(self) -> Vec<String> {
        let torch = format!("torch=={TORCH_VERSION}");
        match self {
            Variant::Cpu => vec![
                "--no-deps".into(),
                torch,
                "nvidia-cuda-runtime==13.0.96".into(),
                "nvidia-cuda-cupti==13.0.85".into(),
            ],
            Variant::Cu130 => {
                vec![torch, "nvidia-cuda-crt==13.0.88".into(), "nvidia-cuda-cccl==13.0.85".into()]
            }
        }
    }
}

/// Returns a `LIBTORCH` directory holding libtorch 2.11.0, installing it when needed, with
/// gloo's headers for the trainer's c10d shim.
pub fn ensure(variant: Variant, dir: Option<&Path>) -> Result<PathBuf> {
    crate::gloo::ensure()?;
    if let Some(existing) = std::env::var_os("LIBTORCH").filter(|value| !value.is_empty()) {
        let existing = PathBuf::from(existing);
        check_version(&existing)
            .with_context(|| format!("LIBTORCH={} is not usable", existing.display()))?;
        return Ok(existing);
    }
    let root = match dir {
        Some(dir) => dir.to_path_buf(),
        None => crate::cache_root()?.join(format!("libtorch-{TORCH_VERSION}-{}", variant.name())),
    };
    let libtorch = root.join("torch");
    if is_complete(&root, variant) {
        println!(
            "libtorch {TORCH_VERSION} ({}) already installed at {}",
            variant.name(),
            libtorch.display()
        );
        return Ok(libtorch);
    }
    install(&root, variant)?;
    check_version(&libtorch)?;
    Ok(libtorch)
}

/// An install is complete when the libraries and the runtime they link are all present;
/// installs land in a temporary directory first, so a partial one never has this name.
fn is_complete(root: &Path, variant: Variant) -> bool {
    let lib = root.join("torch").join("lib");
    let mut required = vec![lib.join("libtorch_cpu.so"), lib.join("libc10.so")];
    required.push(root.join("nvidia/cu13/lib/libcudart.so.13"));
    if variant == Variant::Cu130 {
        required.push(lib.join("libtorch_cuda.so"));
        required.push(root.join("nvidia/nccl/include/nccl.h"));
    }
    required.iter().all(|path| path.exists()) && check_version(&root.join("torch")).is_ok()
}

fn install(root: &Path, variant: Variant) -> Result<()> {
    let started = Instant::now();
    let parent = root.parent().context("install directory has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.partial",
        root.file_name().context("install directory has no name")?.to_string_lossy()
    ));
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    println!(
        "installing libtorch {TORCH_VERSION} ({}) from PyPI into {}",
        variant.name(),
        root.display()
    );
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--no-compile", "--disable-pip-version-check"])
        .arg("--target")
        .arg(&staging)
        .args(variant.pip_args());
    crate::status(&mut pip).context("pip could not install the torch wheel (is pip installed?)")?;
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("cannot replace {}", root.display()))?;
    }
    fs::rename(&staging, root)
        .with_context(|| format!("cannot move {} to {}", staging.display(), root.display()))?;
    println!("libtorch installed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Reads the version of a libtorch directory: `build-version` (the libtorch zip layout) or
/// `version.py` (the wheel layout), and requires 2.11.0.
pub fn check_version(libtorch: &Path) -> Result<()> {
    if !libtorch.join("lib").is_dir() || !libtorch.join("include").is_dir() {
        bail!("{} has no lib/ and include/ directories", libtorch.display());
    }
    let version = read_version(libtorch)?;
    let release = version.split('+').next().unwrap_or_default().trim();
    if release != TORCH_VERSION {
        bail!(
            "{} holds libtorch {version}, but caldpo (tch 0.24) needs {TORCH_VERSION}; unset \
             LIBTORCH to let `cargo xtask libtorch` install it",
            libtorch.display()
        );
    }
    Ok(())
}

fn read_version(libtorch: &Path) -> Result<String> {
    let build_version = libtorch.join("build-version");
    if let Ok(text) = fs::read_to_string(&build_version) {
        return Ok(text.trim().to_string());
    }
    let version_py = libtorch.join("version.py");
    let text = fs::read_to_string(&version_py).with_context(|| {
        format!("cannot read {} or {}", build_version.display(), version_py.display())
    })?;
    text.lines()
        .find_map(|line| line.strip_prefix("__version__ = "))
        .map(|value| value.trim().trim_matches(['\'', '"']).to_string())
        .with_context(|| format!("{}: no __version__ line", version_py.display()))
}
