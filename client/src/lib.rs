//! A client of an Athanor gateway, for programs: typed calls to the HTTP API
//! ([`Client`]), a run's live feed that resumes with `Last-Event-ID` when the connection
//! drops ([`Follower`]), and the fold of that feed into the run's state ([`RunFold`]).
//! The `athanor` CLI, the tests and the benchmarks use it; so can any Rust program.

mod feed;
mod fold;
pub mod sse;

use std::ops::Range;
use std::time::Duration;

use athanor_schemas::api::{
    CancelRequested, CompareQuery, ConfigToCheck, CreateRun, ErrorBody, Experiment, ExperimentList,
    Instance, InstanceChange, InstanceList, LogPage, LogQuery, MetricComparison, MetricList,
    NewInstance, ResultList, RunCreated, RunDeleted, RunFilter, RunList, RunOverrides, RunSeries,
    SeriesQuery, ValidConfig,
};
use athanor_schemas::events::RunView;
use athanor_schemas::LogLine;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use feed::{EventStream, FeedData, FeedEvent, Follower};
pub use fold::{RunFold, Update};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the gateway at {base}: {source}")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// The gateway refused the request; `message` is its JSON `error`, and for a config
    /// that does not fit its schema (`422`), `field` and `reason` say how.
    #[error("{message}")]
    Refused {
        status: StatusCode,
        message: String,
        field: Option<String>,
        reason: Option<String>,
    },
    #[error("unexpected answer from the gateway: {0}")]
    Unexpected(String),
    /// A feed event that breaks the feed's rules (order, watermark).
    #[error("the feed broke its rules: {0}")]
    Protocol(String),
    #[error("lost the gateway at {base} ({reason})")]
    Lost { base: String, reason: String },
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

/// A gateway's HTTP API. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// `Authorization` of this client's REST calls, instead of the one it was made with.
    bearer: Option<reqwest::header::HeaderValue>,
}

impl Client {
    /// A client of the gateway at `url` (`http://host:port`), sending `token` as a
    /// bearer token when given. Feeds and answers come compressed (zstd or gzip).
    pub fn new(url: &str, token: Option<&str>) -> ClientResult<Self> {
        Client::with_compression(url, token, true)
    }

    /// As [`new`](Self::new), asking for compressed answers or not.
    pub fn with_compression(
        url: &str,
        token: Option<&str>,
        compressed: bool,
    ) -> ClientResult<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = bearer(token)? {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let base = url.trim_end_matches('/').to_string();
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10));
        if !compressed {
            builder = builder.no_gzip().no_zstd();
        }
        let http = builder.build().map_err(|source| ClientError::Unreachable {
            base: base.clone(),
            source,
        })?;
        Ok(Client {
            base,
            http,
            bearer: None,
        })
    }

    /// The same gateway and connection pool with `token` on its REST calls (none: the
    /// token it was made with): for a server acting for several callers.
    pub fn with_token(&self, token: Option<&str>) -> ClientResult<Self> {
        Ok(Client {
            bearer: bearer(token)?,
            ..self.clone()
        })
    }

    /// The gateway's base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn experiments(&self) -> ClientResult<Vec<Experiment>> {
        let list: ExperimentList = self.get("/api/experiments").await?;
        Ok(list.experiments)
    }

    /// Checks `config` against the experiment's schema without starting anything: the
    /// config with defaults applied, or the `422` naming the field that is wrong.
    pub async fn validate_config(
        &self,
        experiment: &str,
        config: serde_json::Value,
    ) -> ClientResult<ValidConfig> {
        let path = format!("/api/experiments/{}/validate", segment(experiment));
        self.send(Method::POST, &path, Some(&ConfigToCheck { config }))
            .await
    }

    /// Starts a run; the config is checked against the experiment's schema (`422`
    /// naming the field when it does not fit).
    pub async fn start_run(
        &self,
        experiment: &str,
        config: serde_json::Value,
    ) -> ClientResult<RunCreated> {
        let body = CreateRun {
            experiment: experiment.into(),
            config,
        };
        self.send(Method::POST, "/api/runs", Some(&body)).await
    }

    pub async fn runs(&self, filter: &RunFilter) -> ClientResult<RunList> {
        self.json(self.request(Method::GET, "/api/runs").query(filter))
            .await
    }

    pub async fn run(&self, id: &str) -> ClientResult<RunView> {
        self.get(&format!("/api/runs/{}", segment(id))).await
    }

    pub async fn cancel(&self, id: &str) -> ClientResult<CancelRequested> {
        self.send::<(), _>(
            Method::POST,
            &format!("/api/runs/{}/cancel", segment(id)),
            None,
        )
        .await
    }

    /// Deletes a finished run with everything it stored (409 while it is pending or
    /// running).
    pub async fn delete_run(&self, id: &str) -> ClientResult<RunDeleted> {
        self.send::<(), _>(Method::DELETE, &format!("/api/runs/{}", segment(id)), None)
            .await
    }

    /// A page of the run's stored log.
    pub async fn logs(&self, id: &str, query: &LogQuery) -> ClientResult<LogPage> {
        let path = format!("/api/runs/{}/logs", segment(id));
        self.json(self.request(Method::GET, &path).query(query))
            .await
    }

    /// Lines `range` of the run's stored log, in order, paging as needed: all of them,
    /// or fewer when the database has not stored the rest yet.
    pub async fn log_range(&self, id: &str, range: Range<u64>) -> ClientResult<Vec<LogLine>> {
        let mut lines: Vec<LogLine> = Vec::new();
        let mut next = range.start;
        while next < range.end {
            let query = LogQuery {
                after: Some(next as i64 - 1),
                before: Some(range.end as i64),
                limit: Some(10_000),
                ..LogQuery::default()
            };
            let page = self.logs(id, &query).await?;
            let Some(last) = page.lines.last() else {
                break;
            };
            next = last.seq + 1;
            lines.extend(page.lines);
        }
        Ok(lines)
    }

    /// The whole stored log as text, to read chunk by chunk (`Response::chunk`).
    pub async fn log_text(&self, id: &str) -> ClientResult<Response> {
        let path = format!("/api/runs/{}/logs.txt", segment(id));
        self.checked(self.request(Method::GET, &path)).await
    }

    pub async fn results(&self, id: &str) -> ClientResult<ResultList> {
        self.get(&format!("/api/runs/{}/results", segment(id)))
            .await
    }

    /// The run's metrics with their summaries, the most recently updated first.
    pub async fn metrics(&self, id: &str) -> ClientResult<MetricList> {
        self.get(&format!("/api/runs/{}/metrics", segment(id)))
            .await
    }

    /// One metric of a run, downsampled to at most `query.max_points` buckets.
    pub async fn series(
        &self,
        id: &str,
        name: &str,
        query: &SeriesQuery,
    ) -> ClientResult<RunSeries> {
        let path = format!("/api/runs/{}/metrics/{}", segment(id), segment(name));
        self.json(self.request(Method::GET, &path).query(query))
            .await
    }

    /// One metric of several runs side by side.
    pub async fn compare(
        &self,
        name: &str,
        query: &CompareQuery,
    ) -> ClientResult<MetricComparison> {
        let path = format!("/api/metrics/{}", segment(name));
        self.json(self.request(Method::GET, &path).query(query))
            .await
    }

    pub async fn instances(&self, experiment: Option<&str>) -> ClientResult<Vec<Instance>> {
        let mut request = self.request(Method::GET, "/api/instances");
        if let Some(experiment) = experiment {
            request = request.query(&[("experiment", experiment)]);
        }
        let list: InstanceList = self.json(request).await?;
        Ok(list.instances)
    }

    pub async fn instance(&self, id: &str) -> ClientResult<Instance> {
        self.get(&format!("/api/instances/{}", segment(id))).await
    }

    pub async fn create_instance(&self, instance: &NewInstance) -> ClientResult<Instance> {
        self.send(Method::POST, "/api/instances", Some(instance))
            .await
    }

    pub async fn update_instance(
        &self,
        id: &str,
        change: &InstanceChange,
    ) -> ClientResult<Instance> {
        let path = format!("/api/instances/{}", segment(id));
        self.send(Method::PUT, &path, Some(change)).await
    }

    pub async fn delete_instance(&self, id: &str) -> ClientResult<()> {
        let path = format!("/api/instances/{}", segment(id));
        self.checked(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// Starts a run of a saved instance, `overrides` replacing fields of its config.
    pub async fn start_instance(
        &self,
        id: &str,
        overrides: &RunOverrides,
    ) -> ClientResult<RunCreated> {
        let path = format!("/api/instances/{}/runs", segment(id));
        self.send(Method::POST, &path, Some(overrides)).await
    }

    /// One connection to the run's feed, from batch `have` on (`Last-Event-ID`) or from
    /// a snapshot.
    pub async fn events(&self, id: &str, have: Option<u64>) -> ClientResult<EventStream> {
        EventStream::open(&self.http, &self.base, &feed::run_feed(id), have).await
    }

    /// The lifecycle feed (`/api/events`): a `run` event for every run created, started
    /// or ended, on any gateway.
    pub async fn lifecycle(&self) -> ClientResult<EventStream> {
        self.stream("/api/events", None).await
    }

    /// Any of the gateway's SSE streams by path and query (e.g. with a `token` from a
    /// feed-token endpoint), from `Last-Event-ID` `have` when given.
    pub async fn stream(&self, path: &str, have: Option<u64>) -> ClientResult<EventStream> {
        EventStream::open(&self.http, &self.base, path, have).await
    }

    /// The run's feed to its end, reconnecting (with `Last-Event-ID`) when the
    /// connection drops or falls silent.
    pub fn follow(&self, id: &str) -> Follower {
        Follower::new(self.http.clone(), vec![self.base.clone()], id)
    }

    /// As [`follow`](Self::follow), moving on to the next gateway of `others` each time
    /// a connection breaks (and staying on the last).
    pub fn follow_across(&self, id: &str, others: &[String]) -> Follower {
        let mut bases = vec![self.base.clone()];
        bases.extend(others.iter().map(|b| b.trim_end_matches('/').to_string()));
        Follower::new(self.http.clone(), bases, id)
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.bearer {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value.clone()),
            None => request,
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> ClientResult<T> {
        self.json(self.request(Method::GET, path)).await
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> ClientResult<T> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.json(request).await
    }

    async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> ClientResult<T> {
        let response = self.checked(request).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|source| self.unreachable(source))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    /// Sends; a refusal becomes [`ClientError::Refused`] with the gateway's message.
    async fn checked(&self, request: RequestBuilder) -> ClientResult<Response> {
        let response = request
            .send()
            .await
            .map_err(|source| self.unreachable(source))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(refusal(response).await)
        }
    }

    fn unreachable(&self, source: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            base: self.base.clone(),
            source,
        }
    }
}

/// `Authorization: Bearer <token>` for a non-empty token.
fn bearer(token: Option<&str>) -> ClientResult<Option<reqwest::header::HeaderValue>> {
    token
        .filter(|t| !t.is_empty())
        .map(|token| {
            reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::Unexpected("the token holds characters a header cannot".into())
            })
        })
        .transpose()
}

/// The refusal of a request, with the gateway's JSON `error` message.
pub(crate) async fn refusal(response: Response) -> ClientError {
    let status = response.status();
    let body = response
        .json::<ErrorBody>()
        .await
        .unwrap_or_else(|_| ErrorBody::new(format!("the gateway answered {status}")));
    ClientError::Refused {
        status,
        message: body.error,
        field: body.field,
        reason: body.reason,
    }
}

/// `id` as one path segment: percent-encoded (dots too, so `..` stays a name), so no
/// id can reach another route.
pub(crate) fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
