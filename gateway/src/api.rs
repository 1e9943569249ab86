//! The REST handlers under `/api`.

use std::collections::BTreeMap;
use std::sync::Arc;

use athanor_schemas::entities::{run_logs, run_results, runs};
use athanor_schemas::requests::{RunRequest, WorkerInfo};
use athanor_schemas::{names, now_micros, ConfigSchema};
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::TryStreamExt;
use sea_orm::sea_query::{Expr, Func, LikeExpr};
use sea_orm::{
    ActiveValue, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

type AppStateRef = State<Arc<AppState>>;

pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers and NATS is connected.
pub(crate) async fn readyz(State(state): AppStateRef) -> Response {
    let db = athanor_schemas::db::ping(&state.db).await;
    let nats = state.js.client().connection_state() == async_nats::connection::State::Connected;
    let status = if db && nats {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "database": db, "nats": nats }))).into_response()
}

pub(crate) async fn no_route() -> ApiError {
    ApiError::NotFound(
        "no such endpoint; the API is under /api (see /api/experiments, /api/runs)".into(),
    )
}

/// Experiments hosted by live workers, from `athanor_workers`.
struct Hosted {
    description: String,
    config_schema: Value,
    workers: usize,
}

async fn hosted(state: &AppState) -> ApiResult<BTreeMap<String, Hosted>> {
    let nats = |e: &dyn std::fmt::Display| ApiError::Nats(e.to_string());
    let keys: Vec<String> = state
        .workers
        .keys()
        .await
        .map_err(|e| nats(&e))?
        .try_collect()
        .await
        .map_err(|e| nats(&e))?;
    let mut hosted: BTreeMap<String, Hosted> = BTreeMap::new();
    for key in keys {
        let Some(value) = state.workers.get(&key).await.map_err(|e| nats(&e))? else {
            continue;
        };
        let Ok(info) = serde_json::from_slice::<WorkerInfo>(&value) else {
            continue;
        };
        for e in info.experiments {
            hosted
                .entry(e.name)
                .and_modify(|h| h.workers += 1)
                .or_insert(Hosted {
                    description: e.description,
                    config_schema: e.config_schema,
                    workers: 1,
                });
        }
    }
    Ok(hosted)
}

pub(crate) async fn experiments(State(state): AppStateRef) -> ApiResult<Json<Value>> {
    let list: Vec<Value> = hosted(&state)
        .await?
        .into_iter()
        .map(|(name, h)| json!({ "name": name, "description": h.description, "config_schema": h.config_schema, "workers": h.workers }))
        .collect();
    Ok(Json(json!({ "experiments": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRun {
    experiment: String,
    #[serde(default)]
    config: Value,
}

/// Maps a body that is not the expected JSON to 400 (or 413 when too large).
fn body<T>(state: &AppState, body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    match body {
        Ok(Json(value)) => Ok(value),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::TooLarge(state.max_body_bytes))
        }
        Err(rejection) => Err(ApiError::BadRequest(format!(
            "malformed request body: {}",
            rejection.body_text()
        ))),
    }
}

pub(crate) async fn create_run(
    State(state): AppStateRef,
    request: Result<Json<CreateRun>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let request = body(&state, request)?;
    let hosted = hosted(&state).await?;
    let Some(experiment) = hosted.get(&request.experiment) else {
        let known: Vec<&str> = hosted.keys().map(String::as_str).collect();
        return Err(ApiError::NotFound(format!(
            "unknown experiment {:?} (live workers host: {})",
            request.experiment,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    let schema = ConfigSchema::from_json_schema(&experiment.config_schema).unwrap_or_default();
    let config = schema
        .validate(&request.config)
        .map_err(|e| ApiError::InvalidConfig {
            field: e.field,
            reason: e.reason,
        })?;
    let run_id = names::new_run_id();
    let now = now_micros();
    let config = Value::Object(config);
    runs::Entity::insert(runs::ActiveModel {
        id: ActiveValue::Set(run_id.clone()),
        experiment: ActiveValue::Set(request.experiment.clone()),
        instance_id: ActiveValue::Set(None),
        config: ActiveValue::Set(config.to_string()),
        status: ActiveValue::Set("pending".into()),
        created_at: ActiveValue::Set(now),
        updated_at: ActiveValue::Set(now),
        lines: ActiveValue::Set(0),
        results: ActiveValue::Set(0),
        batches: ActiveValue::Set(0),
        ..Default::default()
    })
    .exec_without_returning(&state.db)
    .await?;
    let run_request = RunRequest {
        run_id: run_id.clone(),
        experiment: request.experiment.clone(),
        config: config.clone(),
        instance_id: None,
        requested_at: now,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::headers::MSG_ID, run_id.as_str());
    let payload = serde_json::to_vec(&run_request).expect("a request serialises");
    let published = async {
        state
            .js
            .publish_with_headers(
                names::request_subject(&request.experiment),
                headers,
                payload.into(),
            )
            .await?
            .await
    };
    if let Err(e) = published.await {
        // The run will never start: say so on its row rather than leave it pending.
        let error = format!("the run request could not be queued: {e}");
        let failed = runs::ActiveModel {
            id: ActiveValue::Unchanged(run_id.clone()),
            status: ActiveValue::Set("failed".into()),
            error: ActiveValue::Set(Some(error.clone())),
            finished_at: ActiveValue::Set(Some(now_micros())),
            ..Default::default()
        };
        let _ = runs::Entity::update(failed).exec(&state.db).await;
        return Err(ApiError::Nats(error));
    }
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": run_id, "status": "pending", "experiment": request.experiment, "config": config }),
        ),
    ))
}

fn run_json(run: runs::Model) -> Value {
    let progress = run.progress_at.map(|at| {
        json!({ "current": run.progress_current, "total": run.progress_total, "message": run.progress_message, "at": at })
    });
    json!({
        "id": run.id,
        "experiment": run.experiment,
        "instance_id": run.instance_id,
        "config": serde_json::from_str::<Value>(&run.config).unwrap_or(Value::Null),
        "status": run.status,
        "error": run.error,
        "worker_id": run.worker_id,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "progress": progress,
        "lines": run.lines,
        "results": run.results,
        "batches": run.batches,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListRuns {
    status: Option<String>,
    experiment: Option<String>,
    limit: Option<u64>,
    offset: Option<u64>,
}

pub(crate) async fn list_runs(
    State(state): AppStateRef,
    query: Result<Query<ListRuns>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let offset = q.offset.unwrap_or(0);
    let mut find = runs::Entity::find();
    if let Some(status) = &q.status {
        find = find.filter(runs::Column::Status.eq(status.as_str()));
    }
    if let Some(experiment) = &q.experiment {
        find = find.filter(runs::Column::Experiment.eq(experiment.as_str()));
    }
    let total = find.clone().count(&state.db).await?;
    let rows = find
        .order_by_desc(runs::Column::CreatedAt)
        .order_by_desc(runs::Column::Id)
        .limit(limit)
        .offset(offset)
        .all(&state.db)
        .await?;
    Ok(Json(
        json!({ "runs": rows.into_iter().map(run_json).collect::<Vec<_>>(), "total": total, "limit": limit, "offset": offset }),
    ))
}

async fn find_run(state: &AppState, id: &str) -> ApiResult<runs::Model> {
    runs::Entity::find_by_id(id.to_string())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id:?} not found")))
}

pub(crate) async fn get_run(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(run_json(find_run(&state, &id).await?)))
}

/// Asks the run to stop. Idempotent while the run is pending or running; a finished
/// run answers 409.
pub(crate) async fn cancel_run(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let run = find_run(&state, &id).await?;
    if !matches!(run.status.as_str(), "pending" | "running") {
        return Err(ApiError::Conflict(format!(
            "run {id} already finished ({}); there is nothing to cancel",
            run.status
        )));
    }
    let value = serde_json::to_vec(&json!({ "requested_at": now_micros() })).expect("serialises");
    state
        .control
        .put(names::cancel_key(&id), value.into())
        .await
        .map_err(|e| ApiError::Nats(e.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": run.status, "cancel": "requested" })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogQuery {
    /// Lines with `seq` greater than this.
    after: Option<i64>,
    /// Lines with `seq` less than this (the newest such lines, for scrolling up).
    before: Option<i64>,
    limit: Option<u64>,
    /// Comma-separated levels.
    level: Option<String>,
    /// Case-insensitive text search in the message.
    q: Option<String>,
}

fn log_json(line: run_logs::Model) -> Value {
    json!({
        "seq": line.seq,
        "ts": line.ts,
        "level": line.level,
        "message": line.message,
        "metadata": line.metadata.and_then(|m| serde_json::from_str::<Value>(&m).ok()),
    })
}

pub(crate) async fn logs(
    State(state): AppStateRef,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let run = find_run(&state, &id).await?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let mut find = run_logs::Entity::find().filter(run_logs::Column::RunId.eq(id.as_str()));
    if let Some(after) = q.after {
        find = find.filter(run_logs::Column::Seq.gt(after));
    }
    if let Some(before) = q.before {
        find = find.filter(run_logs::Column::Seq.lt(before));
    }
    if let Some(levels) = q.level.as_deref().filter(|l| !l.is_empty()) {
        let levels: Vec<String> = levels.split(',').map(|l| l.trim().to_lowercase()).collect();
        if let Some(bad) = levels
            .iter()
            .find(|l| !["trace", "debug", "info", "warn", "error"].contains(&l.as_str()))
        {
            return Err(ApiError::BadRequest(format!(
                "unknown level {bad:?} (use trace, debug, info, warn, error)"
            )));
        }
        find = find.filter(run_logs::Column::Level.is_in(levels));
    }
    if let Some(text) = q.q.as_deref().filter(|t| !t.is_empty()) {
        let pattern = format!(
            "%{}%",
            text.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        find = find.filter(
            Expr::expr(Func::lower(Expr::col(run_logs::Column::Message)))
                .like(LikeExpr::new(pattern).escape('\\')),
        );
    }
    // Only `before`: the newest lines before it (scrolling up); otherwise oldest first.
    let newest_first = q.before.is_some() && q.after.is_none();
    let find = if newest_first {
        find.order_by_desc(run_logs::Column::Seq)
    } else {
        find.order_by_asc(run_logs::Column::Seq)
    };
    let mut lines = find.limit(limit + 1).all(&state.db).await?;
    let more = lines.len() as u64 > limit;
    lines.truncate(limit as usize);
    if newest_first {
        lines.reverse();
    }
    Ok(Json(json!({
        "run_id": id,
        "lines": lines.into_iter().map(log_json).collect::<Vec<_>>(),
        "more": more,
        "total": run.lines,
        "status": run.status,
    })))
}

/// The whole log as text, one line per log line (`time level message`), streamed page
/// by page: it works while the run is going (what is stored so far).
pub(crate) async fn logs_txt(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    find_run(&state, &id).await?;
    let stream = futures::stream::try_unfold(
        (state, id.clone(), -1i64, false),
        |(state, id, after, done)| async move {
            if done {
                return Ok::<_, std::io::Error>(None);
            }
            let page = run_logs::Entity::find()
                .filter(run_logs::Column::RunId.eq(id.as_str()))
                .filter(run_logs::Column::Seq.gt(after))
                .order_by_asc(run_logs::Column::Seq)
                .limit(5000)
                .all(&state.db)
                .await
                .map_err(std::io::Error::other)?;
            let done = page.len() < 5000;
            let last = page.last().map_or(after, |l| l.seq);
            let mut text = String::with_capacity(page.len() * 128);
            for line in page {
                text.push_str(&format_time(line.ts));
                text.push(' ');
                text.push_str(&line.level.to_uppercase());
                text.push(' ');
                text.push_str(&line.message);
                text.push('\n');
            }
            Ok(Some((text, (state, id, last, done))))
        },
    );
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.log\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

pub(crate) async fn results(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    find_run(&state, &id).await?;
    let rows = run_results::Entity::find()
        .filter(run_results::Column::RunId.eq(id.as_str()))
        .order_by_asc(run_results::Column::Key)
        .all(&state.db)
        .await?;
    let results: Vec<Value> = rows
        .into_iter()
        .map(|r| json!({ "key": r.key, "value": serde_json::from_str::<Value>(&r.value).unwrap_or(Value::Null), "seq": r.seq, "ts": r.ts }))
        .collect();
    Ok(Json(json!({ "run_id": id, "results": results })))
}

/// µs since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
fn format_time(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let millis = micros.rem_euclid(1_000_000) / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times_in_utc() {
        assert_eq!(super::format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::format_time(1_764_194_400_123_456),
            "2025-11-26T22:00:00.123Z"
        );
        assert_eq!(
            super::format_time(951_825_600_000_000),
            "2000-02-29T12:00:00.000Z"
        );
    }
}
