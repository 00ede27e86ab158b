//! Loads an HF folder (or a .gguf file) with caldpo and saves it again with
//! `save_pretrained`: `cargo run -p caldpo-models --example resave -- SOURCE OUT_DIR
//! [f32|bf16]`. tests/fixtures/check_hf_load.py loads the result with transformers.

use std::path::PathBuf;

use caldpo_models::{resolve_model_dir, CausalLm, Device, Kind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, out, rest @ ..] = args.as_slice() else {
        return Err("usage: resave SOURCE OUT_DIR [f32|bf16]".into());
    };
    let source = resolve_model_dir(&PathBuf::from(source))?;
    let model = CausalLm::load(&source, Device::Cpu, Kind::Float)?;
    let out = PathBuf::from(out);
    match rest.first().map(String::as_str) {
        None => model.save_pretrained(&out, &source)?,
        Some("f32") => model.save_pretrained_as(&out, &source, Kind::Float)?,
        Some("bf16") => model.save_pretrained_as(&out, &source, Kind::BFloat16)?,
        Some(other) => return Err(format!("unknown dtype `{other}` (f32 or bf16)").into()),
    }
    println!("saved {} to {}", source.display(), out.display());
    Ok(())
}
