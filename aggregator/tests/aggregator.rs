//! The aggregator against a real nats-server and a real database (SQLite in a temp
//! dir; PostgreSQL when `ATHANOR_TEST_DATABASE_URL` is set): exact rows, whatever the
//! delivery.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use athanor_aggregator::store::{store, Incoming, Written};
use athanor_aggregator::{Aggregator, AggregatorConfig, AggregatorStats};
use athanor_schemas::entities::{run_logs, run_metric_summaries, run_metrics, run_results, runs};
use athanor_schemas::requests::RunRequest;
use athanor_schemas::{
    codec, names, now_micros, Batch, Final, Level, LogLine, MetricRecord, MetricValue, Progress,
    ResultRecord, RunInfo, RunState, Status,
};
use athanor_testkit::tmpfs::Tmpfs;
use athanor_testkit::{read_run, wait_for, TestDb, TestNats};
use athanor_workers::{builtin, Worker, WorkerConfig};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(90);

struct Running {
    aggregator: Aggregator,
    stop: CancellationToken,
}

impl Running {
    async fn start(nats: &TestNats, db: &TestDb) -> Self {
        Running::start_with(nats, db, AggregatorConfig::for_tests()).await
    }

    async fn start_with(nats: &TestNats, db: &TestDb, config: AggregatorConfig) -> Self {
        athanor_testkit::init_tracing();
        let stop = CancellationToken::new();
        let aggregator = Aggregator::start(config, nats.config(), db.db.clone(), stop.clone())
            .await
            .unwrap();
        Running { aggregator, stop }
    }

    fn stats(&self) -> Arc<AggregatorStats> {
        self.aggregator.stats().clone()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.aggregator.wait().await;
    }
}

async fn start_worker(nats: &TestNats) -> (Worker, CancellationToken) {
    let stop = CancellationToken::new();
    let worker = Worker::start(
        WorkerConfig::for_tests(),
        nats.config(),
        builtin::all(),
        stop.clone(),
    )
    .await
    .unwrap();
    (worker, stop)
}

fn request(experiment: &str, config: serde_json::Value) -> RunRequest {
    RunRequest {
        run_id: names::new_run_id(),
        experiment: experiment.into(),
        config,
        instance_id: None,
        requested_at: now_micros(),
    }
}

async fn wait_terminal(db: &DatabaseConnection, run_id: &str) -> runs::Model {
    wait_for(
        "the run to be terminal in the database",
        DEADLINE,
        || async {
            runs::Entity::find_by_id(run_id.to_string())
                .one(db)
                .await
                .unwrap()
                .filter(|r| !matches!(r.status.as_str(), "pending" | "running"))
        },
    )
    .await
    .unwrap()
}

async fn logs_of(db: &DatabaseConnection, run_id: &str) -> Vec<run_logs::Model> {
    run_logs::Entity::find()
        .filter(run_logs::Column::RunId.eq(run_id))
        .order_by_asc(run_logs::Column::Seq)
        .all(db)
        .await
        .unwrap()
}

async fn results_of(db: &DatabaseConnection, run_id: &str) -> Vec<(String, String, i64)> {
    run_results::Entity::find()
        .filter(run_results::Column::RunId.eq(run_id))
        .order_by_asc(run_results::Column::Key)
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value, r.seq))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_line_run_is_stored_exactly_once_with_its_content() {
    let nats = TestNats::start();
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    let (worker, worker_stop) = start_worker(&nats).await;
    let mut handle = worker
        .start_run(request("log_storm", json!({"lines_per_second": 50_000, "duration_ms": 2000, "line_bytes": 100, "with_metadata": true})))
        .await
        .unwrap();
    assert_eq!(handle.finished().await, RunState::Completed);
    let run = wait_terminal(&db.db, &handle.run_id).await;
    assert_eq!(run.status, "completed");
    assert_eq!(run.lines, 100_001);
    assert_eq!(run.experiment, "log_storm");
    assert_eq!(run.final_batches, Some(run.batches));
    assert_eq!(run.last_batch_seq, Some(run.batches - 1));
    assert!(run.finished_at.unwrap() >= run.started_at.unwrap());
    assert_eq!(
        (run.progress_current, run.progress_total),
        (Some(100_000), Some(100_000))
    );
    let stored = logs_of(&db.db, &handle.run_id).await;
    assert_eq!(stored.len(), 100_001);
    // Exactly what the worker published, line by line.
    let published = read_run(&nats.jetstream().await, &handle.run_id, DEADLINE)
        .await
        .unwrap();
    assert_eq!(published.lines().len(), stored.len());
    for (row, line) in stored.iter().zip(published.lines()) {
        assert_eq!(row.seq, line.seq as i64);
        assert_eq!(
            (row.ts, row.level.as_str(), &row.message),
            (line.ts, line.level.as_str(), &line.message)
        );
        assert_eq!(
            row.metadata
                .as_ref()
                .map(|m| serde_json::from_str::<serde_json::Value>(m).unwrap()),
            line.metadata
        );
    }
    assert_eq!(run.last_stream_seq.unwrap() as usize, published.messages);
    let results = results_of(&db.db, &handle.run_id).await;
    assert_eq!(
        results.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["achieved_lines_per_second", "lines_emitted"]
    );
    assert_eq!(results[1].1, "100000");
    worker_stop.cancel();
    worker.wait().await;
    aggregator.stop().await;
    db.close().await;
}

/// A synthetic run: `n` batches of 50 lines, the key `best` recorded in every batch
/// (the newest seq must win), metric points (`loss` and `odd` at the batch's step, NaN
/// for an even one; `first` at step 0 again in every batch: the newest seq must win),
/// progress, a final batch.
fn synthetic_run(run_id: &str, n: u64) -> Vec<Batch> {
    (0..n)
        .map(|b| {
            let mut batch = Batch::new(run_id, b, "w-synthetic");
            if b == 0 {
                batch.run = Some(RunInfo {
                    experiment: "synthetic".into(),
                    config: json!({"k": 1}),
                    instance_id: None,
                    started_at: 1000,
                });
                batch.status = Some(Status {
                    state: RunState::Running,
                    error: None,
                    at: 1000,
                });
            }
            batch.logs = (0..50)
                .map(|i| LogLine {
                    seq: b * 50 + i,
                    ts: 2000 + (b * 50 + i) as i64,
                    level: if i % 7 == 0 { Level::Warn } else { Level::Info },
                    message: format!("line {} <b>of</b> batch {b}", b * 50 + i),
                    metadata: (i % 10 == 0).then(|| json!({"i": i})),
                })
                .collect();
            batch.results = vec![
                ResultRecord {
                    seq: 2 * b,
                    key: "best".into(),
                    value: json!(b),
                    ts: 3000 + b as i64,
                },
                ResultRecord {
                    seq: 2 * b + 1,
                    key: format!("batch_{b}"),
                    value: json!({"b": b}),
                    ts: 3000 + b as i64,
                },
            ];
            batch.metrics = vec![
                metric_record(
                    2 * b,
                    b,
                    &[
                        ("loss", 1.0 / (b + 1) as f64),
                        ("odd", if b % 2 == 0 { f64::NAN } else { b as f64 }),
                    ],
                ),
                metric_record(2 * b + 1, 0, &[("first", b as f64)]),
            ];
            batch.progress = Some(Progress {
                current: b + 1,
                total: n,
                message: Some(format!("{}/{n}", b + 1)),
                ts: 4000 + b as i64,
            });
            if b == n - 1 {
                batch.status = Some(Status {
                    state: RunState::Failed,
                    error: Some("it broke".into()),
                    at: 9000,
                });
                batch.final_ = Some(Final {
                    status: RunState::Failed,
                    batches: n,
                    lines: n * 50,
                    results: 2 * n,
                    metrics: 2 * n,
                });
            }
            batch
        })
        .collect()
}

/// A metric record of `values` at `step`, emitted at `10_000 + seq`.
fn metric_record(seq: u64, step: u64, values: &[(&str, f64)]) -> MetricRecord {
    MetricRecord {
        seq,
        step,
        ts: 10_000 + seq as i64,
        values: values
            .iter()
            .map(|(name, v)| (name.to_string(), MetricValue(*v)))
            .collect(),
    }
}

/// The rows of `run_id` in a table keyed by run.
async fn rows_of<E: EntityTrait>(
    db: &DatabaseConnection,
    run_column: E::Column,
    run_id: &str,
) -> Vec<E::Model> {
    E::find()
        .filter(run_column.eq(run_id))
        .all(db)
        .await
        .unwrap()
}

/// A run's metric points: (name, step, value, seq, ts), by name (bytes, whatever the
/// database's collation) and step.
type PointRow = (String, i64, Option<f64>, i64, i64);

async fn points_of(db: &DatabaseConnection, run_id: &str) -> Vec<PointRow> {
    let rows = db
        .query_all(athanor_connections::db::stmt(
            db.get_database_backend(),
            "SELECT s.name, m.step, m.value, m.seq, m.ts FROM run_metrics m \
             JOIN run_metric_summaries s ON s.id = m.series_id WHERE s.run_id = ?",
            vec![run_id.into()],
        ))
        .await
        .unwrap();
    let mut points: Vec<PointRow> = rows
        .iter()
        .map(|r| {
            (
                r.try_get("", "name").unwrap(),
                r.try_get("", "step").unwrap(),
                r.try_get("", "value").unwrap(),
                r.try_get("", "seq").unwrap(),
                r.try_get("", "ts").unwrap(),
            )
        })
        .collect();
    points.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    points
}

/// A run's metric summaries: (name, count, min, max, last_step, last_value, last_seq,
/// updated_at), by name (bytes).
type SummaryRow = (
    String,
    i64,
    Option<f64>,
    Option<f64>,
    i64,
    Option<f64>,
    i64,
    i64,
);

async fn summaries_of(db: &DatabaseConnection, run_id: &str) -> Vec<SummaryRow> {
    let rows =
        rows_of::<run_metric_summaries::Entity>(db, run_metric_summaries::Column::RunId, run_id)
            .await;
    let mut summaries: Vec<SummaryRow> = rows
        .into_iter()
        .map(|s| {
            (
                s.name,
                s.count,
                s.min,
                s.max,
                s.last_step,
                s.last_value,
                s.last_seq,
                s.updated_at,
            )
        })
        .collect();
    summaries.sort_by(|a, b| a.0.cmp(&b.0));
    summaries
}

/// A rollup block as compared: (count, min, max, last_step, last_ts, last_value, last_seq).
type BlockRow = (i64, Option<f64>, Option<f64>, i64, i64, Option<f64>, i64);

/// Checks every rollup block of the run against its stored points: the same blocks
/// exist, each with the count, extremes and last point of the points of its steps
/// (an extreme's step: one holding that value).
async fn assert_rollups_match_points(db: &DatabaseConnection, run_id: &str) {
    use athanor_schemas::metric::rollup;
    use std::collections::BTreeMap;
    let points = points_of(db, run_id).await;
    let mut expected: BTreeMap<(String, i32, i64), BlockRow> = BTreeMap::new();
    for series in points.chunk_by(|a, b| a.0 == b.0) {
        let name = &series[0].0;
        let blocks = rollup::blocks(
            series
                .iter()
                .map(|p| (p.1 as u64, p.4, MetricValue(p.2.unwrap_or(f64::NAN)))),
        );
        for ((level, block), b) in blocks {
            let at = |step: u64| series.iter().find(|p| p.1 == step as i64).unwrap();
            let stored = |v: MetricValue| Some(v.0).filter(|v| !v.is_nan());
            expected.insert(
                (name.clone(), level as i32, block as i64),
                (
                    b.count as i64,
                    stored(b.min),
                    stored(b.max),
                    b.step as i64,
                    b.ts,
                    stored(b.value),
                    at(b.step).3,
                ),
            );
        }
    }
    let rows = db
        .query_all(athanor_connections::db::stmt(
            db.get_database_backend(),
            "SELECT s.name, r.level, r.block, r.count, r.min, r.min_step, r.max, r.max_step, r.last_step, \
             r.last_ts, r.last_value, r.last_seq \
             FROM run_metric_rollups r JOIN run_metric_summaries s ON s.id = r.series_id WHERE s.run_id = ?",
            vec![run_id.into()],
        ))
        .await
        .unwrap();
    let mut found = BTreeMap::new();
    let value_at = |name: &str, step: i64| {
        points
            .iter()
            .find(|p| p.0 == name && p.1 == step)
            .map(|p| p.2)
    };
    for row in rows {
        let name: String = row.try_get("", "name").unwrap();
        let min: Option<f64> = row.try_get("", "min").unwrap();
        let max: Option<f64> = row.try_get("", "max").unwrap();
        for (extreme, column) in [(min, "min_step"), (max, "max_step")] {
            if extreme.is_some() {
                let step: i64 = row.try_get("", column).unwrap();
                assert_eq!(
                    value_at(&name, step),
                    Some(extreme),
                    "{run_id} {name}: {column}"
                );
            }
        }
        found.insert(
            (
                name,
                row.try_get::<i32>("", "level").unwrap(),
                row.try_get::<i64>("", "block").unwrap(),
            ),
            (
                row.try_get::<i64>("", "count").unwrap(),
                min,
                max,
                row.try_get::<i64>("", "last_step").unwrap(),
                row.try_get::<i64>("", "last_ts").unwrap(),
                row.try_get::<Option<f64>>("", "last_value").unwrap(),
                row.try_get::<i64>("", "last_seq").unwrap(),
            ),
        );
    }
    assert_eq!(found, expected, "{run_id}: rollup blocks");
}

async fn publish_raw(js: &jetstream::Context, subject: &str, payload: Vec<u8>, msg_id: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::headers::MSG_ID, msg_id);
    js.publish_with_headers(subject.to_string(), headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The aggregator's durable consumer of `ATHANOR_RUNS`.
async fn aggregator_consumer(js: &jetstream::Context) -> jetstream::consumer::PullConsumer {
    js.get_stream(names::RUNS_STREAM)
        .await
        .unwrap()
        .get_consumer("aggregator")
        .await
        .unwrap()
}

/// Waits until the consumer has nothing pending or unacknowledged (and its ack floor is
/// `floor`, when given).
async fn wait_settled(consumer: &jetstream::consumer::PullConsumer, floor: Option<u64>) {
    wait_for("every message settled", DEADLINE, || {
        let consumer = consumer.clone();
        async move {
            let info = consumer.clone().info().await.unwrap().clone();
            (info.num_ack_pending == 0
                && info.num_pending == 0
                && floor.is_none_or(|f| info.ack_floor.stream_sequence == f))
            .then_some(())
        }
    })
    .await
    .unwrap();
}

/// Everything the database says about a run, without its id.
async fn snapshot(db: &DatabaseConnection, run_id: &str) -> serde_json::Value {
    let run = runs::Entity::find_by_id(run_id.to_string())
        .one(db)
        .await
        .unwrap()
        .unwrap();
    let logs: Vec<_> = logs_of(db, run_id)
        .await
        .into_iter()
        .map(|l| (l.seq, l.ts, l.level, l.message, l.metadata))
        .collect();
    json!({
        "status": run.status, "error": run.error, "experiment": run.experiment, "config": run.config,
        "lines": run.lines, "results": run.results, "batches": run.batches, "last_batch_seq": run.last_batch_seq,
        "final_batches": run.final_batches, "finished_at": run.finished_at, "started_at": run.started_at,
        "progress": [run.progress_current, run.progress_total, run.progress_message, run.progress_at],
        "logs": logs, "result_rows": results_of(db, run_id).await,
        "metric_points": points_of(db, run_id).await, "metric_summaries": summaries_of(db, run_id).await,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_disorder_leave_the_same_database() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    // Run A in order; run B the same batches in reverse order, each published twice
    // under different message ids so the broker keeps both copies.
    let (a, b) = ("run-in-order", "run-shuffled");
    for batch in synthetic_run(a, 12) {
        publish_raw(
            &js,
            &names::run_subject(a),
            codec::encode(&batch).payload,
            &format!("{a}.{}", batch.batch_seq),
        )
        .await;
    }
    for batch in synthetic_run(b, 12).into_iter().rev() {
        let payload = codec::encode(&batch).payload;
        publish_raw(
            &js,
            &names::run_subject(b),
            payload.clone(),
            &format!("{b}.{}", batch.batch_seq),
        )
        .await;
        publish_raw(
            &js,
            &names::run_subject(b),
            payload,
            &format!("{b}.{}.again", batch.batch_seq),
        )
        .await;
    }
    wait_terminal(&db.db, a).await;
    wait_terminal(&db.db, b).await;
    let stats = aggregator.stats();
    wait_for("all duplicates seen", DEADLINE, || async {
        (AggregatorStats::get(&stats.duplicates) == 12).then_some(())
    })
    .await
    .unwrap();
    let snap_a = snapshot(&db.db, a).await;
    assert_eq!(snap_a, snapshot(&db.db, b).await);
    assert_eq!(snap_a["status"], "failed");
    assert_eq!(snap_a["error"], "it broke");
    assert_eq!(snap_a["lines"], 600);
    assert_eq!(snap_a["logs"].as_array().unwrap().len(), 600);
    assert_eq!(snap_a["finished_at"], 9000);
    assert_eq!(snap_a["progress"], json!([12, 12, "12/12", 4011]));
    let results = snap_a["result_rows"].as_array().unwrap();
    assert_eq!(results.len(), 13);
    assert_eq!(results[0], json!(["batch_0", "{\"b\":0}", 1]));
    assert_eq!(results.last().unwrap(), &json!(["best", "11", 22]));
    assert_eq!(snap_a["metric_points"].as_array().unwrap().len(), 25);
    assert_eq!(
        snap_a["metric_summaries"],
        json!([
            ["first", 1, 11.0, 11.0, 0, 11.0, 23, 10_023],
            ["loss", 12, 1.0 / 12.0, 1.0, 11, 1.0 / 12.0, 22, 10_022],
            ["odd", 12, 1.0, 11.0, 11, 11.0, 22, 10_022],
        ])
    );
    assert_eq!(AggregatorStats::get(&stats.batches), 24);

    // Republishing the whole of run A again (new ids) changes nothing.
    for batch in synthetic_run(a, 12) {
        publish_raw(
            &js,
            &names::run_subject(a),
            codec::encode(&batch).payload,
            &format!("{a}.{}.third", batch.batch_seq),
        )
        .await;
    }
    wait_for("the republished batches", DEADLINE, || async {
        (AggregatorStats::get(&stats.duplicates) == 24).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(snapshot(&db.db, a).await, snap_a);
    assert_eq!(run_logs::Entity::find().count(&db.db).await.unwrap(), 1200);
    aggregator.stop().await;
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_messages_are_dead_lettered_and_the_rest_is_stored() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    let subject = names::run_subject("victim");
    let good = codec::encode(&synthetic_run("victim", 1)[0]).payload;
    let mut huge = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    huge.set_pledged_src_size(Some(1 << 30)).unwrap();
    std::io::Write::write_all(&mut huge, &[b'a'; 1024]).unwrap();
    std::io::Write::flush(&mut huge).unwrap();
    let mut future = synthetic_run("victim", 1).remove(0);
    future.v = "2.0".into();
    // Valid zstd around JSON whose message holds bytes that are not UTF-8.
    let mut json = serde_json::to_vec(&synthetic_run("victim", 1)[0]).unwrap();
    let at = json.windows(4).position(|w| w == b"line").unwrap();
    json[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    let invalid_utf8 = zstd::bulk::compress(&json, 3).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"definitely not zstd".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("too_large", huge.get_ref().clone()),
        ("unknown_version", codec::encode(&future).payload),
        ("malformed", invalid_utf8),
        (
            "wrong_subject",
            codec::encode(&synthetic_run("someone-else", 1)[0]).payload,
        ),
    ];
    for (i, (_, payload)) in cases.iter().enumerate() {
        publish_raw(&js, &subject, payload.clone(), &format!("bad-{i}")).await;
    }
    for batch in synthetic_run("survivor", 5) {
        publish_raw(
            &js,
            &names::run_subject("survivor"),
            codec::encode(&batch).payload,
            &format!("survivor.{}", batch.batch_seq),
        )
        .await;
    }
    let run = wait_terminal(&db.db, "survivor").await;
    assert_eq!(run.lines, 250);
    let stats = aggregator.stats();
    wait_for("dead letters", DEADLINE, || async {
        (AggregatorStats::get(&stats.dead_lettered) == 6).then_some(())
    })
    .await
    .unwrap();
    let mut dlq = js.get_stream(names::DLQ_STREAM).await.unwrap();
    for (i, (kind, payload)) in cases.iter().enumerate() {
        let msg = dlq
            .get_last_raw_message_by_subject(&format!("athanor.dlq.{kind}"))
            .await
            .unwrap();
        assert_eq!(&msg.payload[..], &payload[..], "{kind}: payload kept");
        let headers = msg.headers;
        assert_eq!(
            headers.get("Nats-Msg-Id").unwrap().as_str(),
            format!("bad-{i}"),
            "{kind}: original headers kept"
        );
        assert_eq!(
            headers.get("Athanor-Dlq-Subject").unwrap().as_str(),
            subject
        );
        assert!(!headers
            .get("Athanor-Dlq-Reason")
            .unwrap()
            .as_str()
            .is_empty());
    }
    let reason = dlq
        .get_last_raw_message_by_subject("athanor.dlq.too_large")
        .await
        .unwrap()
        .headers;
    assert_eq!(
        reason.get("Athanor-Dlq-Reason").unwrap().as_str(),
        "batch too large: 1073741824 bytes decompressed (declared), limit 33554432"
    );
    assert_eq!(dlq.info().await.unwrap().state.messages, 6);
    // Nothing of the bad messages reached the database; the consumer has nothing pending.
    assert!(runs::Entity::find_by_id("victim".to_string())
        .one(&db.db)
        .await
        .unwrap()
        .is_none());
    let consumer = aggregator_consumer(&js).await;
    wait_settled(&consumer, Some(11)).await;
    aggregator.stop().await;
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_aggregators_store_each_line_once() {
    let nats = TestNats::start();
    let db = TestDb::new().await;
    let first = Running::start(&nats, &db).await;
    let second = Running::start(&nats, &db).await;
    let (worker, worker_stop) = start_worker(&nats).await;
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(
            worker
                .start_run(request(
                    "log_storm",
                    json!({"lines_per_second": 20_000, "duration_ms": 1500, "line_bytes": 80}),
                ))
                .await
                .unwrap(),
        );
    }
    for handle in &mut handles {
        assert_eq!(handle.finished().await, RunState::Completed);
        let run = wait_terminal(&db.db, &handle.run_id).await;
        assert_eq!((run.status.as_str(), run.lines), ("completed", 30_001));
        let seqs: Vec<i64> = logs_of(&db.db, &handle.run_id)
            .await
            .iter()
            .map(|l| l.seq)
            .collect();
        assert!(seqs.iter().copied().eq(0..30_001));
    }
    assert_eq!(
        run_logs::Entity::find().count(&db.db).await.unwrap(),
        4 * 30_001
    );
    let (a, b) = (first.stats(), second.stats());
    assert_eq!(
        AggregatorStats::get(&a.lines) + AggregatorStats::get(&b.lines),
        4 * 30_001
    );
    worker_stop.cancel();
    worker.wait().await;
    first.stop().await;
    second.stop().await;
    db.close().await;
}

/// `aggregator.writers` 4: four transactions in flight at once, of runs logging and
/// stepping metrics together (small transactions, so they do overlap), store every line
/// and every point once, with exact summaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_in_flight_store_each_line_and_point_once() {
    let nats = TestNats::start();
    let db = TestDb::new().await;
    let aggregator = Running::start_with(
        &nats,
        &db,
        AggregatorConfig {
            writers: 4,
            max_batch_messages: 2,
            ..AggregatorConfig::for_tests()
        },
    )
    .await;
    let (worker, worker_stop) = start_worker(&nats).await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        let lines = json!({"lines_per_second": 20_000, "duration_ms": 1000, "line_bytes": 80});
        handles.push(worker.start_run(request("log_storm", lines)).await.unwrap());
        let points =
            json!({"metrics": 3, "steps": 20_000, "steps_per_second": 20_000, "log_steps": false});
        handles.push(
            worker
                .start_run(request("metric_storm", points))
                .await
                .unwrap(),
        );
    }
    for (i, handle) in handles.iter_mut().enumerate() {
        assert_eq!(handle.finished().await, RunState::Completed);
        let run = wait_terminal(&db.db, &handle.run_id).await;
        assert_eq!(run.final_batches, Some(run.batches), "{run:?}");
        if i % 2 == 0 {
            assert_eq!(run.lines, 20_001, "{run:?}");
            let seqs: Vec<i64> = logs_of(&db.db, &handle.run_id)
                .await
                .iter()
                .map(|l| l.seq)
                .collect();
            assert!(seqs.iter().copied().eq(0..20_001));
        } else {
            let points = points_of(&db.db, &handle.run_id).await;
            assert_eq!(points.len(), 3 * 20_000);
            for (series, name) in points.chunks(20_000).zip(["m0", "m1", "m2"]) {
                assert!(series.iter().all(|p| p.0 == name), "{name}");
                assert!(series.iter().map(|p| p.1).eq(0..20_000), "{name}");
            }
            let summaries = summaries_of(&db.db, &handle.run_id).await;
            assert_eq!(summaries.len(), 3);
            for summary in &summaries {
                assert_eq!((summary.1, summary.4), (20_000, 19_999), "{summary:?}");
            }
            assert_rollups_match_points(&db.db, &handle.run_id).await;
        }
    }
    assert_eq!(AggregatorStats::get(&aggregator.stats().lines), 3 * 20_001);
    worker_stop.cancel();
    worker.wait().await;
    aggregator.stop().await;
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_worker_vanished_becomes_lost_and_keeps_its_output() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    // Two batches of a run from a worker that never registered (or died), no final.
    for batch in synthetic_run("orphan", 3).into_iter().take(2) {
        publish_raw(
            &js,
            &names::run_subject("orphan"),
            codec::encode(&batch).payload,
            &format!("orphan.{}", batch.batch_seq),
        )
        .await;
    }
    let run = wait_terminal(&db.db, "orphan").await;
    assert_eq!(run.status, "lost");
    assert_eq!(
        run.error.as_deref(),
        Some("worker w-synthetic stopped heartbeating")
    );
    assert_eq!(logs_of(&db.db, "orphan").await.len(), 100);
    // Its final batch arriving late still settles it.
    let last = synthetic_run("orphan", 3).pop().unwrap();
    publish_raw(
        &js,
        &names::run_subject("orphan"),
        codec::encode(&last).payload,
        "orphan.2",
    )
    .await;
    wait_for("the final status", DEADLINE, || async {
        let r = runs::Entity::find_by_id("orphan".to_string())
            .one(&db.db)
            .await
            .unwrap()
            .unwrap();
        (r.status == "failed").then_some(())
    })
    .await
    .unwrap();
    aggregator.stop().await;
    db.close().await;
}

/// The database refuses writes for a while (SQLite: another connection holds the
/// write lock; PostgreSQL: connections refused). Nothing is acked in the
/// meantime, and everything is stored once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_unavailable_then_back_nothing_acked_early_nothing_lost() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    let outage = db.outage().await;
    for batch in synthetic_run("patient", 6) {
        publish_raw(
            &js,
            &names::run_subject("patient"),
            codec::encode(&batch).payload,
            &format!("patient.{}", batch.batch_seq),
        )
        .await;
    }
    let stats = aggregator.stats();
    wait_for("failed write attempts", DEADLINE, || async {
        (AggregatorStats::get(&stats.retries) >= 2).then_some(())
    })
    .await
    .unwrap();
    let consumer = aggregator_consumer(&js).await;
    let info = consumer.clone().info().await.unwrap().clone();
    assert_eq!(
        info.ack_floor.stream_sequence, 0,
        "acked while the database was unavailable"
    );
    assert_eq!(info.num_ack_pending, 6);
    outage.end().await;
    let run = wait_terminal(&db.db, "patient").await;
    assert_eq!(
        (run.status.as_str(), run.lines, run.batches),
        ("failed", 300, 6)
    );
    wait_settled(&consumer, Some(6)).await;
    aggregator.stop().await;
    db.close().await;
}

/// The write rules across transactions, without NATS: each batch of a run in a
/// transaction of its own, newest first, gives the same rows as one in-order
/// transaction; a line holding NUL and markup is stored (PostgreSQL: NUL as U+2400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_per_transaction_in_reverse_gives_the_same_rows() {
    let db = TestDb::new().await;
    let mut in_order = synthetic_run("tx-in-order", 8);
    in_order[3].logs[0].message = "nul:\0:<script>alert(1)</script>".into();
    let written = store(
        &db.db,
        in_order
            .into_iter()
            .enumerate()
            .map(|(i, batch)| Incoming {
                batch,
                stream_seq: i as u64 + 1,
            })
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!((written.batches, written.lines), (8, 400));
    // What it announces on athanor.lifecycle.<run_id>, once committed.
    let announced: Vec<(&str, &str)> = written
        .changes
        .iter()
        .map(|c| (c.run_id.as_str(), c.status.as_str()))
        .collect();
    assert_eq!(
        announced,
        [("tx-in-order", "running"), ("tx-in-order", "failed")]
    );
    let mut reversed = synthetic_run("tx-reversed", 8);
    reversed[3].logs[0].message = "nul:\0:<script>alert(1)</script>".into();
    for (i, batch) in reversed.into_iter().enumerate().rev() {
        let stored = store(
            &db.db,
            vec![Incoming {
                batch,
                stream_seq: i as u64 + 1,
            }],
        )
        .await
        .unwrap();
        assert_eq!(stored.batches, 1);
        // Batch 0 (the run's start) is stored last and completes the run.
        let announced: Vec<&str> = stored.changes.iter().map(|c| c.status.as_str()).collect();
        let expected: &[&str] = if i == 0 { &["running", "failed"] } else { &[] };
        assert_eq!(announced, expected);
        let run = runs::Entity::find_by_id("tx-reversed".to_string())
            .one(&db.db)
            .await
            .unwrap()
            .unwrap();
        // Batch 0 comes last: until then nothing is stored without a gap.
        assert_eq!(run.last_batch_seq, if i == 0 { Some(7) } else { None });
        assert_eq!(run.status, if i == 0 { "failed" } else { "running" });
    }
    let expected = snapshot(&db.db, "tx-in-order").await;
    assert_eq!(snapshot(&db.db, "tx-reversed").await, expected);
    assert_eq!(expected["progress"], json!([8, 8, "8/8", 4007]));
    let run = runs::Entity::find_by_id("tx-reversed".to_string())
        .one(&db.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.last_stream_seq, Some(8));
    let line = &logs_of(&db.db, "tx-reversed").await[150];
    let nul = if db.is_postgres() { "\u{2400}" } else { "\0" };
    assert_eq!(line.message, format!("nul:{nul}:<script>alert(1)</script>"));
    // Stored again: absorbed.
    let again = store(
        &db.db,
        synthetic_run("tx-reversed", 8)
            .into_iter()
            .map(|batch| Incoming {
                batch,
                stream_seq: 99,
            })
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!((again.batches, again.duplicates), (0, 8));
    assert_eq!(snapshot(&db.db, "tx-reversed").await, expected);
    db.close().await;
}

/// SQLite: the write-ahead log is copied into the database file by the aggregator's
/// own checkpointer, not by the writer (whose automatic checkpoint waits for 4 096
/// pages of 16 KiB, far more than this run writes): the file grows while the
/// aggregator runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_checkpointed_off_the_writer() {
    let db = TestDb::new().await;
    if db.is_postgres() {
        return db.close().await;
    }
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let path = db.config.url().trim_start_matches("sqlite://").to_string();
    let size = || std::fs::metadata(&path).unwrap().len();
    let before = size();
    let page_size = db
        .db
        .query_one(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Sqlite,
            "PRAGMA page_size",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap();
    assert_eq!(page_size, 16_384, "a new database file gets 16 KiB pages");
    let aggregator = Running::start(&nats, &db).await;
    let run = "run-checkpointed";
    for batch in synthetic_run(run, 200) {
        publish_raw(
            &js,
            &names::run_subject(run),
            codec::encode(&batch).payload,
            &format!("{run}.{}", batch.batch_seq),
        )
        .await;
    }
    wait_terminal(&db.db, run).await;
    assert_eq!(logs_of(&db.db, run).await.len(), 200 * 50);
    let wal = std::fs::metadata(format!("{path}-wal")).unwrap().len();
    assert!(
        wal < 4096 * 16_384,
        "the WAL ({wal} bytes) stays under the writer's threshold"
    );
    // 10 000 lines of ~30 bytes: at least 300 KB more in the database file itself.
    athanor_testkit::wait_for("the database file to hold the lines", DEADLINE, || async {
        (size() > before + 300_000).then_some(())
    })
    .await
    .unwrap();
    aggregator.stop().await;
    db.close().await;
}

/// While the aggregator commits transactions back to back, another writer of the same
/// process (the gateway starting a run, say) still gets its turn: with SQLite's lock
/// alone it would poll for a free moment and, with the tests' 500 ms busy timeout,
/// fail with "database is locked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_writers_get_a_turn_between_back_to_back_transactions() {
    use athanor_connections::db::{stmt, write_turn};
    use std::sync::atomic::{AtomicU64, Ordering};
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let committed = Arc::new(AtomicU64::new(0));
    let hammer = {
        let (db, stop, committed) = (db.db.clone(), stop.clone(), committed.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let run = format!("hammer-{}", committed.load(Ordering::Relaxed));
                // 5 000 lines: the SQLite lock is held for milliseconds at a time.
                let incoming = synthetic_run(&run, 100)
                    .into_iter()
                    .map(|batch| Incoming {
                        batch,
                        stream_seq: 1,
                    })
                    .collect();
                store(&db, incoming).await.unwrap();
                committed.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let backend = db.db.get_database_backend();
    let mut seen = 0;
    for i in 0..20 {
        // Each write goes in after another aggregator transaction: while it writes
        // back to back.
        seen = wait_for("another aggregator transaction", DEADLINE, || async {
            let now = committed.load(Ordering::Relaxed);
            (now > seen).then_some(now)
        })
        .await
        .unwrap();
        let _turn = write_turn(&db.db).await;
        db.db
            .execute(stmt(
                backend,
                "INSERT INTO instances (id, name, experiment, config, created_at, updated_at) \
                 VALUES (?, ?, 'echo', '{}', 0, 0)",
                vec![format!("i-{i}").into(), format!("instance {i}").into()],
            ))
            .await
            .unwrap_or_else(|e| panic!("write {i} while the aggregator writes: {e}"));
    }
    stop.cancel();
    hammer.await.unwrap();
    let instances: Vec<_> = athanor_schemas::entities::instances::Entity::find()
        .all(&db.db)
        .await
        .unwrap();
    assert_eq!(instances.len(), 20);
    db.close().await;
}

/// A batch of `run_id` holding only metric records.
fn metric_batch(run_id: &str, batch_seq: u64, records: Vec<MetricRecord>) -> Batch {
    let mut batch = Batch::new(run_id, batch_seq, "w-metrics");
    batch.metrics = records;
    batch
}

/// Stores `batches` in one transaction.
async fn store_batches(db: &DatabaseConnection, batches: Vec<Batch>) -> Written {
    let incoming = batches
        .into_iter()
        .map(|batch| Incoming {
            stream_seq: batch.batch_seq + 1,
            batch,
        })
        .collect();
    store(db, incoming).await.unwrap()
}

fn point(name: &str, step: i64, value: Option<f64>, seq: i64) -> PointRow {
    (name.to_string(), step, value, seq, 10_000 + seq)
}

/// Every point as sent (NaN as NULL, ±infinity as such, a name holding NUL: one series
/// over its two records, on PostgreSQL too, where the NUL is stored as ␀), and the
/// summaries moved by a second transaction: count added, extremes widened (NULL of an
/// all-NaN series replaced, never replacing), the last point only moved forward,
/// `updated_at` the newest point's time even when it is not the last step's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_points_are_stored_point_for_point_with_exact_summaries() {
    let db = TestDb::new().await;
    let (inf, nan) = (f64::INFINITY, f64::NAN);
    let first = metric_batch(
        "metrics",
        0,
        vec![
            metric_record(
                0,
                0,
                &[
                    ("loss", 2.5),
                    ("acc", nan),
                    ("grad", inf),
                    ("drop", 3.0),
                    ("z\0", 1.0),
                ],
            ),
            metric_record(
                1,
                1,
                &[("loss", -1.0), ("acc", nan), ("grad", -inf), ("z\0", 2.0)],
            ),
            metric_record(2, 5, &[("loss", nan), ("acc", nan)]),
        ],
    );
    let written = store_batches(&db.db, vec![first]).await;
    assert_eq!((written.batches, written.metrics), (1, 11));
    let nul = if db.is_postgres() { "z\u{2400}" } else { "z\0" };
    let nul_summary = (
        nul.to_string(),
        2,
        Some(1.0),
        Some(2.0),
        1,
        Some(2.0),
        1,
        10_001,
    );
    assert_eq!(
        summaries_of(&db.db, "metrics").await,
        [
            ("acc".into(), 3, None, None, 5, None, 2, 10_002),
            (
                "drop".into(),
                1,
                Some(3.0),
                Some(3.0),
                0,
                Some(3.0),
                0,
                10_000
            ),
            (
                "grad".into(),
                2,
                Some(-inf),
                Some(inf),
                1,
                Some(-inf),
                1,
                10_001
            ),
            ("loss".into(), 3, Some(-1.0), Some(2.5), 5, None, 2, 10_002),
            nul_summary.clone(),
        ]
    );
    let second = metric_batch(
        "metrics",
        1,
        vec![
            metric_record(3, 3, &[("loss", 0.5), ("grad", 1e300), ("acc", 7.0)]),
            metric_record(4, 10, &[("grad", nan), ("drop", nan)]),
        ],
    );
    let written = store_batches(&db.db, vec![second]).await;
    assert_eq!((written.batches, written.metrics), (1, 5));
    assert_eq!(
        points_of(&db.db, "metrics").await,
        [
            point("acc", 0, None, 0),
            point("acc", 1, None, 1),
            point("acc", 3, Some(7.0), 3),
            point("acc", 5, None, 2),
            point("drop", 0, Some(3.0), 0),
            point("drop", 10, None, 4),
            point("grad", 0, Some(inf), 0),
            point("grad", 1, Some(-inf), 1),
            point("grad", 3, Some(1e300), 3),
            point("grad", 10, None, 4),
            point("loss", 0, Some(2.5), 0),
            point("loss", 1, Some(-1.0), 1),
            point("loss", 3, Some(0.5), 3),
            point("loss", 5, None, 2),
            point(nul, 0, Some(1.0), 0),
            point(nul, 1, Some(2.0), 1),
        ]
    );
    assert_eq!(
        summaries_of(&db.db, "metrics").await,
        [
            ("acc".into(), 4, Some(7.0), Some(7.0), 5, None, 2, 10_003),
            ("drop".into(), 2, Some(3.0), Some(3.0), 10, None, 4, 10_004),
            ("grad".into(), 4, Some(-inf), Some(inf), 10, None, 4, 10_004),
            ("loss".into(), 4, Some(-1.0), Some(2.5), 5, None, 2, 10_003),
            nul_summary,
        ]
    );
    db.close().await;
}

/// A batch stored again (in its own transaction, or twice in one) and a run's batches
/// in reverse order leave the same points and summaries as one in-order pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_reordered_batches_write_each_point_once() {
    let db = TestDb::new().await;
    let written = store_batches(&db.db, synthetic_run("m-in-order", 6)).await;
    assert_eq!((written.batches, written.metrics), (6, 18));
    let expected_points = points_of(&db.db, "m-in-order").await;
    let expected_summaries = summaries_of(&db.db, "m-in-order").await;
    assert_eq!(expected_points.len(), 6 + 6 + 1);
    assert_eq!(
        expected_summaries,
        [
            (
                "first".into(),
                1,
                Some(5.0),
                Some(5.0),
                0,
                Some(5.0),
                11,
                10_011
            ),
            (
                "loss".into(),
                6,
                Some(1.0 / 6.0),
                Some(1.0),
                5,
                Some(1.0 / 6.0),
                10,
                10_010
            ),
            (
                "odd".into(),
                6,
                Some(1.0),
                Some(5.0),
                5,
                Some(5.0),
                10,
                10_010
            ),
        ]
    );
    for batch in synthetic_run("m-reversed", 6).into_iter().rev() {
        let again = batch.clone();
        // The batch twice in one transaction, then once more in another.
        let written = store_batches(&db.db, vec![batch.clone(), again]).await;
        assert_eq!(
            (written.batches, written.duplicates, written.metrics),
            (1, 1, 3)
        );
        let written = store_batches(&db.db, vec![batch]).await;
        assert_eq!(
            (written.batches, written.duplicates, written.metrics),
            (0, 1, 0)
        );
    }
    assert_eq!(points_of(&db.db, "m-reversed").await, expected_points);
    assert_eq!(summaries_of(&db.db, "m-reversed").await, expected_summaries);
    assert_rollups_match_points(&db.db, "m-reversed").await;
    // The whole in-order run again: nothing changes.
    let written = store_batches(&db.db, synthetic_run("m-in-order", 6)).await;
    assert_eq!(
        (written.batches, written.duplicates, written.metrics),
        (0, 6, 0)
    );
    assert_eq!(points_of(&db.db, "m-in-order").await, expected_points);
    assert_eq!(summaries_of(&db.db, "m-in-order").await, expected_summaries);
    assert_rollups_match_points(&db.db, "m-in-order").await;
    assert_eq!(run_metrics::Entity::find().count(&db.db).await.unwrap(), 26);
    db.close().await;
}

/// A step written again: the record with the higher seq wins whichever transaction
/// brings it, and the summary is recounted (a minimum and a maximum overwritten, the
/// last point replaced, a step repeated within one batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_step_keeps_the_highest_seq_and_recounts_the_summary() {
    let db = TestDb::new().await;
    let loss = |seq, step, v| metric_record(seq, step, &[("loss", v)]);
    // Each batch in a transaction of its own, then the series' points as (step, value,
    // seq) and its summary as (count, min, max, last_step, last_value, last_seq,
    // updated_at).
    let transactions = [
        (
            0,
            vec![loss(0, 0, 5.0), loss(1, 1, 1.0), loss(2, 2, 3.0)],
            vec![(0, Some(5.0), 0), (1, Some(1.0), 1), (2, Some(3.0), 2)],
            (3, Some(1.0), Some(5.0), 2, Some(3.0), 2, 10_002),
        ),
        // Batch 2 before batch 1: step 1 overwritten (the minimum), step 3 new.
        (
            2,
            vec![loss(6, 1, 4.0), loss(7, 3, 2.0)],
            vec![
                (0, Some(5.0), 0),
                (1, Some(4.0), 6),
                (2, Some(3.0), 2),
                (3, Some(2.0), 7),
            ],
            (4, Some(2.0), Some(5.0), 3, Some(2.0), 7, 10_007),
        ),
        // Batch 1, late: its steps 1 and 3 are older than batch 2's and lose; its step 0
        // is newer than batch 0's and wins (the maximum, 5.0, is gone).
        (
            1,
            vec![loss(3, 1, -100.0), loss(4, 0, 0.5), loss(5, 3, 9.0)],
            vec![
                (0, Some(0.5), 4),
                (1, Some(4.0), 6),
                (2, Some(3.0), 2),
                (3, Some(2.0), 7),
            ],
            (4, Some(0.5), Some(4.0), 3, Some(2.0), 7, 10_007),
        ),
        // Step 5 twice in one batch (seq 9 wins); the last step, 3, overwritten by NaN.
        (
            3,
            vec![loss(8, 5, 1.5), loss(9, 5, 2.5), loss(10, 3, f64::NAN)],
            vec![
                (0, Some(0.5), 4),
                (1, Some(4.0), 6),
                (2, Some(3.0), 2),
                (3, None, 10),
                (5, Some(2.5), 9),
            ],
            (5, Some(0.5), Some(4.0), 5, Some(2.5), 9, 10_010),
        ),
    ];
    for (batch_seq, records, points, summary) in transactions {
        let sent = records.len() as u64;
        let written =
            store_batches(&db.db, vec![metric_batch("repeats", batch_seq, records)]).await;
        assert_eq!((written.batches, written.metrics), (1, sent));
        let points: Vec<PointRow> = points
            .into_iter()
            .map(|(step, value, seq)| point("loss", step, value, seq))
            .collect();
        assert_eq!(
            points_of(&db.db, "repeats").await,
            points,
            "batch {batch_seq}"
        );
        assert_rollups_match_points(&db.db, "repeats").await;
        let (count, min, max, last_step, last_value, last_seq, updated_at) = summary;
        assert_eq!(
            summaries_of(&db.db, "repeats").await,
            [(
                "loss".into(),
                count,
                min,
                max,
                last_step,
                last_value,
                last_seq,
                updated_at
            )],
            "batch {batch_seq}"
        );
    }
    db.close().await;
}

/// PostgreSQL: a step written by another transaction at the same time (another
/// aggregator, or a second writer, storing a later batch of the run that repeats it).
/// The check before the points' COPY does not see the other's uncommitted point, so the
/// COPY waits on it and, once it commits, meets its key. That used to be a unique
/// violation, a data error: the batch went to the dead-letter stream. Now the
/// transaction is retried, stores its batch (the newer point wins, the block and the
/// summary are recounted) and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_stored_at_the_same_time_by_another_transaction_is_not_an_error() {
    let db = TestDb::new().await;
    if !db.is_postgres() {
        // SQLite takes one writer at a time, and its points are INSERT … ON CONFLICT.
        return db.close().await;
    }
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let loss = |seq, step, v| metric_record(seq, step, &[("loss", v)]);
    store_batches(
        &db.db,
        vec![metric_batch(
            "race",
            0,
            vec![loss(0, 0, 1.0), loss(1, 1, 2.0)],
        )],
    )
    .await;
    let series: i64 = db
        .db
        .query_one(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT id FROM run_metric_summaries WHERE run_id = 'race' AND name = 'loss'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "id")
        .unwrap();
    // The other transaction: step 5, older (seq 2) than the batch's (seq 3).
    let other = sea_orm::TransactionTrait::begin(&db.db).await.unwrap();
    other
        .execute_unprepared(&format!(
            "INSERT INTO run_metrics (series_id, step, value, seq, ts) VALUES ({series}, 5, 7.0, 2, 10002)"
        ))
        .await
        .unwrap();
    let aggregator = Running::start(&nats, &db).await;
    let batch = metric_batch("race", 1, vec![loss(3, 5, 3.0), loss(4, 6, 4.0)]);
    publish_raw(
        &js,
        &names::run_subject("race"),
        codec::encode(&batch).payload,
        "race.1",
    )
    .await;
    wait_for(
        "the points' COPY to wait on the other transaction",
        DEADLINE,
        || async {
            let waiting = athanor_testkit::count(
                &db.db,
                "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'COPY run_metrics%'",
            )
            .await;
            (waiting > 0).then_some(())
        },
    )
    .await
    .unwrap();
    other.commit().await.unwrap();
    let stats = aggregator.stats();
    wait_for("the batch to be stored", DEADLINE, || async {
        (AggregatorStats::get(&stats.batches) == 1).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(AggregatorStats::get(&stats.dead_lettered), 0);
    assert!(
        AggregatorStats::get(&stats.retries) >= 1,
        "the COPY met the other transaction's point"
    );
    assert_eq!(AggregatorStats::get(&stats.metrics), 2);
    assert_eq!(
        points_of(&db.db, "race").await,
        [
            point("loss", 0, Some(1.0), 0),
            point("loss", 1, Some(2.0), 1),
            point("loss", 5, Some(3.0), 3),
            point("loss", 6, Some(4.0), 4),
        ]
    );
    assert_rollups_match_points(&db.db, "race").await;
    assert_eq!(
        summaries_of(&db.db, "race").await,
        [(
            "loss".into(),
            4,
            Some(1.0),
            Some(4.0),
            6,
            Some(4.0),
            4,
            10_004
        )]
    );
    aggregator.stop().await;
    db.close().await;
}

/// A transaction holding a batch stored before beside a new batch of the same run that
/// shares a step with it: the stored one lends the new one none of its points (its
/// point at the shared step has the higher seq and stays as stored; the new batch's
/// own points are written and counted), and a name only the stored batch holds makes
/// no series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_before_beside_a_new_one_adds_none_of_its_points() {
    let db = TestDb::new().await;
    let stored = metric_batch(
        "mixed",
        0,
        vec![
            metric_record(10, 1, &[("loss", 1.0)]),
            metric_record(11, 2, &[("extra", 9.0)]),
        ],
    );
    let written = store_batches(&db.db, vec![stored.clone()]).await;
    assert_eq!((written.batches, written.metrics), (1, 2));
    // The stored batch's "extra" series is deleted by hand: were its points taken
    // again, the series would come back.
    let extra = "SELECT id FROM run_metric_summaries WHERE run_id = 'mixed' AND name = 'extra'";
    for sql in [
        format!("DELETE FROM run_metric_rollups WHERE series_id IN ({extra})"),
        format!("DELETE FROM run_metrics WHERE series_id IN ({extra})"),
        "DELETE FROM run_metric_summaries WHERE run_id = 'mixed' AND name = 'extra'".into(),
    ] {
        db.db.execute_unprepared(&sql).await.unwrap();
    }
    let new = metric_batch(
        "mixed",
        1,
        vec![
            metric_record(5, 1, &[("loss", 2.0)]),
            metric_record(6, 3, &[("loss", 3.0)]),
        ],
    );
    let written = store_batches(&db.db, vec![stored, new]).await;
    assert_eq!(
        (written.batches, written.duplicates, written.metrics),
        (1, 1, 2)
    );
    assert_eq!(
        points_of(&db.db, "mixed").await,
        [
            point("loss", 1, Some(1.0), 10),
            point("loss", 3, Some(3.0), 6)
        ]
    );
    assert_rollups_match_points(&db.db, "mixed").await;
    assert_eq!(
        summaries_of(&db.db, "mixed").await,
        [(
            "loss".into(),
            2,
            Some(1.0),
            Some(3.0),
            3,
            Some(3.0),
            6,
            10_010
        )]
    );
    db.close().await;
}

/// Several runs in one transaction, sharing series names: each run's points and
/// summaries are its own, one of them with a step stored before (recounted) while the
/// others are moved incrementally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_several_runs_in_one_transaction() {
    let db = TestDb::new().await;
    let value = |r: u64, step: u64| (100 * r + step) as f64;
    let records = |r: u64, seq: u64, steps: std::ops::Range<u64>| -> Vec<MetricRecord> {
        steps
            .enumerate()
            .map(|(i, step)| {
                metric_record(
                    seq + i as u64,
                    step,
                    &[("loss", value(r, step)), ("lr", -value(r, step))],
                )
            })
            .collect()
    };
    // Run 3 already holds steps 0..4, with values the transaction replaces.
    store_batches(&db.db, vec![metric_batch("run-3", 0, records(9, 0, 0..4))]).await;
    let written = store_batches(
        &db.db,
        vec![
            metric_batch("run-2", 1, records(2, 10, 5..10)),
            metric_batch("run-1", 0, records(1, 0, 0..10)),
            metric_batch("run-3", 1, records(3, 10, 0..10)),
            // Steps 3 and 4 of run 2 twice in this transaction: the higher seq wins.
            metric_batch("run-2", 0, records(7, 0, 0..5)),
            metric_batch("run-2", 2, records(2, 20, 3..5)),
        ],
    )
    .await;
    assert_eq!((written.batches, written.metrics), (5, 2 * 32));
    for r in 1..=3 {
        let run = format!("run-{r}");
        let points = points_of(&db.db, &run).await;
        assert_eq!(points.len(), 20, "{run}");
        for (name, sign) in [("loss", 1.0), ("lr", -1.0)] {
            let steps: Vec<(i64, Option<f64>)> = points
                .iter()
                .filter(|p| p.0 == name)
                .map(|p| (p.1, p.2))
                .collect();
            let expected: Vec<(i64, Option<f64>)> = (0..10)
                .map(|step| {
                    let from = if r == 2 && step < 3 { 7 } else { r };
                    (step as i64, Some(sign * value(from, step)))
                })
                .collect();
            assert_eq!(steps, expected, "{run} {name}");
        }
        assert_rollups_match_points(&db.db, &run).await;
    }
    // (run, loss: min, max, last, the last point's seq, the newest point's time); lr is
    // the mirror image. Run 3's earlier maximum (903) is gone: recounted, not widened.
    for (run, min, max, last, last_seq, updated_at) in [
        ("run-1", 100.0, 109.0, 109.0, 9, 10_009),
        ("run-2", 203.0, 702.0, 209.0, 14, 10_021),
        ("run-3", 300.0, 309.0, 309.0, 19, 10_019),
    ] {
        let summary = |name: &str, sign: f64, min: f64, max: f64| {
            let last = Some(sign * last);
            (
                name.to_string(),
                10,
                Some(min),
                Some(max),
                9,
                last,
                last_seq,
                updated_at,
            )
        };
        assert_eq!(
            summaries_of(&db.db, run).await,
            [
                summary("loss", 1.0, min, max),
                summary("lr", -1.0, -max, -min)
            ],
            "{run}"
        );
    }
    db.close().await;
}

/// Found by a user: SQLite on a disk that fills up. A COMMIT that failed with "database
/// or disk is full" was rolled back by SQLite, the pooled connection was reused with
/// the driver still counting that transaction, and from then on each "commit" only
/// released a savepoint while the aggregator acknowledged: 47 984 of 150 001 lines gone
/// for good. Now: every acknowledged batch is stored, without a gap, once space returns.
///
/// On the PostgreSQL pass, the same with the test's database in a tablespace on the
/// tmpfs: PostgreSQL answers "could not extend file …: No space left on device"
/// (SQLSTATE 53100), and the aggregator retries until space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_no_acknowledged_batch() {
    athanor_testkit::init_tracing();
    use athanor_migrations::MigratorTrait;
    let disk = Tmpfs::mount("256m");
    let on_pg = match std::env::var("ATHANOR_TEST_DATABASE_URL") {
        Ok(server) if !server.is_empty() => Some(PgOnDisk::create(&server, &disk).await),
        _ => None,
    };
    let config = athanor_connections::db::DatabaseConfig {
        url: Some(match &on_pg {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite://{}", disk.path().join("athanor.db").display()),
        }),
        busy_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let db = athanor_connections::db::connect(&config).await.unwrap();
    athanor_migrations::Migrator::up(&db, None).await.unwrap();
    let filler = disk.fill_leaving(4 << 20);
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let stop = CancellationToken::new();
    let aggregator = Aggregator::start(
        AggregatorConfig::for_tests(),
        nats.config(),
        db.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let (worker, worker_stop) = start_worker(&nats).await;
    let request = request(
        "log_storm",
        json!({"lines_per_second": 50_000, "duration_ms": 3000}),
    );
    let run_id = request.run_id.clone();
    let mut handle = worker.start_run(request).await.unwrap();
    let stats = aggregator.stats().clone();
    wait_for("writes failing on the full disk", DEADLINE, || async {
        (AggregatorStats::get(&stats.retries) >= 3).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(handle.finished().await, RunState::Completed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::remove_file(&filler).unwrap();
    let run = wait_terminal(&db, &run_id).await;
    assert_eq!((run.status.as_str(), run.lines), ("completed", 150_001));
    let consumer = aggregator_consumer(&js).await;
    wait_settled(&consumer, None).await;
    let seqs: Vec<i64> = logs_of(&db, &run_id).await.iter().map(|l| l.seq).collect();
    assert_eq!(
        seqs.len(),
        150_001,
        "acknowledged lines missing from the database"
    );
    assert!(
        seqs.iter().copied().eq(0..150_001),
        "a gap in the stored log"
    );
    worker_stop.cancel();
    worker.wait().await;
    stop.cancel();
    aggregator.wait().await;
    db.close().await.unwrap();
    if let Some(pg) = on_pg {
        pg.drop().await;
    }
}

/// A PostgreSQL database of the test's own in a tablespace on `disk`, on the server of
/// `ATHANOR_TEST_DATABASE_URL` (its user is a superuser: `postgres` here).
struct PgOnDisk {
    admin: sea_orm::DatabaseConnection,
    name: String,
    url: String,
}

impl PgOnDisk {
    async fn create(server: &str, disk: &Tmpfs) -> Self {
        let dir = disk.path().join("pg");
        std::fs::create_dir(&dir).unwrap();
        let chown = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success(), "chown postgres (the tests run as root)");
        let name = format!("athanor_full_{}", std::process::id());
        let admin = sea_orm::Database::connect(server).await.unwrap();
        for sql in [
            format!("CREATE TABLESPACE {name} LOCATION '{}'", dir.display()),
            format!("CREATE DATABASE {name} TABLESPACE {name}"),
        ] {
            admin.execute_unprepared(&sql).await.unwrap();
        }
        let (base, _) = server.rsplit_once('/').unwrap();
        PgOnDisk {
            admin,
            url: format!("{base}/{name}"),
            name,
        }
    }

    async fn drop(self) {
        for sql in [
            format!("DROP DATABASE {} WITH (FORCE)", self.name),
            format!("DROP TABLESPACE {}", self.name),
        ] {
            self.admin.execute_unprepared(&sql).await.unwrap();
        }
    }
}

async fn publish_with(
    js: &jetstream::Context,
    run_id: &str,
    payload: Vec<u8>,
    headers: &[(&str, String)],
) {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, value.as_str());
    }
    js.publish_with_headers(names::run_subject(run_id), map, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The headers a worker puts on batch `batch_seq` of `run_id`.
fn worker_headers(
    run_id: &str,
    batch_seq: u64,
    lines: u64,
    final_batches: Option<u64>,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        (
            names::headers::MSG_ID,
            names::batch_msg_id(run_id, batch_seq),
        ),
        (names::headers::RUN, run_id.to_string()),
        (names::headers::BATCH, batch_seq.to_string()),
        (names::headers::LINES, lines.to_string()),
    ];
    if let Some(n) = final_batches {
        headers.push((names::headers::FINAL, n.to_string()));
    }
    headers
}

async fn run_row(db: &DatabaseConnection, run_id: &str) -> runs::Model {
    runs::Entity::find_by_id(run_id.to_string())
        .one(db)
        .await
        .unwrap()
        .unwrap()
}

/// Found by a user: one batch the aggregator dead-lettered left its run `running`
/// forever, the watermark waiting for it. Now it is a known gap: the run ends, its
/// `warning` says which batch was rejected and why; a rejected final batch ends the
/// run `failed`; a good copy arriving later fills the gap. A lone surrogate escape
/// (as Python's json.dumps writes one) is no reason to reject a batch at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_batch_is_a_known_gap_and_its_run_still_ends() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    // Batch 1 of 4 is garbage.
    let batches = synthetic_run("gappy", 4);
    for batch in &batches {
        let payload = if batch.batch_seq == 1 {
            b"not a batch".to_vec()
        } else {
            codec::encode(batch).payload
        };
        let last = (batch.batch_seq == 3).then_some(4);
        publish_with(
            &js,
            "gappy",
            payload,
            &worker_headers("gappy", batch.batch_seq, 50, last),
        )
        .await;
    }
    let run = wait_terminal(&db.db, "gappy").await;
    let reason =
        "batch 1 (50 lines) was rejected: not a zstd frame: 11 bytes without the zstd magic number";
    assert_eq!(
        (
            run.status.as_str(),
            run.error.as_deref(),
            run.lines,
            run.warning.as_deref()
        ),
        ("failed", Some("it broke"), 150, Some(reason))
    );
    let seqs: Vec<i64> = logs_of(&db.db, "gappy")
        .await
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(seqs, (0..50).chain(100..200).collect::<Vec<i64>>());
    // A good copy of it, later (another message id): the gap is filled.
    publish_with(
        &js,
        "gappy",
        codec::encode(&batches[1]).payload,
        &[(names::headers::MSG_ID, "gappy.1.again".into())],
    )
    .await;
    wait_for("the gap filled", DEADLINE, || async {
        (run_row(&db.db, "gappy").await.lines == 200).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(logs_of(&db.db, "gappy").await.len(), 200);

    // The final batch is garbage: the run ends failed, saying so.
    for batch in synthetic_run("cut-short", 3) {
        let (payload, last) = if batch.batch_seq == 2 {
            (b"\x28\xb5\x2f\xfd garbage".to_vec(), Some(3))
        } else {
            (codec::encode(&batch).payload, None)
        };
        publish_with(
            &js,
            "cut-short",
            payload,
            &worker_headers("cut-short", batch.batch_seq, 50, last),
        )
        .await;
    }
    let run = wait_terminal(&db.db, "cut-short").await;
    assert_eq!((run.status.as_str(), run.lines), ("failed", 100));
    let error = run.error.unwrap();
    assert!(
        error.starts_with("its final batch 2 (50 lines) was rejected: "),
        "{error}"
    );
    assert_eq!(run.warning.as_deref(), error.strip_prefix("its final "));

    // A lone surrogate: stored, as U+FFFD.
    let mut lone = synthetic_run("lone", 1).remove(0);
    lone.logs[3].message = "PLACEHOLDER".into();
    let json = serde_json::to_string(&lone)
        .unwrap()
        .replace("PLACEHOLDER", r"bad \ud800 char");
    publish_with(
        &js,
        "lone",
        zstd::bulk::compress(json.as_bytes(), 3).unwrap(),
        &worker_headers("lone", 0, 50, Some(1)),
    )
    .await;
    let run = wait_terminal(&db.db, "lone").await;
    assert_eq!((run.lines, run.warning), (50, None));
    assert_eq!(
        logs_of(&db.db, "lone").await[3].message,
        "bad \u{fffd} char"
    );
    assert_eq!(AggregatorStats::get(&aggregator.stats().dead_lettered), 2);
    aggregator.stop().await;
    db.close().await;
}

/// Found by a user: a worker restarted with the same `worker.id` (a deployment that
/// pins ids) left the runs it had been running `running` forever — the lost-run check
/// asked only whether that id was alive. Now a quiet run its live worker does not list
/// among the runs it executes becomes `lost`; one it lists stays `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_its_restarted_worker_does_not_run_becomes_lost() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    // The new process of worker w-synthetic: registered, running "held" only.
    let workers = js.get_key_value(names::WORKERS_BUCKET).await.unwrap();
    let registration = athanor_schemas::requests::WorkerInfo {
        worker_id: "w-synthetic".into(),
        hostname: "host".into(),
        pid: 2,
        started_at: now_micros(),
        heartbeat_at: now_micros(),
        max_concurrent_runs: 4,
        experiments: Vec::new(),
        running: vec!["held".into()],
    };
    let heartbeat = tokio::spawn(async move {
        loop {
            let value = serde_json::to_vec(&registration).unwrap();
            workers.put("w-synthetic", value.into()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    // Two runs its previous process started (batches from w-synthetic, no final).
    for run_id in ["abandoned", "held"] {
        for batch in synthetic_run(run_id, 3).into_iter().take(2) {
            let msg_id = names::batch_msg_id(run_id, batch.batch_seq);
            publish_raw(
                &js,
                &names::run_subject(run_id),
                codec::encode(&batch).payload,
                &msg_id,
            )
            .await;
        }
    }
    let run = wait_terminal(&db.db, "abandoned").await;
    assert_eq!(
        (run.status.as_str(), run.error.as_deref(), run.lines),
        (
            "lost",
            Some("worker w-synthetic was restarted; its new process does not run this run"),
            100
        )
    );
    // Another round of checks later, the run the worker lists is still running.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(run_row(&db.db, "held").await.status, "running");
    heartbeat.abort();
    aggregator.stop().await;
    db.close().await;
}

/// Found by reading the code: a worker that died between acknowledging a request and
/// publishing the run's first batch left the run `pending` forever. A worker records
/// `taken.<run_id>` before its ack; a pending run so taken, whose worker is gone (or
/// restarted without it), becomes `lost`. One still queued stays `pending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_taken_by_a_worker_that_died_before_starting_it_becomes_lost() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    for id in ["taken-then-dropped", "still-queued"] {
        db.db
            .execute(athanor_connections::db::stmt(
                db.db.get_database_backend(),
                "INSERT INTO runs (id, experiment, config, status, created_at, updated_at, lines, results, batches) \
                 VALUES (?, 'sweep', '{}', 'pending', ?, ?, 0, 0, 0)",
                vec![id.into(), now_micros().into(), now_micros().into()],
            ))
            .await
            .unwrap();
    }
    let control = js.get_key_value(names::CONTROL_BUCKET).await.unwrap();
    control
        .put(names::taken_key("taken-then-dropped"), "w-gone".into())
        .await
        .unwrap();
    let run = wait_terminal(&db.db, "taken-then-dropped").await;
    assert_eq!(
        (
            run.status.as_str(),
            run.error.as_deref(),
            run.worker_id.as_deref()
        ),
        (
            "lost",
            Some("worker w-gone took it and stopped heartbeating before starting it"),
            Some("w-gone")
        )
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(run_row(&db.db, "still-queued").await.status, "pending");
    aggregator.stop().await;
    db.close().await;
}

/// `database.retention`: finished runs older than it are deleted in the background —
/// every row, in chunks of at most 10 000 rows per transaction, leaving a tombstone —
/// while a running run and a run that finished within the retention stay whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_past_the_retention_are_deleted_in_chunks_and_the_rest_stay() {
    let nats = TestNats::start();
    let db = TestDb::new().await;
    let first = Running::start(&nats, &db).await;
    let (worker, worker_stop) = start_worker(&nats).await;
    let mut old_logs = worker
        .start_run(request(
            "log_storm",
            json!({"lines_per_second": 100_000, "duration_ms": 250}),
        ))
        .await
        .unwrap();
    let mut old_metrics = worker
        .start_run(request(
            "metric_storm",
            json!({"metrics": 2, "steps": 12_000, "steps_per_second": 100_000}),
        ))
        .await
        .unwrap();
    let mut recent = worker
        .start_run(request("sweep", json!({"iterations": 3, "delay_ms": 0})))
        .await
        .unwrap();
    for handle in [&mut old_logs, &mut old_metrics, &mut recent] {
        assert_eq!(handle.finished().await, RunState::Completed);
        wait_terminal(&db.db, &handle.run_id).await;
    }
    let running = worker
        .start_run(request("sleepy", json!({"duration_ms": 600_000})))
        .await
        .unwrap();
    wait_for("the sleepy run stored as running", DEADLINE, || async {
        runs::Entity::find_by_id(running.run_id.clone())
            .one(&db.db)
            .await
            .unwrap()
            .filter(|r| r.status == "running")
    })
    .await
    .unwrap();
    assert_eq!(logs_of(&db.db, &old_logs.run_id).await.len(), 25_001);
    first.stop().await;
    // Two of them finished an hour ago.
    for id in [&old_logs.run_id, &old_metrics.run_id] {
        db.db
            .execute(athanor_connections::db::stmt(
                db.db.get_database_backend(),
                "UPDATE runs SET finished_at = finished_at - 3600000000 WHERE id = ?",
                vec![id.as_str().into()],
            ))
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    let aggregator = Aggregator::start(
        AggregatorConfig {
            retention: Some(Duration::from_secs(60)),
            ..AggregatorConfig::for_tests()
        },
        nats.config(),
        db.db.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let stats = aggregator.stats().clone();
    wait_for("the two old runs deleted", DEADLINE, || async {
        (stats
            .expired_runs
            .load(std::sync::atomic::Ordering::Relaxed)
            == 2)
            .then_some(())
    })
    .await
    .unwrap();
    for id in [&old_logs.run_id, &old_metrics.run_id] {
        assert!(runs::Entity::find_by_id(id.clone())
            .one(&db.db)
            .await
            .unwrap()
            .is_none());
        assert!(logs_of(&db.db, id).await.is_empty());
        assert!(points_of(&db.db, id).await.is_empty());
        assert!(summaries_of(&db.db, id).await.is_empty());
    }
    let rollups = athanor_testkit::count(
        &db.db,
        "SELECT COUNT(*) AS n FROM run_metric_rollups WHERE series_id NOT IN (SELECT id FROM run_metric_summaries)",
    )
    .await;
    assert_eq!(rollups, 0, "rollups of deleted series left behind");
    let tombstones = athanor_testkit::count(&db.db, "SELECT COUNT(*) AS n FROM deleted_runs").await;
    assert_eq!(tombstones, 2);
    // 25 001 lines in three chunks and an empty one, 24 000 points in 2 × 2 chunks and
    // their empty ones, and the rest: more than one transaction per run, none over a
    // chunk.
    let transactions = stats
        .retention_transactions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(transactions >= 4 + 2 * 3 + 2, "{transactions} transactions");
    // The recent run and the running one are whole.
    assert_eq!(logs_of(&db.db, &recent.run_id).await.len(), 3);
    assert!(runs::Entity::find_by_id(running.run_id.clone())
        .one(&db.db)
        .await
        .unwrap()
        .is_some());
    worker_stop.cancel();
    worker.wait().await;
    stop.cancel();
    aggregator.wait().await;
    db.close().await;
}

/// Lines stored exactly as logged, whatever they hold — on PostgreSQL they go by COPY,
/// whose text format escapes tabs, newlines, carriage returns and backslashes — and a
/// run with a line already in `run_logs` (with no batch key: a hand-made row) still
/// stores its batch: that run's lines take the INSERT path, the existing row kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_stored_exactly_as_logged_and_an_existing_line_is_kept() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let db = TestDb::new().await;
    let aggregator = Running::start(&nats, &db).await;
    let odd = [
        "a\ttab",
        "a\nnewline and a\r\nreturn",
        "a \\ backslash, \\N, \\t and \\\\",
        "ünïcødé, emoji 🦀, and a NUL \0 here",
        "",
        "trailing tab\t",
    ];
    let mut batch = Batch::new("odd-lines", 0, "w-synthetic");
    batch.logs = odd
        .iter()
        .enumerate()
        .map(|(i, m)| LogLine {
            seq: i as u64,
            ts: 1000 + i as i64,
            level: Level::Info,
            message: m.to_string(),
            metadata: (i % 2 == 0).then(|| json!({"m": m, "i": i})),
        })
        .collect();
    batch.final_ = Some(athanor_schemas::Final {
        status: RunState::Completed,
        batches: 1,
        lines: odd.len() as u64,
        results: 0,
        metrics: 0,
    });
    batch.status = Some(Status {
        state: RunState::Completed,
        error: None,
        at: 2000,
    });
    // The other run: line 1 is in run_logs already, with no batch key.
    let mut held = synthetic_run("held-line", 1).remove(0);
    held.final_ = None;
    held.status = None;
    db.db
        .execute(athanor_connections::db::stmt(
            db.db.get_database_backend(),
            "INSERT INTO run_logs (run_id, seq, ts, level, message, metadata) VALUES ('held-line', 1, 1, 'info', 'there before', NULL)",
            vec![],
        ))
        .await
        .unwrap();
    for b in [&batch, &held] {
        js.publish(
            names::run_subject(&b.run_id),
            codec::encode(b).payload.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    wait_terminal(&db.db, "odd-lines").await;
    let stored = logs_of(&db.db, "odd-lines").await;
    let expected: Vec<String> = odd
        .iter()
        .map(|m| match db.db.get_database_backend() {
            // PostgreSQL text cannot hold NUL: stored as U+2400.
            sea_orm::DatabaseBackend::Postgres => m.replace('\0', "\u{2400}"),
            _ => m.to_string(),
        })
        .collect();
    assert_eq!(
        stored.iter().map(|l| l.message.clone()).collect::<Vec<_>>(),
        expected
    );
    for (i, line) in stored.iter().enumerate() {
        let metadata: Option<serde_json::Value> = line
            .metadata
            .as_deref()
            .map(|m| serde_json::from_str(m).unwrap());
        assert_eq!(
            metadata,
            (i % 2 == 0).then(|| json!({"m": odd[i], "i": i})),
            "line {i}"
        );
        assert_eq!((line.seq, line.ts), (i as i64, 1000 + i as i64));
    }
    let held_lines = wait_for("the held run's batch", DEADLINE, || async {
        let lines = logs_of(&db.db, "held-line").await;
        (lines.len() == 50).then_some(lines)
    })
    .await
    .unwrap();
    assert_eq!(held_lines[1].message, "there before");
    assert_eq!(held_lines[2].message, held.logs[2].message);
    aggregator.stop().await;
}
