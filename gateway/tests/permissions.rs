//! Each component under exactly the least-privilege NATS user documented in
//! `deploy/nats-permissions.conf`: a whole pipeline works (runs started, followed live,
//! stored, cancelled; lifecycle news), nothing is refused on the way, and what a
//! component has no business doing is refused.

use std::time::Duration;

use athanor_aggregator::{Aggregator, AggregatorConfig};
use athanor_client::sse::SseDecoder;
use athanor_connections::nats::NatsConfig;
use athanor_gateway::{Gateway, GatewayConfig};
use athanor_schemas::names;
use athanor_testkit::{wait_for, TestDb, TestNats};
use athanor_workers::{builtin, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const PERMISSIONS: &str = include_str!("../../deploy/nats-permissions.conf");

fn as_user(nats: &TestNats, user: &str, password: &str) -> NatsConfig {
    NatsConfig {
        user: Some(user.into()),
        password: Some(password.into()),
        declare_topology: false,
        ..nats.config()
    }
}

fn violations(nats: &TestNats) -> Vec<String> {
    std::fs::read_to_string(nats.server.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_string)
        .collect()
}

/// The run once the API says it is in `status`.
async fn wait_status(http: &reqwest::Client, base: &str, id: &str, status: &str) -> Value {
    wait_for(status, Duration::from_secs(30), || async {
        let run: Value = http
            .get(format!("{base}/api/runs/{id}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (run["status"] == status).then_some(run)
    })
    .await
    .unwrap()
}

/// Whether `config`'s user may publish to `subject` through JetStream (acked).
async fn may_publish(config: &NatsConfig, subject: &str) -> bool {
    let client = athanor_connections::nats::connect(config, "probe")
        .await
        .unwrap();
    let js = athanor_connections::nats::jetstream(client, config);
    match js.publish(subject.to_string(), "{}".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_works_under_its_least_privilege_user() {
    athanor_testkit::init_tracing();
    let nats = TestNats::start_configured(PERMISSIONS);
    // The admin declares the topology (what `athanor migrate` does).
    let admin = NatsConfig {
        declare_topology: true,
        ..as_user(&nats, "athanor-admin", "change-me-admin")
    };
    athanor_connections::nats::open(&admin, "admin")
        .await
        .unwrap();
    // Without credentials: refused.
    assert!(
        athanor_connections::nats::connect(&nats.config(), "anonymous")
            .await
            .is_err()
    );

    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let worker_nats = as_user(&nats, "athanor-worker", "change-me-worker");
    let aggregator_nats = as_user(&nats, "athanor-aggregator", "change-me-aggregator");
    let gateway_nats = as_user(&nats, "athanor-gateway", "change-me-gateway");
    let worker = Worker::start(
        WorkerConfig::for_tests(),
        worker_nats.clone(),
        builtin::all(),
        stop.clone(),
    )
    .await
    .unwrap();
    let aggregator = Aggregator::start(
        AggregatorConfig::for_tests(),
        aggregator_nats.clone(),
        db.db.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let gateway = Gateway::start(
        GatewayConfig::for_tests(),
        gateway_nats.clone(),
        db.db.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", gateway.addr);
    let http = reqwest::Client::new();
    wait_for(
        "the worker's registration",
        Duration::from_secs(20),
        || async {
            let body: Value = http
                .get(format!("{base}/api/experiments"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body["experiments"].as_array()?.len() == builtin::all().len()).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", violations(&nats)));

    // A run, followed live to its end, and stored.
    let mut lifecycle = http.get(format!("{base}/api/events")).send().await.unwrap();
    let created: Value = http
        .post(format!("{base}/api/runs"))
        .json(&json!({"experiment": "sweep", "config": {"iterations": 3, "delay_ms": 50}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let mut feed = http
        .get(format!("{base}/api/runs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut decoder = SseDecoder::new();
    let mut names_seen = Vec::new();
    while !names_seen.iter().any(|n| n == "status") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), feed.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        names_seen.extend(decoder.push(&chunk).into_iter().map(|e| e.event));
    }
    assert_eq!(names_seen.first().map(String::as_str), Some("snapshot"));
    let run = wait_status(&http, &base, &id, "completed").await;
    assert_eq!(run["lines"], 3);
    let mut decoder = SseDecoder::new();
    let mut changes = Vec::new();
    while !changes.iter().any(|c: &Value| c["status"] == "completed") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), lifecycle.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        changes.extend(
            decoder
                .push(&chunk)
                .into_iter()
                .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()),
        );
    }

    // A cancel reaches the worker.
    let sleepy: Value = http
        .post(format!("{base}/api/runs"))
        .json(&json!({"experiment": "sleepy", "config": {"duration_ms": 60000}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sleepy = sleepy["id"].as_str().unwrap().to_string();
    wait_status(&http, &base, &sleepy, "running").await;
    let cancelled = http
        .post(format!("{base}/api/runs/{sleepy}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    wait_status(&http, &base, &sleepy, "cancelled").await;
    assert_eq!(
        violations(&nats),
        Vec::<String>::new(),
        "refused on the way"
    );

    // What each has no business doing.
    assert!(!may_publish(&worker_nats, &names::request_subject("sweep")).await);
    assert!(!may_publish(&gateway_nats, &names::run_subject("forged")).await);
    assert!(!may_publish(&aggregator_nats, &names::run_subject("forged")).await);
    assert!(!may_publish(&worker_nats, "$KV.athanor_control.cancel.x").await);
    let gateway_js = athanor_connections::nats::jetstream(
        athanor_connections::nats::connect(&gateway_nats, "probe")
            .await
            .unwrap(),
        &gateway_nats,
    );
    assert!(gateway_js.delete_stream(names::RUNS_STREAM).await.is_err());
    assert!(!violations(&nats).is_empty());

    stop.cancel();
    worker.wait().await;
    aggregator.wait().await;
    gateway.wait().await;
    db.close().await;
}

/// Generates a CA and a server certificate for 127.0.0.1 with the openssl CLI.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=athanor test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_a_user() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n{PERMISSIONS}",
        dir.path().join("server.pem").display().to_string(),
        dir.path().join("server.key").display().to_string(),
    );
    let nats = TestNats::start_configured(&tls);
    let admin = NatsConfig {
        declare_topology: true,
        tls_ca_file: Some(dir.path().join("ca.pem")),
        tls_required: true,
        ..as_user(&nats, "athanor-admin", "change-me-admin")
    };
    let js = athanor_connections::nats::open(&admin, "admin over TLS")
        .await
        .unwrap();
    let ack = js
        .publish(names::run_subject("tls-probe"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, names::RUNS_STREAM);
    // Without the CA the server's certificate is not trusted.
    let untrusted = NatsConfig {
        tls_ca_file: None,
        ..admin.clone()
    };
    assert!(athanor_connections::nats::connect(&untrusted, "no CA")
        .await
        .is_err());
    // Half a client certificate is a configuration error, said before connecting.
    let half = NatsConfig {
        tls_cert_file: Some(dir.path().join("server.pem")),
        ..admin
    };
    let error = athanor_connections::nats::connect(&half, "half")
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "NATS credentials: nats.tls_cert_file and nats.tls_key_file go together"
    );
}
