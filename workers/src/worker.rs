//! The worker: its shared state, starting (connect, register, spawn the intake and
//! the cancel watch), and the ordered shutdown. Taking requests is in
//! [`crate::intake`]; running one run to its final batch is in [`crate::supervisor`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use athanor_connections::nats::{open, NatsConfig};
use athanor_schemas::requests::{ExperimentInfo, RunRequest, WorkerInfo};
use athanor_schemas::{names, now_micros, RunInfo, RunState};
use parking_lot::Mutex;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::buffer::Budget;
use crate::config::WorkerConfig;
use crate::context::RunShared;
use crate::experiment::Experiment;
use crate::flusher::{PublishStats, Publisher};
use crate::intake::consume_requests;
use crate::supervisor::watch_cancels;
use crate::{registry, Error, Result};

/// State shared by the worker's tasks.
pub(crate) struct WorkerShared {
    pub(crate) id: String,
    pub(crate) config: WorkerConfig,
    pub(crate) js: jetstream::Context,
    pub(crate) control: kv::Store,
    pub(crate) experiments: HashMap<String, Arc<dyn Experiment>>,
    /// Bounds unpublished output across all runs; `log()` blocks on it when full.
    pub(crate) budget: Arc<Budget>,
    /// Runs executing now, by id: the cancel watcher looks them up here.
    pub(crate) runs: Mutex<HashMap<String, Arc<RunShared>>>,
    /// Told when a run starts or ends: the registration is refreshed at once, so
    /// `running` (how busy the worker is) is current, not a heartbeat old.
    pub(crate) runs_changed: tokio::sync::Notify,
    /// One permit per concurrently executing run (`max_concurrent_runs`).
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) stats: Arc<PublishStats>,
    /// Runs whose experiment was started, for metrics and tests.
    pub(crate) runs_started: AtomicU64,
    /// `ATHANOR_RUNS`, to check whether a run already has output.
    pub(crate) runs_stream: jetstream::stream::Stream,
    pub(crate) max_payload: usize,
    pub(crate) started_at: i64,
    /// Cancelled to stop the worker: request loops stop, runs are cancelled.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled once every run has published its final batch: the heartbeat stops
    /// and the registration is deleted.
    pub(crate) deregister: CancellationToken,
    /// Every task of the worker but the heartbeat (request loops, run supervisors,
    /// the cancel watcher).
    pub(crate) tasks: TaskTracker,
}

/// A running worker. Dropping it does not stop it; cancel the token and `wait`.
pub struct Worker {
    shared: Arc<WorkerShared>,
    heartbeat: tokio::task::JoinHandle<()>,
}

/// Follows one run to its end.
pub struct RunHandle {
    pub run_id: String,
    pub(crate) state: watch::Receiver<Option<RunState>>,
}

impl RunHandle {
    /// Waits until the run's final batch is acknowledged; returns its terminal state.
    pub async fn finished(&mut self) -> RunState {
        match self.state.wait_for(Option::is_some).await {
            Ok(state) => state.expect("checked by wait_for"),
            // The supervisor is gone without a state: only when the runtime shuts down.
            Err(_) => RunState::Lost,
        }
    }
}

impl Worker {
    /// Connects, declares the topology, registers, and starts consuming requests for
    /// each of `experiments`.
    pub async fn start(
        config: WorkerConfig,
        nats: NatsConfig,
        experiments: Vec<Arc<dyn Experiment>>,
        shutdown: CancellationToken,
    ) -> Result<Worker> {
        crate::instruments::describe();
        let id = config.id.clone().unwrap_or_else(default_worker_id);
        let js = open(&nats, &format!("athanor-worker {id}")).await?;
        let max_payload = match js.client().server_info().max_payload {
            0 => 1 << 20,
            n => n,
        };
        if config.max_line_bytes + crate::flusher::HEADER_SLACK > max_payload {
            return Err(Error::LineOverPayload {
                max_line_bytes: config.max_line_bytes,
                max_payload,
                slack: crate::flusher::HEADER_SLACK,
            });
        }
        let control = athanor_connections::nats::bucket(&js, names::CONTROL_BUCKET).await?;
        let workers = athanor_connections::nats::bucket(&js, names::WORKERS_BUCKET).await?;
        let runs_stream =
            js.get_stream(names::RUNS_STREAM)
                .await
                .map_err(|source| Error::Stream {
                    stream: names::RUNS_STREAM,
                    source,
                })?;
        let shared = Arc::new(WorkerShared {
            id,
            budget: Budget::new(config.max_pending_bytes),
            slots: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
            config,
            js,
            control: control.clone(),
            experiments: experiments
                .into_iter()
                .map(|e| (e.name().to_string(), e))
                .collect(),
            runs: Mutex::new(HashMap::new()),
            runs_changed: tokio::sync::Notify::new(),
            stats: Arc::new(PublishStats::default()),
            runs_started: AtomicU64::new(0),
            runs_stream,
            max_payload,
            started_at: now_micros(),
            shutdown,
            deregister: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        athanor_connections::prometheus::export_on_render(&shared, crate::instruments::export);
        let heartbeat = tokio::spawn(registry::heartbeat(shared.clone(), workers));
        shared.tasks.spawn(watch_cancels(shared.clone(), control));
        for name in shared.experiments.keys() {
            shared
                .tasks
                .spawn(consume_requests(shared.clone(), name.clone()));
        }
        info!(worker_id = %shared.id, experiments = ?shared.experiments.keys().collect::<Vec<_>>(),
            max_concurrent_runs = shared.config.max_concurrent_runs, "worker started");
        Ok(Worker { shared, heartbeat })
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// What this worker has published so far.
    pub fn stats(&self) -> &PublishStats {
        &self.shared.stats
    }

    /// Runs whose experiment this worker started.
    pub fn runs_started(&self) -> u64 {
        self.shared.runs_started.load(Ordering::Relaxed)
    }

    /// The worker-wide bound on unpublished output.
    pub fn budget(&self) -> &Budget {
        &self.shared.budget
    }

    /// Starts a run directly (not through `ATHANOR_REQUESTS`), waiting for a free slot.
    pub async fn start_run(&self, request: RunRequest) -> Result<RunHandle> {
        let permit = tokio::select! {
            _ = self.shared.shutdown.cancelled() => return Err(Error::ShuttingDown),
            permit = self.shared.slots.clone().acquire_owned() => permit.map_err(|_| Error::ShuttingDown)?,
        };
        self.shared.start_run(request, permit, None).await
    }

    /// Waits for the shutdown token, then shuts down in order: stop taking requests,
    /// cancel running runs and publish their final batches, deregister.
    pub async fn wait(self) {
        self.shared.shutdown.cancelled().await;
        info!(worker_id = %self.shared.id, "worker stopping");
        for run in self.shared.runs.lock().values() {
            run.cancel("the worker is shutting down");
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        // Deregister only now: until every final batch is out, the runs are live.
        self.shared.deregister.cancel();
        let _ = self.heartbeat.await;
        info!(worker_id = %self.shared.id, "worker stopped");
    }
}

impl WorkerShared {
    pub(crate) fn info(&self) -> WorkerInfo {
        let mut experiments: Vec<ExperimentInfo> = self
            .experiments
            .values()
            .map(|e| ExperimentInfo {
                name: e.name().into(),
                description: e.description().into(),
                config_schema: e.config_schema().to_json_schema(),
            })
            .collect();
        experiments.sort_by(|a, b| a.name.cmp(&b.name));
        WorkerInfo {
            worker_id: self.id.clone(),
            hostname: hostname(),
            pid: std::process::id(),
            started_at: self.started_at,
            heartbeat_at: now_micros(),
            max_concurrent_runs: self.config.max_concurrent_runs,
            experiments,
            running: self.runs.lock().keys().cloned().collect(),
        }
    }

    pub(crate) fn publisher(&self, run_id: &str, run_info: RunInfo) -> Publisher {
        Publisher::new(
            self.js.clone(),
            run_id,
            &self.id,
            run_info,
            self.max_payload,
            self.config.publish_timeout,
            self.stats.clone(),
            self.budget.clone(),
        )
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

fn default_worker_id() -> String {
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        (now_micros() as u64 & 0xffff) as u16
    )
}
