//! The DTM-compatible API (placeholder; being written).

use std::sync::Arc;

use axum::Router;

use crate::server::AppState;

/// The DTM-compatible routes, nested under `/api/dtmsvr`.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
