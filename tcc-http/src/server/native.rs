//! The native API (being written).

use std::sync::Arc;

use axum::Router;

use super::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
