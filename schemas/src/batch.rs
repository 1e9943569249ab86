//! The batch, version 1: everything one run emitted during one flush interval.
//!
//! A batch is JSON compressed with zstd (see [`crate::codec`]). Order is carried by
//! `seq` (per line / per result) and `batch_seq` (per batch), never by arrival order.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::metric::MetricRecord;

/// Major version of the wire format. A consumer rejects any other major.
pub const SCHEMA_MAJOR: u32 = 1;
/// Minor version: a newer minor only adds optional fields.
/// 1.1 added `metrics`.
pub const SCHEMA_MINOR: u32 = 1;
/// The version as carried in `v` and in the `Athanor-Schema` header.
pub const SCHEMA_VERSION: &str = "1.1";

/// One message on `athanor.run.<run_id>.batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Schema version, `"<major>.<minor>"`.
    pub v: String,
    pub run_id: String,
    /// 0, 1, 2, … per run, gapless.
    pub batch_seq: u64,
    pub worker_id: String,
    /// When the batch was encoded (µs since the epoch).
    pub sent_at: i64,
    /// What was run: present on a run's first batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<ResultRecord>,
    /// Metric points (since 1.1; a 1.0 reader ignores them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricRecord>,
    /// The latest progress at the time of the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// A status transition: `running` on the first batch, the terminal state on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Totals, on the last batch of a run only.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "final")]
    pub final_: Option<Final>,
}

impl Batch {
    /// An empty batch of the current schema version.
    pub fn new(run_id: impl Into<String>, batch_seq: u64, worker_id: impl Into<String>) -> Self {
        Batch {
            v: SCHEMA_VERSION.to_string(),
            run_id: run_id.into(),
            batch_seq,
            worker_id: worker_id.into(),
            sent_at: crate::now_micros(),
            run: None,
            logs: Vec::new(),
            results: Vec::new(),
            metrics: Vec::new(),
            progress: None,
            status: None,
            final_: None,
        }
    }

    /// The major part of `v`, if it parses.
    pub fn major(&self) -> Option<u32> {
        parse_major(&self.v)
    }
}

pub(crate) fn parse_major(v: &str) -> Option<u32> {
    v.split('.').next()?.parse().ok()
}

/// What a run executes: sent once, on its first batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub experiment: String,
    /// The validated config, defaults applied.
    pub config: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// When the worker started the run (µs since the epoch).
    pub started_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    /// Per run, assigned when `log()` is called, gapless from 0.
    pub seq: u64,
    /// µs since the epoch.
    pub ts: i64,
    pub level: Level,
    pub message: String,
    /// Any JSON the experiment attached (`log_with`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResultRecord {
    /// Per run, gapless from 0; for one key, the highest `seq` wins.
    pub seq: u64,
    pub key: String,
    pub value: Value,
    pub ts: i64,
}

/// The newest record of each result key (a key may also name the run: the aggregator
/// merges several runs' batches at once): `record` replaces the one held for `key`
/// only when its `seq` is greater, so records may arrive in any order and more than
/// once. Returns whether it did. Every Rust holder of results merges through this; the
/// store's upsert (`WHERE excluded.seq > run_results.seq`) and the web UI say the same.
pub fn merge_result<K: Ord>(
    results: &mut BTreeMap<K, ResultRecord>,
    key: K,
    record: ResultRecord,
) -> bool {
    match results.entry(key) {
        Entry::Occupied(mut held) if held.get().seq < record.seq => {
            held.insert(record);
            true
        }
        Entry::Occupied(_) => false,
        Entry::Vacant(slot) => {
            slot.insert(record);
            true
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    pub current: u64,
    pub total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(nullable = false))]
    pub message: Option<String>,
    pub ts: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Lost,
}

impl RunState {
    /// Every state, in lifecycle order.
    pub const ALL: [RunState; 6] = [
        RunState::Pending,
        RunState::Running,
        RunState::Completed,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Lost,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Pending | RunState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Lost => "lost",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status text that is none of the [`RunState`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown run status {0:?} (one of pending, running, completed, failed, cancelled, lost)")]
pub struct UnknownRunState(pub String);

/// The state its text names (the same text as its JSON and database form).
impl std::str::FromStr for RunState {
    type Err = UnknownRunState;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownRunState(text.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub at: i64,
}

/// Totals of a finished run, carried by its last batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Final {
    pub status: RunState,
    /// Number of batches of the run, this one included (so the last `batch_seq` + 1).
    pub batches: u64,
    /// Number of log lines of the run.
    pub lines: u64,
    /// Number of result records of the run.
    pub results: u64,
    /// Number of metric records of the run (since 1.1).
    #[serde(default)]
    pub metrics: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, value: i64) -> ResultRecord {
        ResultRecord {
            seq,
            key: "loss".into(),
            value: value.into(),
            ts: 0,
        }
    }

    #[test]
    fn the_newest_seq_of_a_result_key_wins_in_any_order_and_repeated() {
        let mut results: BTreeMap<String, ResultRecord> = BTreeMap::new();
        assert!(merge_result(&mut results, "loss".into(), record(5, 50)));
        assert!(!merge_result(&mut results, "loss".into(), record(3, 30)));
        assert!(!merge_result(&mut results, "loss".into(), record(5, 99)));
        assert_eq!(results["loss"].value, 50);
        assert!(merge_result(&mut results, "loss".into(), record(8, 80)));
        assert_eq!(results["loss"], record(8, 80));
        assert_eq!(results.len(), 1);
    }

    #[test]
    fn every_run_state_has_one_text_in_json_and_back() {
        let texts = [
            "pending",
            "running",
            "completed",
            "failed",
            "cancelled",
            "lost",
        ];
        for (state, text) in RunState::ALL.into_iter().zip(texts) {
            assert_eq!(state.as_str(), text);
            assert_eq!(state.to_string(), text);
            assert_eq!(serde_json::to_value(state).unwrap(), text);
            assert_eq!(text.parse::<RunState>(), Ok(state));
            assert_eq!(
                serde_json::from_value::<RunState>(text.into()).unwrap(),
                state
            );
        }
        let terminal: Vec<_> = RunState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                RunState::Completed,
                RunState::Failed,
                RunState::Cancelled,
                RunState::Lost
            ]
        );
        assert_eq!(
            "Running".parse::<RunState>().unwrap_err().to_string(),
            "unknown run status \"Running\" (one of pending, running, completed, failed, cancelled, lost)"
        );
    }
}
