//! Turns a run's drained output into batches and publishes them, in order, with
//! retries under the same `Nats-Msg-Id` until JetStream acknowledges each one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use athanor_connections::retry::Backoff;
use athanor_schemas::batch::SCHEMA_VERSION;
use athanor_schemas::codec::{self, MAX_BATCH_JSON_BYTES};
use athanor_schemas::{names, Batch, Final, RunInfo, RunState, Status};
use bytes::Bytes;
use tracing::{debug, warn};

use crate::buffer::{Budget, Drained};
use crate::instruments;

/// Why a batch was sent: a metric label and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushTrigger {
    /// The periodic flush of a running run.
    Tick,
    /// Output of a run that had published nothing for a whole flush interval: sent at
    /// once (the leading edge), the interval starting again from there.
    Lead,
    /// An extra batch of the same flush, because one batch would exceed `max_payload`.
    Size,
    /// The last flush of a run, carrying its terminal status.
    Final,
}

impl FlushTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushTrigger::Tick => "tick",
            FlushTrigger::Lead => "lead",
            FlushTrigger::Size => "size",
            FlushTrigger::Final => "final",
        }
    }
}

/// Room left in `max_payload` for the headers and protocol framing of a message.
pub(crate) const HEADER_SLACK: usize = 4 << 10;

/// Counters of what a worker published (all runs).
#[derive(Debug, Default)]
pub struct PublishStats {
    pub batches: AtomicU64,
    pub lines: AtomicU64,
    /// Compressed bytes sent (payloads only).
    pub wire_bytes: AtomicU64,
    /// JSON bytes before compression.
    pub json_bytes: AtomicU64,
    /// Publish attempts that failed or timed out and were retried.
    pub retries: AtomicU64,
    /// Acks saying the broker had the batch already (a retry after a lost ack).
    pub duplicates: AtomicU64,
}

/// One encoded batch, ready to publish.
struct Outgoing {
    batch_seq: u64,
    lines: usize,
    /// The run's number of batches, on its final batch.
    final_batches: Option<u64>,
    json_len: usize,
    payload: Vec<u8>,
}

/// Publishes the batches of one run. Owned by the run's supervisor task, so batches
/// of one run go out strictly in order.
pub(crate) struct Publisher {
    js: jetstream::Context,
    run_id: String,
    worker_id: String,
    subject: String,
    next_batch_seq: u64,
    /// Sent with the first batch, then `None`.
    run_info: Option<RunInfo>,
    max_payload: usize,
    publish_timeout: Duration,
    stats: Arc<PublishStats>,
    /// Drained bytes are given back here once JetStream has acknowledged them.
    budget: Arc<Budget>,
}

impl Publisher {
    #[allow(clippy::too_many_arguments)] // one call, in the worker, naming each
    pub(crate) fn new(
        js: jetstream::Context,
        run_id: &str,
        worker_id: &str,
        run_info: RunInfo,
        max_payload: usize,
        publish_timeout: Duration,
        stats: Arc<PublishStats>,
        budget: Arc<Budget>,
    ) -> Self {
        Publisher {
            js,
            run_id: run_id.into(),
            worker_id: worker_id.into(),
            subject: names::run_subject(run_id),
            next_batch_seq: 0,
            run_info: Some(run_info),
            max_payload,
            publish_timeout,
            stats,
            budget,
        }
    }

    /// Whether nothing was published yet (the first batch carries `running`).
    pub(crate) fn is_first(&self) -> bool {
        self.next_batch_seq == 0
    }

    /// Publishes what was drained (the first call always publishes: it carries
    /// `running`), or with `terminal`, the run's final batch. Returns when every batch
    /// is acknowledged, and only then gives the drained bytes back to the budget.
    pub(crate) async fn send(
        &mut self,
        drained: Drained,
        trigger: FlushTrigger,
        terminal: Option<(RunState, Option<String>)>,
    ) {
        let bytes = drained.bytes;
        self.send_drained(drained, trigger, terminal).await;
        self.budget.release(bytes);
    }

    async fn send_drained(
        &mut self,
        drained: Drained,
        trigger: FlushTrigger,
        terminal: Option<(RunState, Option<String>)>,
    ) {
        let first = self.next_batch_seq == 0;
        if drained.is_empty() && terminal.is_none() && !first {
            return;
        }
        let mut head = Batch::new(
            self.run_id.clone(),
            self.next_batch_seq,
            self.worker_id.clone(),
        );
        head.run = self.run_info.take();
        let now = athanor_schemas::now_micros();
        head.status = Some(match &terminal {
            Some((state, error)) => Status {
                state: *state,
                error: error.clone(),
                at: now,
            },
            None if first => Status {
                state: RunState::Running,
                error: None,
                at: now,
            },
            None => return self.send_body(head, drained, trigger).await,
        });
        if let Some((state, _)) = terminal {
            head.final_ = Some(Final {
                status: state,
                batches: 0,
                lines: drained.total_lines,
                results: drained.total_results,
                metrics: drained.total_metrics,
            });
        }
        self.send_body(head, drained, trigger).await
    }

    async fn send_body(&mut self, mut head: Batch, drained: Drained, trigger: FlushTrigger) {
        head.logs = drained.logs;
        head.results = drained.results;
        head.metrics = drained.metrics;
        head.progress = drained.progress;
        let first_seq = self.next_batch_seq;
        let max_payload = self.max_payload.saturating_sub(HEADER_SLACK).max(1024);
        let outgoing = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut next = first_seq;
            for piece in presplit(head, max_payload) {
                encode_fitting(piece, max_payload, &mut next, &mut out);
            }
            out
        })
        .await
        .expect("batch encoding does not panic");
        for (i, batch) in outgoing.into_iter().enumerate() {
            self.next_batch_seq = batch.batch_seq + 1;
            let trigger = if i == 0 { trigger } else { FlushTrigger::Size };
            self.publish(batch, trigger).await;
        }
    }

    async fn publish(&self, batch: Outgoing, trigger: FlushTrigger) {
        let mut headers = HeaderMap::new();
        headers.insert(
            names::headers::MSG_ID,
            names::batch_msg_id(&self.run_id, batch.batch_seq).as_str(),
        );
        headers.insert(names::headers::CONTENT_ENCODING, "zstd");
        headers.insert(names::headers::CONTENT_TYPE, "application/json");
        headers.insert(names::headers::SCHEMA, SCHEMA_VERSION);
        headers.insert(names::headers::RUN, self.run_id.as_str());
        headers.insert(names::headers::BATCH, batch.batch_seq.to_string().as_str());
        headers.insert(names::headers::LINES, batch.lines.to_string().as_str());
        if let Some(batches) = batch.final_batches {
            headers.insert(names::headers::FINAL, batches.to_string().as_str());
        }
        let payload = Bytes::from(batch.payload);
        let wire = payload.len() as u64;
        // Never gives up: the run's output exists only in this batch now.
        let mut retries = Backoff::PUBLISH.retries();
        let since = std::time::Instant::now();
        loop {
            let attempt = async {
                let ack = self
                    .js
                    .publish_with_headers(self.subject.clone(), headers.clone(), payload.clone())
                    .await?;
                ack.await
            };
            let error = match tokio::time::timeout(self.publish_timeout, attempt).await {
                Ok(Ok(ack)) => {
                    if ack.duplicate {
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .lines
                        .fetch_add(batch.lines as u64, Ordering::Relaxed);
                    self.stats.wire_bytes.fetch_add(wire, Ordering::Relaxed);
                    self.stats
                        .json_bytes
                        .fetch_add(batch.json_len as u64, Ordering::Relaxed);
                    metrics::histogram!(instruments::PUBLISH_SECONDS).record(since.elapsed());
                    metrics::counter!(instruments::BATCHES, "trigger" => trigger.as_str())
                        .increment(1);
                    debug!(run_id = %self.run_id, batch_seq = batch.batch_seq, lines = batch.lines, bytes = wire,
                        trigger = trigger.as_str(), stream_seq = ack.sequence, "batch published");
                    return;
                }
                Ok(Err(error)) => Some(error),
                Err(_) => None,
            };
            let delay = retries.next_delay();
            match error {
                Some(error) => {
                    warn!(run_id = %self.run_id, batch_seq = batch.batch_seq, %error, retry_in = ?delay, "publish failed; retrying")
                }
                None => {
                    warn!(run_id = %self.run_id, batch_seq = batch.batch_seq, timeout = ?self.publish_timeout, retry_in = ?delay,
                        "publish not acknowledged in time; retrying")
                }
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
    }
}

/// JSON bytes a batch is cut at before encoding, for a given `max_payload`: log text
/// compresses well over 3x, so a piece of this size nearly always fits in one message
/// and is encoded once. (`encode_fitting` still splits the rare piece that does not.)
fn piece_json_bytes(max_payload: usize) -> usize {
    (max_payload * 3).min(MAX_BATCH_JSON_BYTES)
}

/// Cuts a batch's logs into pieces of about [`piece_json_bytes`] of JSON each. The
/// head fields (`run`, `running`, results, metrics, progress) stay on the first piece, the
/// terminal status and `final` go on the last.
fn presplit(mut batch: Batch, max_payload: usize) -> Vec<Batch> {
    let target = piece_json_bytes(max_payload);
    let mut chunks = vec![Vec::new()];
    let mut size = 0;
    for line in std::mem::take(&mut batch.logs) {
        let line_size =
            60 + line.message.len() + line.metadata.as_ref().map_or(0, crate::buffer::json_size);
        if size + line_size > target && size > 0 {
            chunks.push(Vec::new());
            size = 0;
        }
        size += line_size;
        chunks.last_mut().expect("never empty").push(line);
    }
    if chunks.len() == 1 {
        batch.logs = chunks.pop().expect("one chunk");
        return vec![batch];
    }
    let final_ = batch.final_.take();
    let terminal = batch.status.take_if(|s| s.state.is_terminal());
    let mut pieces: Vec<Batch> = chunks
        .into_iter()
        .map(|logs| Batch {
            logs,
            ..Batch::new(batch.run_id.clone(), 0, batch.worker_id.clone())
        })
        .collect();
    let last = pieces.last_mut().expect("several pieces");
    last.final_ = final_;
    last.status = terminal;
    let first = &mut pieces[0];
    first.run = batch.run;
    first.results = batch.results;
    first.metrics = batch.metrics;
    first.progress = batch.progress;
    first.status = batch.status;
    pieces
}

/// Encodes `batch` as batch `*next`, splitting it when the payload would exceed
/// `max_payload` or its JSON [`MAX_BATCH_JSON_BYTES`]. Pieces are emitted left to
/// right, so `batch_seq`s stay consecutive and in log order; the head fields (`run`,
/// `running`, results, progress) stay on the first piece and `final` on the last.
fn encode_fitting(mut batch: Batch, max_payload: usize, next: &mut u64, out: &mut Vec<Outgoing>) {
    batch.batch_seq = *next;
    if let Some(f) = batch.final_.as_mut() {
        f.batches = *next + 1;
    }
    batch.sent_at = athanor_schemas::now_micros();
    let encoded = codec::encode(&batch);
    let fitting =
        |e: &codec::Encoded| e.payload.len() <= max_payload && e.json_len <= MAX_BATCH_JSON_BYTES;
    let (batch, encoded) = if fitting(&encoded) {
        (batch, encoded)
    } else {
        match split(batch) {
            Ok((left, right)) => {
                encode_fitting(left, max_payload, next, out);
                encode_fitting(right, max_payload, next, out);
                return;
            }
            Err(single) => {
                // One line (or result) too large even alone: cut its fields down to
                // max_payload / 8 bytes each, and while that still does not fit, to
                // half as much, down to MIN_KEEP (a loop, not a recursion: a field cut
                // to `keep` keeps its marker, so cutting it again at the same `keep`
                // would never end). Still too large there: it goes out as it is (the
                // server says why it refuses it).
                let mut single = *single;
                let mut keep = (max_payload / 8).max(256);
                loop {
                    shrink(&mut single, keep);
                    let encoded = codec::encode(&single);
                    if fitting(&encoded) {
                        break (single, encoded);
                    }
                    if keep <= MIN_KEEP {
                        tracing::warn!(
                            run_id = %single.run_id,
                            bytes = encoded.payload.len(),
                            max_payload,
                            "a batch cut to its minimum still exceeds max_payload"
                        );
                        break (single, encoded);
                    }
                    keep = (keep / 2).max(MIN_KEEP);
                }
            }
        }
    };
    *next += 1;
    out.push(Outgoing {
        batch_seq: batch.batch_seq,
        lines: batch.logs.len(),
        final_batches: batch.final_.as_ref().map(|f| f.batches),
        json_len: encoded.json_len,
        payload: encoded.payload,
    });
}

/// Splits a batch in two halves of its logs (or of its results when it has one line, or
/// of its metric records when it has one line and one result).
fn split(mut batch: Batch) -> Result<(Batch, Batch), Box<Batch>> {
    let mut right = Batch::new(batch.run_id.clone(), 0, batch.worker_id.clone());
    right.final_ = batch.final_.take();
    if right.final_.is_some() {
        // The terminal status travels with `final`; a `running` status stays in front.
        if batch.status.as_ref().is_some_and(|s| s.state.is_terminal()) {
            right.status = batch.status.take();
        }
    }
    if batch.logs.len() > 1 {
        right.logs = batch.logs.split_off(batch.logs.len() / 2);
    } else if batch.results.len() > 1 {
        right.results = batch.results.split_off(batch.results.len() / 2);
        right.logs = std::mem::take(&mut batch.logs);
    } else if batch.metrics.len() > 1 {
        right.metrics = batch.metrics.split_off(batch.metrics.len() / 2);
        right.results = std::mem::take(&mut batch.results);
        right.logs = std::mem::take(&mut batch.logs);
    } else if batch.metrics.first().is_some_and(|r| r.values.len() > 1) {
        // One record of many values: the halves keep its seq and step (a point is one
        // (name, step), so the halves hold different points).
        let record = &mut batch.metrics[0];
        let at = record
            .values
            .keys()
            .nth(record.values.len() / 2)
            .expect("two or more")
            .clone();
        let mut half = record.clone();
        half.values = record.values.split_off(&at);
        right.metrics.push(half);
        right.results = std::mem::take(&mut batch.results);
        right.logs = std::mem::take(&mut batch.logs);
    } else {
        batch.final_ = right.final_.take();
        if batch.final_.is_some() && right.status.is_some() {
            batch.status = right.status.take();
        }
        return Err(Box::new(batch));
    }
    Ok((batch, right))
}

/// Cuts every oversized field of a batch of one line or one result down to `keep`
/// bytes, with a visible marker.
fn shrink(batch: &mut Batch, keep: usize) {
    for line in &mut batch.logs {
        cut_text(&mut line.message, keep);
        if let Some(meta) = line.metadata.as_mut() {
            cut_json(meta, keep);
        }
    }
    for result in &mut batch.results {
        cut_text(&mut result.key, keep);
        cut_json(&mut result.value, keep);
    }
    if let Some(m) = batch.progress.as_mut().and_then(|p| p.message.as_mut()) {
        cut_text(m, keep);
    }
    if let Some(e) = batch.status.as_mut().and_then(|s| s.error.as_mut()) {
        cut_text(e, keep);
    }
    if let Some(run) = batch.run.as_mut() {
        if let Some(id) = run.instance_id.as_mut() {
            cut_text(id, keep);
        }
        cut_json(&mut run.config, keep);
    }
    for record in &mut batch.metrics {
        if record.values.keys().any(|name| name.len() > keep) {
            let values = std::mem::take(&mut record.values);
            record.values = values
                .into_iter()
                .map(|(mut name, value)| {
                    cut_text(&mut name, keep);
                    (name, value)
                })
                .collect();
        }
    }
}

/// The smallest a field is cut to (plus its marker) when a batch must be made to fit.
const MIN_KEEP: usize = 16;

/// Truncates `text` to `keep` bytes plus a marker.
fn cut_text(text: &mut String, keep: usize) {
    if text.len() <= keep {
        return;
    }
    let total = text.len();
    let cut = text.floor_char_boundary(keep);
    text.truncate(cut);
    text.push_str(&crate::buffer::truncation_marker(total - cut, total));
}

/// Replaces a JSON value larger than `keep` bytes by a marker.
fn cut_json(value: &mut serde_json::Value, keep: usize) {
    let size = value.to_string().len();
    if size <= keep {
        return;
    }
    *value = serde_json::json!({ "truncated": true, "bytes": size });
}

#[cfg(test)]
mod tests {
    use super::*;
    use athanor_schemas::{Level, LogLine};

    /// Lines of pseudo-random letters: they barely compress, so payloads really grow.
    fn lines(n: u64, len: usize) -> Vec<LogLine> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..n)
            .map(|seq| LogLine {
                seq,
                ts: 0,
                level: Level::Info,
                message: (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (b'a' + (x % 26) as u8) as char
                    })
                    .collect(),
                metadata: None,
            })
            .collect()
    }

    #[test]
    fn large_output_splits_into_consecutive_decodable_batches() {
        let mut head = Batch::new("r", 5, "w");
        head.status = Some(Status {
            state: RunState::Completed,
            error: None,
            at: 0,
        });
        head.final_ = Some(Final {
            status: RunState::Completed,
            batches: 0,
            lines: 4000,
            results: 0,
            metrics: 0,
        });
        head.logs = lines(4000, 200);
        let mut next = 5;
        let mut out = Vec::new();
        encode_fitting(head, 64 << 10, &mut next, &mut out);
        assert!(out.len() > 2, "{} batches", out.len());
        let decoded: Vec<Batch> = out
            .iter()
            .map(|o| codec::decode(&o.payload, 1 << 30).unwrap())
            .collect();
        assert_eq!(
            decoded.iter().map(|b| b.batch_seq).collect::<Vec<_>>(),
            (5..5 + out.len() as u64).collect::<Vec<_>>()
        );
        let seqs: Vec<u64> = decoded
            .iter()
            .flat_map(|b| b.logs.iter().map(|l| l.seq))
            .collect();
        assert_eq!(seqs, (0..4000).collect::<Vec<_>>());
        assert!(out.iter().all(|o| o.payload.len() <= 64 << 10));
        let last = decoded.last().unwrap();
        assert_eq!(last.final_.as_ref().unwrap().batches, next);
        assert_eq!(last.status.as_ref().unwrap().state, RunState::Completed);
        assert!(decoded[..decoded.len() - 1]
            .iter()
            .all(|b| b.final_.is_none() && b.status.is_none()));
    }

    #[test]
    fn output_is_cut_before_encoding_keeping_head_and_tail_fields() {
        let mut head = Batch::new("r", 0, "w");
        head.status = Some(Status {
            state: RunState::Running,
            error: None,
            at: 0,
        });
        head.results = vec![athanor_schemas::ResultRecord {
            seq: 0,
            key: "k".into(),
            value: 1.into(),
            ts: 0,
        }];
        head.logs = lines(1000, 100); // ~160 kB of JSON
        let pieces = presplit(head.clone(), 16 << 10); // pieces of ~48 kB
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces[0].status.as_ref().unwrap().state, RunState::Running);
        assert_eq!(pieces[0].results.len(), 1);
        assert!(pieces[1..]
            .iter()
            .all(|p| p.status.is_none() && p.results.is_empty()));
        let seqs: Vec<u64> = pieces
            .iter()
            .flat_map(|p| p.logs.iter().map(|l| l.seq))
            .collect();
        assert_eq!(seqs, (0..1000).collect::<Vec<_>>());

        head.status = Some(Status {
            state: RunState::Completed,
            error: None,
            at: 0,
        });
        head.final_ = Some(Final {
            status: RunState::Completed,
            batches: 0,
            lines: 1000,
            results: 1,
            metrics: 0,
        });
        let pieces = presplit(head, 16 << 10);
        assert!(pieces[..3]
            .iter()
            .all(|p| p.final_.is_none() && p.status.is_none()));
        assert_eq!(
            pieces[3].status.as_ref().unwrap().state,
            RunState::Completed
        );
        assert!(pieces[3].final_.is_some());
    }

    #[test]
    fn a_single_huge_line_is_cut_not_lost() {
        let mut head = Batch::new("r", 0, "w");
        head.logs = lines(1, 300_000);
        let mut next = 0;
        let mut out = Vec::new();
        encode_fitting(head, 32 << 10, &mut next, &mut out);
        assert_eq!(out.len(), 1);
        let b = codec::decode(&out[0].payload, 1 << 30).unwrap();
        assert_eq!(
            b.logs[0].message.len(),
            4096 + " …[truncated 295904 of 300000 bytes]".len()
        );
        assert!(b.logs[0]
            .message
            .ends_with(" …[truncated 295904 of 300000 bytes]"));
    }

    /// From a code review: a one-line batch whose fields are each just under
    /// max_payload / 8 but together over what a batch may hold reached `unreachable!`
    /// (a panic in the run's supervisor: the run never ended). Now they are cut further.
    #[test]
    fn a_batch_of_many_fields_each_under_the_cut_still_fits() {
        // A server allowing 9 MiB messages: fields of almost 1.2 MiB each, ten of them
        // unsplittable in one batch, are over the 8 MiB of JSON a batch may hold.
        let max_payload = 9 << 20;
        let field = |n: u64| lines(1, max_payload / 8 - 64).remove(0).message + &n.to_string();
        let mut head = Batch::new("r", 0, "w");
        head.logs = lines(1, 10);
        // One field just over the cut, the others just under: a first cut at
        // max_payload / 8 still leaves the batch too large (a review found that
        // cutting again at the same size recursed forever).
        head.logs[0].message = field(0) + &"y".repeat(200);
        head.logs[0].metadata = Some(serde_json::json!(field(1)));
        head.results = vec![athanor_schemas::ResultRecord {
            seq: 0,
            key: field(2),
            value: serde_json::json!(field(3)),
            ts: 0,
        }];
        head.progress = Some(athanor_schemas::Progress {
            current: 1,
            total: 2,
            message: Some(field(4)),
            ts: 0,
        });
        head.status = Some(Status {
            state: RunState::Failed,
            error: Some(field(5)),
            at: 0,
        });
        head.run = Some(RunInfo {
            experiment: "x".into(),
            config: serde_json::json!({ "a": field(6), "b": field(7) }),
            instance_id: Some(field(8)),
            started_at: 0,
        });
        head.metrics = vec![athanor_schemas::MetricRecord {
            seq: 0,
            step: 0,
            ts: 0,
            values: (0..20)
                .map(|i| (field(10 + i), athanor_schemas::MetricValue(1.0)))
                .collect(),
        }];
        let mut next = 0;
        let mut out = Vec::new();
        encode_fitting(head, max_payload, &mut next, &mut out);
        assert!(!out.is_empty());
        for piece in &out {
            assert!(
                piece.payload.len() <= max_payload,
                "{} bytes",
                piece.payload.len()
            );
            codec::decode(&piece.payload, 1 << 30).unwrap();
        }
    }

    /// Huge text outside the logs (a giant error, a giant config) is cut too, instead
    /// of splitting forever.
    #[test]
    fn a_huge_error_and_config_are_cut() {
        let huge = lines(1, 600_000).remove(0).message;
        let mut head = Batch::new("r", 0, "w");
        head.run = Some(RunInfo {
            experiment: "x".into(),
            config: serde_json::json!({ huge.clone(): 1 }),
            instance_id: None,
            started_at: 0,
        });
        head.status = Some(Status {
            state: RunState::Failed,
            error: Some(huge),
            at: 0,
        });
        head.final_ = Some(Final {
            status: RunState::Failed,
            batches: 0,
            lines: 0,
            results: 0,
            metrics: 0,
        });
        let mut next = 0;
        let mut out = Vec::new();
        encode_fitting(head, 64 << 10, &mut next, &mut out);
        assert_eq!(out.len(), 1);
        let b = codec::decode(&out[0].payload, 1 << 30).unwrap();
        assert!(b
            .status
            .unwrap()
            .error
            .unwrap()
            .ends_with(" …[truncated 591808 of 600000 bytes]"));
        assert_eq!(
            b.run.unwrap().config,
            serde_json::json!({"truncated": true, "bytes": 600_006})
        );
        assert_eq!(b.final_.unwrap().batches, 1);
    }
}
