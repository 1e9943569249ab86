//! Runs: taking requests from `ATHANOR_REQUESTS`, bounding concurrency, starting each
//! experiment on its own thread, supervising it (flush ticks, cancellation, grace,
//! panics) and publishing its final batch.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, AckKind};
use athanor_schemas::nats::{connect, ensure_topology, jetstream as js_context, NatsConfig};
use athanor_schemas::requests::{ExperimentInfo, RunRequest, WorkerInfo};
use athanor_schemas::{names, now_micros, RunInfo, RunState};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::buffer::{Budget, Drained, RunBuffer};
use crate::config::WorkerConfig;
use crate::context::{RunContext, RunShared};
use crate::experiment::Experiment;
use crate::flusher::{FlushTrigger, PublishStats, Publisher};
use crate::{registry, Error, Result};

/// State shared by the worker's tasks.
pub(crate) struct WorkerShared {
    pub(crate) id: String,
    pub(crate) config: WorkerConfig,
    js: jetstream::Context,
    control: kv::Store,
    experiments: HashMap<String, Arc<dyn Experiment>>,
    /// Bounds unpublished output across all runs; `log()` blocks on it when full.
    budget: Arc<Budget>,
    /// Runs executing now, by id: the cancel watcher looks them up here.
    runs: Mutex<HashMap<String, Arc<RunShared>>>,
    /// One permit per concurrently executing run (`max_concurrent_runs`).
    slots: Arc<Semaphore>,
    stats: Arc<PublishStats>,
    max_payload: usize,
    started_at: i64,
    /// Cancelled to stop the worker: request loops stop, runs are cancelled.
    pub(crate) shutdown: CancellationToken,
    /// Every task of the worker (request loops, run supervisors, heartbeat, watcher).
    tasks: TaskTracker,
}

/// A running worker. Dropping it does not stop it; cancel the token and `wait`.
pub struct Worker {
    shared: Arc<WorkerShared>,
}

/// Follows one run to its end.
pub struct RunHandle {
    pub run_id: String,
    state: watch::Receiver<Option<RunState>>,
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
        let id = config.id.clone().unwrap_or_else(default_worker_id);
        let client = connect(&nats, &format!("athanor-worker {id}")).await?;
        let max_payload = client.server_info().max_payload;
        let js = js_context(client, &nats);
        ensure_topology(&js, &nats).await?;
        let control = js
            .get_key_value(names::CONTROL_BUCKET)
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        let workers = js
            .get_key_value(names::WORKERS_BUCKET)
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
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
            stats: Arc::new(PublishStats::default()),
            max_payload: if max_payload == 0 {
                1 << 20
            } else {
                max_payload
            },
            started_at: now_micros(),
            shutdown,
            tasks: TaskTracker::new(),
        });
        shared
            .tasks
            .spawn(registry::heartbeat(shared.clone(), workers));
        shared.tasks.spawn(watch_cancels(shared.clone(), control));
        for name in shared.experiments.keys() {
            shared
                .tasks
                .spawn(consume_requests(shared.clone(), name.clone()));
        }
        info!(worker_id = %shared.id, experiments = ?shared.experiments.keys().collect::<Vec<_>>(),
            max_concurrent_runs = shared.config.max_concurrent_runs, "worker started");
        Ok(Worker { shared })
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// What this worker has published so far.
    pub fn stats(&self) -> &PublishStats {
        &self.shared.stats
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
        self.shared.start_run(request, permit).await
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

    async fn start_run(
        self: &Arc<Self>,
        request: RunRequest,
        permit: OwnedSemaphorePermit,
    ) -> Result<RunHandle> {
        if !names::is_valid_token(&request.run_id) {
            return Err(Error::InvalidRunId(request.run_id));
        }
        let experiment = self
            .experiments
            .get(&request.experiment)
            .cloned()
            .ok_or_else(|| {
                let mut hosted: Vec<&str> = self.experiments.keys().map(String::as_str).collect();
                hosted.sort_unstable();
                Error::UnknownExperiment {
                    name: request.experiment.clone(),
                    hosted: hosted.join(", "),
                }
            })?;
        let run_id = request.run_id.clone();
        let (state_tx, state_rx) = watch::channel(None);
        let handle = RunHandle {
            run_id: run_id.clone(),
            state: state_rx,
        };
        let mut run_info = RunInfo {
            experiment: request.experiment.clone(),
            config: request.config.clone(),
            instance_id: request.instance_id.clone(),
            started_at: now_micros(),
        };
        let config = match experiment.config_schema().validate(&request.config) {
            Ok(config) => config,
            Err(e) => {
                warn!(run_id = %run_id, error = %e, "run refused: invalid config");
                let publisher = self.publisher(&run_id, run_info);
                self.tasks.spawn(finish_unstarted(
                    publisher,
                    RunState::Failed,
                    e.to_string(),
                    state_tx,
                ));
                return Ok(handle);
            }
        };
        run_info.config = Value::Object(config.clone());
        let publisher = self.publisher(&run_id, run_info);
        let run = Arc::new(RunShared {
            run_id: run_id.clone(),
            experiment: request.experiment.clone(),
            config,
            buffer: RunBuffer::new(self.budget.clone(), self.config.max_line_bytes),
            cancelled: AtomicBool::new(false),
            cancel_notify: tokio::sync::Notify::new(),
            cancel_reason: Mutex::new(None),
            declared: Mutex::new(None),
        });
        // Registered before the cancel check: a cancel arriving from now on is seen
        // either by the watcher (run registered) or by the check below.
        self.runs.lock().insert(run_id.clone(), run.clone());
        if self.cancel_requested(&run_id).await {
            self.runs.lock().remove(&run_id);
            info!(run_id = %run_id, "run cancelled before it started");
            self.tasks.spawn(finish_unstarted(
                publisher,
                RunState::Cancelled,
                "cancelled before it started".into(),
                state_tx,
            ));
            return Ok(handle);
        }
        info!(run_id = %run_id, experiment = %request.experiment, "run started");
        self.tasks.spawn(supervise(
            self.clone(),
            run,
            experiment,
            publisher,
            permit,
            state_tx,
        ));
        Ok(handle)
    }

    fn publisher(&self, run_id: &str, run_info: RunInfo) -> Publisher {
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

    async fn cancel_requested(&self, run_id: &str) -> bool {
        match self.control.get(names::cancel_key(run_id)).await {
            Ok(entry) => entry.is_some(),
            Err(error) => {
                warn!(run_id, %error, "could not check for a cancel request; starting the run");
                false
            }
        }
    }
}

/// A run that never executed (bad config, cancelled first): one batch, terminal.
async fn finish_unstarted(
    mut publisher: Publisher,
    state: RunState,
    error: String,
    done: watch::Sender<Option<RunState>>,
) {
    publisher
        .send(
            Drained::default(),
            FlushTrigger::Final,
            Some((state, Some(error))),
        )
        .await;
    let _ = done.send(Some(state));
}

/// How the experiment's thread ended, as far as the supervisor knows.
enum Ended {
    Returned(Result<(), String>),
    /// It ignored cancellation past the grace period; its thread is abandoned.
    Stopped,
}

/// Owns one run from start to final batch: starts the experiment thread, flushes
/// every tick, applies the cancel grace, publishes the terminal batch, frees the slot.
async fn supervise(
    worker: Arc<WorkerShared>,
    run: Arc<RunShared>,
    experiment: Arc<dyn Experiment>,
    mut publisher: Publisher,
    permit: OwnedSemaphorePermit,
    done: watch::Sender<Option<RunState>>,
) {
    let (returned_tx, mut returned_rx) = oneshot::channel();
    let ctx = RunContext {
        shared: run.clone(),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("run-{}", &run.run_id))
        .spawn(move || {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| experiment.run(&ctx)));
            let _ = returned_tx.send(match outcome {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(payload) => Err(format!("panicked: {}", panic_message(payload.as_ref()))),
            });
        });
    let mut interval = tokio::time::interval(worker.config.flush_interval);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut grace: Option<Pin<Box<Sleep>>> = None;
    let ended = match spawned {
        Err(e) => Ended::Returned(Err(format!("could not start the experiment thread: {e}"))),
        Ok(_) => loop {
            tokio::select! {
                returned = &mut returned_rx => {
                    break Ended::Returned(returned.unwrap_or_else(|_| Err("the experiment thread vanished".into())));
                }
                _ = run.cancel_notify.notified(), if grace.is_none() => {
                    grace = Some(Box::pin(tokio::time::sleep(worker.config.cancel_grace)));
                }
                _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                    run.buffer.close();
                    warn!(run_id = %run.run_id, grace = ?worker.config.cancel_grace, "run ignored cancellation; stopped");
                    break Ended::Stopped;
                }
                _ = interval.tick() => {
                    publisher.send(run.buffer.drain(), FlushTrigger::Tick, None).await;
                }
            }
        },
    };
    let (state, error) = match ended {
        Ended::Returned(returned) => run.outcome(returned),
        Ended::Stopped => (
            RunState::Cancelled,
            Some(format!(
                "stopped after ignoring cancellation for {:?}",
                worker.config.cancel_grace
            )),
        ),
    };
    // The synchronous final flush: everything logged before the end, then the status.
    publisher
        .send(
            run.buffer.drain(),
            FlushTrigger::Final,
            Some((state, error.clone())),
        )
        .await;
    worker.runs.lock().remove(&run.run_id);
    drop(permit);
    match &error {
        Some(error) if state == RunState::Failed => {
            warn!(run_id = %run.run_id, state = state.as_str(), %error, "run finished")
        }
        _ => info!(run_id = %run.run_id, state = state.as_str(), "run finished"),
    }
    let _ = done.send(Some(state));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-string panic payload)".into()
    }
}

/// Takes requests for one experiment from its durable work-queue consumer (shared by
/// every worker hosting it), one at a time and only while a slot is free, so queued
/// requests stay in the stream for other workers.
async fn consume_requests(worker: Arc<WorkerShared>, experiment: String) {
    let consumer = loop {
        match request_consumer(&worker.js, &experiment).await {
            Ok(consumer) => break consumer,
            Err(error) => {
                warn!(experiment, %error, "cannot open the request consumer; retrying");
                tokio::select! {
                    _ = worker.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        // Wait until a slot is free, without holding it while idle: every experiment
        // of this worker polls its own queue, and an idle poller must not starve the
        // others of slots.
        tokio::select! {
            _ = worker.shutdown.cancelled() => return,
            permit = worker.slots.acquire() => match permit {
                Ok(permit) => drop(permit),
                Err(_) => return,
            },
        }
        let next = async {
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(Duration::from_secs(2))
                .messages()
                .await?;
            batch.next().await.transpose()
        };
        let message = tokio::select! {
            _ = worker.shutdown.cancelled() => return,
            next = next => match next {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(error) => {
                    warn!(experiment, %error, "fetching run requests failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = worker.slots.clone().try_acquire_owned() else {
            // Another experiment's request took the last slot meanwhile: hand this one
            // back for any worker with room.
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_millis(100))))
                .await;
            continue;
        };
        let request = match serde_json::from_slice::<RunRequest>(&message.payload) {
            Ok(request) => request,
            Err(e) => {
                warn!(experiment, error = %e, "malformed run request; discarded");
                let _ = message.ack_with(AckKind::Term).await;
                continue;
            }
        };
        if request.experiment != experiment {
            warn!(experiment, requested = %request.experiment, "request on the wrong subject; discarded");
            let _ = message.ack_with(AckKind::Term).await;
            continue;
        }
        match worker.start_run(request, permit).await {
            Ok(_) => {
                if let Err(error) = message.ack().await {
                    warn!(experiment, %error, "could not ack a started run's request");
                }
            }
            Err(e) => {
                error!(experiment, error = %e, "run request refused");
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
}

async fn request_consumer(
    js: &jetstream::Context,
    experiment: &str,
) -> Result<consumer::PullConsumer, String> {
    let stream = js
        .get_stream(names::REQUESTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let name = names::request_consumer(experiment);
    stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: names::request_subject(experiment),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())
}

/// Applies `cancel.<run_id>` keys to the runs executing here.
async fn watch_cancels(worker: Arc<WorkerShared>, control: kv::Store) {
    loop {
        let mut watch = match control.watch("cancel.>").await {
            Ok(watch) => watch,
            Err(error) => {
                warn!(%error, "cannot watch cancel requests; retrying");
                tokio::select! {
                    _ = worker.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                _ = worker.shutdown.cancelled() => return,
                entry = watch.next() => entry,
            };
            match entry {
                Some(Ok(entry)) if entry.operation == kv::Operation::Put => {
                    let Some(run_id) = entry.key.strip_prefix("cancel.") else {
                        continue;
                    };
                    if let Some(run) = worker.runs.lock().get(run_id) {
                        info!(run_id, "cancel requested");
                        run.cancel("cancelled on request");
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    warn!(%error, "cancel watch failed; re-watching");
                    break;
                }
                None => break,
            }
        }
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
