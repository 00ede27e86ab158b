//! Building blocks shared by the architectures: projections, norms, rotary embeddings,
//! masked attention and the key/value cache.
//!
//! None of them has dropout: caldpo trains with dropout disabled, as TRL's DPO trainer
//! does by default, so that the policy and reference log-probs of one pair are computed by
//! the same deterministic function.

use tch::{Kind, Tensor};

use crate::config::{Activation, RopeConfig, RopeScaling};
use crate::error::Result;
use crate::weights::ParamStore;

/// A dense layer with an HF `[out, in]` weight.
#[derive(Debug)]
pub(crate) struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Takes `{name}.weight` `[out_dim, in_dim]` and, with `bias`, `{name}.bias`.
    pub fn load(
        store: &mut ParamStore,
        name: &str,
        out_dim: i64,
        in_dim: i64,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: store.take(&format!("{name}.weight"), &[out_dim, in_dim])?,
            bias: store.take_if(bias, &format!("{name}.bias"), &[out_dim])?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, self.bias.as_ref())
    }
}

/// GPT-2's Conv1D: a dense layer whose weight is stored `[in, out]`.
#[derive(Debug)]
pub(crate) struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Conv1D {
    /// Takes `{name}.weight` `[in_dim, out_dim]` and `{name}.bias`.
    pub fn load(store: &mut ParamStore, name: &str, in_dim: i64, out_dim: i64) -> Result<Self> {
        Ok(Self {
            weight: store.take(&format!("{name}.weight"), &[in_dim, out_dim])?,
            bias: store.take(&format!("{name}.bias"), &[out_dim])?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.matmul(&self.weight) + &self.bias
    }
}

/// Root-mean-square norm, computed in f32 and cast back as transformers does.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(store: &mut ParamStore, name: &str, width: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: store.take(&format!("{name}.weight"), &[width])?, eps })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let xs = xs.to_kind(Kind::Float);
        let variance = xs.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let xs = xs * (variance + self.eps).rsqrt();
        &self.weight * xs.to_kind(kind)
    }
}

/// Layer norm with weight and bias.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(store: &mut ParamStore, name: &str, width: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: store.take(&format!("{name}.weight"), &[width])?,
            bias: store.take(&format!("{name}.bias"), &[width])?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let width = *self.weight.size().last().expect("layer norm weight is 1-D");
        xs.layer_norm([width], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

impl Activation {
    pub(crate) fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::Silu => xs.silu(),
            Activation::Gelu => xs.gelu("none"),
            Activation::GeluTanh => xs.gelu("tanh"),
            Activation::Relu => xs.relu(),
        }
    }
}

/// Rotary position embedding in transformers' rotate-half layout.
#[derive(Debug)]
pub(crate) struct Rotary {
    /// `[rotary_dim / 2]` f32 inverse frequencies, on the model's device.
    inv_freq: Tensor,
    rotary_dim: i64,
}

/// The cos and sin tables for one batch, `[batch, 1, seq_len, rotary_dim]`.
pub(crate) struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(rope: &RopeConfig, device: tch::Device) -> Self {
        let inv_freq = inverse_frequencies(rope);
        Self {
            inv_freq: Tensor::from_slice(&inv_freq).to_device(device),
            rotary_dim: rope.rotary_dim,
        }
    }

    /// The tables for `position_ids` `[batch, seq_len]`, in `kind`. The angles are computed
    /// in f32 whatever `kind` is, as transformers does.
    pub fn tables(&self, position_ids: &Tensor, kind: Kind) -> RotaryTables {
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let angles = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        RotaryTables { cos: angles.cos().to_kind(kind), sin: angles.sin().to_kind(kind) }
    }

    /// Rotates the leading `rotary_dim` features of `xs` `[batch, heads, seq_len, head_dim]`.
    pub fn apply(&self, xs: &Tensor, tables: &RotaryTables) -> Tensor {
        let head_dim = xs.size()[3];
        if self.rotary_dim == head_dim {
            return rotate(xs, tables);
        }
        let rotated = rotate(&xs.narrow(-1, 0, self.rotary_dim), tables);
        let passed = xs.narrow(-1, self.rotary_dim, head_dim - self.rotary_dim);
        Tensor::cat(&[rotated, passed], -1)
    }
}

fn rotate(xs: &Tensor, tables: &RotaryTables) -> Tensor {
    let half = xs.size()[3] / 2;
    let first = xs.narrow(-1, 0, half);
    let second = xs.narrow(-1, half, half);
    let rotated_half = Tensor::cat(&[second.neg(), first], -1);
    xs * &tables.cos + rotated_half * &tables.sin
}

/// Inverse frequencies `1 / theta^(2i / d)`, rescaled as `rope_scaling` asks.
pub(crate) fn inverse_frequencies(rope: &RopeConfig) -> Vec<f32> {
    let dim = rope.rotary_dim as f64;
    let base: Vec<f64> =
        (0..rope.rotary_dim / 2).map(|i| 1.0 / rope.theta.powf(2.0 * i as f64 / dim)).collect();
    let scaled = match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => base
            .iter()
            .map(|&freq| llama3_frequency(freq, factor, low_freq_factor, high_freq_factor, old_len))
            .collect(),
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

/// Llama 3.1's frequency-dependent scaling: long wavelengths are divided by `factor`, short
/// ones kept, and the band between interpolated smoothly (transformers'
/// `_compute_llama3_parameters`).
fn llama3_frequency(freq: f64, factor: f64, low: f64, high: f64, old_len: f64) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let low_freq_wavelen = old_len / low;
    let high_freq_wavelen = old_len / high;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / factor
    } else {
        let smooth = (old_len / wavelen - low) / (high - low);
        (1.0 - smooth) * freq / factor + smooth * freq
    }
}

/// The boolean attention mask `[batch, 1, q_len, kv_len]` (true = may attend) for queries
/// that are the last `q_len` of `kv_len` positions.
///
/// `key_mask` `[batch, kv_len]` is 1 for tokens and 0 for padding. A query sees the keys at
/// or before its own index that are not padding and, under a sliding window, fewer than
/// `window` positions back. Each query also always sees itself, so that a padding query
/// never has an empty row (a left-padded one would otherwise, and its softmax would be
/// NaN); the outputs at padding positions are meaningless either way and never used.
pub(crate) fn attention_mask(key_mask: &Tensor, q_len: i64, window: Option<i64>) -> Tensor {
    let device = key_mask.device();
    let kv_len = key_mask.size()[1];
    let past = kv_len - q_len;
    let q_idx = Tensor::arange_start(past, kv_len, (Kind::Int64, device)).unsqueeze(1);
    let k_idx = Tensor::arange(kv_len, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = k_idx.le_tensor(&q_idx);
    if let Some(window) = window {
        allowed = allowed.logical_and(&(&q_idx - &k_idx).lt(window));
    }
    let is_token = key_mask.ne(0).unsqueeze(1).unsqueeze(1);
    let allowed = allowed.unsqueeze(0).logical_and(&is_token);
    allowed.logical_or(&k_idx.eq_tensor(&q_idx).unsqueeze(0).unsqueeze(0))
}

/// Scaled dot-product attention through libtorch's fused kernels.
///
/// `q` is `[batch, heads, q_len, head_dim]`, `k` and `v` `[batch, kv_heads, kv_len, head_dim]`;
/// the result is `[batch, q_len, heads * head_dim]`. Key/value heads are repeated to the
/// query heads first (as transformers' `repeat_kv` does), which keeps CUDA's
/// memory-efficient kernel available with an explicit mask.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: Option<f64>,
    kv_groups: i64,
) -> Tensor {
    let (k, v) = if kv_groups > 1 {
        (
            k.repeat_interleave_self_int(kv_groups, 1, None),
            v.repeat_interleave_self_int(kv_groups, 1, None),
        )
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    let out = Tensor::scaled_dot_product_attention(q, &k, &v, Some(mask), 0.0, false, scale, false);
    let (batch, heads, q_len, head_dim) = out.size4().expect("attention output is 4-D");
    out.transpose(1, 2).reshape([batch, q_len, heads * head_dim])
}

/// Keys and values of the positions already seen, per layer, for incremental decoding.
#[derive(Debug, Default)]
pub(crate) struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect() }
    }

    /// Appends this step's `k`, `v` `[batch, kv_heads, new, head_dim]` to layer `layer` and
    /// returns the whole sequence so far.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let slot = &mut self.layers[layer];
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((past_k, past_v)) => (Tensor::cat(&[past_k, k], 2), Tensor::cat(&[past_v, v], 2)),
        };
        *slot = Some((k.shallow_clone(), v.shallow_clone()));
        (k, v)
    }
}

/// Appends to the cache when there is one.
pub(crate) fn with_cache(
    cache: &mut Option<&mut KvCache>,
    layer: usize,
    k: Tensor,
    v: Tensor,
) -> (Tensor, Tensor) {
    match cache {
        Some(cache) => cache.append(layer, k, v),
        None => (k, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: RopeScaling) -> RopeConfig {
        RopeConfig { theta: 10_000.0, rotary_dim: 4, scaling }
    }

    #[test]
    fn inverse_frequencies_by_hand() {
        // d = 4: 1 / 10000^(0/4) = 1 and 1 / 10000^(2/4) = 0.01.
        assert_eq!(inverse_frequencies(&rope(RopeScaling::None)), vec![1.0, 0.01]);
        assert_eq!(
            inverse_frequencies(&rope(RopeScaling::Linear { factor: 2.0 })),
            vec![0.5, 0.005]
        );
    }

    #[test]
    fn llama3_scaling_bands() {
        // old_len 64, low 1, high 4: wavelengths below 16 keep their frequency, above 64 are
        // divided by the factor, and between the two are interpolated.
        let (factor, low, high, old) = (8.0, 1.0, 4.0, 64.0);
        let short = 2.0 * std::f64::consts::PI / 8.0; // wavelength 8
        let long = 2.0 * std::f64::consts::PI / 128.0; // wavelength 128
        let mid = 2.0 * std::f64::consts::PI / 32.0; // wavelength 32: smooth = (2 - 1) / 3
        assert_eq!(llama3_frequency(short, factor, low, high, old), short);
        assert_eq!(llama3_frequency(long, factor, low, high, old), long / 8.0);
        let expected = (2.0 / 3.0) * mid / 8.0 + (1.0 / 3.0) * mid;
        assert!((llama3_frequency(mid, factor, low, high, old) - expected).abs() < 1e-15);
    }

    fn rows(mask: &Tensor, batch: i64, n: i64) -> Vec<Vec<i64>> {
        let mask = mask.to_kind(Kind::Int64).view([batch * n, n]);
        (0..batch * n).map(|i| Vec::<i64>::try_from(mask.get(i)).unwrap()).collect()
    }

    #[test]
    fn mask_is_causal_hides_padding_and_keeps_the_diagonal() {
        // Row 0 is right-padded: the pad key is hidden from the tokens, and the pad query
        // sees the tokens before it and itself. Row 1 is left-padded: the pad query at
        // index 0 sees only itself, and no later query sees it.
        let key_mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 1, 1, 1]).view([2, 4]);
        let expected = vec![
            vec![1, 0, 0, 0],
            vec![1, 1, 0, 0],
            vec![1, 1, 1, 0],
            vec![1, 1, 1, 1],
            vec![1, 0, 0, 0],
            vec![0, 1, 0, 0],
            vec![0, 1, 1, 0],
            vec![0, 1, 1, 1],
        ];
        assert_eq!(rows(&attention_mask(&key_mask, 4, None), 2, 4), expected);
    }

    #[test]
    fn mask_with_past_and_window() {
        // Two past keys, one new query at index 2, window 2: it sees indices 1 and 2 only.
        let key_mask = Tensor::from_slice(&[1i64, 1, 1]).view([1, 3]);
        let mask = attention_mask(&key_mask, 1, Some(2)).to_kind(Kind::Int64).view([3]);
        assert_eq!(Vec::<i64>::try_from(mask).unwrap(), vec![0, 1, 1]);
    }

    #[test]
    fn rotary_rotates_pairs_by_position() {
        // rotary_dim 2, theta irrelevant: the single frequency is 1 rad per position, so at
        // position 1 the pair (1, 0) becomes (cos 1, sin 1).
        let rotary = Rotary::new(
            &RopeConfig { theta: 10_000.0, rotary_dim: 2, scaling: RopeScaling::None },
            tch::Device::Cpu,
        );
        let tables = rotary.tables(&Tensor::from_slice(&[1i64]).view([1, 1]), Kind::Float);
        let xs = Tensor::from_slice(&[1f32, 0.0]).view([1, 1, 1, 2]);
        let out = Vec::<f32>::try_from(rotary.apply(&xs, &tables).view([2])).unwrap();
        assert!((out[0] - 1f32.cos()).abs() < 1e-6 && (out[1] - 1f32.sin()).abs() < 1e-6);
    }
}
