//! Chat template + tokenizer: the prompt and each response of a pair as token ids.
//!
//! The prompt is the template rendered with the prompt messages and the generation prompt.
//! Each response is what the template adds to that text when the response messages are
//! appended (the prefix is checked, not assumed). Prompt and responses are tokenised
//! separately, so the prompt ids are identical in both sequences and no merge crosses the
//! boundary. Special tokens appear where the template writes them: texts are encoded
//! without the tokenizer's own special tokens, except that a tokenizer whose post-processor
//! adds a BOS gets it in front of a prompt that does not already start with it. Each
//! response ends with the end-of-turn token (tokenizer_config.json's `eos_token`) exactly
//! once: the text the template writes after its last end-of-turn (ChatML's "\n") is dropped,
//! and the token is appended.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::{Error, Result, RowProblem};
use crate::schema::{Message, PairText};
use crate::template::{ChatTemplate, SpecialTokens};

/// End-of-turn markers of common templates, reported by [`PairTokenizer::eos_token_ids`]
/// when the template writes them.
const END_OF_TURN_MARKERS: [&str; 6] =
    ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>"];

/// A tokenizer with its chat template: turns pair texts into prompt and response ids.
pub struct PairTokenizer {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    template_source: Option<String>,
    eos_text: String,
    eos_id: u32,
    pad_id: u32,
    /// What the tokenizer's post-processor puts before a text (a BOS for Llama-style
    /// tokenizers, nothing for SmolLM2).
    added_prefix: Vec<u32>,
    fingerprint: String,
}

/// The token ids of one pair before truncation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PairIds {
    pub prompt: Vec<i64>,
    /// Response ids ending with the end-of-turn token; empty when the response text is.
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
}

impl PairTokenizer {
    /// Loads tokenizer.json and tokenizer_config.json from a Hugging Face model folder.
    /// `chat_template` is `auto` (tokenizer_config.json's `chat_template`, else the folder's
    /// chat_template.jinja), `none` (plain text) or a path to a .jinja file.
    pub fn from_model_dir(model_dir: &Path, chat_template: &str) -> Result<Self> {
        let tokenizer_path = model_dir.join("tokenizer.json");
        let tokenizer_bytes = read(&tokenizer_path)?;
        let tokenizer = Tokenizer::from_bytes(&tokenizer_bytes)
            .map_err(|e| tokenizer_error(&tokenizer_path, e.to_string()))?;
        let config_path = model_dir.join("tokenizer_config.json");
        let config: Value = serde_json::from_slice(&read(&config_path)?)
            .map_err(|e| tokenizer_error(&config_path, format!("invalid JSON: {e}")))?;
        let special = special_tokens(&config);
        let template_source = match chat_template {
            "none" => None,
            "auto" => Some(auto_template(model_dir, &config, &config_path)?),
            path => {
                let path = PathBuf::from(path);
                let bytes = read(&path)?;
                Some(String::from_utf8(bytes).map_err(|_| tokenizer_error(&path, "not UTF-8"))?)
            }
        };
        Self::new(tokenizer, &tokenizer_bytes, special, template_source, &config_path)
    }

    fn new(
        tokenizer: Tokenizer,
        tokenizer_bytes: &[u8],
        special: SpecialTokens,
        template_source: Option<String>,
        config_path: &Path,
    ) -> Result<Self> {
        let eos_text = special
            .eos_token
            .clone()
            .ok_or_else(|| tokenizer_error(config_path, "eos_token is not set"))?;
        let token_id = |text: &str, field: &str| {
            tokenizer.token_to_id(text).ok_or_else(|| {
                tokenizer_error(config_path, format!("{field} {text:?} is not in the vocabulary"))
            })
        };
        let eos_id = token_id(&eos_text, "eos_token")?;
        let pad_id = match &special.pad_token {
            Some(pad) => token_id(pad, "pad_token")?,
            None => eos_id,
        };
        let template = match &template_source {
            Some(source) => Some(
                ChatTemplate::new(source, special.clone())
                    .map_err(|e| Error::Template(format!("cannot compile: {e}")))?,
            ),
            None => None,
        };
        let added_prefix = added_prefix(&tokenizer)?;
        let fingerprint = fingerprint(tokenizer_bytes, &special, template_source.as_deref());
        Ok(Self {
            tokenizer,
            template,
            template_source,
            eos_text,
            eos_id,
            pad_id,
            added_prefix,
            fingerprint,
        })
    }

    /// The id padding positions hold: tokenizer_config.json's `pad_token`, else the EOS.
    pub fn pad_token_id(&self) -> i64 {
        i64::from(self.pad_id)
    }

    /// Ids that end a generated answer: the EOS first, then the end-of-turn markers the
    /// chat template writes (ChatML's `<|im_end|>` is SmolLM2's EOS itself).
    pub fn eos_token_ids(&self) -> Vec<i64> {
        let mut ids = vec![self.eos_id];
        if let Some(source) = &self.template_source {
            for marker in END_OF_TURN_MARKERS {
                if let Some(id) = self.tokenizer.token_to_id(marker) {
                    if source.contains(marker) && !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
        ids.into_iter().map(i64::from).collect()
    }

    /// A hex SHA-256 of tokenizer.json, the special tokens and the chat template: equal
    /// fingerprints tokenise every pair identically.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The ids of one user turn followed by the generation prompt (for `caldpo generate`).
    pub fn encode_prompt(&self, user_text: &str) -> Result<Vec<i64>> {
        let text = match &self.template {
            Some(template) => template
                .render(&[Message::new("user", user_text)], true)
                .map_err(Error::Template)?,
            None => user_text.to_string(),
        };
        self.encode_prompt_text(&text).map_err(Error::Encode)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = ids
            .iter()
            .map(|&id| u32::try_from(id).map_err(|_| Error::Encode(format!("bad token id {id}"))))
            .collect::<Result<Vec<u32>>>()?;
        self.tokenizer.decode(&ids, false).map_err(|e| Error::Encode(format!("cannot decode: {e}")))
    }

    /// Whether a chat template applies (false under `chat_template = "none"`).
    pub(crate) fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// The token ids of one pair: prompt, and each response ending with the end-of-turn id.
    pub(crate) fn encode_pair(&self, pair: &PairText) -> std::result::Result<PairIds, RowProblem> {
        let texts = match &self.template {
            Some(template) => self.templated_texts(template, pair)?,
            None => plain_texts(pair),
        };
        let encoded = || -> std::result::Result<PairIds, String> {
            Ok(PairIds {
                prompt: self.encode_prompt_text(&texts.prompt)?,
                chosen: self.encode_response(&texts.chosen)?,
                rejected: self.encode_response(&texts.rejected)?,
            })
        };
        encoded().map_err(RowProblem::Tokenizer)
    }

    fn templated_texts(
        &self,
        template: &ChatTemplate,
        pair: &PairText,
    ) -> std::result::Result<PairTexts, RowProblem> {
        let owned;
        let (prompt, chosen, rejected) = match pair {
            PairText::Chat { prompt, chosen, rejected } => (prompt, chosen, rejected),
            PairText::Plain { prompt, chosen, rejected } => {
                owned = (
                    vec![Message::new("user", prompt.as_str())],
                    vec![Message::new("assistant", chosen.as_str())],
                    vec![Message::new("assistant", rejected.as_str())],
                );
                (&owned.0, &owned.1, &owned.2)
            }
        };
        let prompt_text = template.render(prompt, true).map_err(RowProblem::Template)?;
        let response = |messages: &[Message], name: &str| {
            if messages.is_empty() {
                return Ok(String::new());
            }
            let conversation: Vec<Message> = prompt.iter().chain(messages).cloned().collect();
            let full = template.render(&conversation, false).map_err(RowProblem::Template)?;
            let suffix = full.strip_prefix(&prompt_text).ok_or_else(|| {
                RowProblem::Template(format!(
                    "the prompt rendered with the generation prompt is not a prefix of the \
                     conversation rendered with the {name} response (does the response start \
                     with an assistant message?)"
                ))
            })?;
            Ok(self.before_end_of_turn(suffix).to_string())
        };
        Ok(PairTexts {
            chosen: response(chosen, "chosen")?,
            rejected: response(rejected, "rejected")?,
            prompt: prompt_text,
        })
    }

    /// The response text up to its last end-of-turn token; all of it when the template
    /// writes none.
    fn before_end_of_turn<'a>(&self, text: &'a str) -> &'a str {
        match text.rfind(&self.eos_text) {
            Some(at) => &text[..at],
            None => text,
        }
    }

    fn encode_prompt_text(&self, text: &str) -> std::result::Result<Vec<i64>, String> {
        let ids = self.encode(text)?;
        let mut prompt = Vec::with_capacity(ids.len() + self.added_prefix.len());
        if !self.added_prefix.is_empty() && !ids.starts_with(&self.added_prefix) {
            prompt.extend(&self.added_prefix);
        }
        prompt.extend(ids);
        Ok(prompt.into_iter().map(i64::from).collect())
    }

    fn encode_response(&self, text: &str) -> std::result::Result<Vec<i64>, String> {
        // Plain-text responses may carry the end-of-turn text already.
        let text = text.strip_suffix(self.eos_text.as_str()).unwrap_or(text);
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids: Vec<i64> = self.encode(text)?.into_iter().map(i64::from).collect();
        ids.push(i64::from(self.eos_id));
        Ok(ids)
    }

    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }
}

struct PairTexts {
    prompt: String,
    chosen: String,
    rejected: String,
}

/// Texts under `chat_template = "none"`: plain pairs as they are; message pairs as an
/// Anthropic-HH style transcript ("\n\nHuman: ...\n\nAssistant:"), the plain dialogue
/// format base models know best.
fn plain_texts(pair: &PairText) -> PairTexts {
    match pair {
        PairText::Plain { prompt, chosen, rejected } => {
            PairTexts { prompt: prompt.clone(), chosen: chosen.clone(), rejected: rejected.clone() }
        }
        PairText::Chat { prompt, chosen, rejected } => PairTexts {
            prompt: format!("{}\n\nAssistant:", transcript(prompt)),
            chosen: plain_response(chosen),
            rejected: plain_response(rejected),
        },
    }
}

fn transcript(messages: &[Message]) -> String {
    let mut text = String::new();
    for message in messages {
        match message.role.as_str() {
            "system" => text.push_str(&message.content),
            "user" => text.push_str(&format!("\n\nHuman: {}", message.content)),
            "assistant" => text.push_str(&format!("\n\nAssistant: {}", message.content)),
            role => text.push_str(&format!("\n\n{role}: {}", message.content)),
        }
    }
    text
}

/// A response continuing a transcript whose prompt ends with "\n\nAssistant:".
fn plain_response(messages: &[Message]) -> String {
    match messages.split_first() {
        None => String::new(),
        Some((first, rest)) if first.role == "assistant" => {
            if first.content.is_empty() && rest.is_empty() {
                String::new()
            } else {
                format!(" {}{}", first.content, transcript(rest))
            }
        }
        Some(_) => transcript(messages),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

fn tokenizer_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Tokenizer { path: path.to_path_buf(), message: message.into() }
}

/// bos/eos/pad/unk from tokenizer_config.json: a string or an AddedToken `{content: ...}`.
fn special_tokens(config: &Value) -> SpecialTokens {
    let token = |key: &str| match config.get(key) {
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Object(map)) => map.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    };
    SpecialTokens {
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
        pad_token: token("pad_token"),
        unk_token: token("unk_token"),
    }
}

/// The model's own template: tokenizer_config.json's `chat_template` (a string, or a list
/// of `{name, template}` of which "default" is taken), else chat_template.jinja beside it.
fn auto_template(model_dir: &Path, config: &Value, config_path: &Path) -> Result<String> {
    match config.get("chat_template") {
        Some(Value::String(source)) => return Ok(source.clone()),
        Some(Value::Array(named)) => {
            fn source(entry: &Value) -> Option<&str> {
                entry.get("template").and_then(Value::as_str)
            }
            let default =
                named.iter().find(|e| e.get("name").and_then(Value::as_str) == Some("default"));
            if let Some(source) = default.or(named.first()).and_then(source) {
                return Ok(source.to_string());
            }
        }
        _ => {}
    }
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.exists() {
        let bytes = read(&jinja)?;
        return String::from_utf8(bytes).map_err(|_| tokenizer_error(&jinja, "not UTF-8"));
    }
    Err(tokenizer_error(
        config_path,
        "no chat_template here nor chat_template.jinja beside it: set data.chat_template to \
         \"none\" (plain text) or to a .jinja file",
    ))
}

/// The ids the post-processor adds in front of a text: encode a probe with and without
/// special tokens and take what precedes the plain ids.
fn added_prefix(tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let probe = "a";
    let encode = |special| {
        tokenizer
            .encode_fast(probe, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Encode(format!("cannot encode {probe:?}: {e}")))
    };
    let plain = encode(false)?;
    let with_special = encode(true)?;
    let at = (0..=with_special.len().saturating_sub(plain.len()))
        .find(|&at| with_special[at..].starts_with(&plain))
        .unwrap_or(0);
    Ok(with_special[..at].to_vec())
}

fn fingerprint(tokenizer_bytes: &[u8], special: &SpecialTokens, template: Option<&str>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"caldpo-pair-tokenizer-v1\0");
    hasher.update(Sha256::digest(tokenizer_bytes));
    hasher.update(serde_json::to_vec(special).expect("special tokens serialise"));
    match template {
        Some(source) => {
            hasher.update(b"\0template\0");
            hasher.update(source.as_bytes());
        }
        None => hasher.update(b"\0none\0"),
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_transcript_reads_like_hh() {
        let pair = PairText::Chat {
            prompt: vec![Message::new("system", "Be kind."), Message::new("user", "Hi")],
            chosen: vec![Message::new("assistant", "Hello")],
            rejected: vec![Message::new("assistant", "")],
        };
        let texts = plain_texts(&pair);
        assert_eq!(texts.prompt, "Be kind.\n\nHuman: Hi\n\nAssistant:");
        assert_eq!(texts.chosen, " Hello");
        assert_eq!(texts.rejected, "");
    }
}
