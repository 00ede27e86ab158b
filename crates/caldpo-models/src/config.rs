//! config.json, resolved into the numbers the architectures need.
//!
//! Hugging Face has written the same facts under several spellings over the years: GPT-2's
//! `n_embd` for `hidden_size`, `torch_dtype` then `dtype`, `rope_theta` plus `rope_scaling`
//! then one `rope_parameters` table. The parser accepts each of them, so checkpoints from
//! the hub and folders saved by transformers 4 or 5 load alike.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{read_json, Error, Result};

/// The `model_type` values caldpo implements.
pub(crate) const SUPPORTED_MODEL_TYPES: [&str; 5] =
    ["llama", "mistral", "qwen2", "gpt_neox", "gpt2"];

/// The facts of config.json that callers need, plus the architecture's own details.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `model_type` from config.json: llama, mistral, qwen2, gpt_neox or gpt2.
    pub model_type: String,
    /// Rows of the embedding and of the LM head.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Number of transformer blocks.
    pub num_hidden_layers: i64,
    /// Query heads per block.
    pub num_attention_heads: i64,
    /// Key/value heads per block (fewer than the query heads under grouped-query attention).
    pub num_key_value_heads: i64,
    /// Width of one attention head.
    pub head_dim: i64,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: i64,
    /// Beginning-of-sequence token, when the config names one.
    pub bos_token_id: Option<i64>,
    /// End-of-sequence tokens (config.json's `eos_token_id`, a number or a list).
    pub eos_token_ids: Vec<i64>,
    /// Padding token, when the config names one.
    pub pad_token_id: Option<i64>,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: i64,
    /// Whether the LM head is the embedding matrix (no `lm_head.weight` in the file).
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint was saved in (`torch_dtype` or `dtype`), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    pub(crate) arch: ArchConfig,
}

/// Architecture-specific details.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ArchConfig {
    Llama(LlamaConfig),
    GptNeoX(GptNeoXConfig),
    Gpt2(Gpt2Config),
}

/// The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LlamaConfig {
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    /// Keys further back than this many positions are masked (Mistral).
    pub sliding_window: Option<i64>,
}

/// GPT-NeoX (Pythia).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GptNeoXConfig {
    pub layer_norm_eps: f64,
    pub rope: RopeConfig,
    pub use_parallel_residual: bool,
    pub attention_bias: bool,
    pub hidden_act: Activation,
}

/// GPT-2.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Gpt2Config {
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RopeConfig {
    pub theta: f64,
    /// Leading dimensions of each head that rotate (all of them except in GPT-NeoX).
    pub rotary_dim: i64,
    pub scaling: RopeScaling,
}

/// `rope_scaling` / `rope_parameters.rope_type`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// MLP activations, by their transformers `ACT2FN` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    /// The exact, erf-based GELU (`gelu`).
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    Relu,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads a config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&read_json(path)?, path)
    }

    /// Resolves an already parsed config.json; `path` only names the file in errors.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let fields = Fields { path, json };
        let model_type = fields.string("model_type")?;
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => parse_llama(&fields, model_type),
            "gpt_neox" => parse_gpt_neox(&fields),
            "gpt2" => parse_gpt2(&fields),
            _ => Err(Error::UnsupportedModelType {
                model_type,
                supported: SUPPORTED_MODEL_TYPES.to_vec(),
            }),
        }
    }
}

fn parse_llama(f: &Fields, model_type: String) -> Result<ModelConfig> {
    let hidden_size = f.i64("hidden_size")?;
    let heads = f.i64("num_attention_heads")?;
    let head_dim = f.opt_i64("head_dim")?.unwrap_or(hidden_size / heads.max(1));
    let is_qwen2 = model_type == "qwen2";
    let attention_bias = f.bool_or("attention_bias", false)?;
    let sliding_window = llama_sliding_window(f, &model_type)?;
    let llama = LlamaConfig {
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
        rope: parse_rope(f, head_dim, 1.0, 10_000.0)?,
        qkv_bias: is_qwen2 || attention_bias,
        o_bias: attention_bias && !is_qwen2,
        mlp_bias: f.bool_or("mlp_bias", false)?,
        hidden_act: f.activation("hidden_act", "silu")?,
        sliding_window,
    };
    let common = f.common()?;
    let config = ModelConfig {
        vocab_size: f.i64("vocab_size")?,
        hidden_size,
        num_hidden_layers: f.i64("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: f.opt_i64("num_key_value_heads")?.unwrap_or(heads),
        head_dim,
        intermediate_size: f.i64("intermediate_size")?,
        max_position_embeddings: f.i64_or("max_position_embeddings", 2048)?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        model_type,
        arch: ArchConfig::Llama(llama),
        bos_token_id: common.bos_token_id,
        eos_token_ids: common.eos_token_ids,
        pad_token_id: common.pad_token_id,
        torch_dtype: common.torch_dtype,
    };
    f.check_heads(&config)?;
    Ok(config)
}

/// Mistral masks keys beyond `sliding_window`; Qwen2 does so only with
/// `use_sliding_window`, and then only in some layers, which caldpo does not implement.
fn llama_sliding_window(f: &Fields, model_type: &str) -> Result<Option<i64>> {
    match model_type {
        "mistral" => f.opt_i64("sliding_window"),
        "qwen2" if f.bool_or("use_sliding_window", false)? => {
            Err(f.error("use_sliding_window = true is not supported for qwen2"))
        }
        _ => Ok(None),
    }
}

fn parse_gpt_neox(f: &Fields) -> Result<ModelConfig> {
    let hidden_size = f.i64("hidden_size")?;
    let heads = f.i64("num_attention_heads")?;
    let head_dim = hidden_size / heads.max(1);
    let neox = GptNeoXConfig {
        layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
        rope: parse_rope(f, head_dim, 0.25, 10_000.0)?,
        use_parallel_residual: f.bool_or("use_parallel_residual", true)?,
        attention_bias: f.bool_or("attention_bias", true)?,
        hidden_act: f.activation("hidden_act", "gelu")?,
    };
    let common = f.common()?;
    let config = ModelConfig {
        model_type: "gpt_neox".into(),
        vocab_size: f.i64("vocab_size")?,
        hidden_size,
        num_hidden_layers: f.i64("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim,
        intermediate_size: f.i64("intermediate_size")?,
        max_position_embeddings: f.i64_or("max_position_embeddings", 2048)?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        arch: ArchConfig::GptNeoX(neox),
        bos_token_id: common.bos_token_id,
        eos_token_ids: common.eos_token_ids,
        pad_token_id: common.pad_token_id,
        torch_dtype: common.torch_dtype,
    };
    f.check_heads(&config)?;
    Ok(config)
}

fn parse_gpt2(f: &Fields) -> Result<ModelConfig> {
    let hidden_size = f.alias_i64(&["n_embd", "hidden_size"])?;
    let heads = f.alias_i64(&["n_head", "num_attention_heads"])?;
    let gpt2 = Gpt2Config {
        layer_norm_eps: f.f64_or("layer_norm_epsilon", 1e-5)?,
        activation: f.activation("activation_function", "gelu_new")?,
        scale_attn_weights: f.bool_or("scale_attn_weights", true)?,
        scale_attn_by_inverse_layer_idx: f.bool_or("scale_attn_by_inverse_layer_idx", false)?,
    };
    let common = f.common()?;
    let config = ModelConfig {
        model_type: "gpt2".into(),
        vocab_size: f.i64("vocab_size")?,
        hidden_size,
        num_hidden_layers: f.alias_i64(&["n_layer", "num_hidden_layers"])?,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: hidden_size / heads.max(1),
        intermediate_size: f.opt_i64("n_inner")?.unwrap_or(4 * hidden_size),
        max_position_embeddings: f.alias_i64(&["n_positions", "max_position_embeddings"])?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        arch: ArchConfig::Gpt2(gpt2),
        bos_token_id: common.bos_token_id,
        eos_token_ids: common.eos_token_ids,
        pad_token_id: common.pad_token_id,
        torch_dtype: common.torch_dtype,
    };
    f.check_heads(&config)?;
    Ok(config)
}

/// Reads the rotary settings from either spelling: transformers 5's `rope_parameters`
/// table, or the older top-level `rope_theta` / `rotary_emb_base`, `rope_scaling`,
/// `partial_rotary_factor` / `rotary_pct`.
fn parse_rope(
    f: &Fields,
    head_dim: i64,
    default_partial: f64,
    default_theta: f64,
) -> Result<RopeConfig> {
    let params = f.json.get("rope_parameters").filter(|v| v.is_object());
    let scaling_table = params.or(f.json.get("rope_scaling").filter(|v| v.is_object()));
    let from_params = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_f64);

    let theta = match from_params("rope_theta") {
        Some(theta) => theta,
        None => match f.opt_f64("rope_theta")? {
            Some(theta) => theta,
            None => f.f64_or("rotary_emb_base", default_theta)?,
        },
    };
    let partial = match from_params("partial_rotary_factor") {
        Some(partial) => partial,
        None => match f.opt_f64("partial_rotary_factor")? {
            Some(partial) => partial,
            None => f.f64_or("rotary_pct", default_partial)?,
        },
    };
    let rotary_dim = (head_dim as f64 * partial) as i64;
    if rotary_dim % 2 != 0 || rotary_dim <= 0 {
        return Err(f.error(&format!("rotary dimension {rotary_dim} must be positive and even")));
    }
    let scaling = match scaling_table {
        Some(table) => parse_rope_scaling(f, table)?,
        None => RopeScaling::None,
    };
    Ok(RopeConfig { theta, rotary_dim, scaling })
}

fn parse_rope_scaling(f: &Fields, table: &Value) -> Result<RopeScaling> {
    let kind = table.get("rope_type").or_else(|| table.get("type")).and_then(Value::as_str);
    let number = |key: &str| {
        table
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.error(&format!("rope scaling lacks the number `{key}`")))
    };
    match kind.unwrap_or("default") {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: number("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        }),
        other => Err(f.error(&format!(
            "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
        ))),
    }
}

impl Activation {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }
}

/// The fields every architecture reads the same way.
struct Common {
    bos_token_id: Option<i64>,
    eos_token_ids: Vec<i64>,
    pad_token_id: Option<i64>,
    torch_dtype: Option<String>,
}

/// Typed access to config.json fields with errors that name the file and the field.
struct Fields<'a> {
    path: &'a Path,
    json: &'a Value,
}

impl Fields<'_> {
    fn error(&self, message: &str) -> Error {
        Error::Config { path: PathBuf::from(self.path), message: message.to_string() }
    }

    /// The field, treating JSON null as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.error(&format!("`{key}` must be a string"))),
            None => Err(self.error(&format!("missing field `{key}`"))),
        }
    }

    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.error(&format!("`{key}` must be an integer, found {v}"))),
        }
    }

    fn i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?.ok_or_else(|| self.error(&format!("missing field `{key}`")))
    }

    fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        Ok(self.opt_i64(key)?.unwrap_or(default))
    }

    /// The first of several spellings of one field that is present.
    fn alias_i64(&self, keys: &[&str]) -> Result<i64> {
        for key in keys {
            if let Some(value) = self.opt_i64(key)? {
                return Ok(value);
            }
        }
        Err(self.error(&format!("missing field `{}`", keys[0])))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(&format!("`{key}` must be a number, found {v}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_bool().ok_or_else(|| self.error(&format!("`{key}` must be true or false")))
            }
        }
    }

    fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = match self.get(key) {
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(self.error(&format!("`{key}` must be a string, found {v}"))),
            None => default,
        };
        Activation::from_name(name).ok_or_else(|| {
            self.error(&format!(
                "`{key}` = `{name}` is not supported (supported: silu, gelu, gelu_new, \
                 gelu_pytorch_tanh, gelu_fast, relu)"
            ))
        })
    }

    /// Token ids and dtype, shared by every architecture.
    fn common(&self) -> Result<Common> {
        let eos_token_ids = match self.get("eos_token_id") {
            None => vec![],
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|id| {
                    id.as_i64().ok_or_else(|| self.error("`eos_token_id` must hold integers"))
                })
                .collect::<Result<_>>()?,
            Some(_) => vec![self.i64("eos_token_id")?],
        };
        let torch_dtype = match self.get("torch_dtype").or_else(|| self.get("dtype")) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(Common {
            bos_token_id: self.opt_i64("bos_token_id")?,
            eos_token_ids,
            pad_token_id: self.opt_i64("pad_token_id")?,
            torch_dtype,
        })
    }

    fn check_heads(&self, c: &ModelConfig) -> Result<()> {
        let positive = [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("intermediate_size", c.intermediate_size),
        ];
        if let Some((key, value)) = positive.iter().find(|(_, value)| *value <= 0) {
            return Err(self.error(&format!("`{key}` must be positive, found {value}")));
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err(self.error(&format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if !matches!(c.arch, ArchConfig::Llama(_)) && c.hidden_size % c.num_attention_heads != 0 {
            return Err(self.error(&format!(
                "hidden_size ({}) is not a multiple of the head count ({})",
                c.hidden_size, c.num_attention_heads
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&json, Path::new("config.json"))
    }

    #[test]
    fn llama_fields_and_defaults() {
        let config = parse(serde_json::json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "eos_token_id": [2, 7], "bos_token_id": 1,
            "rope_theta": 500000.0, "torch_dtype": "bfloat16",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .unwrap();
        assert_eq!(config.head_dim, 16);
        assert_eq!(config.eos_token_ids, vec![2, 7]);
        assert_eq!(config.pad_token_id, None);
        assert_eq!(config.num_key_value_heads, 2);
        assert_eq!(config.torch_dtype.as_deref(), Some("bfloat16"));
        let ArchConfig::Llama(llama) = &config.arch else { panic!("not llama") };
        assert_eq!(llama.rope.theta, 500000.0);
        assert_eq!(llama.rope.rotary_dim, 16);
        assert!(matches!(llama.rope.scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
        assert!(!llama.qkv_bias);
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let config = parse(serde_json::json!({
            "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "eos_token_id": 5, "sliding_window": 32, "use_sliding_window": false
        }))
        .unwrap();
        let ArchConfig::Llama(llama) = &config.arch else { panic!("not llama") };
        assert!(llama.qkv_bias && !llama.o_bias);
        assert_eq!(llama.sliding_window, None);
        assert_eq!(config.eos_token_ids, vec![5]);
    }

    #[test]
    fn transformers5_rope_parameters() {
        let config = parse(serde_json::json!({
            "model_type": "gpt_neox", "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0,
                "partial_rotary_factor": 0.5}
        }))
        .unwrap();
        let ArchConfig::GptNeoX(neox) = &config.arch else { panic!("not neox") };
        // head_dim 64 / 4 = 16, half of it rotates.
        assert_eq!(neox.rope.rotary_dim, 8);
        assert_eq!(neox.rope.theta, 1000.0);
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = parse(serde_json::json!({"model_type": "bert"})).unwrap_err().to_string();
        assert!(err.contains("bert") && err.contains("llama") && err.contains("gpt2"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse(serde_json::json!({"model_type": "llama", "vocab_size": 10}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }
}
