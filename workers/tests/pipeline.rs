//! The worker runtime against a real nats-server (started per test on a free port
//! with a temp store): what lands in `ATHANOR_RUNS` is counted exactly.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use athanor_connections::nats::ensure_topology;
use athanor_schemas::requests::{RunRequest, WorkerInfo};
use athanor_schemas::{names, now_micros, ConfigSchema, Field, Level, RunState};
use athanor_testkit::{read_run, wait_for, RunOutput, TestNats};
use athanor_workers::{builtin, Experiment, RunContext, RunError, Worker, WorkerConfig};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const READ_TIMEOUT: Duration = Duration::from_secs(60);

struct TestWorker {
    worker: Worker,
    shutdown: CancellationToken,
}

impl TestWorker {
    async fn start(nats: &TestNats, config: WorkerConfig, extra: Vec<Arc<dyn Experiment>>) -> Self {
        athanor_testkit::init_tracing();
        let shutdown = CancellationToken::new();
        let mut experiments = builtin::all();
        experiments.extend(extra);
        let worker = Worker::start(config, nats.config(), experiments, shutdown.clone())
            .await
            .expect("worker starts");
        TestWorker { worker, shutdown }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.worker.wait().await;
    }
}

fn request(experiment: &str, config: Value) -> RunRequest {
    RunRequest {
        run_id: names::new_run_id(),
        experiment: experiment.into(),
        config,
        instance_id: None,
        requested_at: now_micros(),
    }
}

/// Runs `experiment` directly on the worker and reads everything it published.
async fn run_to_end(
    nats: &TestNats,
    worker: &TestWorker,
    experiment: &str,
    config: Value,
) -> (RunState, RunOutput) {
    let mut handle = worker
        .worker
        .start_run(request(experiment, config))
        .await
        .expect("run starts");
    let state = handle.finished().await;
    let out = read_run(&nats.jetstream().await, &handle.run_id, READ_TIMEOUT)
        .await
        .expect("read run");
    (state, out)
}

fn final_status(out: &RunOutput) -> (RunState, Option<String>) {
    let last = out.batches.last().expect("at least one batch");
    let status = last
        .status
        .clone()
        .expect("the last batch carries the terminal status");
    assert_eq!(last.final_.as_ref().expect("final").status, status.state);
    (status.state, status.error)
}

/// Asserts the run's lines are exactly seqs 0..n, once each.
fn assert_gapless(out: &RunOutput, n: u64) {
    let seqs: Vec<u64> = out.lines().iter().map(|l| l.seq).collect();
    assert_eq!(seqs.len() as u64, n, "line count");
    assert!(seqs.iter().copied().eq(0..n), "seqs are not exactly 0..{n}");
    let f = out
        .final_batch()
        .expect("final batch")
        .final_
        .clone()
        .unwrap();
    assert_eq!(f.lines, n);
    assert_eq!(f.batches, out.batches.len() as u64);
    assert!(
        out.batches.iter().map(|b| b.batch_seq).eq(0..f.batches),
        "batch_seqs are not gapless"
    );
}

/// Logs `per_thread` numbered lines from each of `threads` threads, as fast as it can.
struct Numbered;

impl Experiment for Numbered {
    fn name(&self) -> &str {
        "numbered"
    }
    fn description(&self) -> &str {
        "test: numbered lines from several threads"
    }
    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::int("threads").default(4),
            Field::int("per_thread").default(25_000),
        ])
    }
    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let threads = ctx.config_i64("threads").unwrap();
        let per_thread = ctx.config_i64("per_thread").unwrap();
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    for i in 0..per_thread {
                        if i % 10 == 0 {
                            ctx.log_with(
                                Level::Warn,
                                format!("thread {t} line {i} ünïcødé"),
                                json!({"t": t, "i": i}),
                            );
                        } else {
                            ctx.log(Level::Info, format!("thread {t} line {i} ünïcødé"));
                        }
                    }
                });
            }
        });
        ctx.result("done", true);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_from_four_threads_lands_exactly_once_with_its_content() {
    let nats = TestNats::start();
    let worker =
        TestWorker::start(&nats, WorkerConfig::for_tests(), vec![Arc::new(Numbered)]).await;
    let (state, out) = run_to_end(
        &nats,
        &worker,
        "numbered",
        json!({"threads": 4, "per_thread": 25_000}),
    )
    .await;
    assert_eq!(state, RunState::Completed);
    assert_eq!(final_status(&out), (RunState::Completed, None));
    assert_gapless(&out, 100_000);
    assert_eq!(
        out.messages,
        out.batches.len(),
        "no duplicate messages without faults"
    );
    // Content: every (thread, i) exactly once, each thread's lines in seq order.
    let mut last_i: BTreeMap<i64, i64> = BTreeMap::new();
    for line in out.lines() {
        let rest = line.message.strip_prefix("thread ").expect("prefix");
        let mut parts = rest.split(' ');
        let t: i64 = parts.next().unwrap().parse().unwrap();
        assert_eq!(parts.next(), Some("line"));
        let i: i64 = parts.next().unwrap().parse().unwrap();
        assert_eq!(parts.next(), Some("ünïcødé"));
        assert_eq!(
            *last_i.get(&t).unwrap_or(&-1),
            i - 1,
            "thread {t} out of order at seq {}",
            line.seq
        );
        last_i.insert(t, i);
        if i % 10 == 0 {
            assert_eq!(line.level, Level::Warn);
            assert_eq!(line.metadata, Some(json!({"t": t, "i": i})));
        } else {
            assert_eq!((line.level, &line.metadata), (Level::Info, &None));
        }
    }
    assert_eq!(last_i, (0..4).map(|t| (t, 24_999)).collect());
    // The first batch says what ran and that it is running.
    let first = &out.batches[0];
    assert_eq!(first.status.as_ref().unwrap().state, RunState::Running);
    assert_eq!(first.run.as_ref().unwrap().experiment, "numbered");
    assert_eq!(
        first.run.as_ref().unwrap().config,
        json!({"threads": 4, "per_thread": 25_000})
    );
    assert_eq!(
        out.batches
            .iter()
            .flat_map(|b| &b.results)
            .map(|r| (&r.key, &r.value))
            .collect::<Vec<_>>(),
        vec![(&"done".to_string(), &json!(true))]
    );
    worker.stop().await;
}

/// The property the design exists for: one batch per run per tick, whatever the log rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_count_follows_ticks_not_lines() {
    let nats = TestNats::start();
    let worker = TestWorker::start(&nats, WorkerConfig::for_tests(), vec![]).await;
    for rate in [100, 100_000] {
        let (state, out) = run_to_end(
            &nats,
            &worker,
            "log_storm",
            json!({"lines_per_second": rate, "duration_ms": 2000, "line_bytes": 100}),
        )
        .await;
        assert_eq!(state, RunState::Completed);
        let lines = rate * 2 + 1; // the storm's lines plus its opening line
        assert_gapless(&out, lines);
        let started = out.batches[0].run.as_ref().unwrap().started_at;
        let ended = out.batches.last().unwrap().status.as_ref().unwrap().at;
        let t_ms = (ended - started) as f64 / 1000.0;
        let bound = (t_ms / 100.0).floor() as usize + 3;
        assert!(
            out.batches.len() <= bound,
            "{rate} lines/s over {t_ms} ms: {} batches > bound {bound}",
            out.batches.len()
        );
        assert!(out.batches.len() >= 2);
        eprintln!(
            "{rate} lines/s: {lines} lines in {} batches over {t_ms:.0} ms",
            out.batches.len()
        );
    }
    worker.stop().await;
}

/// Logs `lines` lines, `gap_ms` apart.
struct Sparse;

impl Experiment for Sparse {
    fn name(&self) -> &str {
        "sparse"
    }
    fn description(&self) -> &str {
        "test: a line every gap_ms"
    }
    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::int("lines").default(3),
            Field::int("gap_ms").default(1000),
        ])
    }
    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let gap = Duration::from_millis(ctx.config_i64("gap_ms").unwrap() as u64);
        for i in 0..ctx.config_i64("lines").unwrap() {
            ctx.log(Level::Info, format!("sparse line {i}"));
            std::thread::sleep(gap);
        }
        Ok(())
    }
}

/// A line after a quiet flush interval goes out at once (the leading edge) instead of
/// waiting for the next tick. With a 3 s interval and a line every 3.5 s, the ticks
/// would publish the first line up to 3 s late and each later one 2.5 s late; each
/// goes out within a second (milliseconds, unloaded), in a batch of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_after_a_quiet_interval_is_published_at_once() {
    let nats = TestNats::start();
    let config = WorkerConfig {
        flush_interval: Duration::from_secs(3),
        ..WorkerConfig::for_tests()
    };
    let worker = TestWorker::start(&nats, config, vec![Arc::new(Sparse)]).await;
    let request = request("sparse", json!({"lines": 4, "gap_ms": 3500}));
    let js = nats.jetstream().await;
    let mut published = js
        .client()
        .subscribe(names::run_subject(&request.run_id))
        .await
        .unwrap();
    let run_id = request.run_id.clone();
    let mut handle = worker.worker.start_run(request).await.unwrap();
    let mut delays = Vec::new();
    while delays.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(30), published.next())
            .await
            .expect("a batch within 30 s")
            .unwrap();
        let at = now_micros();
        let batch = athanor_schemas::decode(&message.payload, 1 << 26).unwrap();
        for line in &batch.logs {
            delays.push((line.seq, batch.batch_seq, (at - line.ts) / 1000));
        }
    }
    assert_eq!(handle.finished().await, RunState::Completed);
    eprintln!("(seq, batch, ms from log() to the subject): {delays:?}");
    // Line 0 is the run's first output: it goes out at once with `running`; each later
    // one follows 3.5 s of quiet.
    for &(seq, batch, ms) in &delays {
        assert!(
            ms < 1000,
            "line {seq} (batch {batch}) published {ms} ms after log()"
        );
    }
    let batches: HashSet<u64> = delays.iter().map(|d| d.1).collect();
    assert_eq!(batches.len(), 4, "a batch per line: {delays:?}");
    let out = read_run(&js, &run_id, READ_TIMEOUT).await.unwrap();
    assert_gapless(&out, 4);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endings_ok_error_panic_and_the_worker_survives() {
    let nats = TestNats::start();
    let worker = TestWorker::start(&nats, WorkerConfig::for_tests(), vec![]).await;

    let (state, out) = run_to_end(
        &nats,
        &worker,
        "flaky",
        json!({"mode": "ok", "after_lines": 7}),
    )
    .await;
    assert_eq!(state, RunState::Completed);
    assert_gapless(&out, 7);
    // The last line logged before returning is stored, in the final batch or before.
    assert_eq!(out.lines().last().unwrap().message, "flaky line 6 of 7");

    let (state, out) = run_to_end(
        &nats,
        &worker,
        "flaky",
        json!({"mode": "error", "after_lines": 3}),
    )
    .await;
    assert_eq!(state, RunState::Failed);
    assert_eq!(
        final_status(&out),
        (
            RunState::Failed,
            Some("flaky: failing after 3 lines, as configured".into())
        )
    );
    assert_gapless(&out, 3);

    let (state, out) = run_to_end(
        &nats,
        &worker,
        "flaky",
        json!({"mode": "panic", "after_lines": 5}),
    )
    .await;
    assert_eq!(state, RunState::Failed);
    assert_eq!(
        final_status(&out),
        (
            RunState::Failed,
            Some("panicked: flaky: panicking after 5 lines, as configured".into())
        )
    );
    assert_gapless(&out, 5);

    // The worker is still there.
    let (state, out) = run_to_end(
        &nats,
        &worker,
        "sweep",
        json!({"iterations": 3, "delay_ms": 0}),
    )
    .await;
    assert_eq!(state, RunState::Completed);
    let results: Vec<String> = out
        .batches
        .iter()
        .flat_map(|b| &b.results)
        .map(|r| r.key.clone())
        .collect();
    assert_eq!(
        results,
        ["iteration_0", "iteration_1", "iteration_2", "best_score"]
    );
    let progress = out
        .batches
        .iter()
        .rev()
        .find_map(|b| b.progress.clone())
        .unwrap();
    assert_eq!((progress.current, progress.total), (3, 3));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_field() {
    let nats = TestNats::start();
    let worker = TestWorker::start(&nats, WorkerConfig::for_tests(), vec![]).await;
    let (state, out) = run_to_end(&nats, &worker, "sweep", json!({"iterations": 0})).await;
    assert_eq!(state, RunState::Failed);
    assert_eq!(out.batches.len(), 1);
    assert_eq!(
        final_status(&out).1.unwrap(),
        "config field `iterations` must be at least 1, got 0"
    );
    let (_, out) = run_to_end(&nats, &worker, "sweep", json!({"iterashuns": 3})).await;
    assert_eq!(final_status(&out).1.unwrap(), "config field `iterashuns` is not a field of this experiment (fields: iterations, delay_ms)");
    worker.stop().await;
}

/// Ignores cancellation: the worker must stop it after the grace period.
struct Stubborn;

impl Experiment for Stubborn {
    fn name(&self) -> &str {
        "stubborn"
    }
    fn description(&self) -> &str {
        "test: ignores cancellation"
    }
    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::default()
    }
    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        for i in 0..600 {
            ctx.info(format!("still going {i}"));
            STUBBORN_LOGS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// `log()` calls the stubborn experiment made (only one test runs it).
static STUBBORN_LOGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn publish_request(js: &async_nats::jetstream::Context, req: &RunRequest) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::headers::MSG_ID, req.run_id.as_str());
    js.publish_with_headers(
        names::request_subject(&req.experiment),
        headers,
        serde_json::to_vec(req).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn first_batch_seen(js: &async_nats::jetstream::Context, run_id: &str) {
    let stream = js.get_stream(names::RUNS_STREAM).await.unwrap();
    wait_for("the run's first batch", Duration::from_secs(30), || async {
        stream
            .get_last_raw_message_by_subject(&names::run_subject(run_id))
            .await
            .ok()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_start_during_run_and_past_grace() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let control = js.get_key_value(names::CONTROL_BUCKET).await.unwrap();
    let worker =
        TestWorker::start(&nats, WorkerConfig::for_tests(), vec![Arc::new(Stubborn)]).await;

    // Before start: the cancel is in the bucket before the request is published.
    let early = request("sleepy", json!({"duration_ms": 60_000}));
    control
        .put(names::cancel_key(&early.run_id), "{}".into())
        .await
        .unwrap();
    publish_request(&js, &early).await;
    let out = read_run(&js, &early.run_id, READ_TIMEOUT).await.unwrap();
    assert_eq!(out.batches.len(), 1);
    assert_eq!(
        final_status(&out),
        (
            RunState::Cancelled,
            Some("cancelled before it started".into())
        )
    );
    assert_gapless(&out, 0);

    // During the run: sleepy honours it.
    let during = request("sleepy", json!({"duration_ms": 60_000}));
    publish_request(&js, &during).await;
    first_batch_seen(&js, &during.run_id).await;
    let asked = Instant::now();
    control
        .put(names::cancel_key(&during.run_id), "{}".into())
        .await
        .unwrap();
    let out = read_run(&js, &during.run_id, READ_TIMEOUT).await.unwrap();
    assert!(asked.elapsed() < Duration::from_secs(20));
    assert_eq!(
        final_status(&out),
        (RunState::Cancelled, Some("cancelled on request".into()))
    );
    let lines = out.lines();
    assert_eq!(lines.first().unwrap().message, "sleeping for 60000 ms");
    assert!(
        lines
            .last()
            .unwrap()
            .message
            .starts_with("cancelled after "),
        "{}",
        lines.last().unwrap().message
    );

    // Ignoring cancellation: stopped after the grace period, reported cancelled.
    let stubborn = request("stubborn", json!({}));
    publish_request(&js, &stubborn).await;
    first_batch_seen(&js, &stubborn.run_id).await;
    control
        .put(names::cancel_key(&stubborn.run_id), "{}".into())
        .await
        .unwrap();
    let out = read_run(&js, &stubborn.run_id, READ_TIMEOUT).await.unwrap();
    assert_eq!(
        final_status(&out),
        (
            RunState::Cancelled,
            Some("stopped after ignoring cancellation for 500ms".into())
        )
    );
    let n = out.final_batch().unwrap().final_.as_ref().unwrap().lines;
    assert!(n > 0 && n < 600);
    assert_gapless(&out, n);
    // The abandoned thread keeps calling log(): discarded, and nothing stays reserved.
    let after_end = STUBBORN_LOGS.load(std::sync::atomic::Ordering::SeqCst);
    wait_for(
        "more log() calls after the end",
        Duration::from_secs(30),
        || async {
            (STUBBORN_LOGS.load(std::sync::atomic::Ordering::SeqCst) > after_end + 3).then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(worker.worker.budget().used(), 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_shared_by_workers_and_bounded_per_worker() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let config = WorkerConfig {
        max_concurrent_runs: 2,
        ..WorkerConfig::for_tests()
    };
    let a = TestWorker::start(
        &nats,
        WorkerConfig {
            id: Some("worker-a".into()),
            ..config.clone()
        },
        vec![],
    )
    .await;
    let b = TestWorker::start(
        &nats,
        WorkerConfig {
            id: Some("worker-b".into()),
            ..config
        },
        vec![],
    )
    .await;

    // Both are registered with their experiments' schemas.
    let workers = js.get_key_value(names::WORKERS_BUCKET).await.unwrap();
    for id in ["worker-a", "worker-b"] {
        let info: WorkerInfo = wait_for("registration", Duration::from_secs(10), || async {
            workers
                .get(id)
                .await
                .ok()
                .flatten()
                .map(|v| serde_json::from_slice(&v).unwrap())
        })
        .await
        .unwrap();
        let names: Vec<&str> = info.experiments.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "echo",
                "flaky",
                "log_storm",
                "metric_storm",
                "sleepy",
                "sweep"
            ]
        );
        let storm = info
            .experiments
            .iter()
            .find(|e| e.name == "log_storm")
            .unwrap();
        let props = storm.config_schema["properties"].as_object().unwrap();
        let keys: HashSet<&str> = props.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            HashSet::from([
                "lines_per_second",
                "duration_ms",
                "line_bytes",
                "threads",
                "with_metadata"
            ])
        );
        assert_eq!(props["threads"]["default"], json!(1));
    }

    let requests: Vec<RunRequest> = (0..8)
        .map(|_| request("sleepy", json!({"duration_ms": 400})))
        .collect();
    for r in &requests {
        publish_request(&js, r).await;
    }
    // Publishing the same request again (same Nats-Msg-Id) does not run it twice.
    publish_request(&js, &requests[0]).await;
    let mut spans = Vec::new();
    let mut messages = Vec::new();
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        let out = read_run(&js, &r.run_id, READ_TIMEOUT).await.unwrap();
        assert_eq!(final_status(&out).0, RunState::Completed);
        assert_eq!(out.messages, out.batches.len(), "each run executed once");
        messages.push(out.messages);
        let worker_id = out.batches[0].worker_id.clone();
        let start = out.batches[0].run.as_ref().unwrap().started_at;
        let end = out.batches.last().unwrap().status.as_ref().unwrap().at;
        spans.push((worker_id.clone(), start, end));
        *by_worker.entry(worker_id).or_default() += 1;
    }
    assert_eq!(
        by_worker.len(),
        2,
        "both workers took requests: {by_worker:?}"
    );
    for (worker_id, start, _) in &spans {
        let overlapping = spans
            .iter()
            .filter(|(w, s, e)| w == worker_id && s <= start && e > start)
            .count();
        assert!(
            overlapping <= 2,
            "{worker_id} ran {overlapping} runs at once"
        );
    }
    assert_eq!(a.worker.runs_started() + b.worker.runs_started(), 8);
    // A request delivered again after its run happened (here: re-published past the
    // broker's dedupe, under another message id) is refused, not run twice.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::headers::MSG_ID, "another-id");
    js.publish_with_headers(
        names::request_subject("sleepy"),
        headers,
        serde_json::to_vec(&requests[3]).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_for(
        "the repeated request to be consumed",
        Duration::from_secs(20),
        || async {
            let n = js
                .get_stream(names::REQUESTS_STREAM)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .state
                .messages;
            (n == 0).then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(a.worker.runs_started() + b.worker.runs_started(), 8);
    assert_eq!(
        read_run(&js, &requests[3].run_id, READ_TIMEOUT)
            .await
            .unwrap()
            .messages,
        messages[3]
    );
    // Also once its output has left ATHANOR_RUNS (purged when the stream fills, or
    // past its age limit): the worker's record of having taken it still refuses it.
    js.get_stream(names::RUNS_STREAM)
        .await
        .unwrap()
        .purge()
        .filter(names::run_subject(&requests[3].run_id))
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::headers::MSG_ID, "a-third-id");
    js.publish_with_headers(
        names::request_subject("sleepy"),
        headers,
        serde_json::to_vec(&requests[3]).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_for(
        "the request repeated after the purge to be consumed",
        Duration::from_secs(20),
        || async {
            let stream = js.get_stream(names::REQUESTS_STREAM).await.unwrap();
            (stream.cached_info().state.messages == 0).then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(a.worker.runs_started() + b.worker.runs_started(), 8);
    // The work queue is drained.
    let info = js
        .get_stream(names::REQUESTS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(info, 0);

    a.stop().await;
    b.stop().await;
    // Deregistered on shutdown.
    assert_eq!(workers.get("worker-a").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_run_loses_and_duplicates_nothing() {
    let mut nats = TestNats::start_with(true);
    let config = WorkerConfig::for_tests();
    // Down for longer than a publish may wait for its ack: the batch in flight is
    // retried however soon the client reconnects (its reconnect delays are jittered).
    let outage = config.publish_timeout + Duration::from_millis(500);
    let worker = TestWorker::start(&nats, config, vec![]).await;
    let js = nats.jetstream().await;
    let mut handle = worker
        .worker
        .start_run(request(
            "log_storm",
            json!({"lines_per_second": 20_000, "duration_ms": 4000, "line_bytes": 80}),
        ))
        .await
        .unwrap();
    first_batch_seen(&js, &handle.run_id).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.server.kill();
    tokio::time::sleep(outage).await;
    nats.server.restart().expect("restart nats-server");
    assert_eq!(handle.finished().await, RunState::Completed);
    let js = nats.jetstream().await;
    let out = read_run(&js, &handle.run_id, READ_TIMEOUT).await.unwrap();
    assert_gapless(&out, 80_001);
    assert_eq!(
        out.messages,
        out.batches.len(),
        "a retried batch was stored twice"
    );
    let retries = worker
        .worker
        .stats()
        .retries
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{} messages, {} batches, {retries} retried publishes",
        out.messages,
        out.batches.len()
    );
    assert!(retries > 0, "the outage was not noticed");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_log_blocks_within_the_memory_bound_then_everything_flows() {
    let mut nats = TestNats::start();
    let limit = 2 << 20;
    let config = WorkerConfig {
        max_pending_bytes: limit,
        ..WorkerConfig::for_tests()
    };
    let worker = TestWorker::start(&nats, config, vec![]).await;
    let js = nats.jetstream().await;
    // 100 000 lines of ~200 bytes: ~26 MB of output, 13 times the bound.
    let mut handle = worker
        .worker
        .start_run(request(
            "log_storm",
            json!({"lines_per_second": 50_000, "duration_ms": 2000, "line_bytes": 200, "threads": 4}),
        ))
        .await
        .unwrap();
    first_batch_seen(&js, &handle.run_id).await;
    nats.server.kill();
    let budget = worker.worker.budget();
    // The experiment fills the budget and then blocks in log().
    wait_for("log() to block", Duration::from_secs(30), || async {
        (budget.blocked_calls() > 0).then_some(())
    })
    .await
    .unwrap();
    // A publish acknowledged as NATS died may still free some room: once the budget
    // stands still, it stays still for a second (it never would if output kept growing).
    let mut used = budget.used();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = budget.used();
        if std::mem::replace(&mut used, now) == now {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "output kept growing while NATS was down"
        );
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        budget.used(),
        used,
        "output kept growing while NATS was down"
    );
    assert!(budget.used() > limit / 2);
    nats.server.restart().unwrap();
    assert_eq!(handle.finished().await, RunState::Completed);
    assert!(
        budget.peak() <= limit,
        "peak {} over the bound {limit}",
        budget.peak()
    );
    assert_eq!(budget.used(), 0);
    let js = nats.jetstream().await;
    let out = read_run(&js, &handle.run_id, READ_TIMEOUT).await.unwrap();
    assert_gapless(&out, 100_001);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_declared_idempotently_and_updated() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let mut config = nats.config();
    ensure_topology(&js, &config).await.unwrap();
    config.runs_max_age = Duration::from_secs(3600);
    ensure_topology(&js, &config).await.unwrap();
    let info = js
        .get_stream(names::RUNS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(info.max_age, Duration::from_secs(3600));
    assert_eq!(info.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.subjects, vec![names::RUNS_SUBJECTS.to_string()]);
    let requests = js
        .get_stream(names::REQUESTS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(
        requests.retention,
        async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    );
    let names_seen: Vec<String> = js
        .stream_names()
        .map(|n| n.unwrap())
        .collect::<Vec<_>>()
        .await;
    for s in [
        "ATHANOR_RUNS",
        "ATHANOR_REQUESTS",
        "ATHANOR_DLQ",
        "KV_athanor_workers",
        "KV_athanor_control",
    ] {
        assert!(
            names_seen.iter().any(|n| n == s),
            "{s} missing from {names_seen:?}"
        );
    }
}
