//! The REST handlers under `/api`.

use std::collections::BTreeMap;
use std::sync::Arc;

use athanor_connections::db::write_turn;
use athanor_schemas::api::{
    CancelRequested, ConfigToCheck, CreateRun, Experiment, ExperimentList, LogPage, ResultList,
    RunCreated, RunDeleted, RunList, Stats, ValidConfig,
};
use athanor_schemas::batch::ResultRecord;
use athanor_schemas::entities::{run_logs, run_results, runs};
use athanor_schemas::events::{Lifecycle, RunView};
use athanor_schemas::requests::{RunRequest, WorkerInfo};
use athanor_schemas::{names, now_micros, ConfigSchema, RunState};
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
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::hub::run_state;
use crate::AppState;

pub(crate) type AppStateRef = State<Arc<AppState>>;

#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok`: the process answers.
    #[schema(pattern = "^ok$")]
    status: &'static str,
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Whether each dependency answers.
#[derive(Serialize, ToSchema)]
pub(crate) struct Ready {
    database: bool,
    nats: bool,
    /// Whether run output is being stored: `ATHANOR_RUNS` has room, and the
    /// aggregators acknowledge what waits in it.
    run_output: bool,
    /// Why not, when something is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Readiness: the database answers, NATS is connected, `ATHANOR_RUNS` has room for run
/// output, and the aggregators store what waits there (none has left it unacknowledged
/// for `gateway.storage_stall`: a database that is full or refuses writes).
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready", body = Ready),
    (status = 503, description = "Not ready, with the reason", body = Ready),
))]
pub(crate) async fn readyz(State(state): AppStateRef) -> Response {
    let db = athanor_connections::db::ping(&state.db).await;
    // Both connections: the gateway's, and the one its hubs follow runs on.
    let nats = state.js.client().connection_state() == async_nats::connection::State::Connected
        && state.hubs.follower.connected();
    let held = if nats {
        run_output_held(&state.js, state.storage_stall).await
    } else {
        None
    };
    let reason = match (db, nats, &held) {
        (false, _, _) => Some("the database does not answer".to_string()),
        (_, false, _) => Some("NATS is not connected".to_string()),
        (_, _, held) => held.clone(),
    };
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let ready = Ready {
        database: db,
        nats,
        run_output: held.is_none(),
        reason,
    };
    (status, Json(ready)).into_response()
}

/// Why run output is not being stored now, if it is not:
/// * `ATHANOR_RUNS` is at 90 % of its bound (the aggregator purges what it stored at
///   half, so it is full of batches no aggregator has stored);
/// * or a durable consumer of it (the aggregators') has batches waiting and has
///   acknowledged none for `stall`, counted from the later of its last acknowledgement
///   and the arrival of the oldest batch it waits on: its aggregators cannot write (a
///   full disk, a database down) or none runs.
///
/// `None` too when the stream cannot be read: NATS's own state says that.
pub(crate) async fn run_output_held(
    js: &async_nats::jetstream::Context,
    stall: std::time::Duration,
) -> Option<String> {
    // Fetching the stream reads its info: one request.
    let stream = js.get_stream(names::RUNS_STREAM).await.ok()?;
    run_output_held_in(&stream, largest_message(js), stall).await
}

/// The largest message a worker may publish: the server's `max_payload`.
fn largest_message(js: &async_nats::jetstream::Context) -> u64 {
    js.client().server_info().max_payload as u64
}

/// [`run_output_held`] for `ATHANOR_RUNS` fetched already (its info as fetched).
async fn run_output_held_in(
    stream: &async_nats::jetstream::stream::Stream,
    largest: u64,
    stall: std::time::Duration,
) -> Option<String> {
    let info = stream.cached_info();
    if let Some(full) = runs_stream_warning(info.state.bytes, info.config.max_bytes, largest) {
        return Some(full);
    }
    let now = now_micros() / 1_000_000;
    let mut stalled = None;
    let mut consumers = stream.consumers();
    while let Ok(Some(consumer)) = consumers.try_next().await {
        let waiting = consumer.num_pending + consumer.num_ack_pending as u64;
        // Hubs' ordered consumers are ephemeral and acknowledge nothing.
        if consumer.config.durable_name.is_none() || waiting == 0 {
            continue;
        }
        let acked = consumer
            .ack_floor
            .last_active
            .unwrap_or(consumer.created)
            .unix_timestamp();
        if now - acked >= stall.as_secs() as i64 {
            stalled = Some((
                consumer.name.clone(),
                consumer.ack_floor.stream_sequence,
                acked,
                waiting,
            ));
            break;
        }
    }
    drop(consumers);
    let (name, floor, acked, waiting) = stalled?;
    // A consumer idle for an hour that was handed a batch a moment ago is not stalled.
    let arrived = match stream.get_raw_message(floor + 1).await {
        Ok(message) => message.time.unix_timestamp(),
        Err(_) => acked,
    };
    let quiet = now - acked.max(arrived);
    (quiet >= stall.as_secs() as i64).then(|| {
        format!(
            "the aggregators have stored nothing for {quiet} s while {waiting} batches wait (consumer {name}): check their logs and their database (a full disk, the database down); the batches stay in ATHANOR_RUNS until stored"
        )
    })
}

/// Full: less room left than a tenth of the bound, or than one batch of the largest
/// size (a 4 MiB stream refuses a 1 MiB batch at 76 %, and workers wait from there) —
/// that counted as at most a quarter of the bound, so a server whose `max_payload`
/// dwarfs the stream does not read as full forever.
fn runs_stream_warning(bytes: u64, max_bytes: i64, largest: u64) -> Option<String> {
    let max = u64::try_from(max_bytes).ok().filter(|m| *m > 0)?;
    let room = max.saturating_sub(bytes);
    (room <= (max / 10).max(largest.min(max / 4))).then(|| {
        format!(
            "ATHANOR_RUNS is full ({bytes} of {max} bytes, nats.runs_max_bytes) with batches no aggregator has stored yet: workers wait to publish (nothing is lost) until an aggregator stores them; check that the aggregators run and the database takes writes"
        )
    })
}

/// This document.
///
/// The OpenAPI description of this API, generated from the handlers and types.
#[utoipa::path(get, path = "/api/openapi.json", tag = "meta", responses(
    (status = 200, description = "OpenAPI document", body = Object, content_type = "application/json"),
))]
pub(crate) async fn openapi() -> Response {
    static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        crate::openapi()
            .to_json()
            .expect("the OpenAPI document serialises")
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

pub(crate) async fn no_route() -> ApiError {
    ApiError::NotFound(
        "no such endpoint; the API is under /api (see /api/experiments, /api/runs)".into(),
    )
}

/// Experiments hosted by live workers, from `athanor_workers`.
pub(crate) struct Hosted {
    description: String,
    config_schema: Value,
    workers: usize,
    busy: usize,
    /// Run slots (`max_concurrent_runs`) of the hosting workers, and how many are taken.
    slots: usize,
    taken: usize,
}

pub(crate) async fn hosted(state: &AppState) -> ApiResult<BTreeMap<String, Hosted>> {
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
        let busy = usize::from(info.running.len() >= info.max_concurrent_runs);
        for e in info.experiments {
            let h = hosted.entry(e.name).or_insert(Hosted {
                description: e.description,
                config_schema: e.config_schema,
                workers: 0,
                busy: 0,
                slots: 0,
                taken: 0,
            });
            h.workers += 1;
            h.busy += busy;
            h.slots += info.max_concurrent_runs;
            h.taken += info.running.len().min(info.max_concurrent_runs);
        }
    }
    Ok(hosted)
}

/// Experiments hosted by live workers (from KV athanor_workers).
#[utoipa::path(get, path = "/api/experiments", tag = "experiments", responses(
    (status = 200, description = "Experiments", body = ExperimentList),
    (status = 503, description = "NATS is unavailable", body = ErrorBody),
))]
pub(crate) async fn experiments(State(state): AppStateRef) -> ApiResult<Json<ExperimentList>> {
    let experiments = hosted(&state)
        .await?
        .into_iter()
        .map(|(name, h)| Experiment {
            name,
            description: h.description,
            config_schema: h.config_schema,
            workers: h.workers,
            busy: h.busy,
        })
        .collect();
    Ok(Json(ExperimentList { experiments }))
}

/// The `{name}` of an experiment's paths.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // describes the path; handlers take `Path<String>`
pub(crate) struct ExperimentName {
    /// Experiment name.
    name: String,
}

/// Check a config against an experiment's schema without starting anything: the same
/// check a run's start makes (defaults applied; 422 naming the field that is wrong).
#[utoipa::path(post, path = "/api/experiments/{name}/validate", tag = "experiments",
    params(ExperimentName),
    request_body = ConfigToCheck,
    responses(
        (status = 200, description = "The config fits; with defaults applied", body = ValidConfig),
        (status = 400, description = "Malformed request body", body = ErrorBody),
        (status = 404, description = "No live worker hosts the experiment", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 422, description = "The config does not fit the experiment's schema: `field` and `reason` say how", body = ErrorBody),
        (status = 503, description = "NATS is unavailable", body = ErrorBody),
    ))]
pub(crate) async fn validate_config(
    State(state): AppStateRef,
    Path(name): Path<String>,
    request: Result<Json<ConfigToCheck>, JsonRejection>,
) -> ApiResult<Json<ValidConfig>> {
    let request = body(&state, request)?;
    let config = validated_config(&state, &name, &request.config).await?;
    Ok(Json(ValidConfig {
        experiment: name,
        config,
    }))
}

/// Maps a body that is not the expected JSON to 400 (or 413 when too large).
pub(crate) fn body<T>(state: &AppState, body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
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

/// Start a run.
///
/// The config is validated against the schema of the experiment as a live worker
/// publishes it; the run is recorded as `pending` and its request queued.
#[utoipa::path(post, path = "/api/runs", tag = "runs",
    request_body = CreateRun,
    responses(
        (status = 201, description = "Run created (pending)", body = RunCreated),
        (status = 400, description = "Malformed request body", body = ErrorBody),
        (status = 404, description = "No live worker hosts the experiment", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 422, description = "The config does not fit the experiment's schema: `field` and `reason` say how", body = ErrorBody),
        (status = 503, description = "The database or NATS is unavailable", body = ErrorBody),
    ))]
pub(crate) async fn create_run(
    State(state): AppStateRef,
    request: Result<Json<CreateRun>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<RunCreated>)> {
    let request = body(&state, request)?;
    start_run(&state, &request.experiment, &request.config, None).await
}

/// `config` checked against the schema of `experiment` as a live worker publishes it:
/// 404 when no live worker hosts it, 422 naming the field that is wrong.
pub(crate) async fn validated_config(
    state: &AppState,
    experiment: &str,
    config: &Value,
) -> ApiResult<Value> {
    let hosted = hosted(state).await?;
    let Some(hosting) = hosted.get(experiment) else {
        let known: Vec<&str> = hosted.keys().map(String::as_str).collect();
        return Err(ApiError::NotFound(format!(
            "unknown experiment {experiment:?} (live workers host: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    let schema = ConfigSchema::from_json_schema(&hosting.config_schema).unwrap_or_default();
    let config = schema
        .validate(config)
        .map_err(|e| ApiError::InvalidConfig {
            field: e.field,
            reason: e.reason,
        })?;
    Ok(Value::Object(config))
}

/// Validates, records the run as `pending`, queues its request and announces it.
pub(crate) async fn start_run(
    state: &AppState,
    experiment: &str,
    config: &Value,
    instance_id: Option<String>,
) -> ApiResult<(StatusCode, Json<RunCreated>)> {
    let config = validated_config(state, experiment, config).await?;
    let run_id = names::new_run_id();
    let now = now_micros();
    let turn = write_turn(&state.db).await;
    runs::Entity::insert(runs::ActiveModel {
        id: ActiveValue::Set(run_id.clone()),
        experiment: ActiveValue::Set(experiment.to_string()),
        instance_id: ActiveValue::Set(instance_id.clone()),
        config: ActiveValue::Set(config.to_string()),
        status: ActiveValue::Set(RunState::Pending.as_str().into()),
        created_at: ActiveValue::Set(now),
        updated_at: ActiveValue::Set(now),
        lines: ActiveValue::Set(0),
        results: ActiveValue::Set(0),
        batches: ActiveValue::Set(0),
        ..Default::default()
    })
    .exec_without_returning(&state.db)
    .await?;
    drop(turn);
    let run_request = RunRequest {
        run_id: run_id.clone(),
        experiment: experiment.to_string(),
        config: config.clone(),
        instance_id: instance_id.clone(),
        requested_at: now,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::headers::MSG_ID, run_id.as_str());
    let payload = serde_json::to_vec(&run_request).expect("a request serialises");
    let published = async {
        state
            .js
            .publish_with_headers(names::request_subject(experiment), headers, payload.into())
            .await?
            .await
    };
    if let Err(e) = published.await {
        // The run will never start: say so on its row rather than leave it pending.
        let error = format!("the run request could not be queued: {e}");
        let failed = runs::ActiveModel {
            id: ActiveValue::Unchanged(run_id.clone()),
            status: ActiveValue::Set(RunState::Failed.as_str().into()),
            error: ActiveValue::Set(Some(error.clone())),
            finished_at: ActiveValue::Set(Some(now_micros())),
            ..Default::default()
        };
        let _turn = write_turn(&state.db).await;
        let _ = runs::Entity::update(failed).exec(&state.db).await;
        return Err(ApiError::Nats(error));
    }
    let created = Lifecycle {
        run_id: run_id.clone(),
        status: RunState::Pending,
        experiment: Some(experiment.to_string()),
        error: None,
        at: now,
    };
    let announced = serde_json::to_vec(&created).expect("serialises");
    // A hint for run lists; the run is recorded whether or not it is heard.
    let _ = state
        .js
        .client()
        .publish(names::lifecycle_subject(&run_id), announced.into())
        .await;
    Ok((
        StatusCode::CREATED,
        Json(RunCreated {
            id: run_id,
            status: RunState::Pending,
            experiment: experiment.to_string(),
            instance_id,
            config,
        }),
    ))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListRuns {
    /// Only runs in this status.
    #[param(value_type = Option<athanor_schemas::RunState>)]
    status: Option<String>,
    /// Only runs of this experiment.
    experiment: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<u64>,
    /// Runs to skip.
    #[param(minimum = 0, maximum = 9223372036854775807_u64, default = 0)]
    offset: Option<u64>,
}

/// Runs, newest first.
#[utoipa::path(get, path = "/api/runs", tag = "runs", params(ListRuns), responses(
    (status = 200, description = "A page of runs", body = RunList),
    (status = 400, description = "An unknown status, a limit or offset out of range, or an unknown parameter", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn list_runs(
    State(state): AppStateRef,
    query: Result<Query<ListRuns>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<RunList>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_size(q.limit, 50, 500)?;
    let offset = q.offset.unwrap_or(0);
    if offset > i64::MAX as u64 {
        return Err(ApiError::BadRequest(format!(
            "offset must be at most {}",
            i64::MAX
        )));
    }
    let mut find = runs::Entity::find();
    if let Some(status) = &q.status {
        let state: RunState = status.parse().map_err(|_| {
            let states: Vec<&str> = RunState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::BadRequest(format!(
                "unknown status {status:?} (use {})",
                states.join(", ")
            ))
        })?;
        find = find.filter(runs::Column::Status.eq(state.as_str()));
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
    let mut runs: Vec<RunView> = rows
        .into_iter()
        .map(crate::hub::run_view)
        .collect::<ApiResult<_>>()?;
    say_why_pending(&state, &mut runs).await;
    Ok(Json(RunList {
        runs,
        total,
        limit,
        offset,
    }))
}

/// Fills in why each pending run of `views` waits, from the live workers'
/// registrations (read once, and only when there is a pending run). Left out when
/// NATS cannot be read: the run itself is still answered.
async fn say_why_pending(state: &AppState, views: &mut [RunView]) {
    if !views.iter().any(|v| v.status == RunState::Pending) {
        return;
    }
    let Ok(hosted) = hosted(state).await else {
        return;
    };
    for view in views.iter_mut().filter(|v| v.status == RunState::Pending) {
        view.waiting = Some(why_pending(hosted.get(&view.experiment), &view.experiment));
    }
}

fn why_pending(hosting: Option<&Hosted>, experiment: &str) -> String {
    let Some(h) = hosting else {
        return format!("no live worker hosts {experiment}");
    };
    let workers = if h.workers == 1 {
        "the worker".to_string()
    } else {
        format!("the {} workers", h.workers)
    };
    if h.taken >= h.slots {
        format!(
            "every run slot ({}) of {workers} hosting {experiment} is taken",
            h.slots
        )
    } else {
        format!(
            "queued: {} of {} run slots free on {workers} hosting {experiment}",
            h.slots - h.taken,
            h.slots
        )
    }
}

/// A `limit` parameter: `default` when absent, else 1..=`max`.
fn page_size(limit: Option<u64>, default: u64, max: u64) -> ApiResult<u64> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {max}, got {n}"
        ))),
    }
}

pub(crate) async fn find_run(state: &AppState, id: &str) -> ApiResult<runs::Model> {
    runs::Entity::find_by_id(id.to_string())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id:?} not found")))
}

/// One run.
#[utoipa::path(get, path = "/api/runs/{id}", tag = "runs", params(RunId), responses(
    (status = 200, description = "The run", body = RunView),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn get_run(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Json<RunView>> {
    let mut view = [crate::hub::run_view(find_run(&state, &id).await?)?];
    say_why_pending(&state, &mut view).await;
    let [view] = view;
    Ok(Json(view))
}

/// The `{id}` of a run's paths.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // describes the path; handlers take `Path<String>`
pub(crate) struct RunId {
    /// Run id.
    id: String,
}

/// Ask the run to stop (idempotent while pending or running).
///
/// Sets `cancel.<run_id>` in `athanor_control`; the worker stops the run, which ends
/// `cancelled`. A finished run answers 409.
#[utoipa::path(post, path = "/api/runs/{id}/cancel", tag = "runs", params(RunId), responses(
    (status = 202, description = "Cancel requested", body = CancelRequested),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 409, description = "The run already finished", body = ErrorBody),
    (status = 503, description = "The database or NATS is unavailable", body = ErrorBody),
))]
pub(crate) async fn cancel_run(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<CancelRequested>)> {
    let status = run_state(&find_run(&state, &id).await?)?;
    if status.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "run {id} already finished ({status}); there is nothing to cancel"
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
        Json(CancelRequested {
            id,
            status,
            cancel: "requested".into(),
        }),
    ))
}

/// What Athanor holds: runs, lines, the database's size, the run stream's size.
#[utoipa::path(get, path = "/api/stats", tag = "meta", responses(
    (status = 200, description = "Counts and sizes", body = Stats),
    (status = 503, description = "The database or NATS is unavailable", body = ErrorBody),
))]
pub(crate) async fn stats(State(state): AppStateRef) -> ApiResult<Json<Stats>> {
    use sea_orm::{ConnectionTrait, DatabaseBackend};
    let backend = state.db.get_database_backend();
    let size = match backend {
        DatabaseBackend::Postgres => "pg_database_size(current_database())",
        _ => "(SELECT page_count FROM pragma_page_count()) * (SELECT page_size FROM pragma_page_size())",
    };
    let sql = format!(
        "SELECT COUNT(*) AS runs, CAST(COALESCE(SUM(lines), 0) AS BIGINT) AS lines, {size} AS bytes FROM runs"
    );
    let row = state
        .db
        .query_one(athanor_connections::db::stmt(backend, &sql, vec![]))
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound(sql.clone()))?;
    let number = |column: &str| row.try_get::<i64>("", column).map(|n| n.max(0) as u64);
    let stream = state
        .js
        .get_stream(names::RUNS_STREAM)
        .await
        .map_err(|e| ApiError::Nats(e.to_string()))?;
    let warning =
        run_output_held_in(&stream, largest_message(&state.js), state.storage_stall).await;
    let info = stream.cached_info();
    Ok(Json(Stats {
        runs: number("runs")?,
        lines: number("lines")?,
        database_bytes: number("bytes")?,
        stream_bytes: info.state.bytes,
        stream_messages: info.state.messages,
        stream_max_bytes: u64::try_from(info.config.max_bytes).unwrap_or(0),
        warning,
    }))
}

/// Delete a finished run, with its log, results and metrics.
///
/// Every row of the run goes in one transaction, and the run is remembered as deleted:
/// its batches, still in `ATHANOR_RUNS` until the stream's age limit, do not bring it
/// back when they are delivered again. A run that is pending or running answers 409:
/// cancel it first.
#[utoipa::path(delete, path = "/api/runs/{id}", tag = "runs", params(RunId), responses(
    (status = 200, description = "Deleted; what was removed", body = RunDeleted),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 409, description = "The run is pending or running", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn delete_run(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Json<RunDeleted>> {
    let status = run_state(&find_run(&state, &id).await?)?;
    if !status.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "run {id} is {status}: cancel it first, then delete it"
        )));
    }
    let removed = {
        use sea_orm::TransactionTrait;
        let _turn = write_turn(&state.db).await;
        let txn = state.db.begin().await?;
        let removed = athanor_schemas::entities::delete_run(&txn, &id, now_micros()).await?;
        txn.commit().await?;
        removed
    };
    tracing::info!(run_id = %id, lines = removed.lines, "run deleted");
    Ok(Json(RunDeleted { id, removed }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogQuery {
    /// Lines with seq greater than this (oldest first).
    after: Option<i64>,
    /// Lines with seq less than this; alone: the newest such lines (for scrolling up).
    before: Option<i64>,
    /// Page size.
    #[param(minimum = 1, maximum = 10000, default = 1000)]
    limit: Option<u64>,
    /// Comma-separated levels: trace, debug, info, warn, error (empty: all).
    #[param(pattern = "^((trace|debug|info|warn|error)(,(trace|debug|info|warn|error))*)?$")]
    level: Option<String>,
    /// Case-insensitive text the message contains.
    q: Option<String>,
    /// Also count every stored line the request matches (`matching`): a search's
    /// total over the whole log, not only this page. Costs a scan of the range.
    #[param(default = false)]
    count: Option<bool>,
}

/// A page of stored log lines.
#[utoipa::path(get, path = "/api/runs/{id}/logs", tag = "runs", params(RunId, LogQuery), responses(
    (status = 200, description = "Lines", body = LogPage),
    (status = 400, description = "An unknown level, a limit out of range, or an unknown parameter", body = ErrorBody),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn logs(
    State(state): AppStateRef,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<LogPage>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let run = find_run(&state, &id).await?;
    let limit = page_size(q.limit, 1000, 10_000)?;
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
    let matching = if q.count == Some(true) {
        Some(find.clone().count(&state.db).await? as i64)
    } else {
        None
    };
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
    Ok(Json(LogPage {
        run_id: id,
        lines: lines.into_iter().map(crate::hub::log_line).collect(),
        more,
        total: run.lines,
        matching,
        status: run_state(&run)?,
    }))
}

/// `message` with each of its own line breaks (`\n`, `\r\n`, `\r`) written as a newline
/// and two spaces: a line of the download that starts with a space continues the record
/// above, so no message can forge a record of its own.
fn push_continued(text: &mut String, message: &str) {
    let mut rest = message;
    while let Some(at) = rest.find(['\n', '\r']) {
        text.push_str(&rest[..at]);
        text.push_str("\n  ");
        let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[at + skip..];
    }
    text.push_str(rest);
}

/// The whole stored log as text (`time LEVEL message` per line, a message's own line
/// breaks continuing on lines indented by two spaces); works while the run is going.
///
/// Streamed page by page, as an attachment named `<id>.log`: what is stored so far.
#[utoipa::path(get, path = "/api/runs/{id}/logs.txt", tag = "runs", params(RunId), responses(
    (status = 200, description = "Text", body = String, content_type = "text/plain"),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
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
                text.push_str(&athanor_schemas::format_time(line.ts));
                text.push(' ');
                text.push_str(&line.level.to_uppercase());
                text.push(' ');
                push_continued(&mut text, &line.message);
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

/// The run's results, newest value per key.
#[utoipa::path(get, path = "/api/runs/{id}/results", tag = "runs", params(RunId), responses(
    (status = 200, description = "Results", body = ResultList),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn results(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Json<ResultList>> {
    find_run(&state, &id).await?;
    let rows = run_results::Entity::find()
        .filter(run_results::Column::RunId.eq(id.as_str()))
        .order_by_asc(run_results::Column::Key)
        .all(&state.db)
        .await?;
    let results = rows
        .into_iter()
        .map(|r| ResultRecord {
            seq: r.seq as u64,
            key: r.key,
            value: serde_json::from_str::<Value>(&r.value).unwrap_or(Value::Null),
            ts: r.ts,
        })
        .collect();
    Ok(Json(ResultList {
        run_id: id,
        results,
    }))
}

#[cfg(test)]
mod tests {
    use super::runs_stream_warning;

    #[test]
    fn the_runs_stream_is_full_at_ninety_percent_or_without_room_for_a_batch() {
        let max = 4 << 20;
        // Batches of up to 64 KiB: full at 90 % (room ≤ 419 430 bytes).
        let small = 64 << 10;
        assert_eq!(runs_stream_warning(0, max, small), None);
        assert_eq!(runs_stream_warning(3_774_873, max, small), None);
        let full = runs_stream_warning(3_774_874, max, small).unwrap();
        assert!(
            full.starts_with(
                "ATHANOR_RUNS is full (3774874 of 4194304 bytes, nats.runs_max_bytes)"
            ),
            "{full}"
        );
        // Batches of up to 1 MiB (NATS's default max_payload): full once a batch of
        // that size no longer fits — the CI run where workers were refused
        // ("maximum bytes exceeded") below 90 % while /readyz said nothing.
        let large = 1 << 20;
        assert_eq!(runs_stream_warning(3_145_727, max, large), None);
        assert!(runs_stream_warning(3_145_728, max, large).is_some());
        // A max_payload of 64 MiB counts as a quarter of the bound, not as always full.
        assert_eq!(runs_stream_warning(0, max, 64 << 20), None);
        assert_eq!(runs_stream_warning(3_145_727, max, 64 << 20), None);
        // No bound (a stream declared by an older Athanor): never full.
        assert_eq!(runs_stream_warning(u64::MAX, -1, small), None);
        assert_eq!(runs_stream_warning(u64::MAX, 0, small), None);
    }
}
