//! `ATHANOR_RUNS` full: run output waits (nothing dropped, nothing acknowledged lost),
//! everybody is told (`/readyz` 503 with the reason, the stats' warning the UI shows),
//! registrations and cancels still go through, and it recovers by itself.

mod common;

use std::time::Duration;

use athanor_testkit::wait_for;
use serde_json::{json, Value};

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A message with each run of digits replaced by `#`.
fn without_figures(message: &Value) -> String {
    let text = message
        .as_str()
        .unwrap_or_else(|| panic!("not text: {message}"));
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c.is_ascii_digit() {
            true if out.ends_with('#') => {}
            true => out.push('#'),
            false => out.push(c),
        }
    }
    out
}

/// `/readyz`'s first 503 (within a minute), waited for as `what`.
async fn not_ready(url: &str, what: &str) -> Value {
    wait_for(what, Duration::from_secs(60), || async {
        let (status, ready) = get(&format!("{url}/readyz")).await;
        (status == 503).then_some(ready)
    })
    .await
    .unwrap()
}

/// The storm run (20 000 lines/s for 3 s) completes with every line.
async fn assert_storm_stored(url: &str, storm: &str) {
    let run = wait_for(
        "the storm run to complete",
        Duration::from_secs(180),
        || async {
            let (_, run) = get(&format!("{url}/api/runs/{storm}")).await;
            (run["status"] == "completed").then_some(run)
        },
    )
    .await
    .unwrap();
    assert_eq!(run["lines"], 60_001, "{run}");
}

/// `/readyz` answers 200 again, and the stats carry no warning.
async fn assert_ready_again(url: &str) {
    let ready = wait_for("/readyz ready again", Duration::from_secs(30), || async {
        let (status, ready) = get(&format!("{url}/readyz")).await;
        (status == 200).then_some(ready)
    })
    .await
    .unwrap();
    assert_eq!(ready["run_output"], true, "{ready}");
    let (_, stats) = get(&format!("{url}/api/stats")).await;
    assert!(stats.get("warning").is_none(), "{stats}");
}

/// A 4 MiB `ATHANOR_RUNS` and an aggregator that cannot write (its database locked)
/// while a run logs ~120 MB: the stream fills with unstored batches and the worker
/// waits; when the database takes writes again, the aggregator stores them, purges
/// the stored ones, and every line of the run is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_runs_stream_holds_output_back_and_recovers_without_a_restart() {
    athanor_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut up, url) = common::up_with(
        dir.path(),
        &[
            ("ATHANOR__NATS__RUNS_MAX_BYTES", "4194304"),
            // This test is about the stream-full reason: the storage-stall one (the
            // aggregator acknowledging nothing for 30 s) must not come first.
            ("ATHANOR__GATEWAY__STORAGE_STALL", "10m"),
            // A registration expires 4 s after its last heartbeat: one that could not
            // be written while the stream is full would show at once.
            ("ATHANOR__NATS__WORKERS_TTL", "4s"),
            ("ATHANOR__WORKER__HEARTBEAT_INTERVAL", "1s"),
        ],
    );
    common::wait_for_worker(&url);
    let (status, ready) = get(&format!("{url}/readyz")).await;
    assert_eq!(
        (status, &ready["run_output"]),
        (200, &json!(true)),
        "{ready}"
    );

    let waiting = common::start_run(&url, "sleepy", json!({"duration_ms": 600_000})).await;
    let storm = common::start_run(
        &url,
        "log_storm",
        json!({"lines_per_second": 20_000, "duration_ms": 3000, "line_bytes": 2000}),
    )
    .await;
    let lock = common::hold_write_lock(&dir.path().join("athanor.db")).await;

    let ready = not_ready(&url, "/readyz to say the stream is full").await;
    assert_eq!(ready["run_output"], false, "{ready}");
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .starts_with("ATHANOR_RUNS is full ("),
        "{ready}"
    );
    let (_, stats) = get(&format!("{url}/api/stats")).await;
    assert_eq!(stats["stream_max_bytes"], 4_194_304, "{stats}");
    // The same reason; its byte count moves between the two requests while the
    // worker's last batches still fit.
    assert_eq!(
        without_figures(&stats["warning"]),
        without_figures(&ready["reason"]),
        "{stats}"
    );

    // Registrations and cancels do not starve behind run output: five registration
    // lifetimes later the worker is still listed, and a cancel is taken.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(common::wait_for_worker(&url).contains("sleepy"));
    let cancelled = reqwest::Client::new()
        .post(format!("{url}/api/runs/{waiting}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202, "{:?}", cancelled.text().await);
    let (status, _) = get(&format!("{url}/readyz")).await;
    assert_eq!(status, 503, "still full while nothing can be stored");

    lock.rollback().await.unwrap();
    assert_storm_stored(&url, &storm).await;
    let (_, cancelled) = get(&format!("{url}/api/runs/{waiting}")).await;
    wait_for(
        "the cancelled run to end",
        Duration::from_secs(60),
        || async {
            let (_, run) = get(&format!("{url}/api/runs/{waiting}")).await;
            (run["status"] == "cancelled").then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {cancelled}"));
    assert_ready_again(&url).await;
    assert!(
        stats["stream_bytes"].as_u64().unwrap() <= 4_194_304,
        "{stats}"
    );
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let purged: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("athanor_aggregator_purged_batches_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(purged > 0.0, "{metrics}");
    common::stop(&mut up);

    // Every line, once, in the database.
    let db = sea_orm::Database::connect(format!(
        "sqlite://{}",
        dir.path().join("athanor.db").display()
    ))
    .await
    .unwrap();
    let stored = athanor_testkit::count(
        &db,
        &format!("SELECT COUNT(*) AS n FROM run_logs WHERE run_id = '{storm}'"),
    )
    .await;
    let distinct = athanor_testkit::count(
        &db,
        &format!("SELECT COUNT(DISTINCT seq) AS n FROM run_logs WHERE run_id = '{storm}'"),
    )
    .await;
    assert_eq!((stored, distinct), (60_001, 60_001));
    eprintln!("purged {purged} stored batches to make room");
}

/// The database's disk full (a real ENOSPC: SQLite on a tmpfs, the NATS store
/// elsewhere): the aggregator retries and acknowledges nothing, `ATHANOR_RUNS` has
/// room, the database still answers reads — and `/readyz` says run output is not being
/// stored once the aggregators have acknowledged nothing for `gateway.storage_stall`,
/// as does the stats' warning the UI shows. Space freed: stored, ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_database_disk_makes_readyz_say_run_output_is_not_stored() {
    athanor_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = athanor_testkit::tmpfs::Tmpfs::mount("64m");
    let database = format!("sqlite://{}", disk.path().join("athanor.db").display());
    let (mut up, url) = common::up_with(
        dir.path(),
        &[
            ("ATHANOR__DATABASE__URL", database.as_str()),
            ("ATHANOR__GATEWAY__STORAGE_STALL", "2s"),
        ],
    );
    common::wait_for_worker(&url);
    let (status, ready) = get(&format!("{url}/readyz")).await;
    assert_eq!(status, 200, "{ready}");
    let filler = disk.fill_leaving(1 << 20);

    let storm = common::start_run(
        &url,
        "log_storm",
        json!({"lines_per_second": 20_000, "duration_ms": 3000}),
    )
    .await;
    let ready = not_ready(&url, "/readyz to say nothing is stored").await;
    assert_eq!(
        (&ready["database"], &ready["nats"], &ready["run_output"]),
        (&json!(true), &json!(true), &json!(false)),
        "{ready}"
    );
    let reason = ready["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the aggregators have stored nothing for ")
            && reason.contains("batches wait (consumer aggregator)"),
        "{ready}"
    );
    let (_, stats) = get(&format!("{url}/api/stats")).await;
    assert!(
        stats["warning"]
            .as_str()
            .is_some_and(|w| w.starts_with("the aggregators have stored nothing for ")),
        "{stats}"
    );

    std::fs::remove_file(&filler).unwrap();
    assert_storm_stored(&url, &storm).await;
    assert_ready_again(&url).await;
    common::stop(&mut up);
}
