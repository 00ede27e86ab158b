//! The reference side of the log-ratios: a frozen model, or log-probs precomputed once and
//! cached on disk.
//!
//! The cache is keyed by the reference weights, the tokeniser and template, and the
//! truncation limits; inside it each pair is found by its stable id, so the sample order,
//! the loss and beta can all change without recomputing. Train and eval pairs have separate
//! files.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use caldpo_core::{ChosenRejected, SequenceLogps};
use caldpo_data::{collate, PairExample};
use caldpo_models::CausalLm;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::batch::{policy_logps, DeviceBatch};
use crate::dist::Comm;

/// Where reference log-probs come from during training and evaluation.
pub enum Reference {
    /// A frozen model evaluated under `no_grad` for every batch.
    Model(Box<CausalLm>),
    /// Log-probs computed before training, looked up by pair id.
    Cached(ReferenceCache),
    /// No reference (reference-free losses such as SimPO).
    None,
}

impl Reference {
    /// Reference log-probs for a batch, or `None` without a reference.
    pub fn logps(
        &self,
        batch: &DeviceBatch,
        chunk_tokens: i64,
    ) -> Result<Option<ChosenRejected<SequenceLogps>>> {
        match self {
            Reference::Model(model) => {
                let logps = tch::no_grad(|| policy_logps(model, batch, chunk_tokens))?;
                Ok(Some(logps.split_pairs()))
            }
            Reference::Cached(cache) => cache.lookup(&batch.pair_ids, batch.device).map(Some),
            Reference::None => Ok(None),
        }
    }
}

/// Per-pair reference statistics held on the training device.
pub struct ReferenceCache {
    rows: HashMap<u64, usize>,
    /// [pairs, 6]: chosen sum, count, mean logit, then the same for rejected.
    values: Tensor,
}

const COLUMNS: i64 = 6;

impl ReferenceCache {
    /// Loads `file` when it covers every pair, else computes the missing pairs with `model`
    /// and the first rank of every host rewrites it. Each rank computes a contiguous share of
    /// the missing pairs, and the shares are gathered so that every rank holds them all.
    /// Returns the cache and how many pairs were computed.
    pub fn build(
        file: &Path,
        examples: &[&PairExample],
        model: &CausalLm,
        batch_size: usize,
        pad_token_id: i64,
        chunk_tokens: i64,
        comm: &Comm,
    ) -> Result<(ReferenceCache, usize)> {
        let (mut ids, mut values) = read_cache(file).unwrap_or_default();
        let known: HashMap<u64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut missing: Vec<&PairExample> =
            examples.iter().copied().filter(|example| !known.contains_key(&example.id)).collect();
        if !agree_on(comm, &missing)? {
            // Ranks on different hosts can hold different caches: then all of it is redone.
            (ids, values, missing) = (Vec::new(), Vec::new(), examples.to_vec());
        }
        if missing.is_empty() {
            let rows = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            let values = Tensor::from_slice(&values)
                .view([ids.len() as i64, COLUMNS])
                .to_device(model.device());
            return Ok((ReferenceCache { rows, values }, 0));
        }
        let share = missing.len().div_ceil(comm.world_size());
        let start = (comm.rank() * share).min(missing.len());
        let mine = &missing[start..(start + share).min(missing.len())];
        let computed = Tensor::zeros([share as i64, COLUMNS], (Kind::Float, model.device()));
        let batch_size = batch_size.max(1);
        for (index, chunk) in mine.chunks(batch_size).enumerate() {
            let batch = DeviceBatch::new(collate(chunk, pad_token_id), model.device());
            let logps = tch::no_grad(|| policy_logps(model, &batch, chunk_tokens))?.split_pairs();
            let rows = Tensor::stack(
                &[
                    &logps.chosen.sum,
                    &logps.chosen.token_count,
                    &logps.chosen.mean_logit,
                    &logps.rejected.sum,
                    &logps.rejected.token_count,
                    &logps.rejected.mean_logit,
                ],
                1,
            );
            let offset = (index * batch_size) as i64;
            tch::no_grad(|| {
                computed.narrow(0, offset, chunk.len() as i64).copy_(&rows.to_kind(Kind::Float))
            });
        }
        // Shares are full up to the last pair, so the gathered rows are the missing pairs in
        // order, followed by padding.
        let gathered = comm.all_gather(&computed)?.flatten(0, 1).narrow(0, 0, missing.len() as i64);
        values.extend(Vec::<f32>::try_from(gathered.to_device(Device::Cpu).flatten(0, 1))?);
        ids.extend(missing.iter().map(|example| example.id));
        // One writer a host, so that hosts without a shared cache directory each keep theirs;
        // where the directory is shared, each writes its own temporary file and the renames
        // replace one complete file with an equal one.
        comm.run_where(comm.local_rank() == 0, "write the reference log-prob cache", || {
            write_cache(file, &ids, &values, comm.rank())
        })?;
        let rows = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let values =
            Tensor::from_slice(&values).view([ids.len() as i64, COLUMNS]).to_device(model.device());
        Ok((ReferenceCache { rows, values }, missing.len()))
    }

    /// One cache holding the pairs of both.
    pub fn merge(self, other: ReferenceCache) -> ReferenceCache {
        let offset = self.values.size()[0] as usize;
        let mut rows = self.rows;
        rows.extend(other.rows.into_iter().map(|(id, row)| (id, row + offset)));
        ReferenceCache { rows, values: Tensor::cat(&[self.values, other.values], 0) }
    }

    /// The cached statistics of these pairs, in order.
    fn lookup(&self, pair_ids: &[u64], device: Device) -> Result<ChosenRejected<SequenceLogps>> {
        let rows = pair_ids
            .iter()
            .map(|id| self.rows.get(id).map(|row| *row as i64))
            .collect::<Option<Vec<i64>>>()
            .context(
                "a pair has no cached reference log-probs; the cache does not match the data",
            )?;
        let picked = self.values.index_select(0, &Tensor::from_slice(&rows).to_device(device));
        let column = |i: i64| picked.select(1, i);
        Ok(ChosenRejected {
            chosen: SequenceLogps { sum: column(0), token_count: column(1), mean_logit: column(2) },
            rejected: SequenceLogps {
                sum: column(3),
                token_count: column(4),
                mean_logit: column(5),
            },
        })
    }
}

/// Whether every rank found the same pairs missing from its cache (one small all-gather of
/// their count and a fingerprint of their ids).
fn agree_on(comm: &Comm, missing: &[&PairExample]) -> Result<bool> {
    if comm.world_size() == 1 {
        return Ok(true);
    }
    let fingerprint = missing.iter().fold(0u64, |acc, example| {
        acc.rotate_left(5) ^ example.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let mine = Tensor::from_slice(&[missing.len() as i64, fingerprint as i64]);
    let all = Vec::<i64>::try_from(comm.all_gather(&mine)?.flatten(0, 1))?;
    Ok(all.chunks(2).all(|rank| rank == &all[..2]))
}

/// The cache directory for a reference model under the given data settings.
pub fn cache_dir(model_dir: &Path, model_kind: Kind, data_key: &str) -> Result<PathBuf> {
    let mut hasher = Sha256::new();
    for name in ["config.json", "model.safetensors", "model.safetensors.index.json"] {
        hash_file(&mut hasher, &model_dir.join(name))?;
    }
    for entry in std::fs::read_dir(model_dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
        if name.starts_with("model-") && name.ends_with(".safetensors") {
            hash_file(&mut hasher, &path)?;
        }
    }
    hasher.update(format!("{model_kind:?}\n{data_key}\n{}", env!("CARGO_PKG_VERSION")));
    let key = hex::encode(&hasher.finalize()[..12]);
    Ok(crate::cache_root()?.join("reference-logps").join(key))
}

fn hash_file(hasher: &mut Sha256, path: &Path) -> Result<()> {
    let Ok(mut file) = File::open(path) else { return Ok(()) };
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read =
            file.read(&mut buffer).with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            return Ok(());
        }
        hasher.update(&buffer[..read]);
    }
}

fn read_cache(file: &Path) -> Option<(Vec<u64>, Vec<f32>)> {
    let tensors = Tensor::read_safetensors(file).ok()?;
    let get = |name: &str| tensors.iter().find(|(key, _)| key == name).map(|(_, t)| t);
    let ids: Vec<i64> = Vec::try_from(get("pair_ids")?).ok()?;
    let values: Vec<f32> = Vec::try_from(get("values")?.flatten(0, 1)).ok()?;
    if values.len() != ids.len() * COLUMNS as usize {
        return None;
    }
    Some((ids.into_iter().map(|id| id as u64).collect(), values))
}

/// Writes the cache through a temporary file named after `rank`, renamed into place.
fn write_cache(file: &Path, ids: &[u64], values: &[f32], rank: usize) -> Result<()> {
    let dir = file.parent().context("cache file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Pair ids are 64-bit hashes stored bit-for-bit in an i64 tensor.
    let ids: Vec<i64> = ids.iter().map(|id| *id as i64).collect();
    let ids = Tensor::from_slice(&ids);
    let values = Tensor::from_slice(values).view([-1, COLUMNS]);
    let partial = file.with_extension(format!("partial-{rank}"));
    Tensor::write_safetensors(&[("pair_ids", &ids), ("values", &values)], &partial)?;
    std::fs::rename(&partial, file).with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}
