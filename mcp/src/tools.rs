//! The tools, their arguments (each a JSON Schema with examples; unknown arguments are
//! refused) and how their answers are bounded.

use std::time::Duration;

use athanor_client::{Client, ClientError};
use athanor_schemas::api::{
    InstanceChange, LogQuery, NewInstance, RunFilter, RunOverrides, SeriesQuery,
};
use athanor_schemas::{LogLine, ResultRecord};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, Implementation, ProgressNotificationParam, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::Gateway;

/// Lines a log page holds when the call does not say.
pub const DEFAULT_LOG_LINES: u64 = 100;
/// The most lines one call returns.
pub const MAX_LOG_LINES: u64 = 1000;
/// A longer message is cut, with a marker saying how much was left out.
pub const MAX_LINE_CHARS: usize = 2000;
/// A result value with more JSON than this is shown as a preview in lists.
pub const INLINE_RESULT_BYTES: usize = 2000;
/// Result keys a list shows (the rest are counted).
pub const MAX_RESULTS: usize = 200;
/// `wait_for_run`'s wait when the call does not say, and the longest it waits.
pub const DEFAULT_WAIT_SECONDS: u64 = 120;
pub const MAX_WAIT_SECONDS: u64 = 600;
/// Lines of the log's end that `wait_for_run` returns when the call does not say.
const DEFAULT_WAIT_TAIL: u64 = 20;

type ToolResult = Result<CallToolResult, ErrorData>;

/// The tools, calling one gateway.
#[derive(Clone)]
pub struct Athanor {
    gateway: Gateway,
    tool_router: ToolRouter<Self>,
}

impl Athanor {
    pub(crate) fn new(gateway: Gateway) -> Self {
        Athanor {
            gateway,
            tool_router: Self::tool_router(),
        }
    }

    /// The API as the caller of this request may use it.
    fn api(&self, ctx: &RequestContext<RoleServer>) -> Result<Client, CallToolResult> {
        let authorization = ctx
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.headers.get(http::header::AUTHORIZATION))
            .and_then(|value| value.to_str().ok());
        self.gateway
            .client(authorization)
            .map_err(|e| failed(json!({ "error": e })))
    }
}

/// The caller's client, or the tool's answer that there is none (a token a header
/// cannot hold).
macro_rules! api {
    ($tools:expr, $ctx:expr) => {
        match $tools.api(&$ctx) {
            Ok(api) => api,
            Err(refusal) => return Ok(refusal),
        }
    };
}

// ---------------------------------------------------------------- arguments

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({}))]
pub struct NoArgs {}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"experiment": "sweep"}))]
pub struct ExperimentArgs {
    /// The experiment's name, as `list_experiments` gives it.
    pub experiment: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"experiment": "sweep", "config": {"iterations": 5}}))]
#[schemars(example = json!({"experiment": "sweep"}))]
pub struct ValidateArgs {
    pub experiment: String,
    /// Config fields; absent ones take their defaults.
    #[serde(default)]
    pub config: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({}))]
#[schemars(example = json!({"experiment": "sweep"}))]
pub struct ListInstancesArgs {
    /// Only instances of this experiment.
    #[serde(default)]
    pub experiment: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22"}))]
pub struct IdArgs {
    /// The id, as a list or a start gave it.
    pub id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"name": "short sweep", "experiment": "sweep", "config": {"iterations": 3}}))]
pub struct CreateInstanceArgs {
    /// 1 to 200 characters.
    pub name: String,
    pub experiment: String,
    /// Config fields; absent ones take their defaults.
    #[serde(default)]
    pub config: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "config": {"iterations": 4}}))]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "name": "long sweep"}))]
pub struct UpdateInstanceArgs {
    pub id: String,
    /// A new name; absent: unchanged.
    #[serde(default)]
    pub name: Option<String>,
    /// The whole new config (absent fields take their defaults); absent: unchanged.
    #[serde(default)]
    pub config: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({}))]
#[schemars(example = json!({"status": "running", "experiment": "sweep", "limit": 20}))]
pub struct ListRunsArgs {
    /// Only runs in this status: pending, running, completed, failed, cancelled or lost.
    #[serde(default)]
    pub status: Option<String>,
    /// Only runs of this experiment.
    #[serde(default)]
    pub experiment: Option<String>,
    /// Runs per page, 1 to 500 (default 50), newest first.
    #[serde(default)]
    #[schemars(range(min = 1, max = 500))]
    pub limit: Option<u64>,
    /// Runs to skip.
    #[serde(default)]
    pub offset: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"experiment": "sweep", "config": {"iterations": 5, "delay_ms": 0}}))]
#[schemars(example = json!({"instance_id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "config": {"iterations": 1}}))]
pub struct StartRunArgs {
    /// The experiment to run (or give `instance_id`).
    #[serde(default)]
    pub experiment: Option<String>,
    /// A saved instance to run (or give `experiment`).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// With `experiment`: the config (absent fields take their defaults). With
    /// `instance_id`: fields replacing the instance's for this run only.
    #[serde(default)]
    pub config: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22"}))]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "after": 99, "limit": 50, "level": "warn,error", "search": "loss"}))]
pub struct LogsArgs {
    /// The run's id.
    pub id: String,
    /// Lines with a `seq` greater than this (paging forward: the last `seq` seen).
    #[serde(default)]
    pub after: Option<i64>,
    /// Lines with a `seq` less than this (paging back; alone: the newest such lines).
    #[serde(default)]
    pub before: Option<i64>,
    /// Comma-separated levels: trace, debug, info, warn, error.
    #[serde(default)]
    pub level: Option<String>,
    /// Case-insensitive text the message must contain.
    #[serde(default)]
    pub search: Option<String>,
    /// Lines, 1 to 1000 (default 100).
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "lines": 50}))]
pub struct TailArgs {
    /// The run's id.
    pub id: String,
    /// Lines from the end, 1 to 1000 (default 100).
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub lines: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "key": "best"}))]
pub struct ResultArgs {
    /// The run's id.
    pub id: String,
    /// The result's key, as `list_results` gives it.
    pub key: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "name": "loss"}))]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "name": "loss", "max_points": 50, "from_step": 1000, "to_step": 2000}))]
pub struct SeriesArgs {
    /// The run's id.
    pub id: String,
    /// The metric's name, as `list_metrics` gives it.
    pub name: String,
    /// Buckets at most, 1 to 1000 (default 100); each keeps its steps' minimum,
    /// maximum and last value. A series with no more points comes back exactly.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub max_points: Option<u64>,
    /// First step (inclusive).
    #[serde(default)]
    pub from_step: Option<u64>,
    /// Last step (inclusive).
    #[serde(default)]
    pub to_step: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22"}))]
#[schemars(example = json!({"id": "019aa3f2-7c1e-7d40-9a3b-5b2f0c8e1d22", "timeout_seconds": 300, "tail": 50}))]
pub struct WaitArgs {
    /// The run's id.
    pub id: String,
    /// Longest wait, 1 to 600 seconds (default 120); the answer says whether the run
    /// ended or the wait timed out.
    #[serde(default)]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: Option<u64>,
    /// Lines of the log's end to return, 0 to 1000 (default 20).
    #[serde(default)]
    #[schemars(range(max = 1000))]
    pub tail: Option<u64>,
}

// ---------------------------------------------------------------- tools

#[tool_router]
impl Athanor {
    #[tool(
        description = "List the experiments that live workers host: name, description, the JSON Schema of its config, and how many workers host it. Start here: an experiment must be listed to be run.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_experiments(
        &self,
        Parameters(NoArgs {}): Parameters<NoArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(
            api.experiments()
                .await
                .map(|experiments| json!({ "experiments": experiments })),
        )
    }

    #[tool(
        description = "The JSON Schema of one experiment's config: each field's type, default, bounds and description.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_config_schema(
        &self,
        Parameters(args): Parameters<ExperimentArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        let experiments = match api.experiments().await {
            Ok(list) => list,
            Err(e) => return Ok(refused(e)),
        };
        let names: Vec<&str> = experiments.iter().map(|e| e.name.as_str()).collect();
        match experiments.iter().find(|e| e.name == args.experiment) {
            Some(e) => Ok(structured(json!({
                "experiment": e.name,
                "description": e.description,
                "config_schema": e.config_schema,
            }))),
            None => Ok(failed(json!({
                "error": format!(
                    "unknown experiment {:?} (live workers host: {})",
                    args.experiment,
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                ),
            }))),
        }
    }

    #[tool(
        description = "Check a config against an experiment's schema without starting anything. Valid: the config with defaults applied, as a run would get it. Invalid: an error naming the `field` and the `reason`.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn validate_config(
        &self,
        Parameters(args): Parameters<ValidateArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(
            api.validate_config(&args.experiment, object(args.config))
                .await,
        )
    }

    #[tool(
        description = "List saved instances (a named config of an experiment, to run again), by name, each with its run count and newest run (id, status, time).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_instances(
        &self,
        Parameters(args): Parameters<ListInstancesArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(
            api.instances(args.experiment.as_deref())
                .await
                .map(|instances| json!({ "instances": instances })),
        )
    }

    #[tool(
        description = "One saved instance: its experiment, config, run count and newest run.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_instance(
        &self,
        Parameters(args): Parameters<IdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(api.instance(&args.id).await)
    }

    #[tool(
        description = "Save a named config of an experiment as an instance, to run it again with `start_run` (instance_id). The config is validated as a run's would be.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn create_instance(
        &self,
        Parameters(args): Parameters<CreateInstanceArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        let instance = NewInstance {
            name: args.name,
            experiment: args.experiment,
            config: object(args.config),
        };
        answer(api.create_instance(&instance).await)
    }

    #[tool(
        description = "Rename an instance and/or replace its config (validated). Runs already started keep their config.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn update_instance(
        &self,
        Parameters(args): Parameters<UpdateInstanceArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        let change = InstanceChange {
            name: args.name,
            config: args.config.map(Value::Object),
        };
        answer(api.update_instance(&args.id, &change).await)
    }

    #[tool(
        description = "Delete a saved instance. Its runs, logs and results stay.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn delete_instance(
        &self,
        Parameters(args): Parameters<IdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(
            api.delete_instance(&args.id)
                .await
                .map(|()| json!({ "deleted": args.id })),
        )
    }

    #[tool(
        description = "List runs, newest first, with the total that match: status, progress, line/result counts and error of each. Filter by status and experiment; page with limit and offset.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_runs(
        &self,
        Parameters(args): Parameters<ListRunsArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        let filter = RunFilter {
            status: args.status,
            experiment: args.experiment,
            limit: args.limit,
            offset: args.offset,
        };
        answer(api.runs(&filter).await)
    }

    #[tool(
        description = "One run: status (pending, running, completed, failed, cancelled, lost), config, progress, lines and results stored, error, times (µs since the epoch).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_run(
        &self,
        Parameters(args): Parameters<IdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(api.run(&args.id).await)
    }

    #[tool(
        description = "Start a run, of an experiment with a config, or of a saved instance with fields overridden for this run. Returns the run's id (status pending); follow it with `wait_for_run`. A config that does not fit is refused naming the field.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn start_run(
        &self,
        Parameters(args): Parameters<StartRunArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        match (args.experiment, args.instance_id) {
            (Some(experiment), None) => {
                answer(api.start_run(&experiment, object(args.config)).await)
            }
            (None, Some(instance)) => {
                let overrides = RunOverrides {
                    config: args.config.unwrap_or_default(),
                };
                answer(api.start_instance(&instance, &overrides).await)
            }
            _ => Ok(failed(json!({
                "error": "give either `experiment` (with `config`) or `instance_id` (with `config` overrides), not both and not neither"
            }))),
        }
    }

    #[tool(
        description = "Ask the worker to cancel a pending or running run; it ends as `cancelled` (use `wait_for_run` to see it). A run that has finished is refused.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn cancel_run(
        &self,
        Parameters(args): Parameters<IdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(api.cancel(&args.id).await)
    }

    #[tool(
        description = "A page of a run's stored log, oldest first: lines after (or before) a seq, filtered by level and search text; with `total` (lines stored), `more` (more lines match) and, on a filtered request without after/before, `matching` (how many lines of the whole log match). Page forward with after = the last seq returned. Messages over 2000 characters are cut with a marker.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_run_logs(
        &self,
        Parameters(args): Parameters<LogsArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        // A search's total over the whole log, once: on its first page.
        let filtered = args.level.is_some() || args.search.is_some();
        let count = filtered && args.after.is_none() && args.before.is_none();
        let query = LogQuery {
            after: args.after,
            before: args.before,
            limit: Some(bounded_lines(args.limit)),
            level: args.level,
            q: args.search,
            count: count.then_some(true),
        };
        answer(api.logs(&args.id, &query).await.map(|page| {
            json!({
                "run_id": page.run_id,
                "status": page.status,
                "total": page.total,
                "matching": page.matching,
                "more": page.more,
                "lines": cut_lines(page.lines),
            })
        }))
    }

    #[tool(
        description = "The last lines of a run's log, oldest first, with the run's status and the total stored. Messages over 2000 characters are cut with a marker.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn tail_run_logs(
        &self,
        Parameters(args): Parameters<TailArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(
            tail(&api, &args.id, bounded_lines(args.lines))
                .await
                .map(|(status, total, lines)| {
                    json!({ "run_id": args.id, "status": status, "total": total, "lines": lines })
                }),
        )
    }

    #[tool(
        description = "A run's results: each key with its newest value, the first 200 keys. A value over 2000 bytes of JSON is shown as a preview; `get_result` gives it whole.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_results(
        &self,
        Parameters(args): Parameters<IdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(api.results(&args.id).await.map(
            |list| json!({ "run_id": list.run_id, "results": summarised(&args.id, list.results) }),
        ))
    }

    #[tool(
        description = "One result of a run in full: its key, value, seq and time.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_result(
        &self,
        Parameters(args): Parameters<ResultArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        let list = match api.results(&args.id).await {
            Ok(list) => list,
            Err(e) => return Ok(refused(e)),
        };
        match list.results.into_iter().find(|r| r.key == args.key) {
            Some(record) => Ok(structured(json!(record))),
            None => Ok(failed(json!({
                "error": format!("run {} has no result {:?} (list_results gives its keys)", args.id, args.key)
            }))),
        }
    }

    #[tool(
        description = "A run's metric series (loss, accuracy, …): each name with its point count, minimum, maximum and last value and step.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_metrics(
        &self,
        Parameters(args): Parameters<IdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        answer(api.metrics(&args.id).await)
    }

    #[tool(
        description = "One metric of a run against the step, downsampled to at most max_points buckets that each keep their steps' minimum, maximum and last value (spikes stay visible); exact when the series is small. Narrow with from_step and to_step.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn get_metric_series(
        &self,
        Parameters(args): Parameters<SeriesArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        let query = SeriesQuery {
            max_points: Some(args.max_points.unwrap_or(100).clamp(1, 1000)),
            from_step: args.from_step,
            to_step: args.to_step,
        };
        answer(api.series(&args.id, &args.name, &query).await)
    }

    #[tool(
        description = "Wait until a run ends (completed, failed, cancelled or lost) or timeout_seconds pass (default 120, at most 600), then return its status, whether it ended, the last lines of its log and its results, so there is no need to poll. With a progress token, the run's progress is sent as progress notifications while waiting.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn wait_for_run(
        &self,
        Parameters(args): Parameters<WaitArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let api = api!(self, ctx);
        let wait = args
            .timeout_seconds
            .unwrap_or(DEFAULT_WAIT_SECONDS)
            .clamp(1, MAX_WAIT_SECONDS);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
        let progress_token = ctx.meta.get_progress_token();
        // Progress notifications must increase: sent when `current` grows.
        let mut told: Option<u64> = None;
        let mut pause = Duration::from_millis(100);
        let run = loop {
            let run = match api.run(&args.id).await {
                Ok(run) => run,
                Err(e) => return Ok(refused(e)),
            };
            if let (Some(token), Some(progress)) = (&progress_token, &run.progress) {
                if told.is_none_or(|told| progress.current > told) {
                    let mut note =
                        ProgressNotificationParam::new(token.clone(), progress.current as f64)
                            .with_total(progress.total as f64);
                    if let Some(message) = &progress.message {
                        note = note.with_message(message.clone());
                    }
                    let _ = ctx.peer.notify_progress(note).await;
                    told = Some(progress.current);
                }
            }
            let now = tokio::time::Instant::now();
            if run.status.is_terminal() || now >= deadline {
                break run;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause.min(deadline - now)) => {}
                _ = ctx.ct.cancelled() => {
                    return Err(ErrorData::internal_error("the wait was cancelled", None));
                }
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        };
        let ended = run.status.is_terminal();
        let tail_lines = args.tail.unwrap_or(DEFAULT_WAIT_TAIL).min(MAX_LOG_LINES);
        let (total, lines) = if tail_lines == 0 {
            (run.lines, Vec::new())
        } else {
            match tail(&api, &args.id, tail_lines).await {
                Ok((_, total, lines)) => (total, lines),
                Err(e) => return Ok(refused(e)),
            }
        };
        let results = match api.results(&args.id).await {
            Ok(list) => summarised(&args.id, list.results),
            Err(e) => return Ok(refused(e)),
        };
        Ok(structured(json!({
            "id": run.id,
            "ended": ended,
            "timed_out": !ended,
            "status": run.status,
            "error": run.error,
            "progress": run.progress,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "total_lines": total,
            "tail": lines,
            "results": results,
        })))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Athanor {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("athanor", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Athanor runs experiments on workers and keeps their logs, results and \
                 metric series. To run one: list_experiments (names and config schemas), \
                 validate_config if unsure, start_run, then wait_for_run (blocks until the \
                 run ends or a timeout) and read get_run_logs, list_results, list_metrics \
                 and get_metric_series. Instances are saved configs to run again. Write \
                 tools need the API token when the gateway has one.",
            )
    }
}

// ---------------------------------------------------------------- answers

/// A successful answer: the value as structured content (and as its JSON text).
fn structured(value: Value) -> CallToolResult {
    CallToolResult::structured(value)
}

/// A tool-level failure the agent sees (`isError`), with `error` saying what.
fn failed(value: Value) -> CallToolResult {
    CallToolResult::structured_error(value)
}

/// A refusal or failure of the gateway: its message, and for a config that does not
/// fit, the field and the reason.
fn refused(error: ClientError) -> CallToolResult {
    match error {
        ClientError::Refused {
            status,
            message,
            field,
            reason,
        } => {
            let mut body = json!({ "error": message, "status": status.as_u16() });
            if let Some(field) = field {
                body["field"] = json!(field);
            }
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            failed(body)
        }
        other => failed(json!({ "error": other.to_string() })),
    }
}

fn answer<T: Serialize>(result: Result<T, ClientError>) -> ToolResult {
    Ok(match result.map(serde_json::to_value) {
        Ok(Ok(value)) => structured(value),
        Ok(Err(e)) => failed(json!({ "error": format!("the answer could not be encoded: {e}") })),
        Err(e) => refused(e),
    })
}

/// A config as the API takes it: an object, or null for all defaults.
fn object(config: Option<Map<String, Value>>) -> Value {
    config.map_or(Value::Null, Value::Object)
}

fn bounded_lines(asked: Option<u64>) -> u64 {
    asked.unwrap_or(DEFAULT_LOG_LINES).clamp(1, MAX_LOG_LINES)
}

/// The run's status, the lines stored, and its last `n` lines (oldest first, cut).
async fn tail(
    api: &Client,
    id: &str,
    n: u64,
) -> Result<(athanor_schemas::RunState, i64, Vec<LogLine>), ClientError> {
    let query = LogQuery {
        before: Some(i64::MAX),
        limit: Some(n),
        ..LogQuery::default()
    };
    let page = api.logs(id, &query).await?;
    Ok((page.status, page.total, cut_lines(page.lines)))
}

/// Lines with messages over [`MAX_LINE_CHARS`] cut, saying how much was left out, and
/// metadata over that much JSON replaced by its cut text.
fn cut_lines(mut lines: Vec<LogLine>) -> Vec<LogLine> {
    for line in &mut lines {
        cut(&mut line.message);
        if let Some(metadata) = &mut line.metadata {
            let mut text = metadata.to_string();
            if text.chars().count() > MAX_LINE_CHARS {
                cut(&mut text);
                *metadata = Value::String(text);
            }
        }
    }
    lines
}

/// `text` cut to [`MAX_LINE_CHARS`] characters with a marker saying how many more
/// there were.
fn cut(text: &mut String) {
    let chars = text.chars().count();
    if chars > MAX_LINE_CHARS {
        let end = text
            .char_indices()
            .nth(MAX_LINE_CHARS)
            .map_or(text.len(), |(i, _)| i);
        text.truncate(end);
        text.push_str(&format!(
            " … [cut: {} more characters]",
            chars - MAX_LINE_CHARS
        ));
    }
}

/// The first [`MAX_RESULTS`] results (by key), values over [`INLINE_RESULT_BYTES`] of
/// JSON replaced by a preview and how to get the whole value; a last entry says how
/// many more keys there are.
fn summarised(run: &str, results: Vec<ResultRecord>) -> Vec<Value> {
    let more = results.len().saturating_sub(MAX_RESULTS);
    let mut out: Vec<Value> = results
        .into_iter()
        .take(MAX_RESULTS)
        .map(|record| {
            let text = record.value.to_string();
            if text.len() <= INLINE_RESULT_BYTES {
                return json!(record);
            }
            let end = (0..=INLINE_RESULT_BYTES / 2)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            json!({
                "key": record.key,
                "seq": record.seq,
                "ts": record.ts,
                "value_bytes": text.len(),
                "value_preview": format!("{} …", &text[..end]),
                "note": format!(
                    "value cut for size; get_result with id={run:?} key={:?} returns it whole",
                    record.key
                ),
            })
        })
        .collect();
    if more > 0 {
        out.push(json!({
            "more_keys": more,
            "note": format!("{more} more result keys not shown; get_result with id={run:?} and a key reads any one"),
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_with_a_marker_on_a_character_boundary() {
        let line = |message: String| LogLine {
            seq: 0,
            ts: 0,
            level: athanor_schemas::Level::Info,
            message,
            metadata: None,
        };
        let long = "é".repeat(MAX_LINE_CHARS + 5);
        let cut = cut_lines(vec![line(long), line("short".into())]);
        assert_eq!(
            cut[0].message,
            format!("{} … [cut: 5 more characters]", "é".repeat(MAX_LINE_CHARS))
        );
        assert_eq!(cut[1].message, "short");
    }

    #[test]
    fn large_result_values_become_a_preview_that_says_how_to_get_them() {
        let record = |key: &str, value: Value| ResultRecord {
            seq: 1,
            key: key.into(),
            value,
            ts: 7,
        };
        let big = json!("ü".repeat(INLINE_RESULT_BYTES));
        let out = summarised(
            "r1",
            vec![record("small", json!(0.5)), record("big", big.clone())],
        );
        assert_eq!(
            out[0],
            json!({"key": "small", "value": 0.5, "seq": 1, "ts": 7})
        );
        assert_eq!(out[1]["value_bytes"], big.to_string().len());
        assert!(out[1]["value_preview"].as_str().unwrap().ends_with(" …"));
        assert_eq!(
            out[1]["note"],
            "value cut for size; get_result with id=\"r1\" key=\"big\" returns it whole"
        );
    }

    #[test]
    fn a_list_of_results_shows_at_most_max_results_keys_and_counts_the_rest() {
        let records: Vec<ResultRecord> = (0..MAX_RESULTS + 5)
            .map(|i| ResultRecord {
                seq: i as u64,
                key: format!("k{i:04}"),
                value: json!(i),
                ts: 0,
            })
            .collect();
        let out = summarised("r", records);
        assert_eq!(out.len(), MAX_RESULTS + 1);
        assert_eq!(out[MAX_RESULTS]["more_keys"], 5);
    }

    #[test]
    fn large_metadata_is_cut_to_text() {
        let line = LogLine {
            seq: 0,
            ts: 0,
            level: athanor_schemas::Level::Info,
            message: "m".into(),
            metadata: Some(json!({"blob": "x".repeat(MAX_LINE_CHARS * 2)})),
        };
        let cut = cut_lines(vec![line]);
        let text = cut[0].metadata.as_ref().unwrap().as_str().unwrap();
        assert!(text.starts_with("{\"blob\":\"xxx"), "{text}");
        assert!(text.ends_with(" … [cut: 2011 more characters]"), "{text}");
    }

    /// Every tool's input schema refuses unknown arguments and carries examples.
    #[test]
    fn every_tool_schema_refuses_unknown_arguments_and_has_examples() {
        let tools = Athanor::tool_router().list_all();
        assert_eq!(tools.len(), 19);
        for tool in tools {
            let schema = &tool.input_schema;
            assert_eq!(
                schema.get("additionalProperties"),
                Some(&json!(false)),
                "{}",
                tool.name
            );
            assert!(
                schema
                    .get("examples")
                    .is_some_and(|e| e.as_array().is_some_and(|a| !a.is_empty())),
                "{} has no examples",
                tool.name
            );
            let annotations = tool.annotations.as_ref().expect("annotated");
            assert!(annotations.read_only_hint.is_some(), "{}", tool.name);
        }
    }
}
