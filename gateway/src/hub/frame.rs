//! The SSE frames a hub sends: each event encoded once and shared, as bytes, by every
//! viewer that sends it.

use std::fmt::Write as _;
use std::sync::Arc;

use athanor_schemas::events::{self, BatchEvent};
use athanor_schemas::Batch;
use bytes::Bytes;

/// One SSE event, encoded once and shared by every viewer that sends it (see
/// `sse::Writes` for how it is written).
#[derive(Debug)]
pub(crate) struct Frame {
    pub event: &'static str,
    /// The batch watermark after this event (none on `resync` and `run`).
    pub id: Option<u64>,
    /// The event as sent: `event:`, `id:` when there is one, one `data:` line and the
    /// blank line.
    pub wire: Bytes,
}

impl Frame {
    pub fn new(event: &'static str, id: Option<u64>, data: &impl serde::Serialize) -> Arc<Frame> {
        let mut wire = format!("event: {event}\n");
        if let Some(id) = id {
            let _ = writeln!(wire, "id: {id}");
        }
        wire.push_str("data: ");
        let mut wire = wire.into_bytes();
        // JSON escapes newlines inside strings, so the data is always one line.
        serde_json::to_writer(&mut wire, data).expect("an event serialises");
        wire.extend_from_slice(b"\n\n");
        Arc::new(Frame {
            event,
            id,
            wire: wire.into(),
        })
    }

    /// The frame of one batch: the same bytes whether it comes from a hub or from a
    /// viewer's catch-up.
    pub fn batch(batch: &Batch) -> Arc<Frame> {
        Frame::new(
            events::BATCH,
            Some(batch.batch_seq + 1),
            &BatchEvent::of(batch),
        )
    }

    pub fn resync(reason: &str) -> Arc<Frame> {
        Frame::new(
            events::RESYNC,
            None,
            &serde_json::json!({ "reason": reason }),
        )
    }
}
