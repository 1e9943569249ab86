//! Aggregator benchmark: `cargo bench -p athanor-aggregator --bench aggregator`.
//!
//! Persisted lines per second through the whole consume → decode → write → ack path,
//! on SQLite and on PostgreSQL, side by side with a raw multi-row INSERT of the same
//! rows through sqlx (the ceiling: no NATS, no decoding, no sea-orm). Then metric
//! points against log lines of the same size (JSON bytes per point ≈ per line; one
//! value per record, four series stepping together, as `metric()` calls write them):
//! points stored per second next to lines stored per second, through the same
//! pipeline, in rounds of fresh databases taken in turns (`ATHANOR_BENCH_ROUNDS`,
//! default 4; the ratio is the rounds' median). PostgreSQL is
//! `ATHANOR_BENCH_DATABASE_URL` (default: the local server's `test` database);
//! databases are created for the run and dropped after, and each pipeline measurement
//! on PostgreSQL starts after a `CHECKPOINT`. `--quick`: fewer batches.

use std::time::{Duration, Instant};

use athanor_aggregator::{Aggregator, AggregatorConfig, AggregatorStats};
use athanor_connections::db::{connect, DatabaseConfig};
use athanor_migrations::MigratorTrait;
use athanor_schemas::{codec, names, Batch, Level, LogLine, MetricRecord, MetricValue};
use athanor_testkit::TestNats;
use sea_orm::ConnectionTrait;
use tokio_util::sync::CancellationToken;

const LINES_PER_BATCH: usize = 10_000; // one 100 ms tick of a run logging 100 000 lines/s
const RUNS: usize = 4;
/// The series of the metric workload, one value each per step.
const SERIES: [&str; 4] = ["train/loss", "train/accuracy", "val/loss", "lr"];

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let batches_per_run = if quick { 3 } else { 25 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench(batches_per_run));
}

async fn bench(batches_per_run: usize) {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let sample = athanor_workers::builtin::sample_lines(65_536, 120, 3);
    let mut all_lines: Vec<(String, LogLine)> = Vec::new();
    let mut n = 0;
    for r in 0..RUNS {
        let run_id = format!("bench-run-{r}");
        for b in 0..batches_per_run {
            let mut batch = Batch::new(run_id.as_str(), b as u64, "bench");
            batch.logs = lines(&sample, &mut n, b);
            all_lines.extend(batch.logs.iter().map(|l| (run_id.clone(), l.clone())));
            publish(&js, batch).await;
        }
    }
    // Metric points, and lines of their size in JSON, each in a stream of its own.
    let (points_nats, point_bytes) = {
        let nats = TestNats::start();
        let js = nats.jetstream().await;
        let mut bytes = 0;
        for r in 0..RUNS {
            for b in 0..batches_per_run {
                let mut batch = Batch::new(format!("bench-metrics-{r}"), b as u64, "bench");
                batch.metrics = metric_records(b);
                bytes += serde_json::to_vec(&batch.metrics).unwrap().len();
                publish(&js, batch).await;
            }
        }
        (nats, bytes / (RUNS * batches_per_run * LINES_PER_BATCH))
    };
    let (short_nats, short_bytes) = {
        let nats = TestNats::start();
        let js = nats.jetstream().await;
        let empty = serde_json::to_vec(&lines(&[(Level::Info, String::new())], &mut 0, 0))
            .unwrap()
            .len()
            / LINES_PER_BATCH;
        let sample =
            athanor_workers::builtin::sample_lines(65_536, point_bytes.saturating_sub(empty), 5);
        let (mut n, mut bytes) = (0, 0);
        for r in 0..RUNS {
            for b in 0..batches_per_run {
                let mut batch = Batch::new(format!("bench-short-{r}"), b as u64, "bench");
                batch.logs = lines(&sample, &mut n, b);
                bytes += serde_json::to_vec(&batch.logs).unwrap().len();
                publish(&js, batch).await;
            }
        }
        (nats, bytes / (RUNS * batches_per_run * LINES_PER_BATCH))
    };
    let total = all_lines.len();
    println!("# Athanor aggregator benchmark: {total} lines in {} batches of {LINES_PER_BATCH} ({RUNS} runs), ~120-byte messages; as many metric points ({point_bytes} JSON bytes each) and lines of their size ({short_bytes} JSON bytes each)\n", RUNS * batches_per_run);
    println!("| database | pipeline lines/s (consume → decode → write → ack) | raw multi-row INSERT lines/s | pipeline / raw | pipeline lines/s, {short_bytes} B (median) | pipeline points/s, {point_bytes} B (median) | points / lines: median (each round) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let streams = Streams {
        lines: &nats,
        short: &short_nats,
        points: &points_nats,
        total: total as u64,
    };

    let dir = tempfile::tempdir().unwrap();
    let sqlite = |name: &str| DatabaseConfig {
        url: Some(format!(
            "sqlite://{}",
            dir.path().join(format!("{name}.db")).display()
        )),
        ..Default::default()
    };
    let rounds = rounds();
    row(
        "SQLite (WAL, synchronous=normal)",
        &streams,
        [sqlite("pipeline"), sqlite("raw")],
        (0..rounds)
            .map(|r| (sqlite(&format!("short{r}")), sqlite(&format!("points{r}"))))
            .collect(),
        &all_lines,
    )
    .await;

    let server = std::env::var("ATHANOR_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match connect(&DatabaseConfig {
        url: Some(server.clone()),
        max_connections: 1,
        ..Default::default()
    })
    .await
    {
        Ok(admin) => {
            let (base, _) = server.rsplit_once('/').unwrap();
            let mut kinds = vec!["pipeline".to_string(), "raw".into(), "values".into()];
            for r in 0..rounds {
                kinds.extend([format!("short{r}"), format!("points{r}")]);
            }
            let names: Vec<String> = kinds
                .iter()
                .map(|kind| format!("athanor_bench_{kind}_{}", std::process::id()))
                .collect();
            for name in &names {
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
                    .await
                    .unwrap();
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
            }
            let pg = |name: &str| DatabaseConfig {
                url: Some(format!("{base}/{name}")),
                ..Default::default()
            };
            let short = row(
                "PostgreSQL 15 (local)",
                &streams,
                [pg(&names[0]), pg(&names[1])],
                (0..rounds)
                    .map(|r| (pg(&names[3 + 2 * r]), pg(&names[4 + 2 * r])))
                    .collect(),
                &all_lines,
            )
            .await;
            let values = pg(&names[2]);
            // The points again, their summaries and rollup blocks by multi-row VALUES
            // (the statements before they bound arrays), against the same short lines.
            athanor_aggregator::store::set_postgres_arrays(false);
            let label = "PostgreSQL: summaries and blocks by multi-row VALUES (points by COPY)";
            let points = pipeline_rate(streams.points, &values, streams.total, label, |s| {
                AggregatorStats::get(&s.metrics)
            })
            .await;
            athanor_aggregator::store::set_postgres_arrays(true);
            println!(
                "| {label} | | | | {short:.0} | {points:.0} | {:.2} |",
                points / short
            );
            for name in &names {
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .unwrap();
            }
        }
        Err(e) => println!("| PostgreSQL | skipped: {e} | | | | | |"),
    }
}

/// The streams of the three workloads, and the items (lines or points) each holds.
struct Streams<'a> {
    lines: &'a TestNats,
    short: &'a TestNats,
    points: &'a TestNats,
    total: u64,
}

/// A batch's lines: the next `LINES_PER_BATCH` of `sample`, from the seq of batch `b`.
fn lines(sample: &[(Level, String)], n: &mut usize, b: usize) -> Vec<LogLine> {
    (0..LINES_PER_BATCH)
        .map(|i| {
            let (level, message) = &sample[*n % sample.len()];
            *n += 1;
            LogLine {
                seq: (b * LINES_PER_BATCH + i) as u64,
                ts: athanor_schemas::now_micros(),
                level: *level,
                message: message.clone(),
                metadata: None,
            }
        })
        .collect()
}

/// Batch `b`'s metric records: `LINES_PER_BATCH` points, one record per series and step.
fn metric_records(b: usize) -> Vec<MetricRecord> {
    (0..LINES_PER_BATCH)
        .map(|i| {
            let seq = (b * LINES_PER_BATCH + i) as u64;
            let series = i % SERIES.len();
            let step = seq / SERIES.len() as u64;
            let value = athanor_workers::builtin::MetricStorm::value(series, step, None);
            MetricRecord {
                seq,
                step,
                ts: athanor_schemas::now_micros(),
                values: [(SERIES[series].to_string(), MetricValue(value))].into(),
            }
        })
        .collect()
}

async fn publish(js: &async_nats::jetstream::Context, batch: Batch) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        names::headers::MSG_ID,
        names::batch_msg_id(&batch.run_id, batch.batch_seq).as_str(),
    );
    js.publish_with_headers(
        names::run_subject(&batch.run_id),
        headers,
        codec::encode(&batch).payload.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Rounds of short lines beside points (`ATHANOR_BENCH_ROUNDS`, default 4): each a
/// pair of fresh databases, taken in turns (short lines first, then points first: the
/// second of a pair measured slower), so a machine that slows down or speeds up during
/// the sitting moves both; the ratio is the median of the rounds' (of an even number,
/// the mean of the middle two).
fn rounds() -> usize {
    std::env::var("ATHANOR_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(4)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n.is_multiple_of(2) {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    } else {
        values[n / 2]
    }
}

/// One database's row: `dbs` are fresh databases for the pipeline and the raw
/// INSERTs, `rounds` for the short lines and the points of each round. Returns the
/// median rate of the short lines.
async fn row(
    label: &str,
    streams: &Streams<'_>,
    dbs: [DatabaseConfig; 2],
    rounds: Vec<(DatabaseConfig, DatabaseConfig)>,
    lines: &[(String, LogLine)],
) -> f64 {
    let [pipeline_db, raw_db] = dbs;
    let lines_counter = |s: &AggregatorStats| AggregatorStats::get(&s.lines);
    let total = streams.total;
    let pipeline = pipeline_rate(streams.lines, &pipeline_db, total, label, lines_counter).await;
    let raw = raw_rate(&raw_db, lines).await;
    let (mut shorts, mut points, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for (r, (short_db, points_db)) in rounds.iter().enumerate() {
        let short_label = format!("{label}: short lines, round {}", r + 1);
        let points_label = format!("{label}: points, round {}", r + 1);
        let short = || pipeline_rate(streams.short, short_db, total, &short_label, lines_counter);
        let point = || {
            pipeline_rate(streams.points, points_db, total, &points_label, |s| {
                AggregatorStats::get(&s.metrics)
            })
        };
        let (s, p) = if r % 2 == 0 {
            let s = short().await;
            (s, point().await)
        } else {
            let p = point().await;
            (short().await, p)
        };
        shorts.push(s);
        points.push(p);
        ratios.push(p / s);
    }
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    let short = median(shorts);
    println!(
        "| {label} | {pipeline:.0} | {raw:.0} | {:.0}% | {short:.0} | {:.0} | {:.2} ({}) |",
        100.0 * pipeline / raw,
        median(points),
        median(ratios),
        each.join(", ")
    );
    short
}

async fn migrated(config: &DatabaseConfig) -> sea_orm::DatabaseConnection {
    let db = connect(config).await.unwrap();
    athanor_migrations::Migrator::up(&db, None).await.unwrap();
    db
}

/// Starts an aggregator with a consumer of its own (so it reads the whole stream) and
/// times it until `stored` (lines or points) reaches `total`.
async fn pipeline_rate(
    nats: &TestNats,
    config: &DatabaseConfig,
    total: u64,
    label: &str,
    stored: impl Fn(&AggregatorStats) -> u64,
) -> f64 {
    let db = migrated(config).await;
    if db.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
        // The previous measurement's dirty pages are written now, not during this one
        // (a role without the right to CHECKPOINT measures without it).
        if let Err(error) = db.execute_unprepared("CHECKPOINT").await {
            eprintln!("no CHECKPOINT before {label}: {error}");
        }
    }
    let stop = CancellationToken::new();
    let consumer: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let t0 = Instant::now();
    let aggregator = Aggregator::start(
        AggregatorConfig {
            consumer,
            ..Default::default()
        },
        nats.config(),
        db,
        stop.clone(),
    )
    .await
    .unwrap();
    let stats = aggregator.stats().clone();
    while stored(&stats) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{label}: {secs:.2} s in all, decoding {:.2} s, writing {:.2} s",
        AggregatorStats::get(&stats.decode_micros) as f64 / 1e6,
        AggregatorStats::get(&stats.write_micros) as f64 / 1e6
    );
    stop.cancel();
    aggregator.wait().await;
    total as f64 / secs
}

/// The same rows, inserted with sqlx directly (no sea-orm, no NATS, no decoding):
/// multi-row INSERTs of the aggregator's size, one transaction per 10 000 rows.
async fn raw_rate(config: &DatabaseConfig, lines: &[(String, LogLine)]) -> f64 {
    let db = migrated(config).await;
    let t0 = Instant::now();
    match &db {
        sea_orm::DatabaseConnection::SqlxSqlitePoolConnection(_) => {
            let pool = db.get_sqlite_connection_pool();
            for txn_rows in lines.chunks(LINES_PER_BATCH) {
                let mut tx = pool.begin().await.unwrap();
                for chunk in txn_rows.chunks(5_000) {
                    let sql = insert_sql(chunk.len(), |_| "(?,?,?,?,?,?)".to_string());
                    let mut q = sqlx::query(&sql);
                    for (run, l) in chunk {
                        q = q
                            .bind(run.as_str())
                            .bind(l.seq as i64)
                            .bind(l.ts)
                            .bind(l.level.as_str())
                            .bind(l.message.as_str())
                            .bind(None::<String>);
                    }
                    q.execute(&mut *tx).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
        }
        sea_orm::DatabaseConnection::SqlxPostgresPoolConnection(_) => {
            let pool = db.get_postgres_connection_pool();
            for txn_rows in lines.chunks(LINES_PER_BATCH) {
                let mut tx = pool.begin().await.unwrap();
                for chunk in txn_rows.chunks(10_000) {
                    let sql = insert_sql(chunk.len(), |i| {
                        let b = i * 6;
                        format!(
                            "(${},${},${},${},${},${})",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 6
                        )
                    });
                    let mut q = sqlx::query(&sql);
                    for (run, l) in chunk {
                        q = q
                            .bind(run.as_str())
                            .bind(l.seq as i64)
                            .bind(l.ts)
                            .bind(l.level.as_str())
                            .bind(l.message.as_str())
                            .bind(None::<String>);
                    }
                    q.execute(&mut *tx).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
        }
        _ => unreachable!("SQLite or PostgreSQL"),
    }
    lines.len() as f64 / t0.elapsed().as_secs_f64()
}

fn insert_sql(rows: usize, row: impl Fn(usize) -> String) -> String {
    let mut sql =
        String::from("INSERT INTO run_logs (run_id, seq, ts, level, message, metadata) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&row(i));
    }
    sql
}
