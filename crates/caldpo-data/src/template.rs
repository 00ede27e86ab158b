//! Hugging Face chat templates rendered with minijinja.
//!
//! transformers renders `chat_template` with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop
//! controls), passing `messages`, `add_generation_prompt`, the special tokens of
//! tokenizer_config.json, and the functions `raise_exception` and `strftime_now`. The same
//! environment is rebuilt here; minijinja-contrib's pycompat layer supplies the Python string
//! methods templates call (`.strip()`, `.startswith()`, ...), and `tojson` follows Python's
//! `json.dumps` spacing, as transformers' does, rather than minijinja's HTML-safe one.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::Kwargs;
use minijinja::{context, Environment, ErrorKind, Value};
use serde::Serialize;

use crate::schema::Message;

const TEMPLATE_NAME: &str = "chat_template";

/// The special tokens of tokenizer_config.json that templates refer to.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
}

impl ChatTemplate {
    /// Compiles `source`; the error is minijinja's message with the line.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(describe)?;
        Ok(Self { env, special })
    }

    /// Renders `messages`, with the assistant generation prompt when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(describe)?;
        let special = &self.special;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => special.bos_token,
                eos_token => special.eos_token,
                pad_token => special.pad_token,
                unk_token => special.unk_token,
            })
            .map_err(describe)
    }
}

/// minijinja's error with its cause chain and template line on one line.
fn describe(error: minijinja::Error) -> String {
    let mut message = match error.kind() {
        ErrorKind::InvalidOperation if error.detail().is_some() => {
            error.detail().unwrap_or_default().to_string()
        }
        _ => error.to_string(),
    };
    if let Some(line) = error.line() {
        if !message.contains("line") {
            message.push_str(&format!(" (template line {line})"));
        }
    }
    message
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: `", "` and `": "`
/// separators without indent, which is what transformers' `tojson` passes on.
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    // transformers accepts these keywords; sort_keys would reorder nothing caldpo renders.
    let _: Option<Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(width) => {
            let spaces = " ".repeat(width);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonJson)),
    };
    result.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(text))
}

/// serde_json formatter with Python's default separators.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// transformers' `strftime_now`: today's date (UTC) in a `strftime` format. Supports the
/// directives date-stamping templates use: %Y %m %d %B %b %H %M %S %%.
fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(&format, seconds).map(Value::from)
}

fn strftime(format: &str, unix_seconds: u64) -> Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (year, month, day) = civil_from_days((unix_seconds / 86_400) as i64);
    let time_of_day = unix_seconds % 86_400;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('H') => out.push_str(&format!("{:02}", time_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", time_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", time_of_day % 60)),
            Some('%') => out.push('%'),
            other => {
                let directive = other.map_or(String::new(), String::from);
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{directive}"),
                ));
            }
        }
    }
    Ok(out)
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn special() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..SpecialTokens::default()
        }
    }

    #[test]
    fn renders_with_trim_blocks_and_python_methods() {
        let source = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}\n\
                      [U]{{ m.content.strip() }}\n  {% else %}\n[A]{{ m['content'] }}{{ eos_token }}\n\
                      {% endif %}\n{% endfor %}{% if add_generation_prompt %}[A]{% endif %}";
        let template = ChatTemplate::new(source, special()).unwrap();
        let messages = [Message::new("user", "  hi  "), Message::new("assistant", "yo")];
        // trim_blocks drops the newline after each block tag and lstrip_blocks the
        // indentation before it, so only the literal "\n" after each content line remains.
        assert_eq!(template.render(&messages, false).unwrap(), "<s>[U]hi\n[A]yo</s>\n");
        assert_eq!(template.render(&messages[..1], true).unwrap(), "<s>[U]hi\n[A]");
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}";
        let template = ChatTemplate::new(source, special()).unwrap();
        let err = template.render(&[Message::new("system", "s")], false).unwrap_err();
        assert!(err.contains("first must be user"), "{err}");
    }

    #[test]
    fn tojson_uses_python_separators() {
        let template = ChatTemplate::new(
            "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            special(),
        )
        .unwrap();
        let rendered = template.render(&[Message::new("user", "<é>")], false).unwrap();
        // json.dumps([{"role": "user", "content": "<é>"}], ensure_ascii=False) and the same
        // object with indent=2, as Python prints them.
        assert_eq!(
            rendered,
            "[{\"role\": \"user\", \"content\": \"<é>\"}]|{\n  \"role\": \"user\",\n  \"content\": \"<é>\"\n}"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-23 00:00:00 UTC is 19927 days after 1970-01-01:
        // 54 years of 365 days = 19710, plus 13 leap days (1972..2020) = 19723 to 2024-01-01,
        // plus 31+29+31+30+31+30 = 182 days to July 1 and 22 more = 19927.
        let seconds = 19_927 * 86_400 + 3_661;
        assert_eq!(strftime("%d %b %Y %H:%M:%S", seconds).unwrap(), "23 Jul 2024 01:01:01");
        assert_eq!(strftime("%B %m", seconds).unwrap(), "July 07");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert!(strftime("%j", 0).is_err());
    }
}
