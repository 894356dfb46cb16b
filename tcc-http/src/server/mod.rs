//! The coordinator as an HTTP service: the native API, the DTM-compatible API under `/api/dtmsvr`,
//! health, readiness, metrics, the OpenAPI document and the operator's console (`/console`).
//!
//! [`router`] builds the whole application for a [`Coordinator`]; the `tcc-coordinator` binary serves
//! it, and tests serve it on a loopback port with [`serve`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tcc_core::Coordinator;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::MAX_BODY;
use crate::target::AllowList;

pub use crate::protocol::coordinator::Token;

pub mod batch;
pub mod console;
pub mod dtm;
mod monitoring;
pub mod native;

/// Settings of the HTTP service around the engine.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer TOKEN` on every mutating call, when set.
    pub token: Option<Token>,
    /// Which participant URLs may be registered and called.
    pub allow: AllowList,
    /// Timeout of a transaction begun without one.
    pub default_timeout: Duration,
    /// Limits against slow or hostile clients: header and body read timeouts, the header buffer,
    /// the connection cap (see [`crate::serve`]).
    pub limits: crate::serve::Limits,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            token: None,
            allow: AllowList::new(&[]).unwrap_or_else(|_| unreachable!("an empty list is valid")),
            default_timeout: Duration::from_secs(60),
            limits: crate::serve::Limits::default(),
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
        .nest("/api/dtmsvr", dtm::routes())
        .merge(monitoring::routes())
        .merge(console::routes())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // A Content-Length past the limit is refused before any of the body is waited for.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        .layer(middleware::from_fn(error_bodies))
        .with_state(state)
}

/// 404 with the usual error body for a path the coordinator does not serve.
async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_route", format!("no such route: {}", uri.path()))
}

/// 405 with the usual error body (axum adds the `Allow` header).
async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Gives every error answer without the JSON error body the body (see
/// [`json_errors`](crate::serve::json_errors)); under the DTM API, as a DTM error (a 4xx with
/// `FAILURE`).
async fn error_bodies(req: Request, next: Next) -> Response {
    let dtm = req.uri().path().starts_with("/api/dtmsvr/");
    match crate::serve::error_of(next.run(req).await).await {
        Ok(res) => res,
        Err((error, kept)) => {
            let mut res = if dtm { dtm::error_answer(error) } else { error.into_response() };
            res.headers_mut().extend(kept);
            res
        }
    }
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

/// Serves `router` on `listener` with the default [`Limits`](crate::serve::Limits) until
/// `shutdown` resolves, then finishes requests in flight; [`crate::serve::serve`] takes the limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::serve::serve(listener, router, &crate::serve::Limits::default(), shutdown).await
}

/// Where a standalone coordinator keeps its transactions.
///
/// Parsed from `sled:DIR` or a `postgres://USER@HOST:PORT/DB` URL (`postgresql://` too). Its
/// `Display` and `Debug` never show a password, so a choice can be logged as it is.
///
/// ```
/// use tcc_http::server::StoreChoice;
/// let pg: StoreChoice = "postgres://tcc:s3cret@127.0.0.1:5432/tcc".parse().unwrap();
/// assert_eq!(pg.to_string(), "postgres://tcc@127.0.0.1:5432/tcc");
/// assert_eq!("sled:/var/lib/tcc".parse::<StoreChoice>().unwrap(), StoreChoice::Sled("/var/lib/tcc".into()));
/// assert!("mysql://x".parse::<StoreChoice>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded sled store in this directory (created if missing). One process at a time.
    Sled(std::path::PathBuf),
    /// A PostgreSQL database (a connection URL), shared by every coordinator pointed at it; the
    /// schema is created or migrated on start. See `tcc_core::store::postgres`. Needs the `postgres`
    /// feature.
    #[cfg(feature = "postgres")]
    Postgres(String),
}

impl StoreChoice {
    /// Opens the store (for PostgreSQL: connects, and creates or migrates the schema).
    pub async fn open(&self) -> Result<Arc<dyn tcc_core::Store>, tcc_core::Error> {
        Ok(match self {
            StoreChoice::Sled(dir) => Arc::new(tcc_core::SledStore::open(dir)?),
            #[cfg(feature = "postgres")]
            StoreChoice::Postgres(url) => Arc::new(tcc_core::store::PgStore::connect(url).await?),
        })
    }
}

impl std::str::FromStr for StoreChoice {
    type Err = String;

    /// Never echoes its input, which may hold a password.
    fn from_str(s: &str) -> Result<StoreChoice, String> {
        if let Some(dir) = s.strip_prefix("sled:") {
            if dir.is_empty() {
                return Err("sled: needs a directory, as in sled:./tcc-data".to_owned());
            }
            return Ok(StoreChoice::Sled(dir.into()));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            {
                tcc_core::store::postgres::check_url(s)
                    .map_err(|e| format!("the PostgreSQL store URL: {e}"))?;
                return Ok(StoreChoice::Postgres(s.to_owned()));
            }
            #[cfg(not(feature = "postgres"))]
            return Err(
                "this coordinator is built without the PostgreSQL store (tcc-http's `postgres` feature)"
                    .to_owned(),
            );
        }
        Err("a store is sled:DIR or postgres://USER@HOST:PORT/DB".to_owned())
    }
}

impl std::fmt::Display for StoreChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreChoice::Sled(dir) => write!(f, "sled:{}", dir.display()),
            #[cfg(feature = "postgres")]
            StoreChoice::Postgres(url) => f.write_str(&tcc_core::store::postgres::describe_url(url)),
        }
    }
}

impl std::fmt::Debug for StoreChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreChoice({self})")
    }
}

/// Everything needed to start a standalone coordinator.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Where to listen, for example `127.0.0.1:36789` (port 0 picks a free one).
    pub listen: String,
    /// Where transactions are kept.
    pub store: StoreChoice,
    /// The engine's settings.
    pub core: tcc_core::Config,
    /// The HTTP service's settings.
    pub server: ServerConfig,
    /// The settings of the client the engine calls participants with.
    pub client: crate::transport::ClientConfig,
}

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened, or the engine refused its settings.
    #[error("opening the coordinator: {0}")]
    Engine(#[from] tcc_core::Error),
    /// The listening address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A coordinator serving HTTP, started by [`start`].
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
    /// The shared state (engine, settings, metrics).
    pub state: Arc<AppState>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// `http://ADDR`, the base URL clients use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop: stops accepting, finishes requests in flight, then stops the engine, letting
    /// phase-two rounds in flight finish. Unfinished work resumes on the next start.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        let served = self.task.await.map_err(std::io::Error::other)?;
        self.state.coordinator.stop().await;
        served
    }
}

/// Opens the store (`launch.store`), starts the engine (which resumes unfinished transactions) and
/// serves [`router`] on `launch.listen`. Several coordinators may be started on one PostgreSQL
/// store, in one process or many, each with its own [`Config::owner`](tcc_core::Config::owner).
pub async fn start(launch: Launch) -> Result<Running, StartError> {
    let Launch { listen, store, core, server, mut client } = launch;
    server.limits.validate().map_err(|e| tcc_core::Error::InvalidInput(format!("server limits: {e}")))?;
    // The engine bounds every phase-two call by its per-call timeout, which a transaction may raise
    // up to the lease: the client's own request timeout must not cut such calls short.
    client.request_timeout = client.request_timeout.max(core.lease);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| StartError::Bind { addr: listen.clone(), source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
    let store = store.open().await?;
    let metrics = Arc::new(Metrics::default());
    let transport = crate::transport::HttpTransport::new(
        crate::transport::build_client(&client)?,
        server.allow.clone(),
        metrics.clone(),
    )
    .with_batching(client.batching);
    let coordinator =
        Coordinator::open(store, Arc::new(transport), Arc::new(tcc_core::SystemClock), core).await?;
    let state = Arc::new(AppState { coordinator: Arc::new(coordinator), config: server, metrics });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(state.clone());
    let limits = state.config.limits.clone();
    let task = tokio::spawn(async move {
        crate::serve::serve(listener, app, &limits, async move {
            let _ = stopped.await;
        })
        .await
    });
    Ok(Running { addr, state, stop, task })
}
