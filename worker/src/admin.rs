//! Admin server on METRICS_PORT: /metrics, /health (the original's), /healthz, /readyz.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use redis::aio::ConnectionManager;
use serde_json::json;

use crate::dlq::redrive::{replay, Filter, FilterQuery};
use crate::dlq::SqlSink;
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
            let mut g = crate::lock(&h.groups);
            for s in streams {
                g.insert(crate::config::stream_key(s), false);
            }
        }
        h
    }

    pub fn set_group(&self, key: &str, ok: bool) {
        crate::lock(&self.groups).insert(key.to_string(), ok);
    }

    /// Record the dead-letter sink's state; true when it just started failing.
    pub fn set_dlq_error(&self, err: Option<String>) -> bool {
        let mut cur = crate::lock(&self.dlq_error);
        let started = cur.is_none() && err.is_some();
        *cur = err;
        started
    }

    /// Reasons the worker is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.redis_ok.load(Ordering::Relaxed) {
            out.push("redis unreachable".to_string());
        }
        for (k, ok) in crate::lock(&self.groups).iter() {
            if !ok {
                out.push(format!("consumer group missing on {k}"));
            }
        }
        if let Some(e) = crate::lock(&self.dlq_error).as_ref() {
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
    /// The SQL dead-letter store, when that is the configured sink.
    pub dlq: Option<Arc<SqlSink>>,
    /// `ADMIN_TOKEN`: required by the dead-letter endpoints; None disables them.
    pub token: Option<String>,
    /// Where replayed rows without a recorded stream go.
    pub default_stream: String,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/dlq", get(dlq_list))
        .route("/dlq/replay", post(dlq_replay))
        // The original worker's endpoint and parameters.
        .route("/reprocess-dlq", get(dlq_replay))
        .with_state(state)
}

type ApiError = (StatusCode, Json<serde_json::Value>);

fn api_error(code: StatusCode, msg: impl Into<String>) -> ApiError {
    (code, Json(json!({"error": msg.into()})))
}

/// The dead-letter store, if the caller presented the admin token.
fn authorize(s: &AdminState, headers: &HeaderMap, query_token: Option<&str>) -> Result<Arc<SqlSink>, ApiError> {
    let Some(expected) = s.token.as_deref() else {
        return Err(api_error(StatusCode::FORBIDDEN, "dead-letter endpoints are disabled: set ADMIN_TOKEN"));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-admin-token").and_then(|v| v.to_str().ok()))
        .or(query_token);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => {}
        Some(_) => return Err(api_error(StatusCode::UNAUTHORIZED, "wrong admin token")),
        None => {
            return Err(api_error(
                StatusCode::UNAUTHORIZED,
                "admin token required (Authorization: Bearer <ADMIN_TOKEN>)",
            ))
        }
    }
    s.dlq
        .clone()
        .ok_or_else(|| api_error(StatusCode::CONFLICT, "the dead-letter sink is not SQL (DLQ_DB_CONNECTION is unset)"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The store and the filter of an authorized dead-letter request.
fn dlq_request(
    s: &AdminState,
    headers: &HeaderMap,
    t: &TokenQuery,
    q: &FilterQuery,
) -> Result<(Arc<SqlSink>, Filter), ApiError> {
    let sink = authorize(s, headers, t.token.as_deref())?;
    let filter = q.filter().map_err(|e| api_error(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok((sink, filter))
}

async fn dlq_list(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(t): Query<TokenQuery>,
    Query(q): Query<FilterQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (sink, filter) = dlq_request(&s, &headers, &t, &q)?;
    let rows = sink.list().await.map_err(|e| api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let rows = filter.apply(rows);
    Ok(Json(json!({"count": rows.len(), "rows": rows})))
}

async fn dlq_replay(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(t): Query<TokenQuery>,
    Query(q): Query<FilterQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (sink, filter) = dlq_request(&s, &headers, &t, &q)?;
    let redis = s.redis.clone().ok_or_else(|| api_error(StatusCode::SERVICE_UNAVAILABLE, "no redis connection"))?;
    let report = replay(&sink, &redis, &filter, &q.options(), &s.default_stream, |_| {})
        .await
        .map_err(|e| api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(
        replayed = report.replayed.len(),
        matched = report.matched,
        dry_run = report.dry_run,
        "dead letters replayed over the admin API"
    );
    Ok(Json(serde_json::to_value(report).unwrap_or_default()))
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
            dlq: None,
            token: Some("s3cret".into()),
            default_stream: "events:default".into(),
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
    async fn dead_letter_endpoints_need_the_token() {
        let s = state();
        let (code, body) = get(router(s.clone()), "/dlq").await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(get(router(s.clone()), "/reprocess-dlq?token=wrong").await.0, StatusCode::UNAUTHORIZED);
        // Right token, but no SQL store behind it.
        assert_eq!(get(router(s.clone()), "/reprocess-dlq?token=s3cret").await.0, StatusCode::CONFLICT);
        let disabled = AdminState { token: None, ..s };
        let (code, body) = get(router(disabled), "/dlq").await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(body.contains("ADMIN_TOKEN"), "{body}");
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc")
        );
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
