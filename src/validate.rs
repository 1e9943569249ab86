//! The whole configuration checked once, after loading and before anything starts:
//! each setting that makes no sense, or contradicts another, is refused with its key,
//! its value and what is allowed (`athanor` then exits with status 2). A configuration
//! that passes cannot make a component panic: every duration is bounded (an `Instant`
//! plus an unbounded duration overflows), every size is at least what its use needs.

use std::fmt;
use std::time::Duration;

use crate::config::AppConfig;

/// One refused setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.allowed)
    }
}

/// The longest duration any setting takes: ten years. Longer ones overflow the clock
/// arithmetic of timers (`Instant + Duration`), and none is meaningful.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The exit status of a refused configuration.
pub const EXIT_STATUS: i32 = 2;

struct Checker(Vec<Problem>);

impl Checker {
    fn refuse(&mut self, key: &str, value: impl fmt::Display, allowed: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        });
    }

    /// A duration in `min..=MAX_DURATION`.
    fn duration(&mut self, key: &str, value: Duration, min: Duration) {
        if value < min || value > MAX_DURATION {
            let least = if min.is_zero() {
                "0".to_string()
            } else {
                humantime::format_duration(min).to_string()
            };
            self.refuse(
                key,
                humantime::format_duration(value),
                format!("a duration from {least} to 10 years"),
            );
        }
    }

    /// A count or size in `min..=max`.
    fn size(&mut self, key: &str, value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.refuse(key, value, format!("from {min} to {max}"));
        }
    }

    /// A listening address: `HOST:PORT`.
    fn addr(&mut self, key: &str, value: &str) {
        if value
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            self.refuse(key, format!("{value:?}"), "HOST:PORT, e.g. 127.0.0.1:8080");
        }
    }

    /// A NATS subject token: what the worker puts in subjects and keys.
    fn token(&mut self, key: &str, value: &str) {
        if !athanor_schemas::names::is_valid_token(value) {
            self.refuse(
                key,
                format!("{value:?}"),
                "a NATS subject token: letters, digits, '-' and '_' (no '.', '*', '>', spaces)",
            );
        }
    }
}

const MS: Duration = Duration::from_millis(1);
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Every problem of `config` (empty: it may be used).
pub fn check(config: &AppConfig) -> Vec<Problem> {
    let mut c = Checker(Vec::new());

    let nats = &config.nats;
    c.size("nats.replicas", nats.replicas as u64, 1, 5);
    c.duration(
        "nats.runs_max_age",
        nats.runs_max_age,
        Duration::from_secs(60),
    );
    c.duration("nats.duplicate_window", nats.duplicate_window, MS);
    // At least a few of the largest batches; at most what a stream's limit can say.
    c.size("nats.runs_max_bytes", nats.runs_max_bytes, 4 * MIB, 1 << 50);
    if nats.duplicate_window > nats.runs_max_age {
        c.refuse(
            "nats.duplicate_window",
            humantime::format_duration(nats.duplicate_window),
            format!(
                "at most nats.runs_max_age ({})",
                humantime::format_duration(nats.runs_max_age)
            ),
        );
    }
    c.duration("nats.workers_ttl", nats.workers_ttl, Duration::from_secs(1));
    c.duration("nats.request_timeout", nats.request_timeout, 10 * MS);
    for (key, secret) in [
        ("nats.password", &nats.password),
        ("nats.token", &nats.token),
    ] {
        if secret.as_deref() == Some("") {
            c.refuse(key, "\"\"", "a non-empty secret, or the key left out");
        }
    }

    let db = &config.database;
    c.size(
        "database.max_connections",
        u64::from(db.max_connections),
        1,
        1000,
    );
    c.duration("database.busy_timeout", db.busy_timeout, Duration::ZERO);
    if let Some(retention) = db.retention {
        c.duration("database.retention", retention, Duration::from_secs(60));
    }

    let worker = &config.worker;
    if let Some(id) = &worker.id {
        c.token("worker.id", id);
    }
    for (i, name) in worker.experiments.iter().enumerate() {
        c.token(&format!("worker.experiments[{i}]"), name);
    }
    c.size(
        "worker.max_concurrent_runs",
        worker.max_concurrent_runs as u64,
        1,
        100_000,
    );
    c.size(
        "worker.max_line_bytes",
        worker.max_line_bytes as u64,
        64,
        64 * MIB,
    );
    c.size(
        "worker.max_pending_bytes",
        worker.max_pending_bytes as u64,
        64 * KIB,
        64 * GIB,
    );
    if worker.max_pending_bytes < worker.max_line_bytes {
        c.refuse(
            "worker.max_pending_bytes",
            worker.max_pending_bytes,
            format!(
                "at least worker.max_line_bytes ({}): a line must fit in what a run may hold",
                worker.max_line_bytes
            ),
        );
    }
    c.duration("worker.flush_interval", worker.flush_interval, MS);
    c.duration("worker.cancel_grace", worker.cancel_grace, Duration::ZERO);
    c.duration(
        "worker.heartbeat_interval",
        worker.heartbeat_interval,
        10 * MS,
    );
    if worker.heartbeat_interval >= nats.workers_ttl {
        c.refuse(
            "worker.heartbeat_interval",
            humantime::format_duration(worker.heartbeat_interval),
            format!(
                "shorter than nats.workers_ttl ({}): the registration would expire between heartbeats",
                humantime::format_duration(nats.workers_ttl)
            ),
        );
    }
    c.duration("worker.publish_timeout", worker.publish_timeout, 10 * MS);

    let agg = &config.aggregator;
    c.token("aggregator.consumer", &agg.consumer);
    c.size(
        "aggregator.max_batch_messages",
        agg.max_batch_messages as u64,
        1,
        100_000,
    );
    c.size(
        "aggregator.max_batch_bytes",
        agg.max_batch_bytes as u64,
        KIB,
        4 * GIB,
    );
    c.size("aggregator.writers", agg.writers as u64, 1, 64);
    c.duration("aggregator.linger", agg.linger, Duration::ZERO);
    c.duration("aggregator.ack_wait", agg.ack_wait, Duration::from_secs(1));
    c.size(
        "aggregator.decode_limit",
        agg.decode_limit as u64,
        MIB,
        4 * GIB,
    );
    c.duration(
        "aggregator.lost_check_interval",
        agg.lost_check_interval,
        10 * MS,
    );
    c.duration("aggregator.max_retry_delay", agg.max_retry_delay, 10 * MS);
    c.duration(
        "aggregator.drain_timeout",
        agg.drain_timeout,
        Duration::ZERO,
    );

    let gw = &config.gateway;
    c.addr("gateway.http_addr", &gw.http_addr);
    if let Some(addr) = &config.metrics.addr {
        c.addr("metrics.addr", addr);
    }
    c.size("gateway.max_body_bytes", gw.max_body_bytes as u64, KIB, GIB);
    c.duration("gateway.keep_alive", gw.keep_alive, Duration::ZERO); // 0: none
    c.size("gateway.tail_lines", gw.tail_lines as u64, 0, 100_000);
    c.duration("gateway.hub_idle", gw.hub_idle, 10 * MS);
    // A broadcast channel of this many slots per hub is allocated up front.
    c.size("gateway.hub_buffer", gw.hub_buffer as u64, 1, 65_536);
    c.duration("gateway.max_viewer_lag", gw.max_viewer_lag, 10 * MS);
    c.size(
        "gateway.max_viewer_lag_bytes",
        gw.max_viewer_lag_bytes,
        KIB,
        64 * GIB,
    );
    c.duration("gateway.status_poll", gw.status_poll, 10 * MS);
    c.size("gateway.decode_limit", gw.decode_limit as u64, MIB, 4 * GIB);
    if gw.decode_limit != agg.decode_limit {
        c.refuse(
            "gateway.decode_limit",
            gw.decode_limit,
            format!(
                "the same as aggregator.decode_limit ({}): a batch one stores the other must read",
                agg.decode_limit
            ),
        );
    }
    if gw.api_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        c.refuse(
            "gateway.api_token",
            "\"\"",
            "a non-empty token (an empty one would turn authentication off), or the key left out",
        );
    }
    c.duration(
        "gateway.feed_token_ttl",
        gw.feed_token_ttl,
        Duration::from_secs(1),
    );
    for (i, origin) in gw.cors_origins.iter().enumerate() {
        if !is_origin(origin) {
            c.refuse(
                &format!("gateway.cors_origins[{i}]"),
                format!("{origin:?}"),
                "an origin: scheme://host[:port], no path (e.g. https://lab.example.org)",
            );
        }
    }
    c.size("gateway.max_viewers", gw.max_viewers as u64, 1, 10_000_000);
    c.duration(
        "gateway.header_read_timeout",
        gw.header_read_timeout,
        10 * MS,
    );
    c.duration("gateway.storage_stall", gw.storage_stall, 1000 * MS);
    for (i, host) in gw.allowed_hosts.iter().enumerate() {
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            c.refuse(
                &format!("gateway.allowed_hosts[{i}]"),
                format!("{host:?}"),
                "a host name, e.g. lab.example.org",
            );
        }
    }

    if tracing_subscriber::EnvFilter::try_new(&config.log.filter).is_err() {
        c.refuse(
            "log.filter",
            format!("{:?}", config.log.filter),
            "a tracing filter, e.g. info or athanor_aggregator=debug,warn",
        );
    }
    // `[[experiments]]` and `worker.experiments`: the worker's own checks (command,
    // names, fields, the names it selects), run now.
    let names_ok = worker
        .experiments
        .iter()
        .all(|n| athanor_schemas::names::is_valid_token(n));
    match athanor_workers::experiments(&config.worker, &config.experiments) {
        Ok(_) => {}
        Err(athanor_workers::Error::UnknownExperiment { name, hosted }) if names_ok => c.refuse(
            "worker.experiments",
            format!("{name:?}"),
            format!("experiments this worker hosts: {hosted}"),
        ),
        Err(athanor_workers::Error::UnknownExperiment { .. }) => {}
        Err(error) => c.refuse("experiments", "[[experiments]]", error.to_string()),
    }
    c.0
}

/// `scheme://host[:port]`, as a browser sends it in `Origin`.
fn is_origin(origin: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    // An IPv6 literal is bracketed: its colons are not the port's.
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, rest)) => match rest.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    matches!(scheme, "http" | "https")
        && !host.is_empty()
        && !host.contains(['/', '?', '#', ' ', '@', '[', ']'])
        && port.is_none_or(|p| p.parse::<u16>().is_ok())
        && http::HeaderValue::from_str(origin).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_pass() {
        assert_eq!(check(&AppConfig::default()), vec![]);
    }

    #[test]
    fn each_refusal_names_the_key_the_value_and_what_is_allowed() {
        let mut config = AppConfig::default();
        config.worker.flush_interval = Duration::ZERO;
        config.worker.heartbeat_interval = Duration::from_secs(20);
        config.gateway.decode_limit = 8 << 20;
        config.gateway.api_token = Some(String::new());
        config.gateway.cors_origins = vec!["https://ok.example".into(), "not an origin".into()];
        config.worker.id = Some("w.1".into());
        config.worker.experiments = vec!["sweep".into(), "a*".into()];
        config.nats.runs_max_age = Duration::from_secs(u64::MAX);
        let problems = check(&config);
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            vec![
                "nats.runs_max_age = 584542046090years 7months 15days 17h 5m 3s: a duration from 1m to 10 years".to_string(),
                "worker.id = \"w.1\": a NATS subject token: letters, digits, '-' and '_' (no '.', '*', '>', spaces)".into(),
                "worker.experiments[1] = \"a*\": a NATS subject token: letters, digits, '-' and '_' (no '.', '*', '>', spaces)".into(),
                "worker.flush_interval = 0s: a duration from 1ms to 10 years".into(),
                "worker.heartbeat_interval = 20s: shorter than nats.workers_ttl (15s): the registration would expire between heartbeats".into(),
                "gateway.decode_limit = 8388608: the same as aggregator.decode_limit (33554432): a batch one stores the other must read".into(),
                "gateway.api_token = \"\": a non-empty token (an empty one would turn authentication off), or the key left out".into(),
                "gateway.cors_origins[1] = \"not an origin\": an origin: scheme://host[:port], no path (e.g. https://lab.example.org)".into(),
            ]
        );
    }

    #[test]
    fn experiment_declarations_and_selections_are_checked_at_load() {
        let mut config = AppConfig::default();
        config.worker.experiments = vec!["sweep".into(), "nope".into()];
        assert_eq!(
            check(&config).iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["worker.experiments = \"nope\": experiments this worker hosts: log_storm, metric_storm, sweep, flaky, sleepy, echo".to_string()]
        );
        let config = AppConfig {
            experiments: vec![toml::from_str("name = \"train\"\ncommand = []").unwrap()],
            ..AppConfig::default()
        };
        let problems = check(&config);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "experiments");
        assert!(
            problems[0].allowed.contains("train") && problems[0].allowed.contains("command"),
            "{problems:?}"
        );
    }

    #[test]
    fn origins() {
        for ok in [
            "http://localhost:8080",
            "https://lab.example.org",
            "http://[::1]:3000",
            "http://[::1]",
        ] {
            assert!(is_origin(ok), "{ok}");
        }
        for bad in [
            "lab.example.org",
            "https://",
            "https://a/b",
            "ftp://a",
            "http://a:99999",
            "http://[::1",
            "http://[::1]x",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    /// Any duration and any size, in every setting: the check refuses or accepts, and
    /// what it accepts is within the bounds the components rely on.
    #[test]
    fn any_duration_or_size_is_refused_or_within_bounds() {
        let mut rng = fastrand::Rng::with_seed(18);
        let durations = |rng: &mut fastrand::Rng| match rng.u8(0..4) {
            0 => Duration::ZERO,
            1 => Duration::from_nanos(rng.u64(..)),
            2 => Duration::new(rng.u64(..), rng.u32(0..1_000_000_000)),
            _ => Duration::from_millis(rng.u64(0..100_000)),
        };
        let sizes = |rng: &mut fastrand::Rng| match rng.u8(0..3) {
            0 => 0,
            1 => rng.usize(..),
            _ => rng.usize(0..1 << 24),
        };
        for _ in 0..5_000 {
            let mut c = AppConfig::default();
            c.nats.workers_ttl = durations(&mut rng);
            c.nats.runs_max_age = durations(&mut rng);
            c.nats.duplicate_window = durations(&mut rng);
            c.nats.request_timeout = durations(&mut rng);
            c.worker.flush_interval = durations(&mut rng);
            c.worker.heartbeat_interval = durations(&mut rng);
            c.worker.cancel_grace = durations(&mut rng);
            c.worker.publish_timeout = durations(&mut rng);
            c.worker.max_line_bytes = sizes(&mut rng);
            c.worker.max_pending_bytes = sizes(&mut rng);
            c.worker.max_concurrent_runs = sizes(&mut rng);
            c.aggregator.linger = durations(&mut rng);
            c.aggregator.ack_wait = durations(&mut rng);
            c.aggregator.max_batch_bytes = sizes(&mut rng);
            c.aggregator.max_batch_messages = sizes(&mut rng);
            c.aggregator.writers = sizes(&mut rng);
            c.gateway.keep_alive = durations(&mut rng);
            c.gateway.hub_idle = durations(&mut rng);
            c.gateway.status_poll = durations(&mut rng);
            c.gateway.hub_buffer = sizes(&mut rng);
            c.gateway.tail_lines = sizes(&mut rng);
            c.gateway.max_viewers = sizes(&mut rng);
            if !check(&c).is_empty() {
                continue;
            }
            // Accepted: every timer can be armed without overflow, every bound holds.
            let now = std::time::Instant::now();
            for d in [
                c.nats.workers_ttl,
                c.nats.runs_max_age,
                c.nats.duplicate_window,
                c.nats.request_timeout,
                c.worker.flush_interval,
                c.worker.heartbeat_interval,
                c.worker.cancel_grace,
                c.worker.publish_timeout,
                c.aggregator.linger,
                c.aggregator.ack_wait,
                c.gateway.keep_alive,
                c.gateway.hub_idle,
                c.gateway.status_poll,
            ] {
                assert!(
                    now.checked_add(d).is_some()
                        && tokio::time::Instant::now().checked_add(d).is_some()
                );
                assert!(
                    i64::try_from(d.as_nanos()).is_ok(),
                    "{d:?} fits JetStream's nanoseconds"
                );
            }
            assert!(
                c.worker.flush_interval > Duration::ZERO
                    && c.worker.heartbeat_interval < c.nats.workers_ttl
            );
            assert!(
                c.worker.max_line_bytes >= 64
                    && c.worker.max_pending_bytes >= c.worker.max_line_bytes
            );
            assert!(
                c.worker.max_concurrent_runs >= 1
                    && c.gateway.hub_buffer >= 1
                    && c.gateway.max_viewers >= 1
            );
            assert!(
                c.aggregator.max_batch_messages >= 1
                    && (1..=64).contains(&c.aggregator.writers)
                    && c.nats.duplicate_window <= c.nats.runs_max_age
            );
        }
    }
}
