//! Serving an axum [`Router`] with limits against slow or hostile clients: the coordinator serves
//! its API this way, and a participant service serves its routes the same way with [`serve`].
//!
//! A plain `axum::serve` sets no header-read timer, so a client that sends part of a header holds
//! its connection (and up to ~400 KiB of buffer) for ever; a body announced but never sent holds
//! its handler just as long; and nothing bounds how many connections are open. [`Limits`] bounds
//! each of these:
//!
//! | limit | default | past it |
//! |-------|---------|---------|
//! | [`header_read_timeout`](Limits::header_read_timeout) | 10 s | the connection is closed |
//! | [`max_header_bytes`](Limits::max_header_bytes) | 32 KiB | 431, the connection is closed |
//! | [`body_read_timeout`](Limits::body_read_timeout) | 30 s | 408 `body_timeout` |
//! | [`max_connections`](Limits::max_connections) | 1,024 | further connections wait in the listen backlog until one closes |
//!
//! The header limits are hyper's (`http1::Builder::header_read_timeout`, `max_buf_size`), the body
//! deadline is tower-http's `RequestBodyDeadlineLayer`, the connection cap a tokio `Semaphore`.
//! Connections are set `TCP_NODELAY`: a batch's answer is written a line at a time, and with
//! Nagle's algorithm each line after the first would wait for the client's delayed ACK.
//!
//! ```no_run
//! # async fn run(participant: tcc_http::participant::Participant) -> std::io::Result<()> {
//! use tcc_http::serve::{Limits, serve};
//!
//! let app = axum::Router::new().nest("/tcc/flights", participant.router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! serve(listener, app, &Limits::default(), std::future::pending()).await
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use crate::error::ApiError;

/// Limits of a server against slow or hostile clients; see the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest a client may take to send a request's whole header (from when the server starts
    /// reading it); past it the connection is closed.
    pub header_read_timeout: Duration,
    /// Largest request header, in bytes (at least 8 KiB: hyper's minimum). A larger one is
    /// answered 431 and the connection closed. It is also the largest buffer a connection reads
    /// into or queues writes in.
    pub max_header_bytes: usize,
    /// Longest a request's body may take to arrive, whole; past it the request is answered 408
    /// `body_timeout` (a handler that reads the body) and nothing is done.
    pub body_read_timeout: Duration,
    /// Most connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
}

/// hyper's smallest buffer.
pub const MIN_HEADER_BYTES: usize = 8 << 10;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 32 << 10,
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

impl Limits {
    /// Checks the limits: positive timeouts and connection cap, headers of at least
    /// [`MIN_HEADER_BYTES`].
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout.is_zero() || self.body_read_timeout.is_zero() {
            return Err("the header and body read timeouts must be positive".to_owned());
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(format!("the header limit must be at least {MIN_HEADER_BYTES} bytes"));
        }
        if self.max_connections == 0 || self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err("the connection cap must be positive".to_owned());
        }
        Ok(())
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then stops accepting
/// and finishes the requests in flight. A body cut off by [`Limits::body_read_timeout`] fails
/// its handler's read of it: the coordinator's and the participant runtime's routes answer 408
/// `body_timeout`.
///
/// Returns an error only when `limits` are invalid ([`Limits::validate`]); failures to accept a
/// connection are logged and retried.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    limits.validate().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let router = router.layer(tower_http::timeout::RequestBodyDeadlineLayer::new(limits.body_read_timeout));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: wait a
                    // little (as axum::serve does) rather than spin.
                    tracing::debug!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Gives an error answer that lacks it the JSON error body `{code, message}`: a rejection axum
/// answers as text (a path that does not decode, a body that could not be read), tower-http's 413,
/// a 408 of a body cut off by [`Limits::body_read_timeout`]. Answers already JSON, and successes,
/// pass unchanged. The coordinator's router and [`Participant::router`](crate::participant::Participant::router)
/// carry it (`axum::middleware::map_response(json_errors)`), so they answer so however they are
/// served.
pub async fn json_errors(res: Response) -> Response {
    match error_of(res).await {
        Ok(res) => res,
        Err((error, kept)) => {
            let mut out = error.into_response();
            out.headers_mut().extend(kept);
            out
        }
    }
}

/// `res` itself when it needs nothing (a success, or an error already with a JSON body);
/// otherwise the error it means, and the headers to keep (`Allow`, `WWW-Authenticate`).
pub(crate) async fn error_of(res: Response) -> Result<Response, (ApiError, HeaderMap)> {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return Ok(res);
    }
    let (parts, body) = res.into_parts();
    let mut kept = HeaderMap::new();
    for name in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            kept.insert(name, v.clone());
        }
    }
    // Error texts from axum and tower-http are short; read no more than a few KiB of one.
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) if !bytes.trim_ascii().is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let error = if status == StatusCode::REQUEST_TIMEOUT || is_body_timeout(&text) {
        body_timeout()
    } else {
        ApiError::new(status, code_of(status), text)
    };
    Err((error, kept))
}

/// The stable code of an error answer that had none, by its status.
fn code_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "malformed",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND => "unknown_route",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_input",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// Whether an error's text says the body read timed out (tower-http's `TimeoutError`, wherever
/// axum wraps it).
fn is_body_timeout(text: &str) -> bool {
    text.contains("data was not received within the designated timeout")
}

/// 408 `body_timeout`.
fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        "the request body did not arrive within the server's body read timeout",
    )
}

/// The error of a request body that could not be read: 413 past the body limit, 408
/// `body_timeout` past [`Limits::body_read_timeout`], else 400 `malformed`.
pub(crate) fn body_rejection(r: &axum::extract::rejection::BytesRejection, limit: usize) -> ApiError {
    let text = r.body_text();
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is over {limit} bytes"),
        )
    } else if is_body_timeout(&text) {
        body_timeout()
    } else {
        ApiError::malformed(text)
    }
}

/// Serves `router` on a request it was handed as is (for tests of [`json_errors`]).
#[cfg(test)]
async fn answer(router: Router, req: axum::extract::Request) -> Response {
    use tower::ServiceExt;
    router
        .layer(axum::middleware::map_response(json_errors))
        .oneshot(req)
        .await
        .unwrap_or_else(|e| match e {})
}

#[cfg(test)]
mod tests {
    use axum::extract::Request;
    use axum::http::HeaderValue;

    use super::*;

    #[tokio::test]
    async fn text_error_answers_get_the_json_error_body() {
        let router = Router::new()
            .route(
                "/text/{code}",
                axum::routing::get(|axum::extract::Path(code): axum::extract::Path<u16>| async move {
                    (StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT), "plain words")
                        .into_response()
                }),
            )
            .route("/ok", axum::routing::get(|| async { "fine" }));
        for (code, want) in [(400, "malformed"), (415, "unsupported_media_type"), (500, "internal")] {
            let req = Request::builder()
                .uri(format!("/text/{code}"))
                .body(axum::body::Body::empty())
                .unwrap_or_default();
            let res = answer(router.clone(), req).await;
            assert_eq!(res.status().as_u16(), code);
            assert_eq!(
                res.headers().get(header::CONTENT_TYPE),
                Some(&HeaderValue::from_static("application/json"))
            );
            let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap_or_default();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            assert_eq!(
                (body["code"].as_str(), body["message"].as_str()),
                (Some(want), Some("plain words")),
                "{code}"
            );
        }
        let req = Request::builder().uri("/ok").body(axum::body::Body::empty()).unwrap_or_default();
        let res = answer(router, req).await;
        let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap_or_default();
        assert_eq!(&body[..], b"fine");
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(Limits::default().validate(), Ok(()));
        for bad in [
            Limits { max_header_bytes: 4096, ..Limits::default() },
            Limits { max_connections: 0, ..Limits::default() },
            Limits { header_read_timeout: Duration::ZERO, ..Limits::default() },
            Limits { body_read_timeout: Duration::ZERO, ..Limits::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
