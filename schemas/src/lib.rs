//! Every shape that crosses an Athanor process boundary, defined once.
//!
//! Workers encode [`batch::Batch`]es with [`codec`] and publish them on the subjects
//! named in [`names`]; the aggregator and the gateway decode them with the same
//! bounded decoder. Run requests, worker registrations and experiment config schemas
//! live here too, and the database entities (feature `db`). How the
//! components connect to NATS and the database is in `athanor-connections`.

pub mod batch;
pub mod codec;
pub mod config_schema;
#[cfg(feature = "db")]
pub mod entities;
pub mod events;
pub mod names;
pub mod requests;

pub use batch::{
    Batch, Final, Level, LogLine, Progress, ResultRecord, RunInfo, RunState, Status,
    UnknownRunState,
};
pub use codec::{decode, encode, DecodeError, DEFAULT_DECODE_LIMIT};
pub use config_schema::{ConfigError, ConfigSchema, Field, FieldKind};

/// Microseconds since the Unix epoch: the unit of every `ts` and `at` in the wire format.
pub fn now_micros() -> i64 {
    // Seconds and sub-second micros separately: `as_micros` would divide a u128.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 * 1_000_000 + d.subsec_micros() as i64)
        .unwrap_or(0)
}

/// µs since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn format_time(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let millis = micros.rem_euclid(1_000_000) / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
    }
}
