use std::time::Duration;

use athanor_schemas::{ConfigSchema, Field};
use serde_json::json;

use super::sleep_unless_cancelled;
use crate::{Experiment, RunContext, RunError};

/// A toy parameter sweep: one result per iteration, with progress.
pub struct Sweep;

impl Experiment for Sweep {
    fn name(&self) -> &str {
        "sweep"
    }

    fn description(&self) -> &str {
        "A toy hyper-parameter sweep: records iteration_<i> results and loss, score and lr metrics per iteration, and reports progress."
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::int("iterations")
                .describe("Number of iterations")
                .default(10)
                .min(1.0)
                .max(1_000_000.0),
            Field::int("delay_ms")
                .describe("Pause per iteration")
                .default(100)
                .min(0.0)
                .max(60_000.0),
        ])
    }

    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let iterations = ctx.config_i64("iterations").unwrap_or(10) as u64;
        let delay = Duration::from_millis(ctx.config_i64("delay_ms").unwrap_or(100) as u64);
        let mut best = f64::MIN;
        for i in 0..iterations {
            if !sleep_unless_cancelled(ctx, delay) {
                ctx.warn(format!("cancelled at iteration {i}"));
                return Ok(());
            }
            let lr = 1e-4 * (1.0 + i as f64);
            let loss = 1.0 / (1.0 + i as f64) + 0.01 * ((i * 7919) % 13) as f64;
            let score = 1.0 - loss;
            best = best.max(score);
            ctx.info(format!(
                "iteration {i}: lr={lr:.1e} loss={loss:.4} score={score:.4}"
            ));
            ctx.metrics(i, &[("loss", loss), ("score", score), ("lr", lr)]);
            ctx.result(
                format!("iteration_{i}"),
                json!({ "iteration": i, "lr": lr, "loss": loss, "score": score }),
            );
            ctx.progress(
                i + 1,
                iterations,
                Some(&format!("iteration {} of {iterations}", i + 1)),
            );
        }
        ctx.result("best_score", best);
        Ok(())
    }
}
