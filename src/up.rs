//! `athanor up`: the embedded deployment in one process.

use std::path::PathBuf;

use anyhow::Context as _;
use athanor_connections::embedded::EmbeddedServer;
use tokio_util::sync::CancellationToken;

use crate::config::AppConfig;

/// How long the embedded nats-server is left running after the aggregator's last
/// acknowledgements, so that it has written them to its store before it is stopped.
const CONSUMER_STATE_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

pub async fn run(
    mut config: AppConfig,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // A bad `[[experiments]]` entry stops `up` before anything starts.
    athanor_workers::experiments(&config.worker, &config.experiments)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    // Held until the worker and aggregator are done; dropping it stops the server.
    let embedded = match &config.nats.url {
        Some(_) => None,
        None => {
            let (bin, store) = (config.nats.server_bin.clone(), data_dir.join("nats"));
            let (sync_always, max_store) = (config.nats.sync_always, config.nats.store_needed());
            // Waits (blocking) until the server listens.
            let server = tokio::task::spawn_blocking(move || {
                EmbeddedServer::start_bounded(&bin, &store, sync_always, max_store)
            })
            .await??;
            config.nats.url = Some(server.url());
            Some(server)
        }
    };
    if config.database.url.is_none() {
        config.database.url = Some(format!(
            "sqlite://{}",
            data_dir.join("athanor.db").display()
        ));
    }
    let db = athanor_connections::db::connect(&config.database).await?;
    crate::migrate(&db).await?;
    let url = config.nats.url().to_string();
    // Stopping order: the worker first (its final batches reach JetStream), then the
    // aggregator (after it has stored what is in flight) and the gateway, then NATS.
    let rest_stop = CancellationToken::new();
    config.aggregator.retention = config.database.retention;
    let aggregator = athanor_aggregator::Aggregator::start(
        config.aggregator.clone(),
        config.nats.clone(),
        db.clone(),
        rest_stop.clone(),
    )
    .await?;
    let gateway =
        athanor_gateway::Gateway::start(config.gateway, config.nats.clone(), db, rest_stop.clone())
            .await?;
    let http = format!("http://{}", gateway.addr);
    println!("Athanor is up.");
    println!("  NATS:     {url}   (nats --server {url} stream info ATHANOR_RUNS)");
    println!("  database: {}", config.database.url());
    println!("  web UI:   {http}/");
    println!("  API:      {http}/api/experiments");
    println!(
        "  start a run: curl -X POST {http}/api/runs -H 'content-type: application/json' -d '{{\"experiment\":\"sweep\",\"config\":{{\"iterations\":5}}}}'"
    );
    let worker =
        athanor_workers::run(config.worker, &config.experiments, config.nats, shutdown).await;
    // The worker has stopped: its runs ended, their last batches acknowledged by
    // JetStream. Store all of it before stopping the rest (feeds end with the runs').
    let drain = config.aggregator.drain_timeout;
    match aggregator.drain(drain).await {
        Some((0, 0)) => tracing::info!("stopping: every batch is stored"),
        Some((pending, unacked)) => tracing::warn!(
            pending,
            unacked,
            ?drain,
            "stopping with batches not yet stored: they stay in ATHANOR_RUNS and are stored at the next start"
        ),
        None => tracing::warn!(
            ?drain,
            "stopping without knowing whether every batch is stored (NATS does not answer); what is not stays in ATHANOR_RUNS for the next start"
        ),
    }
    rest_stop.cancel();
    aggregator.wait().await;
    let last_acks = tokio::time::Instant::now();
    gateway.wait().await;
    // Stopped, not killed: it writes out the consumer's state. But it writes that state
    // in the background (about every 100 ms), and a stop soon after the last
    // acknowledgements can keep an older one on disk: those batches would be delivered
    // again at the next start (absorbed, but not the clean state we promise). Measured
    // (`nats_keeps_the_last_acknowledgements_when_stopped_after_a_settle` in
    // tests/processes.rs): 3 of 160 stops lost them at once, 0 of 160 after 200 ms.
    if let Some(server) = embedded {
        tokio::time::sleep_until(last_acks + CONSUMER_STATE_SETTLE).await;
        tokio::task::spawn_blocking(move || server.stop()).await?;
    }
    Ok(worker?)
}
