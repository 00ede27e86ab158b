//! Gloo's headers, which the trainer's c10d shim compiles against (libtorch ships Gloo's
//! library inside libtorch_cpu.so but not its headers).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

/// Where the trainer's build script looks: `GLOO_INCLUDE_DIR`, else /usr/include.
fn include_dir() -> PathBuf {
    std::env::var_os("GLOO_INCLUDE_DIR").map_or_else(|| "/usr/include".into(), PathBuf::from)
}

/// Installs Debian's libgloo-dev with apt-get when the headers are missing and this process
/// may (it runs as root); otherwise says how.
pub fn ensure() -> Result<()> {
    let dir = include_dir();
    if dir.join("gloo/config.h").exists() {
        return Ok(());
    }
    let uid = Command::new("id").arg("-u").output().map(|out| out.stdout).unwrap_or_default();
    let root = String::from_utf8_lossy(&uid).trim() == "0";
    let apt = Command::new("apt-get").arg("--version").output().is_ok();
    if !(root && apt) {
        bail!(
            "gloo's headers are missing from {}: install them with `sudo apt-get install \
             libgloo-dev` (Debian, Ubuntu), or set GLOO_INCLUDE_DIR to a directory holding \
             gloo/config.h",
            dir.display()
        );
    }
    println!("installing gloo's headers (libgloo-dev) with apt-get");
    let install = || {
        let mut command = Command::new("apt-get");
        command.args(["install", "-y", "--no-install-recommends", "libgloo-dev"]);
        command.env("DEBIAN_FRONTEND", "noninteractive");
        crate::status(&mut command)
    };
    // A fresh container has no package lists yet: update once and retry.
    if install().is_err() {
        crate::status(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    if !dir.join("gloo/config.h").exists() {
        bail!("libgloo-dev is installed but {} has no gloo/config.h", dir.display());
    }
    Ok(())
}
