//! Operations endpoints (being written).

use std::sync::Arc;

use axum::Router;

use super::AppState;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
