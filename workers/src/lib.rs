//! Athanor workers: the first stage of the pipeline.
//!
//! A worker hosts experiments. It takes run requests from `ATHANOR_REQUESTS`, runs
//! each experiment on a thread of its own, and collects what the experiment emits in
//! an in-memory [`buffer::RunBuffer`] (no I/O on the experiment's path). Every
//! `flush_interval` (100 ms) the run's supervisor drains that buffer into one
//! zstd-compressed batch and publishes it to `ATHANOR_RUNS`, waiting for the JetStream
//! ack; the aggregator and the gateway take it from there. The worker advertises
//! itself and its experiments in the `athanor_workers` bucket and watches
//! `athanor_control` for cancellations.

pub mod buffer;
pub mod builtin;
pub mod command;
pub mod config;
pub mod context;
pub mod experiment;
pub mod flusher;
mod instruments;
mod intake;
mod registry;
mod supervisor;
mod worker;

pub use athanor_schemas::Level;
pub use config::WorkerConfig;
pub use context::RunContext;
pub use experiment::{Experiment, RunError};
pub use worker::{RunHandle, Worker};

use std::sync::Arc;

use async_nats::jetstream::context::GetStreamError;
use async_nats::jetstream::stream::ConsumerError;
use athanor_connections::nats::{NatsConfig, NatsError};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("cannot open the {stream} stream: {source}")]
    Stream {
        stream: &'static str,
        #[source]
        source: GetStreamError,
    },
    #[error("cannot open the consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: ConsumerError,
    },
    #[error("invalid experiment declaration: {0}")]
    Declaration(#[from] command::DeclarationError),
    #[error("unknown experiment {name:?} (this worker hosts: {hosted})")]
    UnknownExperiment { name: String, hosted: String },
    #[error("invalid run id {0:?}: use 1-128 characters of A-Z a-z 0-9 - _")]
    InvalidRunId(String),
    #[error("run {0} was already started: it is running here, a worker took its request, or its output is in ATHANOR_RUNS")]
    DuplicateRun(String),
    #[error("could not acknowledge the run request: {0}")]
    Ack(#[source] async_nats::Error),
    #[error("the worker is shutting down")]
    ShuttingDown,
    /// A setting that contradicts the NATS server it connected to.
    #[error("worker.max_line_bytes = {max_line_bytes}: at most the NATS server's max_payload ({max_payload}) less {slack} bytes of headers, or a line could never be published whole")]
    LineOverPayload {
        max_line_bytes: usize,
        max_payload: usize,
        slack: usize,
    },
}

impl Error {
    /// A configuration the worker refuses (`athanor` exits with status 2).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Error::LineOverPayload { .. } | Error::Declaration(_) | Error::UnknownExperiment { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs a worker hosting the built-in experiments and the command experiments
/// declared in `commands` (or those of them named in `worker.experiments`) until
/// `shutdown` is cancelled, then stops taking requests, cancels and finally flushes
/// its running runs, and deregisters.
pub async fn run(
    config: WorkerConfig,
    commands: &[command::CommandSpec],
    nats: NatsConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let experiments = experiments(&config, commands)?;
    let worker = Worker::start(config, nats, experiments, shutdown).await?;
    worker.wait().await;
    Ok(())
}

/// The experiments a worker hosts: the built-ins and the declared commands (every
/// declaration checked), narrowed to `worker.experiments` when that is set.
pub fn experiments(
    config: &WorkerConfig,
    commands: &[command::CommandSpec],
) -> Result<Vec<Arc<dyn Experiment>>> {
    let mut all = builtin::all();
    let taken: Vec<&str> = all.iter().map(|e| e.name()).collect();
    let declared = command::declare(commands, &taken, config)?;
    all.extend(declared);
    select(all, &config.experiments)
}

/// The experiments of `all` named in `names`, or all of them when `names` is empty.
fn select(all: Vec<Arc<dyn Experiment>>, names: &[String]) -> Result<Vec<Arc<dyn Experiment>>> {
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|e| e.name() == name)
                .cloned()
                .ok_or_else(|| Error::UnknownExperiment {
                    name: name.clone(),
                    hosted: all.iter().map(|e| e.name()).collect::<Vec<_>>().join(", "),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};

    use super::*;

    #[test]
    fn errors_say_what_failed_and_keep_their_source() {
        let error = Error::Stream {
            stream: athanor_schemas::names::RUNS_STREAM,
            source: GetStreamError::with_source(
                GetStreamErrorKind::Request,
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            ),
        };
        let source = error.source().expect("the JetStream error is the source");
        assert!(source.is::<GetStreamError>());
        assert_eq!(
            error.to_string(),
            format!("cannot open the ATHANOR_RUNS stream: {source}")
        );

        let error = Error::Ack("no responders".into());
        assert_eq!(
            error.to_string(),
            "could not acknowledge the run request: no responders"
        );
        assert_eq!(error.source().unwrap().to_string(), "no responders");
    }
}
