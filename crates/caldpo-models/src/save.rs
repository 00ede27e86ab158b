//! Saving a model as an HF folder that transformers' `from_pretrained` loads.

use std::path::Path;

use tch::Kind;

use crate::error::{io_err, Result};
use crate::model::CausalLm;
use crate::weights::{
    kind_from_torch_dtype, torch_dtype_name, write_atomic, write_json, write_safetensors,
    RawTensor, SAFETENSORS_FILE, SAFETENSORS_INDEX,
};

/// Files copied unchanged from the source folder when present: the tokenizer in its
/// several forms, the chat template and the generation defaults.
const COPIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

impl CausalLm {
    /// Writes `dir/model.safetensors` (HF names and shapes, no `lm_head.weight` when tied)
    /// in config.json's `torch_dtype` (f32 when it names none caldpo writes), `dir/config.json`,
    /// and copies the tokenizer files of `source_dir` (see [`CausalLm::save_pretrained_as`]).
    pub fn save_pretrained(&self, dir: &Path, source_dir: &Path) -> Result<()> {
        let kind = self
            .config()
            .torch_dtype
            .as_deref()
            .and_then(kind_from_torch_dtype)
            .unwrap_or(Kind::Float);
        self.save_pretrained_as(dir, source_dir, kind)
    }

    /// [`CausalLm::save_pretrained`] with the weights written in `kind` (f32, bf16 or f16).
    /// Every file is written to a temporary name and renamed into place; a sharded index
    /// left in `dir` by an earlier save of another model is removed.
    pub fn save_pretrained_as(&self, dir: &Path, source_dir: &Path, kind: Kind) -> Result<()> {
        let dtype_name = torch_dtype_name(kind)?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;

        let tensors = tch::no_grad(|| {
            self.named_parameters()
                .iter()
                .map(|(name, tensor)| RawTensor::from_tensor(name, tensor, kind))
                .collect::<Result<Vec<_>>>()
        })?;
        write_safetensors(&dir.join(SAFETENSORS_FILE), &tensors)?;
        let stale_index = dir.join(SAFETENSORS_INDEX);
        if stale_index.exists() {
            std::fs::remove_file(&stale_index).map_err(io_err(&stale_index))?;
        }

        write_json(&dir.join("config.json"), &self.config_to_save(dtype_name))?;
        copy_tokenizer_files(source_dir, dir)
    }

    /// The source config.json with the saved dtype, under both spellings transformers has
    /// used (`torch_dtype` in version 4, `dtype` in version 5).
    fn config_to_save(&self, dtype_name: &str) -> serde_json::Value {
        let mut config = self.raw_config().clone();
        if let Some(object) = config.as_object_mut() {
            object.insert("torch_dtype".into(), dtype_name.into());
            if object.contains_key("dtype") {
                object.insert("dtype".into(), dtype_name.into());
            }
        }
        config
    }
}

fn copy_tokenizer_files(source_dir: &Path, dir: &Path) -> Result<()> {
    let same_dir = match (source_dir.canonicalize(), dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_dir {
        return Ok(());
    }
    for name in COPIED_FILES {
        let source = source_dir.join(name);
        if source.is_file() {
            let bytes = std::fs::read(&source).map_err(io_err(&source))?;
            write_atomic(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}
