//! Operations endpoints: liveness, readiness, Prometheus metrics and the OpenAPI document.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tcc_core::TxState;
use utoipa::OpenApi;

use super::AppState;
use super::native;
use crate::error::{ApiError, ApiJson};
use crate::protocol::ErrorBody;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

/// The OpenAPI document of the native API, generated from the handlers' annotations.
#[derive(OpenApi, Debug)]
#[openapi(
    info(title = "tcc coordinator", description = "Try-Confirm-Cancel transaction coordinator. Mutating calls need `Authorization: Bearer TOKEN` when the server has a token. The DTM-compatible API under /api/dtmsvr follows DTM's own documentation."),
    paths(
        native::begin, native::list, native::get_one, native::register, native::confirm, native::cancel,
        native::retry, native::force, native::overview, super::batch::batch, native::begin_saga,
        native::prepare_message, healthz, readyz, metrics
    ),
    components(schemas(ErrorBody, native::Id)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

#[derive(Debug)]
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        doc.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::default(),
        ]);
    }
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready", body = String),
    (status = 503, description = "The store does not answer", body = ErrorBody),
))]
async fn readyz(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    state.coordinator.count(TxState::Flagged).await.map_err(|e| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("store check failed: {e}"))
    })?;
    Ok("ready")
}

/// Prometheus metrics as OpenMetrics text.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Metrics", body = String, content_type = "application/openmetrics-text")))]
async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let flagged = state.coordinator.count(TxState::Flagged).await?;
    let text = state.metrics.render(&state.coordinator.stats(), flagged);
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text))
}

/// This document.
async fn openapi() -> ApiJson<utoipa::openapi::OpenApi> {
    ApiJson(ApiDoc::openapi())
}
