use athanor_schemas::{ConfigSchema, Field, Level};
use serde_json::json;

use crate::buffer::truncation_marker;
use crate::{Experiment, RunContext, RunError};

/// Prints exactly what it is given — as log lines, as metadata, as a result value and
/// as a result key — so viewers can be checked to show run output as text.
pub struct Echo;

impl Experiment for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn description(&self) -> &str {
        "Logs `message` (repeated `repeat` times) `count` times, with it as metadata too, and records it as a result."
    }

    fn config_schema(&self) -> ConfigSchema {
        ConfigSchema::new([
            Field::string("message")
                .describe("What to print")
                .default("hello"),
            Field::int("count")
                .describe("How many times")
                .default(1)
                .min(1.0)
                .max(100_000.0),
            Field::one_of("level", &["trace", "debug", "info", "warn", "error"])
                .describe("Level of the lines")
                .default("info"),
            Field::int("repeat")
                .describe("Each line is `message` repeated this many times (for very long lines)")
                .default(1)
                .min(1.0)
                .max(16_777_216.0),
        ])
    }

    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let repeat = ctx.config_i64("repeat").unwrap_or(1).max(1) as usize;
        let message = repeated(
            ctx.config_str("message").unwrap_or("hello"),
            repeat,
            ctx.max_line_bytes(),
        );
        let count = ctx.config_i64("count").unwrap_or(1).max(1) as u64;
        let level = match ctx.config_str("level").unwrap_or("info") {
            "trace" => Level::Trace,
            "debug" => Level::Debug,
            "warn" => Level::Warn,
            "error" => Level::Error,
            _ => Level::Info,
        };
        for i in 0..count {
            ctx.log_with(
                level,
                message.clone(),
                json!({ "message": message, "i": i }),
            );
        }
        ctx.result(
            "message",
            json!({ "text": message, "nested": { "list": [message] } }),
        );
        ctx.result(message.chars().take(200).collect::<String>(), count);
        Ok(())
    }
}

/// `text` repeated `times` times, as a line keeps it: at most `limit` bytes, a longer
/// one cut with the marker a line gets (` …[truncated N of TOTAL bytes]`, TOTAL the
/// length it would have had). Built cut: the product of two config values must not
/// size an allocation (a 100 kB message × 16 777 216 asked for 1.6 TB).
fn repeated(text: &str, times: usize, limit: usize) -> String {
    let total = text.len().saturating_mul(times);
    // The first `len` bytes of the repetition (at a character boundary).
    let prefix = |len: usize| {
        let whole = len / text.len().max(1);
        let mut out = text.repeat(whole.min(times));
        let mut end = len - out.len();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        out.push_str(&text[..end]);
        out
    };
    if total <= limit {
        return prefix(total);
    }
    let marker_len = truncation_marker(total, total).len();
    if limit <= marker_len {
        return prefix(limit);
    }
    let mut kept = prefix(limit - marker_len);
    let mut marker = truncation_marker(total - kept.len(), total);
    while kept.len() + marker.len() > limit {
        kept.pop();
        marker = truncation_marker(total - kept.len(), total);
    }
    kept + &marker
}

#[cfg(test)]
mod tests {
    use super::repeated;

    #[test]
    fn a_repeated_message_is_built_no_longer_than_a_line_keeps() {
        assert_eq!(repeated("ab", 3, 100), "ababab");
        assert_eq!(repeated("ab", 3, 5), "ababa");
        assert_eq!(repeated("é", 2, 100), "éé");
        assert_eq!(repeated("", 10, 5), "");
        assert_eq!(
            repeated("0123456789", 10, 60),
            "0123456789012345678901234567 …[truncated 72 of 100 bytes]"
        );
        assert_eq!(repeated("é", 100, 40).len(), 40);
        // The user's case: 100 kB × 16 777 216, never built.
        let huge = repeated(&"x".repeat(100_000), 16_777_216, 64 << 10);
        assert_eq!(huge.len(), 64 << 10);
        assert!(huge.ends_with(" …[truncated 1677721534516 of 1677721600000 bytes]"));
    }
}
