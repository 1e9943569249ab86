//! The OpenAPI document against the gateway that serves it: the document is generated
//! from the handlers (the router is built from the same annotations), and these tests
//! hold it to what the handlers answer on a real pipeline (nats-server, worker,
//! aggregator, SQLite) — every documented path and method, with real objects, with
//! missing ones, and without the API token.

mod common;

use athanor_gateway::GatewayConfig;
use athanor_workers::WorkerConfig;
use common::Stack;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "t0ken-for-openapi";
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// Every (path, method) the document lists, in its order.
fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                operations.push((path.clone(), method.to_string()));
            }
        }
    }
    operations
}

fn method(name: &str) -> Method {
    Method::from_bytes(name.to_uppercase().as_bytes()).unwrap()
}

/// `path` with `{id}` and `{name}` filled: a run's or an instance's id by the path.
fn fill(path: &str, run: &str, instance: &str) -> String {
    let id = if path.starts_with("/api/instances/") {
        instance
    } else {
        run
    };
    if path.starts_with("/api/experiments/") {
        return path.replace("{name}", "sweep");
    }
    if path.contains("metrics/{name}") {
        // `sweep` records a `loss` series; a comparison names its runs.
        let url = path.replace("{id}", id).replace("{name}", "loss");
        return if path.starts_with("/api/metrics/") {
            format!("{url}?runs={run}")
        } else {
            url
        };
    }
    path.replace("{id}", id).replace("{name}", "app.js")
}

/// Sends `method path` (with `body` as JSON when given) and returns the status and
/// the media type of the answer, without reading an endless SSE body.
async fn request(
    stack: &Stack,
    method_name: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut request = stack
        .http
        .request(method(method_name), format!("{}{path}", stack.base));
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let media = response.headers().get("content-type").map(|v| {
        v.to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .trim()
            .to_string()
    });
    let body = if media.as_deref() == Some("application/json") {
        response.json().await.unwrap_or(Value::Null)
    } else {
        // An SSE feed never ends by itself: its headers are all this checks.
        Value::Null
    };
    (status, media, body)
}

/// The answer is one the document declares for the operation: its status, and its
/// media type among that status's contents (none when it declares none).
fn assert_declared(doc: &Value, path: &str, method: &str, status: StatusCode, media: Option<&str>) {
    let responses = &doc["paths"][path][method]["responses"];
    let declared = responses
        .get(status.as_str())
        .unwrap_or_else(|| panic!("{method} {path} answered {status}, which the document does not declare (it declares {:?})",
            responses.as_object().unwrap().keys().collect::<Vec<_>>()));
    match declared.get("content").and_then(Value::as_object) {
        Some(content) => {
            let media =
                media.unwrap_or_else(|| panic!("{method} {path} {status}: no content-type"));
            assert!(
                content.contains_key(media),
                "{method} {path} {status}: content-type {media} is not among {:?}",
                content.keys().collect::<Vec<_>>()
            );
        }
        None => assert!(
            status == StatusCode::NO_CONTENT || media.is_none(),
            "{method} {path} {status}: a body the document does not declare ({media:?})"
        ),
    }
}

/// A request body that the operation accepts, for the real-object pass.
fn valid_body(path: &str, method: &str) -> Option<Value> {
    match (path, method) {
        ("/api/runs", "post") => {
            Some(json!({"experiment": "sweep", "config": {"iterations": 1, "delay_ms": 0}}))
        }
        ("/api/instances", "post") => Some(json!({"name": "another", "experiment": "sweep"})),
        ("/api/instances/{id}", "put") => Some(json!({"name": "renamed"})),
        ("/api/instances/{id}/runs", "post") => Some(json!({"config": {"iterations": 1}})),
        ("/api/experiments/{name}/validate", "post") => Some(json!({"config": {}})),
        _ => None,
    }
}

/// The document lists exactly the routes the router serves. The router is built from
/// the handlers' annotations, so nothing is routed that the document lacks; this checks
/// the other way: every documented path and method reaches its handler (not the
/// fallback's "no such endpoint", not 405), every method a path does not document is
/// 405, and an undocumented path is the fallback. The served document is the one the
/// library generates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_exactly_the_routes_the_router_serves() {
    let stack = Stack::start().await;
    let (status, doc) = stack.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        doc,
        serde_json::to_value(athanor_gateway::openapi()).unwrap()
    );
    assert_eq!(doc["openapi"], "3.1.0");
    let operations = operations(&doc);
    assert!(operations.len() >= 20, "{operations:?}");
    for (path, item) in doc["paths"].as_object().unwrap() {
        let url = fill(path, "no-such-run", "no-such-instance");
        for method_name in METHODS {
            let (status, _, body) = request(&stack, method_name, &url, None, None).await;
            if item.get(method_name).is_some() {
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method_name} {path}"
                );
                assert!(
                    !body["error"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("no such endpoint")),
                    "{method_name} {path} is documented but not routed"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method_name} {path} is routed but not documented"
                );
            }
        }
    }
    let (status, body) = stack.get("/api/not-a-route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .starts_with("no such endpoint"));
    // Every $ref resolves.
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = part.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "unresolved $ref {name}"
        );
    }
    stack.stop().await;
}

/// Every documented path and method, requested on a real gateway with path parameters
/// from real objects (a finished run, an instance), answers a status — and a media
/// type — that the document declares for it; then again with ids that do not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() {
    let stack = Stack::start().await;
    let (_, doc) = stack.get("/api/openapi.json").await;
    let (status, created) = stack
        .post(
            "/api/runs",
            r#"{"experiment":"sweep","config":{"iterations":2,"delay_ms":0}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let run = created["id"].as_str().unwrap().to_string();
    stack.wait_status(&run, "completed").await;
    let (status, instance) = stack
        .post(
            "/api/instances",
            r#"{"name":"documented","experiment":"sweep"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{instance}");
    let instance = instance["id"].as_str().unwrap().to_string();

    // Deleting the instance last, so the operations before it find it.
    let mut operations = operations(&doc);
    operations.sort_by_key(|(_, method)| method == "delete");
    let mut answered = Vec::new();
    for (path, method_name) in &operations {
        let url = fill(path, &run, &instance);
        let body = valid_body(path, method_name);
        let (status, media, answer) = request(&stack, method_name, &url, body.as_ref(), None).await;
        assert_declared(&doc, path, method_name, status, media.as_deref());
        answered.push(format!(
            "{} {path} {}",
            method_name.to_uppercase(),
            status.as_u16()
        ));
        // With real objects, nothing but the finished run's cancel is refused.
        let expected_refusal = path == "/api/runs/{id}/cancel";
        assert_eq!(
            status.is_success(),
            !expected_refusal,
            "{method_name} {path}: {status} {answer}"
        );
    }
    println!("{}", answered.join("\n"));

    for (path, method_name) in &operations {
        if !path.contains('{') {
            continue;
        }
        let url = fill(path, "no-such-run", "no-such-instance")
            .replace("app.js", "no-such-file")
            .replace("/experiments/sweep/", "/experiments/no-such-experiment/");
        let body = valid_body(path, method_name);
        let (status, media, answer) = request(&stack, method_name, &url, body.as_ref(), None).await;
        assert_declared(&doc, path, method_name, status, media.as_deref());
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{method_name} {path} of nothing: {answer}"
        );
    }
    stack.stop().await;
}

/// On a gateway with an API token and protected reads, every operation the document
/// marks as needing the bearer token answers 401 without it (declared, with a JSON
/// error), and the ones it marks open answer without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_security_is_what_the_gateway_enforces() {
    let stack = Stack::start_with(
        WorkerConfig::for_tests(),
        GatewayConfig {
            api_token: Some(TOKEN.into()),
            protect_reads: true,
            ..GatewayConfig::for_tests()
        },
    )
    .await;
    let (status, doc) = stack.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for (path, method_name) in operations(&doc) {
        let operation = &doc["paths"][&path][&method_name];
        let needs_token = operation["security"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.get("bearer").is_some());
        let url = fill(&path, "no-such-run", "no-such-instance");
        let (status, media, answer) = request(&stack, &method_name, &url, None, None).await;
        assert_declared(&doc, &path, &method_name, status, media.as_deref());
        if needs_token {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method_name} {path}");
            assert!(answer["error"].as_str().is_some(), "{answer}");
        } else {
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{method_name} {path}");
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");
    stack.stop().await;
}
