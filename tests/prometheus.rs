//! Prometheus metrics as an operator checks them: `promtool check metrics` on every
//! exposition, and a real Prometheus (Debian's `prometheus`, installed by
//! `scripts/setup-test-tools`) scraping `athanor up`, and separate worker and
//! aggregator processes on `--metrics-addr`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use athanor_testkit::{wait_for, TestDb, TestNats};
use serde_json::{json, Value};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// A free TCP port on loopback (bound, then released for the process under test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `promtool check metrics` on `url`'s exposition: lint problems fail the test. Returns
/// the exposition.
async fn promtool_checked(url: &str) -> String {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    let mut promtool = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{PROMTOOL} ({e}): run scripts/setup-test-tools"));
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on {url}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The value of the series `name` (no labels) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The scrape configuration compose.yaml's Prometheus uses is one promtool accepts.
#[test]
fn the_compose_prometheus_configuration_is_valid() {
    let out = Command::new(PROMTOOL)
        .args(["check", "config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/prometheus.yml"
        ))
        .output()
        .unwrap_or_else(|e| panic!("{PROMTOOL} ({e}): run scripts/setup-test-tools"));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server scraping `targets` (`host:port` serving `/metrics`) every
/// 500 ms, with its store in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(targets: &[(&str, String)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\nscrape_configs:\n",
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{PROMETHEUS} ({e}): run scripts/setup-test-tools"));
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for(
            "Prometheus to be ready",
            Duration::from_secs(60),
            || async {
                let ready = reqwest::get(format!("{}/-/ready", prometheus.url))
                    .await
                    .ok()?;
                ready.status().is_success().then_some(())
            },
        )
        .await
        .unwrap();
        prometheus
    }

    /// The series of the instant query `promql`, or `None` while Prometheus does not
    /// answer (a query it refuses fails the test).
    async fn result(&self, promql: &str) -> Option<Vec<Value>> {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"].as_array().cloned()
    }

    /// The value of the instant query `promql` (its one series), or `None` while it
    /// has no result.
    async fn query(&self, promql: &str) -> Option<f64> {
        let result = self.result(promql).await?;
        assert!(
            result.len() <= 1,
            "{promql}: more than one series: {result:?}"
        );
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `promql` satisfies `ok`; returns the value.
    async fn until(&self, what: &str, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let waited = wait_for(what, Duration::from_secs(90), || async {
            self.query(promql).await.filter(|v| ok(*v))
        })
        .await;
        match waited {
            Ok(value) => value,
            Err(e) => panic!("{e}; {promql} is {:?}", self.query(promql).await),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run_when_completed(url: &str, id: &str) -> Value {
    wait_for("the run to complete", Duration::from_secs(120), || async {
        let run: Value = reqwest::get(format!("{url}/api/runs/{id}"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (run["status"] == "completed").then_some(run)
    })
    .await
    .unwrap()
}

/// `athanor up` scraped by a real Prometheus while a run logs 60 001 lines with the
/// database locked for a while: lines stored rise to exactly the run's count, and the
/// consumer's lag, up while nothing can be written, returns to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_athanor_up_while_a_run_logs() {
    athanor_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut up, url) = common::up(dir.path());
    common::wait_for_worker(&url);
    let exposition = promtool_checked(&format!("{url}/metrics")).await;
    // The three components of `up` on one page, before any run.
    for name in [
        "athanor_worker_pending_limit_bytes",
        "athanor_aggregator_lines_stored_total",
        "athanor_gateway_sse_viewers",
    ] {
        assert!(
            exposition.contains(&format!("\n{name} ")),
            "{name} missing:\n{exposition}"
        );
    }
    let target = url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&[("athanor", target)]).await;
    let stored = "athanor_aggregator_lines_stored_total{job=\"athanor\"}";
    let lag = "athanor_aggregator_consumer_pending_messages{job=\"athanor\"} + athanor_aggregator_consumer_ack_pending_messages{job=\"athanor\"}";
    assert_eq!(
        prometheus.until("a first scrape", stored, |_| true).await,
        0.0
    );

    let id = common::start_run(
        &url,
        "log_storm",
        json!({"lines_per_second": 20_000, "duration_ms": 3000, "line_bytes": 100}),
    )
    .await;
    // A viewer of the run, counting the batch events it is handed, until the status.
    let viewer = tokio::spawn({
        let (url, id) = (url.clone(), id.clone());
        async move {
            let client = athanor_client::Client::new(&url, None).unwrap();
            let mut feed = client.events(&id, None).await.unwrap();
            let mut batches = 0u64;
            loop {
                let event = tokio::time::timeout(Duration::from_secs(60), feed.next())
                    .await
                    .expect("an event within 60 s")
                    .expect("the feed")
                    .expect("an event before the end");
                match event.data {
                    athanor_client::FeedData::Batch(_) => batches += 1,
                    athanor_client::FeedData::Status(_) => return batches,
                    _ => {}
                }
            }
        }
    });
    let lock = common::hold_write_lock(&dir.path().join("athanor.db")).await;
    let while_locked = prometheus
        .until("the lag to show batches not stored", lag, |v| v > 0.0)
        .await;
    let stored_while_locked = prometheus.query(stored).await.unwrap();
    lock.rollback().await.unwrap();

    let run = run_when_completed(&url, &id).await;
    assert_eq!(run["lines"], 60_001);
    prometheus
        .until("every line stored", stored, |v| v == 60_001.0)
        .await;
    prometheus
        .until("the lag to return to 0", lag, |v| v == 0.0)
        .await;
    assert!(stored_while_locked < 60_001.0, "{stored_while_locked}");
    // The rise, as a dashboard shows it: a positive rate over the run.
    let rate = prometheus
        .until(
            "a positive rate of lines stored",
            "rate(athanor_aggregator_lines_stored_total[1m])",
            |v| v > 0.0,
        )
        .await;
    eprintln!(
        "lag while locked: {while_locked} messages; stored then: {stored_while_locked}; rate {rate:.0} lines/s"
    );
    assert_eq!(
        prometheus
            .query("athanor_worker_lines_total{job=\"athanor\"}")
            .await,
        Some(60_001.0)
    );
    let exposition = promtool_checked(&format!("{url}/metrics")).await;
    assert!(
        exposition.contains("athanor_gateway_http_requests_total{method=\"POST\",route=\"/api/runs\",status=\"201\"} 1\n"),
        "{exposition}"
    );
    assert!(
        exposition.contains("athanor_worker_batches_published_total{trigger=\"final\"} 1\n"),
        "{exposition}"
    );
    assert!(
        !exposition.contains(&id),
        "a run id in a label: {exposition}"
    );
    // The gateway's two legs of a batch: each batch frame handed to the viewer waited
    // once (exactly as many samples as it received); batches broadcast, at most the
    // run's.
    let handed = viewer.await.unwrap();
    let exposition = promtool_checked(&format!("{url}/metrics")).await;
    assert!(handed >= 1, "the viewer was handed no batch");
    assert_eq!(
        sample(&exposition, "athanor_gateway_sse_queued_seconds_count"),
        Some(handed as f64),
        "{exposition}"
    );
    let broadcast = sample(
        &exposition,
        "athanor_gateway_batch_broadcast_delay_seconds_count",
    )
    .unwrap_or(0.0);
    assert!(
        broadcast >= 1.0 && broadcast <= run["batches"].as_f64().unwrap(),
        "{broadcast} batches broadcast, the run has {}",
        run["batches"]
    );

    // Every panel of the Grafana dashboard in deploy/ is a valid query with data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/athanor-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queries = 0;
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let n = prometheus.result(expr).await.map_or(0, |r| r.len());
            assert!(
                n >= 1,
                "panel {:?}: {expr} returns no series",
                panel["title"]
            );
            queries += 1;
        }
    }
    eprintln!(
        "{} dashboard panels, {queries} queries, each with data",
        panels.len()
    );
    common::stop(&mut up);
}

/// `athanor worker`, `athanor aggregator` and `athanor gateway` as separate processes:
/// each exposition passes promtool, and each counts the same run exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_serve_their_own_metrics() {
    athanor_testkit::init_tracing();
    let nats = TestNats::start();
    let db = TestDb::new().await;
    let (worker_port, aggregator_port, gateway_port) = (free_port(), free_port(), free_port());
    let mut worker = common::component(
        &[
            "worker",
            "--metrics-addr",
            &format!("127.0.0.1:{worker_port}"),
        ],
        &nats,
        &db,
        &[],
    );
    let mut aggregator = common::component(
        &["aggregator"],
        &nats,
        &db,
        &[(
            "ATHANOR__METRICS__ADDR",
            format!("127.0.0.1:{aggregator_port}"),
        )],
    );
    let mut gateway = common::component(
        &["gateway"],
        &nats,
        &db,
        &[(
            "ATHANOR__GATEWAY__HTTP_ADDR",
            format!("127.0.0.1:{gateway_port}"),
        )],
    );
    let url = format!("http://127.0.0.1:{gateway_port}");
    common::wait_for_worker(&url);
    let worker_metrics = format!("http://127.0.0.1:{worker_port}/metrics");
    let aggregator_metrics = format!("http://127.0.0.1:{aggregator_port}/metrics");
    wait_for(
        "the aggregator's metrics",
        Duration::from_secs(30),
        || async { reqwest::get(&aggregator_metrics).await.ok().map(|_| ()) },
    )
    .await
    .unwrap();

    let id = common::start_run(
        &url,
        "log_storm",
        json!({"lines_per_second": 10_000, "duration_ms": 1000, "line_bytes": 50}),
    )
    .await;
    let run = run_when_completed(&url, &id).await;
    assert_eq!(run["lines"], 10_001);

    let worker_text = promtool_checked(&worker_metrics).await;
    assert_eq!(
        sample(&worker_text, "athanor_worker_lines_total"),
        Some(10_001.0)
    );
    assert_eq!(
        sample(&worker_text, "athanor_worker_runs_started_total"),
        Some(1.0)
    );
    assert!(
        !worker_text.contains("athanor_aggregator_") && !worker_text.contains("athanor_gateway_"),
        "{worker_text}"
    );
    let aggregator_text = wait_for(
        "the aggregator to count every line",
        Duration::from_secs(30),
        || async {
            let text = promtool_checked(&aggregator_metrics).await;
            (sample(&text, "athanor_aggregator_lines_stored_total") == Some(10_001.0))
                .then_some(text)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        sample(&aggregator_text, "athanor_aggregator_batches_stored_total"),
        run["batches"].as_f64()
    );
    assert!(
        !aggregator_text.contains("athanor_worker_")
            && !aggregator_text.contains("athanor_gateway_"),
        "{aggregator_text}"
    );
    let gateway_text = promtool_checked(&format!("{url}/metrics")).await;
    assert!(
        gateway_text.contains("athanor_gateway_http_requests_total{method=\"POST\",route=\"/api/runs\",status=\"201\"} 1\n"),
        "{gateway_text}"
    );
    assert!(
        gateway_text.contains("athanor_gateway_http_requests_total{method=\"GET\",route=\"/api/runs/{id}\",status=\"200\"}"),
        "{gateway_text}"
    );
    for child in [&mut worker, &mut aggregator, &mut gateway] {
        common::stop(child);
    }
    db.close().await;
}
