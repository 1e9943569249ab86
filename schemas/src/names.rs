//! Stable names of subjects, streams, buckets and headers. Operators type these into
//! the NATS CLI, so they never change without a major version.

/// Stream holding every run's batches.
pub const RUNS_STREAM: &str = "ATHANOR_RUNS";
/// Subjects captured by [`RUNS_STREAM`].
pub const RUNS_SUBJECTS: &str = "athanor.run.*.batch";
/// Work-queue stream of run requests.
pub const REQUESTS_STREAM: &str = "ATHANOR_REQUESTS";
/// Subjects captured by [`REQUESTS_STREAM`].
pub const REQUESTS_SUBJECTS: &str = "athanor.request.>";
/// Stream of messages the aggregator could not decode or store.
pub const DLQ_STREAM: &str = "ATHANOR_DLQ";
/// Subjects captured by [`DLQ_STREAM`].
pub const DLQ_SUBJECTS: &str = "athanor.dlq.>";
/// KV bucket of live workers (TTL heartbeat).
pub const WORKERS_BUCKET: &str = "athanor_workers";
/// KV bucket of control requests (`cancel.<run_id>`).
pub const CONTROL_BUCKET: &str = "athanor_control";

/// Core NATS subjects (not stored) on which run lifecycle changes are announced.
pub const LIFECYCLE_SUBJECTS: &str = "athanor.lifecycle.*";

/// The subject a run's lifecycle changes are announced on.
pub fn lifecycle_subject(run_id: &str) -> String {
    format!("athanor.lifecycle.{run_id}")
}

/// The subject a run's batches are published on.
pub fn run_subject(run_id: &str) -> String {
    format!("athanor.run.{run_id}.batch")
}

/// The run whose batches `subject` carries (the inverse of [`run_subject`]).
pub fn run_of_subject(subject: &str) -> Option<&str> {
    subject
        .strip_prefix("athanor.run.")?
        .strip_suffix(".batch")
        .filter(|run| is_valid_token(run))
}

/// The subject requests for `experiment` are published on.
pub fn request_subject(experiment: &str) -> String {
    format!("athanor.request.{experiment}")
}

/// The name of the durable consumer shared by every worker hosting `experiment`.
pub fn request_consumer(experiment: &str) -> String {
    format!("worker-{experiment}")
}

/// The control key that cancels a run.
pub fn cancel_key(run_id: &str) -> String {
    format!("cancel.{run_id}")
}

/// The control key a worker sets (to its id) when it takes a run's request, before
/// acknowledging it: a run whose worker dies before its first batch is then known.
pub fn taken_key(run_id: &str) -> String {
    format!("taken.{run_id}")
}

/// The `Nats-Msg-Id` of a batch: the broker deduplicates on it.
pub fn batch_msg_id(run_id: &str, batch_seq: u64) -> String {
    format!("{run_id}.{batch_seq}")
}

/// Header names carried by every batch message.
pub mod headers {
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const CONTENT_ENCODING: &str = "Content-Encoding";
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const SCHEMA: &str = "Athanor-Schema";
    pub const RUN: &str = "Athanor-Run";
    pub const BATCH: &str = "Athanor-Batch";
    pub const LINES: &str = "Athanor-Lines";
    /// On a run's final batch: the run's number of batches (so a final batch that
    /// cannot be decoded still ends its run).
    pub const FINAL: &str = "Athanor-Final";
}

/// Run ids and experiment names become subject tokens: they may hold only
/// `A-Z a-z 0-9 - _`, and must be 1..=128 characters long.
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A new run id: a UUIDv7 (time-ordered), valid as a subject token.
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
