//! Every shape that crosses an Athanor process boundary, defined once.
//!
//! Workers encode [`batch::Batch`]es with [`codec`] and publish them on the subjects
//! named in [`names`]; the aggregator and the gateway decode them with the same
//! bounded decoder. Run requests, worker registrations and experiment config schemas
//! live here too, and so does [`nats`]: how every component connects to NATS and
//! declares the streams and buckets it relies on.

pub mod batch;
pub mod codec;
pub mod config_schema;
#[cfg(feature = "db")]
pub mod db;
#[cfg(feature = "db")]
pub mod entities;
pub mod names;
pub mod nats;
pub mod requests;

pub use batch::{Batch, Final, Level, LogLine, Progress, ResultRecord, RunInfo, RunState, Status};
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
