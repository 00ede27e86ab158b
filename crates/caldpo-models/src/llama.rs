//! The Llama family: Llama 2 and 3, Mistral, Qwen2/2.5 and SmolLM.
//!
//! Pre-norm blocks with RMSNorm, rotary attention with grouped key/value heads and a gated
//! MLP, as transformers' `modeling_llama.py`. Qwen2 differs only by biases on the q, k
//! and v projections, Mistral by its sliding attention window.

use tch::Tensor;

use crate::config::{LlamaConfig, ModelConfig};
use crate::error::Result;
use crate::layers::{attention, with_cache, KvCache, Linear, RmsNorm, Rotary, RotaryTables};
use crate::weights::ParamStore;

#[derive(Debug)]
pub(crate) struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary: Rotary,
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: crate::config::Activation,
}

impl Llama {
    pub fn new(c: &ModelConfig, l: &LlamaConfig, store: &mut ParamStore) -> Result<Self> {
        let hidden = c.hidden_size;
        let embed_tokens = store.take("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Block::new(c, l, store, &format!("model.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(store, "model.norm", hidden, l.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            store.take("lm_head.weight", &[c.vocab_size, hidden])?
        };
        let rotary = Rotary::new(&l.rope, embed_tokens.device());
        Ok(Self { embed_tokens, layers, norm, lm_head, rotary })
    }

    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Final hidden states `[batch, seq_len, hidden]` after the final norm.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut xs = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let tables = self.rotary.tables(position_ids, xs.kind());
        for (i, block) in self.layers.iter().enumerate() {
            xs = block.forward(&xs, &self.rotary, &tables, mask, &mut cache, i);
        }
        self.norm.forward(&xs)
    }
}

impl Block {
    fn new(c: &ModelConfig, l: &LlamaConfig, store: &mut ParamStore, prefix: &str) -> Result<Self> {
        let (hidden, eps) = (c.hidden_size, l.rms_norm_eps);
        let input_layernorm =
            RmsNorm::load(store, &format!("{prefix}.input_layernorm"), hidden, eps)?;
        let attn = Attention::new(c, l, store, &format!("{prefix}.self_attn"))?;
        let post_attention_layernorm =
            RmsNorm::load(store, &format!("{prefix}.post_attention_layernorm"), hidden, eps)?;
        let mlp = Mlp::new(c, l, store, &format!("{prefix}.mlp"))?;
        Ok(Self { input_layernorm, attn, post_attention_layernorm, mlp })
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
        let attn_out = self.attn.forward(
            &self.input_layernorm.forward(xs),
            rotary,
            tables,
            mask,
            cache,
            layer,
        );
        let xs = xs + attn_out;
        let mlp_out = self.mlp.forward(&self.post_attention_layernorm.forward(&xs));
        xs + mlp_out
    }
}

impl Attention {
    fn new(c: &ModelConfig, l: &LlamaConfig, store: &mut ParamStore, prefix: &str) -> Result<Self> {
        let (hidden, head_dim) = (c.hidden_size, c.head_dim);
        let (q_dim, kv_dim) = (c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim);
        Ok(Self {
            q_proj: Linear::load(store, &format!("{prefix}.q_proj"), q_dim, hidden, l.qkv_bias)?,
            k_proj: Linear::load(store, &format!("{prefix}.k_proj"), kv_dim, hidden, l.qkv_bias)?,
            v_proj: Linear::load(store, &format!("{prefix}.v_proj"), kv_dim, hidden, l.qkv_bias)?,
            o_proj: Linear::load(store, &format!("{prefix}.o_proj"), hidden, q_dim, l.o_bias)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim,
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
        let (batch, seq_len, _) = xs.size3().expect("hidden states are 3-D");
        let split = |proj: &Linear, heads: i64| {
            proj.forward(xs).view([batch, seq_len, heads, self.head_dim]).transpose(1, 2)
        };
        let q = rotary.apply(&split(&self.q_proj, self.heads), tables);
        let k = rotary.apply(&split(&self.k_proj, self.kv_heads), tables);
        let v = split(&self.v_proj, self.kv_heads);

        let (k, v) = with_cache(cache, layer, k, v);
        let out = attention(&q, &k, &v, mask, None, self.heads / self.kv_heads);
        self.o_proj.forward(&out)
    }
}

impl Mlp {
    fn new(c: &ModelConfig, l: &LlamaConfig, store: &mut ParamStore, prefix: &str) -> Result<Self> {
        let (hidden, inter, bias) = (c.hidden_size, c.intermediate_size, l.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(store, &format!("{prefix}.gate_proj"), inter, hidden, bias)?,
            up_proj: Linear::load(store, &format!("{prefix}.up_proj"), inter, hidden, bias)?,
            down_proj: Linear::load(store, &format!("{prefix}.down_proj"), hidden, inter, bias)?,
            act: l.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let gate = self.act.forward(&self.gate_proj.forward(xs));
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)))
    }
}
