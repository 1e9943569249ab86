//! The web UI: a few static files compiled into the binary (no front-end build step),
//! served with a Content-Security-Policy that allows only this origin's scripts and
//! styles — a second wall behind the UI's rule of putting run output in as text. The
//! charts are drawn with uPlot (MIT, `ui/vendor/`, its licence beside it), vendored so
//! the UI works offline and loads nothing from elsewhere.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    response
}

/// The web UI's page.
#[utoipa::path(get, path = "/", tag = "ui", responses(
    (status = 200, description = "The UI", body = String, content_type = "text/html"),
))]
pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", include_str!("ui/index.html"))
}

/// The comparison of runs (`/compare?runs=a,b,c`): the same page, which reads its path.
#[utoipa::path(get, path = "/compare", tag = "ui", responses(
    (status = 200, description = "The UI, showing the comparison", body = String, content_type = "text/html"),
))]
pub(crate) async fn compare() -> Response {
    index().await
}

/// A file of the web UI: `app.js`, `dom.js`, `feed.js`, `charts.js`, `app.css`, `favicon.svg`, and
/// uPlot's `uPlot.iife.min.js`, `uPlot.min.css` and `uPlot.LICENSE`.
#[utoipa::path(get, path = "/ui/{name}", tag = "ui",
    params(("name" = String, Path, description = "The file's name")),
    responses(
        (status = 200, description = "The file", content(
            (String = "text/javascript"),
            (String = "text/css"),
            (String = "image/svg+xml"),
            (String = "text/plain"),
        )),
        (status = 404, description = "No such file", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn file(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", include_str!("ui/app.js")),
        "dom.js" => asset("text/javascript; charset=utf-8", include_str!("ui/dom.js")),
        "feed.js" => asset("text/javascript; charset=utf-8", include_str!("ui/feed.js")),
        "charts.js" => asset(
            "text/javascript; charset=utf-8",
            include_str!("ui/charts.js"),
        ),
        "uPlot.iife.min.js" => asset(
            "text/javascript; charset=utf-8",
            include_str!("ui/vendor/uPlot.iife.min.js"),
        ),
        "uPlot.min.css" => asset(
            "text/css; charset=utf-8",
            include_str!("ui/vendor/uPlot.min.css"),
        ),
        // The binary carries uPlot, so it carries its licence, served beside it.
        "uPlot.LICENSE" => asset(
            "text/plain; charset=utf-8",
            include_str!("ui/vendor/uPlot.LICENSE"),
        ),
        "app.css" => asset("text/css; charset=utf-8", include_str!("ui/app.css")),
        "favicon.svg" => asset("image/svg+xml", include_str!("ui/favicon.svg")),
        _ => crate::error::ApiError::NotFound(format!("no UI file {name:?}")).into_response(),
    }
}
