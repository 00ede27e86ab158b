//! Imports a GGUF file into an HF folder: `cargo run -p caldpo-models --example import_gguf
//! -- MODEL.gguf OUT_DIR`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let (Some(gguf), Some(out_dir)) = (args.next(), args.next()) else {
        return Err("usage: import_gguf MODEL.gguf OUT_DIR".into());
    };
    let (gguf, out_dir) = (PathBuf::from(gguf), PathBuf::from(out_dir));
    let start = std::time::Instant::now();
    caldpo_models::import_gguf(&gguf, &out_dir)?;
    println!("imported {} into {} in {:.1?}", gguf.display(), out_dir.display(), start.elapsed());
    Ok(())
}
