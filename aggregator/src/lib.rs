//! Athanor aggregator: the only writer of run output to the database.
//!
//! It pulls batches from `ATHANOR_RUNS` through one durable consumer (shared by every
//! aggregator), decodes them with the bounded decoder, writes many batches per
//! transaction through sea-orm and acknowledges them only after the commit. A batch
//! seen again is absorbed by the `run_batches` key, so the database holds every batch
//! exactly once whatever JetStream redelivers. Undecodable messages go to
//! `ATHANOR_DLQ` with the reason. It also marks runs whose worker stopped
//! heartbeating as `lost`, and on SQLite checkpoints the write-ahead log off the
//! writer's path.

mod checkpoint;
mod consumer;
mod dlq;
mod instruments;
mod lifecycle;
mod reclaim;
mod retention;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::StreamError as PullError;
use async_nats::jetstream::context::GetStreamError;
use async_nats::jetstream::stream::ConsumerError;
use athanor_connections::db::DatabaseConfig;
use athanor_connections::nats::{NatsConfig, NatsError};
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The `[aggregator]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Name of the durable consumer on `ATHANOR_RUNS`, shared by all aggregators.
    pub consumer: String,
    /// Most messages written in one transaction.
    pub max_batch_messages: usize,
    /// Decompressed bytes after which a transaction takes no more messages: with at
    /// most `max(2, writers)` transactions queued and `writers` being written, this
    /// bounds the memory the aggregator holds.
    pub max_batch_bytes: usize,
    /// Transactions in flight at once, each on its own connection: while one commits,
    /// the next is written. Worth it on PostgreSQL (measured in BENCHMARKS.md); SQLite
    /// takes one writer at a time whatever this says. Memory held grows with it: up to
    /// `writers` transactions being written and as many queued.
    pub writers: usize,
    /// How long to wait for more messages before writing what has arrived.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Redelivery timeout of unacknowledged messages: how soon another aggregator
    /// takes over what a crashed one had fetched. (While the database fails, held
    /// messages are kept with progress acks.)
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Largest decompressed batch accepted; larger ones go to the dead-letter stream.
    pub decode_limit: usize,
    /// How often runs of vanished workers are looked for.
    #[serde(with = "humantime_serde")]
    pub lost_check_interval: Duration,
    /// Longest pause between retries while the database is unavailable (the cap of
    /// [`Backoff::STORE`](athanor_connections::retry::Backoff::STORE)).
    #[serde(with = "humantime_serde")]
    pub max_retry_delay: Duration,
    /// At shutdown, how long the aggregator keeps storing what was already delivered
    /// to it (retrying while the database fails) before it leaves the rest
    /// unacknowledged for redelivery, and says so.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// `database.retention`, handed over by the binary (not a key of this section):
    /// finished runs older than this are deleted in the background.
    #[serde(skip)]
    pub retention: Option<Duration>,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            consumer: "aggregator".into(),
            max_batch_messages: 1000,
            max_batch_bytes: 32 << 20,
            writers: 1,
            linger: Duration::from_millis(20),
            ack_wait: Duration::from_secs(15),
            decode_limit: athanor_schemas::DEFAULT_DECODE_LIMIT,
            lost_check_interval: Duration::from_secs(5),
            max_retry_delay: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            retention: None,
        }
    }
}

impl AggregatorConfig {
    pub fn for_tests() -> Self {
        AggregatorConfig {
            lost_check_interval: Duration::from_millis(500),
            ack_wait: Duration::from_secs(3),
            max_retry_delay: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(1),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Db(#[from] athanor_connections::db::DbError),
    #[error("cannot open the {stream} stream: {source}")]
    Stream {
        stream: &'static str,
        #[source]
        source: GetStreamError,
    },
    #[error("cannot open the consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: ConsumerError,
    },
    #[error("cannot pull from the consumer {consumer}: {source}")]
    Pull {
        consumer: String,
        #[source]
        source: PullError,
    },
    #[error("cannot list the keys of the {bucket} bucket: {source}")]
    Keys {
        bucket: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("database: {0}")]
    Query(#[from] sea_orm::DbErr),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an aggregator did, for logs, metrics and tests.
#[derive(Debug, Default)]
pub struct AggregatorStats {
    /// Batches written for the first time.
    pub batches: AtomicU64,
    /// Batches that were already stored (redeliveries, republished duplicates).
    pub duplicates: AtomicU64,
    /// Batches of deleted runs, dropped (the run stays deleted).
    pub of_deleted_runs: AtomicU64,
    /// Runs deleted by `database.retention`, and the transactions that took (each
    /// deletes at most `retention::CHUNK` rows of a table).
    pub expired_runs: AtomicU64,
    pub retention_transactions: AtomicU64,
    pub lines: AtomicU64,
    /// Metric points of the batches written for the first time.
    pub metrics: AtomicU64,
    /// Messages sent to `ATHANOR_DLQ`.
    pub dead_lettered: AtomicU64,
    /// Messages fetched that JetStream had delivered before (to this aggregator or
    /// another): an ack lost, a transaction abandoned, an aggregator killed.
    pub redelivered: AtomicU64,
    /// The durable consumer as last read from JetStream: messages not yet delivered,
    /// and delivered but not acknowledged.
    pub consumer_pending: AtomicU64,
    pub consumer_ack_pending: AtomicU64,
    /// Stored batches purged from `ATHANOR_RUNS` to keep it under its bound.
    pub purged: AtomicU64,
    /// Transactions that failed and were retried.
    pub retries: AtomicU64,
    /// Runs marked `lost`.
    pub lost: AtomicU64,
    /// Time spent decoding (and preparing: `store::Prepared`), and in write transactions
    /// (µs): which stage limits throughput.
    pub decode_micros: AtomicU64,
    pub write_micros: AtomicU64,
}

impl AggregatorStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

pub(crate) struct Shared {
    pub(crate) config: AggregatorConfig,
    pub(crate) nats: NatsConfig,
    pub(crate) db: DatabaseConnection,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) stats: Arc<AggregatorStats>,
    /// Cancelled to stop: the consumer stops fetching; what it has fetched is written
    /// and acknowledged, until `abandon`.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled `drain_timeout` after `shutdown`: a write still being retried is then
    /// abandoned, its messages left unacknowledged for redelivery.
    pub(crate) abandon: CancellationToken,
}

impl Shared {
    /// The durable consumer's (not yet delivered, delivered and not acknowledged)
    /// messages, read from JetStream; `None` when it cannot be read.
    pub(crate) async fn consumer_left(&self) -> Option<(u64, u64)> {
        let stream = self
            .js
            .get_stream(athanor_schemas::names::RUNS_STREAM)
            .await
            .ok()?;
        let info = stream.consumer_info(&self.config.consumer).await.ok()?;
        Some((info.num_pending, info.num_ack_pending as u64))
    }
}

/// A running aggregator.
pub struct Aggregator {
    shared: Arc<Shared>,
    tasks: tokio_util::task::TaskTracker,
}

impl Aggregator {
    /// Connects to NATS, declares the topology and starts consuming into `db` (which
    /// must be migrated).
    pub async fn start(
        config: AggregatorConfig,
        nats: NatsConfig,
        db: DatabaseConnection,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        instruments::describe();
        let js = athanor_connections::nats::open(&nats, "athanor-aggregator").await?;
        let abandon = CancellationToken::new();
        tokio::spawn({
            let (shutdown, abandon, drain) =
                (shutdown.clone(), abandon.clone(), config.drain_timeout);
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(drain).await;
                abandon.cancel();
            }
        });
        let shared = Arc::new(Shared {
            config,
            nats,
            db,
            js,
            stats: Arc::new(AggregatorStats::default()),
            shutdown,
            abandon,
        });
        athanor_connections::prometheus::export_on_render(&shared.stats, instruments::export);
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(consumer::consume(shared.clone()));
        tasks.spawn(instruments::watch_lag(shared.clone()));
        tasks.spawn(reclaim::run(shared.clone()));
        tasks.spawn(lifecycle::watch_lost(shared.clone()));
        tasks.spawn(checkpoint::run(shared.db.clone(), shared.shutdown.clone()));
        if let Some(retention) = shared.config.retention {
            tasks.spawn(retention::run(shared.clone(), retention));
        }
        tasks.close();
        Ok(Aggregator { shared, tasks })
    }

    pub fn stats(&self) -> &Arc<AggregatorStats> {
        &self.shared.stats
    }

    /// Waits until the shutdown token is cancelled and the tasks have stopped.
    pub async fn wait(self) {
        self.tasks.wait().await;
    }

    /// Waits until the durable consumer has nothing left: every message of
    /// `ATHANOR_RUNS` delivered, stored and acknowledged (by this aggregator or another
    /// sharing the consumer), or `timeout` has passed. What `athanor up` does between
    /// stopping its worker (whose last batches JetStream has acknowledged) and stopping
    /// the aggregator. Returns what was left: (not yet delivered, delivered and not
    /// acknowledged), `Some((0, 0))` when drained; `None` when the consumer could not
    /// be read (NATS gone) until `timeout`.
    pub async fn drain(&self, timeout: Duration) -> Option<(u64, u64)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut left = None;
        loop {
            if let Some(now) = self.shared.consumer_left().await {
                left = Some(now);
                if now == (0, 0) {
                    return left;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs an aggregator until `shutdown` is cancelled.
pub async fn run(
    config: AggregatorConfig,
    database: DatabaseConfig,
    nats: NatsConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let db = athanor_connections::db::connect(&database).await?;
    let config = AggregatorConfig {
        retention: database.retention,
        ..config
    };
    Aggregator::start(config, nats, db, shutdown)
        .await?
        .wait()
        .await;
    Ok(())
}
