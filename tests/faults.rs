//! Fault injection: nats-server and the `athanor` worker, aggregator and gateway as
//! separate processes, under load. Each scenario injects a fault, lets the system
//! recover, then counts — lines emitted (the run's own final count), lines acked by
//! JetStream (the distinct batches in `ATHANOR_RUNS`), lines stored, the run's counters
//! against the rows (a batch applied twice shows there: the primary key keeps a line
//! from being stored twice), gaps — and requires 0 acked lines lost, 0 miscounted,
//! 0 gaps. Every scenario appends its
//! row to `target/reliability.md` (the table in RELIABILITY.md comes from there).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use athanor_schemas::entities::{run_batches, run_logs, run_metric_summaries, runs};
use athanor_schemas::events::StatusEvent;
use athanor_testkit::{read_run, wait_for, TestDb, TestNats};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde_json::{json, Value};

/// One `athanor <role>` process.
struct Proc {
    role: &'static str,
    env: Vec<(String, String)>,
    child: Child,
}

impl Proc {
    fn start(role: &'static str, env: &[(String, String)]) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_athanor"))
            .arg(role)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start athanor {role}: {e}"));
        Proc {
            role,
            env: env.to_vec(),
            child,
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    fn restart(&mut self) {
        self.kill9();
        *self = Proc::start(self.role, &self.env);
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {}", self.role);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ATHANOR_SOAK=N` multiplies the runs' durations (and the aggregator kills) by N for
/// longer soak variants; CI runs N = 1.
fn soak() -> u64 {
    std::env::var("ATHANOR_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A nats-server, a database, and the environment every process gets.
struct Rig {
    /// The single test server (none for a cluster).
    nats: Option<TestNats>,
    /// How the test itself talks to NATS.
    nats_config: athanor_connections::nats::NatsConfig,
    db: TestDb,
    env: Vec<(String, String)>,
    http: reqwest::Client,
}

impl Rig {
    async fn new(sync_always: bool) -> Rig {
        let nats = TestNats::start_with(sync_always);
        let config = nats.config();
        Rig::around(Some(nats), config).await
    }

    async fn around(
        nats: Option<TestNats>,
        nats_config: athanor_connections::nats::NatsConfig,
    ) -> Rig {
        athanor_testkit::init_tracing();
        let db = TestDb::new().await;
        let env = [
            ("ATHANOR__NATS__URL", nats_config.url().to_string()),
            ("ATHANOR__DATABASE__URL", db.config.url().to_string()),
            ("ATHANOR__NATS__WORKERS_TTL", "3s".into()),
            ("ATHANOR__NATS__REQUEST_TIMEOUT", "2s".into()),
            ("ATHANOR__WORKER__HEARTBEAT_INTERVAL", "500ms".into()),
            ("ATHANOR__WORKER__PUBLISH_TIMEOUT", "2s".into()),
            ("ATHANOR__AGGREGATOR__ACK_WAIT", "3s".into()),
            ("ATHANOR__AGGREGATOR__LOST_CHECK_INTERVAL", "500ms".into()),
            ("ATHANOR__AGGREGATOR__MAX_RETRY_DELAY", "1s".into()),
            ("ATHANOR__GATEWAY__STATUS_POLL", "500ms".into()),
            ("ATHANOR__GATEWAY__KEEP_ALIVE", "1s".into()),
            ("RUST_LOG", "warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Rig {
            nats,
            nats_config,
            db,
            env,
            http: reqwest::Client::new(),
        }
    }

    /// JetStream with the topology declared; retried, because right after a node of a
    /// cluster is killed the new leader may not answer for a while.
    async fn jetstream(&self) -> async_nats::jetstream::Context {
        wait_for("JetStream", Duration::from_secs(90), || async {
            match athanor_connections::nats::open(&self.nats_config, "athanor-faults").await {
                Ok(js) => Some(js),
                Err(error) => {
                    eprintln!("JetStream not ready: {error}; retrying");
                    None
                }
            }
        })
        .await
        .expect("NATS")
    }

    fn start(&self, role: &'static str) -> Proc {
        Proc::start(role, &self.env)
    }

    /// A gateway process on a free port, once `/readyz` says it reaches the database
    /// and NATS (run output may be waiting: an aggregator is down in some scenarios).
    async fn gateway(&self) -> (Proc, String) {
        let port = free_port();
        let mut env = self.env.clone();
        env.push((
            "ATHANOR__GATEWAY__HTTP_ADDR".into(),
            format!("127.0.0.1:{port}"),
        ));
        let proc = Proc::start("gateway", &env);
        let base = format!("http://127.0.0.1:{port}");
        let http = self.http.clone();
        wait_for("the gateway", Duration::from_secs(30), || async {
            let r = http.get(format!("{base}/readyz")).send().await.ok()?;
            let ready: Value = r.json().await.ok()?;
            (ready["database"] == true && ready["nats"] == true).then_some(())
        })
        .await
        .unwrap();
        (proc, base)
    }

    /// Starts a run over HTTP once a worker hosts `experiment`; returns its id.
    async fn start_run(&self, base: &str, experiment: &str, config: Value) -> String {
        let http = &self.http;
        wait_for("a worker", Duration::from_secs(30), || async {
            let body: Value = http
                .get(format!("{base}/api/experiments"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            body["experiments"]
                .as_array()?
                .iter()
                .any(|e| e["name"] == experiment)
                .then_some(())
        })
        .await
        .unwrap();
        let response = http
            .post(format!("{base}/api/runs"))
            .json(&json!({ "experiment": experiment, "config": config }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_string()
    }

    /// The run's rows in a table keyed by run (0 while the database cannot say).
    async fn rows<E: EntityTrait>(&self, run_column: E::Column, run_id: &str) -> u64
    where
        E::Model: Sync,
    {
        E::find()
            .filter(run_column.eq(run_id))
            .count(&self.db.db)
            .await
            .unwrap_or(0)
    }

    async fn stored(&self, run_id: &str) -> u64 {
        self.rows::<run_logs::Entity>(run_logs::Column::RunId, run_id)
            .await
    }

    /// Starts a `log_storm` run with `config` and waits until more than `lines` of it
    /// are stored: the fault then hits a pipeline under load. Returns the run's id.
    async fn storm(&self, base: &str, config: Value, lines: u64) -> String {
        let id = self.start_run(base, "log_storm", config).await;
        self.wait_stored_beyond(&id, lines).await;
        id
    }

    /// The run's metric points in `run_metrics` (of its series' ids).
    async fn points(&self, run_id: &str) -> u64 {
        let row = self
            .db
            .db
            .query_one(athanor_connections::db::stmt(
                self.db.db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM run_metrics m JOIN run_metric_summaries s ON s.id = m.series_id \
                 WHERE s.run_id = ?",
                vec![run_id.into()],
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap() as u64
    }

    async fn wait_stored_beyond(&self, run_id: &str, lines: u64) {
        wait_for("more lines stored", Duration::from_secs(90), || async {
            (self.stored(run_id).await > lines).then_some(())
        })
        .await
        .unwrap();
    }

    async fn wait_terminal(&self, run_id: &str) -> runs::Model {
        wait_for(
            "the run to end in the database",
            Duration::from_secs(120),
            || async {
                runs::Entity::find_by_id(run_id.to_string())
                    .one(&self.db.db)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| !matches!(r.status.as_str(), "pending" | "running"))
            },
        )
        .await
        .unwrap()
    }

    /// Waits for the run to end `completed`, counts it, and requires it clean.
    async fn completes_clean(&self, scenario: &str, run_id: &str) {
        let run = self.wait_terminal(run_id).await;
        assert_eq!(run.status, "completed", "{scenario}");
        self.tally(scenario, run_id, true).await.assert_clean();
    }

    /// Counts the run in JetStream and in the database.
    async fn tally(&self, scenario: &str, run_id: &str, expect_final: bool) -> Tally {
        let js = self.jetstream().await;
        let out = if expect_final {
            // Retried: right after a failover a consumer may not be creatable yet.
            let out = wait_for("reading the run back", Duration::from_secs(90), || async {
                match read_run(&js, run_id, Duration::from_secs(20)).await {
                    Ok(out) => Some(out),
                    Err(error) => {
                        eprintln!("{scenario}: reading the run back: {error:#}; retrying");
                        None
                    }
                }
            })
            .await
            .unwrap();
            Some(out)
        } else {
            None
        };
        // Without a final batch (a killed worker), read what is there.
        let (acked, stream_messages, emitted) = match &out {
            Some(out) => (
                out.lines().len() as u64,
                out.messages as u64,
                out.final_batch()
                    .and_then(|b| b.final_.as_ref())
                    .map(|f| f.lines),
            ),
            None => {
                let (lines, messages) = acked_without_final(&js, run_id).await;
                (lines, messages, None)
            }
        };
        let seqs: Vec<i64> = run_logs::Entity::find()
            .select_only()
            .column(run_logs::Column::Seq)
            .filter(run_logs::Column::RunId.eq(run_id))
            .order_by_asc(run_logs::Column::Seq)
            .into_tuple()
            .all(&self.db.db)
            .await
            .unwrap();
        let stored = seqs.len() as u64;
        // The primary key keeps a line from being stored twice; a batch applied twice
        // would show in the run's counters instead: they must match the rows.
        let run = runs::Entity::find_by_id(run_id)
            .one(&self.db.db)
            .await
            .unwrap()
            .expect("the run's row");
        let batch_rows = run_batches::Entity::find()
            .filter(run_batches::Column::RunId.eq(run_id))
            .count(&self.db.db)
            .await
            .unwrap();
        let miscounted =
            (run.lines as u64).abs_diff(stored) + (run.batches as u64).abs_diff(batch_rows);
        let top = emitted.unwrap_or(acked);
        let present: std::collections::HashSet<i64> = seqs.iter().copied().collect();
        let gaps = (0..top as i64).filter(|s| !present.contains(s)).count() as u64;
        let lost = (0..acked as i64).filter(|s| !present.contains(s)).count() as u64;
        let tally = Tally {
            scenario: scenario.to_string(),
            emitted,
            acked,
            stored,
            stream_messages,
            miscounted,
            gaps,
            lost,
        };
        tally.report();
        tally
    }
}

/// Lines and messages of a run that has no final batch, read until the stream is dry.
async fn acked_without_final(js: &async_nats::jetstream::Context, run_id: &str) -> (u64, u64) {
    let (batches, read) = athanor_testkit::batches_so_far(js, run_id).await.unwrap();
    (
        batches.values().map(|b| b.logs.len() as u64).sum(),
        read as u64,
    )
}

struct Tally {
    scenario: String,
    emitted: Option<u64>,
    acked: u64,
    stored: u64,
    stream_messages: u64,
    /// How far `runs.lines` and `runs.batches` are from the rows stored (a batch
    /// counted twice, or a row missing from its count).
    miscounted: u64,
    gaps: u64,
    lost: u64,
}

impl Tally {
    fn report(&self) {
        let row = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.emitted
                .map_or("— (worker killed)".to_string(), |e| e.to_string()),
            self.acked,
            self.stored,
            self.stream_messages,
            self.lost,
            self.miscounted,
            self.gaps
        );
        println!("{row}");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("..");
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("reliability.md"))
        {
            let _ = writeln!(file, "{row}");
        }
    }

    /// Nothing acked lost, nothing counted twice, no gap; and when the run finished,
    /// everything it emitted was acked.
    fn assert_clean(&self) {
        assert_eq!(
            (self.lost, self.miscounted, self.gaps),
            (0, 0, 0),
            "{}",
            self.scenario
        );
        if let Some(emitted) = self.emitted {
            assert_eq!(
                (self.acked, self.stored),
                (emitted, emitted),
                "{}",
                self.scenario
            );
        } else {
            assert_eq!(self.stored, self.acked, "{}", self.scenario);
        }
    }
}

/// 1. The aggregator killed with SIGKILL three times during a 50 000 lines/s run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_sigkilled_repeatedly_under_50k_lines_per_second() {
    let rig = Rig::new(false).await;
    let _worker = rig.start("worker");
    let mut aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let id = rig
        .start_run(
            &base,
            "log_storm",
            json!({"lines_per_second": 50_000, "duration_ms": 6000 * soak(), "threads": 2}),
        )
        .await;
    for _ in 0..3 * soak() {
        let before = rig.stored(&id).await;
        rig.wait_stored_beyond(&id, before + 20_000).await;
        aggregator.restart();
    }
    rig.completes_clean("1. aggregator SIGKILL ×3 at 50k lines/s", &id)
        .await;
    rig.db.close().await;
}

/// 1b. The aggregator killed with SIGKILL twice during a `metric_storm` run of 5 series ×
/// 100 000 steps (100 000 points/s): the lines counted as above, and every point stored
/// once with its exact value, the summaries exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_sigkilled_twice_under_500k_metric_points() {
    use athanor_workers::builtin::MetricStorm;
    const SERIES: usize = 5;
    const STEPS: i64 = 100_000;
    let rig = Rig::new(false).await;
    let _worker = rig.start("worker");
    let mut aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let config = json!({"metrics": SERIES, "steps": STEPS, "steps_per_second": 20_000 / soak()});
    let id = rig.start_run(&base, "metric_storm", config).await;
    for _ in 0..2 {
        let before = rig.points(&id).await;
        wait_for("more points stored", Duration::from_secs(90), || async {
            (rig.points(&id).await > before + 100_000).then_some(())
        })
        .await
        .unwrap();
        aggregator.restart();
    }
    let scenario = "1b. aggregator SIGKILL ×2 under 5 × 100 000 metric points";
    rig.completes_clean(scenario, &id).await;
    let points: Vec<(String, i64, Option<f64>, i64)> = rig
        .db
        .db
        .query_all(athanor_connections::db::stmt(
            rig.db.db.get_database_backend(),
            "SELECT s.name, m.step, m.value, m.seq FROM run_metrics m \
             JOIN run_metric_summaries s ON s.id = m.series_id WHERE s.run_id = ?",
            vec![id.as_str().into()],
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get("", "name").unwrap(),
                r.try_get("", "step").unwrap(),
                r.try_get("", "value").unwrap(),
                r.try_get("", "seq").unwrap(),
            )
        })
        .collect();
    // The key (series, step) holds each point once: 500 000 rows of m0…m4 at steps
    // 0…99 999 are every point. One record per step: its seq is the step.
    let names = MetricStorm::names(SERIES);
    let wrong: Vec<_> = points
        .iter()
        .filter(|(name, step, value, seq)| {
            let Some(series) = names.iter().position(|n| n == name) else {
                return true;
            };
            let expected = MetricStorm::value(series, *step as u64, None);
            !(0..STEPS).contains(step) || *value != Some(expected) || seq != step
        })
        .take(5)
        .collect();
    assert_eq!(
        (points.len(), wrong),
        (SERIES * STEPS as usize, vec![]),
        "{scenario}"
    );
    let summaries = run_metric_summaries::Entity::find()
        .filter(run_metric_summaries::Column::RunId.eq(&id))
        .order_by_asc(run_metric_summaries::Column::Name)
        .all(&rig.db.db)
        .await
        .unwrap();
    assert_eq!(summaries.len(), SERIES, "{scenario}");
    for (series, summary) in summaries.iter().enumerate() {
        let values = (0..STEPS).map(|step| MetricStorm::value(series, step as u64, None));
        let expected = run_metric_summaries::Model {
            id: summary.id,
            run_id: id.clone(),
            name: names[series].clone(),
            count: STEPS,
            min: values.clone().reduce(f64::min),
            max: values.reduce(f64::max),
            last_step: STEPS - 1,
            last_value: Some(MetricStorm::value(series, STEPS as u64 - 1, None)),
            last_seq: STEPS - 1,
            // When the newest point was emitted: not known here.
            updated_at: summary.updated_at,
        };
        assert_eq!(summary, &expected, "{scenario}");
    }
    // The rollup blocks counted each point once too: at every level, per series.
    let backend = rig.db.db.get_database_backend();
    let per_level = rig
        .db
        .db
        .query_all(athanor_connections::db::stmt(
            backend,
            "SELECT s.name, r.level, CAST(SUM(r.count) AS BIGINT) AS points FROM run_metric_rollups r \
             JOIN run_metric_summaries s ON s.id = r.series_id WHERE s.run_id = ? \
             GROUP BY s.name, r.level ORDER BY s.name, r.level",
            vec![id.as_str().into()],
        ))
        .await
        .unwrap();
    assert_eq!(per_level.len(), SERIES * 8, "{scenario}");
    for row in per_level {
        let points: i64 = row.try_get("", "points").unwrap();
        assert_eq!(points, STEPS, "{scenario}: a level's blocks of a series");
    }
    rig.db.close().await;
}

/// 2. nats-server killed with SIGKILL and restarted under load (fsync on every write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_sigkilled_and_restarted_under_load() {
    let mut rig = Rig::new(true).await;
    let _worker = rig.start("worker");
    let _aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let id = rig
        .storm(
            &base,
            json!({"lines_per_second": 20_000, "duration_ms": 8000 * soak()}),
            20_000,
        )
        .await;
    rig.nats.as_mut().unwrap().server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.nats.as_mut().unwrap().server.restart().unwrap();
    rig.completes_clean("2. nats-server SIGKILL + restart", &id)
        .await;
    rig.db.close().await;
}

/// 4. The database unavailable for 20 s under load. SQLite: another process holds the
/// write lock. PostgreSQL: every connection cut and new ones refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_unavailable_for_20_seconds_under_load() {
    let rig = Rig::new(false).await;
    if rig.db.is_postgres() {
        return postgres_unreachable_for_20_seconds(rig).await;
    }
    let _worker = rig.start("worker");
    let _aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let path = rig
        .db
        .config
        .url()
        .trim_start_matches("sqlite://")
        .to_string();
    let id = rig
        .storm(
            &base,
            json!({"lines_per_second": 10_000, "duration_ms": 15_000 * soak()}),
            10_000,
        )
        .await;
    let mut lock = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys,time\n\
             c=sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('PRAGMA busy_timeout=10000')\n\
             c.execute('BEGIN EXCLUSIVE')\n\
             print('locked', flush=True)\n\
             time.sleep(20)\n\
             c.execute('COMMIT')",
            &path,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(lock.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let during = rig.stored(&id).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Nothing could be written meanwhile (a reader still reads, through WAL).
    assert_eq!(rig.stored(&id).await, during);
    assert!(lock.wait().unwrap().success());
    rig.completes_clean("4. SQLite locked by another process for 20 s", &id)
        .await;
    rig.db.close().await;
}

/// A TCP forwarder to PostgreSQL that can be cut: while cut it refuses connections and
/// has dropped every open one — to the aggregator, the database is gone.
struct Cuttable {
    port: u16,
    target: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cuttable {
    async fn start(target: &str) -> Cuttable {
        let mut proxy = Cuttable {
            port: free_port(),
            target: target.to_string(),
            task: None,
        };
        proxy.connect().await;
        proxy
    }

    async fn connect(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                links.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Drops the listener and every forwarded connection (aborting the task drops the
    /// JoinSet, which aborts the links).
    fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// 4 on PostgreSQL: the database unreachable for 20 s (every connection cut and new
/// ones refused, through a forwarder; the machine's shared server itself is not
/// stopped).
async fn postgres_unreachable_for_20_seconds(mut rig: Rig) {
    let url = rig.db.config.url().to_string();
    let (head, rest) = url.split_once('@').unwrap();
    let (server, database) = rest.split_once('/').unwrap();
    let mut proxy = Cuttable::start(server).await;
    let through = format!("{head}@127.0.0.1:{}/{database}", proxy.port);
    for (key, value) in rig.env.iter_mut() {
        if key == "ATHANOR__DATABASE__URL" {
            *value = through.clone();
        }
    }
    let _worker = rig.start("worker");
    let _aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let id = rig
        .storm(
            &base,
            json!({"lines_per_second": 10_000, "duration_ms": 15_000 * soak()}),
            10_000,
        )
        .await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rig.stored(&id).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    // Nothing reached the database meanwhile (the test reads it directly).
    assert_eq!(rig.stored(&id).await, during);
    proxy.connect().await;
    rig.completes_clean("4. PostgreSQL unreachable for 20 s", &id)
        .await;
    rig.db.close().await;
}

/// 5. An aggregator stopped with SIGSTOP for twice `ack_wait` while a second one takes
/// over, then resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_sigstopped_past_ack_wait_while_another_takes_over() {
    let rig = Rig::new(false).await;
    let _worker = rig.start("worker");
    let first = rig.start("aggregator");
    let _second = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let id = rig
        .storm(
            &base,
            json!({"lines_per_second": 30_000, "duration_ms": 8000 * soak()}),
            20_000,
        )
        .await;
    first.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    first.signal("-CONT");
    rig.completes_clean(
        "5. aggregator SIGSTOP 6 s (ack_wait 3 s), second takes over",
        &id,
    )
    .await;
    rig.db.close().await;
}

/// What an SSE viewer received.
#[derive(Default, Debug)]
struct Viewed {
    lines: BTreeMap<u64, String>,
    /// Lines read from the stored log after a resync.
    fetched: u64,
    duplicates: u64,
    status: Option<StatusEvent>,
    reconnects: u32,
}

/// Follows a run's feed on `bases[0]`, moving to the next base (with `Last-Event-ID`)
/// whenever the connection breaks, until the status.
async fn follow(bases: Vec<String>, run_id: String) -> Viewed {
    let client = athanor_client::Client::new(&bases[0], None).unwrap();
    let mut feed = client
        .follow_across(&run_id, &bases[1..])
        .silence(Duration::from_secs(10));
    let mut fold = athanor_client::RunFold::new();
    let last_gateway = athanor_client::Client::new(bases.last().unwrap(), None).unwrap();
    let mut lines = BTreeMap::new();
    let mut fetched = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !fold.ended() {
        let event = tokio::time::timeout_at(deadline.into(), feed.next())
            .await
            .unwrap_or_else(|_| panic!("viewer timed out with {} lines", lines.len()))
            .expect("the feed")
            .expect("an event before the end");
        let update = fold.apply(&event).expect("a feed that keeps its rules");
        if let Some(missing) = update.missing.clone() {
            // Resynced (a catch-up that could not keep up on a loaded machine): the
            // lines before the new snapshot's tail come from the stored log, as any
            // client reads them.
            let mut want = missing;
            while !want.is_empty() {
                let page = last_gateway.log_range(&run_id, want.clone()).await;
                let page = page.unwrap_or_default();
                let Some(last) = page.last() else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                want.start = last.seq + 1;
                fetched += page.len() as u64;
                lines.extend(page.into_iter().map(|l| (l.seq, l.message)));
            }
        }
        lines.extend(update.lines.iter().map(|l| (l.seq, l.message.clone())));
    }
    Viewed {
        lines,
        fetched,
        duplicates: fold.repeated_lines,
        status: fold.status,
        reconnects: feed.reconnects(),
    }
}

/// 6. A worker killed with SIGKILL mid-run: the run becomes `lost` within 30 s, its
/// viewers receive that status, and what it had published is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkilled_mid_run_becomes_lost_for_viewers_and_keeps_its_output() {
    let rig = Rig::new(false).await;
    let mut worker = rig.start("worker");
    let _aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let id = rig
        .start_run(
            &base,
            "log_storm",
            json!({"lines_per_second": 10_000, "duration_ms": 60_000}),
        )
        .await;
    let viewer = tokio::spawn(follow(vec![base.clone()], id.clone()));
    rig.wait_stored_beyond(&id, 10_000).await;
    worker.kill9();
    let killed = Instant::now();
    let viewed = tokio::time::timeout(Duration::from_secs(60), viewer)
        .await
        .expect("the viewer got an end")
        .unwrap();
    let status = viewed.status.clone().unwrap();
    assert_eq!(status.status, athanor_schemas::RunState::Lost);
    println!(
        "   the viewer received `lost` {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "lost after {:?}",
        killed.elapsed()
    );
    let run = rig.wait_terminal(&id).await;
    assert_eq!(run.status, "lost");
    let tally = rig
        .tally("6. worker SIGKILL mid-run → lost", &id, false)
        .await;
    tally.assert_clean();
    assert_eq!(viewed.lines.len() as u64, tally.acked);
    assert_eq!(viewed.duplicates, 0);
    rig.db.close().await;
}

/// 7. A gateway killed with SIGKILL while 50 viewers follow a run: they resume on a
/// second gateway with `Last-Event-ID`, and each received exactly the run's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkilled_under_fifty_viewers_who_resume_on_another() {
    let rig = Rig::new(false).await;
    let _worker = rig.start("worker");
    let _aggregator = rig.start("aggregator");
    let (mut first, first_base) = rig.gateway().await;
    let (_second, second_base) = rig.gateway().await;
    let id = rig
        .start_run(
            &first_base,
            "log_storm",
            json!({"lines_per_second": 5000, "duration_ms": 10_000 * soak()}),
        )
        .await;
    let viewers: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(follow(
                vec![first_base.clone(), second_base.clone()],
                id.clone(),
            ))
        })
        .collect();
    rig.wait_stored_beyond(&id, 10_000).await;
    first.kill9();
    let mut received = Vec::new();
    for viewer in viewers {
        received.push(viewer.await.unwrap());
    }
    let run = rig.wait_terminal(&id).await;
    assert_eq!(run.status, "completed");
    let tally = rig
        .tally("7. gateway SIGKILL under 50 SSE viewers", &id, true)
        .await;
    tally.assert_clean();
    let expected: Vec<u64> = (0..tally.acked).collect();
    for viewed in &received {
        assert_eq!(viewed.duplicates, 0);
        assert!(viewed.reconnects >= 1, "{viewed:?}");
        assert_eq!(viewed.lines.keys().copied().collect::<Vec<_>>(), expected);
        assert_eq!(
            viewed.status.as_ref().unwrap().status,
            athanor_schemas::RunState::Completed
        );
        assert_eq!(viewed.lines, received[0].lines);
    }
    println!(
        "   50 viewers: each {} lines, 0 duplicates, all resumed; {} read from the stored log after a resync",
        received[0].lines.len(),
        received.iter().map(|v| v.fetched).sum::<u64>()
    );
    rig.db.close().await;
}

/// 3. NATS unreachable for longer than the duplicate window (2 s here) under 50 000
/// lines/s: the worker's memory stays under its bound (`log()` blocks), and after
/// recovery nothing is lost (a batch stored twice past the window is absorbed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_past_the_duplicate_window_with_the_worker_memory_bounded() {
    const BOUND_MIB: u64 = 32;
    let mut rig = Rig::new(false).await;
    rig.env
        .push(("ATHANOR__NATS__DUPLICATE_WINDOW".into(), "2s".into()));
    rig.env.push((
        "ATHANOR__WORKER__MAX_PENDING_BYTES".into(),
        (BOUND_MIB << 20).to_string(),
    ));
    let worker = rig.start("worker");
    let _aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let id = rig
        .storm(
            &base,
            json!({"lines_per_second": 50_000, "duration_ms": 12_000 * soak(), "line_bytes": 200}),
            20_000,
        )
        .await;
    let pid = worker.child.id();
    let before = athanor_testkit::rss_kib(pid);
    rig.nats.as_mut().unwrap().server.kill();
    let mut peak = before;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(8) {
        peak = peak.max(athanor_testkit::rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.nats.as_mut().unwrap().server.restart().unwrap();
    let run = rig.wait_terminal(&id).await;
    assert_eq!(run.status, "completed");
    println!(
        "   worker RSS {} MiB before the outage, peak {} MiB during 8 s without NATS (bound {BOUND_MIB} MiB of pending output)",
        before / 1024,
        peak / 1024
    );
    // The bound is on pending output; the process around it (runtime, buffers being
    // encoded, allocator slack) gets 64 MiB on top.
    assert!(
        peak < before + (BOUND_MIB + 64) * 1024,
        "worker RSS grew from {before} KiB to {peak} KiB"
    );
    rig.tally(
        "3. NATS down 8 s (duplicate window 2 s), worker RSS bounded",
        &id,
        true,
    )
    .await
    .assert_clean();
    rig.db.close().await;
}

/// 9. A frame declaring 1 GiB (and other garbage) sent to the aggregator process: it
/// is dead-lettered without the aggregator's memory growing, and runs go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_declaring_one_gib_leaves_the_aggregator_memory_alone() {
    let rig = Rig::new(false).await;
    let aggregator = rig.start("aggregator");
    let _worker = rig.start("worker");
    let (_gateway, base) = rig.gateway().await;
    let js = rig.jetstream().await;
    let warm = rig
        .start_run(&base, "sweep", json!({"iterations": 3, "delay_ms": 0}))
        .await;
    rig.wait_terminal(&warm).await;
    let before = athanor_testkit::rss_kib(aggregator.child.id());
    let mut huge = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    huge.set_pledged_src_size(Some(1 << 30)).unwrap();
    std::io::Write::write_all(&mut huge, &[b'a'; 4096]).unwrap();
    std::io::Write::flush(&mut huge).unwrap();
    for i in 0..20 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("huge-{i}").as_str());
        js.publish_with_headers(
            athanor_schemas::names::run_subject("huge"),
            headers,
            huge.get_ref().clone().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    wait_for("the dead letters", Duration::from_secs(30), || async {
        let mut dlq = js
            .get_stream(athanor_schemas::names::DLQ_STREAM)
            .await
            .ok()?;
        (dlq.info().await.ok()?.state.messages == 20).then_some(())
    })
    .await
    .unwrap();
    let after = athanor_testkit::rss_kib(aggregator.child.id());
    println!(
        "   aggregator RSS {} MiB before, {} MiB after 20 frames declaring 1 GiB each",
        before / 1024,
        after / 1024
    );
    assert!(after < before + 64 * 1024, "RSS {before} KiB → {after} KiB");
    // A 10 MiB line: cut to `worker.max_line_bytes` (64 KiB) with a visible marker
    // naming its whole length, counted as the one line it is (echo builds it cut: it
    // never allocates the 10 MiB).
    let long = rig
        .start_run(
            &base,
            "echo",
            json!({"message": "0123456789abcdef", "repeat": 655_360}),
        )
        .await;
    let run = rig.wait_terminal(&long).await;
    assert_eq!((run.status.as_str(), run.lines), ("completed", 1));
    let line = run_logs::Entity::find()
        .filter(run_logs::Column::RunId.eq(long.as_str()))
        .one(&rig.db.db)
        .await
        .unwrap()
        .unwrap();
    assert!(line.message.starts_with("0123456789abcdef"));
    assert!(
        line.message
            .ends_with(" …[truncated 10420266 of 10485760 bytes]"),
        "{}",
        &line.message[line.message.len() - 60..]
    );
    assert_eq!(line.message.len(), 65_536);
    println!(
        "   a 10 MiB line stored as {} bytes, ending \"…[truncated 10420266 of 10485760 bytes]\"",
        line.message.len()
    );
    // And the pipeline goes on.
    let id = rig
        .start_run(
            &base,
            "log_storm",
            json!({"lines_per_second": 20_000, "duration_ms": 2000}),
        )
        .await;
    assert_eq!(rig.wait_terminal(&id).await.status, "completed");
    rig.tally("9. 20 frames declaring 1 GiB, then a run", &id, true)
        .await
        .assert_clean();
    rig.db.close().await;
}

/// Three nats-servers in one JetStream cluster on loopback ports.
struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

struct Node {
    name: String,
    port: u16,
    conf: std::path::PathBuf,
    child: Option<Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster))| {
                let name = format!("n{}", i + 1);
                let store = dir.path().join(&name);
                let conf = dir.path().join(format!("{name}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
                         jetstream {{ store_dir: {:?} }}\n\
                         cluster {{ name: athanor, listen: \"127.0.0.1:{cluster}\", routes: [{}] }}\n",
                        store.display().to_string(),
                        routes.join(", ")
                    ),
                )
                .unwrap();
                let mut node = Node {
                    name,
                    port: *port,
                    conf,
                    child: None,
                };
                node.spawn();
                node
            })
            .collect();
        Cluster { nodes, _dir: dir }
    }

    fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }
}

impl Node {
    fn spawn(&mut self) {
        let child = Command::new(athanor_testkit::server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// 8. A three-node cluster, streams and buckets at replicas 3: the leader of
/// `ATHANOR_RUNS` killed with SIGKILL under load. Nothing acked is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_of_a_three_node_cluster_killed_under_load() {
    let mut cluster = Cluster::start();
    let config = athanor_connections::nats::NatsConfig {
        replicas: 3,
        ..athanor_connections::nats::NatsConfig::for_tests(&cluster.url())
    };
    // The cluster elects its JetStream meta leader, then the topology can be declared.
    wait_for(
        "the cluster's JetStream",
        Duration::from_secs(60),
        || async {
            match athanor_connections::nats::open(&config, "athanor-faults").await {
                Ok(js) => Some(js),
                Err(error) => {
                    eprintln!("cluster not ready: {error}");
                    None
                }
            }
        },
    )
    .await
    .unwrap();
    let mut rig = Rig::around(None, config.clone()).await;
    rig.env.push(("ATHANOR__NATS__REPLICAS".into(), "3".into()));
    let _worker = rig.start("worker");
    let _aggregator = rig.start("aggregator");
    let (_gateway, base) = rig.gateway().await;
    let id = rig
        .storm(
            &base,
            json!({"lines_per_second": 20_000, "duration_ms": 10_000 * soak()}),
            20_000,
        )
        .await;
    let js = rig.jetstream().await;
    let leader = js
        .get_stream(athanor_schemas::names::RUNS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("a stream leader");
    drop(js);
    cluster.node(&leader).kill9();
    println!("   killed {leader}, the leader of ATHANOR_RUNS");
    rig.completes_clean(
        &format!("8. 3-node cluster, R3: stream leader ({leader}) SIGKILL"),
        &id,
    )
    .await;
    rig.db.close().await;
}
