//! The bodies of the gateway's HTTP API (`/api/…`), as its clients read and send them.
//! A run is an [`events::RunView`](crate::events::RunView) everywhere it appears.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::batch::RunState;
use crate::batch::{LogLine, ResultRecord};
use crate::events::RunView;
use crate::metric::{MetricSeries, MetricSummary};

/// An experiment some live worker hosts (`GET /api/experiments`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Experiment {
    pub name: String,
    pub description: String,
    /// JSON Schema of its config.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config_schema: Value,
    /// Live workers hosting it.
    pub workers: usize,
    /// Of those, how many are running as many runs as they take (a new run waits for
    /// one of them, or for another worker).
    #[serde(default)]
    pub busy: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Experiments))]
pub struct ExperimentList {
    pub experiments: Vec<Experiment>,
}

/// A run to start (`POST /api/runs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = NewRun))]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// An experiment a live worker hosts.
    pub experiment: String,
    /// Checked against the experiment's config schema; absent or null: all defaults.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub config: Value,
}

/// A config to check against an experiment's schema
/// (`POST /api/experiments/{name}/validate`) without starting anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigToCheck {
    /// Absent or null: all defaults.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub config: Value,
}

/// A config that fits its experiment's schema, as a run would get it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidConfig {
    pub experiment: String,
    /// The config with defaults applied.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: Value,
}

/// The answer to a started run (`201 Created`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Created))]
pub struct RunCreated {
    pub id: String,
    pub status: RunState,
    pub experiment: String,
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub instance_id: Option<String>,
    /// The config as validated, with defaults filled in.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: Value,
}

/// The filters of `GET /api/runs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// A page of runs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = RunsPage))]
pub struct RunList {
    pub runs: Vec<RunView>,
    /// Runs matching the filters, on all pages.
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
}

/// `POST /api/runs/{id}/cancel` (`202 Accepted`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CancelRequested {
    pub id: String,
    /// The run's status when asked (`pending` or `running`).
    pub status: RunState,
    /// Always `requested`: the worker ends the run.
    #[cfg_attr(feature = "openapi", schema(pattern = "^requested$"))]
    pub cancel: String,
}

/// `DELETE /api/runs/{id}`: the run is gone, with everything it stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunDeleted {
    pub id: String,
    /// The rows removed.
    pub removed: Removed,
}

/// `GET /api/stats`: what Athanor holds, for whoever watches the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stats {
    /// Runs in the database, and their stored log lines.
    pub runs: u64,
    pub lines: u64,
    /// The database's size on disk (SQLite: its pages; PostgreSQL: the database).
    pub database_bytes: u64,
    /// `ATHANOR_RUNS`: bytes and messages JetStream keeps (until `nats.runs_max_age`).
    pub stream_bytes: u64,
    pub stream_messages: u64,
    /// Its bound (`nats.runs_max_bytes`; 0: none).
    #[serde(default)]
    pub stream_max_bytes: u64,
    /// Set while run output is not being stored (the stream is full of batches not yet
    /// stored, or the aggregators have acknowledged nothing for `gateway.storage_stall`
    /// while batches wait): what the web UI shows as a warning; `/readyz`'s reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The rows a run's deletion removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Removed {
    pub lines: u64,
    pub results: u64,
    pub metric_points: u64,
    pub metric_series: u64,
    pub batches: u64,
}

/// The query of `GET /api/runs/{id}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Lines with `seq` greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    /// Lines with `seq` less than this (only `before`: the newest such lines, for
    /// scrolling up; oldest first like every page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Comma-separated levels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Case-insensitive text search in the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Also count every line the request matches (not only this page): `matching`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<bool>,
}

/// A page of a run's stored log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogPage {
    pub run_id: String,
    pub lines: Vec<LogLine>,
    /// More lines match beyond this page.
    pub more: bool,
    /// Lines stored for the run.
    pub total: i64,
    /// With `count=true`: how many stored lines match the whole request (its `after`,
    /// `before`, `level` and `q`), of which this page holds at most `limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matching: Option<i64>,
    pub status: RunState,
}

/// `GET /api/runs/{id}/results`: the newest record of each key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Results))]
pub struct ResultList {
    pub run_id: String,
    pub results: Vec<ResultRecord>,
}

/// `GET /api/runs/{id}/metrics`: each metric of the run, the most recently updated first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Metrics))]
pub struct MetricList {
    pub run_id: String,
    pub metrics: Vec<MetricSummary>,
}

/// Buckets a series comes back in at most, unless asked otherwise.
pub const DEFAULT_MAX_POINTS: u64 = 1000;
/// The most buckets one may ask for.
pub const MAX_MAX_POINTS: u64 = 10_000;
/// The most runs one comparison takes.
pub const MAX_COMPARED_RUNS: usize = 20;

/// The query of a metric's series (`GET /api/runs/{id}/metrics/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    /// Buckets at most; a series with no more points than this comes back exactly,
    /// point by point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        param(minimum = 1, maximum = 10000, default = 1000)
    )]
    pub max_points: Option<u64>,
    /// The first step (default: the series' first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(maximum = 9223372036854775807_i64))]
    pub from_step: Option<u64>,
    /// The last step, included (default: the series' last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(maximum = 9223372036854775807_i64))]
    pub to_step: Option<u64>,
}

/// The query of a comparison (`GET /api/metrics/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct CompareQuery {
    /// Comma-separated run ids, 1 to 20.
    #[cfg_attr(feature = "openapi", param(min_length = 1))]
    pub runs: String,
    /// Buckets per run at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        param(minimum = 1, maximum = 10000, default = 1000)
    )]
    pub max_points: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(maximum = 9223372036854775807_i64))]
    pub from_step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(maximum = 9223372036854775807_i64))]
    pub to_step: Option<u64>,
}

/// `GET /api/runs/{id}/metrics/{name}`: one metric of one run, downsampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Series))]
pub struct RunSeries {
    pub run_id: String,
    #[serde(flatten)]
    pub series: MetricSeries,
}

/// `GET /api/metrics/{name}?runs=a,b`: one metric of several runs, each downsampled
/// alike, in the order asked; a run without the metric has an empty series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Comparison))]
pub struct MetricComparison {
    pub name: String,
    pub runs: Vec<RunSeries>,
}

/// A saved experiment configuration, with the runs started from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub experiment: String,
    /// The validated config, defaults applied.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: Value,
    /// µs since the epoch.
    pub created_at: i64,
    /// µs since the epoch.
    pub updated_at: i64,
    /// Runs started from it.
    #[serde(default)]
    pub runs: u64,
    /// The newest of them.
    #[serde(default)]
    pub last_run: Option<LastRun>,
}

/// The newest run of an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastRun {
    pub id: String,
    pub status: RunState,
    /// µs since the epoch.
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Instances))]
pub struct InstanceList {
    pub instances: Vec<Instance>,
}

/// An instance to create (`POST /api/instances`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewInstance {
    /// 1 to 200 characters, not all blank (trimmed).
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 200, pattern = "\\S")
    )]
    pub name: String,
    /// An experiment a live worker hosts.
    pub experiment: String,
    /// Checked against the experiment's config schema; absent or null: all defaults.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub config: Value,
}

/// Fields to change (`PUT /api/instances/{id}`); absent or null: unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstanceChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 200, pattern = "\\S")
    )]
    pub name: Option<String>,
    /// Checked against the experiment's config schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub config: Option<Value>,
}

/// Changes to the instance's config for one run (`POST /api/instances/{id}/runs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunOverrides {
    /// Fields replacing the instance's config for this run only.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: Map<String, Value>,
}

/// The body of every error answer (4xx and 5xx): `error` says what was wrong; a config
/// that fails its experiment's schema (422) also names the `field` and the `reason`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Error))]
pub struct ErrorBody {
    pub error: String,
    /// A config that does not fit its schema (`422`): the field and what is wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(nullable = false))]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(nullable = false))]
    pub reason: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            field: None,
            reason: None,
        }
    }
}
