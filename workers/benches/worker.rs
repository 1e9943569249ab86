//! Worker runtime benchmark: `cargo bench -p athanor-workers --bench worker`.
//!
//! Prints tables of what the worker costs and sends, each comparison side by side in
//! one run: `log()` beside a `tracing` non-blocking appender and one channel send per
//! line, and batched publishing beside one JetStream message per line (as fast as
//! possible, and paced at fixed rates on a realistic corpus), and a command
//! experiment's captured stdout beside an in-process experiment logging the same lines,
//! against a real nats-server started for the run.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use athanor_schemas::requests::RunRequest;
use athanor_schemas::{names, now_micros, ConfigSchema, Field, Level, LogLine};
use athanor_testkit::TestNats;
use athanor_workers::buffer::{Budget, RunBuffer};
use athanor_workers::command::CommandSpec;
use athanor_workers::{builtin, Experiment, RunContext, RunError, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing_appender::non_blocking::NonBlockingBuilder;
use tracing_subscriber::layer::SubscriberExt;

/// Target message length of the `log_storm` text.
const LINE_BYTES: usize = 120;
/// Seed of the realistic corpus, so every run replays the same text.
const CORPUS_SEED: u64 = 42;
/// Log rates of the wire comparison, lines per second.
const WIRE_RATES: [u64; 3] = [100, 10_000, 100_000];

/// Runs every table, `--quick` at a tenth of the calls and lines.
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

/// The `p` quantile of sorted samples.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// The mean of the samples.
fn mean(ns: &[u32]) -> f64 {
    ns.iter().map(|&n| n as f64).sum::<f64>() / ns.len() as f64
}

/// Runs `calls` timed calls of `op` on each of `threads` threads; returns sorted ns.
/// Each thread holds what `enter` returns (e.g. a scoped `tracing` dispatcher) for as
/// long as it runs.
fn time_calls<G>(
    threads: usize,
    calls: usize,
    enter: impl Fn() -> G + Sync,
    op: impl Fn(usize, usize) -> Box<dyn FnMut() + Send> + Sync,
) -> Vec<u32> {
    let mut all = Vec::with_capacity(threads * calls);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (op, enter) = (&op, &enter);
                s.spawn(move || {
                    let _entered = enter();
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

/// Prints one row of the producer-cost table.
fn cost_row(what: &str, threads: usize, ns: &[u32]) {
    println!(
        "| {what} | {threads} | {} | {} | {:.0} |",
        percentile(ns, 0.5),
        percentile(ns, 0.99),
        mean(ns)
    );
}

/// Prints ns per call of `log()` beside the alternatives, with 1 and 4 threads.
fn producer_cost(calls: usize) {
    let lines = builtin::sample_lines(4096, LINE_BYTES, 1);
    println!("\n## Producer cost: ns per call ({calls} calls per thread; message String built before timing)\n");
    println!("| what | threads | p50 ns | p99 ns | mean ns |");
    println!("|---|---:|---:|---:|---:|");
    let timer = time_calls(1, calls, || (), |_, _| Box::new(|| {}));
    cost_row("timer overhead (empty call)", 1, &timer);
    for threads in [1, 4] {
        let ns = log_into_buffer(&lines, threads, calls);
        cost_row("`log()` into RunBuffer", threads, &ns);
        let ns = channel_send(&lines, threads, calls);
        cost_row("one `sync_channel` send per line", threads, &ns);
        for lossy in [true, false] {
            let (ns, what) = tracing_non_blocking(&lines, threads, calls, lossy);
            cost_row(&what, threads, &ns);
        }
    }
}

/// `log()` calls while a flusher-like thread drains and releases every 100 ms.
fn log_into_buffer(lines: &[(Level, String)], threads: usize, calls: usize) -> Vec<u32> {
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
    let ns = time_calls(
        threads,
        calls,
        || (),
        |_, i| {
            let (level, msg) = lines[i % lines.len()].clone();
            let buffer = buffer.clone();
            let mut msg = Some(msg);
            Box::new(move || buffer.log(level, msg.take().unwrap(), None))
        },
    );
    stop.store(true, Ordering::Relaxed);
    drainer.join().unwrap();
    ns
}

/// One bounded channel send per line, to a consumer thread.
fn channel_send(lines: &[(Level, String)], threads: usize, calls: usize) -> Vec<u32> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<LogLine>(1 << 16);
    let consumer = std::thread::spawn(move || rx.into_iter().count());
    let ns = time_calls(
        threads,
        calls,
        || (),
        |_, i| {
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
        },
    );
    drop(tx);
    consumer.join().unwrap();
    ns
}

/// `tracing::info!` with the same message, through a `tracing_subscriber::fmt` layer
/// (no ANSI) into `tracing-appender`'s non-blocking writer (its default 128 000-line
/// queue, `lossy` or blocking when full) whose thread writes to a line-counting sink.
/// Every timed thread sets the dispatcher as its own default. Returns the samples and
/// the row's label, which says how many lines were dropped.
fn tracing_non_blocking(
    lines: &[(Level, String)],
    threads: usize,
    calls: usize,
    lossy: bool,
) -> (Vec<u32>, String) {
    let written = Arc::new(AtomicU64::new(0));
    let (writer, _guard) = NonBlockingBuilder::default()
        .lossy(lossy)
        .finish(LineCounter(written.clone()));
    let dropped = writer.error_counter();
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer);
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    let ns = time_calls(
        threads,
        calls,
        || tracing::dispatcher::set_default(&dispatch),
        |_, i| {
            let msg = lines[i % lines.len()].1.clone();
            Box::new(move || tracing::info!("{msg}"))
        },
    );
    // Every call must have been written or counted as dropped: proof it was measured.
    let total = (threads * calls) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::Relaxed) + (dropped.dropped_lines() as u64) < total {
        assert!(
            Instant::now() < deadline,
            "tracing lines neither written nor dropped"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let what = if lossy {
        format!(
            "`tracing::info!` → fmt → `non_blocking` (lossy, default; {} of {total} dropped)",
            dropped.dropped_lines()
        )
    } else {
        "`tracing::info!` → fmt → `non_blocking` `.lossy(false)`".to_string()
    };
    (ns, what)
}

/// A sink that discards what it is given and counts the lines.
struct LineCounter(Arc<AtomicU64>);

impl Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let lines = buf.iter().filter(|&&b| b == b'\n').count();
        self.0.fetch_add(lines as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------- pipeline

/// One line as an experiment logs it.
#[derive(Clone)]
struct CorpusLine {
    level: Level,
    message: String,
    metadata: Option<Value>,
}

impl CorpusLine {
    /// A line without metadata.
    fn plain((level, message): (Level, String)) -> Self {
        CorpusLine {
            level,
            message,
            metadata: None,
        }
    }

    /// Logs it through `ctx`, with its metadata when it has some.
    fn log(&self, ctx: &RunContext) {
        match &self.metadata {
            Some(meta) => ctx.log_with(self.level, self.message.clone(), meta.clone()),
            None => ctx.log(self.level, self.message.clone()),
        }
    }

    /// The line as one JetStream message per line carries it.
    fn to_log_line(&self, seq: u64) -> LogLine {
        LogLine {
            seq,
            ts: now_micros(),
            level: self.level,
            message: self.message.clone(),
            metadata: self.metadata.clone(),
        }
    }

    /// Bytes of what was logged: the message, plus its metadata as compact JSON.
    fn text_len(&self) -> usize {
        self.message.len() + self.metadata.as_ref().map_or(0, |m| m.to_string().len())
    }
}

/// Text bytes of the first `n` lines replayed from `lines`.
fn text_bytes(lines: &[CorpusLine], n: usize) -> u64 {
    (0..n)
        .map(|i| lines[i % lines.len()].text_len() as u64)
        .sum()
}

/// How many of `n` lines paced at `rate` lines/s (0: not paced) are due by now.
fn due(start: Instant, rate: u64, n: usize) -> usize {
    if rate == 0 {
        return n;
    }
    ((start.elapsed().as_secs_f64() * rate as f64) as usize + 1).min(n)
}

/// Logs pre-generated lines (so the figure is the worker's, not the text
/// generator's), as fast as it can or paced at `lines_per_second`.
struct Replay {
    name: &'static str,
    lines: Arc<Vec<CorpusLine>>,
}

impl Experiment for Replay {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        "bench: replays pre-generated lines"
    }
    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::int("lines").default(1000),
            Field::int("lines_per_second").default(0),
        ])
    }
    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let n = ctx.config_i64("lines").unwrap() as usize;
        let rate = ctx.config_i64("lines_per_second").unwrap() as u64;
        let start = Instant::now();
        let mut i = 0;
        while i < n {
            let due = due(start, rate, n);
            if i >= due {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for line in i..due {
                self.lines[line % self.lines.len()].log(ctx);
            }
            i = due;
        }
        Ok(())
    }
}

/// A run request for `experiment`, as a client would send it.
fn request(experiment: &str, config: Value) -> RunRequest {
    RunRequest {
        run_id: names::new_run_id(),
        experiment: experiment.into(),
        config,
        instance_id: None,
        requested_at: now_micros(),
    }
}

/// The worker's publish counters at one moment (or their growth over a run).
struct Snapshot {
    batches: u64,
    lines: u64,
    wire: u64,
    json: u64,
}

impl Snapshot {
    /// The counters now.
    fn of(worker: &Worker) -> Snapshot {
        let s = worker.stats();
        Snapshot {
            batches: s.batches.load(Ordering::Relaxed),
            lines: s.lines.load(Ordering::Relaxed),
            wire: s.wire_bytes.load(Ordering::Relaxed),
            json: s.json_bytes.load(Ordering::Relaxed),
        }
    }

    /// What was published between `before` and `self`.
    fn since(&self, before: &Snapshot) -> Snapshot {
        Snapshot {
            batches: self.batches - before.batches,
            lines: self.lines - before.lines,
            wire: self.wire - before.wire,
            json: self.json - before.json,
        }
    }
}

/// Runs `experiment` until its final batch is acknowledged; returns the seconds that
/// took and what the worker published meanwhile.
async fn timed_run(worker: &Worker, experiment: &str, config: Value) -> (f64, Snapshot) {
    let before = Snapshot::of(worker);
    let t0 = Instant::now();
    let mut run = worker.start_run(request(experiment, config)).await.unwrap();
    run.finished().await;
    let secs = t0.elapsed().as_secs_f64();
    (secs, Snapshot::of(worker).since(&before))
}

/// Starts a worker on `nats` and prints every table of what it publishes.
async fn pipeline(nats: &TestNats, scale: usize) {
    let sample: Arc<Vec<CorpusLine>> = Arc::new(
        builtin::sample_lines(65_536, LINE_BYTES, 7)
            .into_iter()
            .map(CorpusLine::plain)
            .collect(),
    );
    let corpus = Arc::new(corpus::generate(65_536, CORPUS_SEED));
    let shutdown = CancellationToken::new();
    let mut experiments = builtin::all();
    experiments.push(Arc::new(Replay {
        name: "replay",
        lines: sample.clone(),
    }));
    experiments.push(Arc::new(Replay {
        name: "replay_corpus",
        lines: corpus.clone(),
    }));
    // The same sample as a file, written by a child: `cat` (as fast as a program can
    // write) and a Python loop (buffered writes, one per line).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sample.txt");
    let mut text = String::new();
    for line in sample.iter() {
        text.push_str(&line.message);
        text.push('\n');
    }
    std::fs::write(&file, text).unwrap();
    let cycles = (2_000_000 / scale).div_ceil(sample.len());
    let specs: Vec<CommandSpec> = serde_json::from_value(json!([
        {"name": "cat_sample", "command": ["bash", "-c", format!("for i in $(seq {cycles}); do cat {}; done", file.display())]},
        {"name": "python_sample", "command": ["python3", "-c", format!(
            "import sys\nlines = open({:?}).read().splitlines(True)\nout = open(1, 'w', buffering=1 << 20)\nfor _ in range({cycles}):\n    for line in lines:\n        out.write(line)\nout.flush()\n",
            file.display().to_string())]},
    ]))
    .unwrap();
    let config = WorkerConfig::default();
    experiments.extend(athanor_workers::command::declare(&specs, &[], &config).unwrap());
    let worker = Worker::start(config, nats.config(), experiments, shutdown.clone())
        .await
        .unwrap();
    let js = nats.jetstream().await;

    throughput(&worker, &sample, 2_000_000 / scale).await;
    capture(&worker, &sample, 2_000_000 / scale).await;
    batches_per_run(&worker).await;
    batched_vs_per_line(&worker, &js, &sample, 200_000 / scale).await;
    describe_corpus(&corpus);
    let run_ms = if scale > 1 { 1000 } else { 3000 };
    wire_at_rates(&worker, &js, &corpus, run_ms).await;

    shutdown.cancel();
    worker.wait().await;
}

/// One run, `n` lines logged as fast as possible, until the final ack.
async fn throughput(worker: &Worker, sample: &[CorpusLine], n: usize) {
    let (secs, d) = timed_run(worker, "replay", json!({ "lines": n })).await;
    println!("\n## Worker publish throughput (one run, {n} lines of ~{LINE_BYTES} bytes, logged as fast as possible, until the final ack)\n");
    println!("| lines/s | batches | MB on the wire | JSON MB | text MB | compression vs JSON | compression vs text |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let text = text_bytes(sample, n) as f64;
    println!(
        "| {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1}x | {:.1}x |",
        n as f64 / secs,
        d.batches,
        d.wire as f64 / 1e6,
        d.json as f64 / 1e6,
        text / 1e6,
        d.json as f64 / d.wire as f64,
        text / d.wire as f64
    );
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The same `n` sample lines from an in-process experiment and from child processes
/// writing them to stdout, until the final ack: lines/s, and the CPU this process
/// (the worker) used per 100 000 lines.
async fn capture(worker: &Worker, sample: &[CorpusLine], n: usize) {
    let lines = n.div_ceil(sample.len()) * sample.len();
    println!("\n## Command capture (one run, {lines} lines of ~{LINE_BYTES} bytes written flat out, until the final ack)\n");
    println!("| producer | lines/s | vs in-process | batches | worker CPU s | worker CPU per 100 000 lines/s (cores) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut reference = None;
    for (label, experiment, config) in [
        (
            "in-process Rust experiment, log() per line (its CPU included)",
            "replay",
            json!({ "lines": lines }),
        ),
        (
            "child `cat` of the lines, stdout captured",
            "cat_sample",
            json!({}),
        ),
        (
            "child python3 writing each line (1 MiB buffer), stdout captured",
            "python_sample",
            json!({}),
        ),
    ] {
        let cpu = cpu_seconds();
        let (secs, d) = timed_run(worker, experiment, config).await;
        let cpu = cpu_seconds() - cpu;
        assert_eq!(
            d.lines as usize, lines,
            "{experiment}: every line published"
        );
        let rate = lines as f64 / secs;
        let reference = *reference.get_or_insert(rate);
        println!(
            "| {label} | {rate:.0} | {:.0} % | {} | {cpu:.2} | {:.2} |",
            100.0 * rate / reference,
            d.batches,
            cpu / (lines as f64 / 100_000.0),
        );
    }
}

/// Batches per second per run at fixed log rates (log_storm's own text).
async fn batches_per_run(worker: &Worker) {
    println!("\n## Batch messages per run (log_storm, 3 s, line_bytes {LINE_BYTES})\n");
    println!("| lines/s | lines | batches | run ms | batches/s | lines per batch | compression vs JSON |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for rate in [1_000u64, 100_000] {
        let config =
            json!({ "lines_per_second": rate, "duration_ms": 3000, "line_bytes": LINE_BYTES });
        let (secs, d) = timed_run(worker, "log_storm", config).await;
        let ms = secs * 1000.0;
        println!(
            "| {rate} | {} | {} | {ms:.0} | {:.1} | {:.0} | {:.1}x |",
            d.lines,
            d.batches,
            d.batches as f64 / secs,
            d.lines as f64 / d.batches as f64,
            d.json as f64 / d.wire as f64
        );
    }
}

/// The same `n` lines batched (worker) vs one JetStream message per line, unpaced.
async fn batched_vs_per_line(
    worker: &Worker,
    js: &jetstream::Context,
    sample: &[CorpusLine],
    n: usize,
) {
    let (batched_secs, d) = timed_run(worker, "replay", json!({ "lines": n })).await;
    let (per_line_secs, per_line_bytes) = one_message_per_line(js, sample, n, 0).await;
    println!("\n## Batched vs one message per line ({n} lines, both acknowledged by JetStream)\n");
    println!("| design | messages | lines/s | bytes on the wire | messages per 1 000 lines |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| one zstd batch per run per 100 ms | {} | {:.0} | {} | {:.2} |",
        d.batches,
        n as f64 / batched_secs,
        d.wire,
        d.batches as f64 * 1000.0 / n as f64
    );
    println!(
        "| one message per line | {n} | {:.0} | {per_line_bytes} | 1000 |",
        n as f64 / per_line_secs
    );
}

/// Publishes each line as its own JSON message (the design Athanor replaces), paced at
/// `rate` lines/s (0: as fast as it can), keeping up to 1 024 acks in flight. Returns
/// the seconds until the last ack and the payload bytes sent.
async fn one_message_per_line(
    js: &jetstream::Context,
    lines: &[CorpusLine],
    n: usize,
    rate: u64,
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
    let mut i = 0;
    while i < n {
        let due = due(t0, rate, n);
        if i >= due {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for seq in i..due {
            let line = lines[seq % lines.len()].to_log_line(seq as u64);
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
        i = due;
    }
    for ack in inflight {
        ack.await.unwrap();
    }
    (t0.elapsed().as_secs_f64(), bytes)
}

/// Prints what the realistic corpus holds.
fn describe_corpus(corpus: &[CorpusLine]) {
    let mut lens: Vec<usize> = corpus.iter().map(CorpusLine::text_len).collect();
    lens.sort_unstable();
    let share = |keep: &dyn Fn(&CorpusLine) -> bool| {
        100.0 * corpus.iter().filter(|l| keep(l)).count() as f64 / corpus.len() as f64
    };
    println!(
        "\n## Realistic corpus ({} lines, seed {CORPUS_SEED}; text = message + metadata JSON)\n",
        corpus.len()
    );
    println!("| mean bytes | p50 | p99 | max | with JSON metadata | multi-line | stack traces | ≥ 1 KiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.0} | {} | {} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% |",
        lens.iter().sum::<usize>() as f64 / lens.len() as f64,
        lens[lens.len() / 2],
        lens[lens.len() * 99 / 100],
        lens[lens.len() - 1],
        share(&|l| l.metadata.is_some()),
        share(&|l| l.message.contains('\n')),
        share(&|l| l.message.contains("Traceback") || l.message.contains("stack backtrace")),
        share(&|l| l.text_len() >= 1024)
    );
}

/// What one design sent for one rate of the wire comparison.
struct WireRun {
    lines: u64,
    secs: f64,
    messages: u64,
    /// Message payloads (a batch also carries a few hundred bytes of headers, a
    /// per-line message none).
    payload: u64,
    /// The JSON the payloads encode (the payloads themselves when not compressed).
    json: u64,
    text: u64,
}

impl WireRun {
    /// Prints the run as a row of the wire table.
    fn print(&self, rate: u64, design: &str) {
        println!(
            "| {rate} | {design} | {} | {:.0} | {} | {:.1} | {} | {:.1}x | {:.2}x |",
            self.lines,
            self.lines as f64 / self.secs,
            self.messages,
            self.messages as f64 / self.secs,
            self.payload,
            self.json as f64 / self.payload as f64,
            self.text as f64 / self.payload as f64
        );
    }
}

/// Messages and bytes per run at fixed log rates on the realistic corpus: the worker
/// (a paced replay) beside a paced publisher of one JetStream message per line.
async fn wire_at_rates(
    worker: &Worker,
    js: &jetstream::Context,
    corpus: &[CorpusLine],
    run_ms: u64,
) {
    println!("\n## Wire per run at fixed rates (realistic corpus, {run_ms} ms per run, until the last ack)\n");
    println!("| target lines/s | design | lines | lines/s | messages | messages/s | bytes on the wire | compression vs JSON | compression vs text |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for rate in WIRE_RATES {
        let n = (rate * run_ms / 1000) as usize;
        let text = text_bytes(corpus, n);
        let config = json!({ "lines": n, "lines_per_second": rate });
        let (secs, d) = timed_run(worker, "replay_corpus", config).await;
        let batched = WireRun {
            lines: d.lines,
            secs,
            messages: d.batches,
            payload: d.wire,
            json: d.json,
            text,
        };
        batched.print(rate, "one zstd batch per run per 100 ms");
        let (secs, payload) = one_message_per_line(js, corpus, n, rate).await;
        let per_line = WireRun {
            lines: n as u64,
            secs,
            messages: n as u64,
            payload,
            json: payload,
            text,
        };
        per_line.print(rate, "one message per line");
    }
}

// ---------------------------------------------------------------- realistic corpus

/// A deterministic corpus of training-run log text: short status lines, metric lines
/// dense with numbers, lines carrying JSON metadata, warnings, data-loading lines with
/// ids and hashes, multi-KB dumps, and multi-line Python and Rust stack traces.
mod corpus {
    use std::fmt::Write as _;

    use athanor_schemas::Level;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{json, Value};

    use super::CorpusLine;

    /// `n` lines from `seed`: the same seed gives the same lines.
    pub(super) fn generate(n: usize, seed: u64) -> Vec<CorpusLine> {
        let mut g = Generator {
            rng: SmallRng::seed_from_u64(seed),
            step: 0,
        };
        (0..n).map(|_| g.next_line()).collect()
    }

    /// Frames of Python tracebacks, as printed.
    const PY_FRAMES: &[&str] = &[
        "  File \"/opt/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py\", line 631, in __next__\n    data = self._next_data()",
        "  File \"/opt/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py\", line 1346, in _next_data\n    return self._process_data(data)",
        "  File \"/opt/venv/lib/python3.11/site-packages/torch/_utils.py\", line 705, in reraise\n    raise exception",
        "  File \"/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py\", line 1518, in _wrapped_call_impl\n    return self._call_impl(*args, **kwargs)",
        "  File \"/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py\", line 1527, in _call_impl\n    return forward_call(*args, **kwargs)",
        "  File \"/opt/venv/lib/python3.11/site-packages/torch/nn/parallel/distributed.py\", line 1519, in forward\n    inputs, kwargs = self._pre_forward(*inputs, **kwargs)",
        "  File \"/srv/train/model.py\", line 214, in forward\n    h = x + self.attn(self.ln_1(x), mask=mask)",
        "  File \"/srv/train/model.py\", line 131, in forward\n    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))",
        "  File \"/srv/train/train.py\", line 388, in train_step\n    loss = model(batch[\"input_ids\"], labels=batch[\"labels\"]).loss",
        "  File \"/srv/train/train.py\", line 512, in main\n    metrics = train_step(model, batch, optimizer)",
        "  File \"/srv/train/data.py\", line 77, in __getitem__\n    return self.tokenizer(row[\"text\"], truncation=True, max_length=self.max_len)",
    ];

    /// Frames of Rust backtraces: symbol and location, as printed.
    const RS_FRAMES: &[&str] = &[
        "std::panicking::begin_panic_handler::{{closure}}\n             at /rustc/29483883eed69d5fb4db01964cdf2af4d86e9cb2/library/std/src/panicking.rs:697:13",
        "core::panicking::panic_fmt\n             at /rustc/29483883eed69d5fb4db01964cdf2af4d86e9cb2/library/core/src/panicking.rs:75:14",
        "core::result::unwrap_failed\n             at /rustc/29483883eed69d5fb4db01964cdf2af4d86e9cb2/library/core/src/result.rs:1704:5",
        "shard_reader::Reader::next_record\n             at ./src/shard.rs:212:17",
        "shard_reader::Reader::fill\n             at ./src/shard.rs:160:9",
        "<shard_reader::Loader as futures_core::stream::Stream>::poll_next\n             at ./src/loader.rs:88:22",
        "tokio::runtime::task::core::Core<T,S>::poll::{{closure}}\n             at /root/.cargo/registry/src/index.crates.io-6f17d22bba15001f/tokio-1.48.0/src/runtime/task/core.rs:331:17",
        "tokio::runtime::task::harness::Harness<T,S>::poll\n             at /root/.cargo/registry/src/index.crates.io-6f17d22bba15001f/tokio-1.48.0/src/runtime/task/harness.rs:151:15",
        "tokio::runtime::scheduler::multi_thread::worker::Context::run_task\n             at /root/.cargo/registry/src/index.crates.io-6f17d22bba15001f/tokio-1.48.0/src/runtime/scheduler/multi_thread/worker.rs:591:13",
        "std::sys::pal::unix::thread::Thread::new::thread_start\n             at /rustc/29483883eed69d5fb4db01964cdf2af4d86e9cb2/library/std/src/sys/pal/unix/thread.rs:105:17",
    ];

    /// Weight matrices of a transformer layer, as named in the gradient-norm dump.
    const LAYERS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.up", "mlp.down"];

    /// The generator's state: its random source and the training step.
    struct Generator {
        rng: SmallRng,
        /// Training step, advancing one per line.
        step: u64,
    }

    /// A line without metadata.
    fn line(level: Level, message: String) -> CorpusLine {
        CorpusLine {
            level,
            message,
            metadata: None,
        }
    }

    impl Generator {
        /// The mix, per 1 000 lines: 250 status, 350 metrics, 150 with metadata, 100
        /// warnings, 110 data loading, 25 dumps, 10 Python and 5 Rust stack traces.
        fn next_line(&mut self) -> CorpusLine {
            self.step += 1;
            match self.rng.random_range(0..1000) {
                0..250 => self.status(),
                250..600 => self.metrics(),
                600..750 => self.with_metadata(),
                750..850 => self.warning(),
                850..960 => self.data_loading(),
                960..985 => self.dump(),
                985..995 => self.python_traceback(),
                _ => self.rust_panic(),
            }
        }

        /// `digits` random hex digits: ids and hashes, which do not compress.
        fn hex(&mut self, digits: usize) -> String {
            let mut s = String::with_capacity(digits + 16);
            while s.len() < digits {
                let _ = write!(s, "{:016x}", self.rng.random::<u64>());
            }
            s.truncate(digits);
            s
        }

        /// A Python `logging` prefix with a wall-clock time derived from the step.
        fn prefix(&self, source: &str) -> String {
            let ms = 4 * 3_600_000 + self.step * 37;
            let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
            format!(
                "2026-11-27 {h:02}:{m:02}:{s:02},{:03} INFO {source} - ",
                ms % 1000
            )
        }

        /// A short status line.
        fn status(&mut self) -> CorpusLine {
            let (step, r) = (self.step, &mut self.rng);
            let text = match r.random_range(0..8) {
                0 => "heartbeat ok".to_string(),
                1 => format!("rank {} ready", r.random_range(0..64)),
                2 => format!(
                    "epoch {} done in {:.1}s",
                    step / 5000,
                    r.random_range(200.0..900.0)
                ),
                3 => format!(
                    "GPU{}: {}C {}W {}MiB/81920MiB util={}%",
                    r.random_range(0..8),
                    r.random_range(45..84),
                    r.random_range(180..700),
                    r.random_range(20_000..80_000),
                    r.random_range(60..100)
                ),
                4 => format!(
                    "checkpoint saved: step_{step:07}.pt ({:.2} GiB)",
                    r.random_range(1.0..30.0)
                ),
                5 => format!("waiting for {} dataloader workers", r.random_range(1..16)),
                6 => "lr warmup finished".to_string(),
                _ => format!("throughput {:.1} samples/s", r.random_range(100.0..900.0)),
            };
            line(Level::Info, text)
        }

        /// A training-metrics line dense with numbers, often with a `logging` prefix.
        fn metrics(&mut self) -> CorpusLine {
            let prefix = if self.rng.random_bool(0.6) {
                self.prefix("trainer.py:412")
            } else {
                String::new()
            };
            let (step, r) = (self.step, &mut self.rng);
            let loss = 2.5 / (1.0 + step as f64 * 1e-3) + r.random::<f64>() * 0.05;
            let text = format!(
                "{prefix}step {}/50000 | epoch {} | loss {loss:.4} | ppl {:.2} | lr {:.3e} | grad_norm {:.3} | tokens/s {} | mem {:.1}GiB",
                step % 50_000,
                step / 5000,
                loss.exp(),
                3e-4 * (1.0 - (step % 50_000) as f64 / 50_000.0),
                r.random::<f64>() * 3.0,
                r.random_range(40_000..52_000),
                r.random_range(30.0..78.0)
            );
            line(Level::Info, text)
        }

        /// A short message with a JSON metadata object (eval, request or system stats).
        fn with_metadata(&mut self) -> CorpusLine {
            let (message, metadata) = match self.rng.random_range(0..3) {
                0 => ("eval".to_string(), self.eval_metadata()),
                1 => ("request served".to_string(), self.request_metadata()),
                _ => ("system stats".to_string(), self.system_metadata()),
            };
            CorpusLine {
                level: Level::Info,
                message,
                metadata: Some(metadata),
            }
        }

        /// Evaluation metrics.
        fn eval_metadata(&mut self) -> Value {
            let (step, r) = (self.step, &mut self.rng);
            json!({
                "step": step,
                "split": if r.random_bool(0.5) { "val" } else { "test" },
                "metrics": {
                    "loss": r.random_range(1.0..3.0),
                    "accuracy": r.random_range(0.5..0.95),
                    "f1": r.random_range(0.5..0.95),
                    "bleu": r.random_range(10.0..40.0),
                },
                "samples": r.random_range(256..8192),
                "host": format!("node-{:02}", r.random_range(0..32)),
                "gpu": r.random_range(0..8),
                "tags": ["eval", "bf16"],
            })
        }

        /// An inference request's id, status and latency.
        fn request_metadata(&mut self) -> Value {
            let id = self.hex(32);
            let r = &mut self.rng;
            let status = [200, 200, 200, 429, 503][r.random_range(0..5)];
            json!({
                "request_id": id,
                "status": status,
                "latency_ms": r.random_range(0.5..250.0),
                "path": "/v1/infer",
                "client": format!("10.0.{}.{}", r.random_range(0..8), r.random_range(1..255)),
                "bytes": r.random_range(200..65_536),
            })
        }

        /// Host and per-GPU statistics.
        fn system_metadata(&mut self) -> Value {
            let r = &mut self.rng;
            let gpus: Vec<Value> = (0..r.random_range(1..=8))
                .map(|id| {
                    json!({
                        "id": id,
                        "util": r.random_range(0..100),
                        "mem_mb": r.random_range(1000..80_000),
                        "temp_c": r.random_range(40..85),
                        "power_w": r.random_range(80.0..700.0),
                    })
                })
                .collect();
            json!({
                "cpu_pct": r.random_range(0.0..100.0),
                "rss_mb": r.random_range(2000..64_000),
                "open_files": r.random_range(100..4000),
                "gpus": gpus,
            })
        }

        /// A warning: library `UserWarning`s, NCCL, loss scaling, stragglers.
        fn warning(&mut self) -> CorpusLine {
            let comm = self.hex(12);
            let (step, r) = (self.step, &mut self.rng);
            let text = match r.random_range(0..4) {
                0 => format!(
                    "/opt/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:557: UserWarning: This DataLoader will create {} worker processes in total. Our suggested max number of worker in current system is {}, which is smaller than what this DataLoader is going to create.",
                    r.random_range(8..64),
                    r.random_range(2..8)
                ),
                1 => format!(
                    "NCCL WARN Call to recv from 10.0.{}.{}<{}> failed : Connection reset by peer (rank {}, comm 0x{comm})",
                    r.random_range(0..8),
                    r.random_range(1..255),
                    r.random_range(30_000..60_000),
                    r.random_range(0..64)
                ),
                2 => format!(
                    "gradient overflow at step {step}, scaling loss from {} to {}; skipping update",
                    2u64.pow(r.random_range(8..16)),
                    2u64.pow(r.random_range(1..8))
                ),
                _ => format!(
                    "slow step {step}: {:.1}s (p50 {:.2}s); straggler rank {} on node-{:02}",
                    r.random_range(2.0..30.0),
                    r.random_range(0.3..0.9),
                    r.random_range(0..64),
                    r.random_range(0..32)
                ),
            };
            line(Level::Warn, text)
        }

        /// A data-loading line with paths, counts, ids and hashes.
        fn data_loading(&mut self) -> CorpusLine {
            let (sha, key) = (self.hex(64), self.hex(16));
            let r = &mut self.rng;
            let text = match r.random_range(0..3) {
                0 => format!(
                    "loaded shard s3://athanor-datasets/c4/en/train-{:05}-of-01024.json.gz: {} records, {:.1} MB in {:.2}s (sha256 {sha})",
                    r.random_range(0..1024),
                    r.random_range(10_000..400_000),
                    r.random_range(5.0..900.0),
                    r.random_range(0.1..30.0)
                ),
                1 => format!(
                    "tokenized {} docs ({} tokens) from /mnt/data/shard-{:04}.parquet; cache key {key}",
                    r.random_range(100..5000),
                    r.random_range(100_000..9_000_000),
                    r.random_range(0..4096)
                ),
                _ => format!(
                    "prefetch queue depth={} wait={:.2}ms shard={:05}",
                    r.random_range(0..64),
                    r.random_range(0.0..4.0),
                    r.random_range(0..4096)
                ),
            };
            line(Level::Debug, text)
        }

        /// A multi-KB line: a per-layer gradient-norm table or a resolved config.
        fn dump(&mut self) -> CorpusLine {
            if self.rng.random_bool(0.5) {
                return line(Level::Info, self.resolved_config());
            }
            let mut text = format!("per-layer grad norms at step {}:", self.step);
            for layer in 0..self.rng.random_range(24..=48) {
                let _ = write!(text, "\n  layer {layer:02}:");
                for name in LAYERS {
                    let _ = write!(text, " {name}={:.5}", self.rng.random_range(0.0..0.2));
                }
            }
            line(Level::Info, text)
        }

        /// The run's resolved configuration, pretty-printed JSON.
        fn resolved_config(&mut self) -> String {
            let r = &mut self.rng;
            let config = json!({
                "model": { "name": "athanor-1.3b", "n_layer": 24, "n_head": 16, "d_model": 2048,
                    "dropout": r.random_range(0.0..0.2), "rotary": true, "vocab_size": 50_304 },
                "optimizer": { "name": "adamw", "lr": r.random_range(1e-4..6e-4), "betas": [0.9, 0.95],
                    "weight_decay": 0.1, "warmup_steps": r.random_range(500..4000), "schedule": "cosine" },
                "data": { "train": "s3://athanor-datasets/c4/en/train-*", "seq_len": 2048,
                    "batch_size": r.random_range(8..64), "num_workers": 8, "shuffle_seed": r.random::<u32>() },
                "trainer": { "precision": "bf16", "grad_clip": 1.0, "max_steps": 50_000,
                    "eval_every": 1000, "checkpoint_every": 5000, "devices": 8, "nodes": r.random_range(1..16) },
            });
            format!(
                "resolved config:\n{}",
                serde_json::to_string_pretty(&config).unwrap()
            )
        }

        /// A multi-line Python traceback ending in a CUDA OOM, KeyError or NCCL timeout.
        fn python_traceback(&mut self) -> CorpusLine {
            let mut text = String::from("Traceback (most recent call last):\n");
            for _ in 0..self.rng.random_range(4..=14) {
                let frame = PY_FRAMES[self.rng.random_range(0..PY_FRAMES.len())];
                let _ = writeln!(text, "{frame}");
            }
            let r = &mut self.rng;
            let _ = match r.random_range(0..3) {
                0 => write!(
                    text,
                    "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate {:.2} GiB. GPU {} has a total capacity of 79.15 GiB of which {:.2} MiB is free. Of the allocated memory {:.2} GiB is allocated by PyTorch, and {:.2} MiB is reserved by PyTorch but unallocated.",
                    r.random_range(0.1..8.0),
                    r.random_range(0..8),
                    r.random_range(1.0..900.0),
                    r.random_range(40.0..78.0),
                    r.random_range(10.0..900.0)
                ),
                1 => write!(
                    text,
                    "KeyError: Caught KeyError in DataLoader worker process {}.\nKeyError: 'input_ids'",
                    r.random_range(0..8)
                ),
                _ => write!(
                    text,
                    "RuntimeError: NCCL communicator was aborted on rank {0}. Original reason for failure was: [Rank {0}] Watchdog caught collective operation timeout: WorkNCCL(SeqNum={1}, OpType=ALLREDUCE, NumelIn={2}, NumelOut={2}, Timeout(ms)=600000) ran for {3} milliseconds before timing out.",
                    r.random_range(0..64),
                    r.random_range(1000..900_000),
                    r.random_range(1_000_000..200_000_000),
                    r.random_range(600_000..610_000)
                ),
            };
            line(Level::Error, text)
        }

        /// A multi-line Rust panic with its stack backtrace.
        fn rust_panic(&mut self) -> CorpusLine {
            let mut text = format!(
                "thread 'tokio-runtime-worker' panicked at src/shard.rs:212:17:\ncalled `Result::unwrap()` on an `Err` value: Os {{ code: 104, kind: ConnectionReset, message: \"Connection reset by peer\" }} (shard {}, offset {})\nstack backtrace:",
                self.rng.random_range(0..1024),
                self.rng.random_range(0..1u64 << 34)
            );
            let depth = self.rng.random_range(8..=24);
            for i in 0..depth {
                let frame = RS_FRAMES[(i + self.rng.random_range(0..2)) % RS_FRAMES.len()];
                let _ = write!(text, "\n  {i:>3}: {frame}");
            }
            text.push_str("\nnote: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.");
            line(Level::Error, text)
        }
    }
}
