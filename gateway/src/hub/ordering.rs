//! The hub's ordering logic, as a pure state machine: batches in (in any order, any
//! number of times), frames and gap decisions out. No I/O, no async, no clock — the
//! hub around it (`hub/mod.rs`) reads JetStream and the database, takes the lock and
//! broadcasts what this returns.
//!
//! A [`Sequencer`] starts from the run as the database holds it up to its gapless
//! watermark ([`Bootstrap`]) and then:
//! * applies batches in `batch_seq` order, each exactly once: a batch below the
//!   watermark (a redelivery) is dropped, one above it is held until the batches before
//!   it arrive;
//! * gives up on the oldest gap when more than [`MAX_EARLY`] batches (or about
//!   [`MAX_EARLY_BYTES`] of them) wait behind it
//!   ([`Applied::skipped`]), so viewers resync on the jump rather than wait forever;
//! * ends with the run's `status` frame once its final batch's count of batches has
//!   been applied, or when the database says the run ended ([`Sequencer::check`]);
//! * asks to be reopened from the database when the database holds a batch it is stuck
//!   waiting for ([`Checked::Reopen`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use athanor_schemas::events::{self, RunView, Snapshot, StatusEvent};
use athanor_schemas::metric::{MetricPoint, SeriesSketch};
use athanor_schemas::{Batch, LogLine, ResultRecord, RunState};

use super::frame::Frame;

/// Early batches held at most; past it the oldest gap is given up on (its viewers
/// resync on the jump).
pub(crate) const MAX_EARLY: usize = 1024;

/// …or about this many bytes of them (a batch may hold up to 32 MiB decoded: a count
/// alone would let a hub hold gigabytes).
pub(crate) const MAX_EARLY_BYTES: usize = 64 << 20;

/// About what a decoded batch and its frame hold in memory: its text twice, plus a
/// little per record.
fn approx_bytes(batch: &Batch, frame: &Frame) -> usize {
    let lines: usize = batch
        .logs
        .iter()
        .map(|l| 64 + l.message.len() + l.metadata.as_ref().map_or(0, |_| 64))
        .sum();
    let results: usize = batch.results.iter().map(|r| 64 + r.key.len()).sum();
    let metrics: usize = batch
        .metrics
        .iter()
        .map(|m| m.values.keys().map(|k| 32 + k.len()).sum::<usize>())
        .sum();
    256 + lines + results + metrics + frame.wire.len()
}

/// Buckets a snapshot's series hold about (between this and twice this): enough for a
/// chart as wide as a screen, small enough for a snapshot of a dozen metrics.
pub(crate) const SNAPSHOT_BUCKETS: usize = 400;

/// The run as the database holds it, up to the highest batch stored without a gap.
pub(crate) struct Bootstrap {
    /// The run, its counters (`lines`, `batches`, `results`) as of `covered`.
    pub run: RunView,
    /// Latest value of each result key.
    pub results: BTreeMap<String, ResultRecord>,
    /// The newest lines of the batches covered, oldest first.
    pub tail: Vec<LogLine>,
    /// Lines kept in the tail at most.
    pub tail_cap: usize,
    /// Lines in the batches covered.
    pub lines: u64,
    /// Batches covered: `0..covered`.
    pub covered: u64,
    /// The run's number of batches, once its final batch is stored.
    pub final_batches: Option<u64>,
    /// Each metric's series as stored (cut to about [`SNAPSHOT_BUCKETS`]).
    pub metrics: BTreeMap<String, SeriesSketch>,
}

/// What applying one batch produced.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// To send, in order: a `batch` frame per batch applied, then `status` when the
    /// run ended.
    pub frames: Vec<Arc<Frame>>,
    /// The gap given up on, when too many batches waited behind it.
    pub skipped: Option<Skipped>,
}

/// Batches `missing..resumed_at` were given up on: the stream does not hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub missing: u64,
    pub resumed_at: u64,
}

/// The database's row of the run, as far as the sequencer cares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stored {
    /// Batches stored without a gap: `0..stored`.
    pub stored: u64,
    pub status: RunState,
    pub error: Option<String>,
    pub finished_at: Option<i64>,
    pub final_batches: Option<u64>,
}

/// What the database's row of the run means for the sequencer.
#[derive(Debug)]
pub(crate) enum Checked {
    /// Nothing to do.
    Nothing,
    /// The database holds batches `missing..stored` that the sequencer waits for and
    /// the stream did not bring: start again from the database.
    Reopen { missing: u64, stored: u64 },
    /// The run ended without further batches (`lost`, or every batch already
    /// applied): the `status` frame to send.
    Ended(Arc<Frame>),
}

/// A run's live state on a hub: the batches applied so far, in order.
pub(crate) struct Sequencer {
    run: RunView,
    results: BTreeMap<String, ResultRecord>,
    tail: VecDeque<LogLine>,
    tail_cap: usize,
    lines: u64,
    metrics: BTreeMap<String, SeriesSketch>,
    /// Batches applied: `0..next`.
    next: u64,
    /// Batches that arrived before a missing one, by `batch_seq`, and about how many
    /// bytes they hold.
    early: BTreeMap<u64, (Batch, Arc<Frame>)>,
    early_bytes: usize,
    final_batches: Option<u64>,
    /// The `status` frame, once the run has ended.
    terminal: Option<Arc<Frame>>,
    /// The `snapshot` frame of the state as it is, once a viewer asked for it: viewers
    /// joining between two batches share it instead of each serialising the tail.
    snapshot: Option<Arc<Frame>>,
}

impl Sequencer {
    /// Starts after the batches `from` covers; already ended when its status is terminal.
    pub fn new(from: Bootstrap) -> Self {
        let mut sequencer = Sequencer {
            run: from.run,
            results: from.results,
            tail: from.tail.into(),
            tail_cap: from.tail_cap,
            lines: from.lines,
            metrics: from.metrics,
            next: from.covered,
            early: BTreeMap::new(),
            early_bytes: 0,
            final_batches: from.final_batches,
            terminal: None,
            snapshot: None,
        };
        if sequencer.run.status.is_terminal() {
            sequencer.terminal = Some(sequencer.status_frame());
        }
        sequencer
    }

    /// The watermark: batches `0..next` are applied.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The `status` frame, once the run has ended.
    pub fn terminal(&self) -> Option<&Arc<Frame>> {
        self.terminal.as_ref()
    }

    /// Whether the run ended as `lost`.
    pub fn is_lost(&self) -> bool {
        self.terminal.is_some() && self.run.status == RunState::Lost
    }

    /// Whether batches after a missing one are waiting.
    pub fn waiting_for_gap(&self) -> bool {
        !self.early.is_empty()
    }

    /// Applies `batch` (and the early batches it unblocks).
    #[cfg(test)]
    pub fn apply(&mut self, batch: Batch) -> Applied {
        let frame = Frame::batch(&batch);
        self.apply_framed(batch, frame)
    }

    /// Applies `batch`, whose `batch` frame is `frame` (built by the caller before it
    /// takes the hub's lock: the frame depends on the batch alone).
    pub fn apply_framed(&mut self, batch: Batch, frame: Arc<Frame>) -> Applied {
        let mut applied = Applied::default();
        if batch.batch_seq < self.next || self.terminal.is_some() {
            return applied;
        }
        self.early_bytes += approx_bytes(&batch, &frame);
        if let Some((replaced, old)) = self.early.insert(batch.batch_seq, (batch, frame)) {
            self.early_bytes -= approx_bytes(&replaced, &old);
        }
        if self.early.len() > MAX_EARLY || self.early_bytes > MAX_EARLY_BYTES {
            let first = *self.early.keys().next().expect("not empty");
            applied.skipped = Some(Skipped {
                missing: self.next,
                resumed_at: first,
            });
            self.next = first;
        }
        while let Some((batch, frame)) = self.early.remove(&self.next) {
            self.early_bytes -= approx_bytes(&batch, &frame);
            applied.frames.push(frame);
            self.take(batch);
            if self.final_batches.is_some_and(|n| self.next >= n) {
                applied.frames.push(self.finish());
                break;
            }
        }
        applied
    }

    /// What the database's row of the run means: reopen when it holds a batch this is
    /// stuck waiting for; end when it says the run ended and no batch is still to come
    /// (or the run is `lost`).
    pub fn check(&mut self, db: Stored) -> Checked {
        if db.stored > self.next && self.waiting_for_gap() {
            return Checked::Reopen {
                missing: self.next,
                stored: db.stored,
            };
        }
        if !db.status.is_terminal() {
            return Checked::Nothing;
        }
        let complete = db.final_batches.is_none_or(|n| self.next >= n);
        if db.status == RunState::Lost || complete {
            if let Some(frame) = self.end(db.status, db.error, db.finished_at) {
                return Checked::Ended(frame);
            }
        }
        Checked::Nothing
    }

    /// Ends the run with `status` unless it has ended already; returns its `status` frame.
    pub fn end(
        &mut self,
        status: RunState,
        error: Option<String>,
        at: Option<i64>,
    ) -> Option<Arc<Frame>> {
        if self.terminal.is_some() {
            return None;
        }
        self.snapshot = None;
        self.run.status = status;
        self.run.error = error;
        self.run.finished_at = at;
        Some(self.finish())
    }

    fn take(&mut self, batch: Batch) {
        self.snapshot = None;
        self.next = batch.batch_seq + 1;
        self.run.batches = self.next as i64;
        self.lines += batch.logs.len() as u64;
        self.run.lines = self.lines as i64;
        for line in batch.logs {
            if self.tail.len() == self.tail_cap {
                self.tail.pop_front();
            }
            if self.tail_cap > 0 {
                self.tail.push_back(line);
            }
        }
        for record in batch.results {
            athanor_schemas::merge_result(&mut self.results, record.key.clone(), record);
        }
        self.run.results = self.results.len() as i64;
        for record in batch.metrics {
            for (name, value) in record.values {
                self.metrics
                    .entry(name)
                    .or_insert_with(|| SeriesSketch::new(SNAPSHOT_BUCKETS))
                    .add(MetricPoint {
                        step: record.step,
                        ts: record.ts,
                        value,
                        seq: record.seq,
                    });
            }
        }
        if let Some(p) = batch.progress {
            if self.run.progress.as_ref().is_none_or(|old| old.ts <= p.ts) {
                self.run.progress = Some(p);
            }
        }
        if let Some(info) = batch.run {
            self.run.experiment = info.experiment;
            self.run.config = info.config;
            self.run.started_at = Some(info.started_at);
        }
        self.run.worker_id = Some(batch.worker_id);
        if let Some(status) = batch.status {
            self.run.status = status.state;
            if status.state.is_terminal() {
                self.run.error = status.error;
                self.run.finished_at = Some(status.at);
            }
        } else if self.run.status == RunState::Pending {
            self.run.status = RunState::Running;
        }
        if let Some(f) = batch.final_ {
            self.final_batches = Some(f.batches);
            self.run.status = f.status;
        }
    }

    fn finish(&mut self) -> Arc<Frame> {
        let frame = self.status_frame();
        self.terminal = Some(frame.clone());
        frame
    }

    fn status_frame(&self) -> Arc<Frame> {
        Frame::new(
            events::STATUS,
            Some(self.next),
            &StatusEvent {
                status: self.run.status,
                error: self.run.error.clone(),
                lines: self.lines,
                batches: self.next,
                finished_at: self.run.finished_at,
            },
        )
    }

    /// The `snapshot` frame of the state as it is (shared until the state changes).
    pub fn snapshot_frame(&mut self) -> Arc<Frame> {
        if let Some(frame) = &self.snapshot {
            return frame.clone();
        }
        let frame = Frame::new(
            events::SNAPSHOT,
            Some(self.next),
            &Snapshot {
                run: self.run.clone(),
                results: self.results.clone(),
                tail: self.tail.iter().cloned().collect(),
                lines: self.lines,
                batches: self.next,
                metrics: self
                    .metrics
                    .iter()
                    .map(|(name, sketch)| (name.clone(), sketch.series(name)))
                    .collect(),
                at: athanor_schemas::now_micros(),
            },
        );
        self.snapshot = Some(frame.clone());
        frame
    }
}

#[cfg(test)]
mod tests {
    use athanor_schemas::{Final, Level, RunInfo, Status};
    use serde_json::{json, Value};

    use super::*;

    const RUN: &str = "r1";

    fn view(status: RunState) -> RunView {
        RunView {
            id: RUN.into(),
            experiment: "sweep".into(),
            instance_id: None,
            config: json!({}),
            status,
            error: None,
            worker_id: None,
            created_at: 1,
            started_at: None,
            finished_at: None,
            progress: None,
            lines: 0,
            results: 0,
            batches: 0,
            warning: None,
            waiting: None,
        }
    }

    /// A run nothing of which is stored yet.
    fn fresh() -> Sequencer {
        Sequencer::new(Bootstrap {
            run: view(RunState::Pending),
            results: BTreeMap::new(),
            tail: Vec::new(),
            tail_cap: 3,
            lines: 0,
            covered: 0,
            final_batches: None,
            metrics: BTreeMap::new(),
        })
    }

    /// Batch `n` with one log line, `seq` = `n`.
    fn batch(n: u64) -> Batch {
        let mut batch = Batch::new(RUN, n, "w1");
        batch.logs.push(LogLine {
            seq: n,
            ts: 100 + n as i64,
            level: Level::Info,
            message: format!("line {n}"),
            metadata: None,
        });
        batch
    }

    /// The last batch of a run of `batches` batches, ending it as `state`.
    fn last(n: u64, state: RunState) -> Batch {
        let mut batch = batch(n);
        batch.status = Some(Status {
            state,
            error: None,
            at: 900,
        });
        batch.final_ = Some(Final {
            status: state,
            batches: n + 1,
            lines: n + 1,
            results: 0,
            metrics: 0,
        });
        batch
    }

    fn line_json(n: u64) -> Value {
        json!({ "seq": n, "ts": 100 + n, "level": "info", "message": format!("line {n}") })
    }

    /// The `batch` frame of `batch(n)`.
    fn batch_frame(n: u64) -> (String, Option<u64>, Value) {
        (
            "batch".into(),
            Some(n + 1),
            json!({ "batch_seq": n, "logs": [line_json(n)], "results": [], "progress": null, "status": null, "error": null }),
        )
    }

    /// The `status` frame after `batches` batches of one line each.
    fn status_frame(
        status: &str,
        batches: u64,
        finished_at: Option<i64>,
    ) -> (String, Option<u64>, Value) {
        (
            "status".into(),
            Some(batches),
            json!({ "status": status, "error": null, "lines": batches, "batches": batches, "finished_at": finished_at }),
        )
    }

    /// A frame as (event, id, data), checked against its wire form.
    fn decoded(frame: &Frame) -> (String, Option<u64>, Value) {
        let wire = std::str::from_utf8(&frame.wire).expect("utf-8");
        let mut expected = format!("event: {}\n", frame.event);
        if let Some(id) = frame.id {
            expected.push_str(&format!("id: {id}\n"));
        }
        let data = wire
            .strip_prefix(&expected)
            .and_then(|rest| rest.strip_prefix("data: "))
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("not one event: {wire:?}"));
        assert!(!data.contains('\n'), "one data line: {wire:?}");
        let mut data: Value = serde_json::from_str(data).expect("JSON data");
        // When the gateway made the event: present on batches and snapshots, not compared.
        if let Some(object) = data.as_object_mut() {
            if matches!(frame.event, events::BATCH | events::SNAPSHOT) {
                let at = object.remove("at").and_then(|at| at.as_i64());
                assert!(at.is_some_and(|at| at > 0), "`at` on {wire:?}");
            }
        }
        (frame.event.to_string(), frame.id, data)
    }

    fn frames(applied: &Applied) -> Vec<(String, Option<u64>, Value)> {
        applied.frames.iter().map(|f| decoded(f)).collect()
    }

    fn stored(stored: u64, status: RunState, final_batches: Option<u64>) -> Stored {
        Stored {
            stored,
            status,
            error: None,
            finished_at: Some(800),
            final_batches,
        }
    }

    #[test]
    fn batches_in_order_are_sent_at_once_each_with_its_watermark() {
        let mut seq = fresh();
        for n in 0..3 {
            let applied = seq.apply(batch(n));
            assert_eq!(frames(&applied), vec![batch_frame(n)]);
            assert_eq!(applied.skipped, None);
            assert_eq!(seq.next(), n + 1);
        }
        assert!(!seq.waiting_for_gap());
        assert!(seq.terminal().is_none());
    }

    #[test]
    fn a_missing_batch_holds_the_later_ones_back_until_it_arrives() {
        let mut seq = fresh();
        assert_eq!(frames(&seq.apply(batch(0))), vec![batch_frame(0)]);
        assert!(frames(&seq.apply(batch(2))).is_empty());
        assert!(frames(&seq.apply(batch(3))).is_empty());
        assert_eq!(seq.next(), 1);
        assert!(seq.waiting_for_gap());
        let applied = seq.apply(batch(1));
        assert_eq!(
            frames(&applied),
            vec![batch_frame(1), batch_frame(2), batch_frame(3)]
        );
        assert_eq!(applied.skipped, None);
        assert_eq!(seq.next(), 4);
        assert!(!seq.waiting_for_gap());
    }

    #[test]
    fn batches_arriving_in_reverse_are_sent_in_batch_seq_order() {
        let mut seq = fresh();
        for n in (1..5).rev() {
            assert!(frames(&seq.apply(batch(n))).is_empty(), "batch {n} held");
        }
        assert_eq!(
            frames(&seq.apply(batch(0))),
            (0..5).map(batch_frame).collect::<Vec<_>>()
        );
        assert_eq!(seq.next(), 5);
    }

    #[test]
    fn a_redelivered_batch_is_sent_once() {
        let mut seq = fresh();
        assert_eq!(frames(&seq.apply(batch(0))), vec![batch_frame(0)]);
        // Already applied.
        assert!(frames(&seq.apply(batch(0))).is_empty());
        // Held twice, sent once.
        assert!(frames(&seq.apply(batch(2))).is_empty());
        assert!(frames(&seq.apply(batch(2))).is_empty());
        assert_eq!(
            frames(&seq.apply(batch(1))),
            vec![batch_frame(1), batch_frame(2)]
        );
        assert!(frames(&seq.apply(batch(1))).is_empty());
        assert!(frames(&seq.apply(batch(2))).is_empty());
        assert_eq!(seq.next(), 3);
        // Counted once.
        let snapshot = decoded(&seq.snapshot_frame()).2;
        assert_eq!(
            (&snapshot["lines"], &snapshot["batches"]),
            (&json!(3), &json!(3))
        );
    }

    #[test]
    fn batches_the_database_covered_are_not_sent_again() {
        let mut seq = Sequencer::new(Bootstrap {
            run: view(RunState::Running),
            results: BTreeMap::new(),
            tail: vec![],
            tail_cap: 3,
            lines: 5,
            covered: 5,
            final_batches: None,
            metrics: BTreeMap::new(),
        });
        for n in 0..5 {
            assert!(frames(&seq.apply(batch(n))).is_empty(), "batch {n} covered");
        }
        assert_eq!(frames(&seq.apply(batch(5))), vec![batch_frame(5)]);
    }

    #[test]
    fn too_many_bytes_behind_a_gap_give_it_up() {
        // From a code review: the early batches were bounded by count alone (1 024 of
        // up to 32 MiB each). Batches of 2 MiB of text, held with their 2 MiB frames:
        // the 16th behind the gap passes 64 MiB.
        let big = |n: u64| {
            let mut b = batch(n);
            b.logs[0].message = "x".repeat(2 << 20);
            b
        };
        let mut seq = fresh();
        for n in 1..=15 {
            assert!(seq.apply(big(n)).skipped.is_none());
        }
        let applied = seq.apply(big(16));
        assert_eq!(
            applied.skipped,
            Some(Skipped {
                missing: 0,
                resumed_at: 1
            })
        );
        assert_eq!(applied.frames.len(), 16);
        assert_eq!(seq.early_bytes, 0);
    }

    #[test]
    fn too_many_batches_behind_a_gap_give_it_up_and_the_late_batch_is_dropped() {
        let mut seq = fresh();
        let held = MAX_EARLY as u64;
        for n in 1..=held {
            let applied = seq.apply(batch(n));
            assert!(applied.frames.is_empty() && applied.skipped.is_none());
        }
        let applied = seq.apply(batch(held + 1));
        assert_eq!(
            applied.skipped,
            Some(Skipped {
                missing: 0,
                resumed_at: 1
            })
        );
        assert_eq!(
            frames(&applied),
            (1..=held + 1).map(batch_frame).collect::<Vec<_>>()
        );
        assert_eq!(seq.next(), held + 2);
        assert!(!seq.waiting_for_gap());
        assert!(seq.apply(batch(0)).frames.is_empty());
        // The lines counted are those applied: batch 0's is not among them.
        let snapshot = decoded(&seq.snapshot_frame()).2;
        assert_eq!(snapshot["lines"], json!(held + 1));
    }

    #[test]
    fn the_database_holding_a_batch_the_stream_lacks_asks_for_a_reopen() {
        let mut seq = fresh();
        seq.apply(batch(0));
        // Not waiting on a gap: the stream will bring batch 1.
        assert!(matches!(
            seq.check(stored(3, RunState::Running, None)),
            Checked::Nothing
        ));
        seq.apply(batch(2));
        // Waiting on batch 1, which the database holds no more of than the hub.
        assert!(matches!(
            seq.check(stored(1, RunState::Running, None)),
            Checked::Nothing
        ));
        assert!(matches!(
            seq.check(stored(2, RunState::Running, None)),
            Checked::Reopen {
                missing: 1,
                stored: 2
            }
        ));
        // Even when the database says the run ended: the hub is reopened, not ended.
        assert!(matches!(
            seq.check(stored(3, RunState::Completed, Some(3))),
            Checked::Reopen {
                missing: 1,
                stored: 3
            }
        ));
        assert!(seq.terminal().is_none());
    }

    #[test]
    fn a_snapshot_is_the_state_after_the_batches_applied_and_is_shared_until_it_changes() {
        let mut seq = fresh();
        let mut first = batch(0);
        first.status = Some(Status {
            state: RunState::Running,
            error: None,
            at: 50,
        });
        first.run = Some(RunInfo {
            experiment: "sweep".into(),
            config: json!({ "n": 4 }),
            instance_id: None,
            started_at: 50,
        });
        first.results.push(ResultRecord {
            seq: 0,
            key: "loss".into(),
            value: json!(0.5),
            ts: 100,
        });
        seq.apply(first);
        for n in 1..4 {
            seq.apply(batch(n));
        }
        let snapshot = seq.snapshot_frame();
        assert!(Arc::ptr_eq(&snapshot, &seq.snapshot_frame()));
        let loss = json!({ "seq": 0, "key": "loss", "value": 0.5, "ts": 100 });
        assert_eq!(
            decoded(&snapshot),
            (
                "snapshot".into(),
                Some(4),
                json!({
                    "run": {
                        "id": RUN, "experiment": "sweep", "instance_id": null,
                        "config": { "n": 4 }, "status": "running", "error": null,
                        "worker_id": "w1", "created_at": 1, "started_at": 50,
                        "finished_at": null, "progress": null,
                        "lines": 4, "results": 1, "batches": 4,
                    },
                    "results": { "loss": loss },
                    // The tail holds `tail_cap` lines.
                    "tail": [line_json(1), line_json(2), line_json(3)],
                    "lines": 4,
                    "batches": 4,
                })
            )
        );
        seq.apply(batch(4));
        let after = seq.snapshot_frame();
        assert!(!Arc::ptr_eq(&snapshot, &after));
        assert_eq!(after.id, Some(5));
    }

    #[test]
    fn a_first_batch_without_a_status_makes_a_pending_run_running() {
        let mut seq = fresh();
        seq.apply(batch(0));
        assert_eq!(
            decoded(&seq.snapshot_frame()).2["run"]["status"],
            json!("running")
        );
    }

    #[test]
    fn the_final_batch_ends_the_run_once_every_batch_before_it_is_sent() {
        let mut seq = fresh();
        seq.apply(batch(0));
        // The final batch arrives early: held like any other.
        assert!(frames(&seq.apply(last(2, RunState::Completed))).is_empty());
        assert!(seq.terminal().is_none());
        let mut done = batch_frame(2);
        done.2["status"] = json!("completed");
        let applied = seq.apply(batch(1));
        assert_eq!(
            frames(&applied),
            vec![
                batch_frame(1),
                done,
                status_frame("completed", 3, Some(900))
            ]
        );
        assert_eq!(
            decoded(seq.terminal().expect("ended")),
            status_frame("completed", 3, Some(900))
        );
        // Nothing after the end, from the stream or the database.
        assert!(seq.apply(batch(3)).frames.is_empty());
        assert!(matches!(
            seq.check(stored(3, RunState::Completed, Some(3))),
            Checked::Nothing
        ));
        assert!(seq.end(RunState::Lost, None, None).is_none());
        assert!(!seq.is_lost());
    }

    #[test]
    fn a_terminal_status_in_the_database_ends_the_run_only_after_its_final_batches() {
        let mut seq = fresh();
        seq.apply(batch(0));
        // Stored ahead of the stream: batch 1 is still to come.
        assert!(matches!(
            seq.check(stored(2, RunState::Failed, Some(2))),
            Checked::Nothing
        ));
        seq.apply(batch(1));
        let Checked::Ended(frame) = seq.check(stored(2, RunState::Failed, Some(2))) else {
            panic!("ended");
        };
        assert_eq!(decoded(&frame), status_frame("failed", 2, Some(800)));
        // A terminal status with no final batch count (ended without one): at once.
        let mut seq = fresh();
        let Checked::Ended(frame) = seq.check(stored(0, RunState::Cancelled, None)) else {
            panic!("ended");
        };
        assert_eq!(decoded(&frame), status_frame("cancelled", 0, Some(800)));
    }

    #[test]
    fn a_lost_run_ends_at_once_whatever_is_still_missing() {
        let mut seq = fresh();
        seq.apply(batch(0));
        let Checked::Ended(frame) = seq.check(stored(1, RunState::Lost, Some(10))) else {
            panic!("ended");
        };
        assert_eq!(decoded(&frame), status_frame("lost", 1, Some(800)));
        assert!(seq.is_lost());
        assert!(matches!(
            seq.check(stored(1, RunState::Lost, None)),
            Checked::Nothing
        ));
        assert!(seq.apply(batch(1)).frames.is_empty());
        assert_eq!(seq.next(), 1);
    }

    #[test]
    fn a_run_ended_in_the_database_starts_ended() {
        let mut run = view(RunState::Failed);
        run.error = Some("boom".into());
        run.finished_at = Some(700);
        let mut seq = Sequencer::new(Bootstrap {
            run,
            results: BTreeMap::new(),
            tail: vec![],
            tail_cap: 3,
            lines: 7,
            covered: 2,
            final_batches: Some(2),
            metrics: BTreeMap::new(),
        });
        assert_eq!(
            decoded(seq.terminal().expect("ended")),
            (
                "status".into(),
                Some(2),
                json!({ "status": "failed", "error": "boom", "lines": 7, "batches": 2, "finished_at": 700 })
            )
        );
        assert!(seq.apply(batch(2)).frames.is_empty());
    }
}
