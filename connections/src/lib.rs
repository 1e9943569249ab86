//! How Athanor's components reach what they run on.
//!
//! [`nats`]: the `[nats]` configuration, connecting (credentials, TLS, a cluster's
//! servers) and declaring the streams and buckets of the design. [`db`]: the
//! `[database]` configuration and opening SQLite or PostgreSQL, with the per-file write
//! turn SQLite needs. [`embedded`]: a `nats-server` child process that `athanor up` and
//! the tests supervise. [`retry`]: the one backoff policy (base, cap, jitter) of every
//! retry loop. [`prometheus`]: the process's metrics recorder and the endpoint that
//! serves it. The shapes that travel between components are in `athanor-schemas`; this
//! crate is about the connections that carry them.

#[cfg(feature = "db")]
pub mod db;
pub mod embedded;
pub mod nats;
pub mod prometheus;
pub mod retry;
