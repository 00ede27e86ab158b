//! `CausalLm`: one architecture behind one interface, with its parameters by HF name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::{ArchConfig, ModelConfig};
use crate::error::{read_json, Error, Result};
use crate::gpt2::Gpt2;
use crate::gpt_neox::GptNeoX;
use crate::layers::{attention_mask as build_mask, KvCache};
use crate::llama::Llama;
use crate::weights::{read_checkpoint, ParamStore};

#[derive(Debug)]
enum Backbone {
    Llama(Llama),
    GptNeoX(GptNeoX),
    Gpt2(Gpt2),
}

/// A decoder-only language model with HF parameter names.
///
/// Parameters are plain leaf tensors: with `requires_grad` after [`CausalLm::load`], so an
/// optimiser can read their `.grad()` and update them in place under `no_grad`; without it
/// after [`CausalLm::freeze`] or [`CausalLm::frozen_copy`]. Tied embeddings are one tensor
/// serving as both the embedding and the LM head.
///
/// No layer has dropout: caldpo trains with dropout disabled, as TRL's DPO trainer does by
/// default, so the forward pass is a deterministic function of the weights and inputs.
#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    /// config.json as read, written back (with the saved dtype) by `save_pretrained`.
    raw_config: serde_json::Value,
    backbone: Backbone,
    params: Vec<(String, Tensor)>,
    device: Device,
    kind: Kind,
    frozen: bool,
}

impl CausalLm {
    /// Loads an HF model folder (config.json plus model.safetensors or its shards) with
    /// floating-point weights in `kind` (f32 for trained weights, bf16 allowed for a
    /// reference model). Call [`crate::resolve_model_dir`] first for a `.gguf` file.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        check_weight_kind(kind)?;
        let config_path = dir.join("config.json");
        let raw_config = read_json(&config_path)?;
        let config = ModelConfig::from_json(&raw_config, &config_path)?;
        let weights = read_checkpoint(dir, device, kind)?;
        Self::build(config, raw_config, weights, dir, device, kind, false)
    }

    fn build(
        config: ModelConfig,
        raw_config: serde_json::Value,
        weights: HashMap<String, Tensor>,
        dir: &Path,
        device: Device,
        kind: Kind,
        frozen: bool,
    ) -> Result<Self> {
        let mut store = ParamStore::new(dir, weights, !frozen);
        let backbone = match &config.arch {
            ArchConfig::Llama(l) => Backbone::Llama(Llama::new(&config, l, &mut store)?),
            ArchConfig::GptNeoX(n) => Backbone::GptNeoX(GptNeoX::new(&config, n, &mut store)?),
            ArchConfig::Gpt2(g) => Backbone::Gpt2(Gpt2::new(&config, g, &mut store)?),
        };
        let params = store.finish()?;
        Ok(Self { config, raw_config, backbone, params, device, kind, frozen })
    }

    /// The resolved config.json.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// config.json as it was read.
    pub fn raw_config(&self) -> &serde_json::Value {
        &self.raw_config
    }

    /// Where the parameters live.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype of the floating-point parameters.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether the parameters are frozen (no gradients, forward under `no_grad`).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Final hidden states `[batch, seq_len, hidden]` after the final norm, for
    /// `input_ids`, `attention_mask` (1 = token, 0 = padding; padding on the right) and
    /// `position_ids`, each `[batch, seq_len]` int64.
    ///
    /// # Panics
    /// On inputs of the wrong shape or dtype; [`CausalLm::f_forward_hidden`] returns the
    /// error instead.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
    ) -> Tensor {
        self.f_forward_hidden(input_ids, attention_mask, position_ids)
            .unwrap_or_else(|e| panic!("forward_hidden: {e}"))
    }

    /// [`CausalLm::forward_hidden`] with the input checks returned as an error.
    pub fn f_forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        check_inputs(input_ids, attention_mask, position_ids)?;
        let seq_len = input_ids.size()[1];
        Ok(self.run(|| {
            let mask = build_mask(attention_mask, seq_len, self.sliding_window());
            self.backbone_forward(input_ids, position_ids, &mask, None)
        }))
    }

    /// Logits `[batch, seq_len, vocab]` in the parameters' dtype; see
    /// [`CausalLm::forward_hidden`] for the inputs. Training should rather take the hidden
    /// states and apply [`CausalLm::lm_head`] in chunks.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
    ) -> Tensor {
        let hidden = self.forward_hidden(input_ids, attention_mask, position_ids);
        self.run(|| hidden.linear::<Tensor>(self.backbone_lm_head(), None))
    }

    /// The LM head weight `[vocab, hidden]` (the embedding matrix when tied). It shares
    /// storage and gradient with the parameter.
    pub fn lm_head(&self) -> Tensor {
        self.backbone_lm_head().shallow_clone()
    }

    /// Every parameter by HF name, in module order; a tied LM head is listed once, under
    /// the embedding's name. The tensors share storage and gradient with the model.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(name, t)| (name.clone(), t.shallow_clone())).collect()
    }

    /// Number of scalar parameters (a tied head counted once).
    pub fn num_parameters(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Turns gradients off on every parameter; later forwards run under `no_grad`.
    pub fn freeze(&mut self) {
        for (_, tensor) in &self.params {
            let _ = tensor.set_requires_grad(false);
        }
        self.frozen = true;
    }

    /// A deep copy of the weights in `kind` (f32 or bf16), frozen: the reference model.
    pub fn frozen_copy(&self, kind: Kind) -> Result<CausalLm> {
        check_weight_kind(kind)?;
        let weights = tch::no_grad(|| {
            self.params
                .iter()
                .map(|(name, t)| {
                    // to_kind aliases rather than copies when the kind is unchanged.
                    let copy =
                        if t.kind() == kind { t.detach().copy() } else { t.f_to_kind(kind)? };
                    Ok((name.clone(), copy.detach()))
                })
                .collect::<Result<HashMap<_, _>>>()
        })?;
        let dir = PathBuf::from("<frozen copy>");
        Self::build(
            self.config.clone(),
            self.raw_config.clone(),
            weights,
            &dir,
            self.device,
            kind,
            true,
        )
    }

    /// Hidden states for new tokens given the cache of the earlier ones: `key_mask`
    /// `[batch, cached + new]` covers both; `input_ids` and `position_ids` are
    /// `[batch, new]`.
    pub(crate) fn forward_cached(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let mask = build_mask(key_mask, input_ids.size()[1], self.sliding_window());
        self.backbone_forward(input_ids, position_ids, &mask, Some(cache))
    }

    pub(crate) fn backbone_lm_head(&self) -> &Tensor {
        match &self.backbone {
            Backbone::Llama(m) => m.lm_head(),
            Backbone::GptNeoX(m) => m.lm_head(),
            Backbone::Gpt2(m) => m.lm_head(),
        }
    }

    pub(crate) fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers as usize)
    }

    fn backbone_forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        match &self.backbone {
            Backbone::Llama(m) => m.forward(input_ids, position_ids, mask, cache),
            Backbone::GptNeoX(m) => m.forward(input_ids, position_ids, mask, cache),
            Backbone::Gpt2(m) => m.forward(input_ids, position_ids, mask, cache),
        }
    }

    fn sliding_window(&self) -> Option<i64> {
        match &self.config.arch {
            ArchConfig::Llama(l) => l.sliding_window,
            _ => None,
        }
    }

    /// Runs `f` under `no_grad` when frozen, so a frozen model never records a graph.
    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.frozen {
            tch::no_grad(f)
        } else {
            f()
        }
    }
}

fn check_weight_kind(kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::BFloat16 | Kind::Half => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "model weights must be f32, bf16 or f16, not {other:?}"
        ))),
    }
}

fn check_inputs(input_ids: &Tensor, attention_mask: &Tensor, position_ids: &Tensor) -> Result<()> {
    let shape = input_ids.size();
    if shape.len() != 2 {
        return Err(Error::InvalidArgument(format!(
            "input_ids must be [batch, seq_len], got shape {shape:?}"
        )));
    }
    for (name, tensor) in [
        ("input_ids", input_ids),
        ("attention_mask", attention_mask),
        ("position_ids", position_ids),
    ] {
        if tensor.size() != shape {
            return Err(Error::InvalidArgument(format!(
                "{name} has shape {:?}, expected {shape:?} like input_ids",
                tensor.size()
            )));
        }
        if name != "attention_mask" && tensor.kind() != Kind::Int64 {
            return Err(Error::InvalidArgument(format!(
                "{name} must be int64, got {:?}",
                tensor.kind()
            )));
        }
    }
    Ok(())
}
