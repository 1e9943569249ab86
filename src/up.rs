//! `athanor up`: the embedded deployment in one process.

use std::path::PathBuf;

use anyhow::Context as _;
use athanor_schemas::nats::EmbeddedServer;
use tokio_util::sync::CancellationToken;

use crate::config::AppConfig;

pub async fn run(
    mut config: AppConfig,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    // Held until the worker has published its final batches; dropping it stops the server.
    let embedded = match &config.nats.url {
        Some(_) => None,
        None => {
            let server = EmbeddedServer::start(&config.nats.server_bin, &data_dir.join("nats"))?;
            config.nats.url = Some(server.url());
            Some(server)
        }
    };
    let url = config.nats.url().to_string();
    println!("Athanor is up. NATS: {url}");
    println!("  inspect: nats --server {url} stream info ATHANOR_RUNS");
    println!("  request a run: nats --server {url} pub athanor.request.sweep '{{\"run_id\":\"demo-1\",\"experiment\":\"sweep\",\"config\":{{\"iterations\":5}},\"requested_at\":0}}'");
    athanor_workers::run(config.worker, config.nats, shutdown).await?;
    drop(embedded);
    Ok(())
}
