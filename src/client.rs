//! The client commands (`run`, `logs`, `runs`, `experiments`, `metrics`): argument handling and
//! printing around `athanor-client`, which speaks to the gateway.
//!
//! Exit codes of a followed run: 0 completed, 1 failed, 3 cancelled, 4 lost; 2 when
//! the gateway refused the request or could not be reached.

use std::io::{IsTerminal, Write};
use std::ops::Range;
use std::time::Duration;

use athanor_client::{Client, ClientError, RunFold};
use athanor_schemas::api::RunFilter;
use athanor_schemas::metric::MetricSummary;
use athanor_schemas::{format_time, LogLine, Progress, RunState};
use serde_json::Value;
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

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        Failure::api(error.to_string())
    }
}

type Outcome = Result<i32, Failure>;

pub fn connect(url: &str, token: Option<&str>) -> Result<Client, Failure> {
    Ok(Client::new(url, token)?)
}

/// `athanor run`: starts a run; with `follow`, streams it and returns its exit code.
pub async fn run(
    api: &Client,
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
    let created = api.start_run(experiment, Value::Object(config)).await?;
    if !follow {
        println!("{}", created.id);
        return Ok(0);
    }
    eprintln!("run {} ({experiment}) started", created.id);
    follow_run(api, &created.id, true, stop).await
}

/// `athanor logs`: the stored log; with `follow`, then the live feed to the end.
pub async fn logs(api: &Client, run_id: &str, follow: bool, stop: CancellationToken) -> Outcome {
    if follow {
        return follow_run(api, run_id, false, stop).await;
    }
    let mut response = api.log_text(run_id).await?;
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
    api: &Client,
    status: Option<&str>,
    experiment: Option<&str>,
    limit: u64,
) -> Outcome {
    let list = api
        .runs(&RunFilter {
            status: status.map(str::to_string),
            experiment: experiment.map(str::to_string),
            limit: Some(limit),
            offset: None,
        })
        .await?;
    println!(
        "{:<36}  {:<16}  {:<9}  {:>9}  {:<24}  ERROR",
        "ID", "EXPERIMENT", "STATUS", "LINES", "CREATED"
    );
    for run in &list.runs {
        // A pending run says why it waits where a finished one says why it failed.
        let error: String = run
            .error
            .as_deref()
            .or(run.waiting.as_deref())
            .unwrap_or("")
            .chars()
            .take(60)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        println!(
            "{:<36}  {:<16}  {:<9}  {:>9}  {:<24}  {error}",
            run.id,
            run.experiment,
            run.status,
            run.lines,
            format_time(run.created_at),
        );
    }
    eprintln!("{} of {} runs", list.runs.len(), list.total);
    Ok(0)
}

/// `athanor mcp`: the MCP tools on stdin/stdout until the client closes them (stdout
/// carries only the protocol; logs go to stderr).
pub async fn mcp(api: Client) -> Outcome {
    athanor_mcp::serve_stdio(api).await.map_err(Failure::api)?;
    Ok(0)
}

/// `athanor rm`: deletes each run; says what went for each, and exits with the API
/// failure code when any could not be deleted (the others still are).
pub async fn rm(api: &Client, ids: &[String]) -> Outcome {
    let mut failed = 0;
    for id in ids {
        match api.delete_run(id).await {
            Ok(deleted) => println!(
                "deleted {}: {} lines, {} results, {} metric points",
                deleted.id,
                deleted.removed.lines,
                deleted.removed.results,
                deleted.removed.metric_points
            ),
            Err(error) => {
                eprintln!("athanor: {id}: {error}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(Failure::api(format!(
            "{failed} of {} runs not deleted",
            ids.len()
        )));
    }
    Ok(0)
}

/// `athanor experiments`: what live workers host, with each config field.
pub async fn experiments(api: &Client) -> Outcome {
    let list = api.experiments().await?;
    if list.is_empty() {
        eprintln!("no live worker hosts any experiment");
    }
    for e in list {
        println!(
            "{}  ({} worker{})  {}",
            e.name,
            e.workers,
            if e.workers == 1 { "" } else { "s" },
            e.description
        );
        let schema = &e.config_schema;
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

/// `athanor metrics`: each metric's point count, last value (at its highest step),
/// minimum and maximum; with `follow`, again whenever they change (redrawn in place on
/// a terminal), until the run has ended.
pub async fn metrics(api: &Client, run_id: &str, follow: bool, stop: CancellationToken) -> Outcome {
    let terminal = std::io::stdout().is_terminal();
    let mut shown: Option<String> = None;
    loop {
        // The run's state first: metrics read after it hold everything it stored.
        let ended = api.run(run_id).await?.status.is_terminal();
        let table = metrics_table(&api.metrics(run_id).await?.metrics);
        if shown.as_deref() != Some(table.as_str()) {
            if terminal && shown.is_some() {
                print!("\x1b[H\x1b[2J");
            } else if shown.is_some() {
                println!();
            }
            print!("{table}");
            let _ = std::io::stdout().flush();
            shown = Some(table);
        }
        if !follow || ended {
            return Ok(0);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(130),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn metrics_table(metrics: &[MetricSummary]) -> String {
    if metrics.is_empty() {
        return "no metrics\n".into();
    }
    let width = metrics
        .iter()
        .map(|m| m.name.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 40);
    let mut out = format!(
        "{:<width$}  {:>10}  {:>12}  {:>12}  {:>12}  {:>12}\n",
        "NAME", "POINTS", "LAST STEP", "LAST", "MIN", "MAX"
    );
    for m in metrics {
        let name: String = m
            .name
            .chars()
            .take(40)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        out.push_str(&format!(
            "{name:<width$}  {:>10}  {:>12}  {:>12}  {:>12}  {:>12}\n",
            m.count,
            m.last_step,
            number(m.last.0),
            number(m.min.0),
            number(m.max.0),
        ));
    }
    out
}

/// A metric value in at most about 12 characters: NaN, inf, -inf, 6 decimals in the
/// usual range, else scientific.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else if v == 0.0 || (1e-4..1e6).contains(&v.abs()) {
        let text = format!("{v:.6}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.4e}")
    }
}

/// Prints the run's log live (with a progress bar on a terminal) until its terminal
/// status; the follower reconnects with `Last-Event-ID` when the connection drops.
async fn follow_run(
    api: &Client,
    run_id: &str,
    print_results: bool,
    stop: CancellationToken,
) -> Outcome {
    let mut feed = api.follow(run_id);
    let mut fold = RunFold::new();
    let mut screen = Screen::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return Ok(130),
            e = feed.next() => e?,
        };
        let Some(event) = event else {
            return Err(Failure::api("the feed ended without the run's status"));
        };
        let update = fold.apply(&event)?;
        if let Some(missing) = update.missing.clone() {
            tokio::select! {
                _ = stop.cancelled() => return Ok(130),
                () = screen.print_stored(api, run_id, missing) => {}
            }
        }
        screen.print_lines(update.lines);
        if update.progressed {
            if let Some(p) = &fold.progress {
                screen.progress(p);
            }
        }
        if let Some(status) = &fold.status {
            screen.clear_bar();
            if print_results && !fold.results.is_empty() {
                println!("results:");
                for (key, record) in &fold.results {
                    println!("  {key} = {}", record.value);
                }
            }
            let error = status.error.as_deref().unwrap_or("");
            eprintln!(
                "run {run_id} {}{}{error} ({} lines)",
                status.status,
                if error.is_empty() { "" } else { ": " },
                status.lines
            );
            return Ok(exit_code(status.status));
        }
    }
}

/// 0 completed, 1 failed, 3 cancelled, 4 lost.
pub fn exit_code(status: RunState) -> i32 {
    match status {
        RunState::Completed => 0,
        RunState::Cancelled => 3,
        RunState::Lost => 4,
        RunState::Failed | RunState::Pending | RunState::Running => 1,
    }
}

/// `-c key=value`: JSON when it parses (numbers, booleans, quoted strings, arrays),
/// else the text itself.
fn parse_value(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// The terminal `follow` prints to: lines on stdout, a progress bar on stderr.
struct Screen {
    bar: bool,
    bar_shown: bool,
    last_progress: Option<Progress>,
}

impl Screen {
    fn new() -> Self {
        Screen {
            bar: std::io::stderr().is_terminal(),
            bar_shown: false,
            last_progress: None,
        }
    }

    /// Lines `missing` from the database (history before a snapshot's tail).
    async fn print_stored(&mut self, api: &Client, run_id: &str, mut missing: Range<u64>) {
        // The database may lag the live feed by a moment, and the gateway may be
        // restarting: retry for a while before giving up on those lines.
        let mut attempts = 0;
        while !missing.is_empty() {
            let lines = api
                .log_range(run_id, missing.clone())
                .await
                .unwrap_or_default();
            let Some(last) = lines.last() else {
                attempts += 1;
                if attempts == 40 {
                    eprintln!(
                        "({} earlier lines could not be read; `athanor logs {run_id}` prints them once stored)",
                        missing.end - missing.start
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            };
            attempts = 0;
            missing.start = last.seq + 1;
            self.print_lines(&lines);
        }
    }

    fn print_lines(&mut self, lines: &[LogLine]) {
        if lines.is_empty() {
            return;
        }
        self.clear_bar();
        let mut out = std::io::stdout().lock();
        for line in lines {
            let _ = writeln!(
                out,
                "{} {:<5} {}",
                format_time(line.ts),
                line.level.as_str().to_uppercase(),
                line.message
            );
        }
        let _ = out.flush();
        drop(out);
        self.draw_bar();
    }

    fn progress(&mut self, p: &Progress) {
        self.last_progress = Some(p.clone());
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
        let (Some(p), true) = (&self.last_progress, self.bar) else {
            return;
        };
        let width = 30usize;
        let filled = if p.total == 0 {
            0
        } else {
            ((p.current as f64 / p.total as f64).min(1.0) * width as f64) as usize
        };
        eprint!(
            "\r\x1b[2K[{}{}] {}/{} {}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            p.current,
            p.total,
            p.message.as_deref().unwrap_or("")
        );
        self.bar_shown = true;
    }

    fn clear_bar(&mut self) {
        if self.bar_shown {
            eprint!("\r\x1b[2K");
            self.bar_shown = false;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_values_print_short_and_say_nan_and_inf() {
        use super::number;
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(-3.0), "-3");
        assert_eq!(number(1234567.0), "1.2346e6");
        assert_eq!(number(0.00001234), "1.2340e-5");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::NEG_INFINITY), "-inf");
    }
}
