//! Runs: taking requests from `ATHANOR_REQUESTS`, bounding concurrency, starting each
//! experiment on its own thread, supervising it (flush ticks, cancellation, grace,
//! panics) and publishing its final batch.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer, kv, AckKind};
use athanor_connections::nats::{open, NatsConfig};
use athanor_schemas::requests::{ExperimentInfo, RunRequest, WorkerInfo};
use athanor_schemas::{names, now_micros, Level, RunInfo, RunState};
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
    /// Runs whose experiment was started, for metrics and tests.
    runs_started: AtomicU64,
    /// `ATHANOR_RUNS`, to check whether a run already has output.
    runs_stream: jetstream::stream::Stream,
    max_payload: usize,
    started_at: i64,
    /// Cancelled to stop the worker: request loops stop, runs are cancelled.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled once every run has published its final batch: the heartbeat stops
    /// and the registration is deleted.
    pub(crate) deregister: CancellationToken,
    /// Every task of the worker but the heartbeat (request loops, run supervisors,
    /// the cancel watcher).
    tasks: TaskTracker,
}

/// A running worker. Dropping it does not stop it; cancel the token and `wait`.
pub struct Worker {
    shared: Arc<WorkerShared>,
    heartbeat: tokio::task::JoinHandle<()>,
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
        let js = open(&nats, &format!("athanor-worker {id}")).await?;
        let max_payload = js.client().server_info().max_payload;
        let control = js
            .get_key_value(names::CONTROL_BUCKET)
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        let workers = js
            .get_key_value(names::WORKERS_BUCKET)
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        let runs_stream = js
            .get_stream(names::RUNS_STREAM)
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
            runs_started: AtomicU64::new(0),
            runs_stream,
            max_payload: if max_payload == 0 {
                1 << 20
            } else {
                max_payload
            },
            started_at: now_micros(),
            shutdown,
            deregister: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
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

    /// Starts a run. With `request_message`, the request is acknowledged (and the
    /// server's confirmation awaited) before the experiment starts: a run whose
    /// request cannot be acknowledged is not started, so it is not run twice.
    async fn start_run(
        self: &Arc<Self>,
        request: RunRequest,
        permit: OwnedSemaphorePermit,
        request_message: Option<&jetstream::Message>,
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
        if self.runs.lock().contains_key(&run_id) || self.already_published(&run_id).await {
            return Err(Error::DuplicateRun(run_id));
        }
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
        let validated = experiment.config_schema().validate(&request.config);
        if let Ok(config) = &validated {
            run_info.config = Value::Object(config.clone());
        }
        let publisher = self.publisher(&run_id, run_info);
        let config = match validated {
            Ok(config) => config,
            Err(e) => {
                acknowledge(request_message).await?;
                warn!(run_id = %run_id, error = %e, "run refused: invalid config");
                self.tasks.spawn(finish_unstarted(
                    publisher,
                    RunState::Failed,
                    e.to_string(),
                    state_tx,
                ));
                return Ok(handle);
            }
        };
        let run = Arc::new(RunShared {
            run_id: run_id.clone(),
            experiment: request.experiment.clone(),
            config,
            buffer: RunBuffer::new(self.budget.clone(), self.config.max_line_bytes),
            cancelled: AtomicBool::new(false),
            cancel_notify: tokio::sync::Notify::new(),
            cancel_reason: Mutex::new(None),
            declared: Mutex::new(None),
            stopper: Mutex::new(None),
        });
        // Registered before the cancel check: a cancel arriving from now on is seen
        // either by the watcher (run registered) or by the check below.
        if self
            .runs
            .lock()
            .insert(run_id.clone(), run.clone())
            .is_some()
        {
            return Err(Error::DuplicateRun(run_id));
        }
        if let Err(e) = acknowledge(request_message).await {
            self.runs.lock().remove(&run_id);
            return Err(e);
        }
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
        self.runs_started.fetch_add(1, Ordering::Relaxed);
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

    /// Whether `ATHANOR_RUNS` already holds output of `run_id` (a request delivered
    /// again after its run started elsewhere).
    async fn already_published(&self, run_id: &str) -> bool {
        match self
            .runs_stream
            .get_last_raw_message_by_subject(&names::run_subject(run_id))
            .await
        {
            Ok(_) => true,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => false,
            Err(error) => {
                warn!(run_id, %error, "could not check whether the run already exists");
                false
            }
        }
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

/// Acknowledges a run request and waits for the server to confirm it.
async fn acknowledge(message: Option<&jetstream::Message>) -> Result<()> {
    match message {
        Some(message) => message
            .double_ack()
            .await
            .map_err(|e| Error::Ack(e.to_string())),
        None => Ok(()),
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

/// How long a run stopped from outside (see [`RunContext::on_stop`]) has to return
/// before its thread is abandoned.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How much longer than `cancel_grace` the worker waits before stopping from outside
/// a run that can be (it is expected to stop itself at the grace).
const STOP_MARGIN: Duration = Duration::from_secs(2);

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
    let slot = Arc::new(permit);
    let thread_slot = slot.clone();
    let (returned_tx, mut returned_rx) = oneshot::channel();
    let ctx = RunContext {
        shared: run.clone(),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("run-{}", &run.run_id))
        .spawn(move || {
            // The slot is held by the thread and by this supervisor: it frees up when
            // the final batch is out *and* the thread has ended (a run stopped after
            // ignoring cancellation keeps its slot until its thread really ends).
            let _slot = thread_slot;
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
    let mut stopper_called = false;
    let ended = match spawned {
        Err(e) => Ended::Returned(Err(format!("could not start the experiment thread: {e}"))),
        Ok(_) => loop {
            tokio::select! {
                returned = &mut returned_rx => {
                    break Ended::Returned(returned.unwrap_or_else(|_| Err("the experiment thread vanished".into())));
                }
                _ = run.cancel_notify.notified(), if grace.is_none() => {
                    // A run that stops itself from outside (a command killing its
                    // process group at the grace) is given a margin to do so first.
                    let margin = if run.stopper.lock().is_some() { STOP_MARGIN } else { Duration::ZERO };
                    grace = Some(Box::pin(tokio::time::sleep(worker.config.cancel_grace + margin)));
                }
                _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                    if !stopper_called {
                        // Called under the lock, so a run clearing its stopper (its
                        // processes reaped) waits for a call in progress.
                        let stopper = run.stopper.lock();
                        if let Some(stop) = stopper.as_ref() {
                            // The experiment can be stopped from outside (a command's
                            // processes): do it, and give it time to return with its
                            // output.
                            stop();
                            drop(stopper);
                            stopper_called = true;
                            warn!(run_id = %run.run_id, grace = ?worker.config.cancel_grace, "run ignored cancellation; its processes were killed");
                            run.buffer.note(Level::Warn, format!("athanor: the run ignored cancellation for {:?}; its processes were killed", worker.config.cancel_grace));
                            grace = Some(Box::pin(tokio::time::sleep(STOP_WAIT)));
                            continue;
                        }
                    }
                    run.buffer.close();
                    warn!(run_id = %run.run_id, grace = ?worker.config.cancel_grace, "run ignored cancellation; stopped");
                    break Ended::Stopped;
                }
                _ = worker.shutdown.cancelled(), if !run.cancelled.load(Ordering::Relaxed) => {
                    run.cancel("the worker is shutting down");
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
    // Closed first, so a thread still logging cannot add lines after the final batch.
    run.buffer.close();
    publisher
        .send(
            run.buffer.drain(),
            FlushTrigger::Final,
            Some((state, error.clone())),
        )
        .await;
    worker.runs.lock().remove(&run.run_id);
    drop(slot);
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
        match worker.start_run(request, permit, Some(&message)).await {
            Ok(_) => {}
            Err(e @ Error::Ack(_)) => {
                // Not started: the request stays in the queue and is delivered again.
                warn!(experiment, error = %e, "run not started");
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
        let mut watch = match control.watch_with_history("cancel.>").await {
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
