//! Admin server on METRICS_PORT: /metrics, /health (the original's), /healthz, /readyz.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use redis::aio::ConnectionManager;
use serde_json::json;

use crate::metrics::Metrics;

/// What readiness is made of, updated by the tasks that find out.
#[derive(Default)]
pub struct Health {
    pub redis_ok: AtomicBool,
    groups: Mutex<BTreeMap<String, bool>>,
    dlq_error: Mutex<Option<String>>,
}

impl Health {
    pub fn new(streams: &[String]) -> Self {
        let h = Self::default();
        {
            let mut g = h.groups.lock().unwrap_or_else(|p| p.into_inner());
            for s in streams {
                g.insert(crate::config::stream_key(s), false);
            }
        }
        h
    }

    pub fn set_group(&self, key: &str, ok: bool) {
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string(), ok);
    }

    pub fn set_dlq_error(&self, err: Option<String>) {
        *self.dlq_error.lock().unwrap_or_else(|p| p.into_inner()) = err;
    }

    /// Reasons the worker is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.redis_ok.load(Ordering::Relaxed) {
            out.push("redis unreachable".to_string());
        }
        for (k, ok) in self.groups.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if !ok {
                out.push(format!("consumer group missing on {k}"));
            }
        }
        if let Some(e) = self.dlq_error.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            out.push(format!("dead-letter sink failing: {e}"));
        }
        out
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub redis: Option<ConnectionManager>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if let Some(mut con) = s.redis.clone() {
        let ping =
            tokio::time::timeout(Duration::from_secs(1), redis::cmd("PING").query_async::<String>(&mut con)).await;
        s.health.redis_ok.store(matches!(ping, Ok(Ok(_))), Ordering::Relaxed);
    }
    let problems = s.health.problems();
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "problems": problems})))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn state() -> AdminState {
        AdminState {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(&["fast".to_string()])),
            redis: None,
        }
    }

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let resp = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_endpoints() {
        let s = state();
        assert_eq!(get(router(s.clone()), "/health").await, (StatusCode::OK, r#"{"status":"ok"}"#.into()));
        assert_eq!(get(router(s.clone()), "/healthz").await.0, StatusCode::OK);
        s.metrics.processed.with_label_values(&["events:fast", "t"]).inc();
        let (code, body) = get(router(s), "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("events_processed_total"), "{body}");
    }

    #[tokio::test]
    async fn readiness_says_why_not() {
        let s = state();
        let (code, body) = get(router(s.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("redis unreachable") && body.contains("consumer group missing on events:fast"), "{body}");
        s.health.redis_ok.store(true, Ordering::Relaxed);
        s.health.set_group("events:fast", true);
        assert_eq!(get(router(s.clone()), "/readyz").await.0, StatusCode::OK);
        s.health.set_dlq_error(Some("http://dlq answered 500".into()));
        let (code, body) = get(router(s), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("dead-letter sink failing"), "{body}");
    }
}
