//! The `athanor` binary as separate processes, killed without warning.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use athanor_schemas::entities::{run_logs, runs};
use athanor_schemas::requests::RunRequest;
use athanor_schemas::{names, now_micros, RunState};
use athanor_testkit::{wait_for, TestDb, TestNats};
use athanor_workers::{builtin, Worker, WorkerConfig};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn aggregator_process(nats: &TestNats, db: &TestDb) -> Child {
    Command::new(env!("CARGO_BIN_EXE_athanor"))
        .arg("aggregator")
        .env("ATHANOR__NATS__URL", nats.url())
        .env("ATHANOR__DATABASE__URL", db.config.url())
        .env("ATHANOR__AGGREGATOR__ACK_WAIT", "3s")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start athanor aggregator")
}

/// SIGKILL the aggregator process twice while a run streams 160 000 lines; after each
/// restart it picks up where the acks left off. Every line is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_killed_with_sigkill_mid_stream_loses_and_duplicates_nothing() {
    athanor_testkit::init_tracing();
    let nats = TestNats::start();
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let worker = Worker::start(
        WorkerConfig::for_tests(),
        nats.config(),
        builtin::all(),
        stop.clone(),
    )
    .await
    .unwrap();
    let mut aggregator = aggregator_process(&nats, &db);
    let run_id = names::new_run_id();
    let mut handle = worker
        .start_run(RunRequest {
            run_id: run_id.clone(),
            experiment: "log_storm".into(),
            config: json!({"lines_per_second": 40_000, "duration_ms": 4000, "line_bytes": 100}),
            instance_id: None,
            requested_at: now_micros(),
        })
        .await
        .unwrap();
    let stored = || async {
        run_logs::Entity::find()
            .filter(run_logs::Column::RunId.eq(run_id.as_str()))
            .count(&db.db)
            .await
            .unwrap_or(0)
    };
    for kill in 1..=2u64 {
        let before = stored().await;
        wait_for(
            "the aggregator to store more lines",
            Duration::from_secs(60),
            || async { (stored().await > before + 10_000).then_some(()) },
        )
        .await
        .unwrap();
        aggregator.kill().unwrap(); // SIGKILL
        aggregator.wait().unwrap();
        eprintln!("kill {kill}: {} lines stored when killed", stored().await);
        aggregator = aggregator_process(&nats, &db);
    }
    assert_eq!(handle.finished().await, RunState::Completed);
    let run = wait_for(
        "the run to complete in the database",
        Duration::from_secs(90),
        || async {
            runs::Entity::find_by_id(run_id.clone())
                .one(&db.db)
                .await
                .unwrap()
                .filter(|r| r.status == "completed")
        },
    )
    .await
    .unwrap();
    assert_eq!(run.lines, 160_001);
    let seqs: Vec<i64> = run_logs::Entity::find()
        .select_only()
        .column(run_logs::Column::Seq)
        .filter(run_logs::Column::RunId.eq(run_id.as_str()))
        .order_by_asc(run_logs::Column::Seq)
        .into_tuple()
        .all(&db.db)
        .await
        .unwrap();
    assert_eq!(seqs.len(), 160_001);
    assert!(
        seqs.into_iter().eq(0..160_001),
        "gaps or duplicates in run_logs"
    );
    assert_eq!(run.final_batches, Some(run.batches));
    aggregator.kill().unwrap();
    aggregator.wait().unwrap();
    stop.cancel();
    worker.wait().await;
    db.close().await;
}
