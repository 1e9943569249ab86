//! API tokens, feed tokens, CORS, and what the API cannot be made to do.

mod common;

use athanor_gateway::GatewayConfig;
use athanor_workers::WorkerConfig;
use common::{Feed, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};

const TOKEN: &str = "t0ken-for-tests";

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_writes_need_it_and_reads_stay_open() {
    let stack = Stack::start_with(
        WorkerConfig::for_tests(),
        GatewayConfig {
            api_token: Some(TOKEN.into()),
            ..GatewayConfig::for_tests()
        },
    )
    .await;
    let http = &stack.http;
    let url = |p: &str| format!("{}{p}", stack.base);
    let body = json!({"experiment": "sweep", "config": {"iterations": 1, "delay_ms": 0}});
    let (status, answer) = send(http.post(url("/api/runs")).json(&body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer["error"],
        "this gateway requires `Authorization: Bearer <api token>` for changes"
    );
    let (status, _) = send(http.post(url("/api/runs")).bearer_auth("wrong").json(&body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, created) = send(http.post(url("/api/runs")).bearer_auth(TOKEN).json(&body)).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap();
    let (status, _) = send(http.post(url(&format!("/api/runs/{id}/cancel")))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(http.delete(url("/api/instances/x"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(http.delete(url(&format!("/api/runs/{id}")))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Reads, feeds, the UI and the health checks need nothing.
    let (status, _) = send(http.get(url("/api/runs"))).await;
    assert_eq!(status, StatusCode::OK);
    let mut feed = Feed::open(&stack.base, &format!("/api/runs/{id}/events"), None).await;
    assert_eq!(feed.next().await.unwrap().event, "snapshot");
    for open in [
        "/",
        "/ui/app.js",
        "/healthz",
        "/api/openapi.json",
        "/metrics",
    ] {
        let response = http.get(url(open)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{open}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_reads_and_run_scoped_feed_tokens() {
    let stack = Stack::start_with(
        WorkerConfig::for_tests(),
        GatewayConfig {
            api_token: Some(TOKEN.into()),
            protect_reads: true,
            ..GatewayConfig::for_tests()
        },
    )
    .await;
    let http = &stack.http;
    let url = |p: &str| format!("{}{p}", stack.base);
    let (status, _) = send(http.get(url("/api/runs"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(http.get(url("/api/runs")).bearer_auth(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    // Prometheus metrics are a read like the others.
    let (status, _) = send(http.get(url("/metrics"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let metrics = http
        .get(url("/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(metrics
        .text()
        .await
        .unwrap()
        .contains("athanor_gateway_sse_viewers"));
    let body = json!({"experiment": "sweep", "config": {"iterations": 2, "delay_ms": 0}});
    let (_, created) = send(http.post(url("/api/runs")).bearer_auth(TOKEN).json(&body)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let (_, other) = send(http.post(url("/api/runs")).bearer_auth(TOKEN).json(&body)).await;
    let other = other["id"].as_str().unwrap().to_string();

    let events = format!("/api/runs/{id}/events");
    let (status, answer) = send(http.get(url(&events))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].as_str().unwrap().contains("feed-token"));
    let (status, _) = send(http.post(url(&format!("/api/runs/{id}/feed-token")))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, issued) = send(
        http.post(url(&format!("/api/runs/{id}/feed-token")))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let token = issued["token"].as_str().unwrap().to_string();
    // The token opens this run's feed (as a browser's EventSource would: in the URL)…
    let mut feed = Feed::open(&stack.base, &format!("{events}?token={token}"), None).await;
    assert_eq!(feed.next().await.unwrap().event, "snapshot");
    // …and nothing else.
    for path in [
        format!("/api/runs/{other}/events?token={token}"),
        format!("/api/events?token={token}"),
        format!("/api/runs/{id}?token={token}"),
        format!("{events}?token={}", token.replace('a', "b")),
    ] {
        let (status, _) = send(http.get(url(&path))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (_, lifecycle) = send(http.post(url("/api/events/feed-token")).bearer_auth(TOKEN)).await;
    let lifecycle = lifecycle["token"].as_str().unwrap();
    Feed::open(&stack.base, &format!("/api/events?token={lifecycle}"), None).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_only_the_allowed_origins() {
    let stack = Stack::start_with(
        WorkerConfig::for_tests(),
        GatewayConfig {
            cors_origins: vec!["https://lab.example".into()],
            ..GatewayConfig::for_tests()
        },
    )
    .await;
    let preflight = |origin: &'static str| {
        stack
            .http
            .request(reqwest::Method::OPTIONS, format!("{}/api/runs", stack.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://lab.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://lab.example"
    );
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let simple = stack
        .http
        .get(format!("{}/api/runs", stack.base))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(simple
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    stack.stop().await;
}

/// Experiments are code the worker hosts or commands its configuration declares; a
/// request names one and gives it validated values. No field or endpoint takes a
/// command line. (That declared commands get config values as data, never as command
/// text, is proven with real shells in `workers/tests/commands.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_makes_a_worker_run_a_command_line() {
    let stack = Stack::start().await;
    for (body, status, error) in [
        (
            json!({"experiment": "sh", "config": {"c": "touch /tmp/athanor-pwned"}}),
            StatusCode::NOT_FOUND,
            "unknown experiment \"sh\" (live workers host: echo, flaky, log_storm, metric_storm, sleepy, sweep)",
        ),
        (
            json!({"experiment": "echo", "config": {"command": "touch /tmp/athanor-pwned"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "config field `command` is not a field of this experiment (fields: message, count, level, repeat)",
        ),
        (
            json!({"experiment": "echo", "command": ["touch", "/tmp/athanor-pwned"]}),
            StatusCode::BAD_REQUEST,
            "",
        ),
    ] {
        let (got, answer) = send(
            stack
                .http
                .post(format!("{}/api/runs", stack.base))
                .json(&body),
        )
        .await;
        assert_eq!(got, status, "{body}");
        if !error.is_empty() {
            assert_eq!(answer["error"], error);
        }
    }
    stack.stop().await;
}

/// Found by a user: `POST /api/instances/{id}/runs` took `text/plain` and empty form
/// posts, so without a token any web page could start runs through its visitor's
/// browser (such posts need no CORS preflight). Every change now takes a JSON body or
/// none: 415 otherwise, and nothing happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_takes_a_json_body_or_none_never_a_form_post() {
    let stack = Stack::start().await;
    let http = &stack.http;
    let url = |p: &str| format!("{}{p}", stack.base);
    let (status, instance) = stack
        .post(
            "/api/instances",
            r#"{"name":"csrf","experiment":"sweep","config":{"iterations":1,"delay_ms":0}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{instance}");
    let runs = format!("/api/instances/{}/runs", instance["id"].as_str().unwrap());
    for (content_type, body) in [
        ("text/plain", r#"{"config":{}}"#),
        ("application/x-www-form-urlencoded", ""),
        ("multipart/form-data; boundary=x", "--x--"),
    ] {
        let (status, answer) = send(
            http.post(url(&runs))
                .header("content-type", content_type)
                .body(body),
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{answer}"
        );
    }
    let (status, _) = send(http.post(url(&runs)).body("{}")).await;
    assert_eq!(
        status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "a body without a type"
    );
    let (_, listed) = stack.get("/api/runs").await;
    assert_eq!(listed["total"], 0, "a refused post started a run");
    // JSON, or nothing at all, works.
    let (status, _) = send(http.post(url(&runs))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, created) = send(
        http.post(url(&runs))
            .json(&json!({"config": {"iterations": 2}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap();
    let (status, _) = send(
        http.post(url(&format!("/api/runs/{id}/cancel")))
            .header("content-type", "text/plain")
            .body("x"),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    stack.stop().await;
}

/// DNS rebinding: a page on another site points a name of its own at 127.0.0.1 and its
/// scripts reach the gateway with that name as `Host`. On loopback without a token,
/// `/api` answers only loopback names and `gateway.allowed_hosts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_loopback_without_a_token_only_known_host_names_reach_the_api() {
    let stack = Stack::start_with(
        WorkerConfig::for_tests(),
        GatewayConfig {
            allowed_hosts: vec!["Athanor.LAN".into()],
            ..GatewayConfig::for_tests()
        },
    )
    .await;
    let http = &stack.http;
    let port = stack.base.rsplit(':').next().unwrap().to_string();
    let with_host = |host: &str| {
        http.get(format!("{}/api/runs", stack.base))
            .header("host", host.replace("PORT", &port))
    };
    for host in [
        "127.0.0.1:PORT",
        "localhost:PORT",
        "athanor.lan:PORT",
        "[::1]:PORT",
    ] {
        let (status, _) = send(with_host(host)).await;
        assert_eq!(status, StatusCode::OK, "{host}");
    }
    for host in ["rebind.example:PORT", "127.0.0.1.nip.io:PORT"] {
        let (status, answer) = send(with_host(host)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("gateway.allowed_hosts"),
            "{answer}"
        );
    }
    // Nor the metrics.
    let metrics = http
        .get(format!("{}/metrics", stack.base))
        .header("host", "rebind.example")
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::FORBIDDEN);
    // The page itself is no secret: only the API is guarded.
    let response = http
        .get(format!("{}/", stack.base))
        .header("host", "rebind.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    stack.stop().await;
}

/// A change from another site's page is refused whatever its body: a bodiless POST,
/// which a browser sends without a preflight (`mode: 'no-cors'`), could otherwise cancel
/// a run of a gateway without a token. The gateway's own page, an origin in
/// `gateway.cors_origins`, and clients that are not pages (no `Origin`) still may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_from_another_sites_page_is_refused_even_without_a_body() {
    let stack = Stack::start_with(
        WorkerConfig::for_tests(),
        GatewayConfig {
            cors_origins: vec!["https://lab.example".into()],
            ..GatewayConfig::for_tests()
        },
    )
    .await;
    let http = &stack.http;
    let id = stack.sleepy_running().await;
    let cancel = format!("{}/api/runs/{id}/cancel", stack.base);
    for (header, value) in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let (status, answer) = send(http.post(&cancel).header(header, value)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{header}: {value}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .starts_with("a change from a page of "),
            "{answer}"
        );
    }
    let (status, answer) = send(
        http.delete(format!("{}/api/runs/{id}", stack.base))
            .header("origin", "https://evil.example"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (_, run) = stack.get(&format!("/api/runs/{id}")).await;
    assert_eq!(run["status"], "running", "a refused change reached the run");
    // Its own page (Origin = this gateway), a listed origin, and no Origin at all.
    let own = stack.base.clone();
    for origin in [Some(own.as_str()), Some("https://lab.example"), None] {
        let mut request = http.post(&cancel).header("sec-fetch-site", "same-origin");
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let (status, answer) = send(request).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{origin:?}: {answer}");
    }
    // Behind a proxy that rewrites `Host`: the name the browser used, forwarded.
    let (status, answer) = send(
        http.post(&cancel)
            .header("origin", "https://athanor.lab.example")
            .header("x-forwarded-host", "athanor.lab.example"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    stack.wait_status(&id, "cancelled").await;
    stack.stop().await;
}
