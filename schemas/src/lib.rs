//! Every shape that crosses an Athanor process boundary, defined once.
//!
//! Workers encode [`batch::Batch`]es with [`codec`] and publish them on the subjects
//! named in [`names`]; the aggregator and the gateway decode them with the same
//! bounded decoder. Run requests, worker registrations and experiment config schemas
//! live here too, and the database entities (feature `db`). How the
//! components connect to NATS and the database is in `athanor-connections`.

pub mod api;
pub mod batch;
pub mod codec;
pub mod config_schema;
#[cfg(feature = "db")]
pub mod entities;
pub mod events;
pub mod metric;
pub mod names;
pub mod requests;

pub use batch::{
    merge_result, Batch, Final, Level, LogLine, Progress, ResultRecord, RunInfo, RunState, Status,
    UnknownRunState,
};
pub use codec::{decode, encode, DecodeError, DEFAULT_DECODE_LIMIT};
pub use config_schema::{ConfigError, ConfigSchema, Field, FieldKind};
pub use metric::{MetricRecord, MetricValue};

/// Microseconds since the Unix epoch: the unit of every `ts` and `at` in the wire format.
pub fn now_micros() -> i64 {
    // Seconds and sub-second micros separately: `as_micros` would divide a u128.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 * 1_000_000 + d.subsec_micros() as i64)
        .unwrap_or(0)
}

/// µs since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339, UTC). Times outside
/// what RFC 3339 can write (before 1970 or after 9999, which only a broken clock or a
/// hostile batch sends) are clamped to its ends rather than refused: a `ts` is shown,
/// never trusted.
pub fn format_time(micros: i64) -> String {
    /// 9999-12-31T23:59:59.999999Z.
    const LAST: i64 = 253_402_300_799_999_999;
    let micros = micros.clamp(0, LAST) as u64;
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times_in_utc() {
        assert_eq!(super::format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::format_time(1_764_194_400_123_456),
            "2025-11-26T22:00:00.123Z"
        );
        assert_eq!(
            super::format_time(951_825_600_000_000),
            "2000-02-29T12:00:00.000Z"
        );
        assert_eq!(super::format_time(i64::MIN), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::format_time(i64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
