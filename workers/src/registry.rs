//! The worker's registration in `athanor_workers`: refreshed every heartbeat, so the
//! bucket's TTL removes a worker that died, and whenever a run starts or ends.

use std::sync::Arc;

use async_nats::jetstream::kv;
use tokio::time::MissedTickBehavior;
use tracing::{debug, warn};

use crate::worker::WorkerShared;

pub(crate) async fn heartbeat(worker: Arc<WorkerShared>, bucket: kv::Store) {
    let mut interval = tokio::time::interval(worker.config.heartbeat_interval);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = worker.deregister.cancelled() => break,
            _ = interval.tick() => {}
            _ = worker.runs_changed.notified() => {}
        }
        let info = serde_json::to_vec(&worker.info()).expect("worker info serialises");
        match bucket.put(&worker.id, info.into()).await {
            Ok(revision) => debug!(worker_id = %worker.id, revision, "heartbeat"),
            Err(error) => warn!(worker_id = %worker.id, %error, "heartbeat failed"),
        }
    }
    if let Err(error) = bucket.delete(&worker.id).await {
        warn!(worker_id = %worker.id, %error, "could not deregister; the entry expires with its TTL");
    }
}
