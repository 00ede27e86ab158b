//! AdamW and RMSprop with state tensors caldpo owns, learning-rate schedules and global-norm
//! clipping.
//!
//! tch's built-in optimisers keep their state out of reach, so they cannot be checkpointed;
//! these update parameters with in-place tensor ops under `no_grad` and expose every state
//! tensor by name for the checkpoint.

use std::f64::consts::PI;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use crate::config::{OptimSection, OptimizerName, Schedule};

/// One trainable parameter and its optimiser state.
struct Slot {
    name: String,
    param: Tensor,
    /// AdamW's first moment; unused (empty) for RMSprop.
    exp_avg: Tensor,
    /// AdamW's second moment, or RMSprop's running mean of squared gradients.
    exp_avg_sq: Tensor,
    /// Norms and biases (1-D tensors) get no weight decay, as in the HF Trainer.
    decay: bool,
}

/// The optimiser: AdamW (Loshchilov & Hutter 2019) or RMSprop, both with decoupled weight
/// decay.
pub struct Optimizer {
    config: OptimSection,
    slots: Vec<Slot>,
    /// Optimiser steps taken so far (AdamW's bias correction uses it).
    steps: i64,
}

impl Optimizer {
    /// Creates zeroed state for every named parameter.
    pub fn new(config: &OptimSection, parameters: Vec<(String, Tensor)>) -> Self {
        let slots = parameters
            .into_iter()
            .map(|(name, param)| {
                let exp_avg = match config.name {
                    OptimizerName::Adamw => param.zeros_like(),
                    OptimizerName::Rmsprop => Tensor::zeros([0], (param.kind(), param.device())),
                };
                let decay = param.dim() > 1;
                Slot { name, exp_avg, exp_avg_sq: param.zeros_like(), param, decay }
            })
            .collect();
        Self { config: config.clone(), slots, steps: 0 }
    }

    /// Every parameter, for gradient clipping and all-reduce.
    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.slots.iter().map(|slot| &slot.param)
    }

    /// Applies one update with learning rate `lr` from the parameters' current gradients.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let config = &self.config;
        let steps = self.steps as i32;
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                if slot.decay && config.weight_decay > 0.0 {
                    let _ = slot.param.g_mul_scalar_(1.0 - lr * config.weight_decay);
                }
                match config.name {
                    OptimizerName::Adamw => adamw_update(slot, &grad, lr, steps, config),
                    OptimizerName::Rmsprop => rmsprop_update(slot, &grad, lr, config),
                }
            }
        });
    }

    /// Drops every gradient before the next accumulation cycle.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// The state tensors by name, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::new();
        for slot in &self.slots {
            if slot.exp_avg.numel() > 0 {
                state.push((format!("exp_avg.{}", slot.name), slot.exp_avg.shallow_clone()));
            }
            state.push((format!("exp_avg_sq.{}", slot.name), slot.exp_avg_sq.shallow_clone()));
        }
        state
    }

    /// Restores the state written by [`Optimizer::state`] and the step count.
    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: i64) -> Result<()> {
        let find = |key: String| {
            state
                .iter()
                .find(|(name, _)| *name == key)
                .map(|(_, tensor)| tensor)
                .with_context(|| format!("optimizer state has no tensor {key}"))
        };
        for slot in &mut self.slots {
            if slot.exp_avg.numel() > 0 {
                let saved = find(format!("exp_avg.{}", slot.name))?;
                copy_checked(&mut slot.exp_avg, saved, &slot.name)?;
            }
            let saved = find(format!("exp_avg_sq.{}", slot.name))?;
            copy_checked(&mut slot.exp_avg_sq, saved, &slot.name)?;
        }
        self.steps = steps;
        Ok(())
    }
}

fn copy_checked(target: &mut Tensor, saved: &Tensor, name: &str) -> Result<()> {
    if target.size() != saved.size() {
        bail!("optimizer state for {name}: shape {:?}, expected {:?}", saved.size(), target.size());
    }
    tch::no_grad(|| target.copy_(saved));
    Ok(())
}

/// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps), as torch.optim.AdamW.
fn adamw_update(slot: &mut Slot, grad: &Tensor, lr: f64, step: i32, config: &OptimSection) {
    let _ = slot.exp_avg.lerp_(grad, 1.0 - config.beta1);
    let _ = slot.exp_avg_sq.g_mul_scalar_(config.beta2);
    let _ = slot.exp_avg_sq.addcmul_(&(grad * (1.0 - config.beta2)), grad);
    let bias1 = 1.0 - config.beta1.powi(step);
    let bias2 = 1.0 - config.beta2.powi(step);
    let denom = (slot.exp_avg_sq.sqrt() / bias2.sqrt()) + config.eps;
    let _ = slot.param.addcdiv_(&(&slot.exp_avg * (-lr / bias1)), &denom);
}

/// v = alpha v + (1 - alpha) g^2; p -= lr g / (sqrt(v) + eps), as torch.optim.RMSprop.
fn rmsprop_update(slot: &mut Slot, grad: &Tensor, lr: f64, config: &OptimSection) {
    let _ = slot.exp_avg_sq.g_mul_scalar_(config.alpha);
    let _ = slot.exp_avg_sq.addcmul_(&(grad * (1.0 - config.alpha)), grad);
    let denom = slot.exp_avg_sq.sqrt() + config.eps;
    let _ = slot.param.addcdiv_(&(grad * -lr), &denom);
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (0 disables),
/// and returns the norm before clipping as a device scalar: no host sync here.
pub fn clip_grad_norm<'a>(parameters: impl Iterator<Item = &'a Tensor>, max_norm: f64) -> Tensor {
    tch::no_grad(|| {
        let grads: Vec<Tensor> =
            parameters.map(|param| param.grad()).filter(|grad| grad.defined()).collect();
        let squares: Vec<Tensor> =
            grads.iter().map(|grad| grad.to_kind(tch::Kind::Float).square().sum(None)).collect();
        let total = Tensor::stack(&squares, 0).sum(None).sqrt();
        if max_norm > 0.0 {
            // min(1, max / (norm + 1e-6)) stays on the device, as in torch's clip_grad_norm_.
            let coefficient = (max_norm / (&total + 1e-6)).clamp_max(1.0);
            for mut grad in grads {
                let _ = grad.g_mul_(&coefficient.to_kind(grad.kind()));
            }
        }
        total
    })
}

/// Learning rate at optimiser step `step` (0-based): linear warmup from 0 to `lr` over
/// `warmup` steps, then constant, linear decay to 0, or cosine decay to 0 at `total`.
pub fn learning_rate(schedule: Schedule, lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / (warmup + 1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match schedule {
        Schedule::Constant => lr,
        Schedule::Linear => lr * (1.0 - progress),
        Schedule::Cosine => lr * 0.5 * (1.0 + (PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn config(name: OptimizerName) -> OptimSection {
        OptimSection { name, lr: 0.1, weight_decay: 0.0, ..OptimSection::default() }
    }

    /// One parameter p = [1, -2] with loss sum(p^2): gradient 2p = [2, -4].
    fn param_with_grad() -> Tensor {
        let param = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        param.square().sum(None).backward();
        param
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        // Step 1: m = 0.1 g, v = 0.001 g^2; bias-corrected m/sqrt(v) = g/|g| = sign(g), so
        // p = p - 0.1 * sign(g) * |g| / (|g| + 1e-8) = [0.9, -1.9] to ~1e-8.
        let param = param_with_grad();
        let mut optimizer = Optimizer::new(
            &config(OptimizerName::Adamw),
            vec![("p".into(), param.shallow_clone())],
        );
        optimizer.step(0.1);
        let values = Vec::<f32>::try_from(&param).unwrap();
        assert!((values[0] - 0.9).abs() < 1e-6 && (values[1] + 1.9).abs() < 1e-6, "{values:?}");
    }

    #[test]
    fn rmsprop_first_step() {
        // v = 0.01 g^2, p -= 0.1 g / (0.1 |g| + 1e-8) = p - sign(g): [0, -1].
        let param = param_with_grad();
        let mut optimizer = Optimizer::new(
            &config(OptimizerName::Rmsprop),
            vec![("p".into(), param.shallow_clone())],
        );
        optimizer.step(0.1);
        let values = Vec::<f32>::try_from(&param).unwrap();
        assert!(values[0].abs() < 1e-5 && (values[1] + 1.0).abs() < 1e-5, "{values:?}");
    }

    #[test]
    fn weight_decay_skips_vectors_and_shrinks_matrices() {
        // With a zero gradient AdamW's update is 0, so only decay acts: p *= 1 - 0.1 * 0.5.
        let matrix = Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let vector = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        ((&matrix * 0.0).sum(None) + (&vector * 0.0).sum(None)).backward();
        let mut section = config(OptimizerName::Adamw);
        section.weight_decay = 0.5;
        let parameters =
            vec![("m".into(), matrix.shallow_clone()), ("v".into(), vector.shallow_clone())];
        Optimizer::new(&section, parameters).step(0.1);
        assert_eq!(Vec::<f32>::try_from(&matrix.flatten(0, 1)).unwrap(), vec![0.95; 4]);
        assert_eq!(Vec::<f32>::try_from(&vector).unwrap(), vec![1.0; 2]);
    }

    #[test]
    fn clipping_returns_the_norm_before_clipping() {
        // Gradient [2, -4] has norm sqrt(20) = 4.4721; clipped to norm 1 it is g / 4.4721.
        let param = param_with_grad();
        let norm = clip_grad_norm(std::iter::once(&param), 1.0);
        assert!((f64::try_from(&norm).unwrap() - 20f64.sqrt()).abs() < 1e-5);
        let clipped = Vec::<f32>::try_from(&param.grad()).unwrap();
        assert!((clipped[0] - 2.0 / 20f32.sqrt()).abs() < 1e-5, "{clipped:?}");
    }

    #[test]
    fn schedules() {
        // Warmup of 4 steps to lr 1: steps 0..3 give 1/5, 2/5, 3/5, 4/5; then decay over the
        // remaining 10 steps: linear at step 9 is 1 - 5/10, cosine 0.5 (1 + cos(pi/2)).
        assert_eq!(learning_rate(Schedule::Linear, 1.0, 0, 4, 14), 0.2);
        assert_eq!(learning_rate(Schedule::Linear, 1.0, 3, 4, 14), 0.8);
        assert_eq!(learning_rate(Schedule::Linear, 1.0, 9, 4, 14), 0.5);
        assert!((learning_rate(Schedule::Cosine, 1.0, 9, 4, 14) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 1.0, 13, 4, 14), 1.0);
    }
}
