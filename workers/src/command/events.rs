//! The structured channel of a command experiment: one JSON object per line on the
//! pipe named by `ATHANOR_EVENTS_FD`. Text on stdout is never parsed for commands; this
//! is the only way a child records results and metrics, reports progress, logs with a
//! level or declares its outcome. A line that is not a valid event becomes a `warn` line
//! in the run's log naming the problem; the run goes on.
//!
//! JSON has no NaN or infinities: they are written as the strings `"NaN"`, `"Infinity"`
//! and `"-Infinity"`. A line that is not valid JSON only because it holds them bare (as
//! Python's `json.dumps` writes them) is read as if they were those strings; text inside
//! strings is never touched.

use std::collections::BTreeMap;

use athanor_schemas::metric::MAX_STEP;
use athanor_schemas::{Level, MetricValue};
use serde::Deserialize;
use serde_json::Value;

use crate::context::RunContext;

/// The longest event line taken; a longer one is reported and skipped.
pub(crate) const MAX_EVENT_BYTES: usize = 1 << 20;

/// How much of a rejected line the warning quotes.
const QUOTE_CHARS: usize = 120;

/// One event, as the child writes it.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Event {
    Result {
        key: String,
        value: Value,
    },
    Metric {
        name: String,
        step: u64,
        value: MetricValue,
    },
    Metrics {
        step: u64,
        values: BTreeMap<String, MetricValue>,
    },
    Progress {
        current: u64,
        total: u64,
        #[serde(default)]
        message: Option<String>,
    },
    Log {
        #[serde(default)]
        level: Option<String>,
        message: String,
        #[serde(default)]
        metadata: Option<Value>,
    },
    Outcome {
        status: OutcomeStatus,
        #[serde(default)]
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutcomeStatus {
    Completed,
    Failed,
}

/// A level by its name, with the names other languages' loggers use.
pub(crate) fn level(name: &str) -> Option<Level> {
    Some(match name.to_ascii_lowercase().as_str() {
        "trace" => Level::Trace,
        "debug" => Level::Debug,
        "info" | "notice" => Level::Info,
        "warn" | "warning" => Level::Warn,
        "error" | "err" | "critical" | "fatal" | "crit" => Level::Error,
        _ => return None,
    })
}

/// Splits the events pipe into lines and applies each to the run.
pub(crate) struct EventReader {
    /// The line being read.
    line: Vec<u8>,
    /// Bytes of the current line past [`MAX_EVENT_BYTES`] (the line is skipped).
    oversized: usize,
    /// Lines read, for warnings.
    number: u64,
}

impl EventReader {
    pub(crate) fn new() -> Self {
        EventReader {
            line: Vec::new(),
            oversized: 0,
            number: 0,
        }
    }

    pub(crate) fn push(&mut self, mut bytes: &[u8], ctx: &RunContext) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let part = &bytes[..end.unwrap_or(bytes.len())];
            let room = MAX_EVENT_BYTES.saturating_sub(self.line.len());
            let take = part.len().min(room);
            self.line.extend_from_slice(&part[..take]);
            self.oversized += part.len() - take;
            match end {
                Some(end) => {
                    self.end_line(ctx);
                    bytes = &bytes[end + 1..];
                }
                None => break,
            }
        }
    }

    /// The end of the pipe: a last line without a newline counts.
    pub(crate) fn finish(&mut self, ctx: &RunContext) {
        if !self.line.is_empty() || self.oversized > 0 {
            self.end_line(ctx);
        }
    }

    fn end_line(&mut self, ctx: &RunContext) {
        self.number += 1;
        let line = std::mem::take(&mut self.line);
        let oversized = std::mem::take(&mut self.oversized);
        if oversized > 0 {
            warn(
                ctx,
                self.number,
                &format!(
                    "is {} bytes, over the limit of {MAX_EVENT_BYTES}",
                    line.len() + oversized
                ),
                &line,
            );
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match parse(&line) {
            Ok(event) => {
                if let Err(problem) = apply(event, ctx) {
                    warn(ctx, self.number, &problem, &line);
                }
            }
            Err(error) => warn(
                ctx,
                self.number,
                &format!("is not a valid event: {error}"),
                &line,
            ),
        }
    }
}

/// Parses one line; a line holding bare `NaN`, `Infinity` or `-Infinity` is parsed again
/// with them quoted. The error reported is the first one, unless quoting made the line
/// valid JSON that is still not a valid event (a bad step beside a bare NaN, say).
fn parse(line: &[u8]) -> serde_json::Result<Event> {
    let error = match serde_json::from_slice(line) {
        Ok(event) => return Ok(event),
        Err(error) => error,
    };
    let Some(quoted) = quote_non_finite(line) else {
        return Err(error);
    };
    match serde_json::from_slice(&quoted) {
        Err(again) if !again.is_data() => Err(error),
        parsed => parsed,
    }
}

/// The bare tokens Python's `json.dumps` writes for non-finite floats.
const NON_FINITE: [&[u8]; 3] = [b"-Infinity", b"Infinity", b"NaN"];

/// `line` with every bare `NaN`, `Infinity` and `-Infinity` outside strings put in
/// quotes, or `None` when it holds none.
fn quote_non_finite(line: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(line.len() + 8);
    let mut changed = false;
    let mut in_string = false;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if in_string {
            match b {
                b'\\' => {
                    out.extend_from_slice(&line[i..(i + 2).min(line.len())]);
                    i += 2;
                    continue;
                }
                b'"' => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some(token) = NON_FINITE.iter().find(|t| {
            line[i..].starts_with(t)
                && !line.get(i + t.len()).is_some_and(u8::is_ascii_alphanumeric)
                && !i
                    .checked_sub(1)
                    .and_then(|p| line.get(p))
                    .is_some_and(u8::is_ascii_alphanumeric)
        }) {
            out.push(b'"');
            out.extend_from_slice(token);
            out.push(b'"');
            changed = true;
            i += token.len();
            continue;
        }
        out.push(b);
        i += 1;
    }
    changed.then_some(out)
}

/// A step that can be stored, or why not.
fn storable(step: u64) -> Result<u64, String> {
    if step > MAX_STEP {
        return Err(format!(
            "has step {step}, over the largest storable step {MAX_STEP}"
        ));
    }
    Ok(step)
}

fn apply(event: Event, ctx: &RunContext) -> Result<(), String> {
    match event {
        Event::Result { key, value } => {
            if key.is_empty() {
                return Err("has an empty result key".into());
            }
            ctx.result(key, value);
        }
        Event::Metric { name, step, value } => {
            if name.is_empty() {
                return Err("has an empty metric name".into());
            }
            ctx.metric(&name, storable(step)?, value.0);
        }
        Event::Metrics { step, values } => {
            if values.is_empty() {
                return Err("has no metric values".into());
            }
            if values.contains_key("") {
                return Err("has an empty metric name".into());
            }
            let step = storable(step)?;
            let values: Vec<(&str, f64)> = values.iter().map(|(n, v)| (n.as_str(), v.0)).collect();
            ctx.metrics(step, &values);
        }
        Event::Progress {
            current,
            total,
            message,
        } => ctx.progress(current, total, message.as_deref()),
        Event::Log {
            level: name,
            message,
            metadata,
        } => {
            let level = match name.as_deref() {
                None => Level::Info,
                Some(name) => {
                    level(name).ok_or_else(|| format!("has an unknown log level {name:?}"))?
                }
            };
            match metadata {
                Some(metadata) => ctx.log_with(level, message, metadata),
                None => ctx.log(level, message),
            }
        }
        Event::Outcome { status, error } => match status {
            OutcomeStatus::Completed => ctx.complete(),
            OutcomeStatus::Failed => {
                ctx.fail(error.unwrap_or_else(|| "the experiment reported a failure".into()))
            }
        },
    }
    Ok(())
}

fn warn(ctx: &RunContext, number: u64, problem: &str, line: &[u8]) {
    let text = String::from_utf8_lossy(&line[..line.len().min(QUOTE_CHARS * 4)]);
    let mut quote: String = text.chars().take(QUOTE_CHARS).collect();
    if quote.len() < line.len() {
        quote.push('…');
    }
    ctx.warn(format!(
        "athanor events line {number} {problem}; ignored (it starts: {quote:?})"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_by_type() {
        let parse = |s: &str| serde_json::from_str::<Event>(s);
        assert_eq!(
            parse(r#"{"type":"result","key":"acc","value":{"top1":0.9}}"#).unwrap(),
            Event::Result {
                key: "acc".into(),
                value: serde_json::json!({"top1": 0.9})
            }
        );
        assert_eq!(
            parse(r#"{"type":"progress","current":3,"total":10}"#).unwrap(),
            Event::Progress {
                current: 3,
                total: 10,
                message: None
            }
        );
        assert!(parse(r#"{"type":"progress","current":-1,"total":10}"#).is_err());
        assert!(parse(r#"{"type":"exec","command":"rm -rf /"}"#).is_err());
        assert!(parse(r#"{"type":"result","key":"a","value":1,"extra":2}"#).is_err());
        assert_eq!(level("WARNING"), Some(Level::Warn));
        assert_eq!(level("critical"), Some(Level::Error));
        assert_eq!(level("loud"), None);
    }

    /// A metric record as (step, values).
    type Point = (u64, Vec<(String, f64)>);

    /// What `lines` written to the events pipe left in a fresh run: its metric records
    /// and its log lines.
    fn feed(lines: &str) -> (Vec<Point>, Vec<String>) {
        let ctx = RunContext::for_tests();
        let mut reader = EventReader::new();
        reader.push(lines.as_bytes(), &ctx);
        reader.finish(&ctx);
        let drained = ctx.shared.buffer.drain();
        let seqs: Vec<u64> = drained.metrics.iter().map(|r| r.seq).collect();
        assert!(seqs.iter().copied().eq(0..seqs.len() as u64), "{seqs:?}");
        let metrics = drained
            .metrics
            .into_iter()
            .map(|r| {
                let values = r.values.into_iter().map(|(n, v)| (n, v.0)).collect();
                (r.step, values)
            })
            .collect();
        let logs = drained.logs.into_iter().map(|l| l.message).collect();
        (metrics, logs)
    }

    fn point(step: u64, values: &[(&str, f64)]) -> Point {
        (
            step,
            values.iter().map(|&(n, v)| (n.to_string(), v)).collect(),
        )
    }

    /// Compares values bit for bit, so NaN equals NaN.
    fn bits(metrics: &[Point]) -> Vec<(u64, Vec<(String, u64)>)> {
        metrics
            .iter()
            .map(|(step, values)| {
                let values = values
                    .iter()
                    .map(|(n, v)| (n.clone(), v.to_bits()))
                    .collect();
                (*step, values)
            })
            .collect()
    }

    #[test]
    fn metric_events_record_one_value_or_several_at_a_step() {
        let (metrics, logs) = feed(concat!(
            r#"{"type":"metric","name":"loss","step":100,"value":0.31}"#,
            "\n",
            r#"{"type":"metrics","step":100,"values":{"loss":0.3,"acc":0.9,"n":7}}"#,
            "\n",
            r#"{"type":"metric","name":"loss","step":9223372036854775807,"value":-2}"#,
            "\n",
            r#"{"type":"metrics","step":0,"values":{"a":"NaN","b":"Infinity","c":"-Infinity"}}"#,
        ));
        assert_eq!(logs, Vec::<String>::new());
        assert_eq!(
            bits(&metrics),
            bits(&[
                point(100, &[("loss", 0.31)]),
                point(100, &[("acc", 0.9), ("loss", 0.3), ("n", 7.0)]),
                point(MAX_STEP, &[("loss", -2.0)]),
                point(
                    0,
                    &[
                        ("a", f64::NAN),
                        ("b", f64::INFINITY),
                        ("c", f64::NEG_INFINITY)
                    ]
                ),
            ])
        );
    }

    #[test]
    fn bare_nan_and_infinities_are_read_as_python_writes_them_strings_untouched() {
        // json.dumps({"type": "metrics", ...}) with float("nan") and friends.
        let (metrics, logs) = feed(concat!(
            r#"{"type": "metrics", "step": 3, "values": {"NaN": NaN, "x": Infinity, "y": -Infinity}}"#,
            "\n",
            r#"{"type":"metric","name":"say \"NaN\", -Infinity","step":4,"value":NaN}"#,
            "\n",
            r#"{"type":"result","key":"r","value":[NaN,"NaN Infinity",{"Infinity":-Infinity}]}"#,
            "\n",
            r#"{"type":"metric","name":"m","step":5,"value":NaNa}"#,
            "\n",
            r#"{"type":"metric","name":"m","step":-5,"value":NaN}"#,
        ));
        assert_eq!(
            bits(&metrics),
            bits(&[
                point(
                    3,
                    &[
                        ("NaN", f64::NAN),
                        ("x", f64::INFINITY),
                        ("y", f64::NEG_INFINITY)
                    ]
                ),
                point(4, &[("say \"NaN\", -Infinity", f64::NAN)]),
            ])
        );
        assert_eq!(logs.len(), 2, "{logs:?}");
        // Not a bare NaN: the error is JSON's.
        assert!(
            logs[0].starts_with("athanor events line 4 is not a valid event: expected value at line 1 column 46; ignored"),
            "{logs:?}"
        );
        // A bare NaN and a bad step: the step is the problem reported.
        assert!(
            logs[1].starts_with("athanor events line 5 is not a valid event: invalid value: integer `-5`, expected u64"),
            "{logs:?}"
        );
        assert_eq!(
            quote_non_finite(br#"{"v":[NaN,-Infinity],"s":"NaN \" Infinity"}"#).unwrap(),
            br#"{"v":["NaN","-Infinity"],"s":"NaN \" Infinity"}"#
        );
        assert_eq!(quote_non_finite(br#"{"s":"NaN","t":"\\"}"#), None);
    }

    #[test]
    fn malformed_metric_events_are_warned_about_and_the_rest_is_kept() {
        let lines = [
            r#"{"type":"metric","name":"loss","value":0.3}"#,
            r#"{"type":"metric","name":"loss","step":-1,"value":0.3}"#,
            r#"{"type":"metric","name":"loss","step":9223372036854775808,"value":0.3}"#,
            r#"{"type":"metric","name":"loss","step":1.5,"value":0.3}"#,
            r#"{"type":"metric","name":"loss","step":1,"value":"fast"}"#,
            r#"{"type":"metric","name":"loss","step":1,"value":null}"#,
            r#"{"type":"metric","name":"","step":1,"value":0.3}"#,
            r#"{"type":"metric","name":"loss","step":1,"value":0.3,"unit":"nats"}"#,
            r#"{"type":"metrics","values":{"loss":0.3}}"#,
            r#"{"type":"metrics","step":1,"values":{"loss":true}}"#,
            r#"{"type":"metrics","step":1,"values":{"":0.3}}"#,
            r#"{"type":"metrics","step":1,"values":{}}"#,
            r#"{"type":"metrics","step":1,"values":[0.3]}"#,
            r#"{"type":"metrics","step":18446744073709551615,"values":{"loss":0.3}}"#,
            r#"{"type":"metric","name":"kept","step":2,"value":1}"#,
        ];
        let (metrics, logs) = feed(&lines.join("\n"));
        assert_eq!(bits(&metrics), bits(&[point(2, &[("kept", 1.0)])]));
        let problems = [
            "is not a valid event: missing field `step`",
            "is not a valid event: invalid value: integer `-1`, expected u64",
            "has step 9223372036854775808, over the largest storable step 9223372036854775807",
            "is not a valid event: invalid type: floating point `1.5`, expected u64",
            "is not a valid event: invalid value: string \"fast\"",
            "is not a valid event: invalid type: null",
            "has an empty metric name",
            "is not a valid event: unknown field `unit`",
            "is not a valid event: missing field `step`",
            "is not a valid event: invalid type: boolean `true`",
            "has an empty metric name",
            "has no metric values",
            "is not a valid event: invalid type: sequence, expected a map",
            "has step 18446744073709551615, over the largest storable step 9223372036854775807",
        ];
        assert_eq!(logs.len(), problems.len(), "{logs:#?}");
        for (n, (log, problem)) in logs.iter().zip(problems).enumerate() {
            let start = format!("athanor events line {} {problem}", n + 1);
            let quote = format!("; ignored (it starts: {:?})", lines[n]);
            assert!(
                log.starts_with(&start) && log.ends_with(&quote),
                "{log}\nwanted {start}"
            );
        }
    }
}
