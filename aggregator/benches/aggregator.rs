//! Aggregator benchmark: `cargo bench -p athanor-aggregator --bench aggregator`.
//!
//! Persisted lines per second through the whole consume → decode → write → ack path,
//! on SQLite and on PostgreSQL, side by side with a raw multi-row INSERT of the same
//! rows through sqlx (the ceiling: no NATS, no decoding, no sea-orm). PostgreSQL is
//! `ATHANOR_BENCH_DATABASE_URL` (default: the local server's `test` database); a
//! database is created for the run and dropped after.

use std::time::{Duration, Instant};

use athanor_aggregator::{Aggregator, AggregatorConfig, AggregatorStats};
use athanor_connections::db::{connect, DatabaseConfig};
use athanor_migrations::MigratorTrait;
use athanor_schemas::{codec, names, Batch, LogLine};
use athanor_testkit::TestNats;
use sea_orm::ConnectionTrait;
use tokio_util::sync::CancellationToken;

const LINES_PER_BATCH: usize = 10_000; // one 100 ms tick of a run logging 100 000 lines/s
const RUNS: usize = 4;

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
            batch.logs = (0..LINES_PER_BATCH)
                .map(|i| {
                    let seq = (b * LINES_PER_BATCH + i) as u64;
                    let (level, message) = &sample[n % sample.len()];
                    n += 1;
                    LogLine {
                        seq,
                        ts: athanor_schemas::now_micros(),
                        level: *level,
                        message: message.clone(),
                        metadata: None,
                    }
                })
                .collect();
            all_lines.extend(batch.logs.iter().map(|l| (run_id.clone(), l.clone())));
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                names::headers::MSG_ID,
                names::batch_msg_id(&run_id, b as u64).as_str(),
            );
            js.publish_with_headers(
                names::run_subject(&run_id),
                headers,
                codec::encode(&batch).payload.into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    }
    let total = all_lines.len();
    println!("# Athanor aggregator benchmark: {total} lines in {} batches of {LINES_PER_BATCH} ({RUNS} runs), ~120-byte messages\n", RUNS * batches_per_run);
    println!("| database | pipeline lines/s (consume → decode → write → ack) | raw multi-row INSERT lines/s | pipeline / raw |");
    println!("|---|---:|---:|---:|");

    let dir = tempfile::tempdir().unwrap();
    let sqlite = DatabaseConfig {
        url: Some(format!(
            "sqlite://{}",
            dir.path().join("pipeline.db").display()
        )),
        ..Default::default()
    };
    let sqlite_raw = DatabaseConfig {
        url: Some(format!("sqlite://{}", dir.path().join("raw.db").display())),
        ..Default::default()
    };
    row(
        "SQLite (WAL, synchronous=normal)",
        &nats,
        sqlite,
        sqlite_raw,
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
            let names = [
                format!("athanor_bench_{}", std::process::id()),
                format!("athanor_bench_raw_{}", std::process::id()),
            ];
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
            row(
                "PostgreSQL 15 (local)",
                &nats,
                pg(&names[0]),
                pg(&names[1]),
                &all_lines,
            )
            .await;
            for name in &names {
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .unwrap();
            }
        }
        Err(e) => println!("| PostgreSQL | skipped: {e} | | |"),
    }
}

async fn row(
    label: &str,
    nats: &TestNats,
    pipeline_db: DatabaseConfig,
    raw_db: DatabaseConfig,
    lines: &[(String, LogLine)],
) {
    let pipeline = pipeline_rate(nats, &pipeline_db, lines.len() as u64, label).await;
    let raw = raw_rate(&raw_db, lines).await;
    println!(
        "| {label} | {pipeline:.0} | {raw:.0} | {:.0}% |",
        100.0 * pipeline / raw
    );
}

async fn migrated(config: &DatabaseConfig) -> sea_orm::DatabaseConnection {
    let db = connect(config).await.unwrap();
    athanor_migrations::Migrator::up(&db, None).await.unwrap();
    db
}

/// Starts an aggregator with a consumer of its own (so it reads the whole stream) and
/// times it until every line is stored and acked.
async fn pipeline_rate(nats: &TestNats, config: &DatabaseConfig, total: u64, label: &str) -> f64 {
    let db = migrated(config).await;
    let stop = CancellationToken::new();
    let consumer = format!(
        "bench-{}",
        label.split_whitespace().next().unwrap().to_lowercase()
    );
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
    while AggregatorStats::get(&stats.lines) < total {
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
