//! The HTTP API over a real pipeline: nats-server, a worker, an aggregator, a database
//! and the gateway on a free port, spoken to with a real HTTP client.

mod common;

use common::Stack;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_a_run_follow_it_and_read_its_output() {
    let stack = Stack::start().await;
    let (status, body) = stack.get("/api/experiments").await;
    assert_eq!(status, StatusCode::OK);
    let sweep = body["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "sweep")
        .unwrap()
        .clone();
    assert_eq!(sweep["workers"], 1);
    assert_eq!(
        sweep["config_schema"]["properties"]["iterations"]["minimum"],
        1
    );

    let (status, created) = stack
        .post(
            "/api/runs",
            r#"{"experiment":"sweep","config":{"iterations":3,"delay_ms":0}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["config"], json!({"iterations": 3, "delay_ms": 0}));
    let id = created["id"].as_str().unwrap().to_string();
    let run = stack.wait_status(&id, "completed").await;
    assert_eq!(run["experiment"], "sweep");
    assert_eq!(run["lines"], 3);
    assert_eq!(run["progress"]["current"], 3);

    let (_, results) = stack.get(&format!("/api/runs/{id}/results")).await;
    let keys: Vec<&str> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["best_score", "iteration_0", "iteration_1", "iteration_2"]
    );
    assert_eq!(results["results"][1]["value"]["iteration"], 0);

    let (_, logs) = stack.get(&format!("/api/runs/{id}/logs")).await;
    let messages: Vec<&str> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages.len(), 3);
    assert!(messages[2].starts_with("iteration 2: "), "{}", messages[2]);
    assert_eq!(logs["total"], 3);

    let text = stack
        .http
        .get(format!("{}/api/runs/{id}/logs.txt", stack.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(
        text.lines().nth(2).unwrap().contains(" INFO iteration 2: "),
        "{text}"
    );

    let (_, list) = stack
        .get("/api/runs?experiment=sweep&status=completed")
        .await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["runs"][0]["id"], id.as_str());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_paging_level_filter_and_search() {
    let stack = Stack::start().await;
    let (_, created) = stack
        .post(
            "/api/runs",
            r#"{"experiment":"flaky","config":{"mode":"ok","after_lines":25}}"#,
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    stack.wait_status(&id, "completed").await;
    let seqs = |body: &Value| {
        body["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["seq"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let (_, page) = stack
        .get(&format!("/api/runs/{id}/logs?after=4&limit=5"))
        .await;
    assert_eq!(seqs(&page), [5, 6, 7, 8, 9]);
    assert_eq!(page["more"], true);
    let (_, page) = stack
        .get(&format!("/api/runs/{id}/logs?before=20&limit=3"))
        .await;
    assert_eq!(seqs(&page), [17, 18, 19]);
    let (_, page) = stack
        .get(&format!("/api/runs/{id}/logs?q=LINE%201%20OF"))
        .await;
    assert_eq!(seqs(&page), [1]);
    let (_, page) = stack.get(&format!("/api/runs/{id}/logs?q=line%202")).await;
    assert_eq!(seqs(&page), [2, 20, 21, 22, 23, 24]);
    let (_, page) = stack
        .get(&format!("/api/runs/{id}/logs?level=warn,error"))
        .await;
    assert_eq!(seqs(&page), Vec::<i64>::new());
    let (_, page) = stack
        .get(&format!("/api/runs/{id}/logs?level=info,warn&after=22"))
        .await;
    assert_eq!(seqs(&page), [23, 24]);
    assert!(page.get("matching").is_none(), "counted only when asked");
    // A search's count covers the whole range asked for, not only the page it returns.
    let (_, page) = stack
        .get(&format!(
            "/api/runs/{id}/logs?q=line%202&limit=2&count=true"
        ))
        .await;
    assert_eq!(
        (seqs(&page), page["matching"].as_i64()),
        (vec![2, 20], Some(6))
    );
    assert_eq!(page["more"], true);
    let (_, page) = stack
        .get(&format!(
            "/api/runs/{id}/logs?q=line%202&before=22&limit=1&count=true"
        ))
        .await;
    assert_eq!(
        (seqs(&page), page["matching"].as_i64()),
        (vec![21], Some(3))
    );
    let (_, page) = stack
        .get(&format!("/api/runs/{id}/logs?level=warn&count=true"))
        .await;
    assert_eq!((seqs(&page), page["matching"].as_i64()), (vec![], Some(0)));
    let (_, page) = stack
        .get(&format!("/api/runs/{id}/logs?after=9&count=true"))
        .await;
    assert_eq!(page["matching"].as_i64(), Some(15));
    let (status, body) = stack.get(&format!("/api/runs/{id}/logs?level=loud")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "unknown level \"loud\" (use trace, debug, info, warn, error)"
    );
    let (status, _) = stack.get(&format!("/api/runs/{id}/logs?after=abc")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Found by a user: on PostgreSQL a NUL in a parameter was a 503 "the database is
    // unavailable". Refused up front, on either database, naming where.
    for (path, error) in [
        (
            "/api/runs?experiment=a%00b",
            "query parameter `experiment` holds a NUL character (%00)",
        ),
        (
            &format!("/api/runs/{id}/logs?q=x%00"),
            "query parameter `q` holds a NUL character (%00)",
        ),
        ("/api/runs/a%00b", "the path holds a NUL character (%00)"),
    ] {
        let (status, body) = stack.get(path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some(error)),
            "{path}"
        );
    }
    let (status, body) = stack
        .post(
            "/api/instances",
            r#"{"name":"a\u0000b","experiment":"flaky","config":{}}"#,
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("`name` holds a NUL character")
        )
    );
    stack.stop().await;
}

/// Found by a user: a message holding a newline could forge a record of its own in the
/// download. Its own line breaks now continue on indented lines: one stored line, one
/// record (a line that starts with a timestamp).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_download_keeps_one_record_per_stored_line() {
    let stack = Stack::start().await;
    let forged = "real\n2026-01-01T00:00:00.000000Z ERROR forged\r\nthird\rfourth";
    let (_, created) = stack
        .post(
            "/api/runs",
            &json!({"experiment": "echo", "config": {"message": forged, "count": 2}}).to_string(),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    stack.wait_status(&id, "completed").await;
    let text = stack
        .http
        .get(format!("{}/api/runs/{id}/logs.txt", stack.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let records: Vec<&str> = text.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(records.len(), 2, "{text}");
    let first: Vec<&str> = text.lines().take(4).collect();
    assert!(first[0].ends_with(" INFO real"), "{text}");
    assert_eq!(
        &first[1..],
        [
            "  2026-01-01T00:00:00.000000Z ERROR forged",
            "  third",
            "  fourth"
        ]
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_json_errors() {
    let stack = Stack::start().await;
    let (status, body) = stack
        .post("/api/runs", r#"{"experiment":"sweep","config":"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request body"),
        "{body}"
    );
    let (status, body) = stack.post("/api/runs", r#"{"experiment":"nope"}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body["error"],
        "unknown experiment \"nope\" (live workers host: echo, flaky, log_storm, metric_storm, sleepy, sweep)"
    );
    let (status, body) = stack
        .post(
            "/api/runs",
            r#"{"experiment":"sweep","config":{"iterations":0}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body,
        json!({"error": "config field `iterations` must be at least 1, got 0", "field": "iterations", "reason": "must be at least 1, got 0"})
    );
    // The same check without starting anything.
    let (status, body) = stack
        .post(
            "/api/experiments/sweep/validate",
            r#"{"config":{"iterations":0}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body,
        json!({"error": "config field `iterations` must be at least 1, got 0", "field": "iterations", "reason": "must be at least 1, got 0"})
    );
    let (status, body) = stack
        .post(
            "/api/experiments/sweep/validate",
            r#"{"config":{"iterations":4}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"experiment": "sweep", "config": {"iterations": 4, "delay_ms": 100}})
    );
    let (status, body) = stack.post("/api/experiments/nope/validate", "{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = stack
        .post("/api/experiments/sweep/validate", r#"{"confg":{}}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (_, runs) = stack.get("/api/runs").await;
    assert_eq!(runs["total"], 0, "validating started nothing");
    let big = format!(
        r#"{{"experiment":"sweep","config":{{"pad":"{}"}}}}"#,
        "x".repeat((1 << 20) + 1024)
    );
    // On its own connection: the server answers 413 without reading the body and then
    // closes that connection, which a pooled client could otherwise reuse.
    let response = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .post(format!("{}/api/runs", stack.base))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let (status, body): (_, Value) = (response.status(), response.json().await.unwrap());
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"], "request body larger than 1048576 bytes");
    let (status, body) = stack.get("/api/runs/does-not-exist").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "run \"does-not-exist\" not found");
    let (status, _) = stack.get("/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = stack.get("/api/runs?limit=-1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_run_is_idempotent_and_a_finished_run_says_409() {
    let stack = Stack::start().await;
    let id = stack.sleepy_running().await;
    for _ in 0..2 {
        let (status, body) = stack.post(&format!("/api/runs/{id}/cancel"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let run = stack.wait_status(&id, "cancelled").await;
    assert_eq!(run["error"], "cancelled on request");
    let (status, body) = stack.post(&format!("/api/runs/{id}/cancel"), "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        body["error"],
        format!("run {id} already finished (cancelled); there is nothing to cancel")
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_created_listed_changed_run_and_deleted() {
    let stack = Stack::start().await;
    let (status, created) = stack
        .post(
            "/api/instances",
            r#"{"name":"short sweep","experiment":"sweep","config":{"iterations":2}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["config"], json!({"iterations": 2, "delay_ms": 100}));
    assert_eq!(
        (&created["runs"], &created["last_run"]),
        (&json!(0), &Value::Null)
    );
    let id = created["id"].as_str().unwrap().to_string();

    let (status, body) = stack
        .post(
            "/api/instances",
            r#"{"name":"bad","experiment":"sweep","config":{"iterations":-3}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "iterations");
    let (status, _) = stack
        .post("/api/instances", r#"{"name":"x","experiment":"nope"}"#)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = stack
        .post("/api/instances", r#"{"name":"  ","experiment":"sweep"}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "`name` must hold 1 to 200 characters");

    let response = stack
        .http
        .put(format!("{}/api/instances/{id}", stack.base))
        .json(&json!({"config": {"iterations": 3, "delay_ms": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, list) = stack.get("/api/instances?experiment=sweep").await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 1);
    assert_eq!(list["instances"][0]["name"], "short sweep");
    assert_eq!(
        list["instances"][0]["config"],
        json!({"iterations": 3, "delay_ms": 0})
    );

    // Run it as saved, then again with one field overridden.
    let (status, run) = stack.post(&format!("/api/instances/{id}/runs"), "").await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    assert_eq!(run["instance_id"], id.as_str());
    let first = stack
        .wait_status(run["id"].as_str().unwrap(), "completed")
        .await;
    assert_eq!(first["lines"], 3);
    assert_eq!(first["instance_id"], id.as_str());
    let (status, run) = stack
        .post(
            &format!("/api/instances/{id}/runs"),
            r#"{"config":{"iterations":1}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    assert_eq!(run["config"], json!({"iterations": 1, "delay_ms": 0}));
    let second = stack
        .wait_status(run["id"].as_str().unwrap(), "completed")
        .await;
    // Listed and shown with their runs: how many, and the newest.
    let last_run =
        json!({"id": second["id"], "status": "completed", "created_at": second["created_at"]});
    let (_, list) = stack.get("/api/instances").await;
    assert_eq!(list["instances"][0]["runs"], 2);
    assert_eq!(list["instances"][0]["last_run"], last_run);
    let (_, one) = stack.get(&format!("/api/instances/{id}")).await;
    assert_eq!((&one["runs"], &one["last_run"]), (&json!(2), &last_run));
    let (status, _) = stack
        .post(
            &format!("/api/instances/{id}/runs"),
            r#"{"config":{"iterations":0}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // No body means "as saved"; a body must be a JSON object (found by schemathesis:
    // a body of "\r" started a run).
    for not_json in ["\r", " ", "\n\n"] {
        let (status, body) = stack
            .post(&format!("/api/instances/{id}/runs"), not_json)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{not_json:?}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("malformed request body"),
            "{body}"
        );
    }

    let response = stack
        .http
        .delete(format!("{}/api/instances/{id}", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, body) = stack.get(&format!("/api/instances/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], format!("instance \"{id}\" not found"));
    // Its runs stay.
    let (_, runs) = stack.get("/api/runs?experiment=sweep").await;
    assert_eq!(runs["total"], 2);
    stack.stop().await;
}

/// The UI's files come from the binary with their media types; uPlot's licence is
/// served beside uPlot, and nothing else under /ui/ exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_files_and_the_vendored_licence_are_served_from_the_binary() {
    let stack = Stack::start().await;
    for (name, media) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("dom.js", "text/javascript; charset=utf-8"),
        ("feed.js", "text/javascript; charset=utf-8"),
        ("charts.js", "text/javascript; charset=utf-8"),
        ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
        ("uPlot.min.css", "text/css; charset=utf-8"),
        ("uPlot.LICENSE", "text/plain; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let response = stack
            .http
            .get(format!("{}/ui/{name}", stack.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        assert_eq!(response.headers()["content-type"], media, "{name}");
        let text = response.text().await.unwrap();
        if name == "uPlot.LICENSE" {
            assert!(text.starts_with("The MIT License (MIT)"), "{text}");
            assert!(text.contains("Leon Sorokin"), "{text}");
        }
    }
    let (status, body) = stack.get("/ui/uPlot.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "no UI file \"uPlot.js\"");
    stack.stop().await;
}

/// A pending run says why it waits, in the run and in the list (issue 18: such a run
/// sat `pending` with no word to anyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_run_says_why_it_waits() {
    let stack = Stack::start_with(
        athanor_workers::WorkerConfig {
            max_concurrent_runs: 1,
            ..athanor_workers::WorkerConfig::for_tests()
        },
        athanor_gateway::GatewayConfig::for_tests(),
    )
    .await;
    let (_, busy) = stack
        .post(
            "/api/runs",
            r#"{"experiment":"sleepy","config":{"duration_ms":60000}}"#,
        )
        .await;
    let busy = busy["id"].as_str().unwrap().to_string();
    stack.wait_status(&busy, "running").await;
    let (_, queued) = stack
        .post(
            "/api/runs",
            r#"{"experiment":"sweep","config":{"iterations":1,"delay_ms":0}}"#,
        )
        .await;
    let queued = queued["id"].as_str().unwrap().to_string();
    let why = "every run slot (1) of the worker hosting sweep is taken";
    let waiting = |run: &Value| run["waiting"].as_str().map(str::to_string);
    // The registration says so as soon as the first run started (not a heartbeat later).
    let (_, run) = stack.get(&format!("/api/runs/{queued}")).await;
    assert_eq!(
        (run["status"].as_str(), waiting(&run).as_deref()),
        (Some("pending"), Some(why))
    );
    let (_, list) = stack.get("/api/runs?status=pending").await;
    assert_eq!(waiting(&list["runs"][0]).as_deref(), Some(why));
    let (_, running) = stack.get(&format!("/api/runs/{busy}")).await;
    assert_eq!(running.get("waiting"), None, "only a pending run waits");
    stack.post(&format!("/api/runs/{busy}/cancel"), "").await;
    stack.wait_status(&queued, "completed").await;
    stack.stop().await;
}

/// `DELETE /api/runs/{id}`: 409 while the run goes; once it has ended, every row of it
/// goes in one transaction (log, results, metric points and series, batches, the run),
/// `GET` says 404, and its batches delivered again from `ATHANOR_RUNS` do not bring it
/// back (the tombstone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_is_deleted_with_every_row_and_stays_deleted_when_its_batches_return() {
    use athanor_schemas::entities::{
        run_batches, run_logs, run_metric_summaries, run_metrics, run_results, runs,
    };
    use sea_orm::{EntityTrait, PaginatorTrait};
    let stack = Stack::start().await;
    let delete = |id: String| {
        let request = stack.http.delete(format!("{}/api/runs/{id}", stack.base));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let sleepy = stack.sleepy_running().await;
    let (status, body) = delete(sleepy.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        body["error"],
        format!("run {sleepy} is running: cancel it first, then delete it")
    );
    let (status, body) = delete("no-such-run".into()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Cancelled, it is left alone (and the counts below stand still).
    stack.post(&format!("/api/runs/{sleepy}/cancel"), "").await;
    stack.wait_status(&sleepy, "cancelled").await;

    // A run with lines, results and metrics, and another that must be left alone.
    let (_, created) = stack
        .post(
            "/api/runs",
            r#"{"experiment":"sweep","config":{"iterations":40,"delay_ms":0}}"#,
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let (_, other) = stack
        .post("/api/runs", r#"{"experiment":"metric_storm","config":{"metrics":2,"steps":300,"steps_per_second":3000}}"#)
        .await;
    let other = other["id"].as_str().unwrap().to_string();
    let run = stack.wait_status(&id, "completed").await;
    stack.wait_status(&other, "completed").await;
    let lines = run["lines"].as_u64().unwrap();
    let results = run["results"].as_u64().unwrap();
    assert!(lines > 0 && results > 0, "{run}");
    // Rows of a table without an entity: the rollups of the run's series, and of all.
    let db = &stack.db.db;
    let rollups = |of_run: bool| {
        let sql = if of_run {
            format!("SELECT COUNT(*) AS n FROM run_metric_rollups r JOIN run_metric_summaries s ON s.id = r.series_id WHERE s.run_id = '{id}'")
        } else {
            "SELECT COUNT(*) AS n FROM run_metric_rollups".to_string()
        };
        async move {
            use sea_orm::ConnectionTrait;
            let backend = db.get_database_backend();
            let row = db
                .query_one(sea_orm::Statement::from_string(backend, sql))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap() as u64
        }
    };
    let (run_rollups, all_rollups) = (rollups(true).await, rollups(false).await);
    assert!(
        run_rollups > 0 && all_rollups > run_rollups,
        "{run_rollups} of {all_rollups}"
    );
    let count = || async {
        (
            runs::Entity::find().count(&stack.db.db).await.unwrap(),
            run_logs::Entity::find().count(&stack.db.db).await.unwrap(),
            run_results::Entity::find()
                .count(&stack.db.db)
                .await
                .unwrap(),
            run_metric_summaries::Entity::find()
                .count(&stack.db.db)
                .await
                .unwrap(),
            run_metrics::Entity::find()
                .count(&stack.db.db)
                .await
                .unwrap(),
            run_batches::Entity::find()
                .count(&stack.db.db)
                .await
                .unwrap(),
        )
    };
    let before = count().await;
    let (status, body) = delete(id.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], id.as_str());
    let removed = &body["removed"];
    assert_eq!(
        (removed["lines"].as_u64(), removed["results"].as_u64()),
        (Some(lines), Some(results)),
        "{body}"
    );
    assert_eq!(
        (
            removed["metric_series"].as_u64(),
            removed["metric_points"].as_u64()
        ),
        (Some(3), Some(120)),
        "{body}"
    );
    let batches = run["batches"].as_u64().unwrap();
    assert_eq!(removed["batches"].as_u64(), Some(batches), "{body}");
    let after = count().await;
    assert_eq!(
        after,
        (
            before.0 - 1,
            before.1 - lines,
            before.2 - results,
            before.3 - 3,
            before.4 - 120,
            before.5 - batches
        )
    );
    assert_eq!(rollups(false).await, all_rollups - run_rollups);
    assert_eq!(
        stack.get(&format!("/api/runs/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        stack.get(&format!("/api/runs/{other}")).await.0,
        StatusCode::OK
    );
    let (status, _) = delete(id.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Its batches come back (republished under new message ids, past the duplicate
    // window): the aggregator drops them, and the run stays deleted.
    let js = stack.nats.jetstream().await;
    let output = athanor_testkit::read_run(&js, &id, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let dropped_before = stack
        .aggregator
        .stats()
        .of_deleted_runs
        .load(std::sync::atomic::Ordering::Relaxed);
    for batch in &output.batches {
        let payload = athanor_schemas::encode(batch).payload;
        js.publish(athanor_schemas::names::run_subject(&id), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    athanor_testkit::wait_for(
        "the returning batches dropped",
        std::time::Duration::from_secs(30),
        || async {
            let dropped = stack
                .aggregator
                .stats()
                .of_deleted_runs
                .load(std::sync::atomic::Ordering::Relaxed);
            (dropped - dropped_before >= output.batches.len() as u64).then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        stack.get(&format!("/api/runs/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(count().await, after);
    stack.stop().await;
}
