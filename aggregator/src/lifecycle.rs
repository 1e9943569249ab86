//! Runs whose worker disappeared: a `running` run with no final batch, whose worker
//! is no longer in `athanor_workers` (its heartbeat TTL expired) and has been seen
//! missing there for a whole TTL more (so a NATS outage, which expires every
//! registration at once, does not make live runs `lost`), and from which
//! nothing was stored for a TTL, becomes `lost` with a reason. So does such a run
//! whose worker *is* registered but does not list it among the runs it executes: a
//! worker restarted with the same `worker.id` (a deployment that pins ids) is a new
//! process that knows nothing of its predecessor's runs. Its stored output is kept;
//! if its final batch still arrives, the run takes the final status.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use athanor_connections::db::{stmt, write_turn};
use athanor_schemas::events::Lifecycle;
use athanor_schemas::requests::WorkerInfo;
use athanor_schemas::{names, now_micros, RunState};
use futures::TryStreamExt;
use sea_orm::ConnectionTrait;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use crate::{Error, Result, Shared};

/// Announces committed status changes on `athanor.lifecycle.<run_id>` (core NATS: a
/// live hint for run lists; the database stays the record, so a missed one is
/// harmless).
pub(crate) async fn announce(shared: &Shared, changes: &[Lifecycle]) {
    for change in changes {
        let payload = serde_json::to_vec(change).expect("a lifecycle change serialises");
        if let Err(error) = shared
            .js
            .client()
            .publish(names::lifecycle_subject(&change.run_id), payload.into())
            .await
        {
            debug!(%error, run_id = %change.run_id, "announcing a lifecycle change failed");
        }
    }
}

pub(crate) async fn watch_lost(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(shared.config.lost_check_interval);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // When this aggregator first saw each worker missing from `athanor_workers`. A
    // worker counts as gone only once it has been seen missing for a whole TTL: after a
    // NATS outage every registration has expired at once, and live workers re-register
    // on their next heartbeat.
    let mut absent: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = interval.tick() => {
                if let Err(error) = mark_lost(&shared, &mut absent).await {
                    warn!(%error, "checking for lost runs failed");
                }
            }
        }
    }
}

/// What one round of the lost check knows about the workers.
struct Workers {
    bucket: async_nats::jetstream::kv::Store,
    live: HashSet<String>,
    /// The registrations read this round (what each live worker says it executes).
    registered: HashMap<String, Option<WorkerInfo>>,
    /// Workers seen missing this round.
    missing: HashSet<String>,
}

impl Workers {
    /// Why `worker` no longer runs `run_id`, if it does not: its process was replaced
    /// (registered, but not listing the run), or it has been missing from
    /// `athanor_workers` for a whole TTL (tracked in `absent` across rounds).
    async fn gone(
        &mut self,
        worker: &str,
        run_id: &str,
        absent: &mut HashMap<String, Instant>,
        ttl: std::time::Duration,
    ) -> Option<&'static str> {
        if self.live.contains(worker) {
            if !self.registered.contains_key(worker) {
                let info = self
                    .bucket
                    .get(worker)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| serde_json::from_slice::<WorkerInfo>(&v).ok());
                self.registered.insert(worker.to_string(), info);
            }
            // A registration that cannot be read counts as running it: when unsure,
            // a run is not declared lost.
            let replaced = self.registered[worker]
                .as_ref()
                .is_some_and(|info| !info.running.iter().any(|r| r == run_id));
            return replaced.then_some("was restarted; its new process does not run this run");
        }
        self.missing.insert(worker.to_string());
        let missing_for = absent
            .entry(worker.to_string())
            .or_insert_with(Instant::now)
            .elapsed();
        (missing_for >= ttl).then_some("stopped heartbeating")
    }
}

async fn mark_lost(shared: &Shared, absent: &mut HashMap<String, Instant>) -> Result<()> {
    let bucket = athanor_connections::nats::bucket(&shared.js, names::WORKERS_BUCKET).await?;
    let control = athanor_connections::nats::bucket(&shared.js, names::CONTROL_BUCKET).await?;
    let keys = |source: async_nats::Error| Error::Keys {
        bucket: names::WORKERS_BUCKET,
        source,
    };
    let live: HashSet<String> = bucket
        .keys()
        .await
        .map_err(|e| keys(e.into()))?
        .try_collect()
        .await
        .map_err(|e| keys(e.into()))?;
    let mut workers = Workers {
        bucket,
        live,
        registered: HashMap::new(),
        missing: HashSet::new(),
    };
    let ttl = shared.nats.workers_ttl;
    let backend = shared.db.get_database_backend();
    let now = now_micros();
    let quiet_since = now - ttl.as_micros() as i64;
    // Running runs quiet for a TTL, and pending runs older than that: a pending run
    // whose request a worker took (`taken.<run_id>`, put before its ack) and that the
    // worker then dropped (it died before its first batch) is as lost as a running one.
    // Each status on its own, so a queue of pending runs cannot crowd out the check
    // of running ones.
    let mut candidates = Vec::new();
    for status in ["running", "pending"] {
        candidates.extend(
            shared
                .db
                .query_all(stmt(
                    backend,
                    "SELECT id, worker_id, status FROM runs WHERE status = ? \
                     AND final_batches IS NULL AND updated_at < ? ORDER BY updated_at LIMIT 1000",
                    vec![status.into(), quiet_since.into()],
                ))
                .await?,
        );
    }
    for row in candidates {
        let id: String = row.try_get("", "id")?;
        let status: String = row.try_get("", "status")?;
        let worker = if status == "pending" {
            // Not taken (still queued, or no worker hosts it), or taken less than a TTL
            // ago (its worker's registration may not list it yet): nothing to check.
            let Ok(Some(taken)) = control.entry(names::taken_key(&id)).await else {
                continue;
            };
            let taken_at = (taken.created.unix_timestamp_nanos() / 1000) as i64;
            if taken_at > quiet_since {
                continue;
            }
            String::from_utf8_lossy(&taken.value).into_owned()
        } else {
            let worker: Option<String> = row.try_get("", "worker_id")?;
            worker.unwrap_or_default()
        };
        let Some(why) = workers.gone(&worker, &id, absent, ttl).await else {
            continue;
        };
        if lagging(shared, &id).await {
            // JetStream holds output of this run the database does not have yet: the
            // aggregators are behind and the worker may well have finished.
            continue;
        }
        let shown = if worker.is_empty() {
            "(unknown)"
        } else {
            worker.as_str()
        };
        let reason = if status == "pending" {
            format!("worker {shown} took it and {why} before starting it")
        } else {
            format!("worker {shown} {why}")
        };
        let turn = write_turn(&shared.db).await;
        let changed = shared
            .db
            .execute(stmt(
                backend,
                "UPDATE runs SET status = 'lost', error = ?, finished_at = ?, worker_id = COALESCE(worker_id, ?) \
                 WHERE id = ? AND status = ? AND final_batches IS NULL AND updated_at < ?",
                vec![
                    reason.clone().into(),
                    now.into(),
                    Some(worker.clone()).filter(|w| !w.is_empty()).into(),
                    id.clone().into(),
                    status.into(),
                    quiet_since.into(),
                ],
            ))
            .await?
            .rows_affected();
        drop(turn);
        if changed > 0 {
            shared.stats.lost.fetch_add(1, Ordering::Relaxed);
            info!(run_id = %id, %reason, "run lost");
            let change = Lifecycle {
                run_id: id,
                status: RunState::Lost,
                experiment: None,
                error: Some(reason),
                at: now,
            };
            announce(shared, &[change]).await;
        }
    }
    // An entry of a worker with no quiet run left goes.
    absent.retain(|worker, _| workers.missing.contains(worker));
    Ok(())
}

/// Whether the newest message of the run in `ATHANOR_RUNS` is newer than anything
/// stored for it.
async fn lagging(shared: &Shared, run_id: &str) -> bool {
    let newest = match shared.js.get_stream(names::RUNS_STREAM).await {
        Ok(stream) => match stream
            .get_last_raw_message_by_subject(&names::run_subject(run_id))
            .await
        {
            Ok(message) => message.sequence,
            Err(_) => return false,
        },
        Err(_) => return true,
    };
    let stored = shared
        .db
        .query_one(stmt(
            shared.db.get_database_backend(),
            "SELECT MAX(stream_seq) AS s FROM run_batches WHERE run_id = ?",
            vec![run_id.into()],
        ))
        .await
        .ok()
        .flatten()
        .and_then(|row| row.try_get::<Option<i64>>("", "s").ok().flatten());
    stored.is_none_or(|s| (s as u64) < newest)
}
