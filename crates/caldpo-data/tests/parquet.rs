//! Parquet input written with the parquet crate's own writer (flat string columns, as
//! `datasets` exports the explicit-prompt schema), next to the nested file pyarrow wrote
//! (tests/templates.rs).

mod common;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use caldpo_data::{load_pairs, DataConfig};
use common::{config, load, tokenizer};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

enum Column<'a> {
    Text(&'a [&'a str]),
    Int(&'a [i64]),
}

/// Writes one row group of required columns.
fn write_parquet(path: &Path, schema: &str, columns: &[Column]) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let properties = Arc::new(WriterProperties::builder().build());
    let mut writer =
        SerializedFileWriter::new(File::create(path).unwrap(), schema, properties).unwrap();
    let mut row_group = writer.next_row_group().unwrap();
    for column in columns {
        let mut column_writer = row_group.next_column().unwrap().unwrap();
        match column {
            Column::Text(values) => {
                let values: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(*v)).collect();
                column_writer.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
            }
            Column::Int(values) => {
                column_writer.typed::<Int64Type>().write_batch(values, None, None).unwrap();
            }
        }
        column_writer.close().unwrap();
    }
    row_group.close().unwrap();
    writer.close().unwrap();
}

const TEXT_SCHEMA: &str = "message pairs { REQUIRED BYTE_ARRAY question (UTF8); \
                           REQUIRED BYTE_ARRAY good (UTF8); REQUIRED BYTE_ARRAY bad (UTF8); }";

fn renamed() -> DataConfig {
    let mut config = config(1024, 512);
    for (file_field, canonical) in [("question", "prompt"), ("good", "chosen"), ("bad", "rejected")]
    {
        config.columns.insert(file_field.into(), canonical.into());
    }
    config
}

#[test]
fn flat_parquet_with_renamed_columns_matches_the_same_rows_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let questions = ["What is 2+2?", "Größte Stadt? 東京", "Say hi."];
    let good = ["4", "Tokio ist die größte.", "Hi there."];
    let bad = ["5", "Berlin.", "Go away."];
    let parquet = dir.path().join("pairs.parquet");
    write_parquet(
        &parquet,
        TEXT_SCHEMA,
        &[Column::Text(&questions), Column::Text(&good), Column::Text(&bad)],
    );
    let jsonl = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..3)
        .map(|i| {
            serde_json::json!({"question": questions[i], "good": good[i], "bad": bad[i]})
                .to_string()
        })
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();

    let tokenizer = tokenizer("chatml", "auto");
    let from_parquet = load(&parquet, &renamed(), &tokenizer);
    let from_jsonl = load(&jsonl, &renamed(), &tokenizer);
    assert_eq!(from_parquet.report.rows_read, 3);
    assert_eq!(from_parquet.examples, from_jsonl.examples);
}

#[test]
fn parquet_errors_name_the_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed.parquet");
    let schema = "message pairs { REQUIRED BYTE_ARRAY question (UTF8); \
                  REQUIRED BYTE_ARRAY good (UTF8); REQUIRED INT64 bad; }";
    write_parquet(
        &path,
        schema,
        &[Column::Text(&["q", "r"]), Column::Text(&["a", "b"]), Column::Int(&[1, 2])],
    );
    let cache = tempfile::tempdir().unwrap();
    let err = load_pairs(&path, &renamed(), &tokenizer("chatml", "auto"), Some(cache.path()))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("{}: row 0: field \"bad\" is a number, expected a string", path.display())
    );
}
