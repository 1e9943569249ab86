//! `athanor-client` against a real gateway: every typed call answers with the gateway's
//! own bodies, a followed run folds to exactly what the database stored, and refusals
//! come back with the gateway's message and status.

mod common;

use athanor_client::{ClientError, RunFold};
use athanor_schemas::api::{InstanceChange, LogQuery, NewInstance, RunFilter, RunOverrides};
use athanor_schemas::RunState;
use common::Stack;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_of_the_client_against_a_real_gateway() {
    let stack = Stack::start().await;
    let api = athanor_client::Client::new(&stack.base, None).unwrap();

    let experiments = api.experiments().await.unwrap();
    let sweep = experiments.iter().find(|e| e.name == "sweep").unwrap();
    assert_eq!((sweep.workers, sweep.busy), (1, 0));
    assert!(sweep.config_schema["properties"]["iterations"].is_object());

    // Start a run and follow it to its end, folding the feed.
    let created = api
        .start_run("sweep", json!({"iterations": 5, "delay_ms": 20}))
        .await
        .unwrap();
    assert_eq!(created.status, RunState::Pending);
    assert_eq!(created.config["iterations"], 5);
    let mut feed = api.follow(&created.id);
    let mut fold = RunFold::new();
    let mut lines = Vec::new();
    while let Some(event) = feed.next().await.unwrap() {
        let update = fold.apply(&event).unwrap();
        assert_eq!(update.missing, None);
        lines.extend(update.lines.iter().cloned());
    }
    let status = fold.status.clone().unwrap();
    assert_eq!(status.status, RunState::Completed);
    assert_eq!(feed.watermark(), Some(status.batches));
    assert_eq!(fold.run.as_ref().unwrap().status, RunState::Completed);
    assert_eq!(
        fold.progress.as_ref().map(|p| (p.current, p.total)),
        Some((5, 5))
    );
    assert_eq!(lines.len() as u64, status.lines);

    // What the feed gave is what was stored (the feed runs ahead of the database).
    stack.wait_status(&created.id, "completed").await;
    let run = api.run(&created.id).await.unwrap();
    assert_eq!(
        (run.status, run.lines as u64, run.batches as u64),
        (RunState::Completed, status.lines, status.batches)
    );
    assert_eq!(
        api.log_range(&created.id, 0..status.lines).await.unwrap(),
        lines
    );
    let page = api
        .logs(
            &created.id,
            &LogQuery {
                q: Some("iteration 3".into()),
                ..LogQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.lines.len(), 1);
    assert!(page.lines[0].message.starts_with("iteration 3:"));
    assert_eq!((page.more, page.total as u64), (false, status.lines));
    let stored = api.results(&created.id).await.unwrap().results;
    assert_eq!(stored.len(), 6, "five iterations and best_score");
    for record in &stored {
        assert_eq!(
            fold.results.get(&record.key),
            Some(record),
            "{}",
            record.key
        );
    }
    let mut text = api.log_text(&created.id).await.unwrap();
    let mut body = Vec::new();
    while let Some(chunk) = text.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(
        String::from_utf8(body).unwrap().lines().count() as u64,
        status.lines
    );
    let listed = api
        .runs(&RunFilter {
            experiment: Some("sweep".into()),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.runs[0], run);

    // Refusals: the gateway's status and message.
    match api.cancel(&created.id).await {
        Err(e @ ClientError::Refused { .. }) => {
            assert_eq!(e.status(), Some(StatusCode::CONFLICT));
            assert!(e.to_string().contains("already finished"), "{e}");
        }
        other => panic!("cancel of a finished run: {other:?}"),
    }
    let refused = api.run("no-such-run").await.unwrap_err();
    assert_eq!(refused.status(), Some(StatusCode::NOT_FOUND));
    let refused = api.start_run("sweep", json!({"iterations": "x"})).await;
    assert_eq!(
        refused.unwrap_err().status(),
        Some(StatusCode::UNPROCESSABLE_ENTITY)
    );

    // Instances: create, change, list, start with overrides, delete.
    let instance = api
        .create_instance(&NewInstance {
            name: "short sweep".into(),
            experiment: "sweep".into(),
            config: json!({"iterations": 2, "delay_ms": 10}),
        })
        .await
        .unwrap();
    let changed = api
        .update_instance(
            &instance.id,
            &InstanceChange {
                name: Some("shorter sweep".into()),
                config: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.name, "shorter sweep");
    assert_eq!(api.instance(&instance.id).await.unwrap(), changed);
    assert_eq!(api.instances(Some("sweep")).await.unwrap(), vec![changed]);
    let mut overrides = RunOverrides::default();
    overrides.config.insert("iterations".into(), json!(1));
    let started = api.start_instance(&instance.id, &overrides).await.unwrap();
    assert_eq!(started.instance_id.as_deref(), Some(instance.id.as_str()));
    assert_eq!(started.config["iterations"], 1);
    let mut feed = api.follow(&started.id);
    let mut fold = RunFold::new();
    while let Some(event) = feed.next().await.unwrap() {
        fold.apply(&event).unwrap();
    }
    assert_eq!(fold.results.len(), 2, "one iteration and best_score");
    api.delete_instance(&instance.id).await.unwrap();
    assert!(api.instances(None).await.unwrap().is_empty());
    stack.stop().await;
}
