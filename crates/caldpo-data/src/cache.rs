//! On-disk cache of tokenised datasets, so that a second start skips tokenisation.
//!
//! One file per (data file bytes, tokenizer fingerprint, schema, limits, crate version),
//! named by the hex SHA-256 of those. The format is little-endian binary: a magic, a format
//! version, the load report as JSON, then per pair its id, prompt length and the two id
//! sequences as u32 (labels follow from the prompt length). Files are written to a temporary
//! name and renamed, so a reader never sees half a file; a file that fails to parse is
//! ignored and rewritten.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::dataset::{LoadReport, PairDataset, PairExample, TokenizedSequence, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::tokenize::PairTokenizer;

const MAGIC: &[u8; 8] = b"CALDPOTK";
const FORMAT_VERSION: u32 = 1;

/// The cache file for `path` under these settings, or None when there is no cache
/// directory (`cache_dir` unset and no `$HOME`).
pub(crate) fn entry(
    path: &Path,
    config: &DataConfig,
    tokenizer: &PairTokenizer,
    cache_dir: Option<&Path>,
) -> Result<Option<PathBuf>> {
    let dir = match cache_dir {
        Some(dir) => dir.to_path_buf(),
        None => match std::env::var_os("HOME") {
            Some(home) => Path::new(&home).join(".cache/caldpo/tokenized"),
            None => return Ok(None),
        },
    };
    let mut hasher = Sha256::new();
    hasher.update(b"caldpo-data tokenized cache\0");
    hasher.update(env!("CARGO_PKG_VERSION").as_bytes());
    hasher.update(FORMAT_VERSION.to_le_bytes());
    hasher.update(file_digest(path)?);
    hasher.update(tokenizer.fingerprint().as_bytes());
    let settings = (
        config.format,
        &config.columns,
        config.max_length,
        config.max_prompt_length,
        config.skip_bad_rows,
    );
    hasher.update(serde_json::to_vec(&settings).expect("settings serialise"));
    Ok(Some(dir.join(hex::encode(hasher.finalize()))))
}

fn file_digest(path: &Path) -> Result<[u8; 32]> {
    let io_error = |source| Error::Io { path: path.to_path_buf(), source };
    let mut file = BufReader::new(File::open(path).map_err(io_error)?);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io_error)?;
        if read == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buffer[..read]);
    }
}

/// The cached dataset, or None when the file is absent or unreadable.
pub(crate) fn read(file: &Path) -> Option<PairDataset> {
    let mut reader = BufReader::new(File::open(file).ok()?);
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic).ok()?;
    if &magic != MAGIC || read_u32(&mut reader)? != FORMAT_VERSION {
        return None;
    }
    let report_len = read_u64(&mut reader)? as usize;
    let mut report_json = vec![0u8; report_len];
    reader.read_exact(&mut report_json).ok()?;
    let report: LoadReport = serde_json::from_slice(&report_json).ok()?;
    let count = read_u64(&mut reader)? as usize;
    let mut examples = Vec::with_capacity(count.min(1 << 24));
    for _ in 0..count {
        let id = read_u64(&mut reader)?;
        let prompt_len = read_u32(&mut reader)? as usize;
        let chosen = read_sequence(&mut reader, prompt_len)?;
        let rejected = read_sequence(&mut reader, prompt_len)?;
        examples.push(PairExample { id, prompt_len, chosen, rejected });
    }
    let mut rest = [0u8; 1];
    if reader.read(&mut rest).ok()? != 0 || report.kept != examples.len() {
        return None;
    }
    Some(PairDataset { examples, report })
}

fn read_sequence(reader: &mut impl Read, prompt_len: usize) -> Option<TokenizedSequence> {
    let len = read_u32(reader)? as usize;
    if len < prompt_len {
        return None;
    }
    let mut bytes = vec![0u8; len * 4];
    reader.read_exact(&mut bytes).ok()?;
    let input_ids: Vec<i64> = bytes
        .chunks_exact(4)
        .map(|b| i64::from(u32::from_le_bytes(b.try_into().expect("4-byte chunk"))))
        .collect();
    let mut labels = input_ids.clone();
    labels[..prompt_len].fill(IGNORE_INDEX);
    Some(TokenizedSequence { input_ids, labels })
}

fn read_u32(reader: &mut impl Read) -> Option<u32> {
    let mut bytes = [0u8; 4];
    reader.read_exact(&mut bytes).ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn read_u64(reader: &mut impl Read) -> Option<u64> {
    let mut bytes = [0u8; 8];
    reader.read_exact(&mut bytes).ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Writes `dataset` to `file` atomically (temporary file in the same directory, then rename).
pub(crate) fn write(file: &Path, dataset: &PairDataset) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        file.file_name().and_then(|n| n.to_str()).unwrap_or("cache"),
        std::process::id()
    ));
    let written = write_to(&temporary, dataset).map_err(io_error(&temporary));
    let renamed = written.and_then(|()| fs::rename(&temporary, file).map_err(io_error(file)));
    if renamed.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    renamed
}

fn write_to(path: &Path, dataset: &PairDataset) -> std::io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    let report = serde_json::to_vec(&dataset.report).expect("the report serialises");
    out.write_all(&(report.len() as u64).to_le_bytes())?;
    out.write_all(&report)?;
    out.write_all(&(dataset.examples.len() as u64).to_le_bytes())?;
    for example in &dataset.examples {
        out.write_all(&example.id.to_le_bytes())?;
        out.write_all(&(example.prompt_len as u32).to_le_bytes())?;
        for sequence in [&example.chosen, &example.rejected] {
            out.write_all(&(sequence.input_ids.len() as u32).to_le_bytes())?;
            for &id in &sequence.input_ids {
                // Token ids come from a u32 vocabulary.
                out.write_all(&(id as u32).to_le_bytes())?;
            }
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}
