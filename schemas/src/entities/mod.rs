//! The database model (sea-orm entities), shared by the aggregator (writes run output),
//! the gateway (control plane, reads) and the migrations.
//!
//! Times are microseconds since the Unix epoch; JSON values are stored as text.

pub mod instances;
pub mod run_batches;
pub mod run_logs;
pub mod run_metric_summaries;
pub mod run_metrics;
pub mod run_results;
pub mod runs;
