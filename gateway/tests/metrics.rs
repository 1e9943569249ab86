//! Metric series through the whole pipeline: a real worker emits them, the aggregator
//! stores them, the gateway serves their summaries, their series (exact or downsampled)
//! and comparisons, and carries them in the live feed.

mod common;

use std::collections::BTreeMap;

use athanor_aggregator::store::{store, Incoming};
use athanor_schemas::metric::{MetricRecord, MetricValue};
use athanor_schemas::Batch;
use athanor_workers::builtin::MetricStorm;
use common::{Feed, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start(stack: &Stack, config: Value) -> String {
    let body = json!({"experiment": "metric_storm", "config": config}).to_string();
    let (status, created) = stack.post("/api/runs", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["id"].as_str().unwrap().to_string()
}

fn num(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{v} is not a finite number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_metrics_are_summarised_served_exactly_downsampled_and_compared() {
    let stack = Stack::start().await;
    let id = start(
        &stack,
        json!({"metrics": 3, "steps": 5000, "spike_step": 3333}),
    )
    .await;
    let other = start(&stack, json!({"metrics": 1, "steps": 10})).await;
    stack.wait_status(&id, "completed").await;
    stack.wait_status(&other, "completed").await;

    let (status, list) = stack.get(&format!("/api/runs/{id}/metrics")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let summaries: BTreeMap<&str, &Value> = list["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m))
        .collect();
    assert_eq!(
        summaries.keys().copied().collect::<Vec<_>>(),
        ["m0", "m1", "m2"]
    );
    for (i, name) in ["m0", "m1", "m2"].into_iter().enumerate() {
        let m = summaries[name];
        assert_eq!(m["count"], 5000, "{m}");
        assert_eq!(m["last_step"], 4999, "{m}");
        assert_eq!(num(&m["last"]), MetricStorm::value(i, 4999, Some(3333)));
        let values: Vec<f64> = (0..5000)
            .map(|s| MetricStorm::value(i, s, Some(3333)))
            .collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!((num(&m["min"]), num(&m["max"])), (min, max), "{name}");
    }
    assert_eq!(num(&summaries["m0"]["max"]), 1e6);

    // Exact: no more points than max_points.
    let (status, series) = stack
        .get(&format!("/api/runs/{id}/metrics/m1?max_points=5000"))
        .await;
    assert_eq!(status, StatusCode::OK, "{series}");
    assert_eq!(
        (series["run_id"].as_str(), series["name"].as_str()),
        (Some(id.as_str()), Some("m1"))
    );
    assert_eq!(
        (series["exact"].as_bool(), series["count"].as_u64()),
        (Some(true), Some(5000))
    );
    let buckets = series["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 5000);
    for (step, b) in buckets.iter().enumerate() {
        assert_eq!(b["step"], step);
        assert_eq!(
            num(&b["value"]),
            MetricStorm::value(1, step as u64, Some(3333))
        );
    }

    // Downsampled: at most max_points buckets; the spike and the last point survive.
    let (_, series) = stack
        .get(&format!("/api/runs/{id}/metrics/m0?max_points=100"))
        .await;
    assert_eq!(series["exact"], false, "{series}");
    assert_eq!(series["count"], 5000);
    let buckets = series["buckets"].as_array().unwrap();
    assert!(
        buckets.len() <= 100 && buckets.len() >= 50,
        "{} buckets",
        buckets.len()
    );
    assert_eq!(
        buckets
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>(),
        5000
    );
    let top = buckets
        .iter()
        .max_by(|a, b| num(&a["max"]).total_cmp(&num(&b["max"])))
        .unwrap();
    assert_eq!(
        (num(&top["max"]), top["max_step"].as_u64()),
        (1e6, Some(3333))
    );
    let last = buckets.last().unwrap();
    assert_eq!(last["step"], 4999);
    assert_eq!(num(&last["value"]), MetricStorm::value(0, 4999, Some(3333)));
    let steps: Vec<u64> = buckets
        .iter()
        .map(|b| b["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "buckets in step order"
    );

    // A window of steps, exact at its ends.
    let (_, window) = stack
        .get(&format!(
            "/api/runs/{id}/metrics/m2?from_step=1001&to_step=2998&max_points=40"
        ))
        .await;
    assert_eq!(window["count"], 1998, "{window}");
    let buckets = window["buckets"].as_array().unwrap();
    assert!(buckets.len() <= 40);
    let lowest = buckets
        .iter()
        .map(|b| b["min_step"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(lowest >= 1001);
    assert_eq!(buckets.last().unwrap()["step"], 2998);

    // Up to the largest step: the range is covered by a few block ranges, not walked
    // block by block (schemathesis found this request hanging the gateway).
    let (status, all) = stack
        .get(&format!(
            "/api/runs/{id}/metrics/m0?from_step=0&to_step=9223372036854775806"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["count"], 5000);
    assert_eq!(all["buckets"].as_array().unwrap().len(), 1, "{all}");

    // Two runs side by side, in the order asked; a run without the metric is empty.
    let (status, compared) = stack
        .get(&format!(
            "/api/metrics/m1?runs={other},{id}&max_points=10000"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{compared}");
    assert_eq!(compared["name"], "m1");
    let runs = compared["runs"].as_array().unwrap();
    assert_eq!(runs[0]["run_id"], other.as_str());
    assert_eq!(runs[0]["count"], 0);
    assert_eq!(runs[1]["run_id"], id.as_str());
    assert_eq!(runs[1]["count"], 5000);

    // Bad requests say what is wrong; nothing is served for what does not exist.
    for (path, status, says) in [
        (
            format!("/api/runs/{id}/metrics/m0?max_points=0"),
            400,
            "max_points must be between 1 and 10000, got 0",
        ),
        (
            format!("/api/runs/{id}/metrics/m0?max_points=10001"),
            400,
            "max_points must be between 1 and 10000, got 10001",
        ),
        (
            format!("/api/runs/{id}/metrics/m0?from_step=9&to_step=3"),
            400,
            "from_step (9) is after to_step (3)",
        ),
        (
            format!("/api/runs/{id}/metrics/m0?from_step=9223372036854775808"),
            400,
            "from_step must be at most 9223372036854775807",
        ),
        (
            format!("/api/runs/{id}/metrics/m0?step=1"),
            400,
            "unknown field `step`",
        ),
        (
            format!("/api/runs/{id}/metrics/nope"),
            404,
            "has no metric \"nope\"",
        ),
        (
            "/api/runs/nope/metrics".into(),
            404,
            "run \"nope\" not found",
        ),
        (
            "/api/metrics/m0?runs=".into(),
            400,
            "runs must name 1 to 20 runs, comma-separated; got 0",
        ),
        (
            format!("/api/metrics/m0?runs={}", vec![id.as_str(); 21].join(",")),
            400,
            "got 21",
        ),
        (
            format!("/api/metrics/m0?runs={id},nope"),
            404,
            "run \"nope\" not found",
        ),
    ] {
        let (got, body) = stack.get(&path).await;
        assert_eq!(got.as_u16(), status, "{path}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "{path}: {error:?} does not say {says:?}"
        );
    }

    // A feed opened after the run ended draws the whole curves from its snapshot.
    let mut feed = Feed::open(&stack.base, &format!("/api/runs/{id}/events"), None).await;
    let snapshot = feed.next().await.unwrap();
    assert_eq!(snapshot.event, "snapshot");
    let data: Value = serde_json::from_str(&snapshot.data).unwrap();
    let m0 = &data["metrics"]["m0"];
    assert_eq!(m0["count"], 5000, "{m0}");
    let buckets = m0["buckets"].as_array().unwrap();
    assert!(buckets.len() <= 800);
    assert!(buckets
        .iter()
        .any(|b| num(&b["max"]) == 1e6 && b["max_step"] == 3333));
    assert_eq!(buckets.last().unwrap()["step"], 4999);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_follows_metric_points_live_each_exactly_once() {
    let stack = Stack::start().await;
    let id = start(
        &stack,
        json!({"metrics": 2, "steps": 600, "steps_per_second": 400, "log_steps": false}),
    )
    .await;
    let mut feed = Feed::open(&stack.base, &format!("/api/runs/{id}/events"), None).await;
    let mut points: BTreeMap<(String, u64), f64> = BTreeMap::new();
    let mut seqs = Vec::new();
    while let Some(event) = feed.next().await {
        let data: Value = serde_json::from_str(&event.data).unwrap();
        match event.event.as_str() {
            "snapshot" => {
                for (name, series) in data["metrics"].as_object().into_iter().flatten() {
                    assert_eq!(series["exact"], true);
                    for b in series["buckets"].as_array().unwrap() {
                        points.insert(
                            (name.clone(), b["step"].as_u64().unwrap()),
                            num(&b["value"]),
                        );
                    }
                }
            }
            "batch" => {
                for record in data["metrics"].as_array().into_iter().flatten() {
                    let record: MetricRecord = serde_json::from_value(record.clone()).unwrap();
                    seqs.push(record.seq);
                    for (name, value) in record.values {
                        let fresh = points.insert((name, record.step), value.0).is_none();
                        assert!(fresh, "step {} twice", record.step);
                    }
                }
            }
            "status" => break,
            _ => {}
        }
    }
    assert_eq!(points.len(), 1200);
    for ((name, step), value) in points {
        let i = name[1..].parse::<usize>().unwrap();
        assert_eq!(value, MetricStorm::value(i, step, None), "{name} at {step}");
    }
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "records in seq order, none twice"
    );
    stack.stop().await;
}

/// One series of a million points, written straight through the aggregator's store in
/// 100 batches, read back at max_points=1000: the true extremes (one spike up, one
/// down) and the last point are in the buckets, and every point is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_point_series_keeps_its_single_spikes_in_a_thousand_buckets() {
    let stack = Stack::start().await;
    let run = "million";
    let wave = |step: u64| (step as f64 / 5000.0).sin();
    for b in 0..100u64 {
        let mut batch = Batch::new(run, b, "test-worker");
        for step in b * 10_000..(b + 1) * 10_000 {
            let value = match step {
                424_242 => 77.0,
                900_001 => -55.0,
                _ => wave(step),
            };
            batch.metrics.push(MetricRecord {
                seq: step,
                step,
                ts: step as i64,
                values: [("loss".to_string(), MetricValue(value))].into(),
            });
        }
        store(
            &stack.db.db,
            vec![Incoming {
                batch,
                stream_seq: b + 1,
            }],
        )
        .await
        .unwrap();
    }
    let (status, series) = stack
        .get(&format!("/api/runs/{run}/metrics/loss?max_points=1000"))
        .await;
    assert_eq!(status, StatusCode::OK, "{series}");
    assert_eq!(
        (series["count"].as_u64(), series["exact"].as_bool()),
        (Some(1_000_000), Some(false))
    );
    let buckets = series["buckets"].as_array().unwrap();
    assert!(
        (500..=1000).contains(&buckets.len()),
        "{} buckets",
        buckets.len()
    );
    assert_eq!(
        buckets
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>(),
        1_000_000
    );
    let top = buckets
        .iter()
        .max_by(|a, b| num(&a["max"]).total_cmp(&num(&b["max"])))
        .unwrap();
    assert_eq!(
        (num(&top["max"]), top["max_step"].as_u64()),
        (77.0, Some(424_242))
    );
    let bottom = buckets
        .iter()
        .min_by(|a, b| num(&a["min"]).total_cmp(&num(&b["min"])))
        .unwrap();
    assert_eq!(
        (num(&bottom["min"]), bottom["min_step"].as_u64()),
        (-55.0, Some(900_001))
    );
    let last = buckets.last().unwrap();
    assert_eq!(
        (last["step"].as_u64(), num(&last["value"])),
        (Some(999_999), wave(999_999))
    );
    stack.stop().await;
}
