//! How every component talks to NATS: the `[nats]` config section, connecting, and
//! declaring the streams and buckets of the design.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use athanor_schemas::names;
use serde::{Deserialize, Serialize};

use crate::retry::Backoff;

/// The `[nats]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. `athanor up` spawns its own server when unset;
    /// the other commands then use `nats://127.0.0.1:4222`.
    pub url: Option<String>,
    /// The `nats-server` binary `athanor up` spawns: a path, or a name looked up on
    /// `PATH` (the first one that is at least 2.11 wins).
    pub server_bin: String,
    /// The server `athanor up` spawns fsyncs every JetStream write
    /// (`sync_interval: always`), so an acknowledged batch survives a power loss; off,
    /// it syncs every 2 minutes (NATS's default), and a power cut can lose what it
    /// acknowledged since. A server of your own: set it in its configuration (see
    /// `deploy/nats-server.conf`).
    pub sync_always: bool,
    /// JetStream replicas of every stream and bucket (3 in a cluster).
    pub replicas: usize,
    /// How long `ATHANOR_RUNS` keeps batches.
    #[serde(with = "humantime_serde")]
    pub runs_max_age: Duration,
    /// The most bytes `ATHANOR_RUNS` holds. Over half of it, the aggregator purges the
    /// batches it has stored; full (batches not yet stored: the aggregators are down or
    /// behind), workers wait to publish (nothing is dropped) and `/readyz` says so.
    pub runs_max_bytes: u64,
    /// Broker-side deduplication window of `ATHANOR_RUNS` and `ATHANOR_REQUESTS`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// A worker that has not heartbeated for this long disappears from `athanor_workers`.
    #[serde(with = "humantime_serde")]
    pub workers_ttl: Duration,
    /// Timeout of JetStream API calls and publish acks.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Create or update the streams and buckets at start. Turn off for components that
    /// run with least-privilege credentials; `athanor migrate` declares them.
    pub declare_topology: bool,
    /// User and password authentication.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// A file holding an NKey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and NKey seed, decentralized auth).
    pub creds_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: None,
            server_bin: "nats-server".into(),
            sync_always: true,
            replicas: 1,
            runs_max_age: Duration::from_secs(7 * 24 * 3600),
            runs_max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(120),
            workers_ttl: Duration::from_secs(15),
            request_timeout: Duration::from_secs(5),
            declare_topology: true,
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
        }
    }
}

impl NatsConfig {
    pub const DEFAULT_URL: &'static str = "nats://127.0.0.1:4222";

    /// Short timeouts for tests.
    pub fn for_tests(url: &str) -> Self {
        NatsConfig {
            url: Some(url.into()),
            workers_ttl: Duration::from_secs(3),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        }
    }

    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or(Self::DEFAULT_URL)
    }

    /// The JetStream file store every stream and bucket may fill together: what an
    /// embedded server is given (`max_file_store`), so run output can never take the
    /// space registrations, requests and cancels need.
    pub fn store_needed(&self) -> u64 {
        self.runs_max_bytes + OTHER_STREAMS_MAX_BYTES + STORE_SLACK
    }
}

/// The bounds of the streams and buckets besides `ATHANOR_RUNS`: each reserves its
/// space in the server's store, so none can be starved by another.
const REQUESTS_MAX_BYTES: i64 = 64 << 20;
const DLQ_MAX_BYTES: i64 = 256 << 20;
const WORKERS_MAX_BYTES: i64 = 16 << 20;
/// Cancels and `taken.<run_id>` (one per run, kept 7 days): ~2 million runs a week.
const CONTROL_MAX_BYTES: i64 = 256 << 20;
const OTHER_STREAMS_MAX_BYTES: u64 =
    (REQUESTS_MAX_BYTES + DLQ_MAX_BYTES + WORKERS_MAX_BYTES + CONTROL_MAX_BYTES) as u64;
/// Room beyond the streams' bounds: consumers' state, and blocks not yet compacted.
const STORE_SLACK: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot declare {what}: {source}")]
    Declare {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot open the {bucket} bucket: {source}")]
    Bucket {
        bucket: &'static str,
        source: async_nats::jetstream::context::KeyValueError,
    },
    #[error("NATS credentials: cannot use {path}: {source}")]
    CredentialsFile {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("NATS credentials: nats.tls_cert_file and nats.tls_key_file go together")]
    HalfAClientCertificate,
}

/// The authentication and TLS options of `config`.
async fn secured(config: &NatsConfig) -> Result<async_nats::ConnectOptions, NatsError> {
    let unusable = |path: &Path, source: Box<dyn std::error::Error + Send + Sync>| {
        NatsError::CredentialsFile {
            path: path.to_path_buf(),
            source,
        }
    };
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| unusable(path, e.into()))
    };
    let mut options = match (&config.creds_file, &config.nkey_seed_file) {
        (Some(creds), _) => async_nats::ConnectOptions::with_credentials_file(creds)
            .await
            .map_err(|e| unusable(creds, e.into()))?,
        (None, Some(seed)) => async_nats::ConnectOptions::with_nkey(read(seed)?),
        (None, None) => async_nats::ConnectOptions::new(),
    };
    match (&config.user, &config.password, &config.token) {
        (Some(user), password, _) => {
            options = options.user_and_password(user.clone(), password.clone().unwrap_or_default())
        }
        (None, _, Some(token)) => options = options.token(token.clone()),
        _ => {}
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone())
        }
        (None, None) => {}
        _ => return Err(NatsError::HalfAClientCertificate),
    }
    Ok(options.require_tls(config.tls_required))
}

/// Connects with unlimited reconnects: a worker outlives NATS restarts.
pub async fn connect(config: &NatsConfig, name: &str) -> Result<async_nats::Client, NatsError> {
    let url = config.url();
    secured(config)
        .await?
        .name(name)
        .request_timeout(Some(config.request_timeout))
        // `attempts` counts from 1 for the first reconnect; jittered, so the clients
        // that lost a restarting server do not all knock at once.
        .reconnect_delay_callback(|attempts| {
            Backoff::RECONNECT.delay(u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX))
        })
        // A comma-separated list: every server of a cluster, tried in turn.
        .connect(
            url.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>(),
        )
        .await
        .map_err(|source| NatsError::Connect {
            url: url.into(),
            source,
        })
}

/// A JetStream context whose acks time out after the configured request timeout.
pub fn jetstream(client: async_nats::Client, config: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .build(client)
}

/// Connects and returns a JetStream context over that connection, with every stream
/// and bucket declared: how each component opens NATS at start.
pub async fn open(config: &NatsConfig, name: &str) -> Result<jetstream::Context, NatsError> {
    let js = jetstream(connect(config, name).await?, config);
    if config.declare_topology {
        ensure_topology(&js, config).await?;
    }
    Ok(js)
}

/// One of the design's buckets (declared by [`ensure_topology`]).
pub async fn bucket(js: &jetstream::Context, name: &'static str) -> Result<kv::Store, NatsError> {
    js.get_key_value(name)
        .await
        .map_err(|source| NatsError::Bucket {
            bucket: name,
            source,
        })
}

/// Creates, or updates to the design's settings, every stream and bucket. Idempotent:
/// every component calls it at start.
pub async fn ensure_topology(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<(), NatsError> {
    let streams = [
        stream::Config {
            name: names::RUNS_STREAM.into(),
            description: Some("Athanor run output: one zstd batch per run per flush".into()),
            subjects: vec![names::RUNS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: config.runs_max_age,
            max_bytes: i64::try_from(config.runs_max_bytes).unwrap_or(i64::MAX),
            // Full: a publish is refused (the worker retries, its run waits), never an
            // unstored batch dropped to make room.
            discard: stream::DiscardPolicy::New,
            duplicate_window: config.duplicate_window,
            num_replicas: config.replicas,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: names::REQUESTS_STREAM.into(),
            description: Some("Athanor run requests, one work queue per experiment".into()),
            subjects: vec![names::REQUESTS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_bytes: REQUESTS_MAX_BYTES,
            discard: stream::DiscardPolicy::New,
            duplicate_window: config.duplicate_window,
            num_replicas: config.replicas,
            ..Default::default()
        },
        stream::Config {
            name: names::DLQ_STREAM.into(),
            description: Some(
                "Athanor batches that could not be decoded or stored, with the reason".into(),
            ),
            subjects: vec![names::DLQ_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: DLQ_MAX_BYTES,
            // Full: the copy is refused and the original stays unacknowledged in
            // ATHANOR_RUNS (so it is not purged), never an older dead letter dropped.
            discard: stream::DiscardPolicy::New,
            num_replicas: config.replicas,
            ..Default::default()
        },
    ];
    for s in streams {
        let what = format!("stream {}", s.name);
        js.create_or_update_stream(s)
            .await
            .map_err(|e| NatsError::Declare {
                what,
                source: e.into(),
            })?;
    }
    let buckets = [
        kv::Config {
            bucket: names::WORKERS_BUCKET.into(),
            description: "Athanor live workers (entries expire when heartbeats stop)".into(),
            history: 1,
            max_age: config.workers_ttl,
            max_bytes: WORKERS_MAX_BYTES,
            num_replicas: config.replicas,
            ..Default::default()
        },
        kv::Config {
            bucket: names::CONTROL_BUCKET.into(),
            description: "Athanor control requests: cancel.<run_id>".into(),
            history: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: CONTROL_MAX_BYTES,
            num_replicas: config.replicas,
            ..Default::default()
        },
    ];
    for b in buckets {
        let what = format!("bucket {}", b.bucket);
        js.create_or_update_key_value(b)
            .await
            .map_err(|e| NatsError::Declare {
                what,
                source: e.into(),
            })?;
    }
    Ok(())
}
