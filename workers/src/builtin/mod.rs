//! Built-in experiments: load generators and examples. Their config field names are
//! part of the test contract of later components.

mod echo;
mod flaky;
mod log_storm;
mod metric_storm;
mod sleepy;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

pub use echo::Echo;
pub use flaky::Flaky;
pub use log_storm::{sample_lines, LogStorm};
pub use metric_storm::MetricStorm;
pub use sleepy::Sleepy;
pub use sweep::Sweep;

use crate::context::RunContext;
use crate::Experiment;

/// Every built-in experiment.
pub fn all() -> Vec<Arc<dyn Experiment>> {
    vec![
        Arc::new(LogStorm),
        Arc::new(MetricStorm),
        Arc::new(Sweep),
        Arc::new(Flaky),
        Arc::new(Sleepy),
        Arc::new(Echo),
    ]
}

/// Sleeps for `total` in short steps; returns false when the run was cancelled.
pub(crate) fn sleep_unless_cancelled(ctx: &RunContext, total: Duration) -> bool {
    let deadline = std::time::Instant::now() + total;
    loop {
        if ctx.cancelled() {
            return false;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}
