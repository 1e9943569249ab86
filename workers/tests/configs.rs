//! Any valid config of any built-in experiment runs without taking the worker down.
//! Found by a user: `echo` with a 100 kB message and `repeat` 16 777 216 passed
//! validation, then the process aborted allocating 1.6 TB — not a panic, so not
//! contained, and under `athanor up` the gateway and aggregator died with the worker.
//!
//! Each built-in runs its schema's corners (every field at its minimum, every field at
//! its maximum) and random valid configs, one at a time for a moment and then
//! cancelled, in a process whose address space is capped: an allocation sized by a
//! product of config values aborts this test. Its own binary, as the cap is the whole
//! process's. `ATHANOR_TEST_SEED` repeats a sequence.

use std::time::Duration;

use athanor_schemas::requests::RunRequest;
use athanor_schemas::{names, now_micros, FieldKind, RunState};
use athanor_testkit::TestNats;
use athanor_workers::{builtin, Worker, WorkerConfig};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

/// Address space allowed beyond what the process has mapped when the runs begin.
const HEADROOM: u64 = 3 << 30;
const RANDOM_CONFIGS: usize = 3;

fn string_of(rng: &mut fastrand::Rng, len: usize) -> String {
    // ASCII, multi-byte characters and markup, as users type them.
    const PIECES: [&str; 6] = ["a", "Z", "é", "🙂", "<b>", " "];
    let mut s = String::with_capacity(len + 4);
    while s.len() < len {
        s.push_str(PIECES[rng.usize(..PIECES.len())]);
    }
    s
}

/// A value for `field`: `Some(true)` its maximum, `Some(false)` its minimum, `None`
/// anywhere in between (numbers log-uniformly, so large ones come up too).
fn value(rng: &mut fastrand::Rng, field: &athanor_schemas::Field, corner: Option<bool>) -> Value {
    let (min, max) = (field.min.unwrap_or(0.0), field.max.unwrap_or(1e9));
    let number = match corner {
        Some(true) => max,
        Some(false) => min,
        None => {
            let span = (max - min).max(0.0);
            min + (span + 1.0).powf(rng.f64()) - 1.0
        }
    };
    match &field.kind {
        FieldKind::Int => json!((number.floor() as i64).clamp(min as i64, max as i64)),
        FieldKind::Float => json!(number.clamp(min, max)),
        FieldKind::Bool => json!(corner.unwrap_or_else(|| rng.bool())),
        FieldKind::Enum(values) => json!(match corner {
            Some(true) => values.last().unwrap().clone(),
            Some(false) => values[0].clone(),
            None => values[rng.usize(..values.len())].clone(),
        }),
        FieldKind::String => {
            let len = match corner {
                Some(true) => 100_000,
                Some(false) => 0,
                None => rng.usize(..100_000),
            };
            json!(string_of(rng, len))
        }
    }
}

fn address_space_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_runs_any_valid_config_under_a_memory_cap() {
    athanor_testkit::init_tracing();
    // Started before the cap: the server is a process of its own.
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let control = js.get_key_value(names::CONTROL_BUCKET).await.unwrap();
    let stop = CancellationToken::new();
    // A small output bound: a flood's final flush is then quick to publish.
    let config = WorkerConfig {
        max_pending_bytes: 16 << 20,
        ..WorkerConfig::for_tests()
    };
    let worker = Worker::start(config, nats.config(), builtin::all(), stop.clone())
        .await
        .unwrap();
    let cap = address_space_kib() * 1024 + HEADROOM;
    rustix::process::setrlimit(
        rustix::process::Resource::As,
        rustix::process::Rlimit {
            current: Some(cap),
            maximum: None,
        },
    )
    .expect("cap the address space");
    let seed = std::env::var("ATHANOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_micros() as u64);
    println!(
        "ATHANOR_TEST_SEED={seed}; address space capped at {} MiB",
        cap >> 20
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    for experiment in builtin::all() {
        let schema = experiment.config_schema();
        let corners = [Some(false), Some(true)];
        let picks = corners
            .into_iter()
            .chain(std::iter::repeat_n(None, RANDOM_CONFIGS));
        for corner in picks {
            let config: Map<String, Value> = schema
                .fields
                .iter()
                .map(|f| (f.name.clone(), value(&mut rng, f, corner)))
                .collect();
            let shown: String = serde_json::to_string(&config)
                .unwrap()
                .chars()
                .take(300)
                .collect();
            let validated = schema.validate(&Value::Object(config.clone()));
            assert!(
                validated.is_ok(),
                "{}: generated an invalid config {shown}: {validated:?}",
                experiment.name()
            );
            let run_id = names::new_run_id();
            let started = std::time::Instant::now();
            let mut handle = worker
                .start_run(RunRequest {
                    run_id: run_id.clone(),
                    experiment: experiment.name().into(),
                    config: Value::Object(config),
                    instance_id: None,
                    requested_at: now_micros(),
                })
                .await
                .unwrap_or_else(|e| panic!("{}: {e} with {shown}", experiment.name()));
            tokio::time::sleep(Duration::from_millis(200)).await;
            control
                .put(names::cancel_key(&run_id), "{}".into())
                .await
                .unwrap();
            let state = tokio::time::timeout(Duration::from_secs(60), handle.finished())
                .await
                .unwrap_or_else(|_| {
                    panic!("{}: the run did not end with {shown}", experiment.name())
                });
            assert!(
                matches!(
                    state,
                    RunState::Completed | RunState::Cancelled | RunState::Failed
                ),
                "{}: {state:?} with {shown}",
                experiment.name()
            );
            println!(
                "{} {corner:?}: {state:?} in {:.1} s",
                experiment.name(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    stop.cancel();
    worker.wait().await;
}
