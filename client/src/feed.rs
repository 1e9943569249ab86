//! A run's live feed (`/api/runs/{id}/events`): one connection ([`EventStream`]), and
//! the feed to its end across reconnections ([`Follower`]).

use std::collections::VecDeque;
use std::time::Duration;

use athanor_schemas::events::{self, BatchEvent, Snapshot, StatusEvent};
use reqwest::Response;

use crate::sse::{SseDecoder, SseEvent};
use crate::{refusal, segment, ClientError, ClientResult};

/// One event of a run's feed, with its `id:` (the batch watermark it brings the viewer
/// to).
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    pub id: Option<u64>,
    pub data: FeedData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FeedData {
    Snapshot(Box<Snapshot>),
    Batch(BatchEvent),
    /// The viewer fell behind; a snapshot follows.
    Resync,
    /// The run's end; the stream ends after it.
    Status(StatusEvent),
    /// An event this client does not know (a newer gateway's).
    Other(SseEvent),
}

impl FeedEvent {
    /// Reads a decoded SSE event of a run's feed.
    pub fn from_sse(event: SseEvent) -> ClientResult<Self> {
        let id = match event.id.as_deref() {
            None => None,
            Some(id) => Some(id.parse::<u64>().map_err(|_| {
                ClientError::Protocol(format!("event id {id:?} is not a batch watermark"))
            })?),
        };
        let data = match event.event.as_str() {
            events::SNAPSHOT => FeedData::Snapshot(Box::new(parse(&event.data)?)),
            events::BATCH => FeedData::Batch(parse(&event.data)?),
            events::RESYNC => FeedData::Resync,
            events::STATUS => FeedData::Status(parse(&event.data)?),
            _ => FeedData::Other(event),
        };
        Ok(FeedEvent { id, data })
    }
}

fn parse<T: serde::de::DeserializeOwned>(data: &str) -> ClientResult<T> {
    serde_json::from_str(data)
        .map_err(|e| ClientError::Unexpected(format!("a feed event that does not parse: {e}")))
}

/// One connection to a run's feed, decoded as it arrives. Keep-alive comments are
/// skipped; [`next`](Self::next) is `None` when the server ends the stream.
pub struct EventStream {
    response: Response,
    decoder: SseDecoder,
    queue: VecDeque<SseEvent>,
    base: String,
}

impl EventStream {
    /// Opens the SSE stream at `path` (a run's feed, `/api/events`, …) on `base`.
    pub(crate) async fn open(
        http: &reqwest::Client,
        base: &str,
        path: &str,
        have: Option<u64>,
    ) -> ClientResult<Self> {
        let mut request = http.get(format!("{base}{path}"));
        if let Some(have) = have {
            request = request.header("Last-Event-ID", have.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: base.into(),
                source,
            })?;
        if !response.status().is_success() {
            return Err(refusal(response).await);
        }
        Ok(EventStream {
            response,
            decoder: SseDecoder::new(),
            queue: VecDeque::new(),
            base: base.into(),
        })
    }

    /// The response's headers (content type, caching).
    pub fn headers(&self) -> &reqwest::header::HeaderMap {
        self.response.headers()
    }

    /// The next event as sent, `None` at the end of the stream.
    pub async fn next_raw(&mut self) -> ClientResult<Option<SseEvent>> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            let chunk = self.response.chunk().await.map_err(|e| ClientError::Lost {
                base: self.base.clone(),
                reason: e.to_string(),
            })?;
            match chunk {
                Some(chunk) => self.queue.extend(self.decoder.push(&chunk)),
                None => return Ok(None),
            }
        }
    }

    /// The next event, `None` at the end of the stream.
    pub async fn next(&mut self) -> ClientResult<Option<FeedEvent>> {
        match self.next_raw().await? {
            Some(event) => FeedEvent::from_sse(event).map(Some),
            None => Ok(None),
        }
    }
}

/// The path of a run's feed.
pub(crate) fn run_feed(run_id: &str) -> String {
    format!("/api/runs/{}/events", segment(run_id))
}

/// A run's feed from its first snapshot to its status, whatever happens to the
/// connection: when it drops, ends early or stays silent for twice the server's
/// keep-alive and more, the follower reconnects (to the next gateway, if it was given
/// several) with `Last-Event-ID` and goes on from the batch it holds. Gives up after
/// `max_failures` failed tries in a row; a refusal (4xx) ends it at once.
pub struct Follower {
    http: reqwest::Client,
    bases: Vec<String>,
    which: usize,
    run_id: String,
    have: Option<u64>,
    stream: Option<EventStream>,
    silence: Duration,
    failures: u32,
    max_failures: u32,
    reconnects: u32,
    done: bool,
}

impl Follower {
    pub(crate) fn new(http: reqwest::Client, bases: Vec<String>, run_id: &str) -> Self {
        Follower {
            http,
            bases,
            which: 0,
            run_id: run_id.into(),
            have: None,
            stream: None,
            silence: Duration::from_secs(45),
            failures: 0,
            max_failures: 30,
            reconnects: 0,
            done: false,
        }
    }

    /// How long a connection may stay silent before it counts as dropped (default
    /// 45 s: three of the server's 15 s keep-alives).
    pub fn silence(mut self, silence: Duration) -> Self {
        self.silence = silence;
        self
    }

    /// Failed tries in a row before giving up (default 30).
    pub fn max_failures(mut self, n: u32) -> Self {
        self.max_failures = n;
        self
    }

    /// The batch watermark held: batches `0..n`.
    pub fn watermark(&self) -> Option<u64> {
        self.have
    }

    /// Connections that broke and were made again.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    /// The next event; `None` after the status.
    pub async fn next(&mut self) -> ClientResult<Option<FeedEvent>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some(stream) = self.stream.as_mut() else {
                if self.failures > 0 {
                    tokio::time::sleep(backoff(self.failures)).await;
                }
                let base = &self.bases[self.which];
                let path = run_feed(&self.run_id);
                match EventStream::open(&self.http, base, &path, self.have).await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e) if e.status().is_some_and(|s| s.is_client_error()) => return Err(e),
                    Err(e) => self.failed(e.to_string())?,
                }
                continue;
            };
            let reason = match tokio::time::timeout(self.silence, stream.next()).await {
                Ok(Ok(Some(event))) => {
                    self.failures = 0;
                    if let Some(id) = event.id {
                        self.have = Some(id);
                    }
                    self.done = matches!(event.data, FeedData::Status(_));
                    return Ok(Some(event));
                }
                Ok(Ok(None)) => "the stream ended before the run's status".to_string(),
                Ok(Err(ClientError::Lost { reason, .. })) => reason,
                Ok(Err(other)) => return Err(other),
                Err(_) => format!("silent for {:?}", self.silence),
            };
            self.stream = None;
            self.failed(reason)?;
        }
    }

    fn failed(&mut self, reason: String) -> ClientResult<()> {
        self.failures += 1;
        self.reconnects += 1;
        let base = self.bases[self.which].clone();
        self.which = (self.which + 1).min(self.bases.len() - 1);
        if self.failures > self.max_failures {
            return Err(ClientError::Lost { base, reason });
        }
        Ok(())
    }
}

/// 250 ms more per failure in a row, at most 2 s, each between half and all of that
/// (so viewers dropped together do not come back together).
fn backoff(failures: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = 250 * u64::from(failures.min(8));
    // A random number from std: every RandomState is seeded afresh.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(ceiling / 2 + random % (ceiling / 2 + 1))
}
