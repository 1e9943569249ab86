//! Control-plane messages: run requests on `ATHANOR_REQUESTS` and worker
//! registrations in the `athanor_workers` bucket.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request to run an experiment, published on `athanor.request.<experiment>`.
/// The requester chooses the run id, so it can follow the run before it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub run_id: String,
    pub experiment: String,
    #[serde(default)]
    pub config: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// µs since the epoch.
    pub requested_at: i64,
}

/// One experiment a worker hosts, as published in its registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentInfo {
    pub name: String,
    pub description: String,
    /// JSON Schema of the experiment's config.
    pub config_schema: Value,
}

/// A live worker: the value of key `<worker_id>` in `athanor_workers`, refreshed every
/// heartbeat; the bucket's TTL removes it when the worker stops heartbeating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub hostname: String,
    pub pid: u32,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub max_concurrent_runs: usize,
    pub experiments: Vec<ExperimentInfo>,
    /// Runs executing on this worker now.
    pub running: Vec<String>,
}
