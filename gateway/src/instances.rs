//! Instances: a named, configured experiment, kept so the same run can be started
//! again. Their config is validated against the experiment's schema when saved and
//! again when a run starts (the schema may have changed since).

use athanor_connections::db::write_turn;
use std::collections::hash_map::{Entry, HashMap};

use athanor_connections::db::stmt;
use athanor_schemas::api::{
    Instance, InstanceChange, InstanceList, LastRun, NewInstance, RunCreated, RunOverrides,
};
use athanor_schemas::entities::instances;
use athanor_schemas::{names, now_micros};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::Json;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::IntoParams;

use crate::api::{body, start_run, validated_config, AppStateRef};
use crate::error::{ApiError, ApiResult, ErrorBody};

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only instances of this experiment.
    experiment: Option<String>,
}

/// The `{id}` of an instance's paths.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // describes the path; handlers take `Path<String>`
pub(crate) struct InstanceId {
    /// Instance id.
    id: String,
}

fn instance_json(instance: instances::Model, runs: u64, last_run: Option<LastRun>) -> Instance {
    Instance {
        id: instance.id,
        name: instance.name,
        experiment: instance.experiment,
        config: serde_json::from_str::<Value>(&instance.config).unwrap_or(Value::Null),
        created_at: instance.created_at,
        updated_at: instance.updated_at,
        runs,
        last_run,
    }
}

/// The instances with their run count and newest run (one query per 500 instances;
/// index `runs_instance_created`).
async fn with_runs(
    state: &crate::AppState,
    rows: Vec<instances::Model>,
) -> ApiResult<Vec<Instance>> {
    let backend = state.db.get_database_backend();
    let mut stats: HashMap<String, (u64, LastRun)> = HashMap::new();
    for chunk in rows.chunks(500) {
        let sql = format!(
            "SELECT r.instance_id AS instance_id, r.id AS id, r.status AS status, \
             r.created_at AS created_at, c.n AS n FROM runs r JOIN \
             (SELECT instance_id, COUNT(*) AS n, MAX(created_at) AS newest FROM runs \
              WHERE instance_id IN ({}) GROUP BY instance_id) c \
             ON r.instance_id = c.instance_id AND r.created_at = c.newest",
            vec!["?"; chunk.len()].join(", ")
        );
        let ids = chunk.iter().map(|i| i.id.as_str().into()).collect();
        for row in state.db.query_all(stmt(backend, &sql, ids)).await? {
            let instance: String = row.try_get("", "instance_id")?;
            let id: String = row.try_get("", "id")?;
            let status: String = row.try_get("", "status")?;
            let last = LastRun {
                status: crate::hub::stored_state(&status, &id)?,
                id,
                created_at: row.try_get("", "created_at")?,
            };
            let n: i64 = row.try_get("", "n")?;
            // Two runs created in the same µs: the greater id, as the run list orders.
            match stats.entry(instance) {
                Entry::Occupied(mut held) if held.get().1.id < last.id => {
                    held.insert((n as u64, last));
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(slot) => {
                    slot.insert((n as u64, last));
                }
            }
        }
    }
    Ok(rows
        .into_iter()
        .map(|instance| {
            let (runs, last) = stats
                .remove(&instance.id)
                .map_or((0, None), |(n, last)| (n, Some(last)));
            instance_json(instance, runs, last)
        })
        .collect())
}

async fn one_with_runs(state: &crate::AppState, instance: instances::Model) -> ApiResult<Instance> {
    Ok(with_runs(state, vec![instance])
        .await?
        .pop()
        .expect("one in, one out"))
}

fn checked_name(name: &str) -> ApiResult<String> {
    let name = name.trim();
    if name.contains('\0') {
        return Err(ApiError::BadRequest("`name` holds a NUL character".into()));
    }
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::BadRequest(
            "`name` must hold 1 to 200 characters".into(),
        ));
    }
    Ok(name.to_string())
}

async fn find(state: &crate::AppState, id: &str) -> ApiResult<instances::Model> {
    instances::Entity::find_by_id(id.to_string())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("instance {id:?} not found")))
}

/// Create an instance (config validated against the experiment's schema).
#[utoipa::path(post, path = "/api/instances", tag = "instances",
    request_body = NewInstance,
    responses(
        (status = 201, description = "Created", body = Instance),
        (status = 400, description = "Malformed request body or name", body = ErrorBody),
        (status = 404, description = "No live worker hosts the experiment", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 422, description = "The config does not fit the experiment's schema: `field` and `reason` say how", body = ErrorBody),
        (status = 503, description = "The database or NATS is unavailable", body = ErrorBody),
    ))]
pub(crate) async fn create(
    axum::extract::State(state): AppStateRef,
    request: Result<Json<NewInstance>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let request = body(&state, request)?;
    let name = checked_name(&request.name)?;
    let config = validated_config(&state, &request.experiment, &request.config).await?;
    let now = now_micros();
    let instance = instances::Model {
        id: names::new_run_id(),
        name,
        experiment: request.experiment,
        config: config.to_string(),
        created_at: now,
        updated_at: now,
    };
    let _turn = write_turn(&state.db).await;
    instances::Entity::insert(instances::ActiveModel::from(instance.clone()))
        .exec_without_returning(&state.db)
        .await?;
    Ok((StatusCode::CREATED, Json(instance_json(instance, 0, None))))
}

/// Instances, by name.
#[utoipa::path(get, path = "/api/instances", tag = "instances", params(ListQuery), responses(
    (status = 200, description = "Instances", body = InstanceList),
    (status = 400, description = "An unknown parameter", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn list(
    axum::extract::State(state): AppStateRef,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<InstanceList>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut find = instances::Entity::find();
    if let Some(experiment) = &q.experiment {
        find = find.filter(instances::Column::Experiment.eq(experiment.as_str()));
    }
    let rows = find
        .order_by_asc(instances::Column::Name)
        .order_by_asc(instances::Column::Id)
        .all(&state.db)
        .await?;
    Ok(Json(InstanceList {
        instances: with_runs(&state, rows).await?,
    }))
}

/// One instance.
#[utoipa::path(get, path = "/api/instances/{id}", tag = "instances", params(InstanceId), responses(
    (status = 200, description = "The instance", body = Instance),
    (status = 404, description = "No such instance", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn get(
    axum::extract::State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    let instance = find(&state, &id).await?;
    Ok(Json(one_with_runs(&state, instance).await?))
}

/// Change an instance's name and/or config.
#[utoipa::path(put, path = "/api/instances/{id}", tag = "instances", params(InstanceId),
    request_body = InstanceChange,
    responses(
        (status = 200, description = "Updated", body = Instance),
        (status = 400, description = "Malformed request body or name", body = ErrorBody),
        (status = 404, description = "No such instance, or no live worker hosts its experiment", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 422, description = "The config does not fit the experiment's schema: `field` and `reason` say how", body = ErrorBody),
        (status = 503, description = "The database or NATS is unavailable", body = ErrorBody),
    ))]
pub(crate) async fn update(
    axum::extract::State(state): AppStateRef,
    Path(id): Path<String>,
    request: Result<Json<InstanceChange>, JsonRejection>,
) -> ApiResult<Json<Instance>> {
    let request = body(&state, request)?;
    let mut instance = find(&state, &id).await?;
    if let Some(name) = &request.name {
        instance.name = checked_name(name)?;
    }
    if let Some(config) = &request.config {
        instance.config = validated_config(&state, &instance.experiment, config)
            .await?
            .to_string();
    }
    instance.updated_at = now_micros();
    let _turn = write_turn(&state.db).await;
    let changed = instances::Entity::update_many()
        .col_expr(instances::Column::Name, Expr::value(instance.name.clone()))
        .col_expr(
            instances::Column::Config,
            Expr::value(instance.config.clone()),
        )
        .col_expr(
            instances::Column::UpdatedAt,
            Expr::value(instance.updated_at),
        )
        .filter(instances::Column::Id.eq(id.as_str()))
        .exec(&state.db)
        .await?
        .rows_affected;
    if changed == 0 {
        // Deleted meanwhile.
        return Err(ApiError::NotFound(format!("instance {id:?} not found")));
    }
    Ok(Json(one_with_runs(&state, instance).await?))
}

/// Delete an instance (its runs stay).
///
/// Its runs keep their `instance_id`.
#[utoipa::path(delete, path = "/api/instances/{id}", tag = "instances", params(InstanceId), responses(
    (status = 204, description = "Deleted"),
    (status = 404, description = "No such instance", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn delete(
    axum::extract::State(state): AppStateRef,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let _turn = write_turn(&state.db).await;
    let deleted = instances::Entity::delete_by_id(id.clone())
        .exec(&state.db)
        .await?
        .rows_affected;
    if deleted == 0 {
        return Err(ApiError::NotFound(format!("instance {id:?} not found")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Start a run of the instance; `config` fields override the instance's for this run.
///
/// The body is optional: none starts the run as saved; a body must be a JSON object.
#[utoipa::path(post, path = "/api/instances/{id}/runs", tag = "instances", params(InstanceId),
    request_body(content = Option<RunOverrides>, content_type = "application/json"),
    responses(
        (status = 201, description = "Run created", body = RunCreated),
        (status = 400, description = "Malformed request body", body = ErrorBody),
        (status = 404, description = "No such instance, or no live worker hosts its experiment", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 422, description = "The config does not fit the experiment's schema: `field` and `reason` say how", body = ErrorBody),
        (status = 503, description = "The database or NATS is unavailable", body = ErrorBody),
    ))]
pub(crate) async fn start_run_of(
    axum::extract::State(state): AppStateRef,
    Path(id): Path<String>,
    request: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<RunCreated>)> {
    // The body is optional: empty means "as saved".
    let request = match request {
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::TooLarge(state.max_body_bytes));
        }
        Err(rejection) => return Err(ApiError::BadRequest(rejection.body_text())),
        Ok(bytes) if bytes.is_empty() => None,
        Ok(bytes) => {
            let malformed =
                |e: serde_json::Error| ApiError::BadRequest(format!("malformed request body: {e}"));
            // An object, not a sequence serde would also accept for a struct.
            match serde_json::from_slice::<Value>(&bytes).map_err(malformed)? {
                object @ Value::Object(_) => {
                    Some(serde_json::from_value::<RunOverrides>(object).map_err(malformed)?)
                }
                _ => {
                    return Err(ApiError::BadRequest(
                        "malformed request body: expected a JSON object".into(),
                    ))
                }
            }
        }
    };
    let instance = find(&state, &id).await?;
    let mut config = match serde_json::from_str::<Value>(&instance.config) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    if let Some(overrides) = request {
        config.extend(overrides.config);
    }
    start_run(
        &state,
        &instance.experiment,
        &Value::Object(config),
        Some(instance.id),
    )
    .await
}
