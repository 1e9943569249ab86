use athanor_schemas::{ConfigSchema, Field};

use crate::{Experiment, RunContext, RunError};

/// Logs a few lines, then succeeds, fails or panics: for testing failure paths.
pub struct Flaky;

impl Experiment for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    fn description(&self) -> &str {
        "Logs after_lines lines, then ends as mode says: ok, error (returns an error) or panic."
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::one_of("mode", &["ok", "error", "panic"])
                .describe("How the run ends")
                .default("error"),
            Field::int("after_lines")
                .describe("Lines logged before ending")
                .default(10)
                .min(0.0)
                .max(10_000_000.0),
        ])
    }

    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let lines = ctx.config_i64("after_lines").unwrap_or(10);
        for i in 0..lines {
            ctx.info(format!("flaky line {i} of {lines}"));
        }
        match ctx.config_str("mode").unwrap_or("error") {
            "ok" => Ok(()),
            "panic" => panic!("flaky: panicking after {lines} lines, as configured"),
            _ => Err(format!("flaky: failing after {lines} lines, as configured").into()),
        }
    }
}
