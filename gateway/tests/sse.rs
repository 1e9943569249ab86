//! The live feeds over a real pipeline: every line exactly once and in order, resuming
//! with `Last-Event-ID` on the same or another gateway, many viewers sharing one hub, a
//! stalled viewer resynced without holding anyone up, and the lifecycle feed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use athanor_client::sse::SseEvent;
use athanor_client::{FeedData, FeedEvent, RunFold};
use athanor_gateway::{Gateway, GatewayConfig};
use athanor_schemas::events::{Snapshot, StatusEvent};
use athanor_schemas::{names, LogLine, RunState};
use athanor_testkit::wait_for;
use athanor_workers::WorkerConfig;
use common::{Feed, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// What a viewer holds after reading a feed: its lines by seq (a line received twice
/// is a failure), the watermark, and the terminal status. The feed's rules (ids, order,
/// nothing after the status) are checked by `athanor-client`'s fold.
#[derive(Debug, Default, Clone)]
struct Viewed {
    fold: RunFold,
    lines: BTreeMap<u64, LogLine>,
    have: u64,
    status: Option<StatusEvent>,
    resyncs: u32,
    events: usize,
}

impl Viewed {
    fn apply(&mut self, event: &SseEvent) {
        self.events += 1;
        let event = FeedEvent::from_sse(event.clone()).unwrap();
        let update = self
            .fold
            .apply(&event)
            .expect("a feed that keeps its rules");
        match &event.data {
            // A snapshot replaces what the viewer held.
            FeedData::Snapshot(snapshot) => {
                self.lines = snapshot.tail.iter().map(|l| (l.seq, l.clone())).collect();
            }
            FeedData::Batch(_) => {
                for line in update.lines {
                    let seq = line.seq;
                    assert!(
                        self.lines.insert(seq, line.clone()).is_none(),
                        "line {seq} twice"
                    );
                }
            }
            FeedData::Resync | FeedData::Status(_) => {}
            FeedData::Other(other) => panic!("unexpected event {other:?}"),
        }
        assert_eq!(self.fold.repeated_lines, 0, "a batch repeated lines");
        self.have = self.fold.have;
        self.status = self.fold.status.clone();
        self.resyncs = self.fold.resyncs;
    }

    fn seqs(&self) -> Vec<u64> {
        self.lines.keys().copied().collect()
    }
}

/// Reads `feed` to its end into `viewed`; the stream must end right after the status.
async fn read_to_end(feed: &mut Feed, viewed: &mut Viewed) {
    while let Some(event) = feed.next().await {
        viewed.apply(&event);
    }
    assert!(viewed.status.is_some(), "the stream ended without a status");
}

async fn start_run(stack: &Stack, experiment: &str, config: Value) -> String {
    let (status, created) = stack
        .post(
            "/api/runs",
            &json!({ "experiment": experiment, "config": config }).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["id"].as_str().unwrap().to_string()
}

/// Every stored line of the run, through the paged API.
async fn stored_lines(stack: &Stack, id: &str) -> Vec<LogLine> {
    let mut lines: Vec<LogLine> = Vec::new();
    loop {
        let after = lines.last().map_or(-1, |l| l.seq as i64);
        let (_, page) = stack
            .get(&format!("/api/runs/{id}/logs?after={after}&limit=10000"))
            .await;
        let page: Vec<LogLine> = serde_json::from_value(page["lines"].clone()).unwrap();
        if page.is_empty() {
            return lines;
        }
        lines.extend(page);
    }
}

fn events_path(id: &str) -> String {
    format!("/api/runs/{id}/events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_carries_every_line_once_in_order_and_the_status_last() {
    let stack = Stack::start().await;
    let id = start_run(
        &stack,
        "log_storm",
        json!({"lines_per_second": 20000, "duration_ms": 2000, "with_metadata": true}),
    )
    .await;
    let mut feed = Feed::open(&stack.base, &events_path(&id), None).await;
    let mut viewed = Viewed::default();
    read_to_end(&mut feed, &mut viewed).await;
    let expected = 40_001;
    assert_eq!(viewed.seqs(), (0..expected).collect::<Vec<_>>());
    assert_eq!(viewed.resyncs, 0);
    let status = viewed.status.as_ref().unwrap();
    assert_eq!(
        (status.status.as_str(), status.lines, status.batches),
        ("completed", expected, viewed.have)
    );
    // The feed came from JetStream; the database holds the same lines.
    stack.wait_status(&id, "completed").await;
    let stored = stored_lines(&stack, &id).await;
    assert_eq!(stored, viewed.lines.into_values().collect::<Vec<_>>());

    // A viewer arriving after the end gets the snapshot and the status.
    let mut late = Feed::open(&stack.base, &events_path(&id), None).await;
    let first = late.next().await.unwrap();
    assert_eq!(first.event, "snapshot");
    let snapshot: Snapshot = serde_json::from_str(&first.data).unwrap();
    assert_eq!(
        (
            snapshot.lines,
            snapshot.tail.len(),
            snapshot.run.status.as_str()
        ),
        (expected, 1000, "completed")
    );
    assert_eq!(snapshot.tail.last().unwrap().seq, expected - 1);
    let last = late.next().await.unwrap();
    assert_eq!(last.event, "status");
    assert!(late.next().await.is_none());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_with_last_event_id_on_another_gateway_has_no_gap_and_no_duplicate() {
    let stack = Stack::start().await;
    let second = Gateway::start(
        GatewayConfig::for_tests(),
        stack.nats.config(),
        stack.db.db.clone(),
        stack.stop.clone(),
    )
    .await
    .unwrap();
    let second_base = format!("http://{}", second.addr);
    let id = start_run(
        &stack,
        "log_storm",
        json!({"lines_per_second": 5000, "duration_ms": 3000}),
    )
    .await;
    let expected: Vec<u64> = (0..15_001).collect();

    // Read until a few batches are in, then drop the connection mid-run.
    let mut viewed = Viewed::default();
    let mut feed = Feed::open(&stack.base, &events_path(&id), None).await;
    let mut at_three = None;
    while viewed.have < 5 {
        viewed.apply(&feed.next().await.unwrap());
        if viewed.have == 3 {
            at_three = Some(viewed.clone());
        }
    }
    drop(feed);
    let dropped_at = viewed.have;
    // The run goes on meanwhile (three more batches stored); resume on the other
    // gateway (a fresh hub there).
    wait_for("the run to go on", Duration::from_secs(30), || async {
        let (_, run) = stack.get(&format!("/api/runs/{id}")).await;
        (run["batches"].as_u64().unwrap_or(0) >= dropped_at + 3).then_some(())
    })
    .await
    .unwrap();
    let mut feed = Feed::open(&second_base, &events_path(&id), Some(dropped_at)).await;
    let first = feed.next().await.unwrap();
    assert_eq!(first.event, "batch", "a resumed feed has no snapshot");
    viewed.apply(&first);
    read_to_end(&mut feed, &mut viewed).await;
    assert_eq!(viewed.seqs(), expected);
    assert_eq!(viewed.resyncs, 0);
    assert_eq!(viewed.status.as_ref().unwrap().status, RunState::Completed);

    // After the end, from an early watermark: the missed batches are replayed from
    // JetStream, then the status.
    let mut replay = at_three.expect("the feed passed batch 3");
    let mut feed = Feed::open(&second_base, &events_path(&id), Some(3)).await;
    read_to_end(&mut feed, &mut replay).await;
    assert_eq!(replay.seqs(), expected);
    assert_eq!(replay.have, viewed.have);

    // Resuming at the end: only the status.
    let mut feed = Feed::open(&second_base, &events_path(&id), Some(viewed.have)).await;
    assert_eq!(feed.next().await.unwrap().event, "status");
    assert!(feed.next().await.is_none());
    // Past the end: refused.
    let (status, body) = stack
        .get(&format!(
            "{}?last_event_id={}",
            events_path(&id),
            viewed.have + 5
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        format!(
            "Last-Event-ID {} is beyond the end of run {id}, which has {} batches",
            viewed.have + 5,
            viewed.have
        )
    );
    stack.stop().await;
    second.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_viewers_share_one_upstream_consumer_and_see_the_same_run() {
    let gateway = GatewayConfig {
        tail_lines: 100_000,
        ..GatewayConfig::for_tests()
    };
    let stack = Stack::start_with(WorkerConfig::for_tests(), gateway).await;
    let id = start_run(
        &stack,
        "log_storm",
        json!({"lines_per_second": 2000, "duration_ms": 3000}),
    )
    .await;
    let mut feeds = Vec::new();
    for _ in 0..200 {
        feeds.push(Feed::open(&stack.base, &events_path(&id), None).await);
    }
    // One ordered consumer for all of them, beside the aggregator's durable one.
    let stream = stack.nats.jetstream().await;
    let mut runs = stream.get_stream(names::RUNS_STREAM).await.unwrap();
    assert_eq!(runs.info().await.unwrap().state.consumer_count, 2);
    let readers = feeds.into_iter().map(|mut feed| {
        tokio::spawn(async move {
            let mut viewed = Viewed::default();
            read_to_end(&mut feed, &mut viewed).await;
            viewed
        })
    });
    let viewed: Vec<Viewed> = futures::future::join_all(readers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let expected: Vec<u64> = (0..6001).collect();
    for v in &viewed {
        assert_eq!(v.seqs(), expected);
        assert_eq!(v.lines, viewed[0].lines);
        assert_eq!(v.status, viewed[0].status);
        assert_eq!(v.resyncs, 0);
    }
    assert_eq!(
        viewed[0].status.as_ref().unwrap().status,
        RunState::Completed
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_viewer_is_resynced_and_holds_up_neither_viewers_nor_the_pipeline() {
    // The stalled viewer's connection holds at most its socket buffers (a 4 KiB receive
    // window, and a send buffer the kernel grows up to tcp_wmem's maximum, 4 MiB by
    // default) of this run's ~20 MB. When it reads again, after the run has ended, the
    // oldest batch it takes from the hub was made seconds before, with newer frames
    // behind it: past the 100 ms bound, so it skips ahead whatever the machine's speed.
    let gateway = GatewayConfig {
        tail_lines: 200_000,
        max_viewer_lag: Duration::from_millis(100),
        ..GatewayConfig::for_tests()
    };
    let worker = WorkerConfig {
        flush_interval: Duration::from_millis(20),
        ..WorkerConfig::for_tests()
    };
    let stack = Stack::start_with(worker, gateway).await;
    let id = start_run(
        &stack,
        "log_storm",
        json!({"lines_per_second": 40000, "duration_ms": 2000, "line_bytes": 200}),
    )
    .await;
    // A viewer with a tiny receive window that reads nothing until the end.
    let stalled = stalled_viewer(&stack, &id).await;
    let mut reader = Feed::open(&stack.base, &events_path(&id), None).await;
    let mut viewed = Viewed::default();
    read_to_end(&mut reader, &mut viewed).await;
    let expected: Vec<u64> = (0..80_001).collect();
    assert_eq!(viewed.seqs(), expected);
    // The pipeline finished too while the stalled viewer was still stalled.
    let run = stack.wait_status(&id, "completed").await;
    assert_eq!(run["lines"], 80_001);

    // Now the stalled viewer reads: it was told to resync, and ends complete.
    let late = read_stalled(stalled).await;
    assert!(late.resyncs >= 1, "the stalled viewer was not resynced");
    assert_eq!(late.seqs(), expected);
    assert_eq!(late.status, viewed.status);
    stack.stop().await;
}

/// A viewer of the run's feed with a 4 KiB receive window, that reads nothing until
/// [`read_stalled`].
async fn stalled_viewer(stack: &Stack, id: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let host = stack.base.trim_start_matches("http://");
    let mut stream = socket.connect(host.parse().unwrap()).await.unwrap();
    stream
        .write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
                events_path(id)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

/// What a stalled viewer receives once it reads, to the end of its feed.
async fn read_stalled(mut stalled: tokio::net::TcpStream) -> Viewed {
    use tokio::io::AsyncReadExt;
    let mut text = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stalled.read_to_end(&mut text))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    let body = dechunk(text.split_once("\r\n\r\n").unwrap().1);
    let mut decoder = athanor_client::sse::SseDecoder::new();
    let mut viewed = Viewed::default();
    for event in decoder.push(body.as_bytes()) {
        viewed.apply(&event);
    }
    viewed
}

/// The body of an HTTP/1.1 chunked response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_feed_announces_created_running_and_finished() {
    let stack = Stack::start().await;
    let mut feed = Feed::open(&stack.base, "/api/events", None).await;
    let id = start_run(&stack, "sweep", json!({"iterations": 2, "delay_ms": 0})).await;
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("completed") {
        let event = feed.next().await.unwrap();
        assert_eq!(event.event, "run");
        let change: Value = serde_json::from_str(&event.data).unwrap();
        if change["run_id"] == id.as_str() {
            seen.push(change["status"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(seen, ["pending", "running", "completed"]);
    // By the time "completed" is announced, the database says so.
    let (_, run) = stack.get(&format!("/api/runs/{id}")).await;
    assert_eq!(run["status"], "completed");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_refuse_bad_input_and_cancel_works_before_start() {
    let stack = Stack::start_with(
        WorkerConfig {
            max_concurrent_runs: 1,
            ..WorkerConfig::for_tests()
        },
        GatewayConfig::for_tests(),
    )
    .await;
    let (status, body) = stack.get("/api/runs/nope/events").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "run \"nope\" not found");

    // The only slot is taken, so the second run waits in the queue: cancel it there.
    let busy = start_run(&stack, "sleepy", json!({"duration_ms": 60000})).await;
    stack.wait_status(&busy, "running").await;
    let queued = start_run(&stack, "sweep", json!({"iterations": 2})).await;
    let response = reqwest::Client::new()
        .get(format!("{}{}", stack.base, events_path(&queued)))
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"],
        "Last-Event-ID \"abc\" is not a batch watermark (a whole number from this feed's `id:` fields)"
    );
    let mut feed = Feed::open(&stack.base, &events_path(&queued), None).await;
    let snapshot = feed.next().await.unwrap();
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(
        serde_json::from_str::<Snapshot>(&snapshot.data)
            .unwrap()
            .run
            .status,
        RunState::Pending
    );
    let (status, _) = stack.post(&format!("/api/runs/{queued}/cancel"), "").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = stack.post(&format!("/api/runs/{busy}/cancel"), "").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut viewed = Viewed::default();
    viewed.apply(&snapshot);
    read_to_end(&mut feed, &mut viewed).await;
    let status = viewed.status.unwrap();
    assert_eq!(
        (
            status.status.as_str(),
            status.error.as_deref(),
            status.lines
        ),
        ("cancelled", Some("cancelled before it started"), 0)
    );
    let run = stack.wait_status(&queued, "cancelled").await;
    assert_eq!(run["lines"], 0);
    wait_for("both runs to end", Duration::from_secs(30), || async {
        let (_, run) = stack.get(&format!("/api/runs/{busy}")).await;
        (run["status"] == "cancelled").then_some(())
    })
    .await
    .unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_end_cleanly_when_the_gateway_stops() {
    let stack = Stack::start().await;
    let id = start_run(&stack, "sleepy", json!({"duration_ms": 60000})).await;
    stack.wait_status(&id, "running").await;
    let mut run_feed = Feed::open(&stack.base, &events_path(&id), None).await;
    assert_eq!(run_feed.next().await.unwrap().event, "snapshot");
    let mut lifecycle = Feed::open(&stack.base, "/api/events", None).await;
    // Graceful shutdown waits for open connections: it returns only if the feeds end.
    tokio::time::timeout(Duration::from_secs(30), stack.stop())
        .await
        .expect("the gateway stopped with feeds open");
    // The worker cancelled the run on its way out; whatever the feed saw, it ended.
    while let Some(event) = run_feed.next().await {
        assert_ne!(event.event, "snapshot");
    }
    assert!(lifecycle.next().await.is_none());
}

/// A batch of the synthetic run `run_id` from a worker that is not registered: 50
/// lines per batch; the last of `total` batches is final (failed).
fn orphan_batch(run_id: &str, batch_seq: u64, total: u64) -> athanor_schemas::Batch {
    use athanor_schemas::{Batch, Final, Level, RunInfo, RunState, Status};
    let mut batch = Batch::new(run_id, batch_seq, "w-gone");
    if batch_seq == 0 {
        batch.run = Some(RunInfo {
            experiment: "orphaned".into(),
            config: json!({}),
            instance_id: None,
            started_at: athanor_schemas::now_micros(),
        });
    }
    batch.logs = (0..50)
        .map(|i| LogLine {
            seq: batch_seq * 50 + i,
            ts: athanor_schemas::now_micros(),
            level: Level::Info,
            message: format!("line {}", batch_seq * 50 + i),
            metadata: None,
        })
        .collect();
    if batch_seq + 1 == total {
        batch.status = Some(Status {
            state: RunState::Failed,
            error: Some("late".into()),
            at: athanor_schemas::now_micros(),
        });
        batch.final_ = Some(Final {
            status: RunState::Failed,
            batches: total,
            lines: total * 50,
            results: 0,
            metrics: 0,
        });
    }
    batch
}

async fn publish(stack: &Stack, batch: &athanor_schemas::Batch) {
    let js = stack.nats.jetstream().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        names::headers::MSG_ID,
        names::batch_msg_id(&batch.run_id, batch.batch_seq).as_str(),
    );
    let payload = athanor_schemas::encode(batch).payload;
    js.publish_with_headers(names::run_subject(&batch.run_id), headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A run whose worker vanished: its viewers get `lost` with what was stored; after a
/// late final batch settles it, a new viewer sees the final status, not a cached
/// `lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_of_a_run_whose_worker_vanished_receive_lost() {
    let stack = Stack::start().await;
    let id = names::new_run_id();
    for b in 0..2 {
        publish(&stack, &orphan_batch(&id, b, 3)).await;
    }
    wait_for(
        "the orphan run to be stored",
        Duration::from_secs(30),
        || async {
            let (status, _) = stack.get(&format!("/api/runs/{id}")).await;
            (status == StatusCode::OK).then_some(())
        },
    )
    .await
    .unwrap();
    let mut feed = Feed::open(&stack.base, &events_path(&id), None).await;
    let mut viewed = Viewed::default();
    read_to_end(&mut feed, &mut viewed).await;
    let status = viewed.status.clone().unwrap();
    assert_eq!(
        (
            status.status.as_str(),
            status.error.as_deref(),
            status.lines
        ),
        ("lost", Some("worker w-gone stopped heartbeating"), 100)
    );
    assert_eq!(viewed.seqs(), (0..100).collect::<Vec<_>>());
    // Resuming at the end: `lost` again.
    let mut feed = Feed::open(&stack.base, &events_path(&id), Some(viewed.have)).await;
    assert_eq!(feed.next().await.unwrap().event, "status");

    publish(&stack, &orphan_batch(&id, 2, 3)).await;
    stack.wait_status(&id, "failed").await;
    let mut feed = Feed::open(&stack.base, &events_path(&id), Some(viewed.have)).await;
    // A `lost` run that turns out to have ended after all: the viewer reads on.
    viewed.status = None;
    viewed.fold.status = None;
    read_to_end(&mut feed, &mut viewed).await;
    assert_eq!(viewed.seqs(), (0..150).collect::<Vec<_>>());
    let status = viewed.status.unwrap();
    assert_eq!(
        (
            status.status.as_str(),
            status.error.as_deref(),
            status.lines,
            status.batches
        ),
        ("failed", Some("late"), 150, 3)
    );
    stack.stop().await;
}

/// Run output holding CR, LF, NUL and SSE syntax cannot inject SSE fields or events:
/// the feed carries it intact inside its JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_cannot_inject_sse_fields() {
    let stack = Stack::start().await;
    let nasty = "a\r\n\r\nevent: status\r\ndata: {\"status\":\"completed\"}\n\nid: 999\n\0z\rq";
    let id = start_run(&stack, "echo", json!({"message": nasty, "count": 2})).await;
    let mut feed = Feed::open(&stack.base, &events_path(&id), None).await;
    let mut events = Vec::new();
    while let Some(event) = feed.next().await {
        events.push(event);
    }
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"snapshot"));
    assert_eq!(names.last(), Some(&"status"));
    assert!(
        names[1..names.len() - 1].iter().all(|n| *n == "batch"),
        "{names:?}"
    );
    let mut viewed = Viewed::default();
    for event in &events {
        viewed.apply(event);
    }
    let lines: Vec<&LogLine> = viewed.lines.values().collect();
    assert_eq!(lines.len(), 2);
    for line in lines {
        assert_eq!(line.message, nasty);
        assert_eq!(line.metadata.as_ref().unwrap()["message"], nasty);
    }
    assert_eq!(viewed.status.unwrap().status, RunState::Completed);
    stack.stop().await;
}

/// The raw body of a feed, read until the server ends it, cut into its blocks (what
/// lies between blank lines): events, and `:` for a keep-alive comment.
async fn raw_blocks(base: &str, id: &str) -> Vec<String> {
    let mut response = reqwest::get(format!("{base}{}", events_path(id)))
        .await
        .unwrap();
    let mut body = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), response.chunk())
        .await
        .expect("the feed writes within 60 s")
        .unwrap()
    {
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8(body).unwrap();
    assert!(body.ends_with("\n\n"), "the feed ends on a whole event");
    body.trim_end_matches('\n')
        .split("\n\n")
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_feed_gets_keep_alive_comments_and_a_busy_one_none() {
    let gateway = GatewayConfig {
        keep_alive: Duration::from_millis(250),
        ..GatewayConfig::for_tests()
    };
    let stack = Stack::start_with(WorkerConfig::for_tests(), gateway).await;
    // A line a second, and a batch every 100 ms.
    let quiet = json!({"lines_per_second": 1, "duration_ms": 4000});
    let busy = json!({"lines_per_second": 50, "duration_ms": 4000});
    let quiet = start_run(&stack, "log_storm", quiet).await;
    let busy = start_run(&stack, "log_storm", busy).await;
    let (quiet, busy) = tokio::join!(
        raw_blocks(&stack.base, &quiet),
        raw_blocks(&stack.base, &busy)
    );
    for blocks in [&quiet, &busy] {
        assert!(
            blocks[0].starts_with("event: snapshot\n"),
            "{:?}",
            blocks[0]
        );
        assert!(blocks.last().unwrap().starts_with("event: status\n"));
        let events = blocks.iter().filter(|b| *b != ":");
        assert!(
            events.clone().all(|b| b.starts_with("event: ")),
            "{blocks:?}"
        );
    }
    let comments = |blocks: &[String]| blocks.iter().filter(|b| *b == ":").count();
    // About a second between writes: three comments in each gap, 12 in all; at least 4
    // however loaded the machine.
    assert!(comments(&quiet) >= 4, "{quiet:?}");
    // A write every 100 ms once the run has started: a comment only if the machine
    // stalled a quarter second.
    let started = busy
        .iter()
        .position(|b| b.starts_with("event: batch\n"))
        .unwrap();
    assert!(comments(&busy[started..]) <= 2, "{busy:?}");
    let batches = busy.iter().filter(|b| b.starts_with("event: batch\n"));
    assert!(batches.count() >= 20, "{busy:?}");
    stack.stop().await;
}

/// The whole body of a feed, read with `accept_encoding`, decoded; and the bytes that
/// came over the wire.
async fn raw_feed(base: &str, id: &str, accept_encoding: &str) -> (String, usize, Option<String>) {
    use std::io::Read;
    // Decoded here, not by reqwest: the bytes on the wire are what is measured.
    let response = reqwest::Client::builder()
        .no_gzip()
        .no_zstd()
        .build()
        .unwrap()
        .get(format!("{base}{}", events_path(id)))
        .header("accept-encoding", accept_encoding)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let coding = response
        .headers()
        .get("content-encoding")
        .map(|v| v.to_str().unwrap().to_string());
    let body = tokio::time::timeout(Duration::from_secs(60), response.bytes())
        .await
        .unwrap()
        .unwrap();
    let mut text = Vec::new();
    match coding.as_deref() {
        None => text = body.to_vec(),
        Some("gzip") => {
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut text)
                .expect("one gzip stream, its CRC and length right");
        }
        Some("zstd") => text = zstd::stream::decode_all(&body[..]).unwrap(),
        Some(other) => panic!("unexpected content-encoding {other}"),
    }
    (String::from_utf8(text).unwrap(), body.len(), coding)
}

/// A feed is compressed when the client accepts it (zstd first, then gzip), and
/// decodes to the same events as the plain feed; the bytes saved are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_is_compressed_for_a_client_that_accepts_it() {
    let stack = Stack::start().await;
    let id = start_run(
        &stack,
        "log_storm",
        json!({"lines_per_second": 20000, "duration_ms": 1000, "line_bytes": 180}),
    )
    .await;
    stack.wait_status(&id, "completed").await;
    // After the end: each feed is the snapshot and the status (tail of 1 000 lines).
    let events = |text: &str| -> Vec<String> {
        text.split("\n\n")
            .filter(|e| !e.is_empty() && !e.starts_with(':'))
            .map(str::to_string)
            .collect()
    };
    let (plain, plain_bytes, coding) = raw_feed(&stack.base, &id, "identity").await;
    assert_eq!(coding, None);
    assert_eq!(events(&plain).len(), 2);
    for (accept, expected) in [
        ("gzip, deflate", "gzip"),
        ("gzip, deflate, br, zstd", "zstd"),
    ] {
        let (text, bytes, coding) = raw_feed(&stack.base, &id, accept).await;
        assert_eq!(coding.as_deref(), Some(expected));
        assert_eq!(events(&text), events(&plain), "{expected}");
        println!(
            "{expected}: {bytes} bytes for {plain_bytes} ({:.1}x)",
            plain_bytes as f64 / bytes as f64
        );
        assert!(
            bytes * 4 < plain_bytes,
            "{expected}: {bytes} of {plain_bytes}"
        );
    }

    // Live: a viewer taking gzip follows a whole run, every line once.
    let id = start_run(
        &stack,
        "log_storm",
        json!({"lines_per_second": 10000, "duration_ms": 1000}),
    )
    .await;
    let (text, bytes, coding) = raw_feed(&stack.base, &id, "gzip").await;
    assert_eq!(coding.as_deref(), Some("gzip"));
    let mut viewed = Viewed::default();
    let mut decoder = athanor_client::sse::SseDecoder::new();
    for event in decoder.push(text.as_bytes()) {
        viewed.apply(&event);
    }
    assert_eq!(viewed.seqs(), (0..10_001).collect::<Vec<_>>());
    assert_eq!(viewed.status.as_ref().unwrap().status.as_str(), "completed");
    println!("live gzip: {bytes} bytes for {} decoded", text.len());
    stack.stop().await;
}

/// A viewer that falls more than `max_viewer_lag_bytes` behind skips ahead: `resync`,
/// a fresh snapshot, and live from there, without losing its place in the run's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_far_behind_in_bytes_skips_ahead_to_a_snapshot() {
    let gateway = GatewayConfig {
        tail_lines: 100_000,
        max_viewer_lag_bytes: 64 << 10,
        ..GatewayConfig::for_tests()
    };
    let stack = Stack::start_with(WorkerConfig::for_tests(), gateway).await;
    let id = start_run(
        &stack,
        "log_storm",
        json!({"lines_per_second": 20000, "duration_ms": 2000, "line_bytes": 200}),
    )
    .await;
    // Joins, then reads nothing until the hub has sent the whole run (past its socket
    // buffers, a 4 KiB window and at most 4 MiB sent, of ~10 MB): the batches it has not
    // sent are then far more than 64 KiB behind the newest. The hub's end is awaited
    // through a second viewer, not the stored status: a hub still behind the stream
    // when the run is stored would send the stalled viewer its frames as it made them,
    // each the newest, and nothing would be behind (a CI run's PostgreSQL pass).
    let stalled = stalled_viewer(&stack, &id).await;
    let mut reader = Feed::open(&stack.base, &events_path(&id), None).await;
    let mut followed = Viewed::default();
    read_to_end(&mut reader, &mut followed).await;
    assert_eq!(followed.seqs(), (0..40_001).collect::<Vec<_>>());
    let viewed = read_stalled(stalled).await;
    assert!(viewed.resyncs >= 1, "the viewer never skipped ahead");
    assert_eq!(viewed.seqs(), (0..40_001).collect::<Vec<_>>());
    stack.stop().await;
}
