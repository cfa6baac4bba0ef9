//! Admin server: /metrics, /healthz, /readyz.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::controller::Liveness;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the API server answered (as leader or standby).
    pub ready: Arc<AtomicBool>,
    /// Whether the controller makes progress.
    pub liveness: Arc<Liveness>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
            }),
        )
        .route(
            "/healthz",
            get(|State(s): State<AdminState>| async move {
                match s.liveness.check() {
                    Ok(()) => (StatusCode::OK, "ok".to_string()).into_response(),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(s): State<AdminState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "API server not reached yet").into_response()
                }
            }),
        )
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn endpoints() {
        let liveness = Arc::new(Liveness::new(std::time::Duration::from_secs(30)));
        let s = AdminState { metrics: Arc::new(Metrics::new()), ready: Arc::new(AtomicBool::new(false)), liveness };
        let get = |path: &'static str| {
            let r = router(s.clone());
            async move { r.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap().status() }
        };
        assert_eq!(get("/healthz").await, StatusCode::OK);
        assert_eq!(get("/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
        s.ready.store(true, Ordering::Relaxed);
        assert_eq!(get("/readyz").await, StatusCode::OK);
        assert_eq!(get("/metrics").await, StatusCode::OK);
    }
}
