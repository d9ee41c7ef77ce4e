//! The web console: one page, its script and its stylesheet, embedded in the binary at build
//! time. The page talks to `/graphql` (HTTP) and `/graphql/ws` (`graphql-transport-ws`) only.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE_CSS: &str = include_str!("console/style.css");

/// Only this origin: no script, style, image or connection goes anywhere else.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// `GET /`: the console page.
pub async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_SECURITY_POLICY, CSP)],
        asset("text/html; charset=utf-8", INDEX_HTML),
    )
}

/// `GET /console/app.js`
pub async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /console/style.css`
pub async fn style_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}
