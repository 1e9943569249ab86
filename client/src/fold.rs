//! A run's state, folded from its feed: what every viewer of a run holds.

use std::collections::BTreeMap;
use std::ops::Range;

use athanor_schemas::events::{RunView, StatusEvent};
use athanor_schemas::{merge_result, LogLine, Progress, ResultRecord};

use crate::feed::{FeedData, FeedEvent};
use crate::{ClientError, ClientResult};

/// The run as its feed has told it so far. [`apply`](Self::apply) checks the feed's
/// rules as it goes (snapshot first, batches in order and each once, ids that are the
/// watermark, nothing after the status) and hands back the lines not handed out before,
/// so a viewer prints or keeps each line once, whatever reconnections and resyncs did.
#[derive(Debug, Clone, Default)]
pub struct RunFold {
    /// The run, from the last snapshot, with the status of later batches.
    pub run: Option<RunView>,
    /// The newest record of each result key.
    pub results: BTreeMap<String, ResultRecord>,
    pub progress: Option<Progress>,
    /// The terminal status, once received.
    pub status: Option<StatusEvent>,
    /// Batches `0..have` are covered: the watermark to resume from.
    pub have: u64,
    /// Lines `0..next_line` have been handed out (or reported missing).
    pub next_line: u64,
    /// Snapshots received (the first one and one after each resync).
    pub snapshots: u32,
    pub resyncs: u32,
    /// Lines a batch carried that were handed out already: 0 on a correct feed.
    pub repeated_lines: u64,
}

/// What one event changed for the viewer.
#[derive(Debug, Default, PartialEq)]
pub struct Update<'a> {
    /// Lines neither handed out nor in this event (a snapshot's tail starts later than
    /// the viewer got): read them from the stored log.
    pub missing: Option<Range<u64>>,
    /// The event's lines not handed out before, in `seq` order.
    pub lines: &'a [LogLine],
    /// Whether the progress changed.
    pub progressed: bool,
}

impl RunFold {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn ended(&self) -> bool {
        self.status.is_some()
    }

    pub fn apply<'a>(&mut self, event: &'a FeedEvent) -> ClientResult<Update<'a>> {
        let broken = |what: String| Err(ClientError::Protocol(what));
        if self.status.is_some() {
            return broken(format!("an event after the status: {event:?}"));
        }
        let mut update = Update::default();
        match &event.data {
            FeedData::Snapshot(snapshot) => {
                if event.id != Some(snapshot.batches) {
                    return broken(format!(
                        "a snapshot of {} batches with id {:?}",
                        snapshot.batches, event.id
                    ));
                }
                self.snapshots += 1;
                self.have = snapshot.batches;
                let first_in_tail = snapshot.tail.first().map_or(snapshot.lines, |l| l.seq);
                if self.next_line < first_in_tail {
                    update.missing = Some(self.next_line..first_in_tail);
                }
                update.lines = self.fresh(&snapshot.tail);
                self.next_line = self.next_line.max(snapshot.lines);
                for (key, record) in &snapshot.results {
                    merge_result(&mut self.results, key.clone(), record.clone());
                }
                update.progressed = self.progress(snapshot.run.progress.as_ref());
                self.run = Some(snapshot.run.clone());
            }
            FeedData::Batch(batch) => {
                if batch.batch_seq != self.have || event.id != Some(batch.batch_seq + 1) {
                    return broken(format!(
                        "batch {} (id {:?}) when the viewer holds batches 0..{}",
                        batch.batch_seq, event.id, self.have
                    ));
                }
                self.have += 1;
                let fresh = self.fresh(&batch.logs);
                self.repeated_lines += (batch.logs.len() - fresh.len()) as u64;
                if let Some(first) = fresh.first().filter(|l| l.seq > self.next_line) {
                    update.missing = Some(self.next_line..first.seq);
                }
                if let Some(last) = fresh.last() {
                    self.next_line = last.seq + 1;
                }
                update.lines = fresh;
                for record in &batch.results {
                    merge_result(&mut self.results, record.key.clone(), record.clone());
                }
                update.progressed = self.progress(batch.progress.as_ref());
                if let (Some(run), Some(status)) = (self.run.as_mut(), &batch.status) {
                    run.status = *status;
                    if batch.error.is_some() {
                        run.error = batch.error.clone();
                    }
                }
            }
            FeedData::Resync => self.resyncs += 1,
            FeedData::Status(status) => {
                if event.id != Some(self.have) {
                    return broken(format!(
                        "the status with id {:?} when the viewer holds batches 0..{}",
                        event.id, self.have
                    ));
                }
                if let Some(run) = self.run.as_mut() {
                    run.status = status.status;
                    run.error = status.error.clone();
                    run.finished_at = status.finished_at;
                }
                self.status = Some(status.clone());
            }
            FeedData::Other(_) => {}
        }
        Ok(update)
    }

    /// The lines of `lines` (in `seq` order) from `next_line` on.
    fn fresh<'a>(&self, lines: &'a [LogLine]) -> &'a [LogLine] {
        let start = lines.partition_point(|l| l.seq < self.next_line);
        &lines[start..]
    }

    fn progress(&mut self, progress: Option<&Progress>) -> bool {
        match progress {
            Some(p) if self.progress.as_ref() != Some(p) => {
                self.progress = Some(p.clone());
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use athanor_schemas::events::{BatchEvent, Snapshot};
    use athanor_schemas::{Level, RunState};
    use serde_json::json;

    use super::*;

    fn line(seq: u64) -> LogLine {
        LogLine {
            seq,
            ts: 0,
            level: Level::Info,
            message: format!("line {seq}"),
            metadata: None,
        }
    }

    fn batch(batch_seq: u64, lines: Range<u64>, results: &[(&str, u64)]) -> FeedEvent {
        FeedEvent {
            id: Some(batch_seq + 1),
            data: FeedData::Batch(BatchEvent {
                batch_seq,
                logs: lines.map(line).collect(),
                results: results
                    .iter()
                    .map(|&(key, seq)| ResultRecord {
                        seq,
                        key: key.into(),
                        value: json!(seq),
                        ts: 0,
                    })
                    .collect(),
                metrics: Vec::new(),
                progress: None,
                status: None,
                error: None,
                at: 0,
            }),
        }
    }

    fn snapshot(batches: u64, lines: u64, tail: Range<u64>) -> FeedEvent {
        let run: RunView = serde_json::from_value(json!({
            "id": "r", "experiment": "e", "instance_id": null, "config": {},
            "status": "running", "error": null, "worker_id": null, "created_at": 0,
            "started_at": null, "finished_at": null, "progress": null,
            "lines": lines, "results": 0, "batches": batches
        }))
        .unwrap();
        FeedEvent {
            id: Some(batches),
            data: FeedData::Snapshot(Box::new(Snapshot {
                run,
                results: BTreeMap::new(),
                tail: tail.map(line).collect(),
                lines,
                batches,
                metrics: BTreeMap::new(),
                at: 0,
            })),
        }
    }

    fn seqs(update: &Update) -> Vec<u64> {
        update.lines.iter().map(|l| l.seq).collect()
    }

    #[test]
    fn lines_are_handed_out_once_across_snapshots_batches_and_resyncs() {
        let mut fold = RunFold::new();
        let first = snapshot(2, 5, 3..5);
        let update = fold.apply(&first).unwrap();
        assert_eq!(update.missing, Some(0..3), "lines before the tail");
        assert_eq!(seqs(&update), [3, 4]);
        let b2 = batch(2, 5..8, &[("loss", 1)]);
        assert_eq!(seqs(&fold.apply(&b2).unwrap()), [5, 6, 7]);
        // A resync, then a snapshot whose tail overlaps what the viewer has.
        fold.apply(&FeedEvent {
            id: Some(3),
            data: FeedData::Resync,
        })
        .unwrap();
        let again = snapshot(5, 12, 6..12);
        let update = fold.apply(&again).unwrap();
        assert_eq!(update.missing, None);
        assert_eq!(seqs(&update), [8, 9, 10, 11]);
        // A snapshot whose tail starts past the viewer's lines: the gap is reported.
        fold.apply(&FeedEvent {
            id: Some(5),
            data: FeedData::Resync,
        })
        .unwrap();
        let late = snapshot(9, 30, 20..30);
        let update = fold.apply(&late).unwrap();
        assert_eq!(update.missing, Some(12..20));
        assert_eq!(seqs(&update), (20..30).collect::<Vec<_>>());
        assert_eq!(
            (fold.have, fold.next_line, fold.resyncs, fold.snapshots),
            (9, 30, 2, 3)
        );
        assert_eq!(fold.repeated_lines, 0);
    }

    #[test]
    fn batches_out_of_order_or_twice_and_events_after_the_status_break_the_rules() {
        let mut fold = RunFold::new();
        fold.apply(&snapshot(1, 2, 0..2)).unwrap();
        assert!(matches!(
            fold.apply(&batch(2, 2..3, &[])),
            Err(ClientError::Protocol(_))
        ));
        fold.apply(&batch(1, 2..4, &[])).unwrap();
        assert!(matches!(
            fold.apply(&batch(1, 2..4, &[])),
            Err(ClientError::Protocol(_))
        ));
        let mut wrong_id = batch(2, 4..5, &[]);
        wrong_id.id = Some(7);
        assert!(matches!(
            fold.apply(&wrong_id),
            Err(ClientError::Protocol(_))
        ));
        let status = |id| FeedEvent {
            id: Some(id),
            data: FeedData::Status(StatusEvent {
                status: RunState::Completed,
                error: None,
                lines: 4,
                batches: 2,
                finished_at: Some(9),
            }),
        };
        assert!(matches!(
            fold.apply(&status(3)),
            Err(ClientError::Protocol(_))
        ));
        fold.apply(&status(2)).unwrap();
        assert!(fold.ended());
        assert_eq!(fold.run.as_ref().unwrap().status, RunState::Completed);
        assert!(matches!(
            fold.apply(&batch(2, 4..5, &[])),
            Err(ClientError::Protocol(_))
        ));
    }

    #[test]
    fn repeated_lines_are_counted_and_not_handed_out_again() {
        let mut fold = RunFold::new();
        fold.apply(&snapshot(0, 0, 0..0)).unwrap();
        fold.apply(&batch(0, 0..4, &[])).unwrap();
        let overlapping = batch(1, 2..6, &[]);
        let update = fold.apply(&overlapping).unwrap();
        assert_eq!(seqs(&update), [4, 5]);
        assert_eq!(fold.repeated_lines, 2);
        let after_a_hole = batch(2, 8..9, &[]);
        let update = fold.apply(&after_a_hole).unwrap();
        assert_eq!(update.missing, Some(6..8), "a hole between batches");
    }

    #[test]
    fn results_keep_the_newest_record_of_each_key() {
        let mut fold = RunFold::new();
        fold.apply(&snapshot(0, 0, 0..0)).unwrap();
        fold.apply(&batch(0, 0..0, &[("loss", 4), ("acc", 5)]))
            .unwrap();
        fold.apply(&batch(1, 0..0, &[("loss", 2), ("acc", 7)]))
            .unwrap();
        assert_eq!(fold.results["loss"].seq, 4);
        assert_eq!(fold.results["acc"].seq, 7);
    }
}
