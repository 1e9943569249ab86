//! Metric series of runs: their summaries, one series downsampled, several runs' series
//! of one metric side by side — read from the points (`run_metrics`), their rollups
//! (`run_metric_rollups`) and the summaries (`run_metric_summaries`) the aggregator
//! keeps.
//!
//! A series of up to `max_points` points comes back exactly. A longer one comes back in
//! buckets of `width` steps, each keeping its count, minimum, maximum and last point,
//! built from pre-aggregated blocks (16, 256, … 2^32 steps) no wider than a bucket plus
//! the raw points at the range's ends, so that a million points cost a few thousand
//! rows. A block lies in the bucket of its first step; its minimum and maximum keep
//! their own steps, so a chart draws every spike where it happened.

use std::collections::BTreeMap;

use athanor_connections::db::{stmt, stored_text};
use athanor_schemas::api::{
    CompareQuery, MetricComparison, MetricList, RunSeries, SeriesQuery, DEFAULT_MAX_POINTS,
    MAX_COMPARED_RUNS, MAX_MAX_POINTS,
};
use athanor_schemas::entities::run_metric_summaries;
use athanor_schemas::metric::rollup;
use athanor_schemas::metric::{MetricBucket, MetricSeries, MetricSummary, MetricValue, MAX_STEP};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QueryResult,
};

use crate::api::{find_run, AppStateRef};
use crate::error::{ApiError, ApiResult, ErrorBody};

/// A NaN is stored as NULL.
fn value(v: Option<f64>) -> MetricValue {
    MetricValue(v.unwrap_or(f64::NAN))
}

/// Every metric of a run, the most recently updated first.
pub(crate) async fn summaries(
    db: &DatabaseConnection,
    run_id: &str,
) -> Result<Vec<MetricSummary>, DbErr> {
    Ok(run_metric_summaries::Entity::find()
        .filter(run_metric_summaries::Column::RunId.eq(run_id))
        .order_by_desc(run_metric_summaries::Column::UpdatedAt)
        .order_by_asc(run_metric_summaries::Column::Name)
        .all(db)
        .await?
        .into_iter()
        .map(|row| MetricSummary {
            name: row.name,
            count: row.count as u64,
            min: value(row.min),
            max: value(row.max),
            last: value(row.last_value),
            last_step: row.last_step as u64,
            updated_at: row.updated_at,
        })
        .collect())
}

/// The steps `from..=to` of one series in at most `max_points` buckets (see the
/// module's documentation). `None` bounds are the series' own first and last step.
pub(crate) async fn series(
    db: &DatabaseConnection,
    run_id: &str,
    name: &str,
    from: Option<u64>,
    to: Option<u64>,
    max_points: u64,
) -> Result<MetricSeries, DbErr> {
    let empty = MetricSeries {
        name: name.to_string(),
        count: 0,
        exact: true,
        width: 1,
        buckets: Vec::new(),
    };
    let Some(key) = series_id(db, run_id, name).await? else {
        return Ok(empty);
    };
    let from = match from {
        Some(step) => step,
        None => match end_step(db, key, "ASC").await? {
            Some(step) => step,
            None => return Ok(empty),
        },
    };
    let to = match to {
        Some(step) => step.min(MAX_STEP),
        None => match end_step(db, key, "DESC").await? {
            Some(step) => step,
            None => return Ok(empty),
        },
    };
    if from > to {
        return Ok(empty);
    }
    let max_points = max_points.max(1);
    let bucket_width = (to - from) / max_points + 1;
    let exact = |buckets: Vec<MetricBucket>| MetricSeries {
        name: name.to_string(),
        count: buckets.len() as u64,
        exact: true,
        width: 1,
        buckets,
    };
    let Some(level) = rollup::level_for(bucket_width) else {
        // Buckets narrower than 16 steps: at most 16 × max_points points to read.
        let points = points(db, key, from, to).await?;
        if points.len() as u64 <= max_points {
            return Ok(exact(points));
        }
        return Ok(bucketed(name, from, bucket_width, points));
    };
    let plan = rollup::cover(from, to, level);
    let mut parts: Vec<MetricBucket> = Vec::new();
    for &(level, first, last) in &plan.blocks {
        parts.extend(blocks(db, key, level, first, last).await?);
    }
    for &(first, last) in &plan.raw {
        parts.extend(points(db, key, first, last).await?);
    }
    let count: u64 = parts.iter().map(|b| b.count).sum();
    if count <= max_points {
        return Ok(exact(points(db, key, from, to).await?));
    }
    parts.sort_by_key(|b| b.step);
    Ok(bucketed(name, from, bucket_width, parts))
}

/// `parts` (points or blocks, each in the bucket of its earliest step it names) merged into buckets
/// of `bucket_width` steps from `from`.
fn bucketed(name: &str, from: u64, bucket_width: u64, parts: Vec<MetricBucket>) -> MetricSeries {
    let mut buckets: BTreeMap<u64, MetricBucket> = BTreeMap::new();
    let mut count = 0;
    for part in parts {
        count += part.count;
        let first = part.min_step.min(part.max_step).min(part.step).max(from);
        buckets
            .entry((first - from) / bucket_width)
            .and_modify(|b| b.merge(&part))
            .or_insert(part);
    }
    MetricSeries {
        name: name.to_string(),
        count,
        exact: false,
        width: bucket_width,
        buckets: buckets.into_values().collect(),
    }
}

/// The id of a run's series (`None`: the run has no such metric).
async fn series_id(
    db: &DatabaseConnection,
    run_id: &str,
    name: &str,
) -> Result<Option<i64>, DbErr> {
    Ok(run_metric_summaries::Entity::find()
        .filter(run_metric_summaries::Column::RunId.eq(run_id))
        .filter(
            run_metric_summaries::Column::Name
                .eq(stored_text(db.get_database_backend(), name.to_string())),
        )
        .one(db)
        .await?
        .map(|row| row.id))
}

/// The series' first (`ASC`) or last (`DESC`) step.
async fn end_step(db: &DatabaseConnection, series: i64, order: &str) -> Result<Option<u64>, DbErr> {
    let sql =
        format!("SELECT step FROM run_metrics WHERE series_id = ? ORDER BY step {order} LIMIT 1");
    db.query_one(stmt(db.get_database_backend(), &sql, vec![series.into()]))
        .await?
        .map(|row| row.try_get::<i64>("", "step").map(|s| s as u64))
        .transpose()
}

/// The points of steps `from..=to`, each as a bucket of one.
async fn points(
    db: &DatabaseConnection,
    series: i64,
    from: u64,
    to: u64,
) -> Result<Vec<MetricBucket>, DbErr> {
    let rows = db
        .query_all(stmt(
            db.get_database_backend(),
            "SELECT step, ts, value FROM run_metrics WHERE series_id = ? AND step >= ? AND step <= ? ORDER BY step",
            vec![series.into(), (from as i64).into(), (to as i64).into()],
        ))
        .await?;
    rows.iter()
        .map(|row| {
            Ok(MetricBucket::point(
                row.try_get::<i64>("", "step")? as u64,
                row.try_get("", "ts")?,
                value(row.try_get("", "value")?),
            ))
        })
        .collect()
}

/// The stored blocks `first..=last` of `level`.
async fn blocks(
    db: &DatabaseConnection,
    series: i64,
    level: u32,
    first: u64,
    last: u64,
) -> Result<Vec<MetricBucket>, DbErr> {
    let rows = db
        .query_all(stmt(
            db.get_database_backend(),
            "SELECT count, min, min_step, max, max_step, last_step, last_ts, last_value FROM run_metric_rollups \
             WHERE series_id = ? AND level = ? AND block >= ? AND block <= ?",
            vec![
                series.into(),
                (level as i32).into(),
                (first as i64).into(),
                (last as i64).into(),
            ],
        ))
        .await?;
    rows.iter().map(rollup_bucket).collect()
}

fn rollup_bucket(row: &QueryResult) -> Result<MetricBucket, DbErr> {
    Ok(MetricBucket {
        step: row.try_get::<i64>("", "last_step")? as u64,
        ts: row.try_get("", "last_ts")?,
        value: value(row.try_get("", "last_value")?),
        min: value(row.try_get("", "min")?),
        min_step: row.try_get::<i64>("", "min_step")? as u64,
        max: value(row.try_get("", "max")?),
        max_step: row.try_get::<i64>("", "max_step")? as u64,
        count: row.try_get::<i64>("", "count")? as u64,
    })
}

/// `max_points`, `from_step` and `to_step` checked: in range, and `from` ≤ `to`.
fn bounds(
    max_points: Option<u64>,
    from: Option<u64>,
    to: Option<u64>,
) -> ApiResult<(u64, Option<u64>, Option<u64>)> {
    let max_points = max_points.unwrap_or(DEFAULT_MAX_POINTS);
    if !(1..=MAX_MAX_POINTS).contains(&max_points) {
        return Err(ApiError::BadRequest(format!(
            "max_points must be between 1 and {MAX_MAX_POINTS}, got {max_points}"
        )));
    }
    for (field, step) in [("from_step", from), ("to_step", to)] {
        if step.is_some_and(|s| s > MAX_STEP) {
            return Err(ApiError::BadRequest(format!(
                "{field} must be at most {MAX_STEP}"
            )));
        }
    }
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            return Err(ApiError::BadRequest(format!(
                "from_step ({from}) is after to_step ({to})"
            )));
        }
    }
    Ok((max_points, from, to))
}

/// The `{id}` and `{name}` of a metric's path.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // describes the path; handlers take `Path<(String, String)>`
pub(crate) struct RunMetric {
    /// Run id.
    id: String,
    /// Metric name (percent-encoded: `train%2Floss` for `train/loss`).
    name: String,
}

/// The `{name}` of a comparison's path.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // describes the path; the handler takes `Path<String>`
pub(crate) struct MetricName {
    /// Metric name (percent-encoded).
    name: String,
}

/// The run's metrics: each with its point count, minimum, maximum (NaN left out) and
/// the value at its highest step; the most recently updated first.
#[utoipa::path(get, path = "/api/runs/{id}/metrics", tag = "metrics", params(crate::api::RunId), responses(
    (status = 200, description = "Metric summaries", body = MetricList),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn list(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Json<MetricList>> {
    find_run(&state, &id).await?;
    let metrics = summaries(&state.db, &id).await?;
    Ok(Json(MetricList {
        run_id: id,
        metrics,
    }))
}

/// One metric of a run, in at most `max_points` buckets that keep each bucket's count,
/// minimum, maximum and last point (exact, point by point, when the series is no longer).
#[utoipa::path(get, path = "/api/runs/{id}/metrics/{name}", tag = "metrics", params(RunMetric, SeriesQuery), responses(
    (status = 200, description = "The series", body = RunSeries),
    (status = 400, description = "max_points out of range, from_step after to_step, or an unknown parameter", body = ErrorBody),
    (status = 404, description = "No such run, or the run has no such metric", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn one(
    State(state): AppStateRef,
    Path((id, name)): Path<(String, String)>,
    query: Result<Query<SeriesQuery>, QueryRejection>,
) -> ApiResult<Json<RunSeries>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (max_points, from, to) = bounds(q.max_points, q.from_step, q.to_step)?;
    find_run(&state, &id).await?;
    let series = series(&state.db, &id, &name, from, to, max_points).await?;
    if series.count == 0 && series_id(&state.db, &id, &name).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "run {id:?} has no metric {name:?}"
        )));
    }
    Ok(Json(RunSeries { run_id: id, series }))
}

/// One metric of several runs (`runs=a,b,c`, 1 to 20), each downsampled alike, in the
/// order asked; a run without the metric has an empty series.
#[utoipa::path(get, path = "/api/metrics/{name}", tag = "metrics", params(MetricName, CompareQuery), responses(
    (status = 200, description = "The series of each run", body = MetricComparison),
    (status = 400, description = "No runs or more than 20, max_points out of range, from_step after to_step, or an unknown parameter", body = ErrorBody),
    (status = 404, description = "One of the runs does not exist", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn compare(
    State(state): AppStateRef,
    Path(name): Path<String>,
    query: Result<Query<CompareQuery>, QueryRejection>,
) -> ApiResult<Json<MetricComparison>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (max_points, from, to) = bounds(q.max_points, q.from_step, q.to_step)?;
    let ids: Vec<&str> = q
        .runs
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .collect();
    if ids.is_empty() || ids.len() > MAX_COMPARED_RUNS {
        return Err(ApiError::BadRequest(format!(
            "runs must name 1 to {MAX_COMPARED_RUNS} runs, comma-separated; got {}",
            ids.len()
        )));
    }
    let mut runs = Vec::with_capacity(ids.len());
    for id in ids {
        find_run(&state, id).await?;
        let series = series(&state.db, id, &name, from, to, max_points).await?;
        runs.push(RunSeries {
            run_id: id.to_string(),
            series,
        });
    }
    Ok(Json(MetricComparison { name, runs }))
}
