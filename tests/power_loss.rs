//! Power loss (issue 18): `athanor up` with its data directory — the embedded
//! nats-server's store and the SQLite database — on a filesystem that forgets every
//! write not fsynced when the power is cut (testkit's LazyFs, a FUSE filesystem).
//!
//! Mid-run, the test takes what has been acknowledged: the lines the database holds
//! (the aggregator acknowledged their batches to JetStream after the commit) and the
//! batches in `ATHANOR_RUNS` (JetStream acknowledged them to the worker). Then the
//! power goes: `athanor up` and its nats-server are killed with SIGKILL, and every
//! unsynced byte is dropped. After a restart on the same directory and the run settled
//! (`lost`: its worker is gone), every acknowledged line must be stored, with no gap.
//! With the durable defaults nothing is lost; what each non-durable setting loses is
//! measured and recorded in RELIABILITY.md's table (`target/reliability.md`).

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use athanor_schemas::entities::{run_batches, run_logs};
use athanor_testkit::lazyfs::{CutReport, LazyFs};
use athanor_testkit::wait_for;
use futures::StreamExt;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::{json, Value};

/// Settings that make a dead worker's run `lost` within seconds.
const FAST: &[(&str, &str)] = &[
    ("ATHANOR__NATS__WORKERS_TTL", "3s"),
    ("ATHANOR__WORKER__HEARTBEAT_INTERVAL", "500ms"),
    ("ATHANOR__AGGREGATOR__LOST_CHECK_INTERVAL", "500ms"),
];

/// What was acknowledged before the cut, and what was stored after it.
#[derive(Debug)]
struct Outcome {
    /// Lines the database held before the cut.
    stored_before: usize,
    /// Lines in the batches JetStream held before the cut.
    in_stream_before: usize,
    /// Lines acknowledged either way (the union of the two).
    acked: usize,
    /// Lines stored after the restart.
    stored_after: usize,
    /// Acknowledged lines (either kind) not stored after the restart.
    lost: usize,
    /// Seqs missing below the highest one stored after the restart.
    gaps: usize,
    cut: CutReport,
}

impl Outcome {
    fn record(&self, settings: &str) {
        let row = format!(
            "| power cut mid-run ({settings}) | — (power cut) | {} | {} | — | {} | — | {} |",
            self.acked, self.stored_after, self.lost, self.gaps
        );
        println!("{row}\n{self:?}");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("..");
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("reliability.md"))
        {
            let _ = writeln!(file, "{row}");
        }
    }
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// The embedded nats-server's URL, from the configuration `athanor up` wrote for it.
fn nats_url(data: &Path) -> String {
    let conf = std::fs::read_to_string(data.join("nats/nats-server.conf")).unwrap();
    let listen = conf
        .lines()
        .find_map(|l| l.strip_prefix("listen: "))
        .expect("a listen line");
    format!("nats://{}", listen.trim_matches('"'))
}

/// The run's line seqs in the database.
async fn stored_seqs(data: &Path, run_id: &str) -> BTreeSet<i64> {
    let url = format!("sqlite://{}", data.join("athanor.db").display());
    let db = sea_orm::Database::connect(url).await.unwrap();
    let seqs: Vec<i64> = run_logs::Entity::find()
        .select_only()
        .column(run_logs::Column::Seq)
        .filter(run_logs::Column::RunId.eq(run_id))
        .order_by_asc(run_logs::Column::Seq)
        .into_tuple()
        .all(&db)
        .await
        .unwrap();
    let batches: Vec<i64> = run_batches::Entity::find()
        .select_only()
        .column(run_batches::Column::BatchSeq)
        .filter(run_batches::Column::RunId.eq(run_id))
        .into_tuple()
        .all(&db)
        .await
        .unwrap();
    assert!(!batches.is_empty() || seqs.is_empty());
    db.close().await.unwrap();
    seqs.into_iter().collect()
}

/// The line seqs of the run's batches in `ATHANOR_RUNS` so far.
async fn seqs_in_stream(nats: &str, run_id: &str) -> BTreeSet<i64> {
    let js = async_nats::jetstream::new(async_nats::connect(nats).await.unwrap());
    let (batches, _) = athanor_testkit::batches_so_far(&js, run_id).await.unwrap();
    batches
        .values()
        .flat_map(|b| b.logs.iter().map(|l| l.seq as i64))
        .collect()
}

fn kill9(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A `log_storm` run under `athanor up` on a LazyFs with `settings` on top of the
/// defaults, the power cut mid-run, a restart, and the count.
async fn cut_mid_run(settings: &[(&str, &str)]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    let mut fs = LazyFs::mount(&mount).expect("mount LazyFs (root and /dev/fuse are needed)");
    let data = mount.join("data");
    let env: Vec<(&str, &str)> = FAST.iter().chain(settings).copied().collect();
    let http = reqwest::Client::new();

    let (mut up, url) = common::up_with(&data, &env);
    common::wait_for_worker(&url);
    let response = http
        .post(format!("{url}/api/runs"))
        .json(&json!({
            "experiment": "log_storm",
            "config": { "lines_per_second": 20_000, "duration_ms": 120_000 },
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let run_id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("30 000 lines stored", Duration::from_secs(60), || async {
        let run = get(&http, format!("{url}/api/runs/{run_id}")).await;
        (run["lines"].as_u64().unwrap_or(0) >= 30_000).then_some(())
    })
    .await
    .unwrap();

    // What has been acknowledged, read while the run goes on.
    let stored_before = stored_seqs(&data, &run_id).await;
    let in_stream_before = seqs_in_stream(&nats_url(&data), &run_id).await;
    let server: u32 = std::fs::read_to_string(data.join("nats/nats-server.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // The power cut: every process on the filesystem dies at once (the embedded
    // nats-server with `athanor up`), then what was never synced is gone.
    kill9(&mut up);
    wait_for("nats-server to die", Duration::from_secs(10), || async {
        (!common::alive(server)).then_some(())
    })
    .await
    .unwrap();
    let cut = fs.power_cut().unwrap();

    let (mut up, url) = common::up_with(&data, &env);
    wait_for("the run to be lost", Duration::from_secs(60), || async {
        let run = get(&http, format!("{url}/api/runs/{run_id}")).await;
        (run["status"] == "lost").then_some(())
    })
    .await
    .unwrap();
    // Settled: the aggregator's consumers have nothing left to deliver.
    let js = async_nats::jetstream::new(async_nats::connect(nats_url(&data)).await.unwrap());
    wait_for(
        "the aggregator to catch up",
        Duration::from_secs(60),
        || async {
            let mut stream = js
                .get_stream(athanor_schemas::names::RUNS_STREAM)
                .await
                .ok()?;
            let mut consumers = stream.consumers();
            let mut idle = true;
            while let Some(info) = consumers.next().await {
                let info = info.ok()?;
                idle &= info.num_pending == 0 && info.num_ack_pending == 0;
            }
            let _ = stream.info().await.ok()?;
            idle.then_some(())
        },
    )
    .await
    .unwrap();
    common::stop(&mut up);
    let stored_after = stored_seqs(&data, &run_id).await;
    drop(fs);

    let acked: BTreeSet<i64> = stored_before.union(&in_stream_before).copied().collect();
    let top = stored_after.last().map_or(0, |s| s + 1);
    Outcome {
        stored_before: stored_before.len(),
        in_stream_before: in_stream_before.len(),
        acked: acked.len(),
        stored_after: stored_after.len(),
        lost: acked.difference(&stored_after).count(),
        gaps: (0..top).filter(|s| !stored_after.contains(s)).count(),
        cut,
    }
}

/// Whether the cut dropped bytes of a file whose path contains `part`.
fn reverted(outcome: &Outcome, part: &str) -> bool {
    outcome
        .cut
        .reverted
        .iter()
        .any(|(path, _)| path.contains(part))
}

/// The defaults (JetStream `sync_interval: always`, SQLite `synchronous = full`): a
/// power cut mid-run loses no acknowledged line and leaves no gap; no byte of the
/// stream's messages was left unsynced. The database's files may be: a checkpoint
/// copying the WAL into the database, or a transaction writing its WAL frames before
/// its commit's fsync, can be under way at the cut (a CI run cut one checkpoint: 9.9 MB
/// of `athanor.db`, 32 KB of its WAL). SQLite recovers from the WAL, and a commit that
/// was lost would show as lost lines: the aggregator acknowledges a batch only after
/// its commit, so a stored batch lost with the cut is never delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_mid_run_loses_no_acknowledged_line_with_the_durable_defaults() {
    athanor_testkit::init_tracing();
    let outcome = cut_mid_run(&[]).await;
    outcome.record("defaults");
    assert!(outcome.stored_before >= 30_000, "{outcome:?}");
    // Every stored batch came through the stream, which keeps them (read after the
    // database).
    assert!(
        outcome.in_stream_before >= outcome.stored_before,
        "{outcome:?}"
    );
    assert!(outcome.cut.syncs > 0, "{outcome:?}");
    assert_eq!((outcome.lost, outcome.gaps), (0, 0), "{outcome:?}");
    assert!(outcome.stored_after >= outcome.acked, "{outcome:?}");
    // Where acknowledged messages live: JetStream's message blocks.
    let durable = |p: &str| p.contains("/streams/ATHANOR_RUNS/msgs/");
    let dropped: Vec<_> = outcome
        .cut
        .reverted
        .iter()
        .filter(|(p, _)| durable(p))
        .collect();
    assert!(dropped.is_empty(), "unsynced bytes dropped: {dropped:?}");
}

/// The settings that trade durability for speed, in the same cut: JetStream without
/// an fsync per write leaves the stream's newest messages (and the aggregator's
/// consumer state) unsynced, and the cut drops them; SQLite's `synchronous = normal`
/// leaves the commits since the last checkpoint (25 ms at most) unsynced. What each
/// loses of the acknowledged lines is recorded (it depends on where the cut falls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_under_the_non_durable_settings_drops_acknowledged_data() {
    athanor_testkit::init_tracing();
    let nats = cut_mid_run(&[("ATHANOR__NATS__SYNC_ALWAYS", "false")]).await;
    nats.record("nats.sync_always = false");
    assert!(reverted(&nats, "ATHANOR_RUNS/msgs/"), "{nats:?}");
    let sqlite = cut_mid_run(&[("ATHANOR__DATABASE__SQLITE_SYNCHRONOUS", "normal")]).await;
    sqlite.record("database.sqlite_synchronous = normal");
    assert!(sqlite.stored_before >= 30_000, "{sqlite:?}");
}
