//! What viewers receive: the Server-Sent Events of a run's live feed
//! (`/api/runs/{id}/events`), the run lifecycle announcements (`athanor.lifecycle.<run_id>`
//! on NATS, relayed as `/api/events`). `athanor-client` decodes them.
//!
//! A run's feed, in order:
//! * `snapshot` — the run, its latest progress, its results, the tail of its log, the
//!   total line count and each metric's series (downsampled), as of the batches it covers;
//! * `batch` — one per batch, in `batch_seq` order, each exactly once;
//! * `resync` — the viewer fell behind; a fresh `snapshot` follows and replaces its state;
//! * `status` — the terminal status, always last; then the stream ends.
//!
//! Every event carries `id: <n>`: the run's batch watermark, the number of batches
//! (`0..n`) the viewer now holds. Reconnecting with `Last-Event-ID: <n>` continues at
//! batch `n`, on any gateway.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::batch::{Batch, LogLine, Progress, ResultRecord, RunState};
use crate::metric::{MetricRecord, MetricSeries};

pub const SNAPSHOT: &str = "snapshot";
pub const BATCH: &str = "batch";
pub const RESYNC: &str = "resync";
pub const STATUS: &str = "status";
/// The lifecycle feed's one event name.
pub const RUN: &str = "run";

/// The run as a viewer sees it (also the body of `GET /api/runs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Run))]
pub struct RunView {
    pub id: String,
    pub experiment: String,
    pub instance_id: Option<String>,
    /// The validated config, defaults applied.
    pub config: Value,
    pub status: RunState,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    /// µs since the epoch.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub progress: Option<Progress>,
    /// Lines, results and batches stored (the REST view: `results` counts records) or
    /// covered (a feed's view: `results` counts the keys held).
    pub lines: i64,
    pub results: i64,
    pub batches: i64,
    /// Batches of the run the aggregator had to reject (dead-letter), and why: their
    /// lines are missing from the stored log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Why a pending run waits (no live worker hosts its experiment, or every run slot
    /// of those that do is taken). In the REST views only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// The first event of a feed, and the one after a `resync`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    pub run: RunView,
    /// Latest value of each result key.
    pub results: BTreeMap<String, ResultRecord>,
    /// The newest lines, oldest first.
    pub tail: Vec<LogLine>,
    /// Lines in the batches covered (`tail` holds the last of them).
    pub lines: u64,
    /// Batches covered: `0..batches`. Equals the event's `id`.
    pub batches: u64,
    /// Each metric's series so far, cut to at most a few hundred buckets that keep
    /// every bucket's minimum, maximum and last point.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, MetricSeries>,
    /// When the gateway made it (µs since the epoch, its clock), as on `batch` events.
    #[serde(default)]
    pub at: i64,
}

/// One batch of a run, as it was published (its `batch_seq` is the event's `id` - 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchEvent {
    pub batch_seq: u64,
    #[serde(default)]
    pub logs: Vec<LogLine>,
    #[serde(default)]
    pub results: Vec<ResultRecord>,
    /// Metric records (absent when the batch has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricRecord>,
    #[serde(default)]
    pub progress: Option<Progress>,
    /// `running` on a run's first batch; the terminal state on its last.
    #[serde(default)]
    pub status: Option<RunState>,
    #[serde(default)]
    pub error: Option<String>,
    /// When the gateway made the event (µs since the epoch, its clock): a viewer
    /// comparing it with its own clock sees how far behind it is.
    #[serde(default)]
    pub at: i64,
}

impl BatchEvent {
    pub fn of(batch: &Batch) -> Self {
        BatchEvent {
            at: crate::now_micros(),
            batch_seq: batch.batch_seq,
            logs: batch.logs.clone(),
            results: batch.results.clone(),
            metrics: batch.metrics.clone(),
            progress: batch.progress.clone(),
            status: batch.status.as_ref().map(|s| s.state),
            error: batch.status.as_ref().and_then(|s| s.error.clone()),
        }
    }
}

/// The last event of a feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusEvent {
    pub status: RunState,
    pub error: Option<String>,
    /// Lines and batches of the whole run.
    pub lines: u64,
    pub batches: u64,
    pub finished_at: Option<i64>,
}

/// Published on `athanor.lifecycle.<run_id>` (core NATS, after the change is in the
/// database) and relayed by every gateway on `/api/events` as a `run` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lifecycle {
    pub run_id: String,
    /// `pending` (created), `running`, or a terminal state.
    pub status: RunState,
    #[serde(default)]
    pub experiment: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    pub at: i64,
}
