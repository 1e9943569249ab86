//! Test support (dev-only): a real `nats-server` per test on a free port with a temp
//! store, killed on drop, and readers that collect what a run put in JetStream.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer};
use athanor_connections::embedded::EmbeddedServer;
use athanor_connections::nats::NatsConfig;
use athanor_schemas::{names, Batch};
use futures::StreamExt;

pub mod lazyfs;
pub mod tmpfs;

/// A nats-server of our own, and its store directory (removed on drop).
pub struct TestNats {
    pub server: EmbeddedServer,
    _dir: tempfile::TempDir,
}

impl TestNats {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `sync_always`, JetStream fsyncs every write (for crash tests).
    pub fn start_with(sync_always: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = EmbeddedServer::start_with(&server_bin(), dir.path(), sync_always)
            .expect("start nats-server");
        TestNats { server, _dir: dir }
    }

    /// With `extra_config` appended to the server's configuration file.
    pub fn start_configured(extra_config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let server =
            EmbeddedServer::start_configured(&server_bin(), dir.path(), false, extra_config)
                .expect("start nats-server");
        TestNats { server, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn config(&self) -> NatsConfig {
        NatsConfig::for_tests(&self.url())
    }

    /// A client and JetStream context, with the streams and buckets declared.
    pub async fn jetstream(&self) -> jetstream::Context {
        athanor_connections::nats::open(&self.config(), "athanor-test")
            .await
            .expect("connect to the test nats-server")
    }
}

/// A migrated database of its own: a SQLite file in a temp dir, or, when
/// `ATHANOR_TEST_DATABASE_URL` points at a PostgreSQL server, a fresh database there
/// (dropped by [`TestDb::close`]).
pub struct TestDb {
    pub config: athanor_connections::db::DatabaseConfig,
    pub db: sea_orm::DatabaseConnection,
    /// PostgreSQL: the server URL and the database created for this test.
    pg: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new() -> Self {
        use athanor_migrations::MigratorTrait;
        use sea_orm::ConnectionTrait;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = athanor_connections::db::DatabaseConfig {
            busy_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let mut pg = None;
        match std::env::var("ATHANOR_TEST_DATABASE_URL") {
            Ok(server) if !server.is_empty() => {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let name = format!(
                    "athanor_t{}_{}_{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    athanor_schemas::now_micros() % 1_000_000
                );
                let admin =
                    athanor_connections::db::connect(&athanor_connections::db::DatabaseConfig {
                        url: Some(server.clone()),
                        max_connections: 1,
                        ..Default::default()
                    })
                    .await
                    .expect("connect to ATHANOR_TEST_DATABASE_URL");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                let (base, _) = server.rsplit_once('/').expect("a URL with a database");
                config.url = Some(format!("{base}/{name}"));
                pg = Some((server, name));
            }
            _ => {
                config.url = Some(format!(
                    "sqlite://{}",
                    dir.path().join("athanor.db").display()
                ))
            }
        }
        let db = athanor_connections::db::connect(&config)
            .await
            .expect("open the test database");
        athanor_migrations::Migrator::up(&db, None)
            .await
            .expect("migrate");
        TestDb {
            config,
            db,
            pg,
            _dir: dir,
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }

    /// Makes the database refuse writes until [`Outage::end`]: SQLite — another
    /// connection holds the write lock; PostgreSQL — connections to the database are
    /// refused and the open ones terminated.
    pub async fn outage(&self) -> Outage {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        match &self.pg {
            Some((server, name)) => {
                let admin =
                    athanor_connections::db::connect(&athanor_connections::db::DatabaseConfig {
                        url: Some(server.clone()),
                        max_connections: 1,
                        ..Default::default()
                    })
                    .await
                    .expect("admin connection");
                admin
                    .execute_unprepared(&format!(
                        "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"
                    ))
                    .await
                    .unwrap();
                admin
                    .execute_unprepared(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"))
                    .await
                    .unwrap();
                Outage::Postgres {
                    admin,
                    name: name.clone(),
                }
            }
            None => {
                let conn =
                    athanor_connections::db::connect(&athanor_connections::db::DatabaseConfig {
                        max_connections: 1,
                        ..self.config.clone()
                    })
                    .await
                    .unwrap();
                let txn = conn.begin().await.unwrap();
                txn.execute_unprepared("INSERT INTO instances (id, name, experiment, config, created_at, updated_at) VALUES ('lock', 'l', 'e', '{}', 0, 0)")
                    .await
                    .unwrap();
                Outage::Sqlite { _conn: conn, txn }
            }
        }
    }

    /// Closes the pool and drops a PostgreSQL test database.
    pub async fn close(self) {
        use sea_orm::ConnectionTrait;
        let _ = self.db.close().await;
        if let Some((server, name)) = self.pg {
            if let Ok(admin) =
                athanor_connections::db::connect(&athanor_connections::db::DatabaseConfig {
                    url: Some(server),
                    max_connections: 1,
                    ..Default::default()
                })
                .await
            {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    }
}

/// A database made unavailable by [`TestDb::outage`].
pub enum Outage {
    Sqlite {
        _conn: sea_orm::DatabaseConnection,
        txn: sea_orm::DatabaseTransaction,
    },
    Postgres {
        admin: sea_orm::DatabaseConnection,
        name: String,
    },
}

impl Outage {
    pub async fn end(self) {
        use sea_orm::ConnectionTrait;
        match self {
            Outage::Sqlite { txn, .. } => txn.rollback().await.unwrap(),
            Outage::Postgres { admin, name } => {
                admin
                    .execute_unprepared(&format!(
                        "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"
                    ))
                    .await
                    .unwrap();
            }
        }
    }
}

/// Logs of the code under test, shown for failing tests (`RUST_LOG` filters; default warn).
pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The nats-server that `scripts/setup` installs under `.tools/`, else whatever
/// `PATH` holds (checked to be recent enough when started).
pub fn server_bin() -> String {
    if let Ok(bin) = std::env::var("ATHANOR_NATS_SERVER") {
        return bin;
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/nats-server");
    if local.is_file() {
        return local.to_string_lossy().into_owned();
    }
    "nats-server".into()
}

/// Waits until `check` returns `Some`, polling every 20 ms, failing after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything a run put in `ATHANOR_RUNS`.
#[derive(Debug)]
pub struct RunOutput {
    /// Stream messages read, duplicates included.
    pub messages: usize,
    /// Batches deduplicated by `batch_seq`, in `batch_seq` order.
    pub batches: Vec<Batch>,
}

impl RunOutput {
    /// The run's log lines, deduplicated by batch and sorted by `seq`.
    pub fn lines(&self) -> Vec<&athanor_schemas::LogLine> {
        let mut lines: Vec<_> = self.batches.iter().flat_map(|b| &b.logs).collect();
        lines.sort_by_key(|l| l.seq);
        lines
    }

    pub fn final_batch(&self) -> Option<&Batch> {
        self.batches.iter().find(|b| b.final_.is_some())
    }
}

/// Reads a run's batches from the stream until its final batch has been read and
/// nothing is pending, or fails after `timeout`.
pub async fn read_run(
    js: &jetstream::Context,
    run_id: &str,
    timeout: Duration,
) -> anyhow::Result<RunOutput> {
    let stream = js
        .get_stream(names::RUNS_STREAM)
        .await
        .context("get ATHANOR_RUNS")?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names::run_subject(run_id),
            ..Default::default()
        })
        .await
        .context("ordered consumer")?;
    let mut messages = consumer.messages().await.context("consume")?;
    let deadline = Instant::now() + timeout;
    let mut out = RunOutput {
        messages: 0,
        batches: Vec::new(),
    };
    let mut seen = std::collections::BTreeMap::new();
    let mut final_seen = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, messages.next()).await {
            Ok(Some(msg)) => msg.context("message")?,
            Ok(None) => bail!("consumer ended"),
            Err(_) => bail!(
                "timed out reading run {run_id}: {} batches, final seen: {final_seen}",
                seen.len()
            ),
        };
        out.messages += 1;
        let pending = msg.info().map(|i| i.pending).unwrap_or(0);
        let batch = athanor_schemas::decode(&msg.payload, athanor_schemas::DEFAULT_DECODE_LIMIT)?;
        final_seen |= batch.final_.is_some();
        match seen.get(&batch.batch_seq) {
            Some(first) if *first != batch => {
                bail!("two different batches {} of run {run_id}", batch.batch_seq)
            }
            Some(_) => {}
            None => {
                seen.insert(batch.batch_seq, batch);
            }
        }
        if final_seen && pending == 0 {
            break;
        }
    }
    out.batches = seen.into_values().collect();
    Ok(out)
}

/// A run's batches in `ATHANOR_RUNS` so far, by `batch_seq` (a duplicate kept once), and
/// the messages read: up to the stream's last message at the call, or until none has
/// come for 3 s. For a run without a final batch (a killed worker) or one still going.
pub async fn batches_so_far(
    js: &jetstream::Context,
    run_id: &str,
) -> anyhow::Result<(std::collections::BTreeMap<u64, Batch>, usize)> {
    let mut stream = js
        .get_stream(names::RUNS_STREAM)
        .await
        .context("get ATHANOR_RUNS")?;
    let last = stream
        .info()
        .await
        .context("stream info")?
        .state
        .last_sequence;
    let mut messages = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names::run_subject(run_id),
            ..Default::default()
        })
        .await
        .context("ordered consumer")?
        .messages()
        .await
        .context("consume")?;
    let mut batches = std::collections::BTreeMap::new();
    let mut read = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(3), messages.next()).await
    {
        let message = message.context("message")?;
        read += 1;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("message info: {e}"))?;
        let (stream_seq, pending) = (info.stream_sequence, info.pending);
        let batch =
            athanor_schemas::decode(&message.payload, athanor_schemas::DEFAULT_DECODE_LIMIT)?;
        batches.insert(batch.batch_seq, batch);
        if stream_seq >= last || pending == 0 {
            break;
        }
    }
    Ok((batches, read))
}

/// The `n` column of a one-row query, e.g. `SELECT COUNT(*) AS n FROM …`.
pub async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::ConnectionTrait;
    db.query_one(sea_orm::Statement::from_string(
        db.get_database_backend(),
        sql,
    ))
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
    .unwrap_or_else(|| panic!("{sql}: no row"))
    .try_get::<i64>("", "n")
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Resident memory of a process, in KiB (`VmRSS` from `/proc/<pid>/status`).
///
/// Panics when it cannot be read: a memory bound checked against a measurement that
/// did not happen must fail, not pass.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot measure the memory of process {pid}: {e}"));
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line for process {pid} (a zombie?)"))
}
