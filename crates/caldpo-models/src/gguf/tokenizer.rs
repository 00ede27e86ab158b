//! Rebuilding an HF tokenizer (tokenizer.json and its config) from GGUF's
//! `tokenizer.ggml.*` metadata, with the `tokenizers` crate.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) are handled, with the
//! pre-tokenizers llama.cpp calls `gpt-2`/`default` (GPT-2's byte-level regex) and
//! `smollm` (each digit on its own, then the GPT-2 regex).

use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{Error, Result};
use crate::gguf::reader::{GgufFile, MetaValue};
use crate::weights::{write_atomic, write_json};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer metadata of a GGUF file.
#[derive(Debug)]
pub(crate) struct GgufTokenizer {
    tokens: Vec<String>,
    token_types: Vec<i64>,
    merges: Vec<(String, String)>,
    pre: String,
    pub bos_id: Option<u64>,
    pub eos_id: Option<u64>,
    pub pad_id: Option<u64>,
    unk_id: Option<u64>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl GgufTokenizer {
    pub fn read(file: &GgufFile) -> Result<Self> {
        let model = file.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(file.error(format!(
                "tokenizer model `{model}` is not supported (supported: gpt2, byte-level BPE)"
            )));
        }
        let tokens: Vec<String> =
            file.string_array("tokenizer.ggml.tokens")?.into_iter().map(String::from).collect();
        let token_types = match file.get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(types)) => types.iter().map(meta_int).collect(),
            _ => vec![1; tokens.len()],
        };
        let merges = file
            .string_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| file.error(format!("merge `{merge}` is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let pre = match file.get("tokenizer.ggml.pre") {
            Some(MetaValue::String(pre)) => pre.clone(),
            _ => "default".to_string(),
        };
        let chat_template = match file.get("tokenizer.chat_template") {
            Some(MetaValue::String(template)) => Some(template.clone()),
            _ => None,
        };
        Ok(Self {
            tokens,
            token_types,
            merges,
            pre,
            bos_id: file.opt_uint("tokenizer.ggml.bos_token_id")?,
            eos_id: file.opt_uint("tokenizer.ggml.eos_token_id")?,
            pad_id: file.opt_uint("tokenizer.ggml.padding_token_id")?,
            unk_id: file.opt_uint("tokenizer.ggml.unknown_token_id")?,
            add_bos: file.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            chat_template,
        })
    }

    /// The token text of `id`, if it exists.
    fn token(&self, id: Option<u64>) -> Option<&str> {
        id.and_then(|id| self.tokens.get(id as usize)).map(String::as_str)
    }

    /// Ids of the added tokens and whether each is special: control tokens are special,
    /// user-defined ones are not; the bos/eos/pad/unk tokens are special whatever their type.
    fn added_tokens(&self) -> Vec<(usize, bool)> {
        let named = [self.bos_id, self.eos_id, self.pad_id, self.unk_id];
        (0..self.tokens.len())
            .filter_map(|id| {
                let kind = self.token_types.get(id).copied().unwrap_or(1);
                let is_named = named.contains(&Some(id as u64));
                if kind == TOKEN_TYPE_CONTROL || is_named {
                    Some((id, true))
                } else if kind == TOKEN_TYPE_USER_DEFINED {
                    Some((id, false))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Builds the tokenizer with the `tokenizers` crate.
    pub fn build(&self) -> Result<Tokenizer> {
        let vocab: Vocab =
            self.tokens.iter().enumerate().map(|(id, token)| (token.clone(), id as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, self.merges.clone())
            .build()
            .map_err(|e| Error::Tokenizer(format!("cannot build the BPE model: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(self.pre_tokenizer()?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer.with_post_processor(Some(ByteLevel::new(true, false, true)));
        let added: Vec<AddedToken> = self
            .added_tokens()
            .into_iter()
            .map(|(id, special)| {
                AddedToken::from(self.tokens[id].clone(), special).normalized(false)
            })
            .collect();
        tokenizer.add_special_tokens(&added);
        Ok(tokenizer)
    }

    fn pre_tokenizer(&self) -> Result<PreTokenizerWrapper> {
        let byte_level = ByteLevel::new(false, true, true);
        match self.pre.as_str() {
            "default" | "gpt-2" | "gpt2" => Ok(byte_level.into()),
            "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()),
            other => Err(Error::Tokenizer(format!(
                "GGUF pre-tokenizer `{other}` is not supported (supported: default, gpt-2, smollm)"
            ))),
        }
    }

    pub fn generation_config(&self) -> Value {
        json!({
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
        })
    }

    /// Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json.
    pub fn write(&self, dir: &Path, context_length: u64) -> Result<()> {
        let tokenizer = self.build()?;
        let text = tokenizer
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("cannot serialise tokenizer.json: {e}")))?;
        write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
        write_json(&dir.join("tokenizer_config.json"), &self.tokenizer_config(context_length))?;
        write_json(&dir.join("special_tokens_map.json"), &self.special_tokens_map())
    }

    fn special_tokens_map(&self) -> Value {
        let mut map = Map::new();
        for (key, id) in [
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_id),
            ("pad_token", self.pad_id),
            ("unk_token", self.unk_id),
        ] {
            if let Some(token) = self.token(id) {
                map.insert(key.into(), token.into());
            }
        }
        Value::Object(map)
    }

    fn tokenizer_config(&self, context_length: u64) -> Value {
        let added_tokens_decoder: Map<String, Value> = self
            .added_tokens()
            .into_iter()
            .map(|(id, special)| {
                let entry = json!({
                    "content": self.tokens[id], "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": special,
                });
                (id.to_string(), entry)
            })
            .collect();
        let mut config = json!({
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "add_prefix_space": false,
            "added_tokens_decoder": added_tokens_decoder,
            "clean_up_tokenization_spaces": false,
            "model_max_length": context_length,
            "tokenizer_class": "GPT2Tokenizer",
        });
        let object = config.as_object_mut().expect("a JSON object");
        if let Value::Object(specials) = self.special_tokens_map() {
            object.extend(specials);
        }
        if let Some(template) = &self.chat_template {
            object.insert("chat_template".into(), template.clone().into());
        }
        config
    }
}

fn meta_int(value: &MetaValue) -> i64 {
    match value {
        MetaValue::Int(v) => *v,
        MetaValue::UInt(v) => *v as i64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the three tokens and merges below, with `<s>` as control.
    fn tiny() -> GgufTokenizer {
        let tokens = ["<s>", "a", "b", "ab", "1", "2", "Ġ", "Ġab"].map(String::from).to_vec();
        GgufTokenizer {
            token_types: vec![3, 1, 1, 1, 1, 1, 1, 1],
            tokens,
            merges: vec![("a".into(), "b".into()), ("Ġ".into(), "ab".into())],
            pre: "smollm".into(),
            bos_id: Some(0),
            eos_id: Some(0),
            pad_id: None,
            unk_id: None,
            add_bos: false,
            chat_template: Some("{{ x }}".into()),
        }
    }

    #[test]
    fn encodes_with_merges_digits_and_specials() {
        let tokenizer = tiny().build().unwrap();
        // "ab ab12<s>": "ab" merges, " ab" becomes "Ġab", digits split one by one, and the
        // control token is matched as a whole.
        let ids = tokenizer.encode("ab ab12<s>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![3, 7, 4, 5, 0]);
    }

    #[test]
    fn config_names_special_tokens_and_template() {
        let config = tiny().tokenizer_config(64);
        assert_eq!(config["bos_token"], "<s>");
        assert_eq!(config["add_bos_token"], false);
        assert_eq!(config["chat_template"], "{{ x }}");
        assert_eq!(config["added_tokens_decoder"]["0"]["special"], true);
        assert!(config.get("pad_token").is_none());
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        let tokenizer = GgufTokenizer { pre: "qwen2".into(), ..tiny() };
        assert!(tokenizer.build().unwrap_err().to_string().contains("qwen2"));
    }
}
