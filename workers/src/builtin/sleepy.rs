use std::time::Duration;

use athanor_schemas::{ConfigSchema, Field};

use super::sleep_unless_cancelled;
use crate::{Experiment, RunContext, RunError};

/// Sleeps, reporting progress; stops early when cancelled.
pub struct Sleepy;

impl Experiment for Sleepy {
    fn name(&self) -> &str {
        "sleepy"
    }

    fn description(&self) -> &str {
        "Sleeps for duration_ms, reporting progress every 100 ms; honours cancellation."
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([Field::int("duration_ms")
            .describe("How long to sleep")
            .default(1000)
            .min(0.0)
            .max(86_400_000.0)])
    }

    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let total = ctx.config_i64("duration_ms").unwrap_or(1000).max(0) as u64;
        ctx.info(format!("sleeping for {total} ms"));
        let mut slept = 0;
        while slept < total {
            let step = (total - slept).min(100);
            if !sleep_unless_cancelled(ctx, Duration::from_millis(step)) {
                ctx.warn(format!("cancelled after {slept} ms"));
                return Ok(());
            }
            slept += step;
            ctx.progress(slept, total, Some("sleeping"));
        }
        ctx.info("done sleeping");
        Ok(())
    }
}
