//! The resolved plan: numbers derived from the configuration, the data and the world size.

use serde::Serialize;

use crate::config::Config;

/// What a run will do, printed at start and written to RUN_DIR/plan.json.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub world_size: usize,
    /// Pairs per micro-batch per rank.
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Pairs per optimiser step: batch_size x grad_accum x world_size.
    pub effective_batch: usize,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub warmup_steps: usize,
    /// `gloo`, `nccl`, or `none` for a single process.
    pub backend: String,
    /// Each rank's device.
    pub devices: Vec<String>,
}

impl Plan {
    pub fn new(config: &Config, world_size: usize, train_pairs: usize, eval_pairs: usize) -> Plan {
        let train = &config.train;
        let effective_batch = train.batch_size * train.grad_accum * world_size;
        let steps_per_epoch = train_pairs.div_ceil(effective_batch);
        let all_epochs = steps_per_epoch * train.epochs.max(1);
        let total_steps = match train.max_steps {
            0 => all_epochs,
            max => max,
        };
        let warmup_steps = match config.optim.warmup_steps {
            0 => (config.optim.warmup_ratio * total_steps as f64).ceil() as usize,
            steps => steps,
        };
        Plan {
            world_size,
            batch_size: train.batch_size,
            grad_accum: train.grad_accum,
            effective_batch,
            train_pairs,
            eval_pairs,
            steps_per_epoch,
            total_steps,
            warmup_steps,
            backend: String::new(),
            devices: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_numbers() {
        let mut config = Config::default();
        config.train.batch_size = 2;
        config.train.grad_accum = 3;
        config.train.epochs = 2;
        config.optim.warmup_ratio = 0.1;
        // 2 x 3 x 2 ranks = 12 pairs a step; 100 pairs -> ceil(100 / 12) = 9 steps an epoch,
        // 18 in two epochs; warmup ceil(1.8) = 2.
        let plan = Plan::new(&config, 2, 100, 10);
        assert_eq!((plan.effective_batch, plan.steps_per_epoch), (12, 9));
        assert_eq!((plan.total_steps, plan.warmup_steps), (18, 2));
    }
}
