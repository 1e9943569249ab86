//! Keeping `ATHANOR_RUNS` under its bound (`nats.runs_max_bytes`) without losing a
//! batch. The stream refuses new batches when full (discard policy `new`: workers wait
//! and retry), so space has to be made: once the stream holds more than half its bound,
//! the batches every durable consumer has acknowledged — those at or below the lowest
//! ack floor (the aggregators' consumer, and any other: a second deployment feeding
//! another database) — are purged. A batch no durable consumer has taken care of is
//! never touched (a dead-lettered one is acknowledged only once its copy is in
//! `ATHANOR_DLQ`). Hubs that still wanted a purged batch from the stream resync from
//! the database, as they do for one past the stream's age.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use athanor_schemas::names;
use futures::TryStreamExt;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::Shared;

/// How often the stream's size is looked at.
const EVERY: Duration = Duration::from_secs(2);

/// Until shutdown, every [`EVERY`]: purge the stored batches when the stream is over
/// half full.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(error) = reclaim(&shared).await {
            warn!(%error, "could not make room in ATHANOR_RUNS; trying again");
        }
    }
}

async fn reclaim(shared: &Shared) -> Result<(), async_nats::Error> {
    // Fetching the stream reads its info (a second request would read it again).
    let stream = shared.js.get_stream(names::RUNS_STREAM).await?;
    let info = stream.cached_info();
    let (max, bytes, first) = (
        info.config.max_bytes,
        info.state.bytes,
        info.state.first_sequence,
    );
    if max <= 0 || bytes <= max as u64 / 2 {
        return Ok(());
    }
    // The lowest ack floor of the durable consumers (hubs' ordered consumers are
    // ephemeral and acknowledge nothing).
    let mut floor: Option<u64> = None;
    let mut consumers = stream.consumers();
    while let Some(consumer) = consumers.try_next().await? {
        if consumer.config.durable_name.is_some() {
            let seq = consumer.ack_floor.stream_sequence;
            floor = Some(floor.map_or(seq, |f| f.min(seq)));
        }
    }
    let Some(floor) = floor else {
        return Ok(()); // no aggregator has ever consumed: nothing is stored
    };
    if floor < first {
        // Nothing stored that is still there: the aggregators are behind or down.
        return Ok(());
    }
    let purged = stream.purge().sequence(floor + 1).await?.purged;
    shared.stats.purged.fetch_add(purged, Ordering::Relaxed);
    info!(
        purged,
        below_stream_seq = floor + 1,
        bytes,
        max_bytes = max,
        "ATHANOR_RUNS over half full: purged the batches already stored"
    );
    Ok(())
}
