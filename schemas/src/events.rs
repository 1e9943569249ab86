//! What viewers receive: the Server-Sent Events of a run's live feed
//! (`/api/runs/{id}/events`), the run lifecycle announcements (`athanor.lifecycle.<run_id>`
//! on NATS, relayed as `/api/events`), and a decoder for the SSE text format that the
//! CLI and the tests read them with.
//!
//! A run's feed, in order:
//! * `snapshot` — the run, its latest progress, its results, the tail of its log and
//!   the total line count, as of the batches it covers;
//! * `batch` — one per batch, in `batch_seq` order, each exactly once;
//! * `resync` — the viewer fell behind; a fresh `snapshot` follows and replaces its state;
//! * `status` — the terminal status, always last; then the stream ends.
//!
//! Every event carries `id: <n>`: the run's batch watermark, the number of batches
//! (`0..n`) the viewer now holds. Reconnecting with `Last-Event-ID: <n>` continues at
//! batch `n`, on any gateway.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::batch::{Batch, LogLine, Progress, ResultRecord};

pub const SNAPSHOT: &str = "snapshot";
pub const BATCH: &str = "batch";
pub const RESYNC: &str = "resync";
pub const STATUS: &str = "status";
/// The lifecycle feed's one event name.
pub const RUN: &str = "run";

/// The run as a viewer sees it (also the body of `GET /api/runs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Run))]
pub struct RunView {
    pub id: String,
    pub experiment: String,
    pub instance_id: Option<String>,
    /// The validated config, defaults applied.
    pub config: Value,
    #[cfg_attr(feature = "openapi", schema(value_type = crate::batch::RunState))]
    pub status: String,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    /// µs since the epoch.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub progress: Option<Progress>,
    /// Lines, results and batches stored (the REST view: `results` counts records) or
    /// covered (a feed's view: `results` counts the keys held).
    pub lines: i64,
    pub results: i64,
    pub batches: i64,
}

/// The first event of a feed, and the one after a `resync`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    pub run: RunView,
    /// Latest value of each result key.
    pub results: BTreeMap<String, ResultRecord>,
    /// The newest lines, oldest first.
    pub tail: Vec<LogLine>,
    /// Lines in the batches covered (`tail` holds the last of them).
    pub lines: u64,
    /// Batches covered: `0..batches`. Equals the event's `id`.
    pub batches: u64,
}

/// One batch of a run, as it was published (its `batch_seq` is the event's `id` - 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchEvent {
    pub batch_seq: u64,
    #[serde(default)]
    pub logs: Vec<LogLine>,
    #[serde(default)]
    pub results: Vec<ResultRecord>,
    #[serde(default)]
    pub progress: Option<Progress>,
    /// `running` on a run's first batch; the terminal state on its last.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

impl BatchEvent {
    pub fn of(batch: &Batch) -> Self {
        BatchEvent {
            batch_seq: batch.batch_seq,
            logs: batch.logs.clone(),
            results: batch.results.clone(),
            progress: batch.progress.clone(),
            status: batch.status.as_ref().map(|s| s.state.as_str().to_string()),
            error: batch.status.as_ref().and_then(|s| s.error.clone()),
        }
    }
}

/// The last event of a feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusEvent {
    pub status: String,
    pub error: Option<String>,
    /// Lines and batches of the whole run.
    pub lines: u64,
    pub batches: u64,
    pub finished_at: Option<i64>,
}

/// Published on `athanor.lifecycle.<run_id>` (core NATS, after the change is in the
/// database) and relayed by every gateway on `/api/events` as a `run` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lifecycle {
    pub run_id: String,
    /// `pending` (created), `running`, or a terminal state.
    pub status: String,
    #[serde(default)]
    pub experiment: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    pub at: i64,
}

/// One event of an SSE stream, as a client reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Incremental decoder of `text/event-stream`: feed it bytes as they arrive, take the
/// complete events. Comments (keep-alives) are skipped. Linear in what it is fed: a
/// line arriving in many pieces is searched for its end once, not again per piece.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the line being received (no newline among them).
    buffer: Vec<u8>,
    current: SseEvent,
    has_data: bool,
    /// Bytes searched for a newline so far, for the test that proves the decoder linear.
    #[cfg(test)]
    examined: usize,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            #[cfg(test)]
            {
                self.examined += end + 1;
            }
            let piece = &rest[..end];
            if self.buffer.is_empty() {
                self.line(piece, &mut events);
            } else {
                self.buffer.extend_from_slice(piece);
                let line = std::mem::take(&mut self.buffer);
                self.line(&line, &mut events);
            }
            rest = &rest[end + 1..];
        }
        #[cfg(test)]
        {
            self.examined += rest.len();
        }
        self.buffer.extend_from_slice(rest);
        events
    }

    /// One line, its newline removed.
    fn line(&mut self, line: &[u8], events: &mut Vec<SseEvent>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = String::from_utf8_lossy(line);
        if line.is_empty() {
            if self.has_data {
                let mut event = std::mem::take(&mut self.current);
                if event.event.is_empty() {
                    event.event = "message".into();
                }
                events.push(event);
                self.has_data = false;
            } else {
                self.current = SseEvent::default();
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*line, ""),
        };
        match field {
            "event" => self.current.event = value.to_string(),
            "id" => self.current.id = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ten_megabyte_line_in_small_pieces_is_searched_once() {
        let data = "x".repeat(10 << 20);
        let text = format!("event: batch\nid: 1\ndata: {data}\n\n");
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        for piece in text.as_bytes().chunks(4096) {
            events.extend(decoder.push(piece));
        }
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.len(), data.len());
        assert!(events[0].data == data);
        assert_eq!(
            decoder.examined,
            text.len(),
            "every byte searched exactly once"
        );
    }

    #[test]
    fn decodes_events_split_anywhere() {
        let text = b": keep-alive\n\nevent: batch\nid: 3\ndata: {\"a\":1}\n\nevent: status\r\ndata: x\r\ndata: y\r\n\r\n";
        for cut in 0..text.len() {
            let mut decoder = SseDecoder::new();
            let mut events = decoder.push(&text[..cut]);
            events.extend(decoder.push(&text[cut..]));
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        event: "batch".into(),
                        id: Some("3".into()),
                        data: "{\"a\":1}".into()
                    },
                    SseEvent {
                        event: "status".into(),
                        id: None,
                        data: "x\ny".into()
                    },
                ],
                "cut at {cut}"
            );
        }
    }
}
