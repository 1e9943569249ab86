//! The consume → decode → write → ack loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use athanor_connections::retry::Backoff;
use athanor_schemas::names;
use futures::StreamExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::store::{self, Incoming};
use crate::{dlq, Error, Result, Shared};

/// Decoded messages on their way to the writers. Bounded: when the database is slower
/// than decoding, the decoder waits (policy: block), so at most this many fetched
/// transactions (or `aggregator.writers`, if more) wait in memory.
const DECODED_QUEUE: usize = 2;

/// One transaction's worth: the messages to ack after the commit, and their batches.
struct Decoded {
    messages: Vec<jetstream::Message>,
    incoming: store::Prepared,
}

/// Pulls from the shared durable consumer until shutdown, recreating the pull stream
/// when it ends (NATS restarts are handled by the client). Decoding runs here, the
/// writes in `aggregator.writers` tasks of their own, so the two overlap.
pub(crate) async fn consume(shared: Arc<Shared>) {
    let writers = shared.config.writers.max(1);
    let (to_writer, from_decoder) =
        tokio::sync::mpsc::channel::<Decoded>(DECODED_QUEUE.max(writers));
    let from_decoder = Arc::new(tokio::sync::Mutex::new(from_decoder));
    let writers: Vec<_> = (0..writers)
        .map(|_| tokio::spawn(write_loop(shared.clone(), from_decoder.clone())))
        .collect();
    pull_loop(&shared, to_writer).await;
    // The channel is closed: the writers finish what they have, then stop.
    for writer in writers {
        let _ = writer.await;
    }
    // Acknowledgements are buffered by the client: send the last ones before going.
    if let Err(error) = shared.js.client().flush().await {
        warn!(%error, "could not send the last acknowledgements; those batches will be delivered again (and absorbed)");
    }
}

async fn pull_loop(shared: &Shared, to_writer: tokio::sync::mpsc::Sender<Decoded>) {
    let mut reopen = Backoff::REOPEN.retries();
    loop {
        let mut messages = match open(shared).await {
            Ok(messages) => {
                reopen.reset();
                messages
            }
            Err(error) => {
                let delay = reopen.next_delay();
                warn!(%error, retry_in = ?delay, "cannot open the aggregator consumer; retrying");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        info!(consumer = %shared.config.consumer, "aggregator consuming");
        loop {
            let first = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            let mut pending = match first {
                Some(Ok(message)) => vec![message],
                Some(Err(error)) => {
                    debug!(%error, "pull stream error");
                    continue;
                }
                None => break,
            };
            // Take what else is already there, up to the transaction size.
            let mut bytes = decoded_size(&pending[0].payload);
            let deadline = Instant::now() + shared.config.linger;
            while pending.len() < shared.config.max_batch_messages
                && bytes < shared.config.max_batch_bytes
            {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(message))) => {
                        bytes += decoded_size(&message.payload);
                        pending.push(message);
                    }
                    Ok(Some(Err(error))) => {
                        debug!(%error, "pull stream error");
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let redelivered = pending
                .iter()
                .filter(|m| m.info().is_ok_and(|i| i.delivered > 1))
                .count();
            shared
                .stats
                .redelivered
                .fetch_add(redelivered as u64, Ordering::Relaxed);
            let started = Instant::now();
            let decoded = decode_all(shared, pending).await;
            shared
                .stats
                .decode_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            if !decoded.messages.is_empty() && to_writer.send(decoded).await.is_err() {
                return;
            }
        }
    }
}

/// What a message will take in memory once decoded: its declared size (bounded by the
/// decode limit), or for a frame without one, a generous guess.
fn decoded_size(payload: &[u8]) -> usize {
    athanor_schemas::codec::declared_size(payload)
        .map_or(payload.len() * 10, |n| n.min(u32::MAX as u64) as usize)
}

/// Decodes messages, dead-lettering those that cannot be, and prepares the rest for
/// their transaction.
async fn decode_all(shared: &Shared, messages: Vec<jetstream::Message>) -> Decoded {
    let mut kept = Vec::with_capacity(messages.len());
    let mut incoming = Vec::with_capacity(messages.len());
    // Decompressing and parsing is CPU work: off the async threads, which meanwhile
    // ack, pull and keep the consumer's heartbeats going.
    let limit = shared.config.decode_limit;
    let payloads: Vec<bytes::Bytes> = messages.iter().map(|m| m.payload.clone()).collect();
    let batches = tokio::task::spawn_blocking(move || {
        payloads
            .iter()
            .map(|p| athanor_schemas::decode(p, limit))
            .collect::<Vec<_>>()
    })
    .await
    .expect("decoding does not panic");
    for (message, batch) in messages.into_iter().zip(batches) {
        match checked(&message, batch) {
            Ok(batch) => {
                incoming.push(Incoming {
                    batch,
                    stream_seq: message.info().map_or(0, |i| i.stream_sequence),
                });
                kept.push(message);
            }
            Err((kind, reason)) => dlq::dead_letter(shared, &message, kind, &reason).await,
        }
    }
    let backend = sea_orm::ConnectionTrait::get_database_backend(&shared.db);
    let incoming = if store::Prepared::worth_a_thread(&incoming) {
        tokio::task::spawn_blocking(move || store::Prepared::new(backend, incoming))
            .await
            .expect("preparing does not panic")
    } else {
        store::Prepared::new(backend, incoming)
    };
    Decoded {
        messages: kept,
        incoming,
    }
}

/// One of `aggregator.writers`: takes the next transaction's worth, writes it, acks it.
/// Concurrent transactions lock rows in the same order (`store::Prepared` sorts), as those
/// of several aggregators do.
async fn write_loop(
    shared: Arc<Shared>,
    from_decoder: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Decoded>>>,
) {
    loop {
        let next = from_decoder.lock().await.recv().await;
        let Some(decoded) = next else { return };
        if !write(&shared, decoded).await {
            return;
        }
    }
}

async fn open(shared: &Shared) -> Result<consumer::pull::Stream> {
    let stream = shared
        .js
        .get_stream(names::RUNS_STREAM)
        .await
        .map_err(|source| Error::Stream {
            stream: names::RUNS_STREAM,
            source,
        })?;
    let name = shared.config.consumer.clone();
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                description: Some("Athanor aggregators: persist run batches".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: shared.config.ack_wait,
                max_ack_pending: (shared.config.max_batch_messages * 20) as i64,
                filter_subject: names::RUNS_SUBJECTS.into(),
                ..Default::default()
            },
        )
        .await
        .map_err(|source| Error::Consumer {
            consumer: name.clone(),
            source,
        })?;
    consumer
        .stream()
        .max_messages_per_batch(shared.config.max_batch_messages)
        .max_bytes_per_batch(shared.config.max_batch_bytes)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|source| Error::Pull {
            consumer: name,
            source,
        })
}

/// Writes one transaction and acks its messages after the commit. A transaction the
/// database refuses for good (a data error, not an outage) is split into one
/// transaction per message, and a message refused alone goes to the dead-letter stream,
/// so one bad batch cannot stop the aggregator. Returns false when shutdown interrupted
/// a retry (nothing acked).
async fn write(shared: &Shared, decoded: Decoded) -> bool {
    let Decoded { messages, incoming } = decoded;
    match write_with_retry(shared, &messages, incoming).await {
        Outcome::Stored => {
            ack_all(&messages).await;
            true
        }
        Outcome::Shutdown => false,
        Outcome::Refused(error) => {
            warn!(%error, messages = messages.len(), "the database refused a transaction; writing its batches one by one");
            for message in messages {
                let single = decode_all(shared, vec![message.clone()]).await.incoming;
                match write_with_retry(shared, std::slice::from_ref(&message), single).await {
                    Outcome::Stored => ack_all(std::slice::from_ref(&message)).await,
                    Outcome::Shutdown => return false,
                    Outcome::Refused(error) => {
                        dlq::dead_letter(
                            shared,
                            &message,
                            dlq::STORE,
                            &format!("the database refused the batch: {error}"),
                        )
                        .await
                    }
                }
            }
            true
        }
    }
}

enum Outcome {
    Stored,
    Shutdown,
    /// A permanent error: retrying the same data would fail again.
    Refused(sea_orm::DbErr),
}

async fn ack_all(messages: &[jetstream::Message]) {
    for message in messages {
        if let Err(error) = message.ack().await {
            // The batch is stored; a redelivery is absorbed.
            debug!(%error, "ack failed");
        }
    }
}

/// Stores `incoming`, retrying with backoff while the database is unavailable (the
/// held messages get progress acks meanwhile, so they are not redelivered elsewhere).
async fn write_with_retry(
    shared: &Shared,
    messages: &[jetstream::Message],
    mut incoming: store::Prepared,
) -> Outcome {
    let mut retries = Backoff::STORE
        .with_cap(shared.config.max_retry_delay)
        .retries();
    loop {
        let started = Instant::now();
        let stored = store::store_prepared(&shared.db, incoming).await;
        let took = started.elapsed();
        shared
            .stats
            .write_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        match stored {
            Ok(written) => {
                crate::instruments::transaction(took, &written);
                shared
                    .stats
                    .batches
                    .fetch_add(written.batches, Ordering::Relaxed);
                shared
                    .stats
                    .duplicates
                    .fetch_add(written.duplicates, Ordering::Relaxed);
                shared
                    .stats
                    .of_deleted_runs
                    .fetch_add(written.of_deleted_runs, Ordering::Relaxed);
                shared
                    .stats
                    .lines
                    .fetch_add(written.lines, Ordering::Relaxed);
                shared
                    .stats
                    .metrics
                    .fetch_add(written.metrics, Ordering::Relaxed);
                debug!(
                    batches = written.batches,
                    duplicates = written.duplicates,
                    of_deleted_runs = written.of_deleted_runs,
                    lines = written.lines,
                    metrics = written.metrics,
                    "stored"
                );
                crate::lifecycle::announce(shared, &written.changes).await;
                return Outcome::Stored;
            }
            Err(error) if store::is_permanent(&error) => return Outcome::Refused(error),
            Err(error) => {
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                let delay = retries.next_delay();
                warn!(%error, messages = messages.len(), retry_in = ?delay, "writing batches failed; nothing acknowledged, retrying");
                for message in messages {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                tokio::select! {
                    _ = shared.abandon.cancelled() => {
                        warn!(messages = messages.len(), drain_timeout = ?shared.config.drain_timeout,
                            "stopping: the batches still cannot be written after the drain timeout; left unacknowledged for redelivery");
                        return Outcome::Shutdown;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                // The failed attempt consumed the batches: decode them again (cheaper
                // than keeping a copy of every batch for the rare retry).
                incoming = decode_all(shared, messages.to_vec()).await.incoming;
            }
        }
    }
}

/// A message's decoded batch, checked: it must belong to the run of its subject.
fn checked(
    message: &jetstream::Message,
    batch: Result<athanor_schemas::Batch, athanor_schemas::DecodeError>,
) -> Result<athanor_schemas::Batch, (&'static str, String)> {
    let batch = batch.map_err(|e| (e.kind(), e.to_string()))?;
    if message.subject.as_str() != names::run_subject(&batch.run_id)
        || !names::is_valid_token(&batch.run_id)
    {
        return Err((
            dlq::WRONG_SUBJECT,
            format!(
                "batch of run {:?} published on {}",
                batch.run_id, message.subject
            ),
        ));
    }
    Ok(batch)
}
