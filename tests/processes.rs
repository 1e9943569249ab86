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

/// Whether a process is alive (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        !matches!(state, Some("Z") | Some("X") | None)
    })
}

/// `kill -9` of a worker process running a command experiment whose shell has a
/// child of its own: neither the shell nor its child outlives the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_leaves_no_child_process_running() {
    athanor_testkit::init_tracing();
    let nats = TestNats::start();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let config = dir.path().join("athanor.toml");
    std::fs::write(
        &config,
        format!(
            "[[experiments]]\nname = \"tree\"\ncommand = [\"bash\", \"-c\", \"sleep 1000 & echo $$ $! > {}; wait\"]\n",
            pids.display()
        ),
    )
    .unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_athanor"))
        .arg("--config")
        .arg(&config)
        .arg("worker")
        .env("ATHANOR__NATS__URL", nats.url())
        .env("ATHANOR__NATS__WORKERS_TTL", "3s")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start athanor worker");
    let js = nats.jetstream().await;
    let request = RunRequest {
        run_id: names::new_run_id(),
        experiment: "tree".into(),
        config: json!({}),
        instance_id: None,
        requested_at: now_micros(),
    };
    // The worker declares the request stream when it starts: publish once it exists.
    wait_for("the request stream", Duration::from_secs(30), || async {
        js.get_stream(names::REQUESTS_STREAM).await.ok().map(|_| ())
    })
    .await
    .unwrap();
    js.publish(
        names::request_subject("tree"),
        serde_json::to_vec(&request).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let (shell, sleeper): (u32, u32) =
        wait_for("the pid file", Duration::from_secs(30), || async {
            let text = std::fs::read_to_string(&pids).ok()?;
            let mut it = text.split_whitespace().map(|p| p.parse().ok());
            Some((it.next()??, it.next()??))
        })
        .await
        .unwrap();
    assert!(alive(shell) && alive(sleeper));
    worker.kill().unwrap(); // SIGKILL
    worker.wait().unwrap();
    wait_for(
        "the shell and its child to end",
        Duration::from_secs(10),
        || async { (!alive(shell) && !alive(sleeper)).then_some(()) },
    )
    .await
    .unwrap();
}
