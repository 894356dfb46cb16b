//! The coordinator as an HTTP service: the native API, the DTM-compatible API under `/api/dtmsvr`,
//! health, readiness, metrics and the OpenAPI document.
//!
//! [`router`] builds the whole application for a [`Coordinator`]; the `tcc-coordinator` binary serves
//! it, and tests serve it on a loopback port with [`serve`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tcc_core::Coordinator;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::MAX_BODY;
use crate::target::AllowList;

pub(crate) mod native;
mod ops;

/// A secret bearer token. Its `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token; empty ones are refused.
    pub fn new(token: impl Into<String>) -> Result<Token, String> {
        let t = token.into();
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a token must be non-empty, without spaces or control characters".to_owned());
        }
        Ok(Token(t))
    }

    /// The secret, for building an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        let mut diff = mine.len() ^ presented.len();
        for (i, b) in presented.iter().enumerate() {
            diff |= usize::from(mine.get(i).copied().unwrap_or(0) ^ b);
        }
        diff == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Settings of the HTTP service around the engine.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer TOKEN` on every mutating call, when set.
    pub token: Option<Token>,
    /// Which participant URLs may be registered and called.
    pub allow: AllowList,
    /// Timeout of a transaction begun without one.
    pub default_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            token: None,
            allow: AllowList::new(&[]).unwrap_or_else(|_| unreachable!("an empty list is valid")),
            default_timeout: Duration::from_secs(60),
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The engine.
    pub coordinator: Arc<Coordinator>,
    /// The HTTP settings.
    pub config: ServerConfig,
    /// Request and phase-two metrics (the transport records into the same registry).
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Checks every URL of a target against the allow-list, as a 422.
    pub(crate) fn check_target(&self, target: &crate::target::Target) -> Result<(), ApiError> {
        for u in target.urls() {
            self.config.allow.check_url(u).map_err(ApiError::participant_not_allowed)?;
        }
        Ok(())
    }
}

/// The whole coordinator application: native API, DTM-compatible API, operations endpoints.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(native::routes())
        .nest("/api/dtmsvr", crate::dtm::routes())
        .merge(ops::routes())
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Refuses mutating calls without the configured token.
async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.config.token {
        let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if mutating {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .unwrap_or_default();
            if !token.matches(presented) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

/// Records each request's latency by route and status class.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let started = Instant::now();
    let res = next.run(req).await;
    let route = route.unwrap_or_else(|| "unmatched".to_owned());
    state.metrics.observe_request(method.as_str(), &route, res.status().as_u16(), started.elapsed());
    res
}

/// Serves `router` on `listener` until `shutdown` resolves, then finishes requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
