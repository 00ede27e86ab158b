//! GGUF import and the model-path resolver.

mod dequant;
mod import;
mod reader;
mod tokenizer;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io_err, Error, Result};

pub use import::import_gguf;

/// Turns a model path into an HF folder: a folder is returned as it is; a `.gguf` file is
/// imported once into `$HOME/.cache/caldpo/imported/<first 16 hex digits of its sha256>/`
/// and that folder returned (later calls find it there).
///
/// The import is written to a temporary sibling folder and renamed into place, so an
/// interrupted import never leaves a half-written folder under the final name, and two
/// processes importing at once both end with the same complete folder.
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let is_gguf = path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"));
    if !path.is_file() || !is_gguf {
        return Err(Error::InvalidArgument(format!(
            "{}: not a model folder or a .gguf file",
            path.display()
        )));
    }
    let root = imported_root()?;
    resolve_gguf(path, &root)
}

/// `$HOME/.cache/caldpo/imported`.
fn imported_root() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").ok_or_else(|| {
        Error::InvalidArgument("HOME is not set; cannot locate the import cache".into())
    })?;
    Ok(PathBuf::from(home).join(".cache/caldpo/imported"))
}

fn resolve_gguf(gguf: &Path, root: &Path) -> Result<PathBuf> {
    let digest = sha256_hex(gguf)?;
    let target = root.join(&digest[..16]);
    if target.join("config.json").is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    let staging = root.join(format!(".{}.tmp{}", &digest[..16], std::process::id()));
    let imported = import_gguf(gguf, &staging).and_then(|()| {
        std::fs::rename(&staging, &target).or_else(|e| {
            // Another process finished the same import first: keep its folder.
            if target.join("config.json").is_file() {
                Ok(())
            } else {
                Err(io_err(&target)(e))
            }
        })
    });
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    imported.map(|()| target)
}

fn sha256_hex(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::reader::tests::GgufWriter;
    use super::*;
    use crate::CausalLm;
    use tch::{Device, Kind, Tensor};

    /// The GGUF name llama.cpp's converter gives an HF tensor (written out here
    /// independently of the importer's own table).
    fn gguf_name(hf: &str) -> String {
        let pairs = [
            ("model.embed_tokens", "token_embd"),
            ("model.norm", "output_norm"),
            ("lm_head", "output"),
            ("model.layers.", "blk."),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ];
        pairs.iter().fold(hf.to_string(), |name, (from, to)| name.replace(from, to))
    }

    /// llama.cpp's converter's `permute`: rows viewed as [heads, 2, head_dim / 2], the last
    /// two axes swapped.
    fn permute(weight: &Tensor, heads: i64) -> Tensor {
        let (rows, cols) = weight.size2().unwrap();
        weight.reshape([heads, 2, rows / heads / 2, cols]).transpose(1, 2).reshape([rows, cols])
    }

    /// Writes the tiny llama fixture as a GGUF file the way llama.cpp's converter would
    /// (F32 tensors, Q/K rows permuted, a byte-level vocabulary of placeholder tokens).
    fn llama_fixture_as_gguf(path: &Path) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        let mut w = GgufWriter::default();
        w.string("general.architecture", "llama");
        w.u32("llama.embedding_length", 32);
        w.u32("llama.feed_forward_length", 48);
        w.u32("llama.block_count", 2);
        w.u32("llama.attention.head_count", 4);
        w.u32("llama.attention.head_count_kv", 2);
        w.u32("llama.context_length", 64);
        w.u32("llama.rope.dimension_count", 8);
        w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
        w.f32("llama.rope.freq_base", 10_000.0);
        let tokens: Vec<String> = (0..96).map(|i| format!("<t{i}>")).collect();
        w.string("tokenizer.ggml.model", "gpt2");
        w.strings("tokenizer.ggml.tokens", &tokens.iter().map(String::as_str).collect::<Vec<_>>());
        w.i32s("tokenizer.ggml.token_type", &[[3, 3, 3].as_slice(), &[1; 93]].concat());
        w.strings("tokenizer.ggml.merges", &[]);
        w.u32("tokenizer.ggml.bos_token_id", 1);
        w.u32("tokenizer.ggml.eos_token_id", 2);
        for (name, tensor) in Tensor::read_safetensors(fixture.join("model.safetensors")).unwrap() {
            let tensor = match &name {
                n if n.ends_with("q_proj.weight") => permute(&tensor, 4),
                n if n.ends_with("k_proj.weight") => permute(&tensor, 2),
                _ => tensor,
            };
            let dims: Vec<u64> = tensor.size().iter().rev().map(|&d| d as u64).collect();
            let values = Vec::<f32>::try_from(tensor.flatten(0, -1)).unwrap();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.tensor(&gguf_name(&name), &dims, 0, &bytes);
        }
        std::fs::write(path, w.finish()).unwrap();
    }

    #[test]
    fn gguf_import_reproduces_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        llama_fixture_as_gguf(&gguf);
        let out = dir.path().join("hf");
        import_gguf(&gguf, &out).unwrap();

        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        let original = CausalLm::load(&fixture, Device::Cpu, Kind::Float).unwrap();
        let imported = CausalLm::load(&out, Device::Cpu, Kind::Float).unwrap();
        let original_params = original.named_parameters();
        let imported_params = imported.named_parameters();
        assert_eq!(original_params.len(), imported_params.len());
        for ((name_a, a), (name_b, b)) in original_params.iter().zip(&imported_params) {
            assert_eq!(name_a, name_b);
            assert!(a.equal(b), "{name_a} differs after import");
        }
        let config = imported.config();
        assert_eq!((config.bos_token_id, config.eos_token_ids.clone()), (Some(1), vec![2]));
        assert!(!config.tie_word_embeddings);

        // The three control tokens are matched whole (the placeholder vocabulary has no
        // merges, so ordinary text would not tokenise meaningfully).
        let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let ids = tokenizer.encode("<t1><t0><t2>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![1, 0, 2]);
    }

    #[test]
    fn gguf_is_imported_once_into_a_folder_named_by_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        llama_fixture_as_gguf(&gguf);
        let root = dir.path().join("imported");

        let first = resolve_gguf(&gguf, &root).unwrap();
        assert_eq!(first.file_name().unwrap().to_str().unwrap(), &sha256_hex(&gguf).unwrap()[..16]);
        let written =
            std::fs::metadata(first.join("model.safetensors")).unwrap().modified().unwrap();

        // The second call finds the folder and does not import again; no staging folder
        // is left behind.
        assert_eq!(resolve_gguf(&gguf, &root).unwrap(), first);
        let again = std::fs::metadata(first.join("model.safetensors")).unwrap().modified().unwrap();
        assert_eq!(written, again);
        let entries: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
        assert_eq!(entries.len(), 1);
        CausalLm::load(&first, Device::Cpu, Kind::Float).unwrap();
    }

    #[test]
    fn non_llama_gguf_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("x.gguf");
        let mut w = GgufWriter::default();
        w.string("general.architecture", "qwen3");
        std::fs::write(&gguf, w.finish()).unwrap();
        let err = import_gguf(&gguf, &dir.path().join("out")).unwrap_err().to_string();
        assert!(err.contains("qwen3") && err.contains("llama"), "{err}");
    }

    #[test]
    fn folder_is_returned_as_is() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_model_dir(dir.path()).unwrap(), dir.path());
    }

    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.bin");
        std::fs::write(&file, b"x").unwrap();
        let err = resolve_model_dir(&file).unwrap_err().to_string();
        assert!(err.contains("not a model folder"), "{err}");
    }

    #[test]
    fn sha256_of_known_bytes() {
        // sha256("abc") from FIPS 180-2, appendix B.1.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(
            sha256_hex(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
