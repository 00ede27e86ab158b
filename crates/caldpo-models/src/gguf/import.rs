//! GGUF (llama architecture) to an HF folder: config.json, generation_config.json,
//! model.safetensors in f32, tokenizer.json, tokenizer_config.json and
//! special_tokens_map.json.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{io_err, Result};
use crate::gguf::dequant::dequantize;
use crate::gguf::reader::{GgufFile, MetaValue, TensorInfo};
use crate::gguf::tokenizer::GgufTokenizer;
use crate::weights::{write_json, write_safetensors, RawTensor, SAFETENSORS_FILE};

/// Converts the GGUF file `gguf` into an HF model folder at `out_dir` (created if needed;
/// files already there with the same names are replaced).
///
/// Only the `llama` GGUF architecture is supported (Llama, Mistral, SmolLM and others that
/// llama.cpp exports under it), with tensors in F32, F16, BF16, Q8_0, Q4_0 or Q4_1; the
/// quantised values are expanded to f32, so the result is the quantised model, not the
/// original checkpoint. llama.cpp's row permutation of the Q and K projections is undone,
/// so the folder uses transformers' rotate-half rotary layout.
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    let arch = file.string("general.architecture")?;
    if arch != "llama" {
        return Err(
            file.error(format!("GGUF architecture `{arch}` is not supported (supported: llama)"))
        );
    }
    let hyper = LlamaHyper::read(&file)?;
    let tokenizer = GgufTokenizer::read(&file)?;
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;

    let tensors = convert_tensors(&file, &hyper)?;
    let tied = !tensors.iter().any(|t| t.name == "lm_head.weight");
    write_safetensors(&out_dir.join(SAFETENSORS_FILE), &tensors)?;
    drop(tensors);

    write_json(&out_dir.join("config.json"), &hyper.config_json(&tokenizer, tied))?;
    write_json(&out_dir.join("generation_config.json"), &tokenizer.generation_config())?;
    tokenizer.write(out_dir, hyper.context_length)
}

/// The llama.* hyperparameters.
#[derive(Debug)]
struct LlamaHyper {
    vocab_size: u64,
    hidden_size: u64,
    intermediate_size: u64,
    num_layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    context_length: u64,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_scaling: Value,
}

impl LlamaHyper {
    fn read(file: &GgufFile) -> Result<Self> {
        let hidden_size = file.uint("llama.embedding_length")?;
        let heads = file.uint("llama.attention.head_count")?;
        let head_dim =
            file.opt_uint("llama.attention.key_length")?.unwrap_or(hidden_size / heads.max(1));
        if let Some(rope_dim) = file.opt_uint("llama.rope.dimension_count")? {
            if rope_dim != head_dim {
                return Err(file.error(format!(
                    "partial rotary embedding (rope.dimension_count {rope_dim}, head_dim \
                     {head_dim}) is not supported for llama"
                )));
            }
        }
        if file.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
            return Err(file.error(
                "rope_freqs.weight (Llama 3.1 frequency scaling baked into the file) is not \
                 supported",
            ));
        }
        let vocab_size = match file.opt_uint("llama.vocab_size")? {
            Some(v) => v,
            None => file.array("tokenizer.ggml.tokens")?.len() as u64,
        };
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: file.uint("llama.feed_forward_length")?,
            num_layers: file.uint("llama.block_count")?,
            heads,
            kv_heads: file.opt_uint("llama.attention.head_count_kv")?.unwrap_or(heads),
            head_dim,
            context_length: file.opt_uint("llama.context_length")?.unwrap_or(2048),
            rms_norm_eps: shortest(
                file.opt_float("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            ),
            rope_theta: shortest(file.opt_float("llama.rope.freq_base")?.unwrap_or(10_000.0)),
            rope_scaling: rope_scaling(file)?,
        })
    }

    fn config_json(&self, tokenizer: &GgufTokenizer, tied: bool) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.context_length,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "tie_word_embeddings": tied,
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
            "torch_dtype": "float32",
        })
    }
}

/// GGUF stores these numbers as f32; print them as the shortest decimal that is that f32
/// (1e-5 rather than 9.999999747378752e-6), as the original config.json had them.
fn shortest(value: f64) -> f64 {
    (value as f32).to_string().parse().expect("an f32 prints as a number")
}

fn rope_scaling(file: &GgufFile) -> Result<Value> {
    let kind = match file.get("llama.rope.scaling.type") {
        Some(MetaValue::String(kind)) => kind.as_str(),
        _ => "none",
    };
    match kind {
        "none" => Ok(Value::Null),
        "linear" => {
            let factor = file.opt_float("llama.rope.scaling.factor")?.unwrap_or(1.0);
            Ok(json!({"rope_type": "linear", "type": "linear", "factor": shortest(factor)}))
        }
        other => Err(file.error(format!(
            "rope scaling type `{other}` is not supported (supported: none, linear)"
        ))),
    }
}

/// Dequantises every tensor, renames it and undoes the Q/K permutation.
fn convert_tensors(file: &GgufFile, hyper: &LlamaHyper) -> Result<Vec<RawTensor>> {
    file.tensors
        .iter()
        .map(|info| {
            let name = hf_name(&info.name)
                .ok_or_else(|| file.error(format!("unexpected tensor `{}`", info.name)))?;
            let shape = info.shape();
            let mut values = dequantize(file, info)?;
            if let Some(n_heads) = permuted_heads(info, hyper) {
                let rows = n_heads * hyper.head_dim as usize;
                if shape.len() != 2 || shape[0] != rows {
                    return Err(file.error(format!(
                        "tensor `{}` has shape {shape:?}, expected {rows} rows",
                        info.name
                    )));
                }
                values = unpermute_rows(&values, n_heads, rows, shape[1]);
            }
            Ok(RawTensor::from_f32(name, shape, &values))
        })
        .collect()
}

/// The head count whose rows llama.cpp permuted, for the Q and K projections.
fn permuted_heads(info: &TensorInfo, hyper: &LlamaHyper) -> Option<usize> {
    if info.name.ends_with(".attn_q.weight") {
        Some(hyper.heads as usize)
    } else if info.name.ends_with(".attn_k.weight") {
        Some(hyper.kv_heads as usize)
    } else {
        None
    }
}

/// Undoes llama.cpp's permutation of a `[rows, cols]` projection with `n_heads` heads.
///
/// llama.cpp's converter views HF's rows as `[n_heads, 2, head_dim / 2]` and swaps the last
/// two axes, interleaving the two rotary halves of each head. So HF row
/// `h * head_dim + half * head_dim / 2 + j` is stored at GGUF row
/// `h * head_dim + 2 * j + half`.
pub(crate) fn unpermute_rows(values: &[f32], n_heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    let head_dim = rows / n_heads;
    let half_dim = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_heads {
        for half in 0..2 {
            for j in 0..half_dim {
                let hf_row = h * head_dim + half * half_dim + j;
                let gguf_row = h * head_dim + 2 * j + half;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&values[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    out
}

/// The HF name of a llama GGUF tensor.
pub(crate) fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(
            hf_name("blk.12.attn_output.weight").unwrap(),
            "model.layers.12.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // One head of dim 4 over 1 column. llama.cpp's permute stores HF rows
        // [r0, r1, r2, r3] (halves [r0, r1] and [r2, r3]) interleaved as [r0, r2, r1, r3].
        let gguf = [0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_rows(&gguf, 1, 4, 1), vec![0.0, 1.0, 2.0, 3.0]);
        // Two heads of dim 2 over 2 columns: with half_dim 1 the permutation is the
        // identity.
        let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(unpermute_rows(&values, 2, 4, 2), values.to_vec());
    }

    #[test]
    fn shortest_recovers_decimal() {
        assert_eq!(shortest(1e-5f32 as f64), 1e-5);
        assert_eq!(shortest(100000.0), 100000.0);
    }
}
