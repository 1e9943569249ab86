//! Metric points of one transaction's new batches, and their series' summaries.
//!
//! A point is one `(run, name, step)`: the record with the highest `seq` wins, whatever
//! the delivery order. Within the transaction the points of a run are sorted and
//! deduplicated first (one statement may not touch a row twice on PostgreSQL), then
//! inserted with `ON CONFLICT DO NOTHING`, counting the rows inserted:
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

use super::{insert_rows, pg_text};

/// One value of a record: a row of `run_metrics` (of the run it is grouped under).
pub(super) struct Point {
    name: String,
    step: i64,
    /// NaN is `None`.
    value: Option<f64>,
    seq: i64,
    ts: i64,
}

/// Appends the values of `records` to `points`; returns how many there were.
pub(super) fn collect(
    backend: DatabaseBackend,
    points: &mut Vec<Point>,
    records: Vec<MetricRecord>,
) -> u64 {
    let before = points.len();
    for record in records {
        // The decoder refuses steps beyond i64::MAX.
        let (step, seq) = (record.step as i64, record.seq as i64);
        points.extend(record.values.into_iter().map(|(name, value)| Point {
            name: pg_text(backend, name),
            step,
            value: Some(value.0).filter(|v| !v.is_nan()),
            seq,
            ts: record.ts,
        }));
    }
    (points.len() - before) as u64
}

/// Where a run's points go: `run_id` is bound once per statement.
const INSERT_POINTS: &str = "INSERT INTO run_metrics (run_id, name, step, value, seq, ts) \
     SELECT ?, column1, column2, column3, column4, column5 FROM (VALUES ";

/// Writes the points of each run (sorted by run) and moves their summaries.
pub(super) async fn write(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    runs: Vec<(String, Vec<Point>)>,
) -> Result<(), DbErr> {
    // Nine values per (run, name), the summary of this transaction's points.
    let mut summaries: Vec<Value> = Vec::new();
    // Thirteen values per (run, name, level, block) this transaction's points fall in.
    let mut blocks: Vec<Value> = Vec::new();
    // Runs with a step stored before: their series to recount, and the blocks of each
    // that this transaction's points fall in.
    let mut recount: Vec<(String, Vec<String>)> = Vec::new();
    let mut recount_blocks: Vec<TouchedBlocks> = Vec::new();
    for (run_id, mut points) in runs {
        // By name and step, the highest seq first; keep that one.
        points.sort_unstable_by(|a, b| (&a.name, a.step, b.seq).cmp(&(&b.name, b.step, a.seq)));
        points.dedup_by(|next, kept| next.name == kept.name && next.step == kept.step);
        let inserted = insert_rows(
            txn,
            backend,
            INSERT_POINTS,
            vec![run_id.as_str().into()],
            5,
            point_values(&points),
            ") AS point WHERE true ON CONFLICT (run_id, name, step) DO NOTHING",
        )
        .await?;
        if inserted < points.len() as u64 {
            insert_rows(
                txn,
                backend,
                INSERT_POINTS,
                vec![run_id.as_str().into()],
                5,
                point_values(&points),
                ") AS point WHERE true ON CONFLICT (run_id, name, step) DO UPDATE \
                 SET value = excluded.value, seq = excluded.seq, ts = excluded.ts \
                 WHERE excluded.seq > run_metrics.seq",
            )
            .await?;
            let mut names: Vec<String> = points.iter().map(|p| p.name.clone()).collect();
            names.dedup();
            recount.push((run_id.clone(), names));
            for series in points.chunk_by(|a, b| a.name == b.name) {
                let touched = roll_up(series).into_iter().map(|(key, _)| key).collect();
                recount_blocks.push((run_id.clone(), series[0].name.clone(), touched));
            }
        }
        summarize(&run_id, &points, &mut summaries);
        block_rows(&run_id, &points, &mut blocks);
    }
    insert_rows(
        txn,
        backend,
        "INSERT INTO run_metric_summaries \
         (run_id, name, count, min, max, last_step, last_value, last_seq, updated_at) VALUES ",
        Vec::new(),
        9,
        summaries,
        // NULL (every value NaN) never replaces an extreme, and is replaced by any.
        " ON CONFLICT (run_id, name) DO UPDATE SET \
         count = run_metric_summaries.count + excluded.count, \
         min = CASE WHEN run_metric_summaries.min IS NULL OR excluded.min < run_metric_summaries.min \
             THEN excluded.min ELSE run_metric_summaries.min END, \
         max = CASE WHEN run_metric_summaries.max IS NULL OR excluded.max > run_metric_summaries.max \
             THEN excluded.max ELSE run_metric_summaries.max END, \
         last_step = CASE WHEN (excluded.last_step, excluded.last_seq) > (run_metric_summaries.last_step, run_metric_summaries.last_seq) \
             THEN excluded.last_step ELSE run_metric_summaries.last_step END, \
         last_value = CASE WHEN (excluded.last_step, excluded.last_seq) > (run_metric_summaries.last_step, run_metric_summaries.last_seq) \
             THEN excluded.last_value ELSE run_metric_summaries.last_value END, \
         last_seq = CASE WHEN (excluded.last_step, excluded.last_seq) > (run_metric_summaries.last_step, run_metric_summaries.last_seq) \
             THEN excluded.last_seq ELSE run_metric_summaries.last_seq END, \
         updated_at = CASE WHEN excluded.updated_at > run_metric_summaries.updated_at \
             THEN excluded.updated_at ELSE run_metric_summaries.updated_at END",
    )
    .await?;
    insert_rows(
        txn,
        backend,
        "INSERT INTO run_metric_rollups (run_id, name, level, block, count, min, min_step, max, max_step, \
         last_step, last_ts, last_value, last_seq) VALUES ",
        Vec::new(),
        13,
        blocks,
        " ON CONFLICT (run_id, name, level, block) DO UPDATE SET \
         count = run_metric_rollups.count + excluded.count, \
         min_step = CASE WHEN run_metric_rollups.min IS NULL OR excluded.min < run_metric_rollups.min \
             THEN excluded.min_step ELSE run_metric_rollups.min_step END, \
         min = CASE WHEN run_metric_rollups.min IS NULL OR excluded.min < run_metric_rollups.min \
             THEN excluded.min ELSE run_metric_rollups.min END, \
         max_step = CASE WHEN run_metric_rollups.max IS NULL OR excluded.max > run_metric_rollups.max \
             THEN excluded.max_step ELSE run_metric_rollups.max_step END, \
         max = CASE WHEN run_metric_rollups.max IS NULL OR excluded.max > run_metric_rollups.max \
             THEN excluded.max ELSE run_metric_rollups.max END, \
         last_ts = CASE WHEN (excluded.last_step, excluded.last_seq) > (run_metric_rollups.last_step, run_metric_rollups.last_seq) \
             THEN excluded.last_ts ELSE run_metric_rollups.last_ts END, \
         last_value = CASE WHEN (excluded.last_step, excluded.last_seq) > (run_metric_rollups.last_step, run_metric_rollups.last_seq) \
             THEN excluded.last_value ELSE run_metric_rollups.last_value END, \
         last_seq = CASE WHEN (excluded.last_step, excluded.last_seq) > (run_metric_rollups.last_step, run_metric_rollups.last_seq) \
             THEN excluded.last_seq ELSE run_metric_rollups.last_seq END, \
         last_step = CASE WHEN (excluded.last_step, excluded.last_seq) > (run_metric_rollups.last_step, run_metric_rollups.last_seq) \
             THEN excluded.last_step ELSE run_metric_rollups.last_step END",
    )
    .await?;
    for (run_id, name, touched) in recount_blocks {
        for (level, block) in touched {
            recount_block(txn, backend, &run_id, &name, level, block).await?;
        }
    }
    for (run_id, names) in recount {
        for names in names.chunks(1_000) {
            recount_summaries(txn, backend, &run_id, names).await?;
        }
    }
    Ok(())
}

fn point_values(points: &[Point]) -> Vec<Value> {
    let mut values = Vec::with_capacity(points.len() * 5);
    for p in points {
        values.extend([
            p.name.as_str().into(),
            p.step.into(),
            p.value.into(),
            p.seq.into(),
            p.ts.into(),
        ]);
    }
    values
}

/// Appends the summary of each series in `points` (sorted by name and step, one point
/// per step) to `values`.
fn summarize(run_id: &str, points: &[Point], values: &mut Vec<Value>) {
    for series in points.chunk_by(|a, b| a.name == b.name) {
        let finite = || series.iter().filter_map(|p| p.value);
        let min = finite().reduce(f64::min);
        let max = finite().reduce(f64::max);
        let last = series.last().expect("chunks are not empty");
        let updated_at = series.iter().map(|p| p.ts).max();
        values.extend([
            run_id.into(),
            last.name.as_str().into(),
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

/// A run, one of its series, and the (level, block)s this transaction's points of it
/// fall in.
type TouchedBlocks = (String, String, Vec<(u32, u64)>);

/// One block of a series in this transaction: its points merged, and the `seq` of its
/// last point.
struct Block {
    bucket: MetricBucket,
    last_seq: i64,
}

/// The blocks (at every level) that the points of one series (sorted by step, one per
/// step) fall in: one pass per level, as a block's points are consecutive.
fn roll_up(series: &[Point]) -> Vec<((u32, u64), Block)> {
    let mut out: Vec<((u32, u64), Block)> = Vec::new();
    for level in 0..rollup::LEVELS {
        let first = out.len();
        for p in series {
            let step = p.step as u64;
            let key = (level, rollup::block(step, level));
            let point = MetricBucket::point(step, p.ts, MetricValue(p.value.unwrap_or(f64::NAN)));
            match out[first..].last_mut() {
                Some((held, block)) if *held == key => {
                    block.bucket.merge(&point);
                    block.last_seq = p.seq;
                }
                _ => out.push((
                    key,
                    Block {
                        bucket: point,
                        last_seq: p.seq,
                    },
                )),
            }
        }
    }
    out
}

/// Appends a `run_metric_rollups` row for each block the points (sorted by name and
/// step) fall in.
fn block_rows(run_id: &str, points: &[Point], values: &mut Vec<Value>) {
    let stored = |v: MetricValue| Some(v.0).filter(|v| !v.is_nan());
    for series in points.chunk_by(|a, b| a.name == b.name) {
        for (
            (level, block),
            Block {
                bucket: b,
                last_seq,
            },
        ) in roll_up(series)
        {
            values.extend([
                run_id.into(),
                series[0].name.as_str().into(),
                (level as i32).into(),
                (block as i64).into(),
                (b.count as i64).into(),
                stored(b.min).into(),
                (b.min_step as i64).into(),
                stored(b.max).into(),
                (b.max_step as i64).into(),
                (b.step as i64).into(),
                b.ts.into(),
                stored(b.value).into(),
                last_seq.into(),
            ]);
        }
    }
}

/// Recomputes one rollup block from the stored points of its steps (deleting it when
/// none is left).
async fn recount_block(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    run_id: &str,
    name: &str,
    level: u32,
    block: u64,
) -> Result<(), DbErr> {
    use athanor_connections::db::stmt;
    let width = rollup::width(level);
    let (from, to) = (
        (block * width) as i64,
        (block * width + (width - 1)).min(MAX_STEP) as i64,
    );
    let range = || -> Vec<Value> { vec![run_id.into(), name.into(), from.into(), to.into()] };
    const WHERE: &str = "WHERE run_id = ? AND name = ? AND step >= ? AND step <= ?";
    let row = txn
        .query_one(stmt(
            backend,
            &format!("SELECT COUNT(*) AS n, MIN(value) AS lo, MAX(value) AS hi, MAX(step) AS last FROM run_metrics {WHERE}"),
            range(),
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("an aggregate returns a row".into()))?;
    let count: i64 = row.try_get("", "n")?;
    let key = || -> Vec<Value> {
        vec![
            run_id.into(),
            name.into(),
            (level as i32).into(),
            (block as i64).into(),
        ]
    };
    if count == 0 {
        txn.execute(stmt(
            backend,
            "DELETE FROM run_metric_rollups WHERE run_id = ? AND name = ? AND level = ? AND block = ?",
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
            "SELECT ts, value, seq FROM run_metrics WHERE run_id = ? AND name = ? AND step = ?",
            vec![run_id.into(), name.into(), last.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::Custom(format!("the point at step {last} of {name:?}")))?;
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
        "INSERT INTO run_metric_rollups (run_id, name, level, block, count, min, min_step, max, max_step, \
         last_step, last_ts, last_value, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (run_id, name, level, block) DO UPDATE SET count = excluded.count, min = excluded.min, \
         min_step = excluded.min_step, max = excluded.max, max_step = excluded.max_step, \
         last_step = excluded.last_step, last_ts = excluded.last_ts, last_value = excluded.last_value, \
         last_seq = excluded.last_seq",
        values,
    ))
    .await?;
    Ok(())
}

/// Recomputes the summaries of `names` of a run from its stored points.
async fn recount_summaries(
    txn: &impl ConnectionTrait,
    backend: DatabaseBackend,
    run_id: &str,
    names: &[String],
) -> Result<(), DbErr> {
    let list = vec!["?"; names.len()].join(", ");
    let sql = format!(
        "INSERT INTO run_metric_summaries \
         (run_id, name, count, min, max, last_step, last_value, last_seq, updated_at) \
         SELECT s.run_id, s.name, s.count, s.min, s.max, l.step, l.value, l.seq, s.updated_at \
         FROM (SELECT run_id, name, COUNT(*) AS count, MIN(value) AS min, MAX(value) AS max, \
               MAX(step) AS last_step, MAX(ts) AS updated_at \
               FROM run_metrics WHERE run_id = ? AND name IN ({list}) GROUP BY run_id, name) AS s \
         JOIN run_metrics AS l ON l.run_id = s.run_id AND l.name = s.name AND l.step = s.last_step \
         WHERE true \
         ON CONFLICT (run_id, name) DO UPDATE SET count = excluded.count, min = excluded.min, \
         max = excluded.max, last_step = excluded.last_step, last_value = excluded.last_value, \
         last_seq = excluded.last_seq, updated_at = excluded.updated_at"
    );
    let mut values: Vec<Value> = Vec::with_capacity(names.len() + 1);
    values.push(run_id.into());
    values.extend(names.iter().map(|n| n.as_str().into()));
    txn.execute(athanor_connections::db::stmt(backend, &sql, values))
        .await?;
    Ok(())
}
