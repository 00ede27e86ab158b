//! Reading and writing safetensors checkpoints, and turning their tensors into parameters.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Device, Kind, Tensor};

use crate::error::{io_err, read_json, Error, Result};

/// Name of a single-file checkpoint.
pub(crate) const SAFETENSORS_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub(crate) const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Reads every tensor of the checkpoint in `dir` (single file or shards), converting
/// floating-point tensors to `kind` and moving them to `device` one at a time.
pub(crate) fn read_checkpoint(
    dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for file in checkpoint_files(dir)? {
        read_file(&file, &mut |name, tensor| {
            let tensor = if tensor.is_floating_point() { tensor.to_kind(kind) } else { tensor };
            tensors.insert(name, tensor.to_device(device));
        })?;
    }
    Ok(tensors)
}

/// The safetensors files of a checkpoint folder.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SAFETENSORS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(SAFETENSORS_INDEX);
    if !index_path.is_file() {
        return Err(Error::Safetensors {
            path: dir.to_path_buf(),
            message: format!("no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in this folder"),
        });
    }
    let index = read_json(&index_path)?;
    let weight_map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        Error::Safetensors { path: index_path.clone(), message: "no `weight_map` object".into() }
    })?;
    let shards: BTreeSet<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
    Ok(shards.into_iter().map(|shard| dir.join(shard)).collect())
}

/// Memory-maps one safetensors file and hands each tensor, copied into libtorch memory in
/// its stored dtype, to `sink`.
fn read_file(path: &Path, sink: &mut dyn FnMut(String, Tensor)) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only and dropped before this function returns; a checkpoint
    // rewritten underneath a running load is outside what caldpo supports.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let st_error = |message: String| Error::Safetensors { path: path.to_path_buf(), message };
    let tensors = SafeTensors::deserialize(&mmap).map_err(|e| st_error(e.to_string()))?;
    for (name, view) in tensors.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            st_error(format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        sink(name, tensor);
    }
    Ok(())
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(Error::InvalidArgument(format!("cannot save tensors of kind {other:?}")))
        }
    })
}

/// The transformers name of a dtype, as written in config.json's `torch_dtype`.
pub(crate) fn torch_dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        other => return Err(Error::InvalidArgument(format!("cannot save weights as {other:?}"))),
    })
}

/// The kind named by config.json's `torch_dtype`, if it is one caldpo saves.
pub(crate) fn kind_from_torch_dtype(name: &str) -> Option<Kind> {
    match name {
        "float32" => Some(Kind::Float),
        "float16" => Some(Kind::Half),
        "bfloat16" => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Raw little-endian tensor bytes ready for serialisation.
pub(crate) struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Copies `tensor` to the host in `kind`.
    pub fn from_tensor(name: &str, tensor: &Tensor, kind: Kind) -> Result<Self> {
        let tensor = tensor.f_to_kind(kind)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let numel = tensor.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut data, numel)?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        Ok(Self { name: name.to_string(), dtype: dtype_of(kind)?, shape, data })
    }

    /// Wraps f32 values.
    pub fn from_f32(name: String, shape: Vec<usize>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self { name, dtype: Dtype::F32, shape, data }
    }
}

/// Writes `tensors` to `path` as safetensors with `{"format": "pt"}` metadata (which
/// transformers expects), through a temporary file renamed into place.
pub(crate) fn write_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let st_error = |message: String| Error::Safetensors { path: path.to_path_buf(), message };
    let views = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map_err(|e| st_error(format!("tensor `{}`: {e}", t.name)))?;
            Ok((t.name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = temporary_sibling(path);
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| st_error(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path);
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes pretty-printed JSON atomically.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("a JSON value serialises");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Hands checkpoint tensors to the architecture as parameters, checking names and shapes,
/// and records every parameter under its HF name.
pub(crate) struct ParamStore {
    dir: PathBuf,
    source: HashMap<String, Tensor>,
    params: Vec<(String, Tensor)>,
    requires_grad: bool,
}

/// Checkpoint entries that are buffers or duplicates rather than parameters: causal-mask
/// buffers and rotary tables of older GPT-2 / GPT-NeoX files, and the LM head of a file
/// that stores it although the embeddings are tied.
fn is_ignorable(name: &str) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with(".attention.bias")
        || name.ends_with(".attention.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
        || name == "lm_head.weight"
}

impl ParamStore {
    pub fn new(dir: &Path, source: HashMap<String, Tensor>, requires_grad: bool) -> Self {
        Self { dir: dir.to_path_buf(), source, params: vec![], requires_grad }
    }

    /// Renames checkpoint entries: GPT-2 files from the hub omit the `transformer.` prefix
    /// that transformers' GPT2LMHeadModel uses.
    pub fn add_prefix_where_missing(&mut self, prefix: &str, except: &[&str]) {
        let names: Vec<String> = self.source.keys().cloned().collect();
        for name in names {
            if !name.starts_with(prefix) && !except.contains(&name.as_str()) {
                let tensor = self.source.remove(&name).expect("name was just listed");
                self.source.insert(format!("{prefix}{name}"), tensor);
            }
        }
    }

    /// Takes the parameter `name` of shape `shape`.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let tensor = self.source.remove(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        })?;
        if tensor.size() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: tensor.size(),
            });
        }
        // A fresh leaf: the tensor was created from file bytes or copied, never computed.
        let tensor = tensor.detach().set_requires_grad(self.requires_grad);
        self.params.push((name.to_string(), tensor.shallow_clone()));
        Ok(tensor)
    }

    /// Takes `name` when `present`, as optional biases are.
    pub fn take_if(&mut self, present: bool, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        present.then(|| self.take(name, shape)).transpose()
    }

    /// The parameters in the order they were taken; errors if the checkpoint holds tensors
    /// the architecture did not use.
    pub fn finish(self) -> Result<Vec<(String, Tensor)>> {
        let mut unused: Vec<String> =
            self.source.into_keys().filter(|name| !is_ignorable(name)).collect();
        if !unused.is_empty() {
            unused.sort();
            unused.truncate(8);
            return Err(Error::UnexpectedTensors { names: unused, dir: self.dir });
        }
        Ok(self.params)
    }
}
