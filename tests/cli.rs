//! `athanor up` as a user starts it, and the client commands against it: `run --follow`
//! prints the log and the results and exits with the run's status, `logs`, `runs`,
//! `experiments`; SIGTERM shuts it down in order.

mod common;

use common::{stop, up, wait_for_worker};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn athanor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_athanor"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run athanor")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_cli_against_athanor_up() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, url) = up(data.path());
    let listed = wait_for_worker(&url);
    assert!(
        listed.contains("-c iterations=<integer>  default 10  min 1"),
        "{listed}"
    );
    assert!(
        listed.contains("-c mode=<ok|error|panic>  default \"error\""),
        "{listed}"
    );

    let followed = athanor(&[
        "run",
        "sweep",
        "-c",
        "iterations=5",
        "-c",
        "delay_ms=10",
        "--follow",
        "--url",
        &url,
    ]);
    let out = text(&followed.stdout);
    assert_eq!(
        followed.status.code(),
        Some(0),
        "{out}\n{}",
        text(&followed.stderr)
    );
    let logged: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" INFO  iteration "))
        .collect();
    assert_eq!(logged.len(), 5, "{out}");
    assert!(logged[4].contains("iteration 4: "), "{out}");
    assert!(out.contains("results:\n"), "{out}");
    for key in ["best_score", "iteration_0", "iteration_4"] {
        assert!(out.contains(&format!("  {key} = ")), "{key} missing: {out}");
    }
    assert!(
        text(&followed.stderr).contains("completed (5 lines)"),
        "{}",
        text(&followed.stderr)
    );

    let failed = athanor(&[
        "run",
        "flaky",
        "-c",
        "mode=error",
        "-c",
        "after_lines=3",
        "-f",
        "--url",
        &url,
    ]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stderr));
    assert_eq!(
        text(&failed.stdout).lines().count(),
        3,
        "{}",
        text(&failed.stdout)
    );
    assert!(
        text(&failed.stderr).contains(" failed: "),
        "{}",
        text(&failed.stderr)
    );

    let refused = athanor(&["run", "sweep", "-c", "iterations=0", "--url", &url]);
    assert_eq!(refused.status.code(), Some(2));
    assert_eq!(
        text(&refused.stderr).trim(),
        "athanor: config field `iterations` must be at least 1, got 0"
    );

    // Without --follow: the id, then the log once it is stored.
    let started = athanor(&[
        "run",
        "sweep",
        "-c",
        "iterations=2",
        "-c",
        "delay_ms=0",
        "--url",
        &url,
    ]);
    assert_eq!(started.status.code(), Some(0));
    let id = text(&started.stdout).trim().to_string();
    assert_eq!(id.len(), 36, "{id}");
    let followed = athanor(&["logs", &id, "--follow", "--url", &url]);
    assert_eq!(followed.status.code(), Some(0));
    assert_eq!(text(&followed.stdout).lines().count(), 2);
    // The live feed runs ahead of the database; `logs` prints what is stored.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = athanor(&["logs", &id, "--url", &url]);
        assert_eq!(logs.status.code(), Some(0));
        let stored = text(&logs.stdout).lines().count();
        assert!(stored <= 2);
        if stored == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the log was never stored");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Its metrics: sweep records loss, score and lr at each iteration.
    let metrics = athanor(&["metrics", &id, "--follow", "--url", &url]);
    assert_eq!(metrics.status.code(), Some(0), "{}", text(&metrics.stderr));
    let table: Vec<Vec<String>> = text(&metrics.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(
        table,
        [
            vec!["NAME", "POINTS", "LAST", "STEP", "LAST", "MIN", "MAX"],
            vec!["loss", "2", "1", "0.52", "0.52", "1"],
            vec!["lr", "2", "1", "0.0002", "0.0001", "0.0002"],
            vec!["score", "2", "1", "0.48", "0", "0.48"],
        ],
        "{}",
        text(&metrics.stdout)
    );
    let none = athanor(&["metrics", "no-such-run", "--url", &url]);
    assert_eq!(none.status.code(), Some(2));
    assert_eq!(
        text(&none.stderr).trim(),
        "athanor: run \"no-such-run\" not found"
    );

    let runs = athanor(&["runs", "--url", &url]);
    let table = text(&runs.stdout);
    assert_eq!(table.lines().count(), 1 + 3, "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with(&id), "{table}");
    let failed_only = athanor(&["runs", "--status", "failed", "--url", &url]);
    assert_eq!(text(&failed_only.stdout).lines().count(), 2);

    // SIGTERM: an orderly stop.
    stop(&mut child);
}
