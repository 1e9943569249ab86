//! The `[worker]` section of the configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// This worker's id in `athanor_workers`; a random one when unset.
    pub id: Option<String>,
    /// Experiments this worker hosts (names of built-ins); all of them when empty.
    pub experiments: Vec<String>,
    /// Runs executing at once; further requests wait in `ATHANOR_REQUESTS`.
    pub max_concurrent_runs: usize,
    /// Output logged but not yet acknowledged by JetStream, across all runs, above
    /// which `log()` blocks (policy [`WhenFull::Block`](crate::buffer::WhenFull)). Runs
    /// take it 64 KiB at a time, so up to one unused chunk per live run counts too.
    pub max_pending_bytes: usize,
    /// A log message longer than this is cut, with a visible marker.
    pub max_line_bytes: usize,
    /// How often each run's buffer is drained into one batch.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// After a whole interval with nothing to publish, a run's next output goes out at
    /// once and the interval starts from there (sparse lines in milliseconds rather
    /// than at the next tick); false: strictly at the ticks.
    pub leading_edge: bool,
    /// How long a cancelled run may keep going before it is stopped and reported `cancelled`.
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// How often the worker refreshes its registration.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long to wait for a publish ack before retrying with the same `Nats-Msg-Id`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: None,
            experiments: Vec::new(),
            max_concurrent_runs: 8,
            max_pending_bytes: 256 << 20,
            max_line_bytes: 64 << 10,
            flush_interval: Duration::from_millis(100),
            leading_edge: true,
            cancel_grace: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(5),
        }
    }
}

impl WorkerConfig {
    /// Short intervals for tests.
    pub fn for_tests() -> Self {
        WorkerConfig {
            cancel_grace: Duration::from_millis(500),
            heartbeat_interval: Duration::from_millis(500),
            publish_timeout: Duration::from_secs(2),
            ..Default::default()
        }
    }
}
