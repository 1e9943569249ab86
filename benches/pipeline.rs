//! Whole-pipeline benchmarks: `cargo bench --bench pipeline [-- latency|sparse|throughput|fanout|startup|command|metrics|durability|retention]`.
//!
//! * latency — from `log()` (the line's own timestamp) to an SSE client holding the
//!   line, at 1 000 and 10 000 lines/s per run, with 1 and 100 concurrent runs: a worker,
//!   an aggregator and a gateway in this process around a real nats-server and SQLite,
//!   one SSE viewer per run.
//! * sparse — the same at 1 and 10 lines/s (and 1 000 / 10 000 for the batch counts),
//!   with the worker's leading edge off and on, side by side.
//! * throughput — worker → JetStream → aggregator → SQLite, and → PostgreSQL, at rising
//!   offered rates: lines/s logged and stored, and the consumer's lag (the age of the
//!   oldest line published but not yet stored) while it runs.
//! * fanout — 1 000, 5 000 and 10 000 viewers of one run on one `athanor gateway`
//!   process: delivery delay (log() → viewer) p99 over a sample of the viewers, and the
//!   gateway's resident memory per viewer.
//! * startup — `athanor up` (fresh data dir, own nats-server) to its first answered
//!   request.
//! * command — a command experiment (a Python child printing lines that carry their
//!   write time) beside an in-process experiment at the same rate: the delay from the
//!   write (child) or `log()` (in-process) to an SSE client holding the line.
//! * durability — the throughput and latency rows again under each durability setting,
//!   side by side: JetStream without and with an fsync per write (`nats.sync_always`),
//!   SQLite `synchronous` normal and full (`database.sqlite_synchronous`).
//! * retention — the throughput row with `database.retention` deleting old runs
//!   (20 runs of 50 000 lines, finished two hours ago) beside the same row without it.
//! * metrics — metric points from `metrics()` to an SSE client and their bytes on the
//!   wire; a million-point series stored through the aggregator's store and read back
//!   at max_points=1000 through the gateway (rollups), beside the same buckets computed
//!   by one GROUP BY over the points, on SQLite and PostgreSQL.
//!
//! Prints a table per part; BENCHMARKS.md holds the last figures.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use athanor_aggregator::{Aggregator, AggregatorConfig};
use athanor_client::{EventStream, FeedData};
use athanor_connections::db::DatabaseConfig;
use athanor_gateway::{Gateway, GatewayConfig};
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
    if want("sparse") {
        rt.block_on(sparse());
    }
    if want("throughput") {
        rt.block_on(throughput());
    }
    if want("fanout") {
        rt.block_on(fanout());
    }
    if want("startup") {
        startup();
    }
    if want("command") {
        rt.block_on(command());
    }
    if want("metrics") {
        rt.block_on(metrics());
    }
    if want("durability") {
        rt.block_on(durability());
    }
    if want("retention") {
        rt.block_on(retention());
    }
}

/// The NATS settings every component of a benchmark gets.
struct Bench(athanor_connections::nats::NatsConfig);

impl Bench {
    /// `server`'s settings with the production heartbeat TTL (the tests' 3 s is for
    /// lost-run tests).
    fn of(server: &TestNats) -> Bench {
        Bench(athanor_connections::nats::NatsConfig {
            workers_ttl: Duration::from_secs(15),
            ..server.config()
        })
    }

    fn config(&self) -> athanor_connections::nats::NatsConfig {
        self.0.clone()
    }

    fn url(&self) -> String {
        self.0.url().to_string()
    }
}

/// A migrated SQLite database with the production settings (5 s busy timeout).
async fn database(dir: &tempfile::TempDir) -> (DatabaseConfig, sea_orm::DatabaseConnection) {
    database_with(dir, DatabaseConfig::default().sqlite_synchronous).await
}

/// As [`database`], with SQLite's `synchronous` set.
async fn database_with(
    dir: &tempfile::TempDir,
    sync: athanor_connections::db::SqliteSync,
) -> (DatabaseConfig, sea_orm::DatabaseConnection) {
    use athanor_migrations::MigratorTrait;
    let config = DatabaseConfig {
        url: Some(format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        )),
        sqlite_synchronous: sync,
        ..Default::default()
    };
    let db = athanor_connections::db::connect(&config).await.unwrap();
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

/// `p50 | p99 | max` in ms of sorted delays (µs), as table columns.
fn delay_columns(sorted: &[i64]) -> String {
    format!(
        "{} | {} | {}",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(*sorted.last().unwrap_or(&0))
    )
}

/// A run's feed from its start, through `athanor-client` (compressed: zstd).
async fn feed(base: &str, id: &str) -> EventStream {
    feed_with(base, id, true).await
}

/// A run's feed from its start, compressed or not.
async fn feed_with(base: &str, id: &str, compressed: bool) -> EventStream {
    athanor_client::Client::with_compression(base, None, compressed)
        .unwrap()
        .events(id, None)
        .await
        .unwrap()
}

/// Reads a feed, returning for every line received `now − line.ts` (µs).
async fn delays(feed: EventStream, until: Instant) -> Vec<i64> {
    delays_from(feed, until, |line| line.ts).await
}

/// Reads a feed, returning for every line received `now − start(line)` (µs).
async fn delays_from(
    feed: EventStream,
    until: Instant,
    start: impl Fn(&athanor_schemas::LogLine) -> i64,
) -> Vec<i64> {
    delays_of(feed, until, |batch| batch.logs.iter().map(&start).collect()).await
}

/// Reads a feed, returning `now − t` (µs) for every start time `t` that `starts` finds
/// in each batch received.
async fn delays_of(
    mut feed: EventStream,
    until: Instant,
    starts: impl Fn(&athanor_schemas::events::BatchEvent) -> Vec<i64>,
) -> Vec<i64> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let event = match tokio::time::timeout(Duration::from_secs(5), feed.next()).await {
            Ok(Ok(Some(event))) => event,
            _ => break,
        };
        let now = now_micros();
        match event.data {
            FeedData::Batch(batch) => out.extend(starts(&batch).into_iter().map(|t| now - t)),
            FeedData::Status(_) => return out,
            _ => {}
        }
    }
    out
}

async fn start_run(http: &reqwest::Client, base: &str, config: Value) -> String {
    start_experiment(http, base, "log_storm", config).await
}

async fn start_experiment(
    http: &reqwest::Client,
    base: &str,
    experiment: &str,
    config: Value,
) -> String {
    let created: Value = http
        .post(format!("{base}/api/runs"))
        .json(&json!({ "experiment": experiment, "config": config }))
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
    let dir = tempfile::tempdir().unwrap();
    let (_, db) = database(&dir).await;
    let stack = Stack::start(&Bench::of(&nats_server), db, None).await;
    println!("\n## Latency: log() → SSE client (worker flush every 100 ms)\n");
    println!("Each run has two viewers side by side: one taking the feed plain, one compressed (zstd).\n");
    println!("| runs | lines/s per run | lines received | p50 ms | p99 ms | max ms | compressed: p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    latency_rows(
        &stack,
        "",
        &[(1, 1_000), (1, 10_000), (100, 1_000), (100, 10_000)],
    )
    .await;
    stack.stop().await;
}

/// Lines at `lines_per_second` on average, each gap drawn uniformly from half to one
/// and a half times the mean (a training loop's lines do not keep step with the
/// worker's ticks), and nothing else: no progress, no results.
struct SparseLines;

impl athanor_workers::Experiment for SparseLines {
    fn name(&self) -> &str {
        "sparse_lines"
    }
    fn description(&self) -> &str {
        "benchmark: lines at random gaps around 1/lines_per_second"
    }
    fn config_schema(&self) -> athanor_schemas::ConfigSchema {
        use athanor_schemas::Field;
        athanor_schemas::ConfigSchema::new([
            Field::int("lines_per_second").default(1),
            Field::int("duration_ms").default(10_000),
            Field::int("line_bytes").default(100),
        ])
    }
    fn run(&self, ctx: &athanor_workers::RunContext) -> Result<(), athanor_workers::RunError> {
        let mean = 1.0 / ctx.config_i64("lines_per_second").unwrap().max(1) as f64;
        let end =
            Instant::now() + Duration::from_millis(ctx.config_i64("duration_ms").unwrap() as u64);
        let line = "x".repeat(ctx.config_i64("line_bytes").unwrap() as usize);
        let mut n = 0;
        while Instant::now() < end && !ctx.cancelled() {
            std::thread::sleep(Duration::from_secs_f64(mean * (0.5 + fastrand::f64())));
            ctx.log(athanor_schemas::Level::Info, format!("{n} {line}"));
            n += 1;
        }
        Ok(())
    }
}

/// A latency row's runs: `runs` runs of `experiment` at `rate` lines/s for `duration_ms`.
struct Row {
    experiment: &'static str,
    runs: usize,
    rate: u64,
    duration_ms: u64,
}

/// Sparse and steady output with the leading edge (`worker.leading_edge`) on and off,
/// side by side: latency, and the batches the runs took.
async fn sparse() {
    println!("\n## Latency of sparse logs: the leading edge on and off\n");
    println!("A run that published nothing for a whole flush interval publishes its next output at once (`worker.leading_edge`, on by default). Sparse rows: 20 runs at 1 line/s for 20 s, 10 runs at 10 lines/s for 10 s, of `log_storm` (evenly spaced lines, plus its opening line and a progress update per line) and of `sparse_lines` (lines only, each gap drawn from 0.5 to 1.5 times the mean: at 10 lines/s, lines closer than one interval to the last batch wait for the tick). Steady rows (`log_storm`) as in the latency table. Last column: the batches each run took.\n");
    println!("| leading edge: runs | experiment: lines/s per run | lines received | p50 ms | p99 ms | max ms | compressed: p50 ms | p99 ms | max ms | batches per run |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for leading_edge in [false, true] {
        let nats_server = TestNats::start();
        let dir = tempfile::tempdir().unwrap();
        let (_, db) = database(&dir).await;
        let stack = Stack::start_configured(
            &Bench::of(&nats_server),
            db,
            None,
            vec![std::sync::Arc::new(SparseLines)],
            AggregatorConfig::default(),
            WorkerConfig {
                leading_edge,
                ..WorkerConfig::default()
            },
        )
        .await;
        let label = if leading_edge { "on" } else { "off" };
        for (experiment, runs, rate, duration_ms) in [
            ("log_storm", 20, 1, 20_000),
            ("log_storm", 10, 10, 10_000),
            ("sparse_lines", 20, 1, 20_000),
            ("sparse_lines", 10, 10, 10_000),
            ("log_storm", 1, 1_000, 5_000),
            ("log_storm", 1, 10_000, 5_000),
        ] {
            let row = Row {
                experiment,
                runs,
                rate,
                duration_ms,
            };
            latency_row(&stack, &format!("{label}: "), row).await;
        }
        stack.stop().await;
    }
}

/// One latency row per (runs, lines/s per run) of 5 s runs, each starting with `prefix`.
async fn latency_rows(stack: &Stack, prefix: &str, rows: &[(usize, u64)]) {
    for &(runs, rate) in rows {
        let row = Row {
            experiment: "log_storm",
            runs,
            rate,
            duration_ms: 5000,
        };
        latency_row(stack, prefix, row).await;
    }
}

/// A latency row: each run with a plain and a compressed viewer; the row ends with the
/// batches each run took when `prefix` is not empty. Returns the runs' ids.
async fn latency_row(stack: &Stack, prefix: &str, row: Row) -> Vec<String> {
    let (http, base) = (&stack.http, &stack.base);
    let Row {
        experiment,
        runs,
        rate,
        duration_ms,
    } = row;
    let mut viewers = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..runs {
        let id = start_experiment(
            http,
            base,
            experiment,
            json!({"lines_per_second": rate, "duration_ms": duration_ms, "line_bytes": 100}),
        )
        .await;
        let until = Instant::now() + Duration::from_millis(duration_ms + 30_000);
        for compressed in [false, true] {
            let feed = feed_with(base, &id, compressed).await;
            viewers.push((compressed, tokio::spawn(delays(feed, until))));
        }
        ids.push(id);
    }
    let (mut plain, mut compressed) = (Vec::new(), Vec::new());
    for (is_compressed, viewer) in viewers {
        let delays = viewer.await.unwrap();
        if is_compressed {
            &mut compressed
        } else {
            &mut plain
        }
        .extend(delays);
    }
    plain.sort_unstable();
    compressed.sort_unstable();
    let (rate_cell, batches) = if prefix.is_empty() {
        (rate.to_string(), String::new())
    } else {
        (
            format!("{experiment}: {rate}"),
            format!(" {} |", batches_per_run(http, base, &ids).await),
        )
    };
    println!(
        "| {prefix}{runs} | {rate_cell} | {} | {} | {} |{batches}",
        plain.len(),
        delay_columns(&plain),
        delay_columns(&compressed)
    );
    ids
}

/// The batches each run took once stored, as `min–max` (one figure when equal).
async fn batches_per_run(http: &reqwest::Client, base: &str, ids: &[String]) -> String {
    let mut counts = Vec::new();
    for id in ids {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let run: Value = http
                .get(format!("{base}/api/runs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if run["status"] == "completed" || Instant::now() > deadline {
                counts.push(run["batches"].as_i64().unwrap_or(-1));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (min, max) = (counts.iter().min(), counts.iter().max());
    match (min, max) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}–{b}"),
        _ => "-".into(),
    }
}

// ---------------------------------------------------------------- durability

/// Throughput and latency under each durability setting, side by side.
async fn durability() {
    use athanor_connections::db::SqliteSync;
    const SETTINGS: [(bool, SqliteSync, &str); 4] = [
        (false, SqliteSync::Normal, "no fsync per write, normal"),
        (true, SqliteSync::Normal, "fsync per write, normal"),
        (false, SqliteSync::Full, "no fsync per write, full"),
        (true, SqliteSync::Full, "fsync per write, full (defaults)"),
    ];
    let offered: u64 = std::env::var("ATHANOR_BENCH_OFFERED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!("\n## Durability: JetStream sync_interval always, SQLite synchronous\n");
    println!("Throughput as in the throughput table, at {offered} offered lines/s, on SQLite:\n");
    println!("| JetStream, SQLite synchronous | offered lines/s | logged lines/s | stored lines/s | lag p50 ms | lag p99 ms | lag max ms | stored after last publish ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (sync_always, sqlite, label) in SETTINGS {
        let dir = tempfile::tempdir().unwrap();
        let (_, db) = database_with(&dir, sqlite).await;
        throughput_row_on(
            &TestNats::start_with(sync_always),
            label,
            offered,
            db,
            AggregatorConfig::default(),
            Vec::new(),
        )
        .await;
    }
    println!("\nLatency as in the latency table (plain and compressed viewers):\n");
    println!("| JetStream, SQLite synchronous: runs | lines/s per run | lines received | p50 ms | p99 ms | max ms | compressed: p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (sync_always, sqlite, label) in SETTINGS {
        let nats_server = TestNats::start_with(sync_always);
        let dir = tempfile::tempdir().unwrap();
        let (_, db) = database_with(&dir, sqlite).await;
        let stack = Stack::start(&Bench::of(&nats_server), db, None).await;
        latency_rows(&stack, &format!("{label}: "), &[(1, 1_000), (100, 1_000)]).await;
        stack.stop().await;
    }
}

/// A worker, an aggregator and a gateway in this process, on `db`; or, given the
/// address of a gateway of its own, only the worker and the aggregator.
struct Stack {
    worker: Worker,
    aggregator: Aggregator,
    gateway: Option<Gateway>,
    db: sea_orm::DatabaseConnection,
    stop: CancellationToken,
    http: reqwest::Client,
    base: String,
}

impl Stack {
    async fn start(nats: &Bench, db: sea_orm::DatabaseConnection, base: Option<String>) -> Stack {
        Stack::start_with(nats, db, base, Vec::new()).await
    }

    /// The stack, its worker hosting `extra` beside the built-ins.
    async fn start_with(
        nats: &Bench,
        db: sea_orm::DatabaseConnection,
        base: Option<String>,
        extra: Vec<std::sync::Arc<dyn athanor_workers::Experiment>>,
    ) -> Stack {
        Stack::start_configured(
            nats,
            db,
            base,
            extra,
            AggregatorConfig::default(),
            WorkerConfig::default(),
        )
        .await
    }

    /// As [`Stack::start_with`], with the aggregator's configuration.
    async fn start_configured(
        nats: &Bench,
        db: sea_orm::DatabaseConnection,
        base: Option<String>,
        extra: Vec<std::sync::Arc<dyn athanor_workers::Experiment>>,
        aggregator: AggregatorConfig,
        worker: WorkerConfig,
    ) -> Stack {
        let stop = CancellationToken::new();
        let mut experiments = builtin::all();
        experiments.extend(extra);
        let worker = Worker::start(
            WorkerConfig {
                max_concurrent_runs: 128,
                ..worker
            },
            nats.config(),
            experiments,
            stop.clone(),
        )
        .await
        .unwrap();
        let aggregator = Aggregator::start(aggregator, nats.config(), db.clone(), stop.clone())
            .await
            .unwrap();
        let (gateway, base) = match base {
            Some(base) => (None, base),
            None => {
                let gateway = Gateway::start(
                    GatewayConfig::for_tests(),
                    nats.config(),
                    db.clone(),
                    stop.clone(),
                )
                .await
                .unwrap();
                let base = format!("http://{}", gateway.addr);
                (Some(gateway), base)
            }
        };
        let http = reqwest::Client::new();
        // Until the gateway answers and knows the worker.
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
        Stack {
            worker,
            aggregator,
            gateway,
            db,
            stop,
            http,
            base,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.worker.wait().await;
        self.aggregator.wait().await;
        if let Some(gateway) = self.gateway {
            gateway.wait().await;
        }
        drop(self.db);
    }
}

// ---------------------------------------------------------------- throughput

/// Offered load in lines/s, all runs together.
const OFFERED: [u64; 4] = [100_000, 200_000, 250_000, 300_000];
/// Runs sharing the offered load, and how long each logs.
const THROUGHPUT_RUNS: u64 = 4;
const THROUGHPUT_SECS: u64 = 10;

async fn throughput() {
    println!("\n## Sustained throughput: worker → JetStream → aggregator → database\n");
    println!(
        "{THROUGHPUT_RUNS} `log_storm` runs of {THROUGHPUT_SECS} s share the offered rate (~120-byte lines). \
         Lag: age of the oldest line JetStream has acknowledged and the database does not hold yet, \
         sampled every 20 ms.\n"
    );
    println!("| database | offered lines/s | logged lines/s | stored lines/s | lag p50 ms | lag p99 ms | lag max ms | stored after last publish ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    // ATHANOR_BENCH_OFFERED=250000 and ATHANOR_BENCH_DATABASES=sqlite: one row (to profile).
    let offered: Vec<u64> = std::env::var("ATHANOR_BENCH_OFFERED")
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("lines/s"))
                .collect()
        })
        .unwrap_or_else(|_| OFFERED.to_vec());
    let databases = std::env::var("ATHANOR_BENCH_DATABASES").unwrap_or_default();
    let wanted = |name: &str| databases.is_empty() || databases.contains(name);
    if wanted("sqlite") {
        for &rate in &offered {
            let dir = tempfile::tempdir().unwrap();
            let (_, db) = database(&dir).await;
            throughput_row("SQLite", rate, db).await;
        }
    }
    if !wanted("postgres") {
        return;
    }
    for &rate in &offered {
        // The lines by multi-row INSERT (as on SQLite) and by COPY, side by side; then
        // COPY with two transactions in flight, and with two aggregators sharing the
        // consumer (on these 2 cores: contention, not scale).
        for (variant, (copy, writers, aggregators, label)) in [
            (false, 1, 1, "PostgreSQL 15, INSERT"),
            (true, 1, 1, "PostgreSQL 15, COPY"),
            (true, 2, 1, "PostgreSQL 15, COPY, 2 transactions in flight"),
            (true, 1, 2, "PostgreSQL 15, COPY, 2 aggregators"),
        ]
        .into_iter()
        .enumerate()
        {
            let tag = format!("{rate}_{variant}");
            let Some((admin, name, db)) = postgres_database(&tag).await else {
                return;
            };
            athanor_aggregator::store::set_postgres_copy(copy);
            let config = AggregatorConfig {
                writers,
                ..Default::default()
            };
            let mut others = Vec::new();
            for _ in 1..aggregators {
                others.push(postgres_connect(&name).await);
            }
            throughput_row_on(&TestNats::start(), label, rate, db, config, others).await;
            drop_postgres_database(&admin, &name).await;
        }
    }
    athanor_aggregator::store::set_postgres_copy(true);
    copy_ceiling().await;
}

/// The ceiling to hold PostgreSQL's pipeline rate against, measured in the same sitting:
/// `psql \copy` of 1 000 000 `log_storm`-like rows (~180 bytes) into an empty table
/// with `run_logs`' columns and primary key, nothing else running.
async fn copy_ceiling() {
    use sea_orm::ConnectionTrait;
    const ROWS: usize = 1_000_000;
    let Some((admin, name, db)) = postgres_database("ceiling").await else {
        return;
    };
    db.execute_unprepared("CREATE TABLE ceiling (LIKE run_logs INCLUDING ALL)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rows.tsv");
    let mut data = String::with_capacity(ROWS * 200);
    for (seq, (level, message)) in builtin::sample_lines(ROWS, 120, 7).into_iter().enumerate() {
        use std::fmt::Write;
        let _ = writeln!(
            data,
            "01a24c6a-f670-74f6-9326-e5257457e1cb\t{seq}\t{}\t{}\t{message}\t\\N",
            1_765_000_000_000_000u64 + seq as u64,
            level.as_str()
        );
    }
    let bytes = data.len();
    std::fs::write(&file, data).unwrap();
    let started = Instant::now();
    let status = std::process::Command::new("psql")
        .arg(postgres_url(&name))
        .args(["-q", "-c"])
        .arg(format!("\\copy ceiling FROM '{}'", file.display()))
        .status();
    let took = started.elapsed().as_secs_f64();
    match status {
        Ok(s) if s.success() => println!(
            "\nCeiling, same sitting: `psql \\copy` of {ROWS} rows ({} bytes each on average) into an empty table with `run_logs`' primary key: {took:.2} s, {:.0} rows/s.",
            bytes / ROWS,
            ROWS as f64 / took
        ),
        other => println!("\nCeiling: psql \\copy did not run: {other:?}"),
    }
    drop(db);
    drop_postgres_database(&admin, &name).await;
}

/// A fresh, migrated PostgreSQL database on ATHANOR_BENCH_DATABASE_URL's server (the
/// local one by default), with the admin connection that drops it; `None` (and a table
/// row saying why) when the server cannot be reached.
async fn postgres_database(
    tag: &str,
) -> Option<(
    sea_orm::DatabaseConnection,
    String,
    sea_orm::DatabaseConnection,
)> {
    use athanor_migrations::MigratorTrait;
    use sea_orm::ConnectionTrait;
    let server = postgres_server();
    let admin = match athanor_connections::db::connect(&DatabaseConfig {
        url: Some(server.clone()),
        max_connections: 1,
        ..Default::default()
    })
    .await
    {
        Ok(admin) => admin,
        Err(e) => {
            println!("| PostgreSQL | skipped: {e} |");
            return None;
        }
    };
    let name = format!("athanor_bench_pipeline_{}_{tag}", std::process::id());
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let db = postgres_connect(&name).await;
    athanor_migrations::Migrator::up(&db, None).await.unwrap();
    Some((admin, name, db))
}

/// ATHANOR_BENCH_DATABASE_URL: the PostgreSQL server to measure (the local one by
/// default).
fn postgres_server() -> String {
    std::env::var("ATHANOR_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The URL of the database `name` on [`postgres_server`].
fn postgres_url(name: &str) -> String {
    let server = postgres_server();
    let (base, _) = server.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// A pool of its own on the database `name` of [`postgres_server`].
async fn postgres_connect(name: &str) -> sea_orm::DatabaseConnection {
    athanor_connections::db::connect(&DatabaseConfig {
        url: Some(postgres_url(name)),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn drop_postgres_database(admin: &sea_orm::DatabaseConnection, name: &str) {
    use sea_orm::ConnectionTrait;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// One offered rate on a fresh nats-server and an empty database.
async fn throughput_row(database: &str, offered: u64, db: sea_orm::DatabaseConnection) {
    throughput_row_on(
        &TestNats::start(),
        database,
        offered,
        db,
        AggregatorConfig::default(),
        Vec::new(),
    )
    .await;
}

/// A throughput row on a given nats-server.
async fn throughput_row_on(
    nats_server: &TestNats,
    database: &str,
    offered: u64,
    db: sea_orm::DatabaseConnection,
    aggregator: AggregatorConfig,
    // More aggregators on the same consumer and database, each with its own pool.
    others: Vec<sea_orm::DatabaseConnection>,
) {
    let stack = Stack::start_configured(
        &Bench::of(nats_server),
        db,
        None,
        Vec::new(),
        aggregator.clone(),
        WorkerConfig::default(),
    )
    .await;
    let mut aggregators = Vec::new();
    for pool in others {
        let nats = Bench::of(nats_server).config();
        let other = Aggregator::start(aggregator.clone(), nats, pool, stack.stop.clone());
        aggregators.push(other.await.unwrap());
    }
    let others = aggregators;
    let stored_lines = || {
        stack.aggregator.stats().lines.load(Ordering::Relaxed)
            + others
                .iter()
                .map(|a| a.stats().lines.load(Ordering::Relaxed))
                .sum::<u64>()
    };
    let per_run = offered / THROUGHPUT_RUNS;
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..THROUGHPUT_RUNS {
        let config = json!({"lines_per_second": per_run, "duration_ms": THROUGHPUT_SECS * 1000});
        ids.push(start_run(&stack.http, &stack.base, config).await);
    }
    // (seconds since t0, lines JetStream acknowledged, lines stored)
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut last_poll = Instant::now();
    loop {
        let published = stack.worker.stats().lines.load(Ordering::Relaxed);
        let stored = stored_lines();
        samples.push((t0.elapsed().as_secs_f64(), published, stored));
        if last_poll.elapsed() > Duration::from_millis(500) {
            last_poll = Instant::now();
            if all_completed(&stack, &ids).await {
                break;
            }
            // Far behind: the row is over capacity, not worth waiting out.
            assert!(
                t0.elapsed() < Duration::from_secs(THROUGHPUT_SECS * 10),
                "{database} at {offered} lines/s: runs not stored after {:?}",
                t0.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, published, stored) = *samples.last().unwrap();
    let first_at = |pred: &dyn Fn(&(f64, u64, u64)) -> bool| {
        samples.iter().find(|s| pred(s)).map_or(0.0, |s| s.0)
    };
    let published_at = first_at(&|s| s.1 >= published);
    let stored_at = first_at(&|s| s.2 >= stored);
    let mut lags: Vec<i64> = samples
        .iter()
        .map(|&(t, _, s)| {
            // The oldest pending line was acknowledged when `published` first passed `s`.
            let since = samples.iter().find(|p| p.1 > s).map_or(t, |p| p.0.min(t));
            ((t - since) * 1e6) as i64
        })
        .collect();
    lags.sort_unstable();
    println!(
        "| {database} | {offered} | {:.0} | {:.0} | {} | {} | {} | {:.0} |",
        published as f64 / published_at,
        stored as f64 / stored_at,
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.99)),
        ms(*lags.last().unwrap_or(&0)),
        (stored_at - published_at).max(0.0) * 1000.0
    );
    stack.stop().await;
    for other in others {
        other.wait().await;
    }
}

/// Whether every run has ended; panics if one ended other than `completed`.
async fn all_completed(stack: &Stack, ids: &[String]) -> bool {
    for id in ids {
        let run: Value = match stack
            .http
            .get(format!("{}/api/runs/{id}", stack.base))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => return false,
        };
        match run["status"].as_str() {
            Some("completed") => {}
            Some("failed" | "cancelled" | "lost") => panic!("run {id} did not complete: {run}"),
            _ => return false,
        }
    }
    true
}

// ---------------------------------------------------------------- fan-out

/// What one viewer has seen so far.
#[derive(Default)]
struct Seen {
    snapshot: std::sync::atomic::AtomicBool,
    batches: std::sync::atomic::AtomicU64,
}

impl Seen {
    fn batches(&self) -> u64 {
        self.batches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A viewer as a browser tab would be, without parsing: a raw HTTP request for the
/// feed, counting `snapshot` and `batch` events in the bytes that arrive.
async fn raw_viewer(addr: std::net::SocketAddr, path: String, seen: Arc<Seen>) {
    use std::sync::atomic::Ordering::Relaxed;
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    static SNAPSHOT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"event: snapshot\n"));
    static BATCH: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"event: batch\n"));
    // Each read lands after the 12 bytes kept from the previous one: a `batch` event
    // name (13 bytes) cut in two is still counted, and one already counted cannot fit.
    let mut buf = vec![0u8; 64 * 1024 + 12];
    let mut kept = 0;
    loop {
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf[kept..]));
        let n = match read.await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        let text = &buf[..kept + n];
        if !seen.snapshot.load(Relaxed) && SNAPSHOT.find(text).is_some() {
            seen.snapshot.store(true, Relaxed);
        }
        let batches = BATCH.find_iter(text).count() as u64;
        if batches > 0 {
            seen.batches.fetch_add(batches, Relaxed);
        }
        let keep = (kept + n).min(12);
        buf.copy_within(kept + n - keep..kept + n, 0);
        kept = keep;
    }
}

/// A sampled viewer: the feed parsed (through `athanor-client`), each line's delay
/// recorded with when it arrived (µs since the epoch).
async fn sampled_viewer(
    base: String,
    id: String,
    seen: Arc<Seen>,
    delays: Arc<Mutex<Vec<(i64, i64)>>>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let Ok(mut feed) = athanor_client::Client::with_compression(&base, None, false)
        .unwrap()
        .events(&id, None)
        .await
    else {
        return;
    };
    while let Ok(Ok(Some(event))) = tokio::time::timeout(Duration::from_secs(30), feed.next()).await
    {
        let now = now_micros();
        match event.data {
            FeedData::Snapshot(_) => seen.snapshot.store(true, Relaxed),
            FeedData::Batch(batch) => {
                seen.batches.fetch_add(1, Relaxed);
                delays
                    .lock()
                    .unwrap()
                    .extend(batch.logs.iter().map(|line| (now, now - line.ts)));
            }
            FeedData::Status(_) => return,
            _ => {}
        }
    }
}

/// The viewers of a fan-out measure, each kind on a runtime of its own: one in 50 a
/// sampled one on one thread (on the load viewers' runtime a sample would wait behind
/// thousands of tasks woken by the same frame, and measure this process's queue instead
/// of the gateway: a real viewer is in a browser of its own), the others on two threads
/// apart from the benchmark's (where the worker publishing the runs would queue behind
/// them: a real worker does not share a runtime with the viewers).
struct Population {
    addr: std::net::SocketAddr,
    sampler: Runtime,
    load: Runtime,
    /// Each viewer's counts, task, and whether it is a sampled one.
    viewers: Vec<(Arc<Seen>, tokio::task::JoinHandle<()>, bool)>,
    delays: Arc<Mutex<Vec<(i64, i64)>>>,
}

/// A runtime on a thread of its own, shut down (off the benchmark's runtime, where
/// dropping one is not allowed) when dropped.
struct Runtime {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Runtime {
    fn new(mut builder: tokio::runtime::Builder) -> Self {
        let rt = builder.enable_all().build().unwrap();
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = rt.block_on(stopped);
            rt.shutdown_background();
        });
        Runtime {
            handle,
            _stop: stop,
        }
    }
}

impl Population {
    fn new(addr: std::net::SocketAddr) -> Self {
        let mut load = tokio::runtime::Builder::new_multi_thread();
        load.worker_threads(2);
        Population {
            addr,
            sampler: Runtime::new(tokio::runtime::Builder::new_current_thread()),
            load: Runtime::new(load),
            viewers: Vec::new(),
            delays: Arc::default(),
        }
    }

    /// Opens a viewer of run `id`; a `sampled` one records its delays.
    fn open(&mut self, id: &str, sampled: bool) {
        let seen = Arc::new(Seen::default());
        let path = format!("/api/runs/{id}/events");
        let task = if sampled {
            self.sampler.handle.spawn(sampled_viewer(
                format!("http://{}", self.addr),
                id.to_string(),
                seen.clone(),
                self.delays.clone(),
            ))
        } else {
            self.load
                .handle
                .spawn(raw_viewer(self.addr, path, seen.clone()))
        };
        self.viewers.push((seen, task, sampled));
    }

    /// Measures a `window`: how many viewers had their snapshot and got a batch in it,
    /// the delays the sampled ones saw in it (sorted), how many samples took part, and
    /// the gateway's own two legs over it (from its `/metrics`).
    async fn measure(&self, window: Duration) -> Measured {
        let before: Vec<u64> = self.viewers.iter().map(|(s, ..)| s.batches()).collect();
        let legs_before = GatewayLegs::scrape(self.addr).await;
        let from = now_micros();
        tokio::time::sleep(window).await;
        let to = now_micros();
        let legs = GatewayLegs::scrape(self.addr).await.since(&legs_before);
        let receiving = self
            .viewers
            .iter()
            .zip(&before)
            .filter(|((s, ..), b)| {
                s.snapshot.load(std::sync::atomic::Ordering::Relaxed) && s.batches() > **b
            })
            .count();
        let mut delays: Vec<i64> = self
            .delays
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| (from..to).contains(at))
            .map(|(_, d)| *d)
            .collect();
        delays.sort_unstable();
        let samples = self
            .viewers
            .iter()
            .zip(&before)
            .filter(|((s, _, sampled), b)| *sampled && s.batches() > **b)
            .count();
        Measured {
            receiving,
            delays,
            samples,
            legs,
        }
    }

    fn stop(self) {
        for (_, task, _) in self.viewers {
            task.abort();
        }
    }
}

/// What [`Population::measure`] found.
struct Measured {
    receiving: usize,
    delays: Vec<i64>,
    samples: usize,
    legs: GatewayLegs,
}

/// The gateway's histograms of a batch's way through it (cumulative buckets, by upper
/// bound in seconds): stream → broadcast, and broadcast → each viewer's connection.
#[derive(Default)]
struct GatewayLegs {
    broadcast: Vec<(f64, u64)>,
    queued: Vec<(f64, u64)>,
}

impl GatewayLegs {
    async fn scrape(addr: std::net::SocketAddr) -> Self {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let buckets = |name: &str| -> Vec<(f64, u64)> {
            let prefix = format!("{name}_bucket{{le=\"");
            text.lines()
                .filter_map(|line| {
                    let rest = line.strip_prefix(&prefix)?;
                    let (le, count) = rest.split_once("\"} ")?;
                    Some((le.parse().ok()?, count.trim().parse().ok()?))
                })
                .collect()
        };
        GatewayLegs {
            broadcast: buckets("athanor_gateway_batch_broadcast_delay_seconds"),
            queued: buckets("athanor_gateway_sse_queued_seconds"),
        }
    }

    /// The counts recorded after `earlier`.
    fn since(self, earlier: &GatewayLegs) -> Self {
        let minus = |now: Vec<(f64, u64)>, then: &[(f64, u64)]| {
            now.into_iter()
                .map(|(le, n)| {
                    let before = then.iter().find(|(l, _)| *l == le).map_or(0, |(_, n)| *n);
                    (le, n - before)
                })
                .collect()
        };
        GatewayLegs {
            broadcast: minus(self.broadcast, &earlier.broadcast),
            queued: minus(self.queued, &earlier.queued),
        }
    }

    /// The bucket bound under which `p` of the samples fell, in ms (`> 30 s` beyond the
    /// last bound; `-` without samples).
    fn percentile(buckets: &[(f64, u64)], p: f64) -> String {
        let Some(&(_, total)) = buckets.iter().find(|(le, _)| le.is_infinite()) else {
            return "-".into();
        };
        if total == 0 {
            return "-".into();
        }
        let wanted = (p * total as f64).ceil() as u64;
        match buckets.iter().find(|(_, n)| *n >= wanted) {
            Some((le, _)) if le.is_finite() => format!("≤ {}", le * 1000.0),
            _ => "> 30 000".into(),
        }
    }

    /// `| broadcast p50 | p99 | queued p50 | p99 |`.
    fn columns(&self) -> String {
        let p = GatewayLegs::percentile;
        format!(
            "{} | {} | {} | {}",
            p(&self.broadcast, 0.5),
            p(&self.broadcast, 0.99),
            p(&self.queued, 0.5),
            p(&self.queued, 0.99)
        )
    }
}

/// A gateway process of its own on a free port (so its memory can be read), with room
/// for `max_viewers` feeds; its address.
fn gateway_process(
    nats: &Bench,
    db_config: &DatabaseConfig,
    max_viewers: usize,
) -> (GatewayProcess, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // ATHANOR_BENCH_GATEWAY: another build of `athanor` to measure (a before/after).
    let binary = std::env::var("ATHANOR_BENCH_GATEWAY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_athanor").to_string());
    let gateway = std::process::Command::new(binary)
        .arg("gateway")
        .env("ATHANOR__NATS__URL", nats.url())
        .env("ATHANOR__DATABASE__URL", db_config.url())
        .env("ATHANOR__GATEWAY__HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("ATHANOR__GATEWAY__MAX_VIEWERS", max_viewers.to_string())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    (
        GatewayProcess(gateway),
        format!("127.0.0.1:{port}").parse().unwrap(),
    )
}

/// A gateway child process, killed when dropped — also when the benchmark panics, so
/// that it does not outlive it holding the benchmark's stdout open.
struct GatewayProcess(std::process::Child);

impl GatewayProcess {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One row of a fan-out table.
fn fanout_row(label: &str, opened: usize, measured: Measured, rss: u64, baseline: u64) {
    let Measured {
        receiving,
        delays,
        samples,
        legs,
    } = measured;
    let failed = if receiving < opened {
        format!(" **{} did not receive**", opened - receiving)
    } else {
        String::new()
    };
    println!(
        "| {label} | {opened} | {receiving}{failed} | {samples} | {} | {} | {:.0} | {:.1} |",
        delay_columns(&delays),
        legs.columns(),
        rss as f64 / 1024.0,
        rss.saturating_sub(baseline) as f64 / receiving.max(1) as f64
    );
}

async fn fanout() {
    let nats_server = TestNats::start();
    let nats = Bench::of(&nats_server);
    let dir = tempfile::tempdir().unwrap();
    let (db_config, db) = database(&dir).await;
    let (gateway, addr) = gateway_process(&nats, &db_config, 20_000);
    let stack = Stack::start(&nats, db, Some(format!("http://{addr}"))).await;
    let (http, base) = (&stack.http, &stack.base);
    // Runs of 100 lines/s (10 batches of 10 lines a second).
    let slow = json!({"lines_per_second": 100, "duration_ms": 600_000, "line_bytes": 100});
    let id = start_run(http, base, slow.clone()).await;
    // Open the hub with one viewer, then measure the gateway without viewers.
    let warm = http
        .get(format!("{base}/api/runs/{id}/events"))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = athanor_testkit::rss_kib(gateway.id());
    drop(warm);
    println!("\n## SSE fan-out: viewers on one gateway process, runs of 100 lines/s\n");
    println!("Receiving: viewers that had the `snapshot` and at least one `batch` in the 5 s window. Delivery: each line's `log()` time to its arrival at one viewer in 50 (parsed, on a runtime of its own; of 100 runs, two viewers of each), over the window. The gateway's legs over the window, from its `/metrics` histograms (bucket bounds): stream → broadcast (once per batch), broadcast → handed to a viewer's connection (once per viewer and batch). KiB per receiving viewer: the gateway's RSS over its baseline.\n");
    println!("| shape | viewers opened | receiving | sampled viewers receiving | delivery p50 ms | p99 ms | max ms | stream → broadcast p50 ms | p99 ms | broadcast → connection p50 ms | p99 ms | gateway RSS MiB | KiB per receiving viewer |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    // ATHANOR_BENCH_VIEWERS=1000,5000: other steps (for a profiler run, say); 0: none,
    // only the 100 runs × 100 shape.
    let steps: Vec<usize> = std::env::var("ATHANOR_BENCH_VIEWERS")
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("a number of viewers"))
                .filter(|n| *n > 0)
                .collect()
        })
        .unwrap_or_else(|_| vec![1_000, 5_000, 10_000]);
    let mut population = Population::new(addr);
    for target in steps {
        while population.viewers.len() < target {
            let sampled = population.viewers.len().is_multiple_of(50);
            population.open(&id, sampled);
            if population.viewers.len().is_multiple_of(200) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Let them settle, then measure a window with everyone connected.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = athanor_testkit::rss_kib(gateway.id());
        let measured = population.measure(Duration::from_secs(5)).await;
        fanout_row("1 run", target, measured, rss, baseline);
    }
    population.stop();
    // 100 runs × 100 viewers each, on a fresh gateway.
    drop(gateway);
    let (gateway, addr) = gateway_process(&nats, &db_config, 20_000);
    let base = format!("http://{addr}");
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(start_run(http, &base, slow.clone()).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = athanor_testkit::rss_kib(gateway.id());
    let mut population = Population::new(addr);
    // One viewer in 50 sampled, two of each run's 100: viewer `round` of run `k` when
    // `round + k` is a multiple of 50.
    for round in 0..100 {
        for (k, id) in ids.iter().enumerate() {
            population.open(id, (round + k).is_multiple_of(50));
        }
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = athanor_testkit::rss_kib(gateway.id());
    let measured = population.measure(Duration::from_secs(5)).await;
    fanout_row("100 runs × 100", 10_000, measured, rss, baseline);
    population.stop();
    drop(gateway);
    stack.stop().await;
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
                    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
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

// ---------------------------------------------------------------- command

/// Lines per second and seconds of the command latency comparison.
const COMMAND_RATE: u64 = 1_000;
const COMMAND_SECS: u64 = 10;

/// A Python child printing `COMMAND_RATE` lines a second, each starting with its write
/// time (µs since the epoch), beside `log_storm` at the same rate: write → SSE client.
async fn command() {
    use athanor_workers::command::{declare, CommandSpec};
    let nats_server = TestNats::start();
    let dir = tempfile::tempdir().unwrap();
    let (_, db) = database(&dir).await;
    let script = format!(
        "import time\nstart = time.monotonic()\nfor i in range({n}):\n    due = start + i / {COMMAND_RATE}\n    wait = due - time.monotonic()\n    if wait > 0:\n        time.sleep(wait)\n    print(f'{{time.time_ns() // 1000}} line {{i}} ' + 'x' * 70)\n",
        n = COMMAND_RATE * COMMAND_SECS
    );
    let specs: Vec<CommandSpec> =
        serde_json::from_value(json!([{"name": "stamped", "command": ["python3", "-c", script]}]))
            .unwrap();
    let extra = declare(&specs, &[], &WorkerConfig::default()).unwrap();
    let stack = Stack::start_with(&Bench::of(&nats_server), db, None, extra).await;
    let (http, base) = (&stack.http, &stack.base);
    println!(
        "\n## Command experiment latency: the child's write → SSE client, beside log() → SSE client ({COMMAND_RATE} lines/s, {COMMAND_SECS} s, flush every 100 ms)\n"
    );
    println!("| producer | lines received | p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- |");
    let mut p50s = Vec::new();
    for (label, experiment, config) in [
        (
            "in-process log_storm, from log()",
            "log_storm",
            json!({"lines_per_second": COMMAND_RATE, "duration_ms": COMMAND_SECS * 1000, "line_bytes": 100}),
        ),
        ("python3 child, from its print()", "stamped", json!({})),
    ] {
        let id = start_experiment(http, base, experiment, config).await;
        let feed = feed(base, &id).await;
        let until = Instant::now() + Duration::from_secs(COMMAND_SECS + 30);
        let mut all = if experiment == "stamped" {
            // The write time the child put at the start of the line (its other lines, if
            // any, count from log()).
            delays_from(feed, until, |line| {
                line.message
                    .split(' ')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(line.ts)
            })
            .await
        } else {
            delays(feed, until).await
        };
        all.sort_unstable();
        p50s.push(percentile(&all, 0.5));
        println!("| {label} | {} | {} |", all.len(), delay_columns(&all));
    }
    println!(
        "\nExtra latency of the command path at p50: {} ms",
        ms(p50s[1] - p50s[0])
    );
    stack.stop().await;
}

// ---------------------------------------------------------------- metrics

async fn metrics() {
    let nats_server = TestNats::start();
    let dir = tempfile::tempdir().unwrap();
    let (_, db) = database(&dir).await;
    let stack = Stack::start(&Bench::of(&nats_server), db, None).await;
    println!("\n## Metrics live: metrics() → SSE client, bytes per point\n");
    println!("`metric_storm`, one run at a time, no log lines; bytes: published by the worker (zstd) and its JSON.\n");
    println!("| series × steps/s | points received | p50 ms | p99 ms | max ms | wire bytes per point | JSON bytes per point |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (series, rate, seconds) in [(10u64, 1000u64, 10u64), (1, 10, 10), (1, 1, 10)] {
        let stats = stack.worker.stats();
        let (wire0, json0) = (
            stats.wire_bytes.load(Ordering::Relaxed),
            stats.json_bytes.load(Ordering::Relaxed),
        );
        let steps = rate * seconds;
        let id = start_experiment(
            &stack.http,
            &stack.base,
            "metric_storm",
            json!({"metrics": series, "steps": steps, "steps_per_second": rate, "log_steps": false}),
        )
        .await;
        let feed = feed(&stack.base, &id).await;
        let until = Instant::now() + Duration::from_secs(seconds + 30);
        let mut all = delays_of(feed, until, |batch| {
            batch
                .metrics
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.ts, r.values.len()))
                .collect()
        })
        .await;
        all.sort_unstable();
        let points = (series * steps) as f64;
        println!(
            "| {series} × {rate} | {} | {} | {:.1} | {:.1} |",
            all.len(),
            delay_columns(&all),
            (stats.wire_bytes.load(Ordering::Relaxed) - wire0) as f64 / points,
            (stats.json_bytes.load(Ordering::Relaxed) - json0) as f64 / points,
        );
    }
    stack.stop().await;

    println!("\n## A million-point series: stored, then read at max_points=1000\n");
    println!(
        "One series written through the aggregator's store in 100 transactions of 10 000 points; \
         the series endpoint asked 100 times in a row (rollup blocks); beside it, the same buckets \
         by one `GROUP BY` over the points.\n"
    );
    println!("| database | points stored/s (store alone) | endpoint p50 ms | endpoint p99 ms | GROUP BY p50 ms |");
    println!("| --- | --- | --- | --- | --- |");
    let databases = std::env::var("ATHANOR_BENCH_DATABASES").unwrap_or_default();
    let wanted = |name: &str| databases.is_empty() || databases.contains(name);
    if wanted("sqlite") {
        let dir = tempfile::tempdir().unwrap();
        let (_, db) = database(&dir).await;
        series_row("SQLite", db).await;
    }
    if wanted("postgres") {
        if let Some((admin, name, db)) = postgres_database("metrics").await {
            series_row("PostgreSQL 15", db).await;
            drop_postgres_database(&admin, &name).await;
        }
    }
}

async fn series_row(database: &str, db: sea_orm::DatabaseConnection) {
    use athanor_aggregator::store::{store, Incoming};
    use athanor_schemas::metric::{MetricRecord, MetricValue};
    use sea_orm::ConnectionTrait;
    let nats_server = TestNats::start();
    let stack = Stack::start(&Bench::of(&nats_server), db.clone(), None).await;
    let run = "bench-million";
    let t0 = Instant::now();
    for b in 0..100u64 {
        let mut batch = athanor_schemas::Batch::new(run, b, "bench");
        batch.metrics = (b * 10_000..(b + 1) * 10_000)
            .map(|step| MetricRecord {
                seq: step,
                step,
                ts: step as i64,
                values: [(
                    "loss".to_string(),
                    MetricValue((step as f64 / 5000.0).sin()),
                )]
                .into(),
            })
            .collect();
        store(
            &db,
            vec![Incoming {
                batch,
                stream_seq: b + 1,
            }],
        )
        .await
        .unwrap();
    }
    let stored_per_s = 1e6 / t0.elapsed().as_secs_f64();
    let url = format!("{}/api/runs/{run}/metrics/loss?max_points=1000", stack.base);
    let mut times = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let body: Value = stack
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        times.push(t.elapsed().as_micros() as i64);
        assert_eq!(body["count"], 1_000_000, "{body}");
    }
    times.sort_unstable();
    let backend = db.get_database_backend();
    let mut naive = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let rows = db
            .query_all(athanor_connections::db::stmt(
                backend,
                "SELECT step / 1000 AS b, COUNT(*) AS n, MIN(value) AS lo, MAX(value) AS hi, MAX(step) AS last \
                 FROM run_metrics WHERE series_id = (SELECT id FROM run_metric_summaries WHERE run_id = ? AND name = ?) GROUP BY step / 1000",
                vec![run.into(), "loss".into()],
            ))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1000);
        naive.push(t.elapsed().as_micros() as i64);
    }
    naive.sort_unstable();
    println!(
        "| {database} | {stored_per_s:.0} | {} | {} | {} |",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99)),
        ms(percentile(&naive, 0.5)),
    );
    stack.stop().await;
}

// ---------------------------------------------------------------- retention

const OLD_RUNS: u64 = 20;
const OLD_LINES: u64 = 50_000;

/// Ingest with `database.retention` deleting old runs meanwhile, beside the same row
/// without it.
async fn retention() {
    println!("\n## Retention: ingest while old runs are deleted\n");
    println!(
        "The throughput row at 200 000 offered lines/s (SQLite) on a database holding {OLD_RUNS} runs of \
         {OLD_LINES} lines that finished two hours ago; with `database.retention = 1h` the aggregator \
         deletes them meanwhile, 10 000 rows per transaction.\n"
    );
    println!("| retention | offered lines/s | logged lines/s | stored lines/s | lag p50 ms | lag p99 ms | lag max ms | stored after last publish ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut deleted = Vec::new();
    for retention in [None, Some(Duration::from_secs(3600))] {
        let dir = tempfile::tempdir().unwrap();
        let (_, db) = database(&dir).await;
        preload_old_runs(&db).await;
        let label = if retention.is_some() {
            "1h (deleting)"
        } else {
            "off"
        };
        let aggregator = AggregatorConfig {
            retention,
            ..AggregatorConfig::default()
        };
        throughput_row_on(
            &TestNats::start(),
            label,
            200_000,
            db.clone(),
            aggregator,
            Vec::new(),
        )
        .await;
        let left = athanor_testkit::count(
            &db,
            "SELECT COUNT(*) AS n FROM runs WHERE experiment = 'old'",
        )
        .await;
        deleted.push((label, OLD_RUNS as i64 - left));
    }
    println!();
    for (label, n) in deleted {
        println!(
            "retention {label}: {n} of {OLD_RUNS} old runs ({} lines) deleted during the row",
            n as u64 * OLD_LINES
        );
    }
}

/// `OLD_RUNS` completed runs of `OLD_LINES` lines each, finished two hours ago,
/// written through the aggregator's store.
async fn preload_old_runs(db: &sea_orm::DatabaseConnection) {
    use athanor_aggregator::store::{store, Incoming};
    use sea_orm::ConnectionTrait;
    for r in 0..OLD_RUNS {
        let run_id = format!("old-{r}");
        let batches: Vec<Incoming> = (0..OLD_LINES / 1000)
            .map(|b| {
                let mut batch = athanor_schemas::Batch::new(&run_id, b, "w-old");
                batch.logs = (0..1000)
                    .map(|i| athanor_schemas::LogLine {
                        seq: b * 1000 + i,
                        ts: 1_000_000 + (b * 1000 + i) as i64,
                        level: athanor_schemas::Level::Info,
                        message: format!("old line {} of a finished run, about a hundred bytes long with some padding", b * 1000 + i),
                        metadata: None,
                    })
                    .collect();
                Incoming { batch, stream_seq: b + 1 }
            })
            .collect();
        store(db, batches).await.unwrap();
        db.execute(athanor_connections::db::stmt(
            db.get_database_backend(),
            "UPDATE runs SET experiment = 'old', status = 'completed', finished_at = ? WHERE id = ?",
            vec![(now_micros() - 7_200_000_000).into(), run_id.into()],
        ))
        .await
        .unwrap();
    }
}
