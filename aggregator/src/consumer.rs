//! The consume → decode → write → ack loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use athanor_schemas::names;
use futures::StreamExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::store::{self, Incoming};
use crate::{dlq, Shared};

/// Pulls from the shared durable consumer until shutdown, recreating the pull stream
/// when it ends (NATS restarts are handled by the client).
pub(crate) async fn consume(shared: Arc<Shared>) {
    loop {
        let mut messages = match open(&shared).await {
            Ok(messages) => messages,
            Err(error) => {
                warn!(%error, "cannot open the aggregator consumer; retrying");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
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
            let deadline = Instant::now() + shared.config.linger;
            while pending.len() < shared.config.max_batch_messages {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(message))) => pending.push(message),
                    Ok(Some(Err(error))) => {
                        debug!(%error, "pull stream error");
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            if !write(&shared, pending).await {
                return;
            }
        }
    }
}

async fn open(shared: &Shared) -> Result<consumer::pull::Stream, String> {
    let stream = shared
        .js
        .get_stream(names::RUNS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
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
        .map_err(|e| e.to_string())?;
    consumer
        .stream()
        .max_messages_per_batch(shared.config.max_batch_messages)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// Decodes `messages` (dead-lettering the bad ones), writes the good ones in one
/// transaction — retried with backoff while the database fails — and acks them after
/// the commit. Returns false when shutdown interrupted a retry (nothing acked).
async fn write(shared: &Shared, messages: Vec<jetstream::Message>) -> bool {
    let mut good = Vec::with_capacity(messages.len());
    for message in messages {
        match decode(shared, &message) {
            Ok(_) => good.push(message),
            Err((kind, reason)) => dlq::dead_letter(shared, &message, kind, &reason).await,
        }
    }
    if good.is_empty() {
        return true;
    }
    let mut delay = Duration::from_millis(100);
    loop {
        // Decoded again on a retry: cheaper than keeping a copy of every batch.
        let incoming: Vec<Incoming> = good
            .iter()
            .filter_map(|m| {
                decode(shared, m).ok().map(|batch| Incoming {
                    batch,
                    stream_seq: m.info().map_or(0, |i| i.stream_sequence),
                })
            })
            .collect();
        match store::store(&shared.db, incoming).await {
            Ok(written) => {
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
                    .lines
                    .fetch_add(written.lines, Ordering::Relaxed);
                debug!(
                    batches = written.batches,
                    duplicates = written.duplicates,
                    lines = written.lines,
                    "stored"
                );
                for message in &good {
                    if let Err(error) = message.ack().await {
                        // The batch is stored; a redelivery is absorbed.
                        debug!(%error, "ack failed");
                    }
                }
                return true;
            }
            Err(error) => {
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                warn!(%error, messages = good.len(), retry_in = ?delay, "writing batches failed; nothing acknowledged, retrying");
                // Keep the messages ours while we retry.
                for message in &good {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(shared.config.max_retry_delay);
            }
        }
    }
}

/// Decodes and checks a message: the batch must belong to the run of its subject.
fn decode(
    shared: &Shared,
    message: &jetstream::Message,
) -> Result<athanor_schemas::Batch, (&'static str, String)> {
    let batch = athanor_schemas::decode(&message.payload, shared.config.decode_limit)
        .map_err(|e| (e.kind(), e.to_string()))?;
    if message.subject.as_str() != names::run_subject(&batch.run_id)
        || !names::is_valid_token(&batch.run_id)
    {
        return Err((
            "wrong_subject",
            format!(
                "batch of run {:?} published on {}",
                batch.run_id, message.subject
            ),
        ));
    }
    Ok(batch)
}
