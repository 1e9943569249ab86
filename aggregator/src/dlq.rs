//! The dead-letter stream: messages that cannot be decoded are copied to
//! `athanor.dlq.<reason>` with their original headers and the reason, recorded as a
//! known gap of their run (so it still ends, saying which batch was rejected and why),
//! then terminated so they are never redelivered.

use async_nats::jetstream::{self, AckKind};
use athanor_schemas::names;
use tracing::{error, warn};

use crate::store::{self, Rejected};
use crate::Shared;

/// Dead-letter reasons besides a decode error's kind: a batch on another run's
/// subject, and one the database refused alone.
pub const WRONG_SUBJECT: &str = "wrong_subject";
pub const STORE: &str = "store";

pub const REASON_HEADER: &str = "Athanor-Dlq-Reason";
pub const SUBJECT_HEADER: &str = "Athanor-Dlq-Subject";
pub const STREAM_SEQ_HEADER: &str = "Athanor-Dlq-Stream-Seq";

/// Copies `message` to the dead-letter stream, then terminates it. If the copy cannot
/// be stored, the message is left unacknowledged (it comes back), so nothing is lost.
pub(crate) async fn dead_letter(
    shared: &Shared,
    message: &jetstream::Message,
    kind: &'static str,
    reason: &str,
) {
    let mut headers = message.headers.clone().unwrap_or_default();
    // The original headers stay as they are (its Nats-Msg-Id dedupes a message
    // dead-lettered twice); the reason and origin are added.
    let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
    headers.insert(REASON_HEADER, reason.replace(['\r', '\n'], " ").as_str());
    headers.insert(SUBJECT_HEADER, message.subject.as_str());
    headers.insert(STREAM_SEQ_HEADER, stream_seq.to_string().as_str());
    let subject = format!("athanor.dlq.{kind}");
    let copied = async {
        shared
            .js
            .publish_with_headers(subject, headers, message.payload.clone())
            .await?
            .await
    };
    match copied.await {
        Ok(_) => {
            warn!(subject = %message.subject, stream_seq, kind, reason, "batch dead-lettered");
            if let Some(rejected) = rejected(message, stream_seq, reason) {
                match store::record_rejected(&shared.db, &rejected).await {
                    Ok(change) => {
                        crate::lifecycle::announce(shared, change.as_slice()).await;
                    }
                    Err(e) => {
                        // Not terminated: it comes back, is dead-lettered again (the
                        // copy is deduplicated by its Nats-Msg-Id) and recorded then.
                        warn!(stream_seq, error = %e, "could not record a dead-lettered batch as a gap of its run; it will be retried");
                        return;
                    }
                }
            } else {
                warn!(subject = %message.subject, stream_seq, "a dead-lettered message names no run and batch: no gap recorded");
            }
            shared
                .stats
                .dead_lettered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::instruments::dead_lettered(kind);
            if let Err(error) = message.ack_with(AckKind::Term).await {
                warn!(stream_seq, %error, "could not terminate a dead-lettered message; it will be dead-lettered again");
            }
        }
        Err(e) => {
            error!(stream_seq, error = %e, "could not dead-letter a message; leaving it for redelivery")
        }
    }
}

/// The run and batch a rejected message held, from its headers (`Athanor-Run`,
/// `Athanor-Batch`, `Athanor-Lines`, `Athanor-Final`), else its subject and its
/// `Nats-Msg-Id` (`<run_id>.<batch_seq>`): what the payload said cannot be trusted.
fn rejected(message: &jetstream::Message, stream_seq: u64, reason: &str) -> Option<Rejected> {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
    let run_id = names::run_of_subject(message.subject.as_str())?.to_string();
    if header(names::headers::RUN).is_some_and(|r| r != run_id) {
        return None;
    }
    let batch_seq = number(names::headers::BATCH).or_else(|| {
        header(names::headers::MSG_ID)?
            .strip_prefix(&format!("{run_id}."))?
            .parse()
            .ok()
    })?;
    if batch_seq > i64::MAX as u64 {
        return None;
    }
    Some(Rejected {
        run_id,
        batch_seq,
        stream_seq,
        lines: number(names::headers::LINES),
        final_batches: number(names::headers::FINAL).filter(|&n| n == batch_seq + 1),
        reason: reason.chars().take(500).collect(),
    })
}
