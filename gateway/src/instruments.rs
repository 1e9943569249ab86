//! The gateway's Prometheus metrics (`athanor_gateway_*`) and `GET /metrics`, which
//! renders every metric of the process (in `athanor up`, the worker's and the
//! aggregator's too). Live feeds and hubs are read at each render; events sent and
//! resyncs are counted as frames go to viewers; a batch's way through the gateway is
//! timed in two legs (stream → broadcast, once per stream message; the broadcast frame
//! → a viewer's connection, once per viewer); every HTTP request is counted by its route template
//! (never its path: `/api/runs/{id}`, not a run id) and status.

use std::sync::Arc;
use std::time::Instant;

use athanor_connections::prometheus;
use athanor_schemas::events;
use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};

use crate::hub::{Frame, Hubs};

const VIEWERS: &str = "athanor_gateway_sse_viewers";
const HUBS: &str = "athanor_gateway_hubs";
const EVENTS: &str = "athanor_gateway_sse_events_total";
const RESYNCS: &str = "athanor_gateway_resyncs_total";
const REQUESTS: &str = "athanor_gateway_http_requests_total";
const REQUEST_SECONDS: &str = "athanor_gateway_http_request_duration_seconds";
const BROADCAST_SECONDS: &str = "athanor_gateway_batch_broadcast_delay_seconds";
const QUEUED_SECONDS: &str = "athanor_gateway_sse_queued_seconds";

/// The counters every feed adds to, taken once (a handle is an atomic: no lookup per
/// event).
pub(crate) struct Instruments {
    events: Counter,
    resyncs: Counter,
    broadcast: Histogram,
    queued: Histogram,
}

impl Instruments {
    /// Installs the recorder and describes every gateway metric.
    pub fn new() -> Self {
        prometheus::install();
        describe_gauge!(
            VIEWERS,
            "Live feeds open now (run feeds and the lifecycle feed)."
        );
        describe_gauge!(HUBS, "Runs this gateway follows for its viewers.");
        describe_counter!(
            EVENTS,
            "SSE events handed to viewers (keep-alives not counted)."
        );
        describe_counter!(
            RESYNCS,
            "Viewers that fell behind (or missed batches) and were sent a fresh snapshot."
        );
        describe_counter!(
            REQUESTS,
            "HTTP requests answered, by method, route and status."
        );
        describe_histogram!(
            REQUEST_SECONDS,
            Unit::Seconds,
            "Time to answer an HTTP request (to the response head; a feed's events follow)."
        );
        describe_histogram!(
            BROADCAST_SECONDS,
            Unit::Seconds,
            "From a batch's arrival in ATHANOR_RUNS (its stream timestamp, NATS's clock) to its frame broadcast to the run's viewers on this gateway; one sample per stream message that released frames (a batch held for an earlier one is released, untimed, with the message that fills the gap)."
        );
        describe_histogram!(
            QUEUED_SECONDS,
            Unit::Seconds,
            "From a broadcast batch frame's making (its batch at the hub; a batch held for an earlier one waits here too) to its hand-over to one viewer's connection: how long it waited for that viewer (one sample per viewer and frame)."
        );
        Instruments {
            events: counter!(EVENTS),
            resyncs: counter!(RESYNCS),
            broadcast: histogram!(BROADCAST_SECONDS),
            queued: histogram!(QUEUED_SECONDS),
        }
    }

    /// `frame` goes to a viewer.
    pub fn sent(&self, frame: &Frame) {
        self.events.increment(1);
        if frame.event == events::RESYNC {
            self.resyncs.increment(1);
        } else if frame.event == events::BATCH && frame.was_broadcast() {
            // Not a catch-up frame made for this viewer alone.
            self.queued.record(frame.at.elapsed());
        }
    }

    /// A batch that reached the stream at `published` (ns since the epoch) went to the
    /// viewers now.
    pub fn broadcast(&self, published: i128) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        // Another host's clock may be ahead: no negative delays.
        self.broadcast.record((now - published).max(0) as f64 / 1e9);
    }
}

/// Copies the feeds' state in (before each render).
pub(crate) fn export(hubs: &Hubs) {
    gauge!(VIEWERS).set(hubs.viewers() as f64);
    gauge!(HUBS).set(hubs.count() as f64);
}

/// `GET /metrics`: every metric of this process in the Prometheus text format.
pub(crate) async fn render() -> Response {
    let text = tokio::task::spawn_blocking(prometheus::render)
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], text).into_response()
}

/// Counts and times every request by method, route template and status.
pub(crate) async fn http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    histogram!(REQUEST_SECONDS, "method" => method, "route" => route.clone())
        .record(started.elapsed());
    counter!(REQUESTS, "method" => method, "route" => route, "status" => status).increment(1);
    response
}

/// A request method as a label: the standard ones by name, any other (a client may
/// send any token) as `other`, so labels stay few.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Registers [`export`] for `hubs`.
pub(crate) fn export_feeds(hubs: &Arc<Hubs>) {
    prometheus::export_on_render(hubs, export);
}
