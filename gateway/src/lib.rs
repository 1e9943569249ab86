//! Athanor gateway: the HTTP API under `/api` (experiments, runs, cancel, logs,
//! results). It writes the control plane — a new run's row in `pending` and its request
//! on `ATHANOR_REQUESTS`, cancel keys in `athanor_control` — and reads everything else
//! from the database the aggregator fills. (The live SSE feed and the web UI come next.)

mod api;
mod error;

use std::net::SocketAddr;
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use athanor_schemas::db::DatabaseConfig;
use athanor_schemas::names;
use athanor_schemas::nats::{NatsConfig, NatsError};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, ApiResult};

/// The `[gateway]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where the HTTP server listens.
    pub http_addr: String,
    /// Largest request body accepted (larger: 413).
    pub max_body_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            http_addr: "127.0.0.1:8080".into(),
            max_body_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Db(#[from] athanor_schemas::db::DbError),
    #[error("jetstream: {0}")]
    JetStream(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) db: DatabaseConnection,
    pub(crate) js: jetstream::Context,
    pub(crate) workers: kv::Store,
    pub(crate) control: kv::Store,
    /// `gateway.max_body_bytes`, for the 413 message.
    pub(crate) max_body_bytes: usize,
}

impl AppState {
    pub async fn connect(
        nats: &NatsConfig,
        db: DatabaseConnection,
        max_body_bytes: usize,
    ) -> Result<Self> {
        let js = athanor_schemas::nats::open(nats, "athanor-gateway").await?;
        let workers = js
            .get_key_value(names::WORKERS_BUCKET)
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        let control = js
            .get_key_value(names::CONTROL_BUCKET)
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        Ok(AppState {
            db,
            js,
            workers,
            control,
            max_body_bytes,
        })
    }
}

/// The HTTP routes.
pub fn router(state: AppState, config: &GatewayConfig) -> Router {
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/api/experiments", get(api::experiments))
        .route("/api/runs", get(api::list_runs).post(api::create_run))
        .route("/api/runs/{id}", get(api::get_run))
        .route("/api/runs/{id}/cancel", post(api::cancel_run))
        .route("/api/runs/{id}/logs", get(api::logs))
        .route("/api/runs/{id}/logs.txt", get(api::logs_txt))
        .route("/api/runs/{id}/results", get(api::results))
        .fallback(api::no_route)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(Arc::new(state))
}

/// A gateway bound to its address, serving until shutdown.
pub struct Gateway {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    pub async fn start(
        config: GatewayConfig,
        nats: NatsConfig,
        db: DatabaseConnection,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let state = AppState::connect(&nats, db, config.max_body_bytes).await?;
        let listener = tokio::net::TcpListener::bind(&config.http_addr)
            .await
            .map_err(|source| Error::Listen {
                addr: config.http_addr.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.http_addr.clone(),
            source,
        })?;
        let app = router(state, &config);
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
            {
                tracing::error!(%error, "HTTP server failed");
            }
        });
        tracing::info!(%addr, "gateway listening");
        Ok(Gateway { addr, task })
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Runs a gateway until `shutdown` is cancelled.
pub async fn run(
    config: GatewayConfig,
    database: DatabaseConfig,
    nats: NatsConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let db = athanor_schemas::db::connect(&database).await?;
    Gateway::start(config, nats, db, shutdown)
        .await?
        .wait()
        .await;
    Ok(())
}
