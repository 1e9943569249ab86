//! Command experiments with real child processes (bash, python3, tqdm) against a real
//! nats-server: what the children write lands in `ATHANOR_RUNS` exactly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use athanor_schemas::requests::RunRequest;
use athanor_schemas::{names, now_micros, Level, RunState};
use athanor_testkit::{read_run, RunOutput, TestNats};
use athanor_workers::command::{declare, CommandSpec};
use athanor_workers::{Experiment, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A worker hosting the command experiments declared by `specs` (JSON, as the
/// configuration file would have them), with relative paths taken from `dir`.
struct TestWorker {
    worker: Worker,
    shutdown: CancellationToken,
}

impl TestWorker {
    async fn start(nats: &TestNats, config: WorkerConfig, dir: &Path, specs: Value) -> Self {
        athanor_testkit::init_tracing();
        let mut specs: Vec<CommandSpec> = serde_json::from_value(specs).unwrap();
        for spec in &mut specs {
            spec.base_dir = Some(dir.to_path_buf());
        }
        let experiments: Vec<Arc<dyn Experiment>> =
            declare(&specs, &[], &config).expect("valid declarations");
        let shutdown = CancellationToken::new();
        let worker = Worker::start(config, nats.config(), experiments, shutdown.clone())
            .await
            .expect("worker starts");
        TestWorker { worker, shutdown }
    }

    async fn run(&self, nats: &TestNats, experiment: &str, config: Value) -> (RunState, RunOutput) {
        let mut handle = self.start_run(experiment, config).await;
        let state = handle.finished().await;
        let out = read_run(&nats.jetstream().await, &handle.run_id, READ_TIMEOUT)
            .await
            .expect("read run");
        (state, out)
    }

    async fn start_run(&self, experiment: &str, config: Value) -> athanor_workers::RunHandle {
        self.worker
            .start_run(RunRequest {
                run_id: names::new_run_id(),
                experiment: experiment.into(),
                config,
                instance_id: None,
                requested_at: now_micros(),
            })
            .await
            .expect("run starts")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.worker.wait().await;
    }
}

/// A nats-server, a temp folder (relative paths' base) and a worker hosting `specs`.
async fn start(config: WorkerConfig, specs: Value) -> (TestNats, tempfile::TempDir, TestWorker) {
    let nats = TestNats::start();
    let dir = tempfile::tempdir().unwrap();
    let worker = TestWorker::start(&nats, config, dir.path(), specs).await;
    (nats, dir, worker)
}

/// The messages of the lines at `level`, in order.
fn at_level(out: &RunOutput, level: Level) -> Vec<String> {
    out.lines()
        .into_iter()
        .filter(|l| l.level == level)
        .map(|l| l.message.clone())
        .collect()
}

fn bash(name: &str, script: &str) -> Value {
    json!({"name": name, "command": ["bash", "-c", script]})
}

fn messages(out: &RunOutput) -> Vec<String> {
    out.lines().into_iter().map(|l| l.message.clone()).collect()
}

/// Every result record, in order.
fn results(out: &RunOutput) -> Vec<(String, Value)> {
    out.batches
        .iter()
        .flat_map(|b| &b.results)
        .map(|r| (r.key.clone(), r.value.clone()))
        .collect()
}

fn status(out: &RunOutput) -> (RunState, Option<String>) {
    let status = out
        .batches
        .last()
        .unwrap()
        .status
        .clone()
        .expect("terminal status");
    (status.state, status.error)
}

/// Every line once, seqs 0..n, batch_seqs gapless.
fn assert_gapless(out: &RunOutput) {
    let lines = out.lines();
    assert!(
        lines.iter().map(|l| l.seq).eq(0..lines.len() as u64),
        "seqs are not 0..n"
    );
    let final_ = out.final_batch().unwrap().final_.clone().unwrap();
    assert_eq!(final_.lines, lines.len() as u64);
    assert!(out
        .batches
        .iter()
        .map(|b| b.batch_seq)
        .eq(0..final_.batches));
}

/// Cancels the run, waits for it to end `cancelled`, and reads what it published.
async fn cancel_and_read(
    js: &async_nats::jetstream::Context,
    control: &async_nats::jetstream::kv::Store,
    handle: &mut athanor_workers::RunHandle,
) -> RunOutput {
    control
        .put(names::cancel_key(&handle.run_id), "{}".into())
        .await
        .unwrap();
    assert_eq!(handle.finished().await, RunState::Cancelled);
    read_run(js, &handle.run_id, READ_TIMEOUT).await.unwrap()
}

fn test_python() -> PathBuf {
    // The test tools' Python (scripts/setup-test-tools), which has tqdm.
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/test-python/bin/python3");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/setup-test-tools",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_lines_from_a_child_land_once_in_order_in_few_batches() {
    let nats = TestNats::start();
    let dir = tempfile::tempdir().unwrap();
    let worker = TestWorker::start(
        &nats,
        WorkerConfig::for_tests(),
        dir.path(),
        json!([bash(
            "million",
            "seq -f 'line %07g of a million, as fast as seq writes' 0 999999"
        )]),
    )
    .await;
    let started = Instant::now();
    let (state, out) = worker.run(&nats, "million", json!({})).await;
    let elapsed = started.elapsed();
    assert_eq!(state, RunState::Completed);
    assert_gapless(&out);
    let lines = out.lines();
    assert_eq!(lines.len(), 1_000_000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            line.message,
            format!("line {i:07} of a million, as fast as seq writes")
        );
        assert_eq!(line.level, Level::Info);
    }
    // One batch per tick (more only when a tick's output is over max_payload).
    let raw: usize = lines.iter().map(|l| l.message.len() + 60).sum();
    let bound = (elapsed.as_millis() / 100) as usize + raw / (1 << 20) + 3;
    assert!(
        out.batches.len() <= bound,
        "{} batches in {elapsed:?} > bound {bound}",
        out.batches.len()
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_at_the_end_of_a_child_however_it_ends() {
    // A small budget: the worker blocks on it, and stops reading, many times per run.
    let config = WorkerConfig {
        max_pending_bytes: 64 << 10,
        ..WorkerConfig::for_tests()
    };
    let (nats, _dir, worker) = start(
        config,
        json!([
            bash("no_newline", "echo first; printf 'last without newline'"),
            bash("killed", "for i in $(seq 1 2000); do echo \"out $i\"; echo \"err $i\" >&2; done; printf 'partial'; kill -9 $$"),
            bash("burst", "seq -f 'burst %g' 1 50000; echo done >&2"),
        ]),
    )
    .await;
    let (state, out) = worker.run(&nats, "no_newline", json!({})).await;
    assert_eq!(state, RunState::Completed);
    assert_eq!(messages(&out), ["first", "last without newline"]);

    let (state, out) = worker.run(&nats, "killed", json!({})).await;
    assert_eq!(state, RunState::Failed);
    assert_gapless(&out);
    let stdout = at_level(&out, Level::Info);
    let stderr = at_level(&out, Level::Warn);
    let expected_out: Vec<String> = (1..=2000)
        .map(|i| format!("out {i}"))
        .chain(["partial".to_string()])
        .collect();
    let expected_err: Vec<String> = (1..=2000).map(|i| format!("err {i}")).collect();
    assert_eq!(stdout, expected_out);
    assert_eq!(stderr, expected_err);
    let (_, error) = status(&out);
    let error = error.unwrap();
    let tail: Vec<String> = (1991..=2000).map(|i| format!("err {i}")).collect();
    assert_eq!(
        error,
        format!(
            "killed by signal 9 (SIGKILL); last lines of stderr:\n{}",
            tail.join("\n")
        )
    );

    let blocked_before = worker.worker.budget().blocked_calls();
    let (state, out) = worker.run(&nats, "burst", json!({})).await;
    assert_eq!(state, RunState::Completed);
    assert_gapless(&out);
    let lines = messages(&out);
    assert_eq!(lines.len(), 50_001);
    // Lines of one stream keep their order; the streams interleave as they are read.
    let burst: Vec<&str> = lines
        .iter()
        .filter(|l| *l != "done")
        .map(String::as_str)
        .collect();
    let expected: Vec<String> = (1..=50_000).map(|i| format!("burst {i}")).collect();
    assert!(burst
        .iter()
        .copied()
        .eq(expected.iter().map(String::as_str)));
    assert!(
        worker.worker.budget().blocked_calls() > blocked_before,
        "the capture never waited on the memory bound"
    );
    assert!(
        worker.worker.budget().peak() <= (64 << 10) + (1 << 20),
        "the bound held"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tqdm_bar_is_collapsed_to_its_states_per_tick_and_its_final_state() {
    let python = test_python();
    // 10 000 updates, one per millisecond: a bar redrawn 1 000 times a second for 10 s.
    let script = "import time\nfrom tqdm import tqdm\nfor i in tqdm(range(10000), mininterval=0, miniters=1, ascii=True, ncols=80):\n    time.sleep(0.001)\nprint('trained')\n";
    let (nats, _dir, worker) = start(
        WorkerConfig::for_tests(),
        json!([{"name": "bar", "command": [python, "-c", script]}]),
    )
    .await;
    let started = Instant::now();
    let (state, out) = worker.run(&nats, "bar", json!({})).await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(state, RunState::Completed);
    assert_gapless(&out);
    let bars = at_level(&out, Level::Warn);
    eprintln!("{} bar lines over {secs:.1} s", bars.len());
    // At most one state per 100 ms tick, plus the final one.
    assert!(
        bars.len() as f64 <= secs * 10.0 + 2.0,
        "{} lines in {secs:.1} s",
        bars.len()
    );
    assert!(bars.len() >= 20, "the bar was seen moving: {bars:?}");
    assert!(
        bars.last().unwrap().starts_with("100%|"),
        "final state: {:?}",
        bars.last()
    );
    assert!(bars.last().unwrap().contains("10000/10000"));
    let percents: Vec<u32> = bars
        .iter()
        .map(|b| b.trim_start().split('%').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "the bar only moves forward: {percents:?}"
    );
    assert!(bars.iter().all(|b| !b.contains('\r')));
    assert_eq!(at_level(&out, Level::Info), ["trained"]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colours_are_kept_other_escapes_removed_and_bad_utf8_replaced() {
    let (nats, _dir, worker) = start(
        WorkerConfig::for_tests(),
        json!([
            bash("ansi", r"printf '\033[1;32mgreen\033[0m \033]0;window title\007\033[2Jcleared\033[3;1Hmoved\n'; printf 'bad \377\376 bytes \303\n'; printf 'tab\there\a\n'"),
            {"name": "tty", "pty": true, "command": ["bash", "-c", "if [ -t 1 ]; then echo \"tty $(tput cols)\"; else echo 'no tty'; fi; echo err >&2"]},
        ]),
    )
    .await;
    let (state, out) = worker.run(&nats, "ansi", json!({})).await;
    assert_eq!(state, RunState::Completed);
    assert_eq!(
        messages(&out),
        [
            "\u{1b}[1;32mgreen\u{1b}[0m clearedmoved",
            "bad \u{fffd}\u{fffd} bytes \u{fffd}",
            "tab\there",
        ]
    );
    let (state, out) = worker.run(&nats, "tty", json!({})).await;
    assert_eq!(state, RunState::Completed);
    assert_eq!(messages(&out), ["tty 160", "err"]);
    assert!(out.lines().iter().all(|l| l.level == Level::Info));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_progress_and_logs_come_over_the_events_pipe_from_python_and_bash() {
    let python_script = r#"
import logging, athanor
logging.basicConfig(level=logging.DEBUG, handlers=[athanor.LogHandler()], format="%(message)s")
cfg = athanor.config()
print("epochs", cfg["epochs"])
athanor.progress(1, 2, "half")
athanor.result("accuracy", 0.5)
athanor.result("accuracy", 0.75)
athanor.result("detail", {"per_class": [0.7, 0.8], "name": "ünï"})
athanor.log("with metadata", level="error", step=3)
logging.getLogger("trainer").warning("a warning through logging")
logging.getLogger("trainer").debug("a debug line")
athanor.progress(2, 2)
athanor.result("diverged", {"loss": float("nan"), "grad": [float("inf"), -float("inf")]})
"#;
    let bash_script = r#"
ev() { printf '%s\n' "$1" >&"$ATHANOR_EVENTS_FD"; }
ev '{"type":"result","key":"from_bash","value":[1,2,3]}'
ev '{"type":"progress","current":5,"total":10,"message":"bash"}'
ev '{"type":"log","level":"warning","message":"careful"}'
ev 'not json at all'
ev '{"type":"exec","command":"rm -rf /"}'
ev '{"type":"result","key":"x"}'
ev '{"type":"log","level":"loud","message":"?"}'
head -c 1100000 /dev/zero | tr '\0' 'a' >&"$ATHANOR_EVENTS_FD"; echo >&"$ATHANOR_EVENTS_FD"
ev '{"type":"outcome","status":"failed","error":"bash says no"}'
echo still running
"#;
    let (nats, _dir, worker) = start(
        WorkerConfig::for_tests(),
        json!([
            // The helper as `pip install ./clients/python` installed it.
            {"name": "py", "command": [test_python(), "-c", python_script],
             "config": [{"name": "epochs", "type": "int", "default": 4}]},
            bash("sh", bash_script),
        ]),
    )
    .await;
    let (state, out) = worker.run(&nats, "py", json!({"epochs": 7})).await;
    assert_eq!(state, RunState::Completed, "{:?}", status(&out));
    let lines: Vec<(Level, String, Option<Value>)> = out
        .lines()
        .into_iter()
        .map(|l| (l.level, l.message.clone(), l.metadata.clone()))
        .collect();
    assert_eq!(
        lines,
        [
            (Level::Info, "epochs 7".to_string(), None),
            (
                Level::Error,
                "with metadata".to_string(),
                Some(json!({"step": 3}))
            ),
            (
                Level::Warn,
                "a warning through logging".to_string(),
                Some(json!({"logger": "trainer"}))
            ),
            (
                Level::Debug,
                "a debug line".to_string(),
                Some(json!({"logger": "trainer"}))
            ),
        ]
    );
    assert_eq!(
        results(&out),
        [
            ("accuracy".to_string(), json!(0.5)),
            ("accuracy".to_string(), json!(0.75)),
            (
                "detail".to_string(),
                json!({"per_class": [0.7, 0.8], "name": "ünï"})
            ),
            (
                "diverged".to_string(),
                json!({"loss": "NaN", "grad": ["Infinity", "-Infinity"]})
            ),
        ]
    );
    let progress = out
        .batches
        .iter()
        .filter_map(|b| b.progress.clone())
        .next_back()
        .unwrap();
    assert_eq!(
        (progress.current, progress.total, progress.message),
        (2, 2, None)
    );

    let (state, out) = worker.run(&nats, "sh", json!({})).await;
    assert_eq!(
        status(&out),
        (RunState::Failed, Some("bash says no".into()))
    );
    assert_eq!(state, RunState::Failed);
    // stdout and the events pipe are read as their data arrives: "still running"
    // may come anywhere among the events' lines.
    let mut lines = messages(&out);
    let stdout = lines
        .iter()
        .position(|l| l == "still running")
        .expect("stdout's line");
    lines.remove(stdout);
    assert_eq!(lines[0], "careful");
    // Each warning names its line and problem, and quotes the line's start.
    let warnings = [
        ("athanor events line 4 is not a valid event: expected ", "(it starts: \"not json at all\")"),
        ("athanor events line 5 is not a valid event: unknown variant `exec`", ")"),
        ("athanor events line 6 is not a valid event: missing field `value`", ")"),
        ("athanor events line 7 has an unknown log level \"loud\"", ")"),
        ("athanor events line 8 is 1100000 bytes, over the limit of 1048576; ignored (it starts: \"aaaa", "…\")"),
    ];
    for (line, (start, end)) in lines[1..].iter().zip(warnings) {
        assert!(line.starts_with(start) && line.ends_with(end), "{line}");
    }
    assert_eq!(lines.len(), 6);
    assert_eq!(results(&out), [("from_bash".to_string(), json!([1, 2, 3]))]);
    worker.stop().await;
}

/// Every metric record as (seq, step, values as JSON: NaN and infinities as strings),
/// in the order the batches carry them; checks the final count.
fn metric_records(out: &RunOutput) -> Vec<(u64, u64, Value)> {
    let records: Vec<(u64, u64, Value)> = out
        .batches
        .iter()
        .flat_map(|b| &b.metrics)
        .map(|r| (r.seq, r.step, serde_json::to_value(&r.values).unwrap()))
        .collect();
    let final_ = out.final_batch().unwrap().final_.clone().unwrap();
    assert_eq!(final_.metrics, records.len() as u64);
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_come_over_the_events_pipe_from_python_and_from_printf() {
    let python_script = r#"
import json, os, athanor
nan, inf = float("nan"), float("inf")
athanor.metric("loss", 0.5)                             # step 0: the name's counter
athanor.metric("loss", nan)                             # step 1
athanor.metric("loss", inf, step=10)
athanor.metric("loss", -inf)                            # step 11
athanor.metrics({"loss": 0.25, "acc": 0.875}, step=10)  # step 10 again
athanor.metrics({"acc": 1})                             # step 11: metrics()' counter
athanor.metric("acc", 2)                                # acc's counter: step 12
# By hand, as json.dumps writes it: a bare NaN, and a bad step.
fd = int(os.environ["ATHANOR_EVENTS_FD"])
os.write(fd, (json.dumps({"type": "metrics", "step": 3, "values": {"raw": nan, "NaN": -inf}}) + "\n").encode())
os.write(fd, b'{"type":"metric","name":"loss","step":-1,"value":1}\n')
athanor.metric("loss", 0.125, step=2**63 - 1)
"#;
    let printf_script = r#"
ev() { printf '%s
' "$1" >&"$ATHANOR_EVENTS_FD"; }
ev '{"type":"metric","name":"loss","step":0,"value":1.5}'
ev '{"type":"metrics","step":1,"values":{"loss":"NaN","acc":-Infinity}}'
for i in 2 3; do ev "{\"type\":\"metric\",\"name\":\"loss\",\"step\":$i,\"value\":0.$i}"; done
ev '{"type":"metric","name":"loss","step":9223372036854775808,"value":1}'
"#;
    let (nats, _dir, worker) = start(
        WorkerConfig::for_tests(),
        json!([
            {"name": "py", "command": [test_python(), "-c", python_script]},
            bash("sh", printf_script),
        ]),
    )
    .await;
    let (state, out) = worker.run(&nats, "py", json!({})).await;
    assert_eq!(state, RunState::Completed, "{:?}", status(&out));
    assert_eq!(
        metric_records(&out),
        [
            (0, 0, json!({"loss": 0.5})),
            (1, 1, json!({"loss": "NaN"})),
            (2, 10, json!({"loss": "Infinity"})),
            (3, 11, json!({"loss": "-Infinity"})),
            (4, 10, json!({"acc": 0.875, "loss": 0.25})),
            (5, 11, json!({"acc": 1.0})),
            (6, 12, json!({"acc": 2.0})),
            (7, 3, json!({"NaN": "-Infinity", "raw": "NaN"})),
            (8, 9223372036854775807, json!({"loss": 0.125})),
        ]
    );
    let warnings = at_level(&out, Level::Warn);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(
            "athanor events line 9 is not a valid event: invalid value: integer `-1`, expected u64"
        ),
        "{warnings:?}"
    );

    let (state, out) = worker.run(&nats, "sh", json!({})).await;
    assert_eq!(state, RunState::Completed, "{:?}", status(&out));
    assert_eq!(
        metric_records(&out),
        [
            (0, 0, json!({"loss": 1.5})),
            (1, 1, json!({"acc": "-Infinity", "loss": "NaN"})),
            (2, 2, json!({"loss": 0.2})),
            (3, 3, json!({"loss": 0.3})),
        ]
    );
    let warnings = at_level(&out, Level::Warn);
    assert_eq!(
        warnings,
        [concat!(
            "athanor events line 5 has step 9223372036854775808, over the largest storable ",
            "step 9223372036854775807; ignored (it starts: ",
            r#""{\"type\":\"metric\",\"name\":\"loss\",\"step\":9223372036854775808,\"value\":1}")"#
        )]
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_signal_and_timeout_fail_the_run_with_the_reason() {
    let (nats, _dir, worker) = start(
        WorkerConfig::for_tests(),
        json!([
            bash("exit3", "for i in $(seq 1 12); do echo \"problem $i\" >&2; done; echo fine; exit 3"),
            bash("segv", "echo before; kill -SEGV $$"),
            {"name": "slow", "command": ["bash", "-c", "echo waiting; sleep 100"], "timeout": "1s"},
        ]),
    )
    .await;
    let (_, out) = worker.run(&nats, "exit3", json!({})).await;
    let tail: Vec<String> = (3..=12).map(|i| format!("problem {i}")).collect();
    assert_eq!(
        status(&out),
        (
            RunState::Failed,
            Some(format!(
                "exited with status 3; last lines of stderr:\n{}",
                tail.join("\n")
            ))
        )
    );
    assert_eq!(messages(&out).len(), 13);
    let (_, out) = worker.run(&nats, "segv", json!({})).await;
    assert_eq!(
        status(&out),
        (
            RunState::Failed,
            Some("killed by signal 11 (SIGSEGV)".into())
        )
    );
    assert_eq!(messages(&out), ["before"]);
    let started = Instant::now();
    let (_, out) = worker.run(&nats, "slow", json!({})).await;
    assert_eq!(
        status(&out),
        (RunState::Failed, Some("timed out after 1s".into()))
    );
    assert_eq!(messages(&out), ["waiting"]);
    assert!(started.elapsed() < Duration::from_secs(20));
    worker.stop().await;
}

/// Whether a process is still alive (a zombie waiting for its parent counts as dead).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_whole_process_tree_and_keeps_its_output() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let control = js.get_key_value(names::CONTROL_BUCKET).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let config = WorkerConfig {
        cancel_grace: Duration::from_secs(1),
        ..WorkerConfig::for_tests()
    };
    let worker = TestWorker::start(
        &nats,
        config,
        dir.path(),
        json!([
            // bash waits on a child; SIGTERM to the group ends both.
            bash("tree", &format!("sleep 1000 & echo $! > {0}; echo started; wait", pids.display())),
            // Ignores SIGTERM, and so does its child: SIGKILL after the grace.
            bash("stubborn", &format!("trap '' TERM; (trap '' TERM; sleep 1000) & echo $! > {0}; echo started; while :; do sleep 0.1; done", pids.display())),
        ]),
    )
    .await;
    for (experiment, error) in [
        ("tree", None),
        (
            "stubborn",
            Some("athanor: the run ignored cancellation for 1s; its processes were killed"),
        ),
    ] {
        let mut handle = worker.start_run(experiment, json!({})).await;
        let grandchild: u32 =
            athanor_testkit::wait_for("the pid file", Duration::from_secs(30), || async {
                std::fs::read_to_string(&pids)
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
            })
            .await
            .unwrap();
        assert!(alive(grandchild));
        let out = cancel_and_read(&js, &control, &mut handle).await;
        assert_eq!(
            status(&out),
            (RunState::Cancelled, Some("cancelled on request".into()))
        );
        let lines = messages(&out);
        assert_eq!(lines[0], "started");
        if let Some(error) = error {
            assert_eq!(lines[1], error);
        }
        athanor_testkit::wait_for("the grandchild's end", Duration::from_secs(10), || async {
            (!alive(grandchild)).then_some(())
        })
        .await
        .unwrap();
        std::fs::remove_file(&pids).unwrap();
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_values_reach_the_child_as_data_never_as_command_text() {
    let (nats, dir, worker) = start(
        WorkerConfig::for_tests(),
        json!([{
            "name": "inert",
            "command": ["bash", "-c", "printf '%s\\n' \"$ATHANOR_CONFIG\"; cat \"$ATHANOR_CONFIG_FILE\"; echo; echo \"$ATHANOR_EXPERIMENT $ATHANOR_RUN_ID\"", "ignored-arg0"],
            "config": [{"name": "note", "type": "string", "default": ""}],
        }]),
    )
    .await;
    let marker = dir.path().join("pwned");
    for hostile in [
        format!("$(touch {})", marker.display()),
        format!("; touch {} ; rm -rf /", marker.display()),
        format!("`touch {}`", marker.display()),
        format!("a\nb'\"$(touch {})\"\n", marker.display()),
    ] {
        let mut handle = worker.start_run("inert", json!({"note": hostile})).await;
        assert_eq!(handle.finished().await, RunState::Completed);
        let out = read_run(&nats.jetstream().await, &handle.run_id, READ_TIMEOUT)
            .await
            .unwrap();
        let text = messages(&out).join("\n");
        let config = serde_json::to_string(&json!({"note": hostile})).unwrap();
        assert_eq!(text, format!("{config}\n{config}\ninert {}", handle.run_id));
        assert!(!marker.exists(), "a config value ran as a command");
    }
    worker.stop().await;
}

#[test]
fn relative_paths_are_taken_from_the_configuration_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    let script = dir.path().join("examples/run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let mut specs: Vec<CommandSpec> = serde_json::from_value(json!([
        {"name": "a", "command": ["./run.sh"], "cwd": "examples"},
        {"name": "b", "command": ["examples/run.sh"]},
    ]))
    .unwrap();
    for spec in &mut specs {
        spec.base_dir = Some(dir.path().into());
    }
    let experiments = declare(&specs, &[], &WorkerConfig::for_tests()).unwrap();
    assert_eq!(experiments.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_left_the_group_cannot_hold_the_run_open() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("escaped");
    let (nats, _dir, worker) = start(
        WorkerConfig::for_tests(),
        json!([
            // A writer in a session of its own keeps the child's stdout open, writing
            // forever, after the child exited.
            bash("escape", &format!(
                "setsid bash -c 'echo $$ > {0}; while :; do echo escaped; sleep 0.001; done' & until [ -s {0} ]; do sleep 0.01; done; echo main done",
                pid_file.display()
            )),
            // One that holds stdout open without writing.
            bash("quiet", &format!("setsid bash -c 'echo $$ > {0}; exec sleep 1000' & until [ -s {0} ]; do sleep 0.01; done; echo quiet done", pid_file.display())),
        ]),
    )
    .await;
    for (experiment, first) in [("escape", "main done"), ("quiet", "quiet done")] {
        let started = Instant::now();
        let (state, out) = worker.run(&nats, experiment, json!({})).await;
        assert_eq!(state, RunState::Completed);
        assert!(started.elapsed() < Duration::from_secs(30));
        let lines = messages(&out);
        assert!(lines.contains(&first.to_string()), "{lines:?}");
        assert_eq!(
            lines.last().unwrap(),
            "athanor: the child exited, but a process that left its process group still holds its output open; the run ended without reading it",
            "{experiment}: {lines:?}"
        );
        let escaped: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: a plain kill of the test's own stray process.
        unsafe { libc::kill(escaped, libc::SIGKILL) };
        std::fs::remove_file(&pid_file).unwrap();
    }
    worker.stop().await;
}

/// The Python helper and the environment a Python child gets: its `print` streams live
/// though stdout is a pipe (`PYTHONUNBUFFERED=1`, unless the declaration sets it), and
/// `athanor.cancelled()` lets it stop cleanly on cancel, its last words stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_child_streams_unbuffered_and_stops_cleanly_when_cancelled() {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    // Printed (not flushed), then 1 s later a line over the events pipe: stdout held in
    // Python's buffer would arrive after it, at exit.
    let script = r#"
import os, time, athanor
print("unbuffered=" + os.environ.get("PYTHONUNBUFFERED", "<unset>"))
time.sleep(1)
athanor.cancelled()  # from here SIGTERM asks rather than kills
athanor.log("waiting for cancel", level="debug")
while not athanor.cancelled():
    time.sleep(0.02)
print("stopping cleanly")
athanor.result("stopped", True)
"#;
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let control = js.get_key_value(names::CONTROL_BUCKET).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = TestWorker::start(
        &nats,
        WorkerConfig::for_tests(),
        dir.path(),
        json!([
            {"name": "py", "command": ["python3", "-c", script],
             "env": {"PYTHONPATH": helper}},
            {"name": "declared", "command": ["python3", "-c", "import os; print(os.environ['PYTHONUNBUFFERED'])"],
             "env": {"PYTHONUNBUFFERED": "declared"}},
        ]),
    )
    .await;
    let mut handle = worker.start_run("py", json!({})).await;
    // The newest batch holds the line the child writes once it listens for cancel.
    athanor_testkit::wait_for("the child waiting for cancel", READ_TIMEOUT, || async {
        let last = js
            .get_stream(names::RUNS_STREAM)
            .await
            .ok()?
            .get_last_raw_message_by_subject(&names::run_subject(&handle.run_id))
            .await
            .ok()?;
        let batch =
            athanor_schemas::decode(&last.payload, athanor_schemas::DEFAULT_DECODE_LIMIT).ok()?;
        batch
            .logs
            .iter()
            .any(|l| l.message == "waiting for cancel")
            .then_some(())
    })
    .await
    .unwrap();
    let out = cancel_and_read(&js, &control, &mut handle).await;
    assert_eq!(
        messages(&out),
        ["unbuffered=1", "waiting for cancel", "stopping cleanly"]
    );
    assert_eq!(results(&out), [("stopped".to_string(), json!(true))]);
    assert_eq!(
        status(&out),
        (RunState::Cancelled, Some("cancelled on request".into()))
    );
    let (state, out) = worker.run(&nats, "declared", json!({})).await;
    assert_eq!(
        (state, messages(&out)),
        (RunState::Completed, vec!["declared".to_string()])
    );
    worker.stop().await;
}

/// Run by hand (not under Athanor), the helper prints what it would have sent, and
/// `config()` gives the defaults.
#[test]
fn the_python_helper_prints_when_not_run_by_athanor() {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    let script = r#"
import athanor
print(athanor.under_athanor(), athanor.config({"lr": 0.1}), athanor.cancelled(), flush=True)
athanor.log("by hand", level="warn")
athanor.result("accuracy", 0.5)
athanor.progress(1, 2, "half")
athanor.metric("loss", 0.3)
athanor.fail("no data")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .env("PYTHONPATH", helper)
        .env_remove("ATHANOR_EVENTS_FD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "False {'lr': 0.1} False\n"
    );
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "[warn] by hand\nresult accuracy = 0.5\nprogress 1/2 half\nfailed: no data\n"
    );
}
