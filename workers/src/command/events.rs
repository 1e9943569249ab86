//! The structured channel of a command experiment: one JSON object per line on the
//! pipe named by `ATHANOR_EVENTS_FD`. Text on stdout is never parsed for commands; this
//! is the only way a child records results, reports progress, logs with a level or
//! declares its outcome. A line that is not a valid event becomes a `warn` line in the
//! run's log naming the problem; the run goes on.

use athanor_schemas::Level;
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
        match serde_json::from_slice::<Event>(&line) {
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

fn apply(event: Event, ctx: &RunContext) -> Result<(), String> {
    match event {
        Event::Result { key, value } => {
            if key.is_empty() {
                return Err("has an empty result key".into());
            }
            ctx.result(key, value);
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
}
