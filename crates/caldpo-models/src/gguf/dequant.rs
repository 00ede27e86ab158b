//! Expanding ggml tensor types to f32.
//!
//! Block layouts (ggml's `ggml-common.h`), 32 values per block:
//! - Q4_0: f16 `d`, 16 bytes of nibbles; element j is `d * (lo(byte j) - 8)`, element
//!   j + 16 is `d * (hi(byte j) - 8)`.
//! - Q4_1: f16 `d`, f16 `m`, 16 bytes of nibbles; `d * nibble + m`, same nibble order.
//! - Q8_0: f16 `d`, 32 signed bytes `q`; `d * q`.
//!
//! K-quants are not expanded: no well-kept Rust crate reads them without pulling in a
//! whole inference engine, and llama.cpp's exporter can write Q8_0 or F16 instead.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gguf::reader::{GgufFile, TensorInfo};

const BLOCK: usize = 32;

/// The ggml types the importer expands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// Bytes taken by `numel` values.
    fn byte_len(self, numel: usize) -> usize {
        match self {
            GgmlType::F32 => numel * 4,
            GgmlType::F16 | GgmlType::Bf16 => numel * 2,
            GgmlType::Q4_0 => numel / BLOCK * 18,
            GgmlType::Q4_1 => numel / BLOCK * 20,
            GgmlType::Q8_0 => numel / BLOCK * 34,
        }
    }

    fn is_blocked(self) -> bool {
        matches!(self, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }
}

/// The ggml name of a type id, for error messages.
fn type_name(id: u32) -> &'static str {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// The tensor's values as f32, in row-major order.
pub(crate) fn dequantize(file: &GgufFile, info: &TensorInfo) -> Result<Vec<f32>> {
    let ggml_type =
        GgmlType::from_id(info.ggml_type).ok_or_else(|| Error::UnsupportedGgmlType {
            tensor: info.name.clone(),
            ggml_type: info.ggml_type,
            type_name: type_name(info.ggml_type),
        })?;
    let numel = info.numel() as usize;
    if ggml_type.is_blocked() && numel % BLOCK != 0 {
        return Err(file.error(format!(
            "tensor `{}` has {numel} values, not a whole number of {BLOCK}-value blocks",
            info.name
        )));
    }
    let bytes = file.tensor_bytes(info, ggml_type.byte_len(numel))?;
    Ok(expand(ggml_type, bytes, numel))
}

fn expand(ggml_type: GgmlType, bytes: &[u8], numel: usize) -> Vec<f32> {
    let mut out = vec![0f32; numel];
    match ggml_type {
        GgmlType::F32 => {
            out.par_iter_mut()
                .zip(bytes.par_chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
        GgmlType::F16 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Bf16 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q4_0 => blocks(&mut out, bytes, 18, |block, values| {
            let d = f16_at(block, 0);
            nibbles(&block[2..], values, |q| d * (q as f32 - 8.0));
        }),
        GgmlType::Q4_1 => blocks(&mut out, bytes, 20, |block, values| {
            let (d, m) = (f16_at(block, 0), f16_at(block, 2));
            nibbles(&block[4..], values, |q| d * q as f32 + m);
        }),
        GgmlType::Q8_0 => blocks(&mut out, bytes, 34, |block, values| {
            let d = f16_at(block, 0);
            for (value, &q) in values.iter_mut().zip(&block[2..]) {
                *value = d * (q as i8) as f32;
            }
        }),
    }
    out
}

/// Runs `decode` over every (block bytes, 32 output values) pair in parallel.
fn blocks(
    out: &mut [f32],
    bytes: &[u8],
    block_bytes: usize,
    decode: impl Fn(&[u8], &mut [f32]) + Sync,
) {
    out.par_chunks_mut(BLOCK)
        .zip(bytes.par_chunks_exact(block_bytes))
        .for_each(|(values, block)| decode(block, values));
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Low nibbles fill the first 16 values, high nibbles the last 16.
fn nibbles(packed: &[u8], values: &mut [f32], value_of: impl Fn(u8) -> f32) {
    for (j, &byte) in packed[..BLOCK / 2].iter().enumerate() {
        values[j] = value_of(byte & 0x0f);
        values[j + BLOCK / 2] = value_of(byte >> 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    /// Byte j holds nibble (j % 16) low and (15 - j % 16) high, so every value differs.
    fn packed_nibbles() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 0.5: element j (< 16) is 0.5 * (j - 8), element j + 16 is 0.5 * (15 - j - 8).
        let mut block = f16_bytes(0.5).to_vec();
        block.extend(packed_nibbles());
        let values = expand(GgmlType::Q4_0, &block, 32);
        assert_eq!(values[0], -4.0);
        assert_eq!(values[15], 3.5);
        assert_eq!(values[16], 3.5);
        assert_eq!(values[31], -4.0);
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.25, m = -1: element j is 0.25 * j - 1, element j + 16 is 0.25 * (15 - j) - 1.
        let mut block = f16_bytes(0.25).to_vec();
        block.extend(f16_bytes(-1.0));
        block.extend(packed_nibbles());
        let values = expand(GgmlType::Q4_1, &block, 32);
        assert_eq!(values[0], -1.0);
        assert_eq!(values[3], -0.25);
        assert_eq!(values[16], 2.75);
        assert_eq!(values[31], -1.0);
    }

    #[test]
    fn q8_0_block_by_hand() {
        // d = 2: the signed bytes -3 and 127 become -6 and 254.
        let mut block = f16_bytes(2.0).to_vec();
        let mut qs = vec![0u8; 32];
        qs[0] = (-3i8) as u8;
        qs[31] = 127;
        block.extend(qs);
        let values = expand(GgmlType::Q8_0, &block, 32);
        assert_eq!((values[0], values[1], values[31]), (-6.0, 0.0, 254.0));
    }

    #[test]
    fn plain_types() {
        let bytes: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(expand(GgmlType::F32, &bytes, 2), vec![1.5, -2.0]);
        let bytes: Vec<u8> = f16_bytes(0.125).into_iter().chain(f16_bytes(-3.0)).collect();
        assert_eq!(expand(GgmlType::F16, &bytes, 2), vec![0.125, -3.0]);
        let bytes: Vec<u8> = bf16::from_f32(6.5).to_le_bytes().into_iter().collect();
        assert_eq!(expand(GgmlType::Bf16, &bytes, 1), vec![6.5]);
    }

    #[test]
    fn k_quant_is_named_in_the_error() {
        assert_eq!(type_name(12), "Q4_K");
        assert_eq!(GgmlType::from_id(12), None);
    }
}
