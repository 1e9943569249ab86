//! Intake: taking run requests from the `ATHANOR_REQUESTS` work queue, bounding the
//! worker's concurrency with its slots, and admitting a request (checks, ack, a cancel
//! that came first) before handing the run to [`crate::supervisor`]. A request that
//! cannot be taken now is handed back (nak) for any worker with room; one that can
//! never run is terminated.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer, AckKind};
use athanor_connections::retry::Backoff;
use athanor_schemas::requests::RunRequest;
use athanor_schemas::{names, now_micros, RunInfo, RunState};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{error, info, warn};

use crate::buffer::RunBuffer;
use crate::context::RunShared;
use crate::supervisor::{finish_unstarted, supervise};
use crate::worker::{RunHandle, WorkerShared};
use crate::{Error, Result};

/// Takes requests for one experiment from its durable work-queue consumer (shared by
/// every worker hosting it), one at a time and only while a slot is free, so queued
/// requests stay in the stream for other workers.
pub(crate) async fn consume_requests(worker: Arc<WorkerShared>, experiment: String) {
    let mut reopen = Backoff::REOPEN.retries();
    let consumer = loop {
        match request_consumer(&worker.js, &experiment).await {
            Ok(consumer) => break consumer,
            Err(error) => {
                let delay = reopen.next_delay();
                warn!(experiment, %error, retry_in = ?delay, "cannot open the request consumer; retrying");
                tokio::select! {
                    _ = worker.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let mut refetch = Backoff::FETCH.retries();
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
                Ok(Some(message)) => {
                    refetch.reset();
                    message
                }
                Ok(None) => {
                    refetch.reset();
                    continue;
                }
                Err(error) => {
                    let delay = refetch.next_delay();
                    warn!(experiment, %error, retry_in = ?delay, "fetching run requests failed; retrying");
                    tokio::time::sleep(delay).await;
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
) -> Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(names::REQUESTS_STREAM)
        .await
        .map_err(|source| Error::Stream {
            stream: names::REQUESTS_STREAM,
            source,
        })?;
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
        .map_err(|source| Error::Consumer {
            consumer: name,
            source,
        })
}

impl WorkerShared {
    /// Starts a run. With `request_message`, the request is acknowledged (and the
    /// server's confirmation awaited) before the experiment starts: a run whose
    /// request cannot be acknowledged is not started, so it is not run twice.
    pub(crate) async fn start_run(
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
        if self.runs.lock().contains_key(&run_id)
            || self.already_taken(&run_id).await
            || self.already_published(&run_id).await
        {
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
        // Said before the ack: if this process dies before the run's first batch, the
        // lost-run check knows who took it.
        if request_message.is_some() {
            if let Err(error) = self
                .control
                .put(names::taken_key(&run_id), self.id.clone().into())
                .await
            {
                warn!(run_id = %run_id, %error, "could not record taking the run");
            }
        }
        if let Err(e) = acknowledge(request_message).await {
            self.runs.lock().remove(&run_id);
            // The request comes back for any worker: it must not find the run taken.
            // Should this fail too, the request is refused when it comes back, and the
            // lost-run check ends the run as taken and dropped: never run twice.
            if let Err(error) = self.control.delete(names::taken_key(&run_id)).await {
                warn!(run_id = %run_id, %error, "could not withdraw the record of taking the run");
            }
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
        self.runs_changed.notify_one();
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

    /// Whether a worker took the request of `run_id` (`taken.<run_id>`, kept 7 days):
    /// a request delivered again after its run started, also once the run's output
    /// has left `ATHANOR_RUNS`.
    async fn already_taken(&self, run_id: &str) -> bool {
        self.control_holds(
            names::taken_key(run_id),
            run_id,
            "whether a worker took the run",
        )
        .await
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

    async fn cancel_requested(&self, run_id: &str) -> bool {
        self.control_holds(names::cancel_key(run_id), run_id, "for a cancel request")
            .await
    }

    /// Whether `athanor_control` holds `key`; false (with a warning) when it cannot
    /// be read: the run starts rather than waiting on NATS.
    async fn control_holds(&self, key: String, run_id: &str, what: &str) -> bool {
        match self.control.get(key).await {
            Ok(entry) => entry.is_some(),
            Err(error) => {
                warn!(run_id, %error, "could not check {what}; starting the run");
                false
            }
        }
    }
}

/// Acknowledges a run request and waits for the server to confirm it.
async fn acknowledge(message: Option<&jetstream::Message>) -> Result<()> {
    match message {
        Some(message) => message.double_ack().await.map_err(Error::Ack),
        None => Ok(()),
    }
}
