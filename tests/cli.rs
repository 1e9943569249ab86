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

    // `rm`: the failed run goes; a run that does not exist is named, and the exit
    // status says not everything was deleted.
    let failed_id = text(&failed_only.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let removed = athanor(&["rm", &failed_id, "no-such-run", "--url", &url]);
    assert_eq!(removed.status.code(), Some(2), "{}", text(&removed.stderr));
    assert!(
        text(&removed.stdout).starts_with(&format!("deleted {failed_id}: ")),
        "{}",
        text(&removed.stdout)
    );
    let said = text(&removed.stderr);
    assert!(
        said.contains("no-such-run: run \"no-such-run\" not found"),
        "{said}"
    );
    assert!(said.contains("1 of 2 runs not deleted"), "{said}");
    let runs = athanor(&["runs", "--url", &url]);
    assert_eq!(
        text(&runs.stdout).lines().count(),
        1 + 2,
        "{}",
        text(&runs.stdout)
    );

    // SIGTERM: an orderly stop.
    stop(&mut child);
}

/// `athanor config check` prints the effective configuration with its secrets masked;
/// a bad setting stops every command before anything starts, with its key, its value
/// and what is allowed, and exit status 2 — no panic, whatever the value.
#[test]
fn a_bad_configuration_is_refused_at_load_with_status_two() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("athanor.toml");
    std::fs::write(
        &file,
        "[gateway]\napi_token = \"s3cret\"\n[nats]\nworkers_ttl = \"20s\"\n[database]\nurl = \"postgres://athanor:pw@db:5432/athanor\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let checked = athanor(&["--config", file, "config", "check"]);
    let printed = text(&checked.stdout);
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    assert!(printed.contains("api_token = \"********\""), "{printed}");
    assert!(printed.contains("workers_ttl = \"20s\""), "{printed}");
    assert!(
        printed.contains("url = \"postgres://athanor:********@db:5432/athanor\""),
        "{printed}"
    );
    assert!(
        !printed.contains("s3cret") && !printed.contains(":pw@"),
        "{printed}"
    );

    let refused = |env: &[(&str, &str)], command: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_athanor"))
            .args(command)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .env("ATHANOR__NATS__SERVER_BIN", athanor_testkit::server_bin())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{command:?} {env:?}: {}",
            text(&out.stderr)
        );
        let said = text(&out.stderr);
        assert!(!said.contains("panicked"), "{said}");
        said
    };
    let said = refused(
        &[
            ("ATHANOR__WORKER__FLUSH_INTERVAL", "0s"),
            ("ATHANOR__GATEWAY__API_TOKEN", ""),
            (
                "ATHANOR__GATEWAY__CORS_ORIGINS",
                "https://ok.example,not an origin",
            ),
            ("ATHANOR__WORKER__ID", "w.1"),
        ],
        &["config", "check"],
    );
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        vec![
            "athanor: invalid configuration:",
            "  worker.id = \"w.1\": a NATS subject token: letters, digits, '-' and '_' (no '.', '*', '>', spaces)",
            "  worker.flush_interval = 0s: a duration from 1ms to 10 years",
            "  gateway.api_token = \"\": a non-empty token (an empty one would turn authentication off), or the key left out",
            "  gateway.cors_origins[1] = \"not an origin\": an origin: scheme://host[:port], no path (e.g. https://lab.example.org)",
        ]
    );
    // Every command refuses it before it starts anything; durations too long for a timer
    // and sizes that do not parse are refused the same way.
    for command in [
        &["worker"][..],
        &["aggregator"],
        &["gateway"],
        &["up", "--data-dir", "d"],
    ] {
        refused(&[("ATHANOR__GATEWAY__HUB_BUFFER", "0")], command);
    }
    let said = refused(
        &[("ATHANOR__WORKER__HEARTBEAT_INTERVAL", "99999999999years")],
        &["worker"],
    );
    assert!(said.contains("worker.heartbeat_interval"), "{said}");
    let said = refused(&[("ATHANOR__WORKER__MAX_LINE_BYTES", "-1")], &["worker"]);
    assert!(said.contains("max_line_bytes"), "{said}");
    assert!(
        !dir.path().join("d").exists(),
        "athanor up started on a bad configuration"
    );
    // A limit that contradicts the NATS server: found when the worker connects (here the
    // embedded server of `athanor up`, on SQLite: the file above is gone).
    std::fs::remove_file(dir.path().join("athanor.toml")).unwrap();
    let said = refused(
        &[("ATHANOR__WORKER__MAX_LINE_BYTES", "2000000")],
        &["up", "--data-dir", "d2", "--http-addr", "127.0.0.1:0"],
    );
    assert!(
        said.contains(
            "worker.max_line_bytes = 2000000: at most the NATS server's max_payload (1048576)"
        ),
        "{said}"
    );
}
