//! Athanor's MCP server: the tools an AI agent starts, watches and reads experiments
//! with, over the Model Context Protocol (the official Rust SDK, `rmcp`).
//!
//! Every tool is a call of the gateway's HTTP API through [`athanor_client::Client`],
//! so validation, queries and permissions are the REST handlers' own. Two transports
//! serve the same tools: streamable HTTP at the gateway's `/mcp` ([`http_service`],
//! calling the gateway it is mounted on, with the caller's bearer token), and stdio
//! ([`serve_stdio`], `athanor mcp --url … --token …`, for clients that launch a
//! process).
//!
//! Answers are bounded for an agent's context: log pages default to
//! [`DEFAULT_LOG_LINES`] lines and a line is cut at [`MAX_LINE_CHARS`] characters with a
//! marker; a result value over [`INLINE_RESULT_BYTES`] of JSON is shown as a preview
//! that says how to get the whole value.

mod tools;

use std::sync::Arc;

use athanor_client::Client;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

pub use tools::{
    Athanor, DEFAULT_LOG_LINES, DEFAULT_WAIT_SECONDS, INLINE_RESULT_BYTES, MAX_LINE_CHARS,
    MAX_LOG_LINES, MAX_RESULTS, MAX_WAIT_SECONDS,
};

/// The gateway's API as one caller sees it.
#[derive(Clone)]
pub(crate) enum Gateway {
    /// `athanor mcp`: one client, with the token given on the command line.
    Fixed(Client),
    /// The gateway's `/mcp`: its own API, with the bearer token of each MCP request
    /// (none: none); one connection pool for all callers.
    Forwarding(Client),
}

impl Gateway {
    /// The client for a request carrying `authorization` (its header, if any).
    pub(crate) fn client(&self, authorization: Option<&str>) -> Result<Client, String> {
        match self {
            Gateway::Fixed(client) => Ok(client.clone()),
            Gateway::Forwarding(client) => {
                let token = authorization.map(|header| {
                    let header = header.trim();
                    match header.split_once(' ') {
                        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                            token.trim()
                        }
                        _ => header,
                    }
                });
                client.with_token(token).map_err(|e| e.to_string())
            }
        }
    }
}

/// The MCP endpoint of a gateway whose own API is at `base` (`http://127.0.0.1:8080`):
/// streamable HTTP, one session per client. A request's `Authorization` header is
/// passed on to the API, so a tool is allowed exactly what that caller's REST call
/// would be. A request with an `Origin` header is refused unless the origin is one of
/// `origins` (the gateway's `cors_origins`), so a web page cannot drive Athanor through
/// a browser; with `loopback_only`, the `Host` must be a loopback name too (DNS
/// rebinding).
pub fn http_service(
    base: &str,
    origins: &[String],
    loopback_only: bool,
    max_body_bytes: usize,
    shutdown: CancellationToken,
) -> Result<StreamableHttpService<Athanor, LocalSessionManager>, String> {
    let gateway = Gateway::Forwarding(Client::new(base, None).map_err(|e| e.to_string())?);
    let mut config = StreamableHttpServerConfig::default()
        .with_allowed_origins(origins.iter().map(|o| o.trim_end_matches('/').to_string()))
        .enforce_origin_validation()
        .with_max_request_body_bytes(max_body_bytes)
        .with_cancellation_token(shutdown);
    if !loopback_only {
        config = config.disable_allowed_hosts();
    }
    // A session idle this long is closed; a call in progress does not count as activity,
    // so the longest `wait_for_run` must fit.
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(SESSION_IDLE);
    Ok(StreamableHttpService::new(
        move || Ok(Athanor::new(gateway.clone())),
        Arc::new(sessions),
        config,
    ))
}

/// How long a session (legacy protocol versions) may go without a message.
const SESSION_IDLE: std::time::Duration =
    std::time::Duration::from_secs(tools::MAX_WAIT_SECONDS + 120);

/// Serves the tools on stdin/stdout until the client closes them, calling the gateway
/// through `client`.
pub async fn serve_stdio(client: Client) -> Result<(), String> {
    let service = Athanor::new(Gateway::Fixed(client))
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("MCP session failed to start: {e}"))?;
    service
        .waiting()
        .await
        .map_err(|e| format!("MCP session ended with an error: {e}"))?;
    Ok(())
}
