use std::fmt::Write as _;
use std::time::{Duration, Instant};

use athanor_schemas::{ConfigSchema, Field, Level};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::{Experiment, RunContext, RunError};

/// Emits exactly `lines_per_second * duration_ms / 1000` realistic log lines at the
/// given rate, from `threads` threads.
pub struct LogStorm;

impl Experiment for LogStorm {
    fn name(&self) -> &str {
        "log_storm"
    }

    fn description(&self) -> &str {
        "Load generator: realistic training-log lines (mixed levels, lengths and numbers) at a fixed rate."
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::int("lines_per_second")
                .describe("Lines per second, all threads together")
                .default(1000)
                .min(1.0)
                .max(10_000_000.0),
            Field::int("duration_ms")
                .describe(
                    "How long to log; the run emits lines_per_second * duration_ms / 1000 lines",
                )
                .default(5000)
                .min(0.0)
                .max(86_400_000.0),
            Field::int("line_bytes")
                .describe("Approximate message length")
                .default(120)
                .min(16.0)
                .max(65_536.0),
            Field::int("threads")
                .describe("Threads logging at once")
                .default(1)
                .min(1.0)
                .max(64.0),
            Field::bool("with_metadata")
                .describe("Attach JSON metadata to every line")
                .default(false),
        ])
    }

    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let rate = ctx.config_i64("lines_per_second").unwrap_or(1000) as u64;
        let duration_ms = ctx.config_i64("duration_ms").unwrap_or(5000) as u64;
        let line_bytes = ctx.config_i64("line_bytes").unwrap_or(120) as usize;
        let threads = ctx.config_i64("threads").unwrap_or(1).max(1) as u64;
        let with_metadata = ctx.config_bool("with_metadata").unwrap_or(false);
        let total = rate * duration_ms / 1000;
        ctx.info(format!("log_storm: {total} lines at {rate} lines/s from {threads} thread(s), ~{line_bytes} bytes each"));
        let started = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..threads {
                let count = total / threads + u64::from(t < total % threads);
                let thread_rate = rate as f64 / threads as f64;
                scope.spawn(move || {
                    storm_thread(ctx, t, count, thread_rate, line_bytes, with_metadata, total)
                });
            }
        });
        if ctx.cancelled() {
            ctx.warn("log_storm cancelled");
            return Ok(());
        }
        let secs = started.elapsed().as_secs_f64();
        ctx.result("lines_emitted", total);
        ctx.result(
            "achieved_lines_per_second",
            (total as f64 / secs.max(1e-9)).round(),
        );
        ctx.progress(total, total, Some("done"));
        Ok(())
    }
}

fn storm_thread(
    ctx: &RunContext,
    thread: u64,
    count: u64,
    rate: f64,
    line_bytes: usize,
    with_metadata: bool,
    total: u64,
) {
    let mut rng = SmallRng::seed_from_u64(0x5eed ^ thread);
    let mut text = LineText {
        rng: &mut rng,
        step: 0,
        buf: String::with_capacity(line_bytes + 64),
    };
    let start = Instant::now();
    let mut emitted = 0u64;
    while emitted < count {
        if ctx.cancelled() {
            return;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let due = ((elapsed * rate) as u64 + 1).min(count);
        if emitted >= due {
            // Until the next line is due (at least 500 µs, at most 50 ms so a cancel is
            // seen): 100 slow runs polling every 500 µs would cost the machine 200 000
            // wake-ups a second.
            let next = (emitted as f64 / rate - elapsed).clamp(0.0005, 0.05);
            std::thread::sleep(Duration::from_secs_f64(next));
            continue;
        }
        // At most ~10 ms worth of lines between cancellation checks.
        let burst_end = due.min(emitted + (rate as u64 / 100).max(64));
        while emitted < burst_end {
            let (level, message) = text.next(line_bytes);
            if with_metadata {
                let meta = json!({ "thread": thread, "step": text.step, "loss": 1.0 / (1.0 + text.step as f64), "host": "node-7", "tags": ["train", "fp16"] });
                ctx.log_with(level, message, meta);
            } else {
                ctx.log(level, message);
            }
            emitted += 1;
        }
        if thread == 0 {
            let done = (emitted * total / count.max(1)).min(total);
            ctx.progress(done, total, Some("logging"));
        }
    }
}

/// `n` lines of the text `log_storm` emits (same seed, same lines): for benchmarks
/// and compression measurements.
pub fn sample_lines(n: usize, line_bytes: usize, seed: u64) -> Vec<(Level, String)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut text = LineText {
        rng: &mut rng,
        step: 0,
        buf: String::new(),
    };
    (0..n).map(|_| text.next(line_bytes)).collect()
}

/// Generates training-log-like text of roughly the requested length.
struct LineText<'a> {
    rng: &'a mut SmallRng,
    step: u64,
    buf: String,
}

const WORDS: &[&str] = &[
    "checkpoint",
    "warmup",
    "scheduler",
    "optimizer",
    "batch",
    "shard",
    "worker",
    "allreduce",
    "cuda",
    "tensor",
    "gradient",
    "attention",
    "layer",
    "dropout",
    "tokenizer",
    "dataset",
    "prefetch",
    "queue",
    "latency",
    "epoch",
];

impl LineText<'_> {
    fn next(&mut self, target: usize) -> (Level, String) {
        self.step += 1;
        let step = self.step;
        let r = &mut *self.rng;
        let roll: u32 = r.random_range(0..100);
        let buf = &mut self.buf;
        buf.clear();
        let level = match roll {
            0..=4 => {
                let _ = write!(
                    buf,
                    "prefetch queue depth={} wait={:.2}ms shard={:05}",
                    r.random_range(0..64),
                    r.random::<f64>() * 4.0,
                    step % 4096
                );
                Level::Debug
            }
            5..=69 => {
                let _ = write!(
                    buf,
                    "epoch {} step {}/{} loss={:.4} lr={:.2e} grad_norm={:.3} tokens/s={}",
                    step / 5000,
                    step % 5000,
                    5000,
                    2.5 / (1.0 + step as f64 * 1e-3) + r.random::<f64>() * 0.05,
                    3e-4 * (1.0 - (step % 5000) as f64 / 5000.0),
                    r.random::<f64>() * 3.0,
                    r.random_range(40_000..52_000)
                );
                Level::Info
            }
            70..=87 => {
                let _ = write!(
                    buf,
                    "eval batch {}: accuracy={:.3} f1={:.3} samples={} elapsed={:.1}s",
                    step % 977,
                    0.6 + r.random::<f64>() * 0.3,
                    0.55 + r.random::<f64>() * 0.3,
                    r.random_range(256..4096),
                    r.random::<f64>() * 90.0
                );
                Level::Info
            }
            88..=96 => {
                let _ = write!(
                    buf,
                    "gradient overflow at step {step}, scaling loss by {:.1}; skipping update",
                    2f64.powi(r.random_range(1..16))
                );
                Level::Warn
            }
            _ => {
                let _ = write!(
                    buf,
                    "request {:016x} to data-loader-{} failed after {} retries: connection reset by peer",
                    r.random::<u64>(),
                    r.random_range(0..8),
                    r.random_range(1..6)
                );
                Level::Error
            }
        };
        // Vary the length around the target: 50% to 150%.
        let want = target / 2 + r.random_range(0..=target);
        while buf.len() + 1 < want {
            buf.push(' ');
            buf.push_str(WORDS[r.random_range(0..WORDS.len())]);
            if r.random_range(0..4) == 0 {
                let _ = write!(buf, "={}", r.random_range(0..10_000));
            }
        }
        buf.truncate(want.max(16).min(buf.len()));
        (level, buf.clone())
    }
}
