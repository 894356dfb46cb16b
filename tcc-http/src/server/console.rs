//! The operator's console: a page at `/console`, served from assets embedded in the binary.
//!
//! It is a client of the JSON API like curl: reads (`GET /v1/overview`, `GET /v1/transactions`,
//! `GET /v1/transactions/{gid}`) need no token; actions (retry, force, cancel) send the operator's
//! token as `Authorization: Bearer`, which the page keeps in `sessionStorage` only. See
//! `docs/console.md`.
//!
//! Why hand-written JS and CSS: a few hundred lines need no framework, and the project then builds
//! from a clean clone with cargo alone, offline (no node, no bundle to keep in step with a source).
//!
//! Every answer here carries a strict Content-Security-Policy: scripts and styles only from these
//! files (no inline script, no `eval`), fetches to this origin only, no frames, no forms posting
//! anywhere. The script builds the page with `textContent` only, so a value from a participant
//! (a payload, an error) is shown as text, never run.

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::AppState;

/// The page.
pub const INDEX_HTML: &str = include_str!("console/index.html");
/// Its script.
pub const CONSOLE_JS: &str = include_str!("console/console.js");
/// Its style sheet.
pub const CONSOLE_CSS: &str = include_str!("console/console.css");

/// The Content-Security-Policy of every console answer.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console", get(index))
        // The page's relative links resolve against `/console`, not `/console/`.
        .route("/console/", get(|| async { Redirect::permanent("../console") }))
        .route("/console/console.js", get(script))
        .route("/console/console.css", get(style))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page may only load what the policy allows: no inline script or style, no handler
    /// attributes, nothing from elsewhere; and the script never writes markup.
    #[test]
    fn the_assets_hold_no_inline_script_no_foreign_source_and_no_markup_writes() {
        let html = INDEX_HTML.to_ascii_lowercase();
        assert_eq!(html.matches("<script").count(), 1, "one script tag");
        assert!(html.contains(r#"<script src="console/console.js" defer></script>"#));
        assert!(!html.contains("<style") && !html.contains(" style="), "no inline style");
        assert!(!regex_like_handler(&html), "no inline event handlers");
        for text in [INDEX_HTML, CONSOLE_JS, CONSOLE_CSS] {
            // The SVG namespace is a name, not a source.
            let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "no foreign source");
            assert!(!text.contains("//cdn") && !text.contains("@import"));
        }
        for sink in
            ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"]
        {
            assert!(!CONSOLE_JS.contains(sink), "the script must not use {sink}");
        }
        assert!(!CONSOLE_JS.contains("localStorage") && !CONSOLE_JS.contains("document.cookie"));
    }

    /// Whether `html` has an attribute like ` onclick=`.
    fn regex_like_handler(html: &str) -> bool {
        html.split(" on").skip(1).any(|rest| {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        })
    }
}
