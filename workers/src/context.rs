//! The run context: everything an experiment calls while it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use athanor_schemas::{Level, RunState};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::buffer::RunBuffer;

/// A terminal outcome declared by the experiment before returning.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Declared {
    Complete,
    Fail(String),
}

/// State of one run shared by its context, its flusher and its supervisor.
pub(crate) struct RunShared {
    pub(crate) run_id: String,
    pub(crate) experiment: String,
    pub(crate) config: Map<String, Value>,
    pub(crate) buffer: RunBuffer,
    /// Set when a cancel request arrives; experiments poll it through `cancelled()`.
    pub(crate) cancelled: AtomicBool,
    /// Notified when `cancelled` is set, so the supervisor can start the grace timer.
    pub(crate) cancel_notify: tokio::sync::Notify,
    /// Why the run was cancelled (the first reason wins), reported as its error.
    pub(crate) cancel_reason: Mutex<Option<String>>,
    pub(crate) declared: Mutex<Option<Declared>>,
    /// Set by an experiment that can be stopped from outside (a command's process
    /// group): the supervisor calls it when the run ignores cancellation past the grace.
    pub(crate) stopper: Mutex<Option<Stopper>>,
}

/// See [`RunContext::on_stop`].
pub(crate) type Stopper = Box<dyn Fn() + Send + Sync>;

/// Handle an experiment uses to emit output. Cheap to clone; every method is
/// synchronous, does no I/O and may be called from any thread.
#[derive(Clone)]
pub struct RunContext {
    pub(crate) shared: Arc<RunShared>,
}

impl RunContext {
    pub fn run_id(&self) -> &str {
        &self.shared.run_id
    }

    pub fn experiment(&self) -> &str {
        &self.shared.experiment
    }

    /// The validated config, defaults applied.
    pub fn config(&self) -> &Map<String, Value> {
        &self.shared.config
    }

    /// An integer field of the config (validated, so present when it has a default).
    pub fn config_i64(&self, field: &str) -> Option<i64> {
        self.shared.config.get(field).and_then(Value::as_i64)
    }

    pub fn config_f64(&self, field: &str) -> Option<f64> {
        self.shared.config.get(field).and_then(Value::as_f64)
    }

    pub fn config_bool(&self, field: &str) -> Option<bool> {
        self.shared.config.get(field).and_then(Value::as_bool)
    }

    pub fn config_str(&self, field: &str) -> Option<&str> {
        self.shared.config.get(field).and_then(Value::as_str)
    }

    /// The longest message a line keeps; a longer one is cut, with a marker. An
    /// experiment building a message from its config builds no more than this.
    pub fn max_line_bytes(&self) -> usize {
        self.shared.buffer.max_line_bytes()
    }

    /// Appends a line to the run's log. Blocks only when the worker's unpublished
    /// output is over `worker.max_pending_bytes` (see [`crate::buffer::WhenFull`]).
    pub fn log(&self, level: Level, message: impl Into<String>) {
        self.shared.buffer.log(level, message.into(), None);
    }

    /// A line with structured metadata (any JSON value).
    pub fn log_with(&self, level: Level, message: impl Into<String>, metadata: Value) {
        self.shared
            .buffer
            .log(level, message.into(), Some(metadata));
    }

    /// Many lines at once, with consecutive `seq`s.
    pub fn log_batch<I, S>(&self, lines: I)
    where
        I: IntoIterator<Item = (Level, S)>,
        S: Into<String>,
    {
        self.shared
            .buffer
            .log_batch(lines.into_iter().map(|(l, m)| (l, m.into())));
    }

    pub fn info(&self, message: impl Into<String>) {
        self.log(Level::Info, message)
    }

    pub fn warn(&self, message: impl Into<String>) {
        self.log(Level::Warn, message)
    }

    pub fn error(&self, message: impl Into<String>) {
        self.log(Level::Error, message)
    }

    /// Records a result. Recording a key again replaces its value (the newer wins).
    pub fn result(&self, key: impl Into<String>, value: impl Serialize) {
        let value = serde_json::to_value(value)
            .unwrap_or_else(|e| Value::String(format!("unserialisable result: {e}")));
        self.shared.buffer.result(key.into(), value);
    }

    /// Records the value of metric `name` at `step` (a point of its series). Any f64 is
    /// kept, NaN and ±infinity included. Recording the same name and step again
    /// replaces the point (the newer wins).
    pub fn metric(&self, name: &str, step: u64, value: f64) {
        self.shared.buffer.metrics(step, [(name, value)]);
    }

    /// Records several metrics at one `step` at once (one record, one lock).
    pub fn metrics(&self, step: u64, values: &[(&str, f64)]) {
        self.shared.buffer.metrics(step, values.iter().copied());
    }

    /// Reports progress; only the latest report is kept and sent.
    pub fn progress(&self, current: u64, total: u64, message: Option<&str>) {
        self.shared
            .buffer
            .progress(current, total, message.map(str::to_string));
    }

    /// True once the run has been asked to stop. Long loops should check it and return.
    pub fn cancelled(&self) -> bool {
        self.shared.cancelled.load(Ordering::Relaxed)
    }

    /// Registers how to stop this run from outside: when it has not returned 2 s
    /// after `worker.cancel_grace`, the worker calls `stop` and waits up to 30 s more
    /// for `run` to return with its output, instead of abandoning the thread at once.
    pub fn on_stop(&self, stop: impl Fn() + Send + Sync + 'static) {
        *self.shared.stopper.lock() = Some(Box::new(stop));
    }

    /// Removes what [`on_stop`](Self::on_stop) registered; a call of it in progress
    /// finishes first.
    pub fn clear_on_stop(&self) {
        self.shared.stopper.lock().take();
    }

    /// Declares the run completed; it ends when `run` returns. The first declaration wins.
    pub fn complete(&self) {
        self.shared
            .declared
            .lock()
            .get_or_insert(Declared::Complete);
    }

    /// Declares the run failed with `message`; it ends when `run` returns. The first
    /// declaration wins.
    pub fn fail(&self, message: impl Into<String>) {
        let message = message.into();
        self.shared
            .declared
            .lock()
            .get_or_insert(Declared::Fail(message));
    }
}

impl RunContext {
    /// A context of its own, with a buffer nothing drains but the test.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        RunContext {
            shared: Arc::new(RunShared {
                run_id: "test-run".into(),
                experiment: "test".into(),
                config: Map::new(),
                buffer: RunBuffer::new(crate::buffer::Budget::new(1 << 30), 1 << 20),
                cancelled: AtomicBool::new(false),
                cancel_notify: tokio::sync::Notify::new(),
                cancel_reason: Mutex::new(None),
                declared: Mutex::new(None),
                stopper: Mutex::new(None),
            }),
        }
    }
}

impl RunShared {
    pub(crate) fn cancel(&self, reason: &str) {
        self.cancel_reason
            .lock()
            .get_or_insert_with(|| reason.to_string());
        if !self.cancelled.swap(true, Ordering::Relaxed) {
            self.cancel_notify.notify_one();
        }
    }

    /// The terminal state and error for how the experiment ended.
    pub(crate) fn outcome(&self, returned: Result<(), String>) -> (RunState, Option<String>) {
        let cancelled = self.cancelled.load(Ordering::Relaxed);
        match (self.declared.lock().clone(), returned) {
            (Some(Declared::Fail(message)), _) => (RunState::Failed, Some(message)),
            (Some(Declared::Complete), Ok(())) => (RunState::Completed, None),
            (_, Ok(())) | (_, Err(_)) if cancelled => {
                (RunState::Cancelled, self.cancel_reason.lock().clone())
            }
            (_, Ok(())) => (RunState::Completed, None),
            (_, Err(message)) => (RunState::Failed, Some(message)),
        }
    }
}
