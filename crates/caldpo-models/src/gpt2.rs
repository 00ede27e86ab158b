//! GPT-2: learned absolute positions, pre-norm blocks with layer norms, and Conv1D
//! projections whose weights are stored `[in, out]`, as transformers' `modeling_gpt2.py`.
//!
//! `reorder_and_upcast_attn` only changes the precision of the attention product in half
//! precision and is ignored.

use tch::Tensor;

use crate::config::{Activation, Gpt2Config, ModelConfig};
use crate::error::Result;
use crate::layers::{attention, with_cache, Conv1D, KvCache, LayerNorm};
use crate::weights::ParamStore;

#[derive(Debug)]
pub(crate) struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Tensor,
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_c_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_c_proj: Conv1D,
    act: Activation,
    heads: i64,
    head_dim: i64,
    scale: f64,
}

impl Gpt2 {
    pub fn new(c: &ModelConfig, g: &Gpt2Config, store: &mut ParamStore) -> Result<Self> {
        // Hub files of the original GPT-2 store the base model's names without the prefix.
        store.add_prefix_where_missing("transformer.", &["lm_head.weight"]);
        let hidden = c.hidden_size;
        let wte = store.take("transformer.wte.weight", &[c.vocab_size, hidden])?;
        let wpe = store.take("transformer.wpe.weight", &[c.max_position_embeddings, hidden])?;
        let h = (0..c.num_hidden_layers)
            .map(|i| Block::new(c, g, store, i))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(store, "transformer.ln_f", hidden, g.layer_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            wte.shallow_clone()
        } else {
            store.take("lm_head.weight", &[c.vocab_size, hidden])?
        };
        Ok(Self { wte, wpe, h, ln_f, lm_head })
    }

    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let tokens = Tensor::embedding(&self.wte, input_ids, -1, false, false);
        let positions = Tensor::embedding(&self.wpe, position_ids, -1, false, false);
        let mut xs = tokens + positions;
        for (i, block) in self.h.iter().enumerate() {
            xs = block.forward(&xs, mask, &mut cache, i);
        }
        self.ln_f.forward(&xs)
    }
}

impl Block {
    fn new(c: &ModelConfig, g: &Gpt2Config, store: &mut ParamStore, index: i64) -> Result<Self> {
        let prefix = format!("transformer.h.{index}");
        let (hidden, inner, eps) = (c.hidden_size, c.intermediate_size, g.layer_norm_eps);
        let mut scale = if g.scale_attn_weights { 1.0 / (c.head_dim as f64).sqrt() } else { 1.0 };
        if g.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f64;
        }
        Ok(Self {
            ln_1: LayerNorm::load(store, &format!("{prefix}.ln_1"), hidden, eps)?,
            c_attn: Conv1D::load(store, &format!("{prefix}.attn.c_attn"), hidden, 3 * hidden)?,
            attn_c_proj: Conv1D::load(store, &format!("{prefix}.attn.c_proj"), hidden, hidden)?,
            ln_2: LayerNorm::load(store, &format!("{prefix}.ln_2"), hidden, eps)?,
            c_fc: Conv1D::load(store, &format!("{prefix}.mlp.c_fc"), hidden, inner)?,
            mlp_c_proj: Conv1D::load(store, &format!("{prefix}.mlp.c_proj"), inner, hidden)?,
            act: g.activation,
            heads: c.num_attention_heads,
            head_dim: c.head_dim,
            scale,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        cache: &mut Option<&mut KvCache>,
        layer: usize,
    ) -> Tensor {
        let xs = xs + self.attention(&self.ln_1.forward(xs), mask, cache, layer);
        let mlp_out =
            self.mlp_c_proj.forward(&self.act.forward(&self.c_fc.forward(&self.ln_2.forward(&xs))));
        xs + mlp_out
    }

    /// The fused projection is `[3, heads, head_dim]` along its output axis: all queries,
    /// then all keys, then all values.
    fn attention(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        cache: &mut Option<&mut KvCache>,
        layer: usize,
    ) -> Tensor {
        let (batch, seq_len, _) = xs.size3().expect("hidden states are 3-D");
        let heads =
            |t: &Tensor| t.view([batch, seq_len, self.heads, self.head_dim]).transpose(1, 2);
        let qkv = self.c_attn.forward(xs).chunk(3, -1);
        let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));

        let (k, v) = with_cache(cache, layer, k, v);
        let out = attention(&q, &k, &v, mask, Some(self.scale), 1);
        self.attn_c_proj.forward(&out)
    }
}
