//! Test support (dev-only): a real `nats-server` per test on a free port with a temp
//! store, killed on drop, and readers that collect what a run put in JetStream.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer};
use athanor_schemas::nats::{connect, ensure_topology, jetstream, EmbeddedServer, NatsConfig};
use athanor_schemas::{names, Batch};
use futures::StreamExt;

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

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn config(&self) -> NatsConfig {
        NatsConfig::for_tests(&self.url())
    }

    /// A client and JetStream context, with the streams and buckets declared.
    pub async fn jetstream(&self) -> jetstream::Context {
        let config = self.config();
        let client = connect(&config, "athanor-test")
            .await
            .expect("connect to the test nats-server");
        let js = jetstream(client, &config);
        ensure_topology(&js, &config)
            .await
            .expect("declare topology");
        js
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
