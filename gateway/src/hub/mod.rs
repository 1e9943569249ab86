//! Per-run hubs: one upstream JetStream consumer per run followed by any number of
//! viewers on this gateway.
//!
//! A hub bootstraps from the database — the run, its results, its progress and the
//! tail of its log as of the highest batch stored without a gap (`runs.last_batch_seq`)
//! — and then follows the run's subject in `ATHANOR_RUNS` from just after that batch's
//! stream sequence (`runs.last_stream_seq`), so opening a long run never replays its
//! whole stream. Batches are applied in `batch_seq` order exactly once (duplicates
//! dropped, early ones held until the gap fills) and fanned out as ready-made SSE frames
//! on a bounded broadcast channel: a viewer that falls behind loses its place and is
//! resynced (`sse.rs`); it never slows the hub, other viewers or the pipeline.
//!
//! Hubs live in a moka cache. A hub touches its entry while it has viewers; one with no
//! viewers for `gateway.hub_idle` stops following and is evicted.
//!
//! Where each job lives:
//! * `ordering.rs` — the ordering logic: watermark, early batches, duplicates, gaps, the
//!   run's end; a pure state machine ([`Sequencer`]) with no I/O;
//! * `frame.rs` — the SSE frames, encoded once and shared by every viewer;
//! * here — the cache of hubs, the bootstrap from the database, the JetStream follow
//!   loop (on the [`Follower`]'s thread), the database checks, and broadcasting what
//!   the sequencer returns.

mod frame;
mod ordering;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use athanor_connections::db::stmt;
use athanor_connections::retry::Backoff;
use athanor_schemas::entities::{run_logs, run_results, runs};
use athanor_schemas::events::RunView;
use athanor_schemas::metric::SeriesSketch;
use athanor_schemas::{
    names, Batch, Level, LogLine, Progress, ResultRecord, RunState, UnknownRunState,
};
use futures::StreamExt;
use parking_lot::Mutex;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde_json::Value;
use tokio::sync::{broadcast, Notify};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub(crate) use self::frame::{Broadcast, Encoding, Frame, GzipStream};
use self::ordering::{Bootstrap, Checked, Sequencer, Skipped, Stored, SNAPSHOT_BUCKETS};
use crate::error::{ApiError, ApiResult};
use crate::GatewayConfig;

/// The thread the hubs follow their runs on: a runtime of one thread with a NATS
/// connection of its own. A batch is then decoded and broadcast as soon as it arrives,
/// instead of waiting on the gateway's runtime behind the viewers' writes its previous
/// frames woke — and so is the NATS connection that delivers it (100 runs × 100
/// viewers on 2 cores, measured in BENCHMARKS.md). The viewers' writes stay on the
/// gateway's runtime; a broadcast wakes them there.
pub(crate) struct Follower {
    handle: tokio::runtime::Handle,
    /// JetStream over the follower's own connection (its I/O on the follower thread).
    js: jetstream::Context,
    /// Dropped with the hubs: the thread then stops its runtime and ends.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Follower {
    pub async fn start(nats: &athanor_connections::nats::NatsConfig) -> crate::Result<Self> {
        // The runtime is built on its thread, so that no failure here drops it inside
        // the gateway's runtime.
        let (ready, built) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("athanor-hubs".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        let _ = ready.send(Ok(runtime.handle().clone()));
                        let _ = runtime.block_on(stopped);
                        runtime.shutdown_background();
                    }
                    Err(error) => {
                        let _ = ready.send(Err(error.to_string()));
                    }
                }
            })
            .map_err(|e| crate::Error::Follower(e.to_string()))?;
        let handle = built
            .await
            .map_err(|e| crate::Error::Follower(e.to_string()))?
            .map_err(crate::Error::Follower)?;
        let config = nats.clone();
        let js = handle
            .spawn(async move {
                let client =
                    athanor_connections::nats::connect(&config, "athanor-gateway-hubs").await?;
                Ok::<_, athanor_connections::nats::NatsError>(athanor_connections::nats::jetstream(
                    client, &config,
                ))
            })
            .await
            .map_err(|e| crate::Error::Follower(e.to_string()))??;
        Ok(Follower {
            handle,
            js,
            _stop: stop,
        })
    }

    /// Whether the follower's NATS connection is up.
    pub fn connected(&self) -> bool {
        self.js.client().connection_state() == async_nats::connection::State::Connected
    }
}

/// What every hub shares.
pub(crate) struct Hubs {
    pub db: DatabaseConnection,
    /// JetStream over the gateway's connection: viewers replaying what they missed.
    pub js: jetstream::Context,
    /// The hubs' thread and connection.
    pub follower: Follower,
    /// The gateway's runtime: the hubs' database checks run there, so that every
    /// database connection stays on the runtime that opened it (a connection opened on
    /// the follower would stop working with it, and the pool is shared).
    main: tokio::runtime::Handle,
    pub config: GatewayConfig,
    cache: moka::future::Cache<String, Arc<Hub>>,
    /// Cancelled when the gateway stops: hubs stop following, feeds end.
    pub shutdown: CancellationToken,
    /// The gateway's background tasks (hubs following runs, the lifecycle relay): the
    /// gateway waits for them at shutdown, so none outlives it.
    pub tasks: tokio_util::task::TaskTracker,
    /// Live feeds now (run feeds and the lifecycle feed), and how many may be.
    viewers: Arc<std::sync::atomic::AtomicUsize>,
    max_viewers: usize,
    /// Events and resyncs sent to viewers, for `/metrics`.
    pub instruments: crate::instruments::Instruments,
}

/// Hubs held at most (see [`Hubs::new`]).
const MAX_HUBS: u64 = 10_000;

/// Open files left to everything but feeds: API requests, the database, NATS, logs.
const FD_RESERVE: u64 = 256;

/// A feed's place among [`Hubs`]' viewers, given back when the feed ends.
pub(crate) struct ViewerSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ViewerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Hubs {
    /// Called on the gateway's runtime.
    pub fn new(
        db: DatabaseConnection,
        js: jetstream::Context,
        follower: Follower,
        config: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let cache = moka::future::Cache::builder()
            // Each hub follows its run with a JetStream consumer: however many run ids
            // readers open, at most this many hubs (the least used one goes first, its
            // viewers reconnect to a new one).
            .max_capacity(MAX_HUBS)
            .time_to_idle(config.hub_idle)
            .eviction_listener(|_run, hub: Arc<Hub>, _cause| hub.stop.cancel())
            .build();
        let open_files = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let max_viewers = match open_files {
            Some(limit) => config
                .max_viewers
                .min(limit.saturating_sub(FD_RESERVE) as usize),
            None => config.max_viewers,
        };
        if max_viewers < config.max_viewers {
            tracing::warn!(
                configured = config.max_viewers,
                max_viewers,
                open_files,
                "fewer live feeds than gateway.max_viewers: the open-files limit keeps {FD_RESERVE} for everything else"
            );
        }
        Arc::new(Hubs {
            db,
            js,
            follower,
            main: tokio::runtime::Handle::current(),
            config,
            cache,
            shutdown,
            tasks: tokio_util::task::TaskTracker::new(),
            viewers: Arc::default(),
            max_viewers,
            instruments: crate::instruments::Instruments::new(),
        })
    }

    /// Live feeds open now.
    pub fn viewers(&self) -> usize {
        self.viewers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Hubs cached now (each following its run).
    pub fn count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// A place for one more live feed, or 503 (`Retry-After`) when all are taken.
    pub fn admit(&self) -> ApiResult<ViewerSlot> {
        use std::sync::atomic::Ordering;
        let taken = self.viewers.fetch_add(1, Ordering::Relaxed);
        let slot = ViewerSlot(self.viewers.clone());
        if taken >= self.max_viewers {
            return Err(ApiError::Busy(format!(
                "this gateway serves {} live feeds at most, all taken; retry shortly",
                self.max_viewers
            )));
        }
        Ok(slot)
    }

    /// The hub of `run_id`, opened (once, however many viewers ask at the same time)
    /// when there is none.
    pub async fn get(self: &Arc<Self>, run_id: &str) -> ApiResult<Arc<Hub>> {
        for attempt in 0..2 {
            let hub = self
                .cache
                .try_get_with(run_id.to_string(), self.clone().open(run_id.to_string()))
                .await
                .map_err(|e| ApiError::shared(&e))?;
            if !hub.stopped_early() && (attempt == 1 || !hub.is_lost()) {
                return Ok(hub);
            }
            // It stopped following (idle, stuck) but is still cached, or it said `lost`
            // (a late final batch may still settle the run): open it afresh.
            self.forget(&hub).await;
        }
        Err(ApiError::Unavailable(format!(
            "the live feed of run {run_id} could not be opened; retry"
        )))
    }

    /// Removes `hub` from the cache if it is still the cached hub of its run (a newer
    /// one is left alone).
    async fn forget(&self, hub: &Arc<Hub>) {
        self.cache
            .entry_by_ref(&hub.run_id)
            .and_compute_with(|cached| {
                let same = cached.is_some_and(|c| Arc::ptr_eq(c.value(), hub));
                std::future::ready(if same {
                    moka::ops::compute::Op::Remove
                } else {
                    moka::ops::compute::Op::Nop
                })
            })
            .await;
    }

    /// A lifecycle change for `run_id` was announced: its hub (if any) checks the
    /// database now rather than at its next poll.
    pub async fn poke(&self, run_id: &str) {
        if let Some(hub) = self.cache.get(run_id).await {
            hub.poke.notify_one();
        }
    }

    async fn open(self: Arc<Self>, run_id: String) -> ApiResult<Arc<Hub>> {
        let run = runs::Entity::find_by_id(run_id.clone())
            .one(&self.db)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("run {run_id:?} not found")))?;
        let covered = run.last_batch_seq.map_or(0, |b| b as u64 + 1);
        // Lines of the batches covered: batches beyond the watermark may be stored
        // already, and the hub will see them again from the stream.
        let lines = if covered == 0 {
            0
        } else {
            let backend = self.db.get_database_backend();
            self.db
                .query_one(stmt(
                    backend,
                    "SELECT CAST(COALESCE(SUM(lines), 0) AS BIGINT) AS n FROM run_batches WHERE run_id = ? AND batch_seq < ?",
                    vec![run_id.clone().into(), (covered as i64).into()],
                ))
                .await?
                .map(|row| row.try_get::<i64>("", "n"))
                .transpose()?
                .unwrap_or(0) as u64
        };
        let mut tail: Vec<LogLine> = run_logs::Entity::find()
            .filter(run_logs::Column::RunId.eq(run_id.as_str()))
            .filter(run_logs::Column::Seq.lt(lines as i64))
            .order_by_desc(run_logs::Column::Seq)
            .limit(self.config.tail_lines as u64)
            .all(&self.db)
            .await?
            .into_iter()
            .map(log_line)
            .collect();
        tail.reverse();
        let results: BTreeMap<String, ResultRecord> = run_results::Entity::find()
            .filter(run_results::Column::RunId.eq(run_id.as_str()))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|r| {
                let record = ResultRecord {
                    seq: r.seq as u64,
                    key: r.key.clone(),
                    value: serde_json::from_str(&r.value).unwrap_or(Value::Null),
                    ts: r.ts,
                };
                (r.key, record)
            })
            .collect();
        // Each series as stored: points of batches past the watermark may be in already
        // (a sketch takes a repeated point once while it is exact; a bucket then
        // counts it twice, which only its `count` shows).
        let mut metrics = BTreeMap::new();
        for summary in crate::metrics::summaries(&self.db, &run_id).await? {
            let series = crate::metrics::series(
                &self.db,
                &run_id,
                &summary.name,
                None,
                None,
                SNAPSHOT_BUCKETS as u64,
            )
            .await?;
            metrics.insert(
                summary.name,
                SeriesSketch::from_series(SNAPSHOT_BUCKETS, &series),
            );
        }
        let start = run.last_stream_seq.map(|s| s as u64 + 1);
        let final_batches = run.final_batches.map(|n| n as u64);
        let mut view = run_view(run)?;
        view.lines = lines as i64;
        view.batches = covered as i64;
        view.results = results.len() as i64;
        let sequencer = Sequencer::new(Bootstrap {
            run: view,
            results,
            tail,
            tail_cap: self.config.tail_lines,
            lines,
            covered,
            final_batches,
            metrics,
        });
        let (tx, _) = broadcast::channel(self.config.hub_buffer.max(1));
        let hub = Arc::new(Hub {
            run_id: run_id.clone(),
            state: Mutex::new(sequencer),
            tx,
            sent: Broadcast::default(),
            stop: self.shutdown.child_token(),
            poke: Notify::new(),
        });
        if hub.state.lock().terminal().is_none() {
            self.tasks.spawn_on(
                follow(self.clone(), hub.clone(), start),
                &self.follower.handle,
            );
        } else {
            hub.stop.cancel();
        }
        debug!(run_id = %run_id, covered, lines, "hub opened");
        Ok(hub)
    }

    /// A consumer of the run's subject starting at stream sequence `start` (the
    /// beginning when unknown): ordered, ephemeral, recreated by the client after a
    /// NATS restart.
    pub async fn consumer(
        js: &jetstream::Context,
        run_id: &str,
        start: Option<u64>,
    ) -> Result<consumer::pull::Ordered, String> {
        let stream = js
            .get_stream(names::RUNS_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let deliver_policy = match start {
            Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            None => consumer::DeliverPolicy::All,
        };
        stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: names::run_subject(run_id),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())
    }

    /// Where a viewer holding batches `0..have` resumes in the stream: just after the
    /// last batch it holds when the database knows where that is, else after the
    /// database's watermark (every batch after a batch follows all copies of it).
    pub async fn resume_point(&self, run_id: &str, have: u64) -> ApiResult<Option<u64>> {
        if have == 0 {
            return Ok(None);
        }
        let backend = self.db.get_database_backend();
        let row = self
            .db
            .query_one(stmt(
                backend,
                "SELECT stream_seq FROM run_batches WHERE run_id = ? AND batch_seq = ?",
                vec![run_id.into(), (have as i64 - 1).into()],
            ))
            .await?;
        if let Some(row) = row {
            return Ok(Some(row.try_get::<i64>("", "stream_seq")? as u64 + 1));
        }
        let run = runs::Entity::find_by_id(run_id.to_string())
            .one(&self.db)
            .await?;
        Ok(run.and_then(|r| r.last_stream_seq).map(|s| s as u64 + 1))
    }
}

/// A run's live state on this gateway and its viewers' channel.
pub(crate) struct Hub {
    pub run_id: String,
    /// The run's state and watermark; locked briefly, never across an `.await`.
    state: Mutex<Sequencer>,
    /// Every frame after the state, in order; bounded: a viewer that lags is resynced.
    tx: broadcast::Sender<Arc<Frame>>,
    /// The bytes sent on `tx`, stamped on each frame: how far behind a viewer is.
    pub sent: Broadcast,
    /// Cancelled when the hub stops following: terminal, idle, evicted or shutdown.
    pub stop: CancellationToken,
    /// Wakes the hub to check the database for a status it cannot see on the stream
    /// (`lost`).
    poke: Notify,
}

/// What a viewer gets when it joins a hub.
pub(crate) struct Joined {
    pub rx: broadcast::Receiver<Arc<Frame>>,
    /// The hub's watermark: frames on `rx` start after it.
    pub next: u64,
    /// The `status` frame, when the run has already ended.
    pub terminal: Option<Arc<Frame>>,
}

impl Hub {
    /// Joins without a snapshot (a viewer resuming from its own watermark).
    pub fn join(&self) -> Joined {
        let state = self.state.lock();
        Joined {
            rx: self.tx.subscribe(),
            next: state.next(),
            terminal: state.terminal().cloned(),
        }
    }

    /// Joins with a snapshot of the state the following frames apply to.
    pub fn join_with_snapshot(&self) -> (Joined, Arc<Frame>) {
        let mut state = self.state.lock();
        let joined = Joined {
            rx: self.tx.subscribe(),
            next: state.next(),
            terminal: state.terminal().cloned(),
        };
        (joined, state.snapshot_frame())
    }

    /// The run's batch count, once it has ended.
    pub fn ended_with(&self) -> Option<u64> {
        let state = self.state.lock();
        state.terminal().map(|_| state.next())
    }

    /// Whether it stopped following without reaching the run's end.
    pub fn stopped_early(&self) -> bool {
        self.stop.is_cancelled() && self.state.lock().terminal().is_none()
    }

    fn is_lost(&self) -> bool {
        self.state.lock().is_lost()
    }

    /// Whether batches after a missing one are waiting.
    fn waiting_for_gap(&self) -> bool {
        self.state.lock().waiting_for_gap()
    }

    /// Applies a batch from the stream; returns how many frames went to the viewers.
    fn apply(&self, batch: Batch) -> usize {
        // Serialised before the lock: viewers joining meanwhile are not kept waiting.
        let frame = Frame::batch(&batch);
        let mut state = self.state.lock();
        let applied = state.apply_framed(batch, frame);
        if let Some(Skipped {
            missing,
            resumed_at,
        }) = applied.skipped
        {
            warn!(run_id = %self.run_id, missing, resumed_at, "batches missing from the stream; skipping them");
        }
        let sent = applied.frames.len();
        for frame in applied.frames {
            self.sent.stamp(&frame);
            // No receivers is not an error: the frame is in the state for later viewers.
            let _ = self.tx.send(frame);
        }
        sent
    }

    fn is_terminal(&self) -> bool {
        self.state.lock().terminal().is_some()
    }
}

/// A batch the hub decodes and applies on its own task: at most this many bytes, both
/// compressed and as its frame header declares them decompressed (a tick of a run's
/// output: tens of microseconds). A larger one, or one that does not declare its size,
/// goes to the blocking pool. Handing every batch there made the hub, woken from the
/// pool, wait behind all the viewers its previous frame had woken (when the hubs still
/// shared the viewers' runtime): with 10 000 viewers of a run it fell seconds behind
/// the stream (`athanor_gateway_batch_broadcast_delay_seconds`, in BENCHMARKS.md). On
/// the follower's one thread a small batch is still cheaper decoded in place.
const INLINE_DECODE: (usize, u64) = (16 << 10, 256 << 10);

/// Follows the run's subject until the run ends, the hub idles, or shutdown.
async fn follow(hubs: Arc<Hubs>, hub: Arc<Hub>, start: Option<u64>) {
    let config = &hubs.config;
    let mut messages: Option<consumer::pull::Ordered> = None;
    // When to (re)open the consumer while there is none (NATS unreachable).
    let mut reopen = Box::pin(tokio::time::sleep(Duration::ZERO));
    let mut retries = Backoff::REOPEN.retries();
    let mut position = start;
    let mut idle_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(config.status_poll);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut last_message = Instant::now();
    while !hub.is_terminal() {
        tokio::select! {
            _ = hub.stop.cancelled() => break,
            _ = &mut reopen, if messages.is_none() => {
                match Hubs::consumer(&hubs.follower.js, &hub.run_id, position).await {
                    Ok(m) => {
                        messages = Some(m);
                        retries.reset();
                    }
                    Err(error) => {
                        let retry_in = retries.next_delay();
                        warn!(run_id = %hub.run_id, %error, ?retry_in, "cannot follow the run; retrying");
                        reopen.as_mut().reset(tokio::time::Instant::now() + retry_in);
                    }
                }
            }
            message = async { messages.as_mut().expect("guarded").next().await }, if messages.is_some() => {
                match message {
                    Some(Ok(message)) => {
                        last_message = Instant::now();
                        let mut published = None;
                        if let Ok(info) = message.info() {
                            position = Some(info.stream_sequence + 1);
                            published = Some(info.published.unix_timestamp_nanos());
                        }
                        let (applying, limit) = (hub.clone(), config.decode_limit);
                        let inline = message.payload.len() <= INLINE_DECODE.0
                            && athanor_schemas::codec::declared_size(&message.payload)
                                .is_some_and(|size| size <= INLINE_DECODE.1);
                        let apply = move || match athanor_schemas::decode(&message.payload, limit) {
                            Ok(batch) if batch.run_id == applying.run_id => applying.apply(batch),
                            Ok(_) => 0,
                            // The aggregator dead-letters it; a viewer cannot use it either.
                            Err(error) => {
                                debug!(run_id = %applying.run_id, %error, "undecodable batch skipped");
                                0
                            }
                        };
                        // One batch at a time, so order is kept. A large one is CPU work
                        // for the blocking pool; a small one is applied here.
                        let sent = if inline {
                            apply()
                        } else {
                            tokio::task::spawn_blocking(apply).await.unwrap_or(0)
                        };
                        if let (1.., Some(published)) = (sent, published) {
                            hubs.instruments.broadcast(published);
                        }
                    }
                    Some(Err(error)) => {
                        let retry_in = retries.next_delay();
                        warn!(run_id = %hub.run_id, %error, ?retry_in, "following the run failed; resuming");
                        messages = None;
                        reopen.as_mut().reset(tokio::time::Instant::now() + retry_in);
                    }
                    None => {
                        messages = None;
                        reopen.as_mut().reset(tokio::time::Instant::now());
                    }
                }
            }
            _ = hub.poke.notified() => check_database_on_main(&hubs, &hub).await,
            _ = tick.tick() => {
                if hub.tx.receiver_count() == 0 {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= config.hub_idle {
                        debug!(run_id = %hub.run_id, "hub idle; stopping");
                        break;
                    }
                } else {
                    idle_since = None;
                    // Keeps the cache entry of a watched hub alive.
                    let _ = hubs.cache.get(&hub.run_id).await;
                }
                // Quiet, or stuck behind a batch the stream does not hold.
                if last_message.elapsed() >= config.status_poll || hub.waiting_for_gap() {
                    check_database_on_main(&hubs, &hub).await;
                }
            }
        }
    }
    hub.stop.cancel();
    if !hub.is_terminal() {
        // Not cached any more once stopped: the next viewer (and this hub's viewers,
        // which move on) open a fresh hub.
        hubs.forget(&hub).await;
    }
}

/// [`check_database`] on the gateway's runtime (see [`Hubs::main`]); the hub waits for
/// it, as it would in place.
async fn check_database_on_main(hubs: &Arc<Hubs>, hub: &Arc<Hub>) {
    let (hubs, hub) = (hubs.clone(), hub.clone());
    // A failure is the gateway's runtime shutting down: the hub stops with it.
    let _ = hubs
        .main
        .clone()
        .spawn(async move { check_database(&hubs, &hub).await })
        .await;
}

/// Ends the hub when the database holds a terminal status the stream will not bring:
/// `lost` (its worker vanished), or an end reached without further batches.
async fn check_database(hubs: &Hubs, hub: &Hub) {
    let run = match runs::Entity::find_by_id(hub.run_id.clone())
        .one(&hubs.db)
        .await
    {
        Ok(Some(run)) => run,
        Ok(None) => return,
        Err(error) => {
            debug!(run_id = %hub.run_id, %error, "status check failed");
            return;
        }
    };
    let status = match run_state(&run) {
        Ok(status) => status,
        Err(error) => {
            debug!(run_id = %hub.run_id, %error, "status check failed");
            return;
        }
    };
    let stored = Stored {
        stored: run.last_batch_seq.map_or(0, |b| b as u64 + 1),
        status,
        error: run.error,
        finished_at: run.finished_at,
        final_batches: run.final_batches.map(|n| n as u64),
    };
    let mut state = hub.state.lock();
    match state.check(stored) {
        Checked::Nothing => {}
        Checked::Reopen { missing, stored } => {
            // The database holds a batch this hub could not read from the stream: start
            // again from the database (viewers move to the new hub, resyncing if needed).
            warn!(run_id = %hub.run_id, missing, stored, "hub stuck on a missing batch; reopening");
            hub.stop.cancel();
        }
        // Sent under the lock, like every frame: the frames on a joining viewer's
        // receiver start after the state it joined.
        Checked::Ended(frame) => {
            hub.sent.stamp(&frame);
            let _ = hub.tx.send(frame);
        }
    }
}

/// The run's status as the database holds it (the same text as [`RunState`]'s JSON);
/// a text that is no state is an error naming the run, not a status passed on.
pub(crate) fn run_state(run: &runs::Model) -> ApiResult<RunState> {
    stored_state(&run.status, &run.id)
}

/// [`run_state`] of a run's `status` column read on its own.
pub(crate) fn stored_state(status: &str, run_id: &str) -> ApiResult<RunState> {
    status.parse().map_err(|e: UnknownRunState| {
        ApiError::Unavailable(format!("the database holds an {e} for run {run_id}"))
    })
}

/// The run as a viewer sees it, from its row.
pub(crate) fn run_view(run: runs::Model) -> ApiResult<RunView> {
    let status = run_state(&run)?;
    let progress = run.progress_at.map(|ts| Progress {
        current: run.progress_current.unwrap_or(0) as u64,
        total: run.progress_total.unwrap_or(0) as u64,
        message: run.progress_message.clone(),
        ts,
    });
    Ok(RunView {
        config: serde_json::from_str(&run.config).unwrap_or(Value::Null),
        id: run.id,
        experiment: run.experiment,
        instance_id: run.instance_id,
        status,
        error: run.error,
        worker_id: run.worker_id,
        created_at: run.created_at,
        started_at: run.started_at,
        finished_at: run.finished_at,
        progress,
        lines: run.lines,
        results: run.results,
        batches: run.batches,
        warning: run.warning,
        waiting: None,
    })
}

pub(crate) fn log_line(line: run_logs::Model) -> LogLine {
    LogLine {
        seq: line.seq as u64,
        ts: line.ts,
        level: serde_json::from_value(Value::String(line.level)).unwrap_or(Level::Info),
        message: line.message,
        metadata: line.metadata.and_then(|m| serde_json::from_str(&m).ok()),
    }
}
