//! Streaming readers for JSON Lines, JSON arrays and Parquet files. Each hands rows to a
//! callback one at a time, so memory follows what the caller keeps, not the file's size.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde::de::{Error as _, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::{Error, Result, RowLocation, RowPosition, RowProblem};

/// One row as read: its JSON object, or why it could not be decoded.
pub(crate) type RawRow = std::result::Result<Map<String, Value>, RowProblem>;

/// Calls `sink` with every row of `path`, in file order. The extension picks the reader:
/// `.jsonl`, `.json` or `.parquet`. Rows that fail to decode are handed to `sink` (which
/// decides whether to skip them) when the reader can continue past them; errors the reader
/// cannot continue past (a JSON array cut short, a broken Parquet file) are returned.
pub(crate) fn for_each_row(
    path: &Path,
    sink: &mut dyn FnMut(RowLocation, RawRow) -> Result<()>,
) -> Result<()> {
    match FileKind::of(path)? {
        FileKind::JsonLines => read_jsonl(path, sink),
        FileKind::JsonArray => read_json_array(path, sink),
        FileKind::Parquet => read_parquet(path, sink),
    }
}

/// The file formats caldpo reads, by extension.
pub(crate) enum FileKind {
    JsonLines,
    JsonArray,
    Parquet,
}

impl FileKind {
    pub fn of(path: &Path) -> Result<Self> {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match extension.to_ascii_lowercase().as_str() {
            "jsonl" => Ok(FileKind::JsonLines),
            "json" => Ok(FileKind::JsonArray),
            "parquet" => Ok(FileKind::Parquet),
            _ => Err(Error::File {
                path: path.to_path_buf(),
                message: "unknown file extension: expected .jsonl, .json or .parquet".into(),
            }),
        }
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

fn read_jsonl(path: &Path, sink: &mut dyn FnMut(RowLocation, RawRow) -> Result<()>) -> Result<()> {
    let mut reader = BufReader::new(open(path)?);
    let mut buffer = Vec::new();
    let mut line = 0;
    loop {
        buffer.clear();
        let read = reader
            .read_until(b'\n', &mut buffer)
            .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        if read == 0 {
            return Ok(());
        }
        line += 1;
        if buffer.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let location = RowLocation { path: path.to_path_buf(), position: RowPosition::Line(line) };
        sink(location, decode_json_line(&buffer))?;
    }
}

fn decode_json_line(bytes: &[u8]) -> RawRow {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        RowProblem::InvalidUtf8(format!("bad byte at offset {} of the line", e.valid_up_to()))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(RowProblem::InvalidJson(format!(
            "the row is {}, expected an object",
            json_type(&other)
        ))),
        Err(e) => Err(RowProblem::InvalidJson(e.to_string())),
    }
}

/// Streams the elements of a top-level JSON array through serde's `SeqAccess`, one `Value`
/// at a time. A syntax error ends the stream: there is no way to find the next element.
fn read_json_array(
    path: &Path,
    sink: &mut dyn FnMut(RowLocation, RawRow) -> Result<()>,
) -> Result<()> {
    let reader = BufReader::new(open(path)?);
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let next_index = Cell::new(0);
    let sink_error = RefCell::new(None);
    let visitor = ElementVisitor { path, sink, next_index: &next_index, sink_error: &sink_error };
    let outcome = serde::Deserializer::deserialize_seq(&mut deserializer, visitor)
        .and_then(|()| deserializer.end());
    if let Some(error) = sink_error.into_inner() {
        return Err(error);
    }
    outcome.map_err(|e| {
        if e.classify() == serde_json::error::Category::Data && next_index.get() == 0 {
            return Error::File {
                path: path.to_path_buf(),
                message: format!("expected a JSON array of row objects: {e}"),
            };
        }
        let problem = if e.is_eof() {
            RowProblem::InvalidJson(format!("the file ends inside the array ({e})"))
        } else if e.to_string().contains("invalid unicode") {
            RowProblem::InvalidUtf8(e.to_string())
        } else {
            RowProblem::InvalidJson(e.to_string())
        };
        let position = RowPosition::Element(next_index.get());
        Error::Row { location: RowLocation { path: path.to_path_buf(), position }, problem }
    })
}

struct ElementVisitor<'a> {
    path: &'a Path,
    sink: &'a mut dyn FnMut(RowLocation, RawRow) -> Result<()>,
    next_index: &'a Cell<usize>,
    sink_error: &'a RefCell<Option<Error>>,
}

impl<'de> Visitor<'de> for ElementVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while let Some(value) = seq.next_element::<Value>()? {
            let index = self.next_index.get();
            let location = RowLocation {
                path: self.path.to_path_buf(),
                position: RowPosition::Element(index),
            };
            let row = match value {
                Value::Object(map) => Ok(map),
                other => Err(RowProblem::InvalidJson(format!(
                    "the element is {}, expected an object",
                    json_type(&other)
                ))),
            };
            if let Err(error) = (self.sink)(location, row) {
                *self.sink_error.borrow_mut() = Some(error);
                return Err(A::Error::custom("stopped by the row handler"));
            }
            self.next_index.set(index + 1);
        }
        Ok(())
    }
}

/// Reads a Parquet file with the record API, converting each row to a JSON object. Nested
/// lists and structs (message lists in `datasets` exports) become JSON arrays and objects.
fn read_parquet(
    path: &Path,
    sink: &mut dyn FnMut(RowLocation, RawRow) -> Result<()>,
) -> Result<()> {
    let file_error = |e: parquet::errors::ParquetError| Error::File {
        path: path.to_path_buf(),
        message: format!("cannot read Parquet: {e}"),
    };
    let reader = SerializedFileReader::new(open(path)?).map_err(file_error)?;
    let rows = reader.get_row_iter(None).map_err(file_error)?;
    for (index, row) in rows.enumerate() {
        let location = RowLocation { path: path.to_path_buf(), position: RowPosition::Row(index) };
        let row = row.map_err(|e| Error::Row {
            location: location.clone(),
            problem: RowProblem::InvalidJson(format!("cannot decode the Parquet row: {e}")),
        })?;
        let map = row
            .get_column_iter()
            .map(|(name, field)| Ok((name.clone(), field_to_json(name, field)?)))
            .collect::<std::result::Result<Map<_, _>, RowProblem>>();
        sink(location, map)?;
    }
    Ok(())
}

fn field_to_json(name: &str, field: &Field) -> std::result::Result<Value, RowProblem> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(bytes) => match std::str::from_utf8(bytes.data()) {
            Ok(text) => Value::String(text.to_string()),
            Err(e) => {
                return Err(RowProblem::InvalidUtf8(format!(
                    "field \"{name}\": bad byte at offset {}",
                    e.valid_up_to()
                )))
            }
        },
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(key, value)| Ok((key.clone(), field_to_json(key, value)?)))
                .collect::<std::result::Result<_, RowProblem>>()?,
        ),
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(|element| field_to_json(name, element))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(key, value)| Ok((key.to_string(), field_to_json(name, value)?)))
                .collect::<std::result::Result<_, RowProblem>>()?,
        ),
        Field::Byte(v) => Value::from(*v),
        Field::Short(v) => Value::from(*v),
        Field::Int(v) => Value::from(*v),
        Field::Long(v) => Value::from(*v),
        Field::UByte(v) => Value::from(*v),
        Field::UShort(v) => Value::from(*v),
        Field::UInt(v) => Value::from(*v),
        Field::ULong(v) => Value::from(*v),
        Field::Float(v) => Value::from(*v),
        Field::Double(v) => Value::from(*v),
        // Dates, times, decimals and half floats never carry preference text; keep their
        // printed form so that a mapped column of such a type still reports its type sanely.
        other => Value::String(other.to_string()),
    })
}

/// The JSON type name of a value, for error messages.
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
