//! API tokens. With `gateway.api_token` set, every write under `/api` (POST, PUT,
//! DELETE) needs `Authorization: Bearer <token>`; with `gateway.protect_reads` too,
//! every read and feed as well. A browser's EventSource cannot send headers, so a
//! client holding the token asks for a short-lived feed token scoped to one run (or to
//! the lifecycle feed) and puts it in the feed's URL (`?token=`). Feed tokens are
//! HMAC-SHA256 signed with a key derived from the API token, so any gateway sharing the
//! configuration accepts them. The UI's files, `/healthz` and `/readyz` stay open.

use std::sync::Arc;
use std::time::Duration;

use athanor_schemas::now_micros;
use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ring::hmac;
use serde::Serialize;

use crate::api::{AppStateRef, RunId};
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

/// Scope of a feed token for `/api/events`.
const LIFECYCLE_SCOPE: &str = "*";

/// What the gateway checks requests against.
pub(crate) struct Auth {
    token: Option<String>,
    protect_reads: bool,
    feed_key: Option<hmac::Key>,
    feed_ttl: Duration,
    /// Listening on loopback without a token: `/api` answers only these `Host` names
    /// (lowercase, no port) and loopback ones.
    hosts: Option<Vec<String>>,
    /// Origins (lowercase, no trailing `/`) whose pages may make changes besides the
    /// gateway's own: `gateway.cors_origins`.
    origins: Vec<String>,
}

impl Auth {
    pub fn new(token: Option<String>, protect_reads: bool, feed_ttl: Duration) -> Self {
        let token = token.filter(|t| !t.is_empty());
        let feed_key = token.as_ref().map(|t| {
            let derived = hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, b"athanor feed token"),
                t.as_bytes(),
            );
            hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
        });
        Auth {
            token,
            protect_reads,
            feed_key,
            feed_ttl,
            hosts: None,
            origins: Vec::new(),
        }
    }

    /// The origins (`gateway.cors_origins`) whose pages may make changes.
    pub fn with_origins(mut self, origins: &[String]) -> Self {
        self.origins = origins
            .iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect();
        self
    }

    /// Checks `Host` when the gateway listens on loopback and has no token: only
    /// loopback names and `allowed` are answered under `/api`.
    pub fn with_hosts(mut self, loopback: bool, allowed: &[String]) -> Self {
        if loopback && self.token.is_none() {
            self.hosts = Some(allowed.iter().map(|h| h.to_ascii_lowercase()).collect());
        }
        self
    }

    fn bearer_ok(&self, request: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time: compare MACs of both rather than the strings.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"athanor token compare");
        let expected = hmac::sign(&key, token.as_bytes());
        hmac::verify(&key, given.as_bytes(), expected.as_ref()).is_ok()
    }

    /// A token for the feed of `scope` (a run id, or `*` for the lifecycle feed).
    fn feed_token(&self, scope: &str) -> Option<(String, i64)> {
        let key = self.feed_key.as_ref()?;
        let expires = now_micros() + self.feed_ttl.as_micros() as i64;
        let body = format!("{scope}.{expires}");
        let tag = hmac::sign(key, body.as_bytes());
        Some((format!("{body}.{}", hex::encode(tag.as_ref())), expires))
    }

    fn feed_token_ok(&self, token: &str, scope: &str) -> bool {
        let Some(key) = &self.feed_key else {
            return false;
        };
        let Some((body, tag)) = token.rsplit_once('.') else {
            return false;
        };
        let Some((token_scope, expires)) = body.rsplit_once('.') else {
            return false;
        };
        let Ok(expires) = expires.parse::<i64>() else {
            return false;
        };
        let Ok(tag) = hex::decode(tag) else {
            return false;
        };
        token_scope == scope
            && expires > now_micros()
            && hmac::verify(key, body.as_bytes(), &tag).is_ok()
    }
}

/// The feed a path is (`Some(scope)`), for feed tokens.
fn feed_scope(path: &str) -> Option<&str> {
    if path == "/api/events" {
        return Some(LIFECYCLE_SCOPE);
    }
    path.strip_prefix("/api/runs/")?.strip_suffix("/events")
}

fn query_token(request: &Request) -> Option<String> {
    request.uri().query()?.split('&').find_map(|pair| {
        let value = pair.strip_prefix("token=")?;
        Some(value.to_string())
    })
}

/// The middleware of `/mcp`: every tool is a call of the API with the caller's token,
/// which the API checks; with `protect_reads`, a caller without the token may not even
/// open a session.
pub(crate) async fn authorize_mcp(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let auth = &state.auth;
    if auth.protect_reads && !auth.bearer_ok(&request) {
        return unauthorized("this gateway requires `Authorization: Bearer <api token>`");
    }
    next.run(request).await
}

/// `POST /api/experiments/{name}/validate`.
fn is_validation(path: &str) -> bool {
    path.strip_prefix("/api/experiments/")
        .and_then(|rest| rest.strip_suffix("/validate"))
        .is_some_and(|name| !name.is_empty() && !name.contains('/'))
}

/// The middleware: lets a request through or answers 401.
pub(crate) async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let auth = &state.auth;
    let path = request.uri().path();
    // `/metrics` is a read like the API's: open unless reads are protected.
    let guarded = (path.starts_with("/api/") && path != "/api/openapi.json") || path == "/metrics";
    if auth.token.is_none() || !guarded {
        return next.run(request).await;
    }
    // Validating a config is a POST that changes nothing: a read.
    let write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) && !is_validation(path);
    if (!write && !auth.protect_reads) || auth.bearer_ok(&request) {
        return next.run(request).await;
    }
    if !write {
        if let (Some(scope), Some(token)) = (feed_scope(path), query_token(&request)) {
            if auth.feed_token_ok(&token, scope) {
                return next.run(request).await;
            }
            return unauthorized(
                "the feed token is invalid, expired, or for another feed; ask for a new one",
            );
        }
    }
    unauthorized(if write {
        "this gateway requires `Authorization: Bearer <api token>` for changes"
    } else {
        "this gateway requires `Authorization: Bearer <api token>` (feeds: `?token=` from POST …/feed-token)"
    })
}

/// A change under `/api` takes a JSON body or none: a `Content-Type` other than
/// `application/json`, or a body without one, is refused (415). What an HTML form or
/// a `text/plain` post from another site's page sends — which a browser sends without
/// asking the gateway first — cannot then start, cancel or change anything.
pub(crate) async fn json_bodies_only(request: Request, next: Next) -> Response {
    let read = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if read || !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let headers = request.headers();
    let refused = match headers.get(header::CONTENT_TYPE) {
        Some(given) => {
            let essence = given
                .to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            (essence != "application/json").then(|| {
                format!(
                    "a change takes a JSON body (Content-Type: application/json) or none, not {:?}",
                    given.to_str().unwrap_or("?")
                )
            })
        }
        None => {
            let length = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let chunked = headers.contains_key(header::TRANSFER_ENCODING);
            (chunked || length.is_some_and(|n| n > 0))
                .then(|| "a body needs Content-Type: application/json".to_string())
        }
    };
    match refused {
        Some(message) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(ErrorBody::new(message)),
        )
            .into_response(),
        None => next.run(request).await,
    }
}

/// A change under `/api` from another site's page is refused (403), whatever its body:
/// a bodiless POST (`fetch(url, {method: 'POST', mode: 'no-cors'})`) is sent by the
/// browser without asking first, and would otherwise cancel a run of a gateway without
/// a token. A browser names the page in `Origin` (and `Sec-Fetch-Site`); the gateway's
/// own page and `gateway.cors_origins` are allowed, and clients that send neither
/// (the CLI, curl, scripts) are not browsers' pages.
pub(crate) async fn same_site_changes(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let read = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if read || !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let refused = match text("origin") {
        Some(origin) => {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            // Behind a reverse proxy that rewrites `Host`, the name the browser used
            // arrives as `X-Forwarded-Host`.
            let own = [text("host"), text("x-forwarded-host")]
                .into_iter()
                .flatten()
                .any(|host| {
                    let host = host.trim().to_ascii_lowercase();
                    origin == format!("http://{host}") || origin == format!("https://{host}")
                });
            (!own && !state.auth.origins.contains(&origin)).then_some(origin)
        }
        // No `Origin`: a browser's cross-site request still says where it comes from.
        None => matches!(text("sec-fetch-site"), Some("cross-site" | "same-site"))
            .then(|| "another site".to_string()),
    };
    match refused {
        Some(origin) => (
            StatusCode::FORBIDDEN,
            Json(ErrorBody::new(format!(
                "a change from a page of {origin} is refused: only this gateway's own page and gateway.cors_origins may make changes"
            ))),
        )
            .into_response(),
        None => next.run(request).await,
    }
}

/// The host name of a `Host` header value (`localhost:8080`, `[::1]:8080`), lowercase.
fn host_name(value: &str) -> String {
    let value = value.trim();
    let name = match value.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => value
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(value, |(name, _)| name),
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// DNS rebinding: a page on another site points a name of its own at 127.0.0.1, and
/// its scripts then reach a gateway listening there, with that name as `Host`. A
/// gateway on loopback without an API token answers `/api` only for loopback names and
/// `gateway.allowed_hosts` (403 otherwise).
pub(crate) async fn known_hosts_only(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(allowed) = &state.auth.hosts else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if !path.starts_with("/api/") && path != "/metrics" {
        return next.run(request).await;
    }
    let Some(host) = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
    else {
        return next.run(request).await;
    };
    let name = host_name(host);
    if is_loopback_name(&name) || allowed.contains(&name) {
        return next.run(request).await;
    }
    (
        StatusCode::FORBIDDEN,
        Json(ErrorBody::new(format!(
            "this gateway listens on loopback without an API token and answers only loopback host names, not {name:?} (add it to gateway.allowed_hosts, or set an API token)"
        ))),
    )
        .into_response()
}

/// A NUL character (`%00`) in a path or query parameter under `/api` is refused with
/// 400 naming where: no database stores it as text (PostgreSQL refuses it, which
/// surfaced as a 503 "the database is unavailable").
pub(crate) async fn no_nul_characters(request: Request, next: Next) -> Response {
    let uri = request.uri();
    if !uri.path().starts_with("/api/") {
        return next.run(request).await;
    }
    let nul = |s: &str| s.to_ascii_lowercase().contains("%00");
    let refused = if nul(uri.path()) {
        Some("the path holds a NUL character (%00)".to_string())
    } else {
        uri.query().and_then(|query| {
            query.split('&').find(|pair| nul(pair)).map(|pair| {
                let name = pair.split_once('=').map_or(pair, |(name, _)| name);
                format!("query parameter `{name}` holds a NUL character (%00)")
            })
        })
    };
    match refused {
        Some(message) => (StatusCode::BAD_REQUEST, Json(ErrorBody::new(message))).into_response(),
        None => next.run(request).await,
    }
}

fn unauthorized(message: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(ErrorBody::new(message)),
    )
        .into_response()
}

/// A feed token and when it expires.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct FeedToken {
    /// Put in the feed URL as ?token=; null when the gateway has no API token.
    #[schema(required = true)]
    token: Option<String>,
    /// µs since the epoch; null with `token`.
    #[schema(required = true)]
    expires_at: Option<i64>,
}

/// A short-lived token for this run's feed URL (`/api/runs/{id}/events?token=…`), for clients that cannot send headers (EventSource).
#[utoipa::path(post, path = "/api/runs/{id}/feed-token", tag = "feeds", params(RunId), responses(
    (status = 200, description = "The token", body = FeedToken),
    (status = 404, description = "No such run", body = ErrorBody),
    (status = 503, description = "The database is unavailable", body = ErrorBody),
))]
pub(crate) async fn run_feed_token(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> Result<Json<FeedToken>, ApiError> {
    crate::api::find_run(&state, &id).await?;
    issue(&state, &id)
}

/// A short-lived token for `/api/events?token=…`.
#[utoipa::path(post, path = "/api/events/feed-token", tag = "feeds", responses(
    (status = 200, description = "The token", body = FeedToken),
))]
pub(crate) async fn lifecycle_feed_token(
    State(state): AppStateRef,
) -> Result<Json<FeedToken>, ApiError> {
    issue(&state, LIFECYCLE_SCOPE)
}

fn issue(state: &AppState, scope: &str) -> Result<Json<FeedToken>, ApiError> {
    match state.auth.feed_token(scope) {
        Some((token, expires_at)) => Ok(Json(FeedToken {
            token: Some(token),
            expires_at: Some(expires_at),
        })),
        // No API token configured: feeds are open and need none.
        None => Ok(Json(FeedToken {
            token: None,
            expires_at: None,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_tokens_are_scoped_signed_and_expire() {
        let auth = Auth::new(Some("s3cret".into()), true, Duration::from_secs(60));
        let (token, _) = auth.feed_token("run-1").unwrap();
        assert!(auth.feed_token_ok(&token, "run-1"));
        assert!(!auth.feed_token_ok(&token, "run-2"));
        assert!(!auth.feed_token_ok(&token.replace("run-1", "run-2"), "run-2"));
        let other = Auth::new(Some("other".into()), true, Duration::from_secs(60));
        assert!(!other.feed_token_ok(&token, "run-1"));
        let expired = Auth::new(Some("s3cret".into()), true, Duration::ZERO);
        let (token, _) = expired.feed_token("run-1").unwrap();
        assert!(!auth.feed_token_ok(&token, "run-1"));
        assert!(!auth.feed_token_ok("garbage", "run-1"));
        assert!(!auth.feed_token_ok("a.b.zz", "a"));
        assert_eq!(feed_scope("/api/runs/abc/events"), Some("abc"));
        assert_eq!(feed_scope("/api/events"), Some("*"));
        assert_eq!(feed_scope("/api/runs/abc/logs"), None);
        assert_eq!(host_name("LocalHost:8080"), "localhost");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("evil.example.:80"), "evil.example");
        assert!(
            is_loopback_name("127.0.0.2")
                && is_loopback_name("::1")
                && is_loopback_name("app.localhost")
        );
        assert!(!is_loopback_name("127.0.0.1.nip.io") && !is_loopback_name("evil.example"));
        assert!(is_validation("/api/experiments/sweep/validate"));
        assert!(!is_validation("/api/experiments//validate"));
        assert!(!is_validation("/api/experiments/a/b/validate"));
        assert!(!is_validation("/api/runs/validate"));
    }
}
