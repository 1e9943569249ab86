//! The aggregator's Prometheus metrics (`athanor_aggregator_*`). Its
//! [`AggregatorStats`] are copied in at each render; transaction durations and sizes
//! and dead-letters by reason are recorded where they happen; the consumer's lag is
//! read from JetStream every [`LAG_EVERY`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use tokio::time::MissedTickBehavior;

use crate::store::Written;
use crate::{AggregatorStats, Shared};

const BATCHES: &str = "athanor_aggregator_batches_stored_total";
const LINES: &str = "athanor_aggregator_lines_stored_total";
const POINTS: &str = "athanor_aggregator_metric_points_stored_total";
const DUPLICATES: &str = "athanor_aggregator_duplicate_batches_total";
const OF_DELETED: &str = "athanor_aggregator_deleted_run_batches_total";
const REDELIVERED: &str = "athanor_aggregator_redeliveries_total";
const DEAD_LETTERED: &str = "athanor_aggregator_dead_lettered_total";
const DB_ERRORS: &str = "athanor_aggregator_database_errors_total";
const RUNS_LOST: &str = "athanor_aggregator_runs_lost_total";
const RUNS_EXPIRED: &str = "athanor_aggregator_runs_expired_total";
const PURGED: &str = "athanor_aggregator_purged_batches_total";
const TX_SECONDS: &str = "athanor_aggregator_transaction_duration_seconds";
const TX_LINES: &str = "athanor_aggregator_transaction_lines";
const TX_BATCHES: &str = "athanor_aggregator_transaction_batches";
const PENDING: &str = "athanor_aggregator_consumer_pending_messages";
const ACK_PENDING: &str = "athanor_aggregator_consumer_ack_pending_messages";

/// How often the durable consumer's lag is read from JetStream.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// Installs the recorder and describes every aggregator metric.
pub(crate) fn describe() {
    athanor_connections::prometheus::install();
    describe_counter!(
        BATCHES,
        "Batches written to the database for the first time."
    );
    describe_counter!(LINES, "Log lines written to the database.");
    describe_counter!(POINTS, "Metric points written to the database.");
    describe_counter!(
        DUPLICATES,
        "Batches the database held already (redelivered or republished), absorbed."
    );
    describe_counter!(OF_DELETED, "Batches of deleted runs, dropped.");
    describe_counter!(
        REDELIVERED,
        "Messages fetched that JetStream had delivered before."
    );
    describe_counter!(
        DEAD_LETTERED,
        "Messages sent to the ATHANOR_DLQ stream, by reason."
    );
    // Each reason exists from the start (at 0), so a query or an alert on it has a
    // series before the first dead letter.
    let reasons = athanor_schemas::DecodeError::KINDS
        .into_iter()
        .chain([crate::dlq::WRONG_SUBJECT, crate::dlq::STORE]);
    for reason in reasons {
        counter!(DEAD_LETTERED, "reason" => reason).increment(0);
    }
    describe_counter!(
        DB_ERRORS,
        "Write transactions that failed and were retried (database unavailable, disk full)."
    );
    describe_counter!(
        RUNS_LOST,
        "Runs marked lost (their worker stopped heartbeating)."
    );
    describe_counter!(RUNS_EXPIRED, "Runs deleted by database.retention.");
    describe_counter!(
        PURGED,
        "Stored batches purged from ATHANOR_RUNS to keep it under nats.runs_max_bytes."
    );
    describe_histogram!(
        TX_SECONDS,
        Unit::Seconds,
        "Duration of each committed write transaction."
    );
    describe_histogram!(TX_LINES, "Log lines written by each committed transaction.");
    describe_histogram!(
        TX_BATCHES,
        "Batches (new and duplicate) in each committed transaction."
    );
    describe_gauge!(
        PENDING,
        "Messages of ATHANOR_RUNS the durable consumer has not delivered yet (its lag)."
    );
    describe_gauge!(
        ACK_PENDING,
        "Messages delivered to the aggregators and not yet acknowledged."
    );
}

/// Copies the aggregator's counters in (before each render).
pub(crate) fn export(stats: &AggregatorStats) {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    counter!(BATCHES).absolute(get(&stats.batches));
    counter!(LINES).absolute(get(&stats.lines));
    counter!(POINTS).absolute(get(&stats.metrics));
    counter!(DUPLICATES).absolute(get(&stats.duplicates));
    counter!(OF_DELETED).absolute(get(&stats.of_deleted_runs));
    counter!(REDELIVERED).absolute(get(&stats.redelivered));
    counter!(DB_ERRORS).absolute(get(&stats.retries));
    counter!(RUNS_LOST).absolute(get(&stats.lost));
    counter!(RUNS_EXPIRED).absolute(get(&stats.expired_runs));
    counter!(PURGED).absolute(get(&stats.purged));
    gauge!(PENDING).set(get(&stats.consumer_pending) as f64);
    gauge!(ACK_PENDING).set(get(&stats.consumer_ack_pending) as f64);
}

/// A committed transaction: how long it took and what it wrote.
pub(crate) fn transaction(took: Duration, written: &Written) {
    histogram!(TX_SECONDS).record(took);
    histogram!(TX_LINES).record(written.lines as f64);
    histogram!(TX_BATCHES)
        .record((written.batches + written.duplicates + written.of_deleted_runs) as f64);
}

/// A message sent to the dead-letter stream, under `reason` (a decode error's kind,
/// `wrong_subject`, `store`: a short fixed set).
pub(crate) fn dead_lettered(reason: &'static str) {
    counter!(DEAD_LETTERED, "reason" => reason).increment(1);
}

/// Reads the durable consumer's lag from JetStream every [`LAG_EVERY`] until shutdown
/// (the last value stays when NATS cannot be asked).
pub(crate) async fn watch_lag(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(LAG_EVERY);
    every.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Some((pending, ack_pending)) = shared.consumer_left().await {
            shared
                .stats
                .consumer_pending
                .store(pending, Ordering::Relaxed);
            shared
                .stats
                .consumer_ack_pending
                .store(ack_pending, Ordering::Relaxed);
        }
    }
}
