//! Parsing the GGUF container (versions 2 and 3): header, metadata, tensor directory.
//!
//! The layout follows ggml's `docs/gguf.md`: magic, version, tensor and key/value counts,
//! the key/values, one directory entry per tensor (dimensions in ggml order, contiguous
//! axis first), then the tensor data aligned to `general.alignment`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Error, Result};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MetaValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub(crate) struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous axis.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in PyTorch's row-major order (ggml order reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file.
pub(crate) struct GgufFile {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only map of a file caldpo does not modify while importing it.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let mut cursor = Cursor { bytes: &mmap, pos: 0, path };
        let (metadata, tensors) = parse_header(&mut cursor)?;
        let alignment = match metadata.get("general.alignment") {
            Some(MetaValue::UInt(a)) if *a > 0 => *a as usize,
            _ => 32,
        };
        let data_start = cursor.pos.div_ceil(alignment) * alignment;
        Ok(Self { path: path.to_path_buf(), mmap, metadata, tensors, data_start })
    }

    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::Gguf { path: self.path.clone(), message: message.into() }
    }

    /// The `len` bytes of a tensor's data.
    pub fn tensor_bytes(&self, info: &TensorInfo, len: usize) -> Result<&[u8]> {
        let start = self.data_start + info.offset as usize;
        self.mmap.get(start..start + len).ok_or_else(|| {
            self.error(format!("tensor `{}` runs past the end of the file", info.name))
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(MetaValue::String(s)) => Ok(s),
            Some(_) => Err(self.error(format!("metadata `{key}` is not a string"))),
            None => Err(self.error(format!("metadata `{key}` is missing"))),
        }
    }

    pub fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::UInt(v)) => Ok(Some(*v)),
            Some(MetaValue::Int(v)) if *v >= 0 => Ok(Some(*v as u64)),
            Some(_) => Err(self.error(format!("metadata `{key}` is not a non-negative integer"))),
        }
    }

    pub fn uint(&self, key: &str) -> Result<u64> {
        self.opt_uint(key)?.ok_or_else(|| self.error(format!("metadata `{key}` is missing")))
    }

    pub fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Float(v)) => Ok(Some(*v)),
            Some(MetaValue::UInt(v)) => Ok(Some(*v as f64)),
            Some(MetaValue::Int(v)) => Ok(Some(*v as f64)),
            Some(_) => Err(self.error(format!("metadata `{key}` is not a number"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(MetaValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn array(&self, key: &str) -> Result<&[MetaValue]> {
        match self.get(key) {
            Some(MetaValue::Array(values)) => Ok(values),
            Some(_) => Err(self.error(format!("metadata `{key}` is not an array"))),
            None => Err(self.error(format!("metadata `{key}` is missing"))),
        }
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                _ => Err(self.error(format!("metadata `{key}` holds a non-string"))),
            })
            .collect()
    }
}

const MAGIC: &[u8; 4] = b"GGUF";

fn parse_header(c: &mut Cursor) -> Result<(BTreeMap<String, MetaValue>, Vec<TensorInfo>)> {
    if c.take(4)? != MAGIC {
        return Err(c.error("not a GGUF file (bad magic)"));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(c.error(&format!("GGUF version {version} is not supported (2 or 3)")));
    }
    let tensor_count = c.u64()?;
    let kv_count = c.u64()?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = c.string()?;
        let value_type = c.u32()?;
        let value = c.value(value_type)?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(tensor_count.min(1 << 20) as usize);
    for _ in 0..tensor_count {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims > 4 {
            return Err(c.error(&format!("tensor `{name}` has {n_dims} dimensions")));
        }
        let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
        let ggml_type = c.u32()?;
        let offset = c.u64()?;
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    Ok((metadata, tensors))
}

/// Little-endian reads over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn error(&self, message: &str) -> Error {
        Error::Gguf {
            path: self.path.to_path_buf(),
            message: format!("{message} (at byte {})", self.pos),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| self.error("truncated header"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()? as usize;
        let bytes = self.take(len)?;
        // Vocabularies of some models hold invalid UTF-8 pieces; keep them lossily rather
        // than refusing the file.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, value_type: u32) -> Result<MetaValue> {
        Ok(match value_type {
            0 => MetaValue::UInt(self.array::<1>()?[0] as u64),
            1 => MetaValue::Int(self.array::<1>()?[0] as i8 as i64),
            2 => MetaValue::UInt(u16::from_le_bytes(self.array()?) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => MetaValue::UInt(self.u32()? as u64),
            5 => MetaValue::Int(i32::from_le_bytes(self.array()?) as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.array()?) as f64),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                let element_type = self.u32()?;
                let count = self.u64()?;
                if count > self.bytes.len() as u64 {
                    return Err(self.error(&format!("array of {count} elements")));
                }
                let values =
                    (0..count).map(|_| self.value(element_type)).collect::<Result<Vec<_>>>()?;
                MetaValue::Array(values)
            }
            10 => MetaValue::UInt(self.u64()?),
            11 => MetaValue::Int(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(self.error(&format!("unknown metadata value type {other}"))),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a GGUF v3 file in memory, for tests of the reader and the importer.
    #[derive(Default)]
    pub(crate) struct GgufWriter {
        kv: Vec<u8>,
        kv_count: u64,
        infos: Vec<u8>,
        data: Vec<u8>,
        tensor_count: u64,
    }

    fn put_string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl GgufWriter {
        pub fn u32(&mut self, key: &str, value: u32) {
            put_string(&mut self.kv, key);
            self.kv.extend(4u32.to_le_bytes());
            self.kv.extend(value.to_le_bytes());
            self.kv_count += 1;
        }

        pub fn f32(&mut self, key: &str, value: f32) {
            put_string(&mut self.kv, key);
            self.kv.extend(6u32.to_le_bytes());
            self.kv.extend(value.to_le_bytes());
            self.kv_count += 1;
        }

        pub fn string(&mut self, key: &str, value: &str) {
            put_string(&mut self.kv, key);
            self.kv.extend(8u32.to_le_bytes());
            put_string(&mut self.kv, value);
            self.kv_count += 1;
        }

        pub fn strings(&mut self, key: &str, values: &[&str]) {
            put_string(&mut self.kv, key);
            self.kv.extend(9u32.to_le_bytes());
            self.kv.extend(8u32.to_le_bytes());
            self.kv.extend((values.len() as u64).to_le_bytes());
            for v in values {
                put_string(&mut self.kv, v);
            }
            self.kv_count += 1;
        }

        pub fn i32s(&mut self, key: &str, values: &[i32]) {
            put_string(&mut self.kv, key);
            self.kv.extend(9u32.to_le_bytes());
            self.kv.extend(5u32.to_le_bytes());
            self.kv.extend((values.len() as u64).to_le_bytes());
            for v in values {
                self.kv.extend(v.to_le_bytes());
            }
            self.kv_count += 1;
        }

        /// Adds a tensor with ggml-order `dims` and raw `bytes`.
        pub fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, bytes: &[u8]) {
            while self.data.len() % 32 != 0 {
                self.data.push(0);
            }
            put_string(&mut self.infos, name);
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ggml_type.to_le_bytes());
            self.infos.extend((self.data.len() as u64).to_le_bytes());
            self.data.extend(bytes);
            self.tensor_count += 1;
        }

        pub fn finish(self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(self.tensor_count.to_le_bytes());
            out.extend(self.kv_count.to_le_bytes());
            out.extend(self.kv);
            out.extend(self.infos);
            while out.len() % 32 != 0 {
                out.push(0);
            }
            out.extend(self.data);
            out
        }
    }

    #[test]
    fn reads_metadata_and_tensor_directory() {
        let mut w = GgufWriter::default();
        w.u32("llama.block_count", 2);
        w.string("general.architecture", "llama");
        w.strings("tokenizer.ggml.tokens", &["a", "b"]);
        w.tensor("t", &[4, 2], 0, &[0u8; 32]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, w.finish()).unwrap();

        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.uint("llama.block_count").unwrap(), 2);
        assert_eq!(file.string("general.architecture").unwrap(), "llama");
        assert_eq!(file.string_array("tokenizer.ggml.tokens").unwrap(), vec!["a", "b"]);
        assert_eq!(file.tensors[0].shape(), vec![2, 4]);
        assert_eq!(file.tensor_bytes(&file.tensors[0], 32).unwrap().len(), 32);
    }

    #[test]
    fn rejects_bad_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, b"GGUX\x03\0\0\0").unwrap();
        let err = GgufFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("magic"), "{err}");
    }
}
