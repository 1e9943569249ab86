//! `athanor up` as a user starts it, for the tests that drive the binary.

#![allow(dead_code)] // each test crate uses some of these

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `athanor up` on a temp data dir and a free port; returns it and its base URL, read
/// from what it prints.
pub fn up(data_dir: &std::path::Path) -> (Child, String) {
    up_with(data_dir, &[])
}

/// As [`up`], with `env` (`ATHANOR__…` settings) on top.
pub fn up_with(data_dir: &std::path::Path, env: &[(&str, &str)]) -> (Child, String) {
    up_wrapped(&[], data_dir, env)
}

/// As [`up_with`], started through `wrapper` (e.g. `prlimit --nofile=…`), which runs
/// the command line after it.
pub fn up_wrapped(
    wrapper: &[&str],
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Child, String) {
    let bin = env!("CARGO_BIN_EXE_athanor");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(bin);
            command
        }
        None => Command::new(bin),
    };
    let mut child = command
        .args(["up", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("ATHANOR__NATS__SERVER_BIN", athanor_testkit::server_bin())
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start athanor up");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let url = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("athanor up exited early, having printed {printed:?}"))
            .unwrap();
        if let Some(api) = line.trim().strip_prefix("API:") {
            break api.trim().trim_end_matches("/api/experiments").to_string();
        }
        printed.push(line);
    };
    assert!(
        printed
            .iter()
            .any(|l| l.trim().starts_with("NATS:") && l.contains("nats://127.0.0.1:")),
        "{printed:?}"
    );
    // Keep draining stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

/// Waits until the gateway at `url` lists `sweep` (the worker has registered); returns
/// what `athanor experiments` printed.
pub fn wait_for_worker(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = Command::new(env!("CARGO_BIN_EXE_athanor"))
            .args(["experiments", "--url", url])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run athanor experiments");
        let text = String::from_utf8_lossy(&listed.stdout).into_owned();
        if text.contains("sweep") {
            return text;
        }
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops `athanor up` with SIGTERM, as a user would, and checks that it stopped in
/// order.
pub fn stop(child: &mut Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "athanor up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}

/// `athanor <args>` (a worker, an aggregator, a gateway) on `nats` and `db`, with
/// `env` (`ATHANOR__…` settings) on top.
pub fn component(
    args: &[&str],
    nats: &athanor_testkit::TestNats,
    db: &athanor_testkit::TestDb,
    env: &[(&str, String)],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_athanor"))
        .args(args)
        .env("ATHANOR__NATS__URL", nats.url())
        .env("ATHANOR__DATABASE__URL", db.config.url())
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start athanor")
}

/// Starts a run through the gateway at `url`; returns its id.
pub async fn start_run(url: &str, experiment: &str, config: serde_json::Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{url}/api/runs"))
        .json(&serde_json::json!({ "experiment": experiment, "config": config }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: serde_json::Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

/// Holds SQLite's write lock on the database `file` until the transaction ends: no
/// aggregator can commit meanwhile.
pub async fn hold_write_lock(file: &std::path::Path) -> sea_orm::DatabaseTransaction {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let db = sea_orm::Database::connect(format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let tx = db.begin().await.unwrap();
    tx.execute_unprepared("CREATE TABLE test_holds_the_write_lock (x INTEGER)")
        .await
        .unwrap();
    tx
}

/// Whether a process is alive (a zombie waiting to be reaped counts as gone).
pub fn alive(pid: u32) -> bool {
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
