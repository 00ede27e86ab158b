//! The `[data]` table of the trainer's configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The canonical field names a `columns` entry may map a file field to.
pub(crate) const CANONICAL_FIELDS: [&str; 5] =
    ["prompt", "chosen", "rejected", "conversations", "system"];

/// The schema of the rows of a preference file. The file format (JSON Lines, JSON array,
/// Parquet) comes from the extension; this says what one row holds.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Detect from the fields of the first row (after `columns` renaming):
    /// `conversations` means sharegpt; `prompt` a string with `chosen` a string means
    /// prompt_chosen_rejected; any other `prompt` means conversational; `chosen` and
    /// `rejected` without `prompt` mean hh when `chosen` is a string holding both
    /// "\n\nHuman:" and "\n\nAssistant:", else implicit.
    #[default]
    Auto,
    /// `{prompt, chosen, rejected}`, three strings. Under a chat template the prompt becomes
    /// one user turn and each response one assistant turn.
    PromptChosenRejected,
    /// `prompt` a list of `{role, content}` messages, `chosen` and `rejected` lists of
    /// assistant messages (a plain string stands for one user or assistant message).
    Conversational,
    /// `chosen` and `rejected` whole conversations (two strings or two message lists) whose
    /// shared prefix is the prompt. LLaMA-Factory's `chosen_messages` and
    /// `rejected_messages` are read as `chosen` and `rejected`.
    Implicit,
    /// LLaMA-Factory's ShareGPT ranking rows: `conversations` a list of `{from, value}`
    /// turns (`from` system, human or gpt), `chosen` and `rejected` one `{from, value}` turn
    /// each, and an optional `system` string.
    Sharegpt,
    /// Anthropic HH: `chosen` and `rejected` raw transcripts of "\n\nHuman:" and
    /// "\n\nAssistant:" turns; the prompt is everything up to and including the last
    /// "\n\nAssistant:".
    Hh,
}

/// The `[data]` table: which preference files to read and how to turn them into token ids.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training file (.jsonl, .json or .parquet). Default "": the trainer requires it.
    pub train: PathBuf,
    /// Held-out file of the same kinds. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<PathBuf>,
    /// Fraction of the training pairs held out for evaluation when `eval` is not set, chosen
    /// by a hash of each pair's id and the seed. Default 0.0 (no evaluation split).
    pub eval_fraction: f64,
    /// The row schema. Default `auto`.
    pub format: Format,
    /// Renames file fields to canonical ones, `file_field = "canonical_field"`, e.g.
    /// `{ question = "prompt", response_a = "chosen" }`. Canonical fields: prompt, chosen,
    /// rejected, conversations, system. A renamed field replaces a field of the target name
    /// that the file also has. Default empty.
    pub columns: BTreeMap<String, String>,
    /// `auto` (the model's tokenizer_config.json template, else its chat_template.jinja),
    /// `none` (plain text for base models: prompt and responses concatenated as they are,
    /// with the tokenizer's own BOS if it adds one; message pairs become an Anthropic-HH style
    /// "\n\nHuman: ...\n\nAssistant:" transcript) or a path to a .jinja file. Default `auto`.
    pub chat_template: String,
    /// Longest sequence in tokens, prompt plus response. Default 1024.
    pub max_length: usize,
    /// Longest prompt in tokens; a longer prompt keeps its end. Must be below `max_length`.
    /// Default 512.
    pub max_prompt_length: usize,
    /// Skip rows that cannot be parsed and count them by reason, instead of failing on the
    /// first. Default false.
    pub skip_bad_rows: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            eval_fraction: 0.0,
            format: Format::Auto,
            columns: BTreeMap::new(),
            chat_template: "auto".to_string(),
            max_length: 1024,
            max_prompt_length: 512,
            skip_bad_rows: false,
        }
    }
}

impl DataConfig {
    /// Checks the limits, the eval split and the column mapping. Does not touch the files.
    pub fn validate(&self) -> Result<()> {
        if self.max_prompt_length == 0 {
            return Err(Error::Config("max_prompt_length must be at least 1".into()));
        }
        if self.max_prompt_length >= self.max_length {
            return Err(Error::Config(format!(
                "max_prompt_length ({}) must be below max_length ({}) to leave room for the \
                 response",
                self.max_prompt_length, self.max_length
            )));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(Error::Config(format!(
                "eval_fraction must be in [0, 1), got {}",
                self.eval_fraction
            )));
        }
        if self.eval.is_some() && self.eval_fraction > 0.0 {
            return Err(Error::Config("set either eval or eval_fraction, not both".into()));
        }
        if self.chat_template.trim().is_empty() {
            return Err(Error::Config(
                "chat_template must be \"auto\", \"none\" or a path to a .jinja file".into(),
            ));
        }
        self.validate_columns()
    }

    fn validate_columns(&self) -> Result<()> {
        let mut targets = BTreeSet::new();
        for (source, target) in &self.columns {
            if !CANONICAL_FIELDS.contains(&target.as_str()) {
                return Err(Error::Config(format!(
                    "columns.{source} = \"{target}\": the target must be one of {}",
                    CANONICAL_FIELDS.join(", ")
                )));
            }
            if !targets.insert(target) {
                return Err(Error::Config(format!(
                    "columns maps more than one field to \"{target}\""
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let config = DataConfig::default();
        let text = toml::to_string(&config).unwrap();
        let back: DataConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, config);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn columns_and_format_parse() {
        let config: DataConfig = toml::from_str(
            "train = \"a.jsonl\"\nformat = \"sharegpt\"\n\
             columns = { question = \"prompt\", response_a = \"chosen\" }",
        )
        .unwrap();
        assert_eq!(config.format, Format::Sharegpt);
        assert_eq!(config.columns["question"], "prompt");
        assert!(config.validate().is_ok());
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = toml::from_str::<DataConfig>("max_len = 3").unwrap_err().to_string();
        assert!(err.contains("max_len"), "{err}");
    }

    #[test]
    fn validation_rejects_bad_limits_and_columns() {
        let bad = |f: fn(&mut DataConfig)| {
            let mut config = DataConfig::default();
            f(&mut config);
            config.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.max_prompt_length = 1024).contains("below max_length"));
        assert!(bad(|c| c.max_prompt_length = 0).contains("at least 1"));
        assert!(bad(|c| c.eval_fraction = 1.0).contains("eval_fraction"));
        assert!(bad(|c| {
            c.eval = Some("e.jsonl".into());
            c.eval_fraction = 0.1;
        })
        .contains("not both"));
        assert!(bad(|c| {
            c.columns.insert("q".into(), "question".into());
        })
        .contains("columns.q"));
        assert!(bad(|c| {
            c.columns.insert("a".into(), "chosen".into());
            c.columns.insert("b".into(), "chosen".into());
        })
        .contains("more than one"));
    }
}
