//! Compiles the c10d shim (csrc/c10d_shim.cpp) against the libtorch tch links, and gives the
//! `caldpo` binary (and the test binaries) an rpath to libtorch's lib directory, so it runs
//! from any directory without LD_LIBRARY_PATH.
//!
//! The Gloo part needs gloo's headers (Debian's libgloo-dev; `cargo xtask libtorch` installs
//! it). The NCCL part is built only when the libtorch install is the CUDA variant, recognised
//! by nccl.h beside it; `CALDPO_NCCL=0` turns it off.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=CALDPO_NCCL");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports its libtorch directory"),
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let root = lib.parent().expect("libtorch's lib directory has a parent").to_path_buf();

    let gloo =
        std::env::var_os("GLOO_INCLUDE_DIR").map_or_else(|| "/usr/include".into(), PathBuf::from);
    if !gloo.join("gloo/config.h").exists() {
        panic!(
            "gloo's headers are missing from {}: install them with `apt-get install \
             libgloo-dev` (cargo xtask libtorch does this) or point GLOO_INCLUDE_DIR at them",
            gloo.display()
        );
    }

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/c10d_shim.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's own headers raise hundreds of warnings that are not caldpo's to fix and
        // would bury the shim's.
        .warnings(false);
    let nccl = nccl_includes(&root);
    if let Some(includes) = &nccl {
        for dir in includes {
            build.include(dir);
        }
        build.define("CALDPO_NCCL", None).define("USE_C10D_NCCL", None).define("USE_CUDA", None);
    }
    build.compile("caldpo_c10d");
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The CUDA, CCCL and NCCL include directories of a cu130 libtorch install (torch/ and
/// nvidia/ side by side), or `None` for a CPU install or when CALDPO_NCCL=0.
fn nccl_includes(torch_root: &Path) -> Option<Vec<PathBuf>> {
    if std::env::var("CALDPO_NCCL").is_ok_and(|value| value == "0") {
        return None;
    }
    let nvidia = torch_root.parent()?.join("nvidia");
    let dirs = vec![
        nvidia.join("cu13/include"),
        nvidia.join("cu13/include/cccl"),
        nvidia.join("nccl/include"),
    ];
    let complete = dirs[2].join("nccl.h").exists()
        && dirs[0].join("crt").exists()
        && torch_root.join("lib/libtorch_cuda.so").exists();
    complete.then_some(dirs)
}
