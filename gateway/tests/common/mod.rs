//! The pipeline the gateway tests run against: nats-server, a worker, an aggregator, a
//! database and the gateway on a free port, spoken to with a real HTTP client; and a
//! reader of the SSE feeds.
#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use athanor_aggregator::{Aggregator, AggregatorConfig};
use athanor_client::sse::SseEvent;
use athanor_gateway::{Gateway, GatewayConfig};
use athanor_testkit::{wait_for, TestDb, TestNats};
use athanor_workers::{builtin, Worker, WorkerConfig};
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub struct Stack {
    pub nats: TestNats,
    pub db: TestDb,
    pub stop: CancellationToken,
    pub worker: Worker,
    pub aggregator: Aggregator,
    pub gateway: Gateway,
    pub http: reqwest::Client,
    pub base: String,
    /// The gateway's API token, sent by `get` and `post` when set.
    pub token: Option<String>,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(WorkerConfig::for_tests(), GatewayConfig::for_tests()).await
    }

    pub async fn start_with(worker: WorkerConfig, gateway: GatewayConfig) -> Self {
        athanor_testkit::init_tracing();
        let nats = TestNats::start();
        let db = TestDb::new().await;
        let stop = CancellationToken::new();
        let worker = Worker::start(worker, nats.config(), builtin::all(), stop.clone())
            .await
            .unwrap();
        let aggregator = Aggregator::start(
            AggregatorConfig::for_tests(),
            nats.config(),
            db.db.clone(),
            stop.clone(),
        )
        .await
        .unwrap();
        let token = gateway.api_token.clone();
        let gateway = Gateway::start(gateway, nats.config(), db.db.clone(), stop.clone())
            .await
            .unwrap();
        let base = format!("http://{}", gateway.addr);
        let stack = Stack {
            nats,
            db,
            stop,
            worker,
            aggregator,
            gateway,
            http: reqwest::Client::new(),
            token,
            base,
        };
        // The worker registers on its first heartbeat.
        wait_for(
            "the worker's registration",
            Duration::from_secs(20),
            || async {
                let (_, body) = stack.get("/api/experiments").await;
                (body["experiments"]
                    .as_array()
                    .is_some_and(|e| e.len() == builtin::all().len()))
                .then_some(())
            },
        )
        .await
        .unwrap();
        stack
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.token.as_deref().unwrap_or_default())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Starts a `sleepy` run of a minute and waits until it runs; its id.
    pub async fn sleepy_running(&self) -> String {
        let (_, created) = self
            .post(
                "/api/runs",
                r#"{"experiment":"sleepy","config":{"duration_ms":60000}}"#,
            )
            .await;
        let id = created["id"].as_str().unwrap().to_string();
        self.wait_status(&id, "running").await;
        id
    }

    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        wait_for(
            &format!("run {id} to be {status}"),
            Duration::from_secs(60),
            || async {
                let (_, run) = self.get(&format!("/api/runs/{id}")).await;
                (run["status"] == status).then_some(run)
            },
        )
        .await
        .unwrap()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.worker.wait().await;
        self.aggregator.wait().await;
        self.gateway.wait().await;
        self.db.close().await;
    }
}

/// An SSE connection, read event by event.
pub struct Feed {
    stream: athanor_client::EventStream,
}

impl Feed {
    /// Opens `path` (e.g. `/api/runs/<id>/events`) on `base`, resuming from
    /// `last_event_id` when given.
    pub async fn open(base: &str, path: &str, last_event_id: Option<u64>) -> Feed {
        let stream = athanor_client::Client::new(base, None)
            .unwrap()
            .stream(path, last_event_id)
            .await
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
        assert_eq!(
            stream.headers()["content-type"],
            "text/event-stream",
            "opening {path}"
        );
        Feed { stream }
    }

    /// The next event, or `None` when the server ended the stream. Panics after 60 s of
    /// silence (keep-alives do not count as events but keep it from hanging forever).
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(Duration::from_secs(60), self.stream.next_raw())
            .await
            .expect("an event within 60 s")
            .expect("the stream reads")
    }
}
