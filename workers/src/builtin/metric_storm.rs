use std::time::{Duration, Instant};

use athanor_schemas::{ConfigSchema, Field};

use crate::{Experiment, RunContext, RunError};

/// Emits `steps` steps of `metrics` metric series (`m0`, `m1`, …), all at one step
/// together, at `steps_per_second` (0: as fast as it can). Every value is
/// [`MetricStorm::value`], so a test can check each stored point.
pub struct MetricStorm;

impl MetricStorm {
    /// The value of metric `metric` at `step`: a decaying, wobbling curve per metric;
    /// with a `spike_step`, metric 0 jumps to 1e6 at that one step.
    pub fn value(metric: usize, step: u64, spike_step: Option<u64>) -> f64 {
        if metric == 0 && spike_step == Some(step) {
            return 1e6;
        }
        let s = step as f64;
        (1.0 + metric as f64) / (1.0 + s / 100.0) + 0.05 * ((s / 10.0) + metric as f64).sin()
    }

    /// The series names of a run with `metrics` metrics.
    pub fn names(metrics: usize) -> Vec<String> {
        (0..metrics).map(|i| format!("m{i}")).collect()
    }
}

impl Experiment for MetricStorm {
    fn name(&self) -> &str {
        "metric_storm"
    }

    fn description(&self) -> &str {
        "Load generator: several metric series (m0, m1, …) of a known curve, one point of each per step, at a fixed rate."
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::int("metrics")
                .describe("Series, named m0, m1, …")
                .default(5)
                .min(1.0)
                .max(100.0),
            Field::int("steps")
                .describe("Steps, 0 to steps - 1; each records one point of every series")
                .default(1000)
                .min(0.0)
                .max(100_000_000.0),
            Field::int("steps_per_second")
                .describe("Steps per second (0: as fast as possible)")
                .default(0)
                .min(0.0)
                .max(10_000_000.0),
            Field::int("spike_step")
                .describe("A step at which m0 jumps to 1e6 (-1: none)")
                .default(-1)
                .min(-1.0),
            Field::bool("log_steps")
                .describe("Also log a line per 1000 steps")
                .default(true),
        ])
    }

    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let metrics = ctx.config_i64("metrics").unwrap_or(5).clamp(1, 100) as usize;
        let steps = ctx.config_i64("steps").unwrap_or(1000).max(0) as u64;
        let rate = ctx.config_i64("steps_per_second").unwrap_or(0).max(0) as u64;
        let spike = ctx
            .config_i64("spike_step")
            .filter(|s| *s >= 0)
            .map(|s| s as u64);
        let log_steps = ctx.config_bool("log_steps").unwrap_or(true);
        let names = MetricStorm::names(metrics);
        let started = Instant::now();
        let mut values: Vec<(&str, f64)> = Vec::with_capacity(metrics);
        for step in 0..steps {
            if ctx.cancelled() {
                ctx.warn(format!("cancelled at step {step}"));
                return Ok(());
            }
            if rate > 0 {
                let due = started + Duration::from_secs_f64(step as f64 / rate as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            values.clear();
            values.extend(
                names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (name.as_str(), MetricStorm::value(i, step, spike))),
            );
            ctx.metrics(step, &values);
            if log_steps && step % 1000 == 0 {
                ctx.info(format!("step {step}: m0={:.4}", values[0].1));
            }
            if step % 100 == 0 || step + 1 == steps {
                ctx.progress(step + 1, steps, None);
            }
        }
        ctx.progress(steps, steps, None);
        Ok(())
    }
}
