//! The OpenAPI document served at `/api/openapi.json`, generated with `utoipa`: each
//! handler's `#[utoipa::path]` gives its path, method, parameters, body and answers,
//! the types it takes and returns give the schemas, and the router is built from the
//! same annotations (`lib.rs`, `routes()`), so a route cannot be served undocumented.
//! Here: the document's head, the schemas no operation names (the SSE events'
//! payloads), and what the auth middleware adds to every operation it guards.

use athanor_schemas::events::{BatchEvent, Lifecycle, Snapshot, StatusEvent};
use serde::Serialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::error::ErrorBody;

/// The head of the document; the router adds the paths.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Athanor API",
        version = "1",
        description = "Live experiment harness: start runs, follow them live (SSE), query their logs and results. \
            Times are µs since the Unix epoch. Every error is JSON `{\"error\": ...}`. \
            With gateway.api_token set, writes need `Authorization: Bearer <token>` (and reads too with \
            gateway.protect_reads; feeds then take ?token= from a feed-token endpoint).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(Snapshot, BatchEvent, Resync, StatusEvent, Lifecycle)),
    tags(
        (name = "experiments", description = "Experiments hosted by live workers"),
        (name = "instances", description = "Named, configured experiments, to start the same run again"),
        (name = "runs", description = "Runs, their logs and results"),
        (name = "metrics", description = "Metric series of runs: summaries, downsampled series, runs compared"),
        (name = "feeds", description = "Server-Sent Events: a run's live feed and the lifecycle of all runs"),
        (name = "health", description = "Liveness and readiness"),
        (name = "meta", description = "This document"),
        (name = "ui", description = "The web UI's files"),
    ),
)]
pub(crate) struct ApiDoc;

/// SSE `resync`: the viewer fell behind; on a run's feed a `snapshot` follows.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // the hub writes it as JSON; this is its shape
pub(crate) struct Resync {
    pub reason: String,
}

/// An SSE event of a run's feed; `data` is the JSON of a Snapshot, BatchEvent, Resync
/// or StatusEvent.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // the shape of the stream's events, for the document
pub(crate) struct RunFeedEvent {
    #[schema(inline)]
    pub event: Option<RunFeedEventName>,
    /// The batch watermark: batches `0..id` are held.
    #[schema(pattern = "^[0-9]+$")]
    pub id: Option<String>,
    /// One line of JSON.
    pub data: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum RunFeedEventName {
    Snapshot,
    Batch,
    Resync,
    Status,
}

/// An SSE event of `/api/events`; `data` is the JSON of a Lifecycle (or a Resync).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // the shape of the stream's events, for the document
pub(crate) struct LifecycleFeedEvent {
    #[schema(inline)]
    pub event: Option<LifecycleFeedEventName>,
    #[schema(pattern = "^[0-9]+$")]
    pub id: Option<String>,
    /// One line of JSON.
    pub data: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum LifecycleFeedEventName {
    Run,
    Resync,
}

/// The security scheme's name.
const BEARER: &str = "bearer";

/// What `auth.rs` adds to the document: the bearer scheme, and on every operation
/// under `/api` but this document, that it may need the token (writes when
/// `gateway.api_token` is set, reads too with `gateway.protect_reads`) and answers 401
/// without it.
pub(crate) fn guarded(doc: &mut OpenApi) {
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "gateway.api_token: required for writes when configured, and for \
                         reads with gateway.protect_reads (feeds also take ?token= from a \
                         feed-token endpoint)",
                    ))
                    .build(),
            ),
        );
    let unauthorized = ResponseBuilder::new()
        .description(
            "The gateway has an API token and the request does not carry it (or a valid feed token)",
        )
        .header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(Some(String::schema()))
                .description(Some("`Bearer`"))
                .build(),
        )
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ErrorBody::name(),
                ))))
                .build(),
        )
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        let guarded = path.starts_with("/api/") && path != "/api/openapi.json";
        for operation in operations(item) {
            if guarded {
                // Either no token (a gateway without one) or the bearer token.
                operation.security = Some(vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new(BEARER, Vec::<String>::new()),
                ]);
                operation
                    .responses
                    .responses
                    .insert("401".into(), RefOr::T(unauthorized.clone()));
            } else {
                // Always open.
                operation.security = Some(vec![SecurityRequirement::default()]);
            }
        }
    }
}

/// An optional request body is absent, never `null`: utoipa describes `Option<T>` as
/// "T or null", which the handlers refuse (`null` is not an object).
pub(crate) fn optional_bodies(doc: &mut OpenApi) {
    use utoipa::openapi::schema::{Schema, SchemaType, Type};
    use utoipa::openapi::Required;
    let is_null = |schema: &RefOr<Schema>| matches!(schema, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null));
    for item in doc.paths.paths.values_mut() {
        for operation in operations(item) {
            let Some(RefOr::T(body)) = operation.request_body.as_mut() else {
                continue;
            };
            if body.required == Some(Required::True) {
                continue;
            }
            for content in body.content.values_mut() {
                let RefOr::T(content) = content else {
                    continue;
                };
                if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema {
                    if one_of.items.len() == 2 && one_of.items.iter().any(is_null) {
                        content.schema = one_of.items.iter().find(|s| !is_null(s)).cloned();
                    }
                }
            }
        }
    }
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}
