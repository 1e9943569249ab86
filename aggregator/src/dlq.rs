//! The dead-letter stream: messages that cannot be decoded are copied to
//! `athanor.dlq.<reason>` with their original headers and the reason, then
//! terminated so they are never redelivered.

use async_nats::jetstream::{self, AckKind};
use tracing::{error, warn};

use crate::Shared;

pub const REASON_HEADER: &str = "Athanor-Dlq-Reason";
pub const SUBJECT_HEADER: &str = "Athanor-Dlq-Subject";
pub const STREAM_SEQ_HEADER: &str = "Athanor-Dlq-Stream-Seq";

/// Copies `message` to the dead-letter stream, then terminates it. If the copy cannot
/// be stored, the message is left unacknowledged (it comes back), so nothing is lost.
pub(crate) async fn dead_letter(
    shared: &Shared,
    message: &jetstream::Message,
    kind: &str,
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
            shared
                .stats
                .dead_lettered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(error) = message.ack_with(AckKind::Term).await {
                warn!(stream_seq, %error, "could not terminate a dead-lettered message; it will be dead-lettered again");
            }
        }
        Err(e) => {
            error!(stream_seq, error = %e, "could not dead-letter a message; leaving it for redelivery")
        }
    }
}
