//! `database.retention`: runs that finished longer ago than the retention are deleted in
//! the background. A run's big tables go first, at most [`CHUNK`] rows per
//! transaction, each transaction taking the write turn like a batch does: the writer
//! storing new batches waits for one chunk at most, never for a whole run of millions
//! of lines. The rest of the run (and its tombstone) then goes in one transaction
//! (`schemas::entities::delete_run`, as `DELETE /api/runs/{id}` does). Several
//! aggregators may expire the same run at once: every step is idempotent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use athanor_connections::db::{stmt, write_turn};
use athanor_schemas::entities::{run_metric_summaries, runs};
use athanor_schemas::now_micros;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::Shared;

/// Rows deleted per transaction.
pub(crate) const CHUNK: i64 = 10_000;
/// Runs looked up at a time.
const RUNS_PER_ROUND: u64 = 100;

/// Expires runs until shutdown: every quarter of the retention, at most every minute.
pub(crate) async fn run(shared: Arc<Shared>, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = expire(&shared, retention).await {
            warn!(%error, "deleting runs past database.retention failed; trying again later");
        }
    }
}

/// Deletes every finished run older than `retention`.
async fn expire(shared: &Shared, retention: Duration) -> Result<(), DbErr> {
    let cutoff =
        now_micros().saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
    loop {
        let ids: Vec<String> = runs::Entity::find()
            .select_only()
            .column(runs::Column::Id)
            .filter(runs::Column::Status.is_in(["completed", "failed", "cancelled", "lost"]))
            .filter(runs::Column::FinishedAt.lt(cutoff))
            .order_by_asc(runs::Column::FinishedAt)
            .limit(RUNS_PER_ROUND)
            .into_tuple()
            .all(&shared.db)
            .await?;
        if ids.is_empty() {
            return Ok(());
        }
        for id in ids {
            if shared.shutdown.is_cancelled() {
                return Ok(());
            }
            let Some(transactions) = expire_run(shared, &id).await? else {
                return Ok(());
            };
            shared.stats.expired_runs.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .retention_transactions
                .fetch_add(transactions, Ordering::Relaxed);
            info!(run_id = %id, transactions, "run deleted: older than database.retention");
        }
    }
}

/// Deletes one run in chunks; returns the transactions it took (none when shutdown
/// came first).
async fn expire_run(shared: &Shared, run_id: &str) -> Result<Option<u64>, DbErr> {
    let mut transactions = 0;
    transactions += chunked(
        shared,
        "DELETE FROM run_logs WHERE run_id = ? AND seq IN \
         (SELECT seq FROM run_logs WHERE run_id = ? ORDER BY seq LIMIT ?)",
        run_id.into(),
    )
    .await?;
    let series: Vec<i64> = run_metric_summaries::Entity::find()
        .select_only()
        .column(run_metric_summaries::Column::Id)
        .filter(run_metric_summaries::Column::RunId.eq(run_id))
        .into_tuple()
        .all(&shared.db)
        .await?;
    for id in series {
        transactions += chunked(
            shared,
            "DELETE FROM run_metrics WHERE series_id = ? AND step IN \
             (SELECT step FROM run_metrics WHERE series_id = ? ORDER BY step LIMIT ?)",
            id.into(),
        )
        .await?;
        transactions += chunked(
            shared,
            "DELETE FROM run_metric_rollups WHERE series_id = ? AND (level, block) IN \
             (SELECT level, block FROM run_metric_rollups WHERE series_id = ? ORDER BY level, block LIMIT ?)",
            id.into(),
        )
        .await?;
    }
    if shared.shutdown.is_cancelled() {
        // Half deleted: the next start goes on with it.
        return Ok(None);
    }
    // What is left is small: the run's results, summaries, batch keys and row, and its
    // tombstone, together.
    let _turn = write_turn(&shared.db).await;
    let txn = shared.db.begin().await?;
    athanor_schemas::entities::delete_run(&txn, run_id, now_micros()).await?;
    txn.commit().await?;
    Ok(Some(transactions + 1))
}

/// Runs `sql` (two `?` for `key`, one for the chunk size) until it deletes nothing,
/// each time in a transaction of its own under the write turn; returns how many.
async fn chunked(shared: &Shared, sql: &str, key: sea_orm::Value) -> Result<u64, DbErr> {
    let backend = shared.db.get_database_backend();
    let mut transactions = 0;
    loop {
        let deleted = {
            let _turn = write_turn(&shared.db).await;
            shared
                .db
                .execute(stmt(
                    backend,
                    sql,
                    vec![key.clone(), key.clone(), CHUNK.into()],
                ))
                .await?
                .rows_affected()
        };
        transactions += 1;
        if deleted == 0 || shared.shutdown.is_cancelled() {
            return Ok(transactions);
        }
        // Ingest's writer takes the turn between two chunks.
        tokio::task::yield_now().await;
    }
}
