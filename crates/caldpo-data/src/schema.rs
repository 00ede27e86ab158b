//! Row schemas: from one JSON object (after `columns` renaming) to the texts of one pair.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::Format;
use crate::error::RowProblem;
use crate::reader::json_type;

const HH_HUMAN: &str = "\n\nHuman:";
const HH_ASSISTANT: &str = "\n\nAssistant:";

/// LLaMA-Factory's names for the implicit-prompt schema's fields, read when the canonical
/// field is absent.
const BUILTIN_ALIASES: [(&str, &str); 2] =
    [("chosen_messages", "chosen"), ("rejected_messages", "rejected")];

/// One chat message with its text parts joined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.to_string(), content: content.into() }
    }
}

/// The texts of one preference pair, before any template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum PairText {
    /// Messages: the prompt conversation and the messages each response adds to it.
    Chat { prompt: Vec<Message>, chosen: Vec<Message>, rejected: Vec<Message> },
    /// Raw strings, concatenated as they are when no chat template applies.
    Plain { prompt: String, chosen: String, rejected: String },
}

/// Parses rows of one file. Built from the config; the format is resolved from the first
/// row when it is `auto`.
pub(crate) struct Schema {
    format: Format,
    columns: BTreeMap<String, String>,
    /// With no chat template, HH transcripts keep their raw text instead of becoming
    /// messages.
    plain_text: bool,
}

impl Schema {
    pub fn new(format: Format, columns: &BTreeMap<String, String>, plain_text: bool) -> Self {
        Self { format, columns: columns.clone(), plain_text }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Fixes the format from a row's fields when it is `auto`; a no-op otherwise.
    pub fn resolve(&mut self, row: &Map<String, Value>) -> Result<(), RowProblem> {
        if self.format == Format::Auto {
            self.format = detect(&Fields::new(row.clone(), &self.columns))?;
        }
        Ok(())
    }

    /// Parses one row with the resolved format.
    pub fn parse(&self, row: Map<String, Value>) -> Result<PairText, RowProblem> {
        let mut fields = Fields::new(row, &self.columns);
        match self.format {
            Format::Auto => {
                let format = detect(&fields)?;
                Schema { format, columns: self.columns.clone(), plain_text: self.plain_text }
                    .parse_fields(&mut fields)
            }
            _ => self.parse_fields(&mut fields),
        }
    }

    fn parse_fields(&self, fields: &mut Fields) -> Result<PairText, RowProblem> {
        match self.format {
            Format::PromptChosenRejected => parse_explicit(fields),
            Format::Conversational => parse_conversational(fields),
            Format::Implicit => parse_implicit(fields),
            Format::Sharegpt => parse_sharegpt(fields),
            Format::Hh => parse_hh(fields, self.plain_text),
            Format::Auto => unreachable!("the format is resolved before parsing"),
        }
    }
}

/// A row's fields under canonical names, remembering the file's names for messages.
struct Fields {
    map: Map<String, Value>,
    /// Canonical name -> the file's name, for renamed fields.
    file_names: BTreeMap<String, String>,
    /// The field names as they are in the file.
    found: Vec<String>,
}

impl Fields {
    fn new(row: Map<String, Value>, columns: &BTreeMap<String, String>) -> Self {
        let found: Vec<String> = row.keys().cloned().collect();
        let mut map = Map::new();
        let mut renamed = Vec::new();
        for (name, value) in row {
            match columns.get(&name) {
                Some(target) => renamed.push((name, target.clone(), value)),
                None => {
                    map.insert(name, value);
                }
            }
        }
        // Every mapped name, present or not, so that a missing field is reported by the
        // name the file should have used.
        let mut file_names: BTreeMap<String, String> =
            columns.iter().map(|(source, target)| (target.clone(), source.clone())).collect();
        for (name, target, value) in renamed {
            map.insert(target.clone(), value);
            file_names.insert(target, name);
        }
        for (alias, target) in BUILTIN_ALIASES {
            if !map.contains_key(target) {
                if let Some(value) = map.remove(alias) {
                    map.insert(target.to_string(), value);
                    file_names.insert(target.to_string(), alias.to_string());
                }
            }
        }
        Self { map, file_names, found }
    }

    fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name)
    }

    /// The file's name of a canonical field.
    fn file_name(&self, name: &str) -> String {
        self.file_names.get(name).cloned().unwrap_or_else(|| name.to_string())
    }

    fn take(&mut self, name: &str) -> Result<Value, RowProblem> {
        self.map.remove(name).ok_or_else(|| self.missing(name))
    }

    fn missing(&self, name: &str) -> RowProblem {
        let field = match self.file_names.get(name) {
            Some(file_name) if file_name != name && !is_builtin_alias(file_name) => {
                format!("\"{file_name}\" (mapped to \"{name}\")")
            }
            _ => format!("\"{name}\""),
        };
        RowProblem::MissingField { field, found: self.found.clone() }
    }

    fn take_string(&mut self, name: &str) -> Result<String, RowProblem> {
        let label = self.file_name(name);
        match self.take(name)? {
            Value::String(text) => Ok(text),
            other => Err(wrong_type(&label, "a string", &other)),
        }
    }
}

fn is_builtin_alias(name: &str) -> bool {
    BUILTIN_ALIASES.iter().any(|(alias, _)| *alias == name)
}

fn wrong_type(field: &str, expected: &'static str, found: &Value) -> RowProblem {
    RowProblem::WrongType { field: field.to_string(), expected, found: json_type(found) }
}

fn detect(fields: &Fields) -> Result<Format, RowProblem> {
    if fields.has("conversations") {
        return Ok(Format::Sharegpt);
    }
    let chosen = fields.get("chosen").ok_or_else(|| fields.missing("chosen"))?;
    if !fields.has("rejected") {
        return Err(fields.missing("rejected"));
    }
    Ok(match (fields.get("prompt"), chosen) {
        (Some(Value::String(_)), Value::String(_)) => Format::PromptChosenRejected,
        (Some(_), _) => Format::Conversational,
        (None, Value::String(text)) if text.contains(HH_HUMAN) && text.contains(HH_ASSISTANT) => {
            Format::Hh
        }
        (None, _) => Format::Implicit,
    })
}

fn parse_explicit(fields: &mut Fields) -> Result<PairText, RowProblem> {
    Ok(PairText::Plain {
        prompt: fields.take_string("prompt")?,
        chosen: fields.take_string("chosen")?,
        rejected: fields.take_string("rejected")?,
    })
}

fn parse_conversational(fields: &mut Fields) -> Result<PairText, RowProblem> {
    let mut take = |name: &str, role: &str| {
        let label = fields.file_name(name);
        messages(fields.take(name)?, &label, role)
    };
    let prompt = take("prompt", "user")?;
    let chosen = take("chosen", "assistant")?;
    let rejected = take("rejected", "assistant")?;
    Ok(PairText::Chat { prompt, chosen, rejected })
}

fn parse_implicit(fields: &mut Fields) -> Result<PairText, RowProblem> {
    let chosen_label = fields.file_name("chosen");
    let rejected_label = fields.file_name("rejected");
    match (fields.take("chosen")?, fields.take("rejected")?) {
        (Value::String(chosen), Value::String(rejected)) => {
            let split = shared_text_prefix(&chosen, &rejected);
            Ok(PairText::Plain {
                prompt: chosen[..split].to_string(),
                chosen: chosen[split..].to_string(),
                rejected: rejected[split..].to_string(),
            })
        }
        (chosen @ Value::Array(_), rejected @ Value::Array(_)) => {
            let mut chosen = messages(chosen, &chosen_label, "assistant")?;
            let mut rejected = messages(rejected, &rejected_label, "assistant")?;
            let mut shared = chosen.iter().zip(&rejected).take_while(|(c, r)| c == r).count();
            // When one conversation is a prefix of the other (identical responses), the
            // final shared assistant turns belong to the responses, not to the prompt.
            while shared > 0
                && shared == chosen.len().min(rejected.len())
                && chosen[shared - 1].role == "assistant"
            {
                shared -= 1;
            }
            let prompt: Vec<Message> = chosen.drain(..shared).collect();
            rejected.drain(..shared);
            Ok(PairText::Chat { prompt, chosen, rejected })
        }
        (Value::String(_), other) | (Value::Array(_), other) => Err(wrong_type(
            &rejected_label,
            "the same type as chosen (two strings or two message lists)",
            &other,
        )),
        (other, _) => Err(wrong_type(&chosen_label, "a string or a list of messages", &other)),
    }
}

/// The byte length of the prompt shared by two implicit-prompt strings: their longest common
/// prefix, less a final space so that the responses keep their leading space (as TRL's
/// `extract_prompt` does).
fn shared_text_prefix(chosen: &str, rejected: &str) -> usize {
    let mut split = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map(|((index, _), _)| index)
        .unwrap_or_else(|| chosen.len().min(rejected.len()));
    if split > 0 && chosen[..split].ends_with(' ') {
        split -= 1;
    }
    split
}

fn parse_sharegpt(fields: &mut Fields) -> Result<PairText, RowProblem> {
    let mut prompt = Vec::new();
    if let Some(system) = fields.map.remove("system") {
        match system {
            Value::String(text) if !text.is_empty() => prompt.push(Message::new("system", text)),
            Value::String(_) | Value::Null => {}
            other => return Err(wrong_type(&fields.file_name("system"), "a string", &other)),
        }
    }
    let label = fields.file_name("conversations");
    match fields.take("conversations")? {
        Value::Array(turns) => {
            for (index, turn) in turns.into_iter().enumerate() {
                prompt.push(message(turn, &format!("{label}[{index}]"))?);
            }
        }
        other => return Err(wrong_type(&label, "a list of {from, value} turns", &other)),
    }
    let chosen_label = fields.file_name("chosen");
    let rejected_label = fields.file_name("rejected");
    let chosen = messages(fields.take("chosen")?, &chosen_label, "assistant")?;
    let rejected = messages(fields.take("rejected")?, &rejected_label, "assistant")?;
    Ok(PairText::Chat { prompt, chosen, rejected })
}

fn parse_hh(fields: &mut Fields, plain_text: bool) -> Result<PairText, RowProblem> {
    let chosen_label = fields.file_name("chosen");
    let rejected_label = fields.file_name("rejected");
    let chosen = fields.take_string("chosen")?;
    let rejected = fields.take_string("rejected")?;
    let end = chosen.rfind(HH_ASSISTANT).ok_or_else(|| RowProblem::BadValue {
        field: chosen_label,
        message: "has no \"\\n\\nAssistant:\" turn".into(),
    })? + HH_ASSISTANT.len();
    let prompt = &chosen[..end];
    if !rejected.starts_with(prompt) {
        return Err(RowProblem::BadValue {
            field: rejected_label,
            message: "does not begin with the prompt of \"chosen\" (everything up to its last \
                      \"\\n\\nAssistant:\")"
                .into(),
        });
    }
    if plain_text {
        return Ok(PairText::Plain {
            prompt: prompt.to_string(),
            chosen: chosen[end..].to_string(),
            rejected: rejected[end..].to_string(),
        });
    }
    let mut turns = hh_turns(prompt);
    // The prompt ends with the marker of the assistant turn the responses fill in.
    turns.pop();
    Ok(PairText::Chat {
        prompt: turns,
        chosen: vec![Message::new("assistant", chosen[end..].trim())],
        rejected: vec![Message::new("assistant", rejected[end..].trim())],
    })
}

/// Splits an HH transcript into messages at its "\n\nHuman:" and "\n\nAssistant:" markers.
/// Text before the first marker, if any, becomes a system message.
fn hh_turns(transcript: &str) -> Vec<Message> {
    let mut markers: Vec<(usize, &str, &str)> = Vec::new();
    for (marker, role) in [(HH_HUMAN, "user"), (HH_ASSISTANT, "assistant")] {
        markers.extend(transcript.match_indices(marker).map(|(at, _)| (at, marker, role)));
    }
    markers.sort_unstable();
    let mut turns = Vec::new();
    let first = markers.first().map_or(transcript.len(), |m| m.0);
    if !transcript[..first].trim().is_empty() {
        turns.push(Message::new("system", transcript[..first].trim()));
    }
    for (i, (at, marker, role)) in markers.iter().enumerate() {
        let end = markers.get(i + 1).map_or(transcript.len(), |m| m.0);
        turns.push(Message::new(role, transcript[at + marker.len()..end].trim()));
    }
    turns
}

/// A string (one message of `default_role`), one message object or a list of them.
fn messages(value: Value, field: &str, default_role: &str) -> Result<Vec<Message>, RowProblem> {
    match value {
        Value::String(text) => Ok(vec![Message::new(default_role, text)]),
        Value::Object(_) => Ok(vec![message(value, field)?]),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| message(item, &format!("{field}[{index}]")))
            .collect(),
        other => Err(wrong_type(field, "a string or a list of messages", &other)),
    }
}

/// One `{role, content}` (or ShareGPT `{from, value}`) message.
fn message(value: Value, field: &str) -> Result<Message, RowProblem> {
    let Value::Object(mut map) = value else {
        return Err(wrong_type(field, "a {role, content} message", &value));
    };
    let (role_key, content_key) =
        if map.contains_key("from") { ("from", "value") } else { ("role", "content") };
    let role = match map.remove(role_key) {
        Some(Value::String(role)) => normalise_role(&role, &format!("{field}.{role_key}"))?,
        Some(other) => return Err(wrong_type(&format!("{field}.{role_key}"), "a string", &other)),
        None => {
            let found = map.keys().cloned().collect();
            return Err(RowProblem::MissingField { field: format!("\"{field}.role\""), found });
        }
    };
    let content = match map.remove(content_key) {
        Some(value) => content(value, &format!("{field}.{content_key}"))?,
        None => {
            let found = map.keys().cloned().collect();
            return Err(RowProblem::MissingField {
                field: format!("\"{field}.{content_key}\""),
                found,
            });
        }
    };
    Ok(Message { role, content })
}

/// Maps ShareGPT speaker names to chat roles; other roles pass through for the template.
fn normalise_role(role: &str, field: &str) -> Result<String, RowProblem> {
    Ok(match role {
        "human" | "user" => "user",
        "gpt" | "assistant" | "function_call" => "assistant",
        "observation" | "tool" => "tool",
        "system" => "system",
        "" => {
            return Err(RowProblem::BadValue { field: field.into(), message: "empty role".into() })
        }
        other => other,
    }
    .to_string())
}

/// Message content: a string, null (no text), or a list of text parts whose texts are
/// joined with nothing between them.
fn content(value: Value, field: &str) -> Result<String, RowProblem> {
    match value {
        Value::String(text) => Ok(text),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (index, part) in parts.into_iter().enumerate() {
                text.push_str(&content_part(part, &format!("{field}[{index}]"))?);
            }
            Ok(text)
        }
        other => Err(wrong_type(field, "a string or a list of text parts", &other)),
    }
}

/// `{type: "text", text}` or `{type: "text", value}` (LLaMA-Factory), or a bare string.
fn content_part(part: Value, field: &str) -> Result<String, RowProblem> {
    let Value::Object(mut map) = part else {
        return match part {
            Value::String(text) => Ok(text),
            other => Err(wrong_type(field, "a {type: text, text} part", &other)),
        };
    };
    match map.get("type") {
        None => {}
        Some(Value::String(kind)) if kind == "text" => {}
        Some(other) => {
            return Err(RowProblem::BadValue {
                field: format!("{field}.type"),
                message: format!("only text parts are supported, found {other}"),
            })
        }
    }
    match map.remove("text").or_else(|| map.remove("value")) {
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(wrong_type(&format!("{field}.text"), "a string", &other)),
        None => Err(RowProblem::MissingField {
            field: format!("\"{field}.text\" or \"{field}.value\""),
            found: map.keys().cloned().collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(format: Format, row: Value) -> Result<PairText, RowProblem> {
        parse_with(format, row, &BTreeMap::new(), false)
    }

    fn parse_with(
        format: Format,
        row: Value,
        columns: &BTreeMap<String, String>,
        plain: bool,
    ) -> Result<PairText, RowProblem> {
        let Value::Object(map) = row else { panic!("fixture rows are objects") };
        let mut schema = Schema::new(format, columns, plain);
        schema.resolve(&map)?;
        schema.parse(map)
    }

    fn detected(row: Value) -> Format {
        let Value::Object(map) = row else { panic!("fixture rows are objects") };
        let mut schema = Schema::new(Format::Auto, &BTreeMap::new(), false);
        schema.resolve(&map).unwrap();
        schema.format()
    }

    fn chat(prompt: &[(&str, &str)], chosen: &str, rejected: &str) -> PairText {
        PairText::Chat {
            prompt: prompt.iter().map(|(r, c)| Message::new(r, *c)).collect(),
            chosen: vec![Message::new("assistant", chosen)],
            rejected: vec![Message::new("assistant", rejected)],
        }
    }

    #[test]
    fn detection_follows_the_first_rows_fields() {
        assert_eq!(
            detected(json!({"prompt": "p", "chosen": "a", "rejected": "b"})),
            Format::PromptChosenRejected
        );
        assert_eq!(
            detected(json!({"prompt": [], "chosen": [], "rejected": []})),
            Format::Conversational
        );
        assert_eq!(detected(json!({"chosen": "x", "rejected": "y"})), Format::Implicit);
        assert_eq!(
            detected(json!({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "c"})),
            Format::Hh
        );
        assert_eq!(
            detected(json!({"conversations": [], "chosen": {}, "rejected": {}})),
            Format::Sharegpt
        );
        assert_eq!(
            detected(json!({"chosen_messages": [], "rejected_messages": []})),
            Format::Implicit
        );
    }

    #[test]
    fn missing_field_names_what_the_row_has() {
        let err = parse(Format::Auto, json!({"prompt": "p", "response_a": "a", "response_b": "b"}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field \"chosen\" is missing (found: prompt, response_a, response_b)"
        );
        assert_eq!(err.kind(), "missing_field");
    }

    #[test]
    fn columns_rename_file_fields_to_canonical_ones() {
        let columns: BTreeMap<String, String> =
            [("question", "prompt"), ("good", "chosen"), ("bad", "rejected")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        let pair = parse_with(
            Format::Auto,
            json!({"question": "q", "good": "a", "bad": "b", "chosen": "ignored"}),
            &columns,
            false,
        )
        .unwrap();
        let expected =
            PairText::Plain { prompt: "q".into(), chosen: "a".into(), rejected: "b".into() };
        assert_eq!(pair, expected);

        let err = parse_with(
            Format::PromptChosenRejected,
            json!({"good": "a", "bad": "b"}),
            &columns,
            false,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field \"question\" (mapped to \"prompt\") is missing (found: bad, good)"
        );
    }

    #[test]
    fn conversational_accepts_text_parts_and_strings() {
        let pair = parse(
            Format::Auto,
            json!({
                "prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                         {"type": "text", "value": "there"}]}],
                "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": "Go away",
            }),
        )
        .unwrap();
        assert_eq!(pair, chat(&[("user", "Hi there")], "Hello", "Go away"));
    }

    #[test]
    fn image_parts_and_wrong_types_are_reported_with_their_path() {
        let err = parse(
            Format::Conversational,
            json!({"prompt": [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
                   "chosen": "a", "rejected": "b"}),
        )
        .unwrap_err();
        assert_eq!(err.kind(), "bad_value");
        assert!(err.to_string().contains("prompt[0].content[0].type"), "{err}");

        let err =
            parse(Format::Auto, json!({"prompt": "p", "chosen": "a", "rejected": 3})).unwrap_err();
        assert_eq!(err.to_string(), "field \"rejected\" is a number, expected a string");
    }

    #[test]
    fn implicit_strings_split_at_the_shared_prefix() {
        // Shared prefix "Q: 2+2? A: " ends in a space, which goes to the responses.
        let pair =
            parse(Format::Auto, json!({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}))
                .unwrap();
        let expected = PairText::Plain {
            prompt: "Q: 2+2? A:".into(),
            chosen: " 4".into(),
            rejected: " 5".into(),
        };
        assert_eq!(pair, expected);
        // Multi-byte characters: the split stays on a char boundary.
        let pair =
            parse(Format::Implicit, json!({"chosen": "日本語é", "rejected": "日本語è"})).unwrap();
        let expected =
            PairText::Plain {
                prompt: "日本語".into(), chosen: "é".into(), rejected: "è".into()
            };
        assert_eq!(pair, expected);
    }

    #[test]
    fn implicit_message_lists_share_their_prefix() {
        let pair = parse(
            Format::Auto,
            json!({
                "chosen_messages": [
                    {"role": "system", "content": [{"type": "text", "value": "S"}], "loss_weight": 0.0},
                    {"role": "user", "content": [{"type": "text", "value": "U"}], "loss_weight": 0.0},
                    {"role": "assistant", "content": [{"type": "text", "value": "good"}], "loss_weight": 1.0}],
                "rejected_messages": [
                    {"role": "system", "content": [{"type": "text", "value": "S"}], "loss_weight": 0.0},
                    {"role": "user", "content": [{"type": "text", "value": "U"}], "loss_weight": 0.0},
                    {"role": "assistant", "content": [{"type": "text", "value": "bad"}], "loss_weight": 1.0}],
            }),
        )
        .unwrap();
        assert_eq!(pair, chat(&[("system", "S"), ("user", "U")], "good", "bad"));
    }

    #[test]
    fn sharegpt_maps_speakers_and_prepends_system() {
        let pair = parse(
            Format::Auto,
            json!({
                "system": "Be brief.",
                "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                  {"from": "human", "value": "c"}],
                "chosen": {"from": "gpt", "value": "yes"},
                "rejected": {"from": "gpt", "value": "no"},
            }),
        )
        .unwrap();
        let prompt = [("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c")];
        assert_eq!(pair, chat(&prompt, "yes", "no"));
    }

    #[test]
    fn hh_prompt_ends_at_the_last_assistant_marker() {
        let row = json!({
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.",
        });
        let plain = parse_with(Format::Auto, row.clone(), &BTreeMap::new(), true).unwrap();
        let expected = PairText::Plain {
            prompt: "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:".into(),
            chosen: " Knock knock.".into(),
            rejected: " No.".into(),
        };
        assert_eq!(plain, expected);
        let messages = parse(Format::Hh, row).unwrap();
        let prompt = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Joke?")];
        assert_eq!(messages, chat(&prompt, "Knock knock.", "No."));

        let err = parse(
            Format::Hh,
            json!({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: b"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not begin with the prompt"), "{err}");
    }
}
