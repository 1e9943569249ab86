//! The worker's Prometheus metrics (`athanor_worker_*`). What the worker counts anyway
//! ([`PublishStats`](crate::flusher::PublishStats), the budget, the runs it holds) is
//! copied in at each render; publish latency, batches by trigger and time `log()`
//! spent blocked are recorded where they happen.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};

use crate::worker::WorkerShared;

pub(crate) const BATCHES: &str = "athanor_worker_batches_published_total";
pub(crate) const PUBLISH_SECONDS: &str = "athanor_worker_publish_duration_seconds";
pub(crate) const BLOCKED_SECONDS: &str = "athanor_worker_log_blocked_seconds";
const LINES: &str = "athanor_worker_lines_total";
const LOGGED_BYTES: &str = "athanor_worker_logged_bytes_total";
const PUBLISHED_BYTES: &str = "athanor_worker_published_bytes_total";
const RETRIES: &str = "athanor_worker_publish_retries_total";
const DUPLICATES: &str = "athanor_worker_publish_duplicates_total";
const PENDING: &str = "athanor_worker_pending_bytes";
const PENDING_LIMIT: &str = "athanor_worker_pending_limit_bytes";
const RUNS_RUNNING: &str = "athanor_worker_runs_running";
const RUNS_STARTED: &str = "athanor_worker_runs_started_total";

/// Installs the recorder and describes every worker metric.
pub(crate) fn describe() {
    athanor_connections::prometheus::install();
    describe_counter!(LINES, "Log lines published and acknowledged by JetStream.");
    describe_counter!(
        LOGGED_BYTES,
        Unit::Bytes,
        "Bytes of run output published (batch JSON before compression)."
    );
    describe_counter!(
        PUBLISHED_BYTES,
        Unit::Bytes,
        "Bytes published to JetStream (compressed batch payloads)."
    );
    describe_counter!(
        BATCHES,
        "Batches published and acknowledged, by why they were sent (tick, lead, size, final)."
    );
    describe_counter!(
        RETRIES,
        "Publish attempts that failed or timed out and were retried."
    );
    describe_counter!(
        DUPLICATES,
        "Acknowledgements saying JetStream had the batch already (a retry after a lost ack)."
    );
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "From a batch's first publish attempt to its acknowledgement, retries included."
    );
    describe_gauge!(
        PENDING,
        Unit::Bytes,
        "Run output logged and not yet acknowledged by JetStream."
    );
    describe_gauge!(
        PENDING_LIMIT,
        Unit::Bytes,
        "The bound on pending bytes (worker.max_pending_bytes): log() blocks at it."
    );
    describe_histogram!(
        BLOCKED_SECONDS,
        Unit::Seconds,
        "Time each log() call that found the pending bound full waited for room."
    );
    describe_gauge!(
        RUNS_RUNNING,
        "Runs executing on this worker, by experiment."
    );
    describe_counter!(RUNS_STARTED, "Runs whose experiment this worker started.");
}

/// Copies the worker's counters and state in (before each render).
pub(crate) fn export(worker: &WorkerShared) {
    let stats = &worker.stats;
    counter!(LINES).absolute(stats.lines.load(Ordering::Relaxed));
    counter!(LOGGED_BYTES).absolute(stats.json_bytes.load(Ordering::Relaxed));
    counter!(PUBLISHED_BYTES).absolute(stats.wire_bytes.load(Ordering::Relaxed));
    counter!(RETRIES).absolute(stats.retries.load(Ordering::Relaxed));
    counter!(DUPLICATES).absolute(stats.duplicates.load(Ordering::Relaxed));
    counter!(RUNS_STARTED).absolute(worker.runs_started.load(Ordering::Relaxed));
    gauge!(PENDING).set(worker.budget.used() as f64);
    gauge!(PENDING_LIMIT).set(worker.budget.limit() as f64);
    // Every hosted experiment, so one whose last run ended reads 0, not its last count.
    let mut running: BTreeMap<&str, u32> = worker
        .experiments
        .keys()
        .map(|name| (name.as_str(), 0))
        .collect();
    let runs = worker.runs.lock();
    for run in runs.values() {
        *running.entry(run.experiment.as_str()).or_default() += 1;
    }
    for (experiment, n) in running {
        gauge!(RUNS_RUNNING, "experiment" => experiment.to_string()).set(n);
    }
}
