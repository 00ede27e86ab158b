//! Causal language models for caldpo, in libtorch through tch.
//!
//! - [`CausalLm::load`] reads a Hugging Face folder (config.json plus model.safetensors,
//!   single or sharded, f32/bf16/f16) for the Llama family (Llama 2 and 3 incl. `llama3`
//!   rope scaling, Mistral, Qwen2/2.5, SmolLM), GPT-NeoX (Pythia) and GPT-2, keeping HF
//!   tensor names.
//! - The training forward ([`CausalLm::forward_hidden`]) takes right-padded batches with
//!   explicit position ids and runs attention through libtorch's
//!   `scaled_dot_product_attention`. There is no dropout anywhere.
//! - [`CausalLm::generate`] decodes batched prompts with a key/value cache.
//! - [`import_gguf`] turns a llama GGUF file into an HF folder, tokenizer included;
//!   [`resolve_model_dir`] does so once per file, into a cache.
//! - [`CausalLm::save_pretrained`] writes a folder that transformers loads.
//!
//! The crate never renders chat templates nor tokenises chat data; caldpo-data does.
#![warn(missing_docs)]

mod config;
mod error;
mod generate;
mod gguf;
mod gpt2;
mod gpt_neox;
mod layers;
mod llama;
mod model;
mod save;
mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use generate::GenerationOptions;
pub use gguf::{import_gguf, resolve_model_dir};
pub use model::CausalLm;
pub use tch::{Device, Kind};
