//! The `athanor` binary: parses arguments, loads the configuration and calls the
//! crates' `run(config, shutdown)` entry points. Nothing else lives here.

mod client;
mod config;
mod up;
mod validate;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "athanor", version, about = "A live experiment harness")]
struct Cli {
    /// Configuration file (default: ./athanor.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process on the embedded defaults: spawns nats-server (unless
    /// nats.url is set) with its store under the data directory, migrates the
    /// database (SQLite at <data-dir>/athanor.db unless database.url is set), and runs
    /// the gateway, an aggregator and a worker.
    Up {
        /// Where the embedded nats-server keeps its store, and the SQLite database.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Where the HTTP API listens (default: gateway.http_addr, 127.0.0.1:8080).
        #[arg(long)]
        http_addr: Option<String>,
    },
    /// A worker: runs the experiments requested on ATHANOR_REQUESTS.
    Worker {
        #[command(flatten)]
        metrics: MetricsAddr,
    },
    /// An aggregator: persists run batches from ATHANOR_RUNS into the database.
    Aggregator {
        #[command(flatten)]
        metrics: MetricsAddr,
    },
    /// A gateway: the HTTP API, the web UI, the live feeds and /metrics.
    Gateway,
    /// Applies the database migrations, declares the NATS streams and buckets, and exits.
    Migrate,
    /// Starts a run of an experiment (prints its id; with --follow, its live log).
    Run {
        experiment: String,
        /// A config field: `-c key=value` (value as JSON when it parses, else text).
        #[arg(short = 'c', long = "config-field", value_name = "KEY=VALUE")]
        fields: Vec<String>,
        /// Print the run's log live, with a progress bar, and its results; exit 0 when
        /// it completed, 1 failed, 3 cancelled, 4 lost.
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        gateway: GatewayUrl,
    },
    /// Prints a run's log (with --follow: then live, until the run ends).
    Logs {
        run_id: String,
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        gateway: GatewayUrl,
    },
    /// Lists runs, newest first.
    Runs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        experiment: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u64,
        #[command(flatten)]
        gateway: GatewayUrl,
    },
    /// Prints each metric of a run: points, last value, minimum, maximum (with --follow:
    /// again as they change, until the run ends).
    Metrics {
        run_id: String,
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        gateway: GatewayUrl,
    },
    /// Deletes finished runs with their logs, results and metrics (a pending or running
    /// one is refused: cancel it first).
    Rm {
        #[arg(required = true)]
        run_ids: Vec<String>,
        #[command(flatten)]
        gateway: GatewayUrl,
    },
    /// Lists the experiments live workers host, with their config fields.
    Experiments {
        #[command(flatten)]
        gateway: GatewayUrl,
    },
    /// Serves the MCP tools (the gateway's /mcp) on stdin/stdout, for MCP clients that
    /// launch a process; the tools call the gateway at --url with --token.
    Mcp {
        #[command(flatten)]
        gateway: GatewayUrl,
    },
    /// The configuration (defaults, then the file, then ATHANOR__* variables).
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Prints the effective configuration as TOML (secrets masked), or each setting
    /// that is wrong with what is allowed (exit status 2).
    Check,
}

#[derive(clap::Args)]
struct MetricsAddr {
    /// Serve Prometheus metrics at http://<HOST:PORT>/metrics (default: metrics.addr;
    /// off when neither is set).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
}

#[derive(clap::Args)]
struct GatewayUrl {
    /// The gateway (default: http://<gateway.http_addr>, i.e. the local `athanor up`).
    #[arg(long, env = "ATHANOR_URL")]
    url: Option<String>,
    /// The gateway's API token, when it requires one (`gateway.api_token`).
    #[arg(long, env = "ATHANOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl GatewayUrl {
    fn client(
        &self,
        config: &config::AppConfig,
    ) -> Result<athanor_client::Client, client::Failure> {
        let url = self
            .url
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.gateway.http_addr));
        client::connect(&url, self.token.as_deref())
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match config::load(cli.config.as_deref()) {
        Ok(mut config) => {
            if let Command::Worker { metrics } | Command::Aggregator { metrics } = &cli.command {
                if let Some(addr) = &metrics.metrics_addr {
                    config.metrics.addr = Some(addr.clone());
                }
            }
            config
        }
        Err(error) => {
            eprintln!("athanor: {error:#}");
            std::process::exit(validate::EXIT_STATUS);
        }
    };
    let problems = validate::check(&config);
    if let Command::Config {
        action: ConfigAction::Check,
    } = cli.command
    {
        if problems.is_empty() {
            print!("{}", config::effective(&config)?);
            return Ok(());
        }
    }
    if !problems.is_empty() {
        eprintln!("athanor: invalid configuration:");
        for problem in &problems {
            eprintln!("  {problem}");
        }
        std::process::exit(validate::EXIT_STATUS);
    }
    init_logging(&config.log);
    raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        if let (
            Some(addr),
            Command::Up { .. }
            | Command::Worker { .. }
            | Command::Aggregator { .. }
            | Command::Gateway,
        ) = (&config.metrics.addr, &cli.command)
        {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on metrics.addr {addr}"))?;
            tokio::spawn(athanor_connections::prometheus::serve(
                listener,
                shutdown.clone(),
            ));
        }
        let outcome = match &cli.command {
            Command::Run {
                experiment,
                fields,
                follow,
                gateway,
            } => Some(
                async {
                    let api = gateway.client(&config)?;
                    client::run(&api, experiment, fields, *follow, shutdown.clone()).await
                }
                .await,
            ),
            Command::Logs {
                run_id,
                follow,
                gateway,
            } => Some(
                async {
                    let api = gateway.client(&config)?;
                    client::logs(&api, run_id, *follow, shutdown.clone()).await
                }
                .await,
            ),
            Command::Runs {
                status,
                experiment,
                limit,
                gateway,
            } => Some(
                async {
                    let api = gateway.client(&config)?;
                    client::runs(&api, status.as_deref(), experiment.as_deref(), *limit).await
                }
                .await,
            ),
            Command::Metrics {
                run_id,
                follow,
                gateway,
            } => Some(
                async {
                    let api = gateway.client(&config)?;
                    client::metrics(&api, run_id, *follow, shutdown.clone()).await
                }
                .await,
            ),
            Command::Rm { run_ids, gateway } => {
                Some(async { client::rm(&gateway.client(&config)?, run_ids).await }.await)
            }
            Command::Experiments { gateway } => {
                Some(async { client::experiments(&gateway.client(&config)?).await }.await)
            }
            Command::Mcp { gateway } => Some(
                async {
                    let api = gateway.client(&config)?;
                    client::mcp(api).await
                }
                .await,
            ),
            _ => None,
        };
        if let Some(outcome) = outcome {
            let code = match outcome {
                Ok(code) => code,
                Err(failure) => {
                    eprintln!("athanor: {}", failure.message);
                    failure.code
                }
            };
            std::process::exit(code);
        }
        match cli.command {
            Command::Run { .. }
            | Command::Logs { .. }
            | Command::Runs { .. }
            | Command::Metrics { .. }
            | Command::Experiments { .. }
            | Command::Rm { .. }
            | Command::Mcp { .. }
            | Command::Config { .. } => unreachable!("answered above"),
            Command::Up {
                data_dir,
                http_addr,
            } => {
                let mut config = config;
                if let Some(addr) = http_addr {
                    config.gateway.http_addr = addr;
                }
                refused_configuration(up::run(config, data_dir, shutdown).await)
            }
            Command::Gateway => {
                Ok(
                    athanor_gateway::run(config.gateway, config.database, config.nats, shutdown)
                        .await?,
                )
            }
            Command::Worker { .. } => refused_configuration(
                athanor_workers::run(config.worker, &config.experiments, config.nats, shutdown)
                    .await
                    .map_err(anyhow::Error::from),
            ),
            Command::Aggregator { .. } => Ok(athanor_aggregator::run(
                config.aggregator,
                config.database,
                config.nats,
                shutdown,
            )
            .await?),
            Command::Migrate => {
                let db = athanor_connections::db::connect(&config.database).await?;
                migrate(&db).await?;
                println!("migrations applied to {}", config.database.url());
                // The streams and buckets too: with least-privilege users the other
                // components do not declare them (nats.declare_topology = false).
                let nats = athanor_connections::nats::NatsConfig {
                    declare_topology: true,
                    ..config.nats
                };
                athanor_connections::nats::open(&nats, "athanor-migrate").await?;
                println!("NATS streams and buckets declared on {}", nats.url());
                Ok(())
            }
        }
    })
}

/// A worker that refused its configuration once connected (a limit over the server's
/// `max_payload`, an experiment it does not host) exits as a configuration refused at
/// load does: with its message and status 2.
fn refused_configuration(outcome: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(error) = &outcome {
        if error
            .downcast_ref::<athanor_workers::Error>()
            .is_some_and(athanor_workers::Error::is_configuration)
        {
            eprintln!("athanor: invalid configuration: {error}");
            std::process::exit(validate::EXIT_STATUS);
        }
    }
    outcome
}

/// Applies every pending migration.
pub async fn migrate(db: &sea_orm::DatabaseConnection) -> anyhow::Result<()> {
    use athanor_migrations::MigratorTrait;
    athanor_migrations::Migrator::up(db, None).await?;
    Ok(())
}

/// First Ctrl-C (or SIGTERM): orderly shutdown. Second: exit at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    for round in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if round == 0 {
            tracing::info!("shutting down: finishing running runs (signal again to exit at once)");
            shutdown.cancel();
        }
    }
    std::process::exit(130);
}

/// Raises the soft limit of open files to the hard one (often 1 024 against 524 288):
/// every SSE viewer is a socket, and at the soft limit a gateway stops accepting
/// anything, a plain API request included.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return; // unlimited
    };
    if soft >= hard {
        tracing::debug!(open_files = soft, "open-files limit");
        return;
    }
    let raised = rustix::process::Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-files limit"),
        Err(error) => tracing::warn!(soft, hard, %error, "could not raise the open-files limit"),
    }
}

fn init_logging(log: &config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        config::LogFormat::Text => builder.init(),
        config::LogFormat::Json => builder.json().init(),
    }
}
