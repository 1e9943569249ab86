//! Metric points of one transaction's new batches, and their series' summaries.
//!
//! The CPU work on the points — collecting them with their names interned, sorting by
//! integer keys, one point per step, the rollup blocks they fall in — is done before
//! the transaction ([`RunPoints::prepare`], by the consumer while the previous
//! transaction writes), as if every batch were new; [`Prepared::of_new`] redoes it in
//! the rare transaction where some are not (duplicates). Measured: PostgreSQL points /
//! lines of the same size 0.83–0.87 → 1.03–1.06 with the points' binary COPY
//! (BENCHMARKS.md).
//!
//! A series is a run's metric name: its row in `run_metric_summaries` (made, empty, the
//! first time a transaction meets it) gives the id that keys its points and blocks, so
//! the run and the name are not repeated in every point's key (measured: 0.77 → 0.97
//! of the rate of log lines of the same size on SQLite, 0.73 → 0.89 on PostgreSQL).
//!
//! A point is one `(run, name, step)`: the record with the highest `seq` wins, whatever
//! the delivery order. The points of a run in a transaction are sorted and deduplicated
//! first, before it (one statement may not touch a row twice on PostgreSQL), then
//! inserted with `ON CONFLICT DO NOTHING` (or COPY, see `pg.rs`), counting the rows
//! inserted:
//!
//! * All inserted (the common case: no step seen before): each series' summary is moved
//!   by one upsert of this transaction's points — count added, extremes widened, the
//!   last point (highest step, then seq) and `updated_at` moved only forward.
//! * Fewer inserted (a step repeated from an earlier batch): the points are upserted
//!   again, replacing a stored point only for a higher `seq`, and the summaries of the
//!   run's series in this transaction are recomputed from `run_metrics`. The incremental
//!   upsert runs first all the same: it takes the summary rows' locks, so the recount
//!   (a statement of its own) sees every concurrent transaction that touched them.
//!
//! The rollup blocks of each series (`run_metric_rollups`: at level `l`, the points of
//! `16^(l+1)` aligned steps as one count, minimum, maximum and last point; see
//! `athanor_schemas::metric::rollup`) follow the same two cases: moved by one upsert of
//! the blocks this transaction's points fall in, and — when a step was stored before —
//! every block the transaction's points of that series fall in recounted from
//! `run_metrics` afterwards. A series that keeps rewriting earlier steps pays for that
//! with a scan of each touched block (the widest is the whole series) per transaction.
//!
//! A NaN value is stored as NULL and left out of the extremes (NULL when every value is
//! NaN); ±infinity is stored as such. All of it is in the batches' transaction: a
//! redelivered batch finds its `run_batches` key and writes no point.

use athanor_schemas::metric::{rollup, MetricBucket, MAX_STEP};
use athanor_schemas::{MetricRecord, MetricValue};
use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, Value};

use std::sync::LazyLock;

use athanor_connections::db::stored_text;

use super::{insert_rows, BulkWrite};

/// One value of a record: a row of `run_metrics` (of the run it is grouped under).
#[derive(Clone, Copy)]
pub(super) struct Point {
    /// Its name's number in [`RunPoints::index`]; once sorted, the name's rank.
    series: u32,
    step: i64,
    /// NaN is `None`.
    value: Option<f64>,
    seq: i64,
    ts: i64,
    /// Its batch's position in the transaction.
    batch: usize,
}

/// The points of one run's batches in a transaction, as they are collected; each name
/// is stored once per run (as its key in `index`, to its point's `series`), not once
/// per point.
#[derive(Default)]
pub(super) struct RunPoints {
    index: std::collections::HashMap<String, u32>,
    points: Vec<Point>,
    /// Values per batch: (position, count).
    counts: Vec<(usize, u64)>,
}

impl RunPoints {
    /// Appends the values of `records`, of the transaction's batch at `batch`.
    pub(super) fn collect(
        &mut self,
        backend: DatabaseBackend,
        batch: usize,
        records: Vec<MetricRecord>,
    ) {
        let before = self.points.len();
        for record in records {
            // The decoder refuses steps beyond i64::MAX.
            let (step, seq) = (record.step as i64, record.seq as i64);
            for (name, value) in record.values {
                let name = stored_text(backend, name);
                let next = self.index.len() as u32;
                let series = *self.index.entry(name).or_insert(next);
                self.points.push(Point {
                    series,
                    step,
                    value: Some(value.0).filter(|v| !v.is_nan()),
                    seq,
                    ts: record.ts,
                    batch,
                });
            }
        }
        self.counts
            .push((batch, (self.points.len() - before) as u64));
    }

    /// Sorted, deduplicated and rolled up as if every batch were new (the work of
    /// [`Prepared`], done before the transaction).
    pub(super) fn prepare(self) -> Prepared {
        let RunPoints {
            index,
            mut points,
            counts,
        } = self;
        let slots = index.len();
        let names = ranked(index.into_iter().collect(), slots, &mut points);
        let (points, shadowed) = sorted(points);
        let blocks = roll_up_all(&points);
        Prepared {
            names,
            points,
            shadowed,
            counts,
            blocks,
        }
    }
}

/// The names of `named` (each with the number its points' `series` holds now, below
/// `slots`), sorted; each point's `series` becomes its name's rank there. Integer keys
/// from here on: no string is compared per point.
fn ranked(mut named: Vec<(String, u32)>, slots: usize, points: &mut [Point]) -> Vec<String> {
    named.sort_unstable();
    let mut rank = vec![0u32; slots];
    for (r, (_, series)) in named.iter().enumerate() {
        rank[*series as usize] = r as u32;
    }
    for p in points {
        p.series = rank[p.series as usize];
    }
    named.into_iter().map(|(name, _)| name).collect()
}

/// Points by series (rank) and step, one per step — the one with the highest seq — and
/// the others.
fn sorted(mut points: Vec<Point>) -> (Vec<Point>, Vec<Point>) {
    points.sort_unstable_by_key(|p| (p.series, p.step, std::cmp::Reverse(p.seq)));
    let mut shadowed = Vec::new();
    points.dedup_by(|next, kept| {
        let same = next.series == kept.series && next.step == kept.step;
        if same {
            shadowed.push(*next);
        }
        same
    });
    (points, shadowed)
}

/// One run's points in a transaction, ready to write: the CPU work (sorting by
/// integer keys, one point per step, the rollup blocks they fall in) done before the
/// transaction — the consumer does it while the previous one writes — for the case
/// where every batch is new. [`Prepared::of_new`] redoes it for the batches that are,
/// when some are not.
pub(super) struct Prepared {
    /// By rank.
    names: Vec<String>,
    /// By series (rank) and step, one per step.
    points: Vec<Point>,
    /// Points of a step repeated in this transaction that lost to a higher `seq`.
    shadowed: Vec<Point>,
    /// Values per batch: (position, count).
    counts: Vec<(usize, u64)>,
    /// Every block the points fall in, by series (rank), level and block.
    blocks: Vec<SeriesBlock>,
}

impl Prepared {
    /// The points of the batches `new` (their positions in the transaction, in order)
    /// only, and how many values those batches held.
    pub(super) fn of_new(self, new: &[usize]) -> (Prepared, u64) {
        let count = self
            .counts
            .iter()
            .filter(|(batch, _)| new.binary_search(batch).is_ok())
            .map(|(_, n)| n)
            .sum();
        if self
            .counts
            .iter()
            .all(|(batch, _)| new.binary_search(batch).is_ok())
        {
            return (self, count);
        }
        let Prepared {
            names,
            mut points,
            shadowed,
            ..
        } = self;
        points.extend(shadowed);
        points.retain(|p| new.binary_search(&p.batch).is_ok());
        // Only the names these points have, ranked again.
        let mut used = vec![false; names.len()];
        for p in &points {
            used[p.series as usize] = true;
        }
        let slots = names.len();
        let named = (names.into_iter().zip(0..))
            .filter(|(_, series)| used[*series as usize])
            .collect();
        let names = ranked(named, slots, &mut points);
        let (points, shadowed) = sorted(points);
        let blocks = roll_up_all(&points);
        let prepared = Prepared {
            names,
            points,
            shadowed,
            counts: Vec::new(),
            blocks,
        };
        (prepared, count)
    }
}

/// A summary moved by a transaction's points of its series.
static MERGE_SUMMARIES: LazyLock<String> = LazyLock::new(|| {
    merge_upsert(
        "run_metric_summaries",
        "run_id, name",
        false,
        &["last_step", "last_value", "last_seq"],
        &["updated_at"],
    )
});

/// A rollup block moved by a transaction's points in its steps.
static MERGE_BLOCKS: LazyLock<String> = LazyLock::new(|| {
    merge_upsert(
        "run_metric_rollups",
        "series_id, level, block",
        true,
        &["last_step", "last_ts", "last_value", "last_seq"],
        &[],
    )
});

/// `ON CONFLICT (<key>) DO UPDATE` that folds the inserted aggregate (`excluded`) into
/// the stored one: counts added; extremes widened, NULL (every value NaN) never
/// replacing one and replaced by any (with their steps when `extreme_steps`); the `last`
/// columns taken when the inserted last point is newer by (step, seq); the `greatest`
/// columns the greater. Portable: SQLite's two-argument MIN/MAX return NULL for a NULL.
fn merge_upsert(
    table: &str,
    key: &str,
    extreme_steps: bool,
    last: &[&str],
    greatest: &[&str],
) -> String {
    let take = |when: &str, column: &str| {
        format!("{column} = CASE WHEN {when} THEN excluded.{column} ELSE {table}.{column} END")
    };
    let mut set = vec![format!("count = {table}.count + excluded.count")];
    for (extreme, wins) in [("min", "<"), ("max", ">")] {
        let when =
            format!("{table}.{extreme} IS NULL OR excluded.{extreme} {wins} {table}.{extreme}");
        if extreme_steps {
            set.push(take(&when, &format!("{extreme}_step")));
        }
        set.push(take(&when, extreme));
    }
    let newer =
        format!("(excluded.last_step, excluded.last_seq) > ({table}.last_step, {table}.last_seq)");
    set.extend(last.iter().map(|column| take(&newer, column)));
    set.extend(
        greatest
            .iter()
            .map(|column| take(&format!("excluded.{column} > {table}.{column}"), column)),
    );
    format!(" ON CONFLICT ({key}) DO UPDATE SET {}", set.join(", "))
}

/// Where points go, keyed by their series' id.
const INSERT_POINTS: &str = "INSERT INTO run_metrics (series_id, step, value, seq, ts)";

/// Writes the points of each run (sorted by run) and moves their summaries.
pub(super) async fn write(
    txn: &impl BulkWrite,
    backend: DatabaseBackend,
    runs: Vec<(String, Prepared)>,
) -> Result<(), DbErr> {
    // Nine values per (run, name), the summary of this transaction's points.
    let mut summaries: Vec<Value> = Vec::new();
    // Twelve values per (series, level, block) this transaction's points fall in.
    let mut blocks: Vec<Value> = Vec::new();
    // Runs with a step stored before: their series to recount, and the blocks of each
    // that this transaction's points fall in.
    let mut recount: Vec<i64> = Vec::new();
    let mut recount_blocks: Vec<(i64, Vec<(u32, u64)>)> = Vec::new();
    for (run_id, prepared) in runs {
        let Prepared {
            names,
            points,
            blocks: run_blocks,
            ..
        } = prepared;
        if points.is_empty() {
            continue;
        }
        // By rank: the id of each name.
        let ids = series_ids(txn, backend, &run_id, &names).await?;
        let id_of = |series: u32| ids[series as usize];
        let inserted = txn.insert_points(PointRows::of(&points, &id_of)).await?;
        if inserted < points.len() as u64 {
            txn.insert_many(
                INSERT_POINTS,
                5,
                // Built again: the rare case does not cost the common one a copy.
                PointRows::of(&points, &id_of).values(),
                " ON CONFLICT (series_id, step) DO UPDATE \
                 SET value = excluded.value, seq = excluded.seq, ts = excluded.ts \
                 WHERE excluded.seq > run_metrics.seq",
            )
            .await?;
            for series in points.chunk_by(|a, b| a.series == b.series) {
                recount.push(id_of(series[0].series));
            }
            for series in run_blocks.chunk_by(|a, b| a.series == b.series) {
                let touched = series.iter().map(|b| (b.level, b.block)).collect();
                recount_blocks.push((id_of(series[0].series), touched));
            }
        }
        summarize(&run_id, &names, &points, &mut summaries);
        block_rows(&run_blocks, &id_of, &mut blocks);
    }
    txn.insert_many(
        "INSERT INTO run_metric_summaries \
         (run_id, name, count, min, max, last_step, last_value, last_seq, updated_at)",
        9,
        summaries,
        &MERGE_SUMMARIES,
    )
    .await?;
    txn.insert_many(
        "INSERT INTO run_metric_rollups (series_id, level, block, count, min, min_step, max, max_step, \
         last_step, last_ts, last_value, last_seq)",
        12,
        blocks,
        &MERGE_BLOCKS,
    )
    .await?;
    for (id, touched) in recount_blocks {
        for (level, block) in touched {
            recount_block(txn, backend, id, level, block).await?;
        }
    }
    for ids in recount.chunks(1_000) {
        recount_summaries(txn, backend, ids).await?;
    }
    Ok(())
}

/// The id of each of `names` of a run (sorted, distinct), in their order, making a
/// summary row — a series — for those it does not have yet (empty: the transaction's
/// own upsert fills it in).
async fn series_ids(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    run_id: &str,
    names: &[String],
) -> Result<Vec<i64>, DbErr> {
    insert_rows(
        txn,
        backend,
        "INSERT INTO run_metric_summaries \
         (run_id, name, count, min, max, last_step, last_value, last_seq, updated_at) \
         SELECT ?, column1, 0, CAST(NULL AS DOUBLE PRECISION), CAST(NULL AS DOUBLE PRECISION), \
         -1, CAST(NULL AS DOUBLE PRECISION), -1, 0 FROM (VALUES ",
        vec![run_id.into()],
        1,
        names.iter().map(|n| Value::from(n.as_str())).collect(),
        ") AS series WHERE true ON CONFLICT (run_id, name) DO NOTHING",
    )
    .await?;
    let mut ids = std::collections::HashMap::with_capacity(names.len());
    for chunk in names.chunks(1_000) {
        let sql = format!(
            "SELECT id, name FROM run_metric_summaries WHERE run_id = ? AND name IN ({})",
            vec!["?"; chunk.len()].join(", ")
        );
        let mut values: Vec<Value> = vec![run_id.into()];
        values.extend(chunk.iter().map(|n| Value::from(n.as_str())));
        for row in txn
            .query_all(athanor_connections::db::stmt(backend, &sql, values))
            .await?
        {
            ids.insert(
                row.try_get::<String>("", "name")?,
                row.try_get::<i64>("", "id")?,
            );
        }
    }
    names
        .iter()
        .map(|name| {
            ids.get(name).copied().ok_or_else(|| {
                DbErr::Custom(format!(
                    "no series {name:?} of run {run_id:?} after its insert"
                ))
            })
        })
        .collect()
}

/// Rows of `run_metrics`, column by column, by series and step.
#[derive(Default)]
pub(crate) struct PointRows {
    pub(super) series_id: Vec<i64>,
    pub(super) step: Vec<i64>,
    /// NaN is `None`.
    pub(super) value: Vec<Option<f64>>,
    pub(super) seq: Vec<i64>,
    pub(super) ts: Vec<i64>,
}

impl PointRows {
    fn of(points: &[Point], id_of: &impl Fn(u32) -> i64) -> Self {
        let mut rows = PointRows::default();
        for series in points.chunk_by(|a, b| a.series == b.series) {
            let id = id_of(series[0].series);
            for p in series {
                rows.series_id.push(id);
                rows.step.push(p.step);
                rows.value.push(p.value);
                rows.seq.push(p.seq);
                rows.ts.push(p.ts);
            }
        }
        rows
    }

    pub(super) fn len(&self) -> usize {
        self.series_id.len()
    }

    /// The rows as `INSERT_POINTS`'s values, five per row.
    fn values(&self) -> Vec<Value> {
        let mut values = Vec::with_capacity(self.len() * 5);
        for i in 0..self.len() {
            values.extend([
                self.series_id[i].into(),
                self.step[i].into(),
                self.value[i].into(),
                self.seq[i].into(),
                self.ts[i].into(),
            ]);
        }
        values
    }
}

/// [`BulkWrite::insert_points`] by multi-row INSERTs.
pub(super) async fn insert_points(
    txn: &impl ConnectionTrait,
    points: PointRows,
) -> Result<u64, DbErr> {
    super::insert_values(
        txn,
        INSERT_POINTS,
        5,
        points.values(),
        " ON CONFLICT (series_id, step) DO NOTHING",
    )
    .await
}

/// Appends the summary of each series in `points` (sorted by name and step, one point
/// per step; `names` by rank) to `values`.
fn summarize(run_id: &str, names: &[String], points: &[Point], values: &mut Vec<Value>) {
    for series in points.chunk_by(|a, b| a.series == b.series) {
        let finite = || series.iter().filter_map(|p| p.value);
        let min = finite().reduce(f64::min);
        let max = finite().reduce(f64::max);
        let last = series.last().expect("chunks are not empty");
        let updated_at = series.iter().map(|p| p.ts).max();
        values.extend([
            run_id.into(),
            names[last.series as usize].as_str().into(),
            (series.len() as i64).into(),
            min.into(),
            max.into(),
            last.step.into(),
            last.value.into(),
            last.seq.into(),
            updated_at.into(),
        ]);
    }
}

/// One block of a series in this transaction: its points merged, and the `seq` of its
/// last point.
pub(super) struct SeriesBlock {
    /// The series' rank.
    series: u32,
    level: u32,
    block: u64,
    bucket: MetricBucket,
    last_seq: i64,
}

/// The blocks (at every level) that the points (sorted by series and step, one per
/// step) fall in, by series, level and block: one pass per series and level, as a
/// block's points are consecutive.
fn roll_up_all(points: &[Point]) -> Vec<SeriesBlock> {
    let mut out: Vec<SeriesBlock> = Vec::new();
    for series in points.chunk_by(|a, b| a.series == b.series) {
        for level in 0..rollup::LEVELS {
            let first = out.len();
            for p in series {
                let step = p.step as u64;
                let block = rollup::block(step, level);
                let point =
                    MetricBucket::point(step, p.ts, MetricValue(p.value.unwrap_or(f64::NAN)));
                match out[first..].last_mut() {
                    Some(held) if held.block == block => {
                        held.bucket.merge(&point);
                        held.last_seq = p.seq;
                    }
                    _ => out.push(SeriesBlock {
                        series: p.series,
                        level,
                        block,
                        bucket: point,
                        last_seq: p.seq,
                    }),
                }
            }
        }
    }
    out
}

/// Appends a `run_metric_rollups` row for each of `blocks`.
fn block_rows(blocks: &[SeriesBlock], id_of: &impl Fn(u32) -> i64, values: &mut Vec<Value>) {
    let stored = |v: MetricValue| Some(v.0).filter(|v| !v.is_nan());
    values.reserve(blocks.len() * 12);
    for SeriesBlock {
        series,
        level,
        block,
        bucket: b,
        last_seq,
    } in blocks
    {
        values.extend([
            id_of(*series).into(),
            (*level as i32).into(),
            (*block as i64).into(),
            (b.count as i64).into(),
            stored(b.min).into(),
            (b.min_step as i64).into(),
            stored(b.max).into(),
            (b.max_step as i64).into(),
            (b.step as i64).into(),
            b.ts.into(),
            stored(b.value).into(),
            (*last_seq).into(),
        ]);
    }
}

/// Recomputes one rollup block from the stored points of its steps (deleting it when
/// none is left).
async fn recount_block(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    series: i64,
    level: u32,
    block: u64,
) -> Result<(), DbErr> {
    use athanor_connections::db::stmt;
    let width = rollup::width(level);
    let (from, to) = (
        (block * width) as i64,
        (block * width + (width - 1)).min(MAX_STEP) as i64,
    );
    let range = || -> Vec<Value> { vec![series.into(), from.into(), to.into()] };
    const WHERE: &str = "WHERE series_id = ? AND step >= ? AND step <= ?";
    let row = txn
        .query_one(stmt(
            backend,
            &format!("SELECT COUNT(*) AS n, MIN(value) AS lo, MAX(value) AS hi, MAX(step) AS last FROM run_metrics {WHERE}"),
            range(),
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("an aggregate returns a row".into()))?;
    let count: i64 = row.try_get("", "n")?;
    let key =
        || -> Vec<Value> { vec![series.into(), (level as i32).into(), (block as i64).into()] };
    if count == 0 {
        txn.execute(stmt(
            backend,
            "DELETE FROM run_metric_rollups WHERE series_id = ? AND level = ? AND block = ?",
            key(),
        ))
        .await?;
        return Ok(());
    }
    let lo: Option<f64> = row.try_get("", "lo")?;
    let hi: Option<f64> = row.try_get("", "hi")?;
    let last: i64 = row.try_get("", "last")?;
    // The first step holding an extreme (any step when every value is NaN).
    let step_of = |extreme: Option<f64>| {
        let (sql, mut values) = match extreme {
            Some(v) => (
                format!("SELECT step FROM run_metrics {WHERE} AND value = ? ORDER BY step LIMIT 1"),
                vec![Value::from(v)],
            ),
            None => (
                format!("SELECT step FROM run_metrics {WHERE} ORDER BY step LIMIT 1"),
                Vec::new(),
            ),
        };
        let mut all = range();
        all.append(&mut values);
        async move {
            let row = txn.query_one(stmt(backend, &sql, all)).await?;
            row.map_or(Ok(from), |r| r.try_get::<i64>("", "step"))
        }
    };
    let min_step = step_of(lo).await?;
    let max_step = step_of(hi).await?;
    let last_row = txn
        .query_one(stmt(
            backend,
            "SELECT ts, value, seq FROM run_metrics WHERE series_id = ? AND step = ?",
            vec![series.into(), last.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::Custom(format!("the point at step {last} of series {series}")))?;
    let mut values = key();
    values.extend([
        count.into(),
        lo.into(),
        min_step.into(),
        hi.into(),
        max_step.into(),
        last.into(),
        last_row.try_get::<i64>("", "ts")?.into(),
        last_row.try_get::<Option<f64>>("", "value")?.into(),
        last_row.try_get::<i64>("", "seq")?.into(),
    ]);
    txn.execute(stmt(
        backend,
        "INSERT INTO run_metric_rollups (series_id, level, block, count, min, min_step, max, max_step, \
         last_step, last_ts, last_value, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (series_id, level, block) DO UPDATE SET count = excluded.count, min = excluded.min, \
         min_step = excluded.min_step, max = excluded.max, max_step = excluded.max_step, \
         last_step = excluded.last_step, last_ts = excluded.last_ts, last_value = excluded.last_value, \
         last_seq = excluded.last_seq",
        values,
    ))
    .await?;
    Ok(())
}

/// Recomputes the summaries of the series `ids` from their stored points.
async fn recount_summaries(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    ids: &[i64],
) -> Result<(), DbErr> {
    let list = vec!["?"; ids.len()].join(", ");
    let sql = format!(
        "UPDATE run_metric_summaries SET \
         count = (SELECT COUNT(*) FROM run_metrics m WHERE m.series_id = run_metric_summaries.id), \
         min = (SELECT MIN(value) FROM run_metrics m WHERE m.series_id = run_metric_summaries.id), \
         max = (SELECT MAX(value) FROM run_metrics m WHERE m.series_id = run_metric_summaries.id), \
         last_step = (SELECT MAX(step) FROM run_metrics m WHERE m.series_id = run_metric_summaries.id), \
         updated_at = (SELECT MAX(ts) FROM run_metrics m WHERE m.series_id = run_metric_summaries.id) \
         WHERE id IN ({list})"
    );
    let values: Vec<Value> = ids.iter().map(|id| Value::from(*id)).collect();
    txn.execute(athanor_connections::db::stmt(backend, &sql, values.clone()))
        .await?;
    // The last point's value and seq, at the step just found.
    let sql = format!(
        "UPDATE run_metric_summaries SET \
         last_value = (SELECT value FROM run_metrics m WHERE m.series_id = run_metric_summaries.id \
             AND m.step = run_metric_summaries.last_step), \
         last_seq = (SELECT seq FROM run_metrics m WHERE m.series_id = run_metric_summaries.id \
             AND m.step = run_metric_summaries.last_step) \
         WHERE id IN ({list})"
    );
    txn.execute(athanor_connections::db::stmt(backend, &sql, values))
        .await?;
    Ok(())
}
