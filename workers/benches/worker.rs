//! Worker runtime benchmark: `cargo bench -p athanor-workers --bench worker`.
//!
//! Prints tables of what the worker costs and sends, each comparison side by side in
//! one run: `log()` beside one channel send per line, and batched publishing beside
//! one JetStream message per line, against a real nats-server started for the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use athanor_schemas::requests::RunRequest;
use athanor_schemas::{names, now_micros, ConfigSchema, Field, Level, LogLine};
use athanor_testkit::TestNats;
use athanor_workers::buffer::{Budget, RunBuffer};
use athanor_workers::{builtin, Experiment, RunContext, RunError, Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LINE_BYTES: usize = 120;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    println!(
        "# Athanor worker benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    producer_cost(2_000_000 / scale);
    let nats = TestNats::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(pipeline(&nats, scale));
}

// ---------------------------------------------------------------- producer cost

fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Runs `calls` timed calls of `op` on each of `threads` threads; returns sorted ns.
fn time_calls(
    threads: usize,
    calls: usize,
    op: impl Fn(usize, usize) -> Box<dyn FnMut() + Send> + Sync,
) -> Vec<u32> {
    let mut all = Vec::with_capacity(threads * calls);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                s.spawn(move || {
                    let mut samples = Vec::with_capacity(calls);
                    for i in 0..calls {
                        let mut call = op(t, i);
                        let t0 = Instant::now();
                        call();
                        samples.push(t0.elapsed().as_nanos() as u32);
                    }
                    samples
                })
            })
            .collect();
        for h in handles {
            all.extend(h.join().unwrap());
        }
    });
    all.sort_unstable();
    all
}

fn producer_cost(calls: usize) {
    let lines = Arc::new(builtin::sample_lines(4096, LINE_BYTES, 1));
    println!("\n## Producer cost: ns per call ({calls} calls per thread; message String built before timing)\n");
    println!("| what | threads | p50 ns | p99 ns | mean ns |");
    println!("|---|---:|---:|---:|---:|");
    let timer = time_calls(1, calls, |_, _| Box::new(|| {}));
    println!(
        "| timer overhead (empty call) | 1 | {} | {} | {:.0} |",
        percentile(&timer, 0.5),
        percentile(&timer, 0.99),
        mean(&timer)
    );
    for threads in [1, 4] {
        // log(): a flusher-like thread drains and releases every 100 ms.
        let buffer = Arc::new(RunBuffer::new(Budget::new(1 << 30), 64 << 10));
        let stop = Arc::new(AtomicBool::new(false));
        let drainer = {
            let (buffer, stop) = (buffer.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let d = buffer.drain();
                    buffer.budget().release(d.bytes);
                }
            })
        };
        let ns = time_calls(threads, calls, |_, i| {
            let (level, msg) = lines[i % lines.len()].clone();
            let buffer = buffer.clone();
            let mut msg = Some(msg);
            Box::new(move || buffer.log(level, msg.take().unwrap(), None))
        });
        stop.store(true, Ordering::Relaxed);
        drainer.join().unwrap();
        println!(
            "| `log()` into RunBuffer | {threads} | {} | {} | {:.0} |",
            percentile(&ns, 0.5),
            percentile(&ns, 0.99),
            mean(&ns)
        );

        // One bounded channel send per line, to a consumer thread.
        let (tx, rx) = std::sync::mpsc::sync_channel::<LogLine>(1 << 16);
        let consumer = std::thread::spawn(move || rx.into_iter().count());
        let ns = time_calls(threads, calls, |_, i| {
            let (level, msg) = lines[i % lines.len()].clone();
            let tx = tx.clone();
            let mut line = Some(LogLine {
                seq: i as u64,
                ts: now_micros(),
                level,
                message: msg,
                metadata: None,
            });
            Box::new(move || tx.send(line.take().unwrap()).unwrap())
        });
        drop(tx);
        consumer.join().unwrap();
        println!(
            "| one `sync_channel` send per line | {threads} | {} | {} | {:.0} |",
            percentile(&ns, 0.5),
            percentile(&ns, 0.99),
            mean(&ns)
        );
    }
}

fn mean(ns: &[u32]) -> f64 {
    ns.iter().map(|&n| n as f64).sum::<f64>() / ns.len() as f64
}

// ---------------------------------------------------------------- pipeline

/// Logs pre-generated realistic lines as fast as it can (so the figure is the
/// worker's, not the text generator's).
struct Replay(Arc<Vec<(Level, String)>>);

impl Experiment for Replay {
    fn name(&self) -> &str {
        "replay"
    }
    fn description(&self) -> &str {
        "bench: replays pre-generated lines"
    }
    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([Field::int("lines").default(1000)])
    }
    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let n = ctx.config_i64("lines").unwrap() as usize;
        for i in 0..n {
            let (level, msg) = &self.0[i % self.0.len()];
            ctx.log(*level, msg.clone());
        }
        Ok(())
    }
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

struct Snapshot {
    batches: u64,
    lines: u64,
    wire: u64,
    json: u64,
}

fn snapshot(worker: &Worker) -> Snapshot {
    let s = worker.stats();
    Snapshot {
        batches: s.batches.load(Ordering::Relaxed),
        lines: s.lines.load(Ordering::Relaxed),
        wire: s.wire_bytes.load(Ordering::Relaxed),
        json: s.json_bytes.load(Ordering::Relaxed),
    }
}

async fn pipeline(nats: &TestNats, scale: usize) {
    let sample = Arc::new(builtin::sample_lines(65_536, LINE_BYTES, 7));
    let text_bytes_per_line =
        sample.iter().map(|(_, m)| m.len()).sum::<usize>() as f64 / sample.len() as f64;
    let shutdown = CancellationToken::new();
    let mut experiments = builtin::all();
    experiments.push(Arc::new(Replay(sample.clone())));
    let worker = Worker::start(
        WorkerConfig::default(),
        nats.config(),
        experiments,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let js = nats.jetstream().await;

    // 1. Throughput: one run, lines logged as fast as possible, until the final ack.
    let n = 2_000_000 / scale;
    let before = snapshot(&worker);
    let t0 = Instant::now();
    let mut run = worker
        .start_run(request("replay", json!({ "lines": n })))
        .await
        .unwrap();
    run.finished().await;
    let secs = t0.elapsed().as_secs_f64();
    let after = snapshot(&worker);
    let (batches, wire, json_bytes) = (
        after.batches - before.batches,
        after.wire - before.wire,
        after.json - before.json,
    );
    println!("\n## Worker publish throughput (one run, {n} lines of ~{LINE_BYTES} bytes, logged as fast as possible, until the final ack)\n");
    println!("| lines/s | batches | MB on the wire | JSON MB | text MB | compression vs JSON | compression vs text |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let text = text_bytes_per_line * n as f64;
    println!(
        "| {:.0} | {batches} | {:.1} | {:.1} | {:.1} | {:.1}x | {:.1}x |",
        n as f64 / secs,
        wire as f64 / 1e6,
        json_bytes as f64 / 1e6,
        text / 1e6,
        json_bytes as f64 / wire as f64,
        text / wire as f64
    );

    // 2. Batches per second per run at fixed log rates (log_storm's own text).
    println!("\n## Batch messages per run (log_storm, 3 s, line_bytes {LINE_BYTES})\n");
    println!("| lines/s | lines | batches | run ms | batches/s | lines per batch | compression vs JSON |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for rate in [1_000u64, 100_000] {
        let before = snapshot(&worker);
        let t0 = Instant::now();
        let mut run = worker
            .start_run(request(
                "log_storm",
                json!({ "lines_per_second": rate, "duration_ms": 3000, "line_bytes": LINE_BYTES }),
            ))
            .await
            .unwrap();
        run.finished().await;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let after = snapshot(&worker);
        let (b, l) = (after.batches - before.batches, after.lines - before.lines);
        println!(
            "| {rate} | {l} | {b} | {ms:.0} | {:.1} | {:.0} | {:.1}x |",
            b as f64 / (ms / 1000.0),
            l as f64 / b as f64,
            (after.json - before.json) as f64 / (after.wire - before.wire) as f64
        );
    }

    // 3. Side by side: the same lines batched (worker) vs one JetStream message per line.
    let n = 200_000 / scale;
    let before = snapshot(&worker);
    let t0 = Instant::now();
    let mut run = worker
        .start_run(request("replay", json!({ "lines": n })))
        .await
        .unwrap();
    run.finished().await;
    let batched_secs = t0.elapsed().as_secs_f64();
    let after = snapshot(&worker);
    let (per_line_secs, per_line_bytes) = one_message_per_line(&js, &sample, n).await;
    println!("\n## Batched vs one message per line ({n} lines, both acknowledged by JetStream)\n");
    println!("| design | messages | lines/s | bytes on the wire | messages per 1 000 lines |");
    println!("|---|---:|---:|---:|---:|");
    let b = after.batches - before.batches;
    println!(
        "| one zstd batch per run per 100 ms | {b} | {:.0} | {} | {:.2} |",
        n as f64 / batched_secs,
        after.wire - before.wire,
        b as f64 * 1000.0 / n as f64
    );
    println!(
        "| one message per line | {n} | {:.0} | {per_line_bytes} | 1000 |",
        n as f64 / per_line_secs
    );

    shutdown.cancel();
    worker.wait().await;
}

/// Publishes each line as its own JSON message (the design Athanor replaces), keeping
/// up to 1 024 acks in flight.
async fn one_message_per_line(
    js: &jetstream::Context,
    sample: &[(Level, String)],
    n: usize,
) -> (f64, u64) {
    js.create_or_update_stream(jetstream::stream::Config {
        name: "BENCH_PER_LINE".into(),
        subjects: vec!["bench.per_line.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    let mut bytes = 0u64;
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..n {
        let (level, message) = &sample[i % sample.len()];
        let line = LogLine {
            seq: i as u64,
            ts: now_micros(),
            level: *level,
            message: message.clone(),
            metadata: None,
        };
        let payload = serde_json::to_vec(&line).unwrap();
        bytes += payload.len() as u64;
        inflight.push_back(
            js.publish("bench.per_line.run", payload.into())
                .await
                .unwrap(),
        );
        if inflight.len() >= 1024 {
            inflight.pop_front().unwrap().await.unwrap();
        }
    }
    for ack in inflight {
        ack.await.unwrap();
    }
    (t0.elapsed().as_secs_f64(), bytes)
}
