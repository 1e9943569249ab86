//! The process's Prometheus metrics: one recorder for every component the process runs
//! (so `athanor up` shows the worker's, the aggregator's and the gateway's on one page),
//! rendered in the Prometheus text format, and the endpoint `athanor worker` and
//! `athanor aggregator` serve it on (`--metrics-addr`; the gateway serves `/metrics`
//! itself).
//!
//! Components record through the `metrics` macros. Counters a component already keeps
//! for its tests and benchmarks (`PublishStats`, `AggregatorStats`) and gauges of its
//! state (pending bytes, viewers) are copied in by an exporter registered with
//! [`export_on_render`], just before each render: nothing is counted twice and `log()`
//! pays nothing.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds of histograms in seconds: 1 ms to 30 s.
const SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bucket bounds of histograms that count things (lines, batches of a transaction).
const COUNTS: [f64; 8] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];

/// How often recorded histogram samples are folded into their buckets when nobody
/// scrapes (they are kept until then).
const UPKEEP: Duration = Duration::from_secs(5);

struct Recorder {
    handle: PrometheusHandle,
    /// Called before each render, in registration order; dropped with their state.
    exporters: Mutex<Vec<Box<dyn Fn() -> bool + Send + Sync>>>,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

/// Installs the process's recorder (once; later calls return it). Every component calls
/// this before it creates its instruments: a handle taken before any recorder is
/// installed records nothing.
fn recorder() -> &'static Recorder {
    RECORDER.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_lines".into()), &COUNTS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batches".into()), &COUNTS))
            .expect("the bucket bounds are constants, not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            // Someone else (an embedding program) installed one: ours renders nothing.
            tracing::warn!(%error, "another metrics recorder is installed; /metrics shows none of Athanor's");
        }
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP);
                upkeep.run_upkeep();
            });
        Recorder {
            handle,
            exporters: Mutex::new(Vec::new()),
        }
    })
}

/// Makes sure the process records metrics. Idempotent and cheap after the first call.
pub fn install() {
    recorder();
}

/// Registers `export` to run on `state` before each render, for as long as `state`
/// lives elsewhere (it holds only a weak reference).
pub fn export_on_render<T: Send + Sync + 'static>(state: &Arc<T>, export: fn(&T)) {
    let state: Weak<T> = Arc::downgrade(state);
    recorder()
        .exporters
        .lock()
        .push(Box::new(move || match state.upgrade() {
            Some(state) => {
                export(&state);
                true
            }
            None => false,
        }));
}

/// Every metric of the process in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    let recorder = recorder();
    recorder.exporters.lock().retain(|export| export());
    recorder.handle.run_upkeep();
    recorder.handle.render()
}

/// Serves [`render`] at `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, shutdown: CancellationToken) {
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()) }),
    );
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "serving Prometheus metrics at /metrics");
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "the metrics endpoint stopped");
    }
}
