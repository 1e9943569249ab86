//! Server-Sent Events: a run's live feed (`/api/runs/{id}/events`) and the lifecycle
//! feed of all runs (`/api/events`). Event shapes are in `athanor_schemas::events`.
//!
//! A viewer sends a `snapshot` and then the hub's frames; a viewer resuming with
//! `Last-Event-ID: n` gets batches `n..` instead — replayed from JetStream when the hub
//! is past `n` (after a reconnect to another gateway, or a restart), then the hub's
//! frames. A viewer that lags — past the hub's bounded channel, or more than
//! `max_viewer_lag` or `max_viewer_lag_bytes` behind the newest frame — is sent `resync`
//! and a fresh snapshot, and goes on live from there. Every feed ends on the run's
//! `status`, or when the gateway stops. Feeds are compressed (zstd or gzip) when the
//! client accepts it, each frame compressed once for all viewers (`hub::frame`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer;
use athanor_schemas::events;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::api::AppStateRef;
use crate::error::{ApiError, ApiResult};
use crate::hub::{Encoding, Frame, GzipStream, Hub, Hubs, Joined};

/// How long a catch-up waits for the next batch before giving up and resyncing.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct FeedQuery {
    /// The same as the Last-Event-ID header, for clients that cannot set headers.
    #[param(pattern = "^([0-9]{1,19})?$")]
    last_event_id: Option<String>,
    /// A feed token (when the gateway protects reads; checked by `auth.rs`).
    #[allow(dead_code)]
    token: Option<String>,
}

/// The response header giving the keep-alive interval in milliseconds (0: none).
pub(crate) const KEEP_ALIVE_HEADER: &str = "athanor-keep-alive-ms";

/// Most bytes joined into one write when a viewer finds several frames waiting.
const MAX_WRITE: usize = 64 << 10;

/// An SSE response of `frames` (see [`Writes`]), compressed as `accept` (the request's
/// `Accept-Encoding`) allows.
fn sse_response(
    frames: impl Stream<Item = Arc<Frame>> + Send + 'static,
    hubs: &Arc<Hubs>,
    accept: &HeaderMap,
) -> Response {
    let keep_alive = hubs.config.keep_alive;
    let counted = hubs.clone();
    let frames = frames.inspect(move |frame| counted.instruments.sent(frame));
    let encoding = Encoding::negotiate(
        accept
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let body =
        Body::from_stream(Writes::new(frames, keep_alive, encoding).map(Ok::<_, Infallible>));
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::VARY, "accept-encoding"),
        ],
        body,
    )
        .into_response();
    // How often a live connection writes at least a comment: silence for much longer
    // means it is gone (the web UI reconnects after twice this).
    response.headers_mut().insert(
        header::HeaderName::from_static(KEEP_ALIVE_HEADER),
        header::HeaderValue::from(keep_alive.as_millis() as u64),
    );
    if let Some(coding) = encoding.header() {
        response.headers_mut().insert(
            header::CONTENT_ENCODING,
            header::HeaderValue::from_static(coding),
        );
    }
    response
}

/// The writes of one SSE response. A frame that is alone is written as the hub encoded
/// (or compressed) it: a reference count, not a copy. Frames already waiting when the
/// connection is ready — a viewer that fell behind — are copied into one write of at
/// most [`MAX_WRITE`] bytes: one chunk and one poll for all of them. Compressed, each
/// frame is its shared piece (`hub::frame`); a gzip stream gets its header first and
/// its trailer when the frames end.
///
/// After `interval` without a write it sends a comment (`:`), so that proxies and
/// clients see a live connection (a zero interval sends none). A write only notes the
/// time: the timer is re-armed once per interval, not on every frame (ten thousand
/// viewers at ten frames a second).
struct Writes<S> {
    frames: Pin<Box<S>>,
    /// A frame that did not fit in the previous write.
    held: Option<Arc<Frame>>,
    ended: bool,
    encoding: Encoding,
    /// The gzip stream, until its trailer is written.
    gzip: Option<GzipStream>,
    interval: Duration,
    last_write: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Writes<S> {
    fn new(frames: S, interval: Duration, encoding: Encoding) -> Self {
        Writes {
            frames: Box::pin(frames),
            held: None,
            ended: false,
            encoding,
            gzip: (encoding == Encoding::Gzip).then(GzipStream::default),
            interval,
            last_write: tokio::time::Instant::now(),
            timer: Box::pin(tokio::time::sleep(interval)),
        }
    }

    /// `frame` as this connection writes it.
    fn piece(&mut self, frame: &Frame) -> Bytes {
        match &mut self.gzip {
            Some(gzip) => gzip.piece(frame),
            None => frame.encoded(self.encoding).clone(),
        }
    }
}

impl<S: Stream<Item = Arc<Frame>>> Writes<S> {
    /// The next frame if one is ready; `Ready(None)` once the frames have ended.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Frame>>> {
        if let Some(frame) = self.held.take() {
            return Poll::Ready(Some(frame));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let next = self.frames.as_mut().poll_next(cx);
        self.ended = matches!(next, Poll::Ready(None));
        next
    }

    /// `first` and the frames waiting behind it, up to `MAX_WRITE` bytes.
    fn join_waiting(&mut self, cx: &mut Context<'_>, first: Arc<Frame>) -> Bytes {
        let first = self.piece(&first);
        let mut joined: Option<BytesMut> = None;
        while let Poll::Ready(Some(frame)) = self.poll_frame(cx) {
            let size = joined.as_ref().map_or(first.len(), |j| j.len());
            if size + frame.encoded(self.encoding).len() > MAX_WRITE {
                self.held = Some(frame);
                break;
            }
            let piece = self.piece(&frame);
            joined
                .get_or_insert_with(|| BytesMut::from(&first[..]))
                .extend_from_slice(&piece);
        }
        joined.map_or(first, BytesMut::freeze)
    }
}

impl<S: Stream<Item = Arc<Frame>>> Stream for Writes<S> {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match self.poll_frame(cx) {
            Poll::Ready(Some(first)) => {
                let write = self.join_waiting(cx, first);
                self.last_write = tokio::time::Instant::now();
                return Poll::Ready(Some(write));
            }
            Poll::Ready(None) => return Poll::Ready(self.gzip.take().map(GzipStream::finish)),
            Poll::Pending if self.interval.is_zero() => return Poll::Pending,
            Poll::Pending => {}
        }
        loop {
            futures::ready!(self.timer.as_mut().poll(cx));
            let due = self.last_write + self.interval;
            if due > tokio::time::Instant::now() {
                // Written to since the timer was set: wait for the rest of the interval.
                self.timer.as_mut().reset(due);
                continue;
            }
            self.last_write = tokio::time::Instant::now();
            let next = self.last_write + self.interval;
            self.timer.as_mut().reset(next);
            return Poll::Ready(Some(self.piece(&Frame::keep_alive())));
        }
    }
}

/// SSE: the run's live feed: `snapshot`, then `batch` events in order, `resync` + `snapshot` when the viewer fell behind, `status` last. `id` is the batch watermark.
///
/// Reconnecting with `Last-Event-ID: n` (or `?last_event_id=n`) continues at batch `n`,
/// on any gateway, with no gap and no duplicate. Keep-alive comments keep the
/// connection open; the stream ends after `status`.
#[utoipa::path(get, path = "/api/runs/{id}/events", tag = "feeds",
    params(
        crate::api::RunId,
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = "^([0-9]{1,19})?$",
            description = "Resume: the batch watermark (`id`) of the last event received"),
        FeedQuery,
    ),
    responses(
        (status = 200, description = "text/event-stream of Snapshot, BatchEvent, Resync and StatusEvent",
            content_type = "text/event-stream", body = crate::openapi::RunFeedEvent),
        (status = 400, description = "Last-Event-ID is not a watermark of this feed, or an unknown parameter", body = crate::error::ErrorBody),
        (status = 404, description = "No such run", body = crate::error::ErrorBody),
        (status = 503, description = "The database or NATS is unavailable, or every live feed is taken (`gateway.max_viewers`; see `Retry-After`)", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn run_events(
    State(state): AppStateRef,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let watermark = |v: String| {
        v.trim().parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "Last-Event-ID {v:?} is not a batch watermark (a whole number from this feed's `id:` fields)"
            ))
        })
    };
    // Both are checked when both are given; the header wins.
    let from_query = query
        .last_event_id
        .filter(|v| !v.is_empty())
        .map(watermark)
        .transpose()?;
    let from_header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .filter(|v| !v.is_empty())
        .map(watermark)
        .transpose()?;
    let have = from_header.or(from_query);
    let hubs = state.hubs.clone();
    let slot = hubs.admit()?;
    let hub = hubs.get(&id).await?;
    if let (Some(have), Some(batches)) = (have, hub.ended_with()) {
        if have > batches {
            return Err(ApiError::BadRequest(format!(
                "Last-Event-ID {have} is beyond the end of run {id}, which has {batches} batches"
            )));
        }
    }
    let viewer = Viewer::new(hubs.clone(), hub, have);
    // The slot lives as long as the feed.
    let frames = futures::stream::unfold((viewer, slot), |(mut viewer, slot)| async move {
        let frame = viewer.next().await?;
        Some((frame, (viewer, slot)))
    });
    Ok(sse_response(frames, &hubs, &headers))
}

/// One viewer of a run's feed.
struct Viewer {
    hubs: Arc<Hubs>,
    hub: Arc<Hub>,
    rx: broadcast::Receiver<Arc<Frame>>,
    /// The hub's stop (also the gateway's: a hub's token is a child of it), waited on
    /// across frames rather than registered afresh for each one.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Batches this viewer holds: `0..have`.
    have: u64,
    /// Frames to send before anything else.
    queue: VecDeque<Arc<Frame>>,
    /// Replaying batches `have..target` from JetStream.
    catch_up: Option<CatchUp>,
    /// The run's `status` frame when it ended before this viewer caught up.
    terminal: Option<Arc<Frame>>,
    done: bool,
}

struct CatchUp {
    target: u64,
    messages: Option<consumer::pull::Ordered>,
}

impl CatchUp {
    /// A catch-up from `have` to a hub at `next`, when the hub is past the viewer.
    fn needed(have: u64, next: u64) -> Option<CatchUp> {
        (have < next).then_some(CatchUp {
            target: next,
            messages: None,
        })
    }
}

impl Viewer {
    fn new(hubs: Arc<Hubs>, hub: Arc<Hub>, have: Option<u64>) -> Self {
        let (joined, snapshot) = match have {
            Some(_) => (hub.join(), None),
            None => {
                let (joined, snapshot) = hub.join_with_snapshot();
                (joined, Some(snapshot))
            }
        };
        let have = have.unwrap_or(joined.next);
        Viewer {
            hubs,
            stopped: Box::pin(hub.stop.clone().cancelled_owned()),
            hub,
            catch_up: CatchUp::needed(have, joined.next),
            rx: joined.rx,
            have,
            queue: snapshot.into_iter().collect(),
            terminal: joined.terminal,
            done: false,
        }
    }

    /// The hub stopped without an end for this viewer (idle, stuck, replaced): carry
    /// on with the run's current hub.
    async fn move_hub(&mut self) -> bool {
        match self.hubs.get(&self.hub.run_id).await {
            Ok(hub) if !Arc::ptr_eq(&hub, &self.hub) && !self.hubs.shutdown.is_cancelled() => {
                let Joined { rx, next, terminal } = hub.join();
                self.stopped = Box::pin(hub.stop.clone().cancelled_owned());
                self.hub = hub;
                self.rx = rx;
                self.terminal = terminal;
                self.catch_up = CatchUp::needed(self.have, next);
                true
            }
            _ => false,
        }
    }

    /// Why this viewer should skip ahead rather than send `frame`, the oldest it has not
    /// sent: newer frames are waiting, and `frame` was made longer ago than
    /// `max_viewer_lag` or that many bytes were sent after it. (A slow link or a stalled
    /// page holds up only its own connection; without this it would work through
    /// minutes of old lines before showing the present.)
    fn behind(&self, frame: &Frame) -> Option<String> {
        if self.rx.is_empty() {
            return None;
        }
        let config = &self.hubs.config;
        let age = frame.at.elapsed();
        let bytes = self.hub.sent.after(frame);
        (age > config.max_viewer_lag || bytes > config.max_viewer_lag_bytes).then(|| {
            format!(
                "this viewer fell {:.1} s and {bytes} bytes behind",
                age.as_secs_f64()
            )
        })
    }

    /// Replaces this viewer's place with a fresh snapshot.
    fn resync(&mut self, reason: &str) {
        let (joined, snapshot) = self.hub.join_with_snapshot();
        self.rx = joined.rx;
        self.have = joined.next;
        self.terminal = joined.terminal;
        self.catch_up = None;
        self.queue.clear();
        self.queue.push_back(Frame::resync(reason));
        self.queue.push_back(snapshot);
    }

    async fn next(&mut self) -> Option<Arc<Frame>> {
        loop {
            if let Some(frame) = self.queue.pop_front() {
                if frame.event == events::STATUS {
                    self.done = true;
                }
                return Some(frame);
            }
            if self.done || self.hubs.shutdown.is_cancelled() {
                return None;
            }
            if self.catch_up.is_some() {
                // Boxed: the rare paths would otherwise size every viewer's future.
                if let Some(frame) = Box::pin(self.catch_up_next()).await {
                    return Some(frame);
                }
                continue;
            }
            if let Some(terminal) = self.terminal.take() {
                self.queue.push_back(terminal);
                continue;
            }
            tokio::select! {
                biased;
                received = self.rx.recv() => match received {
                    Ok(frame) => match frame.event {
                        events::BATCH => {
                            let id = frame.id.unwrap_or(0);
                            if id <= self.have {
                                continue;
                            }
                            if id == self.have + 1 {
                                if let Some(behind) = self.behind(&frame) {
                                    self.resync(&behind);
                                    continue;
                                }
                                self.have = id;
                                return Some(frame);
                            }
                            self.resync("batches missing from the stream");
                        }
                        _ => self.queue.push_back(frame),
                    },
                    Err(RecvError::Lagged(missed)) => {
                        self.resync(&format!("this viewer fell {missed} events behind"));
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = &mut self.stopped => {
                    if self.hubs.shutdown.is_cancelled() || !Box::pin(self.move_hub()).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The next batch of the catch-up, or `None` when it finished or failed (then the
    /// viewer is resynced).
    async fn catch_up_next(&mut self) -> Option<Arc<Frame>> {
        let run_id = self.hub.run_id.clone();
        let catch_up = self.catch_up.as_mut().expect("catching up");
        if self.have >= catch_up.target {
            self.catch_up = None;
            return None;
        }
        if catch_up.messages.is_none() {
            let opened = match self.hubs.resume_point(&run_id, self.have).await {
                Ok(start) => Hubs::consumer(&self.hubs.js, &run_id, start).await,
                Err(e) => Err(e.to_string()),
            };
            match opened {
                Ok(messages) => catch_up.messages = Some(messages),
                Err(error) => {
                    self.resync(&format!("cannot replay the missed batches: {error}"));
                    return None;
                }
            }
        }
        let messages = catch_up.messages.as_mut().expect("opened above");
        loop {
            let message = tokio::select! {
                _ = self.hubs.shutdown.cancelled() => return None,
                m = tokio::time::timeout(CATCH_UP_WAIT, messages.next()) => m,
            };
            let payload = match message {
                Ok(Some(Ok(message))) => message.payload.clone(),
                _ => {
                    self.resync("the missed batches are not in the stream any more");
                    return None;
                }
            };
            // CPU work (decompress, parse, encode the frame): off the async threads.
            let (limit, have) = (self.hubs.config.decode_limit, self.have);
            let decoded = tokio::task::spawn_blocking(move || {
                let batch = athanor_schemas::decode(&payload, limit).ok()?;
                let frame = (batch.batch_seq == have).then(|| Frame::batch(&batch));
                Some((batch.batch_seq, frame))
            })
            .await
            .ok()
            .flatten();
            let Some((batch_seq, frame)) = decoded else {
                continue;
            };
            if batch_seq < self.have {
                continue;
            }
            let Some(frame) = frame else {
                self.resync("the missed batches are not in the stream any more");
                return None;
            };
            self.have += 1;
            return Some(frame);
        }
    }
}

/// SSE: lifecycle changes of all runs (`run` events carrying a Lifecycle; `resync` when changes were missed).
///
/// Relayed from `athanor.lifecycle.*`. A client that lags gets `resync` and should
/// reload its list.
#[utoipa::path(get, path = "/api/events", tag = "feeds",
    params(("token" = Option<String>, Query, description = "A feed token (when the gateway protects reads)")),
    responses(
        (status = 200, description = "text/event-stream of Lifecycle and Resync",
            content_type = "text/event-stream", body = crate::openapi::LifecycleFeedEvent),
        (status = 503, description = "Every live feed is taken (`gateway.max_viewers`; see `Retry-After`)", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn lifecycle_events(
    State(state): AppStateRef,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let slot = state.hubs.admit()?;
    let rx = state.lifecycle.subscribe();
    let shutdown = state.hubs.shutdown.clone();
    let stream = futures::stream::unfold((rx, slot), |(mut rx, slot)| async move {
        let frame = match rx.recv().await {
            Ok(frame) => frame,
            Err(RecvError::Lagged(missed)) => {
                Frame::resync(&format!("{missed} changes missed; reload the list"))
            }
            Err(RecvError::Closed) => return None,
        };
        Some((frame, (rx, slot)))
    })
    .take_until(shutdown.cancelled_owned());
    Ok(sse_response(stream, &state.hubs, &headers))
}

/// Relays `athanor.lifecycle.*` into `tx` until shutdown, and pokes the hub of a run
/// announced terminal (so `lost` reaches its viewers at once).
pub(crate) async fn relay_lifecycle(
    hubs: Arc<Hubs>,
    mut subscriber: async_nats::Subscriber,
    tx: broadcast::Sender<Arc<Frame>>,
) {
    loop {
        let message = tokio::select! {
            _ = hubs.shutdown.cancelled() => return,
            m = subscriber.next() => match m {
                Some(m) => m,
                None => return,
            },
        };
        let Ok(change) = serde_json::from_slice::<events::Lifecycle>(&message.payload) else {
            continue;
        };
        if change.status.is_terminal() {
            hubs.poke(&change.run_id).await;
        }
        let _ = tx.send(Frame::new(events::RUN, None, &change));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u64, bytes: usize) -> Arc<Frame> {
        Frame::new(events::BATCH, Some(n), &"x".repeat(bytes))
    }

    fn concat(frames: &[Arc<Frame>]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.wire.to_vec()).collect()
    }

    async fn writes(frames: Vec<Arc<Frame>>) -> Vec<Bytes> {
        let stream = futures::stream::iter(frames);
        Writes::new(stream, Duration::from_secs(15), Encoding::Identity)
            .collect()
            .await
    }

    #[tokio::test]
    async fn frames_waiting_together_go_out_in_one_write_in_order() {
        let frames: Vec<_> = (1..=3).map(|n| frame(n, 10)).collect();
        let out = writes(frames.clone()).await;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].to_vec(), concat(&frames));
        assert!(out[0].starts_with(b"event: batch\nid: 1\ndata: \"xxxxxxxxxx\"\n\n"));
    }

    #[tokio::test]
    async fn a_frame_alone_is_written_as_encoded_without_a_copy() {
        let one = frame(7, 100);
        let out = writes(vec![one.clone()]).await;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ptr(), one.wire.as_ptr());
    }

    #[tokio::test]
    async fn a_joined_write_holds_at_most_max_write_bytes_and_loses_nothing() {
        // 40 KiB frames: two do not fit in one write.
        let big: Vec<_> = (1..=3).map(|n| frame(n, 40 << 10)).collect();
        let out = writes(big.clone()).await;
        assert_eq!(out.len(), 3);
        assert_eq!(out.concat(), concat(&big));
        // 1 000 frames of one size: as many in each write as fit, in order.
        let small: Vec<_> = (0..1000).map(|_| frame(1, 1000)).collect();
        let per_write = MAX_WRITE / small[0].wire.len();
        let out = writes(small.clone()).await;
        assert_eq!(out.len(), 1000usize.div_ceil(per_write));
        assert!(out[..out.len() - 1]
            .iter()
            .all(|w| w.len() == per_write * small[0].wire.len()));
        assert_eq!(out.concat(), concat(&small));
    }

    #[tokio::test]
    async fn a_silent_feed_gets_a_comment_per_interval_and_none_when_zero() {
        let silent = futures::stream::pending::<Arc<Frame>>();
        let mut feed = Writes::new(silent, Duration::from_millis(50), Encoding::Identity);
        for _ in 0..2 {
            let comment = tokio::time::timeout(Duration::from_secs(10), feed.next()).await;
            assert_eq!(comment.unwrap().unwrap(), Bytes::from_static(b":\n\n"));
        }
        let silent = futures::stream::pending::<Arc<Frame>>();
        let mut feed = Writes::new(silent, Duration::ZERO, Encoding::Identity);
        let nothing = tokio::time::timeout(Duration::from_millis(300), feed.next()).await;
        assert!(nothing.is_err(), "no keep-alive with a zero interval");
    }

    /// A compressed feed is the same bytes: frames joined or alone, keep-alives, and
    /// the end (gzip's trailer, checked by the decoder).
    #[tokio::test]
    async fn a_compressed_feed_decodes_to_the_plain_one() {
        use std::io::Read;
        let mut frames: Vec<_> = (1..=3).map(|n| frame(n, 40 << 10)).collect();
        frames.extend((4..=50).map(|n| frame(n, 100)));
        let plain = concat(&frames);
        let keep_alive = Frame::keep_alive();
        for encoding in [Encoding::Gzip, Encoding::Zstd] {
            // A pause after the first frames, long enough for a keep-alive.
            let (first, rest) = frames.split_at(10);
            let stream = futures::stream::iter(first.to_vec()).chain(
                futures::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(120)).await;
                    futures::stream::iter(rest.to_vec())
                })
                .flatten(),
            );
            let out: Vec<Bytes> = Writes::new(stream, Duration::from_millis(50), encoding)
                .collect()
                .await;
            let body = out.concat();
            let mut decoded = Vec::new();
            match encoding {
                Encoding::Gzip => {
                    flate2::read::GzDecoder::new(&body[..])
                        .read_to_end(&mut decoded)
                        .unwrap();
                }
                _ => decoded = zstd::stream::decode_all(&body[..]).unwrap(),
            }
            let text = String::from_utf8(decoded).unwrap();
            assert!(
                text.contains(":\n\n"),
                "{encoding:?}: a keep-alive was sent"
            );
            assert_eq!(
                text.replace(std::str::from_utf8(&keep_alive.wire).unwrap(), ""),
                String::from_utf8(plain.clone()).unwrap(),
                "{encoding:?}"
            );
            assert!(
                body.len() * 5 < plain.len(),
                "{encoding:?}: {} of {}",
                body.len(),
                plain.len()
            );
        }
    }
}
