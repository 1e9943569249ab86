//! Athanor gateway: the HTTP API under `/api` (experiments, instances, runs, cancel,
//! logs, results) and the live Server-Sent Events feeds. It writes the control plane —
//! instances, a new run's row in `pending` and its request on `ATHANOR_REQUESTS`, cancel
//! keys in `athanor_control` — and reads history from the database the aggregator
//! fills. Live batches reach viewers straight from JetStream through per-run hubs
//! (`hub.rs`, `sse.rs`), without waiting for the database. At `/mcp` it serves the MCP
//! tools (`athanor-mcp`), which call this same API with the caller's token.

mod api;
mod auth;
mod error;
mod hub;
mod instances;
mod instruments;
mod metrics;
mod openapi;
mod sse;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use athanor_connections::db::DatabaseConfig;
use athanor_connections::nats::{NatsConfig, NatsError};
use athanor_schemas::names;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ApiResult};

/// The `[gateway]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where the HTTP server listens.
    pub http_addr: String,
    /// Largest request body accepted (larger: 413).
    pub max_body_bytes: usize,
    /// SSE keep-alive comment interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Log lines in a feed's `snapshot`.
    pub tail_lines: usize,
    /// A run's hub with no viewers for this long stops following and is evicted.
    #[serde(with = "humantime_serde")]
    pub hub_idle: Duration,
    /// Frames a viewer may fall behind its hub before it is resynced.
    pub hub_buffer: usize,
    /// A viewer reading a batch this much older than the newest one sent (it fell
    /// behind: a slow link, a stalled page) skips ahead: `resync` and a fresh snapshot.
    #[serde(with = "humantime_serde")]
    pub max_viewer_lag: Duration,
    /// …or this many bytes of frames behind the newest.
    pub max_viewer_lag_bytes: u64,
    /// How often a hub with nothing new checks the database for a status the stream
    /// does not carry (`lost`).
    #[serde(with = "humantime_serde")]
    pub status_poll: Duration,
    /// Largest decompressed batch a hub reads; keep it equal to
    /// `aggregator.decode_limit`.
    pub decode_limit: usize,
    /// When set, writes under `/api` need `Authorization: Bearer <api_token>`.
    pub api_token: Option<String>,
    /// With `api_token`: reads and feeds need it too (feeds also take a feed token).
    pub protect_reads: bool,
    /// How long a feed token (`POST …/feed-token`) is accepted.
    #[serde(with = "humantime_serde")]
    pub feed_token_ttl: Duration,
    /// Origins allowed to call the API from a browser (CORS); empty: same origin only.
    pub cors_origins: Vec<String>,
    /// Live feeds (SSE viewers) served at once; a feed over it gets 503 with
    /// `Retry-After`. Lowered at start to leave 256 of the process's open-files limit
    /// to API requests, the database and NATS.
    pub max_viewers: usize,
    /// A connection that has not sent a whole request head within this is closed
    /// (a client trickling headers would otherwise hold a socket forever).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Host names (besides loopback ones) a gateway listening on loopback without an
    /// API token answers under `/api`: it refuses any other `Host`, so a web page that
    /// points a name of its own at 127.0.0.1 (DNS rebinding) cannot use the API.
    pub allowed_hosts: Vec<String>,
    /// Run output waiting this long with no acknowledgement from an aggregator (its
    /// database full or down, the aggregators stopped) makes `/readyz` answer 503 and
    /// the UI show a warning.
    #[serde(with = "humantime_serde")]
    pub storage_stall: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            http_addr: "127.0.0.1:8080".into(),
            max_body_bytes: 1 << 20,
            keep_alive: Duration::from_secs(15),
            tail_lines: 1000,
            hub_idle: Duration::from_secs(30),
            hub_buffer: 1024,
            max_viewer_lag: Duration::from_secs(5),
            max_viewer_lag_bytes: 8 << 20,
            status_poll: Duration::from_secs(2),
            decode_limit: athanor_schemas::DEFAULT_DECODE_LIMIT,
            api_token: None,
            protect_reads: false,
            feed_token_ttl: Duration::from_secs(300),
            cors_origins: Vec::new(),
            max_viewers: 10_000,
            header_read_timeout: Duration::from_secs(10),
            allowed_hosts: Vec::new(),
            storage_stall: Duration::from_secs(30),
        }
    }
}

impl GatewayConfig {
    /// Port 0 and short intervals; viewers skip ahead only when far behind (a loaded
    /// test machine is slow; the tests of skipping ahead set their own bounds).
    pub fn for_tests() -> Self {
        GatewayConfig {
            http_addr: "127.0.0.1:0".into(),
            keep_alive: Duration::from_secs(1),
            hub_idle: Duration::from_secs(2),
            status_poll: Duration::from_millis(500),
            max_viewer_lag: Duration::from_secs(60),
            max_viewer_lag_bytes: 1 << 30,
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
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: &'static str,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot serve MCP: {0}")]
    Mcp(String),
    #[error("cannot start the hubs' thread: {0}")]
    Follower(String),
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
    /// Per-run hubs of the live feeds.
    pub(crate) hubs: Arc<hub::Hubs>,
    /// Lifecycle changes relayed from NATS to `/api/events` viewers.
    pub(crate) lifecycle: tokio::sync::broadcast::Sender<Arc<hub::Frame>>,
    pub(crate) auth: Arc<auth::Auth>,
    /// `gateway.storage_stall`.
    pub(crate) storage_stall: Duration,
}

impl AppState {
    pub async fn connect(
        nats: &NatsConfig,
        db: DatabaseConnection,
        config: &GatewayConfig,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let js = athanor_connections::nats::open(nats, "athanor-gateway").await?;
        let subscriber = js
            .client()
            .subscribe(names::LIFECYCLE_SUBJECTS)
            .await
            .map_err(|source| Error::Subscribe {
                subject: names::LIFECYCLE_SUBJECTS,
                source,
            })?;
        let workers = athanor_connections::nats::bucket(&js, names::WORKERS_BUCKET).await?;
        let control = athanor_connections::nats::bucket(&js, names::CONTROL_BUCKET).await?;
        let follower = hub::Follower::start(nats).await?;
        let hubs = hub::Hubs::new(db.clone(), js.clone(), follower, config.clone(), shutdown);
        instruments::export_feeds(&hubs);
        // Bounded: a lifecycle viewer that lags is told to reload.
        let (lifecycle, _) = tokio::sync::broadcast::channel(1024);
        hubs.tasks.spawn(sse::relay_lifecycle(
            hubs.clone(),
            subscriber,
            lifecycle.clone(),
        ));
        Ok(AppState {
            db,
            js,
            workers,
            control,
            max_body_bytes: config.max_body_bytes,
            storage_stall: config.storage_stall,
            hubs,
            lifecycle,
            auth: Arc::new(
                auth::Auth::new(
                    config.api_token.clone(),
                    config.protect_reads,
                    config.feed_token_ttl,
                )
                .with_hosts(
                    listens_on_loopback(&config.http_addr),
                    &config.allowed_hosts,
                )
                .with_origins(&config.cors_origins),
            ),
        })
    }
}

/// Every route, with its description: the path and method of each come from the
/// handler's `#[utoipa::path]`, so the router and the document cannot disagree. One
/// `routes!` per path.
fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(ui::index))
        .routes(routes!(ui::compare))
        .routes(routes!(ui::file))
        .routes(routes!(api::healthz))
        .routes(routes!(api::readyz))
        .routes(routes!(api::openapi))
        .routes(routes!(api::stats))
        .routes(routes!(api::experiments))
        .routes(routes!(api::validate_config))
        .routes(routes!(instances::list, instances::create))
        .routes(routes!(
            instances::get,
            instances::update,
            instances::delete
        ))
        .routes(routes!(instances::start_run_of))
        .routes(routes!(sse::lifecycle_events))
        .routes(routes!(auth::lifecycle_feed_token))
        .routes(routes!(auth::run_feed_token))
        .routes(routes!(api::list_runs, api::create_run))
        .routes(routes!(api::get_run, api::delete_run))
        .routes(routes!(sse::run_events))
        .routes(routes!(api::cancel_run))
        .routes(routes!(api::logs))
        .routes(routes!(api::logs_txt))
        .routes(routes!(api::results))
        .routes(routes!(metrics::list))
        .routes(routes!(metrics::one))
        .routes(routes!(metrics::compare))
}

/// The OpenAPI document of every route, as served at `/api/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = routes().into_openapi();
    openapi::guarded(&mut doc);
    openapi::optional_bodies(&mut doc);
    doc
}

/// The HTTP routes.
pub fn router(state: AppState, config: &GatewayConfig) -> Router {
    let state = Arc::new(state);
    let (router, _) = routes().split_for_parts();
    let router = router
        .route(
            "/metrics",
            axum::routing::get(instruments::render).head(instruments::render),
        )
        .fallback(api::no_route)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(axum::middleware::from_fn(auth::json_bodies_only))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::same_site_changes,
        ))
        .layer(axum::middleware::from_fn(auth::no_nul_characters))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::known_hosts_only,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ));
    let router = match cors(&config.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// Serves `app` on `listener` until shutdown, then lets each connection finish its
/// response (feeds end at shutdown). Each connection gets `header_read_timeout` to send
/// a request head. Every connection shares the one router (cloning it is a reference
/// count; building it per connection held ~10 KiB per SSE viewer, measured).
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    // Out of file descriptors (EMFILE) or a connection reset while
                    // queued: wait a moment rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Events are small writes that must go out at once, not wait for an ack.
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Whether `http_addr` (`127.0.0.1:8080`, `[::1]:0`, `localhost:8080`) is a loopback
/// address.
fn listens_on_loopback(http_addr: &str) -> bool {
    match http_addr.parse::<SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => http_addr
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    }
}

/// CORS for the configured origins (none: no CORS headers, same origin only).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderValue, Method};
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([header::HeaderName::from_static(sse::KEEP_ALIVE_HEADER)])
            .max_age(Duration::from_secs(600)),
    )
}

/// A gateway bound to its address, serving until shutdown.
pub struct Gateway {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// The hubs' and the lifecycle relay's tasks.
    tasks: tokio_util::task::TaskTracker,
}

impl Gateway {
    pub async fn start(
        config: GatewayConfig,
        nats: NatsConfig,
        db: DatabaseConnection,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let state = AppState::connect(&nats, db, &config, shutdown.clone()).await?;
        let tasks = state.hubs.tasks.clone();
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
        let mcp = athanor_mcp::http_service(
            &format!("http://{}", own_address(addr)),
            &config.cors_origins,
            addr.ip().is_loopback(),
            config.max_body_bytes,
            shutdown.clone(),
        )
        .map_err(Error::Mcp)?;
        let app = router(state.clone(), &config)
            .merge(
                Router::new()
                    .route_service("/mcp", mcp)
                    .layer(axum::middleware::from_fn_with_state(
                        Arc::new(state),
                        auth::authorize_mcp,
                    ))
                    .layer(axum::middleware::map_response(mcp_refusal_as_json)),
            )
            .layer(axum::middleware::from_fn(instruments::http));
        let task = tokio::spawn(serve(listener, app, config.header_read_timeout, shutdown));
        tracing::info!(%addr, "gateway listening");
        Ok(Gateway { addr, task, tasks })
    }

    /// Waits until shutdown has stopped the server (each connection's response
    /// finished, feeds ended) and every background task.
    pub async fn wait(self) {
        let _ = self.task.await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The MCP transport's own refusals (a forbidden `Origin` or `Host`, a wrong media
/// type, an unknown session, a body too large) come as plain text: made JSON-RPC error
/// bodies, with their status, like every other refusal of the gateway.
async fn mcp_refusal_as_json(response: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let refused = response.status().is_client_error() || response.status().is_server_error();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !refused || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&text).trim().to_string();
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {
            "code": -32600,
            "message": if message.is_empty() { parts.status.to_string() } else { message },
        },
    });
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.insert(
        CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    axum::response::Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// Where this process reaches its own listener: the bound address, or loopback when it
/// listens on every address.
fn own_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// Runs a gateway until `shutdown` is cancelled.
pub async fn run(
    config: GatewayConfig,
    database: DatabaseConfig,
    nats: NatsConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let db = athanor_connections::db::connect(&database).await?;
    Gateway::start(config, nats, db, shutdown)
        .await?
        .wait()
        .await;
    Ok(())
}
