//! The configuration of every command: built-in defaults, then `athanor.toml` (or
//! `--config FILE`), then `ATHANOR__SECTION__KEY` environment variables. Unknown keys
//! are refused.

use std::path::Path;

use anyhow::Context as _;
use athanor_aggregator::AggregatorConfig;
use athanor_connections::db::DatabaseConfig;
use athanor_connections::nats::NatsConfig;
use athanor_gateway::GatewayConfig;
use athanor_workers::command::CommandSpec;
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
    pub metrics: MetricsConfig,
    /// Command experiments (`[[experiments]]`) the worker hosts beside the built-ins.
    pub experiments: Vec<CommandSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, used when `RUST_LOG` is unset.
    pub filter: String,
}

/// The `[metrics]` section: Prometheus metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where a command serves `GET /metrics` (HOST:PORT; `--metrics-addr`): what
    /// `athanor worker` and `athanor aggregator` need to be scraped. Off when unset; the
    /// gateway (and so `athanor up`) always serves it at its own `/metrics`.
    pub addr: Option<String>,
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
            .with_list_parse_key("gateway.cors_origins")
            .with_list_parse_key("gateway.allowed_hosts")
            .source(Some(env)),
    );
    let where_ = file.map_or_else(
        || format!("{DEFAULT_FILE} / ATHANOR__* variables"),
        |p| p.display().to_string(),
    );
    let mut config = builder
        .build()
        .and_then(|c| c.try_deserialize::<AppConfig>())
        .with_context(|| format!("invalid configuration ({where_})"))?;
    // Relative paths in `[[experiments]]` are the configuration file's.
    let file = file.unwrap_or(Path::new(DEFAULT_FILE));
    let base = std::path::absolute(file)
        .ok()
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .with_context(|| format!("cannot resolve the folder of {}", file.display()))?;
    for spec in &mut config.experiments {
        spec.base_dir = Some(base.clone());
    }
    Ok(config)
}

/// `config` as TOML, with every secret masked: what `athanor config check` prints.
pub fn effective(config: &AppConfig) -> anyhow::Result<String> {
    let mut shown = config.clone();
    let mask = |secret: &mut Option<String>| {
        if secret.is_some() {
            *secret = Some("********".into());
        }
    };
    mask(&mut shown.nats.password);
    mask(&mut shown.nats.token);
    mask(&mut shown.gateway.api_token);
    if let Some(url) = shown.database.url.as_mut() {
        *url = without_password(url);
    }
    toml::to_string(&shown).context("cannot print the configuration")
}

/// A URL with its password (`user:password@`) masked.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:********@{host}")
        }
        _ => url.to_string(),
    }
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
    fn command_experiments_are_declared_in_the_documented_form() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("examples")).unwrap();
        let file = dir.path().join("athanor.toml");
        std::fs::write(
            &file,
            r#"
[worker]
experiments = ["train", "echo"]

[[experiments]]
name = "train"
description = "Trains the toy model"
command = ["python3", "train.py"]
cwd = "examples"
timeout = "2h"
env = { HF_HUB_OFFLINE = "1" }
config = [
  { name = "epochs", type = "int", default = 3, min = 1, max = 1000, description = "Passes over the data" },
  { name = "lr", type = "float", default = 0.001 },
  { name = "note", type = "string", default = "" },
  { name = "optimizer", type = "one_of", values = ["adam", "sgd"], default = "adam" },
  { name = "shuffle", type = "bool", default = true },
]
"#,
        )
        .unwrap();
        let config = load_from(Some(&file), env(&[])).unwrap();
        let train = &config.experiments[0];
        assert_eq!(train.base_dir.as_deref(), Some(dir.path()));
        assert_eq!(train.timeout, Some(Duration::from_secs(7200)));
        assert_eq!(train.stderr_level, athanor_schemas::Level::Warn);
        let experiments =
            athanor_workers::experiments(&config.worker, &config.experiments).unwrap();
        let names: Vec<&str> = experiments.iter().map(|e| e.name()).collect();
        assert_eq!(names, ["train", "echo"]);
        let schema = experiments[0].config_schema();
        let defaults = schema.validate(&serde_json::Value::Null).unwrap();
        assert_eq!(
            serde_json::Value::Object(defaults),
            serde_json::json!({"epochs": 3, "lr": 0.001, "note": "", "optimizer": "adam", "shuffle": true})
        );
        assert_eq!(
            schema
                .validate(&serde_json::json!({"epochs": 0}))
                .unwrap_err()
                .to_string(),
            "config field `epochs` must be at least 1, got 0"
        );

        std::fs::write(&file, "[[experiments]]\nname = \"x\"\ncommand = [\"true\"]\nconfig = [{ name = \"a\", type = \"complex\" }]\n").unwrap();
        let config = load_from(Some(&file), env(&[])).unwrap();
        let Err(err) = athanor_workers::experiments(&config.worker, &config.experiments) else {
            panic!("a bad declaration was taken")
        };
        assert_eq!(
            err.to_string(),
            "invalid experiment declaration: experiments[0] (\"x\"): `config[0]` (a) has an unknown type \"complex\": use int, float, bool, string or one_of"
        );
        std::fs::write(
            &file,
            "[[experiments]]\nname = \"x\"\ncommand = [\"true\"]\nshell = true\n",
        )
        .unwrap();
        let text = format!("{:#}", load_from(Some(&file), env(&[])).unwrap_err());
        assert!(text.contains("unknown field `shell`"), "{text}");
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
