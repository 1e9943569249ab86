//! The client commands (`run`, `logs`, `runs`, `experiments`): they speak to a gateway
//! over its HTTP API and SSE feed, like any other client.
//!
//! Exit codes of a followed run: 0 completed, 1 failed, 3 cancelled, 4 lost; 2 when
//! the gateway refused the request or could not be reached.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use athanor_schemas::events::{self, BatchEvent, Snapshot, SseDecoder, StatusEvent};
use athanor_schemas::{format_time, LogLine, Progress, ResultRecord};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Exit code when the gateway refused the request or could not be reached.
pub const EXIT_API: i32 = 2;

/// A failure to report on stderr, with the exit code to leave with.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    fn api(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_API,
            message: message.into(),
        }
    }
}

type Outcome = Result<i32, Failure>;

pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(url: &str, token: Option<&str>) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = token
            .filter(|t| !t.is_empty())
            .and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Client {
            base: url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .default_headers(headers)
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let response = request
            .send()
            .await
            .map_err(|e| Failure::api(format!("cannot reach the gateway at {}: {e}", self.base)))?;
        if !response.status().is_success() {
            return Err(refusal(response).await);
        }
        Ok(response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// `athanor run`: starts a run; with `follow`, streams it and returns its exit code.
    pub async fn run(
        &self,
        experiment: &str,
        assignments: &[String],
        follow: bool,
        stop: CancellationToken,
    ) -> Outcome {
        let mut config = serde_json::Map::new();
        for assignment in assignments {
            let Some((key, value)) = assignment.split_once('=') else {
                return Err(Failure::api(format!(
                    "-c {assignment:?}: expected key=value"
                )));
            };
            config.insert(key.trim().to_string(), parse_value(value));
        }
        let created = self
            .call(
                self.http
                    .post(format!("{}/api/runs", self.base))
                    .json(&json!({ "experiment": experiment, "config": config })),
            )
            .await?;
        let id = created["id"].as_str().unwrap_or_default().to_string();
        if !follow {
            println!("{id}");
            return Ok(0);
        }
        eprintln!("run {id} ({experiment}) started");
        self.follow(&id, true, stop).await
    }

    /// `athanor logs`: the stored log; with `follow`, then the live feed to the end.
    pub async fn logs(&self, run_id: &str, follow: bool, stop: CancellationToken) -> Outcome {
        if follow {
            return self.follow(run_id, false, stop).await;
        }
        let response = self
            .http
            .get(format!("{}/api/runs/{run_id}/logs.txt", self.base))
            .send()
            .await
            .map_err(|e| Failure::api(format!("cannot reach the gateway at {}: {e}", self.base)))?;
        if !response.status().is_success() {
            return Err(refusal(response).await);
        }
        let mut response = response;
        let mut out = std::io::stdout().lock();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Failure::api(format!("the download broke off: {e}")))?
        {
            let _ = out.write_all(&chunk);
        }
        Ok(0)
    }

    /// `athanor runs`: a table of runs, newest first.
    pub async fn runs(
        &self,
        status: Option<&str>,
        experiment: Option<&str>,
        limit: u64,
    ) -> Outcome {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(s) = status {
            query.push(("status", s.to_string()));
        }
        if let Some(e) = experiment {
            query.push(("experiment", e.to_string()));
        }
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        let body = self.get(&format!("/api/runs?{}", query.join("&"))).await?;
        println!(
            "{:<36}  {:<16}  {:<9}  {:>9}  {:<24}  ERROR",
            "ID", "EXPERIMENT", "STATUS", "LINES", "CREATED"
        );
        for run in body["runs"].as_array().into_iter().flatten() {
            let error: String = run["error"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(60)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            println!(
                "{:<36}  {:<16}  {:<9}  {:>9}  {:<24}  {error}",
                run["id"].as_str().unwrap_or(""),
                run["experiment"].as_str().unwrap_or(""),
                run["status"].as_str().unwrap_or(""),
                run["lines"].as_i64().unwrap_or(0),
                format_time(run["created_at"].as_i64().unwrap_or(0)),
            );
        }
        eprintln!(
            "{} of {} runs",
            body["runs"].as_array().map_or(0, Vec::len),
            body["total"]
        );
        Ok(0)
    }

    /// `athanor experiments`: what live workers host, with each config field.
    pub async fn experiments(&self) -> Outcome {
        let body = self.get("/api/experiments").await?;
        let list = body["experiments"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            eprintln!("no live worker hosts any experiment");
        }
        for e in list {
            println!(
                "{}  ({} worker{})  {}",
                e["name"].as_str().unwrap_or(""),
                e["workers"],
                if e["workers"] == 1 { "" } else { "s" },
                e["description"].as_str().unwrap_or("")
            );
            let schema = &e["config_schema"];
            let required: Vec<&str> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for (name, field) in schema["properties"].as_object().into_iter().flatten() {
                let kind = match field["enum"].as_array() {
                    Some(choices) => choices
                        .iter()
                        .map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join("|"),
                    None => field["type"].as_str().unwrap_or("value").to_string(),
                };
                let mut line = format!("    -c {name}=<{kind}>");
                if let Some(default) = field.get("default") {
                    line.push_str(&format!("  default {default}"));
                }
                if let Some(min) = field.get("minimum") {
                    line.push_str(&format!("  min {min}"));
                }
                if let Some(max) = field.get("maximum") {
                    line.push_str(&format!("  max {max}"));
                }
                if required.contains(&name.as_str()) {
                    line.push_str("  required");
                }
                if let Some(d) = field["description"].as_str() {
                    line.push_str(&format!("  — {d}"));
                }
                println!("{line}");
            }
        }
        Ok(0)
    }

    /// Prints the run's log live (with a progress bar on a terminal), reconnecting with
    /// `Last-Event-ID` when the connection drops, until its terminal status.
    async fn follow(&self, run_id: &str, print_results: bool, stop: CancellationToken) -> Outcome {
        let mut view = Follower::new();
        let mut failures = 0u32;
        loop {
            let mut request = self
                .http
                .get(format!("{}/api/runs/{run_id}/events", self.base));
            if let Some(have) = view.have {
                request = request.header("Last-Event-ID", have.to_string());
            }
            if failures > 0 {
                // Never hammer a gateway that keeps dropping the stream.
                let backoff = Duration::from_millis(250 * u64::from(failures.min(8)));
                tokio::select! {
                    _ = stop.cancelled() => return Ok(130),
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            let response = tokio::select! {
                _ = stop.cancelled() => return Ok(130),
                r = request.send() => r,
            };
            failures += 1;
            let mut response = match response {
                Ok(r) if r.status().is_success() => r,
                Ok(r) if r.status().is_client_error() => return Err(refusal(r).await),
                other => {
                    if failures > 30 {
                        let reason = match other {
                            Ok(r) => format!("it answers {}", r.status()),
                            Err(e) => e.to_string(),
                        };
                        return Err(Failure::api(format!(
                            "lost the gateway at {} ({reason})",
                            self.base
                        )));
                    }
                    continue;
                }
            };
            let mut decoder = SseDecoder::new();
            loop {
                // Keep-alives come every 15 s: silence for longer means a dead link.
                let chunk = tokio::select! {
                    _ = stop.cancelled() => return Ok(130),
                    c = tokio::time::timeout(Duration::from_secs(45), response.chunk()) => c,
                };
                let Ok(Ok(Some(chunk))) = chunk else {
                    break; // dropped or silent: reconnect from the watermark
                };
                for event in decoder.push(&chunk) {
                    failures = 0;
                    let applied = tokio::select! {
                        _ = stop.cancelled() => return Ok(130),
                        a = view.apply(self, run_id, event) => a?,
                    };
                    if let Some(status) = applied {
                        view.clear_bar();
                        if print_results {
                            view.print_results();
                        }
                        let error = status.error.as_deref().unwrap_or("");
                        eprintln!(
                            "run {run_id} {}{}{error} ({} lines)",
                            status.status,
                            if error.is_empty() { "" } else { ": " },
                            status.lines
                        );
                        return Ok(exit_code(&status.status));
                    }
                }
            }
        }
    }
}

/// The gateway's JSON error message of a refused request.
async fn refusal(response: reqwest::Response) -> Failure {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Failure::api(
        body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the gateway answered {status}")),
    )
}

/// 0 completed, 1 failed, 3 cancelled, 4 lost.
pub fn exit_code(status: &str) -> i32 {
    match status {
        "completed" => 0,
        "cancelled" => 3,
        "lost" => 4,
        _ => 1,
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `-c key=value`: JSON when it parses (numbers, booleans, quoted strings, arrays),
/// else the text itself.
fn parse_value(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// What `follow` has printed and holds.
struct Follower {
    /// The feed's batch watermark (for `Last-Event-ID`).
    have: Option<u64>,
    /// Lines `0..printed` are on stdout.
    printed: u64,
    results: BTreeMap<String, ResultRecord>,
    bar: bool,
    bar_shown: bool,
    last_progress: Option<(u64, u64, Option<String>)>,
}

impl Follower {
    fn new() -> Self {
        Follower {
            have: None,
            printed: 0,
            results: BTreeMap::new(),
            bar: std::io::stderr().is_terminal(),
            bar_shown: false,
            last_progress: None,
        }
    }

    /// Applies one event; returns the terminal status when it is the end.
    async fn apply(
        &mut self,
        client: &Client,
        run_id: &str,
        event: events::SseEvent,
    ) -> Result<Option<StatusEvent>, Failure> {
        if let Some(id) = event.id.as_deref().and_then(|i| i.parse().ok()) {
            self.have = Some(id);
        }
        match event.event.as_str() {
            events::SNAPSHOT => {
                let snapshot: Snapshot = parse(&event.data)?;
                let first_in_tail = snapshot.tail.first().map_or(snapshot.lines, |l| l.seq);
                if self.printed < first_in_tail {
                    self.print_stored(client, run_id, first_in_tail).await?;
                }
                self.print_lines(&snapshot.tail);
                for (key, record) in snapshot.results {
                    self.record(record, Some(key));
                }
                if let Some(p) = &snapshot.run.progress {
                    self.progress(p);
                }
            }
            events::BATCH => {
                let batch: BatchEvent = parse(&event.data)?;
                self.print_lines(&batch.logs);
                for record in batch.results {
                    self.record(record, None);
                }
                if let Some(p) = &batch.progress {
                    self.progress(p);
                }
            }
            events::STATUS => return Ok(Some(parse(&event.data)?)),
            _ => {}
        }
        Ok(None)
    }

    /// Lines `printed..until` from the database (history before a snapshot's tail).
    async fn print_stored(
        &mut self,
        client: &Client,
        run_id: &str,
        until: u64,
    ) -> Result<(), Failure> {
        // The database may lag the live feed by a moment, and the gateway may be
        // restarting: retry for a while before giving up on those lines.
        let mut attempts = 0;
        while self.printed < until {
            let page = client
                .get(&format!(
                    "/api/runs/{run_id}/logs?after={}&before={until}&limit=5000",
                    self.printed as i64 - 1
                ))
                .await;
            let lines: Vec<LogLine> = page
                .ok()
                .and_then(|p| serde_json::from_value(p["lines"].clone()).ok())
                .unwrap_or_default();
            if lines.is_empty() {
                attempts += 1;
                if attempts == 40 {
                    eprintln!(
                        "({} earlier lines could not be read; `athanor logs {run_id}` prints them once stored)",
                        until - self.printed
                    );
                    self.printed = until;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            attempts = 0;
            self.print_lines(&lines);
        }
        Ok(())
    }

    fn print_lines(&mut self, lines: &[LogLine]) {
        let fresh: Vec<&LogLine> = lines.iter().filter(|l| l.seq >= self.printed).collect();
        if fresh.is_empty() {
            return;
        }
        self.clear_bar();
        let mut out = std::io::stdout().lock();
        for line in fresh {
            let _ = writeln!(
                out,
                "{} {:<5} {}",
                format_time(line.ts),
                line.level.as_str().to_uppercase(),
                line.message
            );
            self.printed = line.seq + 1;
        }
        let _ = out.flush();
        drop(out);
        self.draw_bar();
    }

    fn record(&mut self, record: ResultRecord, key: Option<String>) {
        let key = key.unwrap_or_else(|| record.key.clone());
        if self
            .results
            .get(&key)
            .is_none_or(|old| old.seq < record.seq)
        {
            self.results.insert(key, record);
        }
    }

    fn progress(&mut self, p: &Progress) {
        let now = (p.current, p.total, p.message.clone());
        if self.last_progress.as_ref() == Some(&now) {
            return;
        }
        self.last_progress = Some(now);
        if self.bar {
            self.draw_bar();
        } else {
            eprintln!(
                "progress {}/{}{}",
                p.current,
                p.total,
                p.message
                    .as_deref()
                    .map(|m| format!(" {m}"))
                    .unwrap_or_default()
            );
        }
    }

    fn draw_bar(&mut self) {
        let Some((current, total, message)) = &self.last_progress else {
            return;
        };
        if !self.bar {
            return;
        }
        let width = 30usize;
        let filled = if *total == 0 {
            0
        } else {
            ((*current as f64 / *total as f64).min(1.0) * width as f64) as usize
        };
        eprint!(
            "\r\x1b[2K[{}{}] {current}/{total} {}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            message.as_deref().unwrap_or("")
        );
        self.bar_shown = true;
    }

    fn clear_bar(&mut self) {
        if self.bar_shown {
            eprint!("\r\x1b[2K");
            self.bar_shown = false;
        }
    }

    fn print_results(&self) {
        if self.results.is_empty() {
            return;
        }
        println!("results:");
        for (key, record) in &self.results {
            println!("  {key} = {}", record.value);
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(data: &str) -> Result<T, Failure> {
    serde_json::from_str(data)
        .map_err(|e| Failure::api(format!("unexpected event from the gateway: {e}")))
}
