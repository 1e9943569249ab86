//! Writing decoded batches: many per transaction, each exactly once.
//!
//! A batch is new when its (run_id, batch_seq) row can be inserted into
//! `run_batches`; only then are its lines, metric points, results and counters
//! written. Results and metric points keep the record with the highest `seq` (the
//! rules of points and their summaries are in [`metrics`]), progress the newest
//! report, so the outcome does not depend on delivery order. A run becomes terminal
//! when every batch up to its final one is stored.

mod metrics;
mod pg;

use std::collections::BTreeMap;

use athanor_connections::db::{stmt, stored_text};
use athanor_schemas::events::Lifecycle;
use athanor_schemas::{now_micros, Batch, RunState};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, TransactionTrait, Value,
};

/// A decoded batch and its position in `ATHANOR_RUNS`.
pub struct Incoming {
    pub batch: Batch,
    pub stream_seq: u64,
}

/// What one transaction wrote.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Written {
    pub batches: u64,
    pub duplicates: u64,
    /// Batches of deleted runs (tombstoned in `deleted_runs`), dropped.
    pub of_deleted_runs: u64,
    pub lines: u64,
    /// Metric points (values of metric records) of the new batches.
    pub metrics: u64,
    /// Status changes committed (runs that started, runs that became terminal), to
    /// announce on `athanor.lifecycle.<run_id>` once the transaction is in.
    pub changes: Vec<Lifecycle>,
}

/// Whether a failed transaction would fail again with the same data: a data error
/// (PostgreSQL class 22 or 23; SQLite TOOBIG, CONSTRAINT, MISMATCH). Anything else —
/// connections, locks, timeouts, a database refusing connections — is an outage and is
/// retried: when unsure, retrying loses nothing.
pub fn is_permanent(error: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    let sqlx = match error {
        DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e))
        | DbErr::Conn(RuntimeErr::SqlxError(e)) => e,
        _ => return false,
    };
    let Some(code) = sqlx.as_database_error().and_then(|db| db.code()) else {
        return false;
    };
    if code.len() == 5 {
        // A PostgreSQL SQLSTATE.
        return code.starts_with("22") || code.starts_with("23");
    }
    // A SQLite (extended) result code: the primary code is the low byte.
    code.parse::<u32>()
        .is_ok_and(|n| matches!(n & 0xff, 18..=20))
}

/// PostgreSQL text cannot hold NUL characters: they are stored as U+2400 (␀). JSON
/// values are stored escaped (`\u0000`) and keep them.
fn text(backend: DatabaseBackend, s: String) -> Value {
    stored_text(backend, s).into()
}

fn opt_text(backend: DatabaseBackend, s: Option<String>) -> Value {
    s.map(|s| stored_text(backend, s)).into()
}

/// Bind parameters per multi-row INSERT, under the limits (SQLite 32 766, PostgreSQL
/// 65 535) with room for the values shared by every row.
fn values_per_insert(backend: DatabaseBackend) -> usize {
    match backend {
        DatabaseBackend::Postgres => 50_000,
        _ => 25_000,
    }
}

/// Per-run changes collected from the new batches of one transaction.
#[derive(Default)]
struct RunDelta {
    lines: i64,
    results: i64,
    batches: i64,
    worker_id: Option<String>,
    run: Option<athanor_schemas::RunInfo>,
    progress: Option<athanor_schemas::Progress>,
    final_: Option<(athanor_schemas::Final, Option<athanor_schemas::Status>)>,
}

/// How a transaction writes the bulk of its new batches: their lines and metric points.
/// By default multi-row INSERTs; PostgreSQL's own path (`pg`) overrides both.
pub(crate) trait BulkWrite: ConnectionTrait + Sized {
    /// Writes `lines`, per run; a line already stored is left as it is.
    async fn write_lines(&self, lines: Vec<(String, Vec<LineRow>)>) -> Result<(), DbErr> {
        insert_lines(self, lines).await
    }

    /// Inserts `points` into `run_metrics`, skipping a `(series_id, step)` already
    /// stored; returns how many were inserted.
    async fn insert_points(&self, points: metrics::PointRows) -> Result<u64, DbErr> {
        metrics::insert_points(self, points).await
    }

    /// `insert` (`INSERT INTO <table> (<columns>)`) of `values`, `width` a row (each
    /// column's values of one type), followed by `tail` (an `ON CONFLICT` clause);
    /// returns the rows affected.
    async fn insert_many(
        &self,
        insert: &str,
        width: usize,
        values: Vec<Value>,
        tail: &str,
    ) -> Result<u64, DbErr> {
        insert_values(self, insert, width, values, tail).await
    }
}

impl BulkWrite for sea_orm::DatabaseTransaction {}

/// A line of a new batch, as stored in `run_logs` (the run id aside).
pub(crate) struct LineRow {
    seq: i64,
    ts: i64,
    level: &'static str,
    message: String,
    metadata: Option<String>,
}

/// Multi-row `INSERT … ON CONFLICT DO NOTHING`, the run id bound once per statement.
/// (`WHERE true` tells SQLite's parser that `ON CONFLICT` is the upsert clause, not a
/// join constraint.)
async fn insert_lines(
    txn: &impl ConnectionTrait,
    lines: Vec<(String, Vec<LineRow>)>,
) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    for (run_id, rows) in lines {
        let mut values = Vec::with_capacity(rows.len() * 5);
        for row in rows {
            values.push(row.seq.into());
            values.push(row.ts.into());
            values.push(row.level.into());
            values.push(row.message.into());
            values.push(row.metadata.into());
        }
        insert_rows(
            txn,
            backend,
            "INSERT INTO run_logs (run_id, seq, ts, level, message, metadata) \
             SELECT ?, column1, column2, column3, column4, column5 FROM (VALUES ",
            vec![run_id.into()],
            5,
            values,
            ") AS line WHERE true ON CONFLICT (run_id, seq) DO NOTHING",
        )
        .await?;
    }
    Ok(())
}

/// Whether PostgreSQL's lines go by COPY (`pg.rs`); off, by multi-row INSERT as on
/// SQLite. For the benchmark's side-by-side rows.
pub fn set_postgres_copy(on: bool) {
    pg::COPY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether PostgreSQL's other bulk statements (metric summaries and rollup blocks,
/// results) bind one array per column (`pg.rs`); off, multi-row VALUES as on SQLite.
/// Only on the COPY path: with [`set_postgres_copy`] off they are multi-row VALUES
/// anyway. For the benchmark's side-by-side rows.
pub fn set_postgres_arrays(on: bool) {
    pg::ARRAYS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// One transaction's batches, sorted by run and batch (so concurrent aggregators lock
/// rows in the same order), their metric points collected, sorted and rolled up per run
/// (`metrics::Prepared`): CPU work the consumer does before the transaction, while the
/// previous one writes, instead of between the transaction's statements.
pub struct Prepared {
    incoming: Vec<Incoming>,
    /// By run.
    points: BTreeMap<String, metrics::Prepared>,
}

impl Prepared {
    pub fn new(backend: DatabaseBackend, mut incoming: Vec<Incoming>) -> Self {
        incoming.sort_by(|a, b| {
            (&a.batch.run_id, a.batch.batch_seq).cmp(&(&b.batch.run_id, b.batch.batch_seq))
        });
        let mut runs: Vec<(String, metrics::RunPoints)> = Vec::new();
        for (position, Incoming { batch, .. }) in incoming.iter_mut().enumerate() {
            if batch.metrics.is_empty() {
                continue;
            }
            if runs.last().is_none_or(|(run, _)| *run != batch.run_id) {
                runs.push((batch.run_id.clone(), metrics::RunPoints::default()));
            }
            let run_points = &mut runs.last_mut().expect("pushed above").1;
            run_points.collect(backend, position, std::mem::take(&mut batch.metrics));
        }
        let points = runs
            .into_iter()
            .map(|(run, run_points)| (run, run_points.prepare()))
            .collect();
        Prepared { incoming, points }
    }

    /// Whether any batch holds metric points (whether preparing is worth a thread).
    pub fn worth_a_thread(incoming: &[Incoming]) -> bool {
        incoming.iter().any(|i| !i.batch.metrics.is_empty())
    }
}

/// Writes `incoming` in one transaction.
pub async fn store(db: &DatabaseConnection, incoming: Vec<Incoming>) -> Result<Written, DbErr> {
    store_prepared(db, Prepared::new(db.get_database_backend(), incoming)).await
}

/// Writes `prepared` in one transaction.
pub async fn store_prepared(db: &DatabaseConnection, prepared: Prepared) -> Result<Written, DbErr> {
    let _turn = athanor_connections::db::write_turn(db).await;
    if let Some(pool) = pg::copy_pool(db) {
        return pg::store(pool, prepared).await;
    }
    let txn = db.begin().await?;
    let written = write(&txn, prepared).await?;
    txn.commit().await?;
    Ok(written)
}

/// The body of [`store_prepared`]'s transaction.
async fn write(txn: &impl BulkWrite, prepared: Prepared) -> Result<Written, DbErr> {
    let Prepared {
        incoming,
        points: mut prepared_points,
    } = prepared;
    let backend = txn.get_database_backend();
    let now = now_micros();
    let mut written = Written::default();
    let mut deltas: BTreeMap<String, RunDelta> = BTreeMap::new();
    // Per run (in order): its new lines.
    let mut logs: Vec<(String, Vec<LineRow>)> = Vec::new();
    // Per run with metric points: the positions (in `incoming`) of its new batches.
    let mut new_batches: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    // Newest record per (run, key) in this transaction: one statement may not touch a
    // row twice.
    let mut results: BTreeMap<(String, String), athanor_schemas::ResultRecord> = BTreeMap::new();
    // Runs deleted by a user: their batches, delivered again, must not bring them back.
    let mut deleted: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for (position, Incoming { batch, stream_seq }) in incoming.into_iter().enumerate() {
        let run_id = batch.run_id;
        if deleted.contains(&run_id) {
            written.of_deleted_runs += 1;
            continue;
        }
        if !deltas.contains_key(&run_id) {
            let tombstone = txn
                .query_one(stmt(
                    backend,
                    "SELECT 1 AS deleted FROM deleted_runs WHERE run_id = ?",
                    vec![run_id.clone().into()],
                ))
                .await?;
            if tombstone.is_some() {
                written.of_deleted_runs += 1;
                deleted.insert(run_id);
                continue;
            }
            txn.execute(stmt(
                backend,
                "INSERT INTO runs (id, experiment, config, status, created_at, updated_at, lines, results, batches) \
                 VALUES (?, '', '{}', 'running', ?, ?, 0, 0, 0) ON CONFLICT (id) DO NOTHING",
                vec![run_id.clone().into(), now.into(), now.into()],
            ))
            .await?;
            deltas.insert(run_id.clone(), RunDelta::default());
        }
        let inserted = txn
            .execute(stmt(
                backend,
                // A batch recorded as rejected (a gap) is replaced by a good copy of it.
                "INSERT INTO run_batches (run_id, batch_seq, stream_seq, lines, stored_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (run_id, batch_seq) DO UPDATE SET stream_seq = excluded.stream_seq, \
                 lines = excluded.lines, stored_at = excluded.stored_at, rejected = NULL \
                 WHERE run_batches.rejected IS NOT NULL",
                vec![
                    run_id.clone().into(),
                    (batch.batch_seq as i64).into(),
                    (stream_seq as i64).into(),
                    (batch.logs.len() as i64).into(),
                    now.into(),
                ],
            ))
            .await?
            .rows_affected();
        if inserted == 0 {
            written.duplicates += 1;
            continue;
        }
        written.batches += 1;
        written.lines += batch.logs.len() as u64;
        // A run's first batch carries `run`: it has started.
        if let Some(run) = &batch.run {
            written.changes.push(Lifecycle {
                run_id: run_id.clone(),
                status: RunState::Running,
                experiment: Some(run.experiment.clone()),
                error: None,
                at: run.started_at,
            });
        }
        let delta = deltas.get_mut(&run_id).expect("inserted above");
        delta.batches += 1;
        delta.lines += batch.logs.len() as i64;
        delta.results += batch.results.len() as i64;
        delta.worker_id = Some(batch.worker_id);
        if batch.run.is_some() {
            delta.run = batch.run;
        }
        if let Some(p) = batch.progress {
            if delta.progress.as_ref().is_none_or(|old| old.ts <= p.ts) {
                delta.progress = Some(p);
            }
        }
        if let Some(f) = batch.final_ {
            delta.final_ = Some((f, batch.status));
        }
        if logs.last().is_none_or(|(run, _)| *run != run_id) {
            logs.push((run_id.clone(), Vec::new()));
        }
        let rows = &mut logs.last_mut().expect("pushed above").1;
        rows.reserve(batch.logs.len());
        rows.extend(batch.logs.into_iter().map(|line| LineRow {
            seq: line.seq as i64,
            ts: line.ts,
            level: line.level.as_str(),
            message: stored_text(backend, line.message),
            metadata: line.metadata.map(|m| m.to_string()),
        }));
        if prepared_points.contains_key(&run_id) {
            new_batches
                .entry(run_id.clone())
                .or_default()
                .push(position);
        }
        for record in batch.results {
            athanor_schemas::merge_result(
                &mut results,
                (run_id.clone(), record.key.clone()),
                record,
            );
        }
    }
    txn.write_lines(logs).await?;
    let mut points = Vec::with_capacity(new_batches.len());
    for (run_id, new) in new_batches {
        let run_points = prepared_points
            .remove(&run_id)
            .expect("runs with points only");
        let (run_points, values) = run_points.of_new(&new);
        written.metrics += values;
        points.push((run_id, run_points));
    }
    metrics::write(txn, backend, points).await?;
    let mut values = Vec::with_capacity(results.len() * 5);
    for ((run_id, key), record) in results {
        values.extend([
            run_id.into(),
            text(backend, key),
            record.value.to_string().into(),
            (record.seq as i64).into(),
            record.ts.into(),
        ]);
    }
    txn.insert_many(
        "INSERT INTO run_results (run_id, key, value, seq, ts)",
        5,
        values,
        " ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value, seq = excluded.seq, ts = excluded.ts \
         WHERE excluded.seq > run_results.seq",
    )
    .await?;
    for (run_id, delta) in deltas {
        if delta.batches > 0 {
            if let Some(change) = update_run(txn, backend, &run_id, delta, now).await? {
                written.changes.push(change);
            }
        }
    }
    Ok(written)
}

/// [`BulkWrite::insert_many`] by multi-row INSERTs.
async fn insert_values(
    txn: &impl ConnectionTrait,
    insert: &str,
    width: usize,
    values: Vec<Value>,
    tail: &str,
) -> Result<u64, DbErr> {
    let head = format!("{insert} VALUES ");
    insert_rows(
        txn,
        txn.get_database_backend(),
        &head,
        Vec::new(),
        width,
        values,
        tail,
    )
    .await
}

/// Executes `head (?, …), (?, …) … tail` over `values` (`width` per row), in chunks
/// under the backend's bind-parameter limit; `shared` are bound first in every chunk,
/// for the placeholders in `head`. Returns the rows affected.
async fn insert_rows(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    head: &str,
    shared: Vec<Value>,
    width: usize,
    values: Vec<Value>,
    tail: &str,
) -> Result<u64, DbErr> {
    let mut affected = 0;
    if values.is_empty() {
        return Ok(affected);
    }
    let row = format!("({})", vec!["?"; width].join(", "));
    let per_statement = values_per_insert(backend) / width * width;
    let mut full_sql: Option<String> = None;
    let mut values = values.into_iter().peekable();
    while values.peek().is_some() {
        let mut chunk: Vec<Value> = Vec::with_capacity(shared.len() + per_statement);
        chunk.extend(shared.iter().cloned());
        chunk.extend(values.by_ref().take(per_statement));
        let rows = (chunk.len() - shared.len()) / width;
        let sql = if rows * width == per_statement {
            full_sql
                .get_or_insert_with(|| statement_sql(head, &row, rows, tail))
                .clone()
        } else {
            statement_sql(head, &row, rows, tail)
        };
        affected += txn
            .execute(stmt(backend, &sql, chunk))
            .await?
            .rows_affected();
    }
    Ok(affected)
}

fn statement_sql(head: &str, row: &str, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + rows * (row.len() + 1) + tail.len());
    sql.push_str(head);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(row);
    }
    sql.push_str(tail);
    sql
}

async fn update_run(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    run_id: &str,
    delta: RunDelta,
    now: i64,
) -> Result<Option<Lifecycle>, DbErr> {
    txn.execute(stmt(
        backend,
        "UPDATE runs SET lines = lines + ?, results = results + ?, batches = batches + ?, updated_at = ?, \
         worker_id = COALESCE(?, worker_id), status = CASE WHEN status IN ('pending', 'lost') THEN 'running' ELSE status END \
         WHERE id = ?",
        vec![delta.lines.into(), delta.results.into(), delta.batches.into(), now.into(), delta.worker_id.into(), run_id.into()],
    ))
    .await?;
    if let Some(run) = delta.run {
        txn.execute(stmt(
            backend,
            "UPDATE runs SET experiment = ?, config = ?, instance_id = COALESCE(?, instance_id), started_at = ? WHERE id = ?",
            vec![run.experiment.into(), run.config.to_string().into(), run.instance_id.into(), run.started_at.into(), run_id.into()],
        ))
        .await?;
    }
    if let Some(p) = delta.progress {
        txn.execute(stmt(
            backend,
            "UPDATE runs SET progress_current = ?, progress_total = ?, progress_message = ?, progress_at = ? \
             WHERE id = ? AND (progress_at IS NULL OR progress_at <= ?)",
            vec![(p.current as i64).into(), (p.total as i64).into(), opt_text(backend, p.message), p.ts.into(), run_id.into(), p.ts.into()],
        ))
        .await?;
    }
    if let Some((f, status)) = delta.final_ {
        let (error, at) = status.map_or((None, now), |s| (s.error, s.at));
        txn.execute(stmt(
            backend,
            "UPDATE runs SET final_batches = ?, final_status = ?, final_error = ?, final_at = ? WHERE id = ?",
            vec![(f.batches as i64).into(), f.status.as_str().into(), opt_text(backend, error), at.into(), run_id.into()],
        ))
        .await?;
    }
    advance(txn, backend, run_id, now).await
}

/// A batch the aggregator dead-lettered, as far as its message tells.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub run_id: String,
    pub batch_seq: u64,
    pub stream_seq: u64,
    /// Lines it held, when known (its `Athanor-Lines` header).
    pub lines: Option<u64>,
    /// The run's number of batches, when this was its final batch (`Athanor-Final`).
    pub final_batches: Option<u64>,
    pub reason: String,
}

/// The longest `runs.warning` grows to; later rejections are not appended.
const MAX_WARNING_CHARS: i64 = 2000;

/// Records a dead-lettered batch as a known gap of its run: a `run_batches` row with
/// the reason (so the watermark moves past it and the run can end) and a line in the
/// run's `warning`. A rejected final batch ends the run `failed`, saying why. Returns
/// the run's terminal change, if this made it end. Recording it again does nothing.
pub async fn record_rejected(
    db: &DatabaseConnection,
    rejected: &Rejected,
) -> Result<Option<Lifecycle>, DbErr> {
    let backend = db.get_database_backend();
    let _turn = athanor_connections::db::write_turn(db).await;
    let now = now_micros();
    let run_id = rejected.run_id.as_str();
    let txn = db.begin().await?;
    txn.execute(stmt(
        backend,
        "INSERT INTO runs (id, experiment, config, status, created_at, updated_at, lines, results, batches) \
         VALUES (?, '', '{}', 'running', ?, ?, 0, 0, 0) ON CONFLICT (id) DO NOTHING",
        vec![run_id.into(), now.into(), now.into()],
    ))
    .await?;
    let reason = stored_text(backend, rejected.reason.clone());
    let inserted = txn
        .execute(stmt(
            backend,
            "INSERT INTO run_batches (run_id, batch_seq, stream_seq, lines, stored_at, rejected) VALUES (?, ?, ?, 0, ?, ?) \
             ON CONFLICT (run_id, batch_seq) DO NOTHING",
            vec![
                run_id.into(),
                (rejected.batch_seq as i64).into(),
                (rejected.stream_seq as i64).into(),
                now.into(),
                reason.clone().into(),
            ],
        ))
        .await?
        .rows_affected();
    if inserted == 0 {
        txn.commit().await?;
        return Ok(None);
    }
    let held = rejected.lines.map_or(String::new(), |n| {
        format!(" ({n} {})", if n == 1 { "line" } else { "lines" })
    });
    let note = format!("batch {}{held} was rejected: {reason}", rejected.batch_seq);
    txn.execute(stmt(
        backend,
        "UPDATE runs SET warning = CASE WHEN warning IS NULL THEN ? \
         WHEN length(warning) < ? THEN warning || '; ' || ? ELSE warning END, updated_at = ? WHERE id = ?",
        vec![note.clone().into(), MAX_WARNING_CHARS.into(), note.clone().into(), now.into(), run_id.into()],
    ))
    .await?;
    if let Some(batches) = rejected.final_batches {
        let error = format!("its final {note}");
        txn.execute(stmt(
            backend,
            "UPDATE runs SET final_batches = COALESCE(final_batches, ?), final_status = COALESCE(final_status, 'failed'), \
             final_error = COALESCE(final_error, ?), final_at = COALESCE(final_at, ?) WHERE id = ?",
            vec![(batches as i64).into(), error.into(), now.into(), run_id.into()],
        ))
        .await?;
    }
    let change = advance(&txn, backend, run_id, now).await?;
    txn.commit().await?;
    Ok(change)
}

/// Moves the run's contiguous watermark (`last_batch_seq`, `last_stream_seq`) over the
/// batches stored without a gap, and makes the run terminal once all its batches are in
/// (returning that change).
async fn advance(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    run_id: &str,
    now: i64,
) -> Result<Option<Lifecycle>, DbErr> {
    let row = txn
        .query_one(stmt(
            backend,
            "SELECT last_batch_seq, final_batches, final_status, final_error, final_at, experiment, status \
             FROM runs WHERE id = ?",
            vec![run_id.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("run {run_id}")))?;
    let last: Option<i64> = row.try_get("", "last_batch_seq")?;
    let final_batches: Option<i64> = row.try_get("", "final_batches")?;
    let final_status: Option<String> = row.try_get("", "final_status")?;
    let final_error: Option<String> = row.try_get("", "final_error")?;
    let final_at: Option<i64> = row.try_get("", "final_at")?;
    let experiment: String = row.try_get("", "experiment")?;
    let status: String = row.try_get("", "status")?;
    let following = txn
        .query_all(stmt(
            backend,
            "SELECT batch_seq, stream_seq FROM run_batches WHERE run_id = ? AND batch_seq > ? ORDER BY batch_seq",
            vec![run_id.into(), last.unwrap_or(-1).into()],
        ))
        .await?;
    let mut new_last = last;
    let mut stream_seq = None;
    for r in following {
        let seq: i64 = r.try_get("", "batch_seq")?;
        if seq != new_last.map_or(0, |l| l + 1) {
            break;
        }
        new_last = Some(seq);
        stream_seq = Some(r.try_get::<i64>("", "stream_seq")?);
    }
    if new_last != last {
        txn.execute(stmt(
            backend,
            "UPDATE runs SET last_batch_seq = ?, last_stream_seq = ? WHERE id = ?",
            vec![new_last.into(), stream_seq.into(), run_id.into()],
        ))
        .await?;
    }
    let complete = matches!((new_last, final_batches), (Some(l), Some(n)) if l + 1 == n);
    let open = matches!(status.as_str(), "pending" | "running" | "lost");
    if complete && open {
        let state = match final_status {
            Some(text) => text
                .parse::<RunState>()
                .map_err(|e| DbErr::Custom(e.to_string()))?,
            None => RunState::Completed,
        };
        txn.execute(stmt(
            backend,
            "UPDATE runs SET status = ?, error = final_error, finished_at = COALESCE(final_at, ?) WHERE id = ?",
            vec![state.as_str().into(), now.into(), run_id.into()],
        ))
        .await?;
        return Ok(Some(Lifecycle {
            run_id: run_id.to_string(),
            status: state,
            experiment: Some(experiment),
            error: final_error,
            at: final_at.unwrap_or(now),
        }));
    }
    Ok(None)
}
