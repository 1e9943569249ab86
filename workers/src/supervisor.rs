//! Supervision: one run from its start to its final batch. The experiment runs on a
//! thread of its own with panics caught; its supervisor flushes every tick, applies
//! the cancel grace (stopping from outside a run that can be stopped), publishes the
//! terminal status after a synchronous final flush, and frees the slot. The cancel
//! watch applies `cancel.<run_id>` keys to the runs executing here.

use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use athanor_connections::retry::Backoff;
use athanor_schemas::{Level, RunState};
use futures::StreamExt;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};
use tokio::time::{MissedTickBehavior, Sleep};
use tracing::{info, warn};

use crate::buffer::Drained;
use crate::context::{RunContext, RunShared};
use crate::experiment::Experiment;
use crate::flusher::{FlushTrigger, Publisher};
use crate::worker::WorkerShared;

/// A run that never executed (bad config, cancelled first): one batch, terminal.
pub(crate) async fn finish_unstarted(
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
/// How long a run woken from idle gathers output before its batch goes out: output
/// emitted together (a line and its progress update, a burst of lines) shares one batch
/// instead of the rest waiting a whole interval.
const LEAD_LINGER: Duration = Duration::from_millis(2);

pub(crate) async fn supervise(
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
    let every = worker.config.flush_interval;
    let lead = worker.config.leading_edge;
    // The leading edge: a run that has published nothing for a whole interval is
    // marked idle, and its next output goes out at once; the interval starts again
    // from there. Under steady output every tick has something: exactly one batch per
    // interval, as without it. A run starts idle: its first output (or, for a run
    // silent that long, the first tick) publishes the batch saying `running`.
    let now = tokio::time::Instant::now();
    let first_tick = if lead && !run.buffer.mark_idle() {
        now + every
    } else {
        now
    };
    let mut interval = tokio::time::interval_at(first_tick, every);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // When the last batch went out.
    let mut last_sent: Option<tokio::time::Instant> = None;
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
                tick = interval.tick() => {
                    let drained = run.buffer.drain();
                    if !drained.is_empty() || publisher.is_first() {
                        // The tick's own deadline: the next one is exactly `every` later.
                        last_sent = Some(tick);
                        publisher.send(drained, FlushTrigger::Tick, None).await;
                    } else if lead
                        && last_sent.is_none_or(|t| t.elapsed() >= every)
                        && run.buffer.mark_idle()
                    {
                        last_sent = Some(tokio::time::Instant::now());
                        publisher.send(run.buffer.drain(), FlushTrigger::Lead, None).await;
                        interval.reset();
                    }
                }
                _ = run.buffer.output() => {
                    // A wake-up the tick beat to it (both ready at once) is left to
                    // the ticks: still at most one batch per interval.
                    if last_sent.is_some_and(|t| t.elapsed() < every) {
                        continue;
                    }
                    // What comes with the line (a progress update, metrics, the next
                    // line of a print) goes in the same batch.
                    tokio::time::sleep(LEAD_LINGER.min(every / 10)).await;
                    let drained = run.buffer.drain();
                    if !drained.is_empty() {
                        last_sent = Some(tokio::time::Instant::now());
                        publisher.send(drained, FlushTrigger::Lead, None).await;
                        interval.reset();
                    }
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
    worker.runs_changed.notify_one();
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

/// Applies `cancel.<run_id>` keys to the runs executing here.
pub(crate) async fn watch_cancels(worker: Arc<WorkerShared>, control: kv::Store) {
    let mut rewatch = Backoff::REOPEN.retries();
    loop {
        let mut watch = match control.watch_with_history("cancel.>").await {
            Ok(watch) => {
                rewatch.reset();
                watch
            }
            Err(error) => {
                let delay = rewatch.next_delay();
                warn!(%error, retry_in = ?delay, "cannot watch cancel requests; retrying");
                tokio::select! {
                    _ = worker.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
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
