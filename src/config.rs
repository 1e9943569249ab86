//! The configuration of every command: built-in defaults, then `athanor.toml` (or
//! `--config FILE`), then `ATHANOR__SECTION__KEY` environment variables. Unknown keys
//! are refused.

use std::path::Path;

use anyhow::Context as _;
use athanor_aggregator::AggregatorConfig;
use athanor_gateway::GatewayConfig;
use athanor_schemas::db::DatabaseConfig;
use athanor_schemas::nats::NatsConfig;
use athanor_workers::WorkerConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    pub nats: NatsConfig,
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    pub aggregator: AggregatorConfig,
    pub gateway: GatewayConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, used when `RUST_LOG` is unset.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// The default config file, read when present.
pub const DEFAULT_FILE: &str = "athanor.toml";

/// Loads the configuration. `file` must exist when given; otherwise `athanor.toml` is
/// read if it is in the current directory.
pub fn load(file: Option<&Path>) -> anyhow::Result<AppConfig> {
    load_from(file, std::env::vars())
}

pub fn load_from(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<AppConfig> {
    let mut builder = config::Config::builder();
    match file {
        Some(path) => builder = builder.add_source(config::File::from(path).required(true)),
        None if Path::new(DEFAULT_FILE).exists() => {
            builder = builder.add_source(config::File::with_name(DEFAULT_FILE))
        }
        None => {}
    }
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("ATHANOR__"))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("ATHANOR")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("worker.experiments")
            .source(Some(env)),
    );
    let where_ = file.map_or_else(
        || format!("{DEFAULT_FILE} / ATHANOR__* variables"),
        |p| p.display().to_string(),
    );
    builder
        .build()
        .and_then(|c| c.try_deserialize::<AppConfig>())
        .with_context(|| format!("invalid configuration ({where_})"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("athanor.toml");
        std::fs::write(&file, "[worker]\nmax_concurrent_runs = 3\nflush_interval = \"250ms\"\n[nats]\nurl = \"nats://file:4222\"\n").unwrap();
        let config = load_from(
            Some(&file),
            env(&[
                ("ATHANOR__NATS__URL", "nats://env:4222"),
                ("ATHANOR__WORKER__EXPERIMENTS", "sweep,flaky"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.worker.max_concurrent_runs, 3);
        assert_eq!(config.worker.flush_interval, Duration::from_millis(250));
        assert_eq!(config.nats.url.as_deref(), Some("nats://env:4222"));
        assert_eq!(config.worker.experiments, vec!["sweep", "flaky"]);
        assert_eq!(
            config.worker.max_pending_bytes,
            WorkerConfig::default().max_pending_bytes
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = load_from(None, env(&[("ATHANOR__WORKER__MAX_PENDING", "5")])).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("unknown field `max_pending`"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(&file, "[wrker]\nid = \"x\"\n").unwrap();
        let text = format!("{:#}", load_from(Some(&file), env(&[])).unwrap_err());
        assert!(text.contains("unknown field `wrker`"), "{text}");
    }
}
