//! Whole-pipeline benchmarks: `cargo bench --bench pipeline [-- latency|fanout|startup]`.
//!
//! * latency — from `log()` (the line's own timestamp) to an SSE client holding the
//!   line, at 1 000 and 10 000 lines/s per run, with 1 and 100 concurrent runs: a worker,
//!   an aggregator and a gateway in this process around a real nats-server and SQLite,
//!   one SSE viewer per run.
//! * fanout — 1 000, 5 000 and 10 000 viewers of one run on one `athanor gateway`
//!   process: delivery delay (log() → viewer) p99 over a sample of the viewers, and the
//!   gateway's resident memory per viewer.
//! * startup — `athanor up` (fresh data dir, own nats-server) to its first answered
//!   request.
//!
//! Prints a table per part; BENCHMARKS.md holds the last figures.

use std::time::{Duration, Instant};

use athanor_aggregator::{Aggregator, AggregatorConfig};
use athanor_gateway::{Gateway, GatewayConfig};
use athanor_schemas::db::DatabaseConfig;
use athanor_schemas::events::{BatchEvent, SseDecoder};
use athanor_schemas::now_micros;
use athanor_testkit::TestNats;
use athanor_workers::{builtin, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |part: &str| wanted.is_empty() || wanted.iter().any(|w| w == part);
    println!(
        "# Athanor pipeline benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if want("latency") {
        rt.block_on(latency());
    }
    if want("fanout") {
        rt.block_on(fanout());
    }
    if want("startup") {
        startup();
    }
}

/// The NATS settings every component of a benchmark gets.
struct Bench(athanor_schemas::nats::NatsConfig);

impl Bench {
    fn config(&self) -> athanor_schemas::nats::NatsConfig {
        self.0.clone()
    }

    fn url(&self) -> String {
        self.0.url().to_string()
    }
}

/// A migrated SQLite database with the production settings (5 s busy timeout).
async fn database(dir: &tempfile::TempDir) -> (DatabaseConfig, sea_orm::DatabaseConnection) {
    use athanor_migrations::MigratorTrait;
    let config = DatabaseConfig {
        url: Some(format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        )),
        ..Default::default()
    };
    let db = athanor_schemas::db::connect(&config).await.unwrap();
    athanor_migrations::Migrator::up(&db, None).await.unwrap();
    (config, db)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn ms(micros: i64) -> String {
    format!("{:.1}", micros as f64 / 1000.0)
}

/// Reads an SSE response, returning for every line received `now − line.ts` (µs).
async fn delays(mut response: reqwest::Response, until: Instant) -> Vec<i64> {
    let mut decoder = SseDecoder::new();
    let mut out = Vec::new();
    while Instant::now() < until {
        let chunk = match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            _ => break,
        };
        let now = now_micros();
        for event in decoder.push(&chunk) {
            if event.event == "batch" {
                let batch: BatchEvent = serde_json::from_str(&event.data).unwrap();
                out.extend(batch.logs.iter().map(|l| now - l.ts));
            } else if event.event == "status" {
                return out;
            }
        }
    }
    out
}

async fn start_run(http: &reqwest::Client, base: &str, config: Value) -> String {
    let created: Value = http
        .post(format!("{base}/api/runs"))
        .json(&json!({ "experiment": "log_storm", "config": config }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run started: {created}"))
        .to_string()
}

// ---------------------------------------------------------------- latency

async fn latency() {
    let nats_server = TestNats::start();
    // Production heartbeat and TTL (the test config's 3 s TTL is for lost-run tests).
    let nats = Bench(athanor_schemas::nats::NatsConfig {
        workers_ttl: Duration::from_secs(15),
        ..nats_server.config()
    });
    let dir = tempfile::tempdir().unwrap();
    let (_, db) = database(&dir).await;
    let stop = CancellationToken::new();
    let worker = Worker::start(
        WorkerConfig {
            max_concurrent_runs: 128,
            ..WorkerConfig::default()
        },
        nats.config(),
        builtin::all(),
        stop.clone(),
    )
    .await
    .unwrap();
    let aggregator = Aggregator::start(
        AggregatorConfig::default(),
        nats.config(),
        db.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let gateway = Gateway::start(
        GatewayConfig::for_tests(),
        nats.config(),
        db.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", gateway.addr);
    let http = reqwest::Client::new();
    while http
        .get(format!("{base}/api/experiments"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["experiments"]
        .as_array()
        .is_none_or(|e| e.is_empty())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("\n## Latency: log() → SSE client (worker flush every 100 ms)\n");
    println!("| runs | lines/s per run | lines received | p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (runs, rate) in [(1, 1_000), (1, 10_000), (100, 1_000), (100, 10_000)] {
        let duration_ms = 5000;
        let mut viewers = Vec::new();
        for _ in 0..runs {
            let id = start_run(
                &http,
                &base,
                json!({"lines_per_second": rate, "duration_ms": duration_ms, "line_bytes": 100}),
            )
            .await;
            let response = http
                .get(format!("{base}/api/runs/{id}/events"))
                .send()
                .await
                .unwrap();
            let until = Instant::now() + Duration::from_millis(duration_ms + 30_000);
            viewers.push(tokio::spawn(delays(response, until)));
        }
        let mut all = Vec::new();
        for viewer in viewers {
            all.extend(viewer.await.unwrap());
        }
        all.sort_unstable();
        println!(
            "| {runs} | {rate} | {} | {} | {} | {} |",
            all.len(),
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(*all.last().unwrap_or(&0))
        );
    }
    stop.cancel();
    worker.wait().await;
    aggregator.wait().await;
    gateway.wait().await;
    drop(db);
}

// ---------------------------------------------------------------- fan-out

/// One viewer on a raw connection: drains the stream; a sampled viewer also parses it
/// and reports delays.
async fn raw_viewer(
    addr: std::net::SocketAddr,
    path: String,
    sample: bool,
    until: Instant,
) -> Vec<i64> {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return Vec::new();
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Vec::new();
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut decoder = SseDecoder::new();
    let mut out = Vec::new();
    while Instant::now() < until {
        let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        if !sample {
            continue;
        }
        let now = now_micros();
        // Chunked transfer framing is left in: the chunk-size lines are not SSE fields
        // (no colon) and are ignored by the decoder, except where one splits an event
        // line — rare with 10-line batches, and such an event is simply not counted.
        for event in decoder.push(&buf[..n]) {
            if event.event == "batch" {
                if let Ok(batch) = serde_json::from_str::<BatchEvent>(&event.data) {
                    out.extend(batch.logs.iter().map(|l| now - l.ts));
                }
            }
        }
    }
    out
}

async fn fanout() {
    let nats_server = TestNats::start();
    // Production heartbeat and TTL (the test config's 3 s TTL is for lost-run tests).
    let nats = Bench(athanor_schemas::nats::NatsConfig {
        workers_ttl: Duration::from_secs(15),
        ..nats_server.config()
    });
    let dir = tempfile::tempdir().unwrap();
    let (db_config, db) = database(&dir).await;
    let stop = CancellationToken::new();
    let worker = Worker::start(
        WorkerConfig::default(),
        nats.config(),
        builtin::all(),
        stop.clone(),
    )
    .await
    .unwrap();
    let aggregator = Aggregator::start(
        AggregatorConfig::default(),
        nats.config(),
        db.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gateway = std::process::Command::new(env!("CARGO_BIN_EXE_athanor"))
        .arg("gateway")
        .env("ATHANOR__NATS__URL", nats.url())
        .env("ATHANOR__DATABASE__URL", db_config.url())
        .env("ATHANOR__GATEWAY__HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{base}/api/experiments")).send().await {
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if body["experiments"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One long, slow run: 100 lines/s (10 batches of 10 lines a second).
    let id = start_run(
        &http,
        &base,
        json!({"lines_per_second": 100, "duration_ms": 600_000, "line_bytes": 100}),
    )
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = format!("/api/runs/{id}/events");
    // Open the hub with one viewer, then measure the gateway without viewers.
    let warm = http.get(format!("{base}{path}")).send().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = athanor_testkit::rss_kib(gateway.id());
    drop(warm);
    println!("\n## SSE fan-out: viewers of one run (100 lines/s) on one gateway process\n");
    println!("| viewers | delivery p50 ms | p99 ms | max ms | gateway RSS MiB | KiB per viewer |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut held: Vec<tokio::task::JoinHandle<Vec<i64>>> = Vec::new();
    for target in [1_000usize, 5_000, 10_000] {
        let until = Instant::now() + Duration::from_secs(3600);
        while held.len() < target {
            let sample = held.len().is_multiple_of(50);
            held.push(tokio::spawn(raw_viewer(addr, path.clone(), sample, until)));
            if held.len().is_multiple_of(200) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Let them settle, then sample a window with everyone connected.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = athanor_testkit::rss_kib(gateway.id());
        // Sampled viewers of this window: fresh ones, for 5 s.
        let window = Instant::now() + Duration::from_secs(5);
        let samplers: Vec<_> = (0..20)
            .map(|_| tokio::spawn(raw_viewer(addr, path.clone(), true, window)))
            .collect();
        let mut all = Vec::new();
        for s in samplers {
            all.extend(s.await.unwrap());
        }
        all.sort_unstable();
        let viewers = target + 20;
        println!(
            "| {viewers} | {} | {} | {} | {:.0} | {:.1} |",
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(*all.last().unwrap_or(&0)),
            rss as f64 / 1024.0,
            rss.saturating_sub(baseline) as f64 / viewers as f64
        );
    }
    for h in held {
        h.abort();
    }
    let _ = gateway.kill();
    let _ = gateway.wait();
    stop.cancel();
    worker.wait().await;
    aggregator.wait().await;
    drop(db);
}

// ---------------------------------------------------------------- start-up

fn startup() {
    println!("\n## Start-up: `athanor up` (fresh data dir) to the first answered request\n");
    println!("| attempt | to first 200 from /healthz ms | to a worker registered ms |");
    println!("| --- | --- | --- |");
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_athanor"))
            .args([
                "up",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path())
            .env("ATHANOR__NATS__SERVER_BIN", athanor_testkit::server_bin())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let get = |path: &str| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            use std::io::{Read, Write};
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            Some(text)
        };
        let mut healthy = None;
        let registered = loop {
            if healthy.is_none() && get("/healthz").is_some_and(|t| t.starts_with("HTTP/1.1 200")) {
                healthy = Some(started.elapsed());
            }
            if healthy.is_some()
                && get("/api/experiments").is_some_and(|t| t.contains("\"name\":\"sweep\""))
            {
                break started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(5));
        };
        println!(
            "| {attempt} | {} | {} |",
            healthy.unwrap().as_millis(),
            registered.as_millis()
        );
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}
