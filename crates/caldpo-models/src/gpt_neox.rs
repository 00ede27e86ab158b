//! GPT-NeoX (Pythia): layer norms, a fused query/key/value projection laid out per head,
//! rotary embedding on a leading fraction of each head, and by default a parallel
//! residual (attention and MLP both read the block input), as transformers'
//! `modeling_gpt_neox.py`.

use tch::Tensor;

use crate::config::{Activation, GptNeoXConfig, ModelConfig};
use crate::error::Result;
use crate::layers::{attention, with_cache, KvCache, LayerNorm, Linear, Rotary, RotaryTables};
use crate::weights::ParamStore;

#[derive(Debug)]
pub(crate) struct GptNeoX {
    embed_in: Tensor,
    layers: Vec<Block>,
    final_layer_norm: LayerNorm,
    embed_out: Tensor,
    rotary: Rotary,
}

#[derive(Debug)]
struct Block {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    act: Activation,
    heads: i64,
    head_dim: i64,
    parallel_residual: bool,
}

impl GptNeoX {
    pub fn new(c: &ModelConfig, n: &GptNeoXConfig, store: &mut ParamStore) -> Result<Self> {
        let hidden = c.hidden_size;
        let embed_in = store.take("gpt_neox.embed_in.weight", &[c.vocab_size, hidden])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Block::new(c, n, store, &format!("gpt_neox.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::load(store, "gpt_neox.final_layer_norm", hidden, n.layer_norm_eps)?;
        let embed_out = if c.tie_word_embeddings {
            embed_in.shallow_clone()
        } else {
            store.take("embed_out.weight", &[c.vocab_size, hidden])?
        };
        let rotary = Rotary::new(&n.rope, embed_in.device());
        Ok(Self { embed_in, layers, final_layer_norm, embed_out, rotary })
    }

    pub fn lm_head(&self) -> &Tensor {
        &self.embed_out
    }

    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut xs = Tensor::embedding(&self.embed_in, input_ids, -1, false, false);
        let tables = self.rotary.tables(position_ids, xs.kind());
        for (i, block) in self.layers.iter().enumerate() {
            xs = block.forward(&xs, &self.rotary, &tables, mask, &mut cache, i);
        }
        self.final_layer_norm.forward(&xs)
    }
}

impl Block {
    fn new(
        c: &ModelConfig,
        n: &GptNeoXConfig,
        store: &mut ParamStore,
        prefix: &str,
    ) -> Result<Self> {
        let (hidden, inter, eps, bias) =
            (c.hidden_size, c.intermediate_size, n.layer_norm_eps, n.attention_bias);
        Ok(Self {
            input_layernorm: LayerNorm::load(
                store,
                &format!("{prefix}.input_layernorm"),
                hidden,
                eps,
            )?,
            post_attention_layernorm: LayerNorm::load(
                store,
                &format!("{prefix}.post_attention_layernorm"),
                hidden,
                eps,
            )?,
            query_key_value: Linear::load(
                store,
                &format!("{prefix}.attention.query_key_value"),
                3 * hidden,
                hidden,
                bias,
            )?,
            dense: Linear::load(store, &format!("{prefix}.attention.dense"), hidden, hidden, bias)?,
            dense_h_to_4h: Linear::load(
                store,
                &format!("{prefix}.mlp.dense_h_to_4h"),
                inter,
                hidden,
                true,
            )?,
            dense_4h_to_h: Linear::load(
                store,
                &format!("{prefix}.mlp.dense_4h_to_h"),
                hidden,
                inter,
                true,
            )?,
            act: n.hidden_act,
            heads: c.num_attention_heads,
            head_dim: c.head_dim,
            parallel_residual: n.use_parallel_residual,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        tables: &RotaryTables,
        mask: &Tensor,
        cache: &mut Option<&mut KvCache>,
        layer: usize,
    ) -> Tensor {
        let attn_out =
            self.attention(&self.input_layernorm.forward(xs), rotary, tables, mask, cache, layer);
        if self.parallel_residual {
            let mlp_out = self.mlp(&self.post_attention_layernorm.forward(xs));
            mlp_out + attn_out + xs
        } else {
            let xs = attn_out + xs;
            self.mlp(&self.post_attention_layernorm.forward(&xs)) + xs
        }
    }

    /// The fused projection is `[heads, 3, head_dim]` along its output axis: each head's
    /// query, key and value sit next to each other.
    fn attention(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        tables: &RotaryTables,
        mask: &Tensor,
        cache: &mut Option<&mut KvCache>,
        layer: usize,
    ) -> Tensor {
        let (batch, seq_len, _) = xs.size3().expect("hidden states are 3-D");
        let qkv = self
            .query_key_value
            .forward(xs)
            .view([batch, seq_len, self.heads, 3 * self.head_dim])
            .transpose(1, 2);
        let parts = qkv.chunk(3, -1);
        let q = rotary.apply(&parts[0], tables);
        let k = rotary.apply(&parts[1], tables);

        let (k, v) = with_cache(cache, layer, k, parts[2].shallow_clone());
        let out = attention(&q, &k, &v, mask, None, 1);
        self.dense.forward(&out)
    }

    fn mlp(&self, xs: &Tensor) -> Tensor {
        self.dense_4h_to_h.forward(&self.act.forward(&self.dense_h_to_4h.forward(xs)))
    }
}
