//! Admin server on METRICS_PORT: /metrics, /health (the original's), /healthz, /readyz.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::streams::Conn;
use axum::extract::{Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::dlq::redrive::{
    gather, replay, unknown_params, Filter, FilterQuery, ReplayReport, Targets, LIST_PARAMS, REPLAY_PARAMS,
};
use crate::dlq::SqlSink;
use crate::metrics::Metrics;

/// What readiness is made of, updated by the tasks that find out.
#[derive(Default)]
pub struct Health {
    pub redis_ok: AtomicBool,
    groups: Mutex<BTreeMap<String, bool>>,
    dlq_error: Mutex<Option<String>>,
    /// Why the outbox clean-up cannot delete rows now (they wait in Redis meanwhile).
    cleanup_error: Mutex<Option<String>>,
    /// Where Redis is (host:port, no credentials), for the reasons given.
    redis_addr: String,
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

    /// Name the Redis address (`host:port`, without credentials) in the reasons.
    pub fn redis_at(mut self, addr: String) -> Self {
        self.redis_addr = addr;
        self
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

    pub fn set_cleanup_error(&self, err: Option<String>) {
        *crate::lock(&self.cleanup_error) = err;
    }

    pub fn cleanup_error(&self) -> Option<String> {
        crate::lock(&self.cleanup_error).clone()
    }

    /// Reasons the worker is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.redis_ok.load(Ordering::Relaxed) {
            out.push(match self.redis_addr.as_str() {
                "" => "redis unreachable".to_string(),
                addr => format!("redis unreachable at {addr}"),
            });
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
    pub redis: Option<Conn>,
    /// The SQL dead-letter store, when that is the configured sink.
    pub dlq: Option<Arc<SqlSink>>,
    /// `ADMIN_TOKEN`: required by the dead-letter endpoints. Without it `/dlq` and
    /// `/dlq/replay` are disabled and `/reprocess-dlq` is open, as the original's was.
    pub token: Option<String>,
    /// Where replays may go: the worker's own streams.
    pub targets: Targets,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/dlq", get(dlq_list))
        .route("/dlq/{id}", get(dlq_show))
        .route("/dlq/replay", post(dlq_replay))
        // The original worker's endpoint and parameters.
        .route("/reprocess-dlq", get(reprocess_dlq))
        .with_state(state)
}

type ApiError = (StatusCode, Json<serde_json::Value>);

fn api_error(code: StatusCode, msg: impl Into<String>) -> ApiError {
    (code, Json(json!({"error": msg.into()})))
}

/// Whether the caller presented the admin token.
fn authorize(s: &AdminState, headers: &HeaderMap, query_token: Option<&str>) -> Result<(), ApiError> {
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
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(api_error(StatusCode::UNAUTHORIZED, "wrong admin token")),
        None => Err(api_error(StatusCode::UNAUTHORIZED, "admin token required (Authorization: Bearer <ADMIN_TOKEN>)")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn filter_of(q: &FilterQuery) -> Result<Filter, ApiError> {
    q.filter().map_err(|e| api_error(StatusCode::BAD_REQUEST, e.to_string()))
}

/// 400 naming every parameter the endpoint does not take.
fn known_params(raw: &Option<String>, known: &[&str]) -> Result<(), ApiError> {
    let unknown = unknown_params(raw.as_deref(), known);
    if unknown.is_empty() {
        return Ok(());
    }
    Err(api_error(
        StatusCode::BAD_REQUEST,
        format!("unknown query parameter(s): {}; this endpoint takes {}", unknown.join(", "), known.join(", ")),
    ))
}

async fn dlq_list(
    State(s): State<AdminState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    Query(t): Query<TokenQuery>,
    Query(q): Query<FilterQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers, t.token.as_deref())?;
    known_params(&raw, LIST_PARAMS)?;
    let filter = filter_of(&q)?;
    let (rows, _) = gather(s.dlq.as_deref(), s.redis.as_ref())
        .await
        .map_err(|e| api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let rows = filter.apply(rows);
    Ok(Json(json!({"count": rows.len(), "rows": rows})))
}

/// `GET /dlq/{id}`: the letters with this id in full (payload, meta), from every store.
async fn dlq_show(
    State(s): State<AdminState>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
    RawQuery(raw): RawQuery,
    Query(t): Query<TokenQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers, t.token.as_deref())?;
    known_params(&raw, &["token"])?;
    let unavailable = |e: crate::Error| api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let mut letters = Vec::new();
    if let Some(sql) = s.dlq.as_deref() {
        letters.extend(sql.get(&id).await.map_err(unavailable)?);
    }
    if let Some(redis) = s.redis.as_ref() {
        let (_, kept) = gather(None, Some(redis)).await.map_err(unavailable)?;
        letters.extend(kept.into_values().filter(|f| f.row.id == id));
    }
    if letters.is_empty() {
        return Err(api_error(StatusCode::NOT_FOUND, format!("no dead letter with id {id:?}")));
    }
    let rows: Vec<serde_json::Value> = letters
        .iter()
        .map(|l| {
            let mut v = serde_json::to_value(&l.row).unwrap_or_default();
            v["meta"] = l
                .meta
                .as_deref()
                .map(|m| serde_json::from_str(m).unwrap_or_else(|_| json!(m)))
                .unwrap_or(serde_json::Value::Null);
            v["payload"] = json!(l.payload);
            v
        })
        .collect();
    Ok(Json(json!({"count": rows.len(), "rows": rows})))
}

/// `scoped`: a replay without a filter needs `all=true` (the original's `/reprocess-dlq`
/// replays everything when asked without parameters, as it always did).
async fn run_replay(
    s: &AdminState,
    raw: &Option<String>,
    q: &FilterQuery,
    scoped: bool,
) -> Result<ReplayReport, ApiError> {
    known_params(raw, REPLAY_PARAMS)?;
    let filter = filter_of(q)?;
    let mut opts = q.options().map_err(|e| api_error(StatusCode::BAD_REQUEST, e.to_string()))?;
    if !scoped {
        opts.all = true;
    }
    opts.check_scope(&filter).map_err(|e| api_error(StatusCode::BAD_REQUEST, e.to_string()))?;
    let redis = s.redis.clone().ok_or_else(|| api_error(StatusCode::SERVICE_UNAVAILABLE, "no redis connection"))?;
    let report = replay(s.dlq.as_deref(), Some(&redis), &filter, &opts, &s.targets, |_| {}).await.map_err(|e| {
        let code = if matches!(e, crate::Error::Invalid(_)) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        api_error(code, e.to_string())
    })?;
    tracing::info!(
        replayed = report.replayed.len(),
        matched = report.matched,
        dry_run = report.dry_run,
        "dead letters replayed over the admin API"
    );
    Ok(report)
}

async fn dlq_replay(
    State(s): State<AdminState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    Query(t): Query<TokenQuery>,
    Query(q): Query<FilterQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers, t.token.as_deref())?;
    let report = run_replay(&s, &raw, &q, true).await?;
    Ok(Json(serde_json::to_value(report).unwrap_or_default()))
}

/// The original's `GET /reprocess-dlq`: with `ADMIN_TOKEN` set it needs the token and
/// answers JSON like `/dlq/replay`; without, it is open, as the original's was (a warning
/// says so at start-up), and answers plain text, one line per replayed letter.
async fn reprocess_dlq(
    State(s): State<AdminState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    Query(t): Query<TokenQuery>,
    Query(q): Query<FilterQuery>,
) -> axum::response::Response {
    if s.token.is_some() {
        if let Err(e) = authorize(&s, &headers, t.token.as_deref()) {
            return e.into_response();
        }
        return match run_replay(&s, &raw, &q, false).await {
            Ok(report) => Json(serde_json::to_value(report).unwrap_or_default()).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let text = |code: StatusCode, body: String| (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body);
    match run_replay(&s, &raw, &q, false).await {
        Ok(report) => {
            let verb = if report.dry_run { "would reprocess" } else { "reprocessed" };
            let mut out = String::new();
            for m in &report.replayed {
                out.push_str(&format!(
                    "{verb} {} -> {}{}\n",
                    m.id,
                    m.stream,
                    m.entry.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                ));
            }
            out.push_str(&format!("{verb} {} of {} dead letter(s)\n", report.replayed.len(), report.matched));
            text(StatusCode::OK, out).into_response()
        }
        Err((code, Json(body))) => {
            text(code, format!("error: {}\n", body["error"].as_str().unwrap_or_default())).into_response()
        }
    }
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
    let mut body = if problems.is_empty() {
        json!({"status": "ready"})
    } else {
        json!({"status": "not ready", "problems": problems})
    };
    // Delivery goes on while outbox rows wait to be deleted: said here, not a reason to
    // stop receiving traffic.
    if s.dlq.as_ref().is_some_and(|d| d.may_be_outbox()) {
        body["outbox_cleanups_pending"] = json!(s.metrics.outbox_cleanups_pending.get());
        if let Some(e) = s.health.cleanup_error() {
            body["outbox_cleanup_error"] = json!(e);
        }
    }
    let code = if problems.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
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
            health: Arc::new(Health::new(&["fast".to_string()]).redis_at("redis.shop:6379".into())),
            redis: None,
            dlq: None,
            token: Some("s3cret".into()),
            targets: Targets { streams: vec!["events:fast".into()], default: "events:fast".into() },
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
        // Right token, but no Redis behind it.
        assert_eq!(get(router(s.clone()), "/reprocess-dlq?token=s3cret").await.0, StatusCode::SERVICE_UNAVAILABLE);
        let disabled = AdminState { token: None, ..s };
        let (code, body) = get(router(disabled), "/dlq").await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(body.contains("ADMIN_TOKEN"), "{body}");
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc")
        );
    }

    async fn post(router: Router, path: &str) -> (StatusCode, String) {
        let resp = router.oneshot(Request::post(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn mistyped_or_missing_filters_never_replay() {
        let s = state();
        // A misspelled dry_run, a misspelled ids: refused by name before anything happens.
        let (code, body) = post(router(s.clone()), "/dlq/replay?token=s3cret&dryrun=true&ids=9999").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("unknown query parameter(s): dryrun"), "{body}");
        let (code, body) = get(router(s.clone()), "/dlq?token=s3cret&id=1001").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("unknown query parameter(s): id;"), "{body}");
        // A replay without a filter must say all=true; a malformed flag is not "false".
        let (code, body) = post(router(s.clone()), "/dlq/replay?token=s3cret").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("all=true"), "{body}");
        let (code, body) = post(router(s.clone()), "/dlq/replay?token=s3cret&ids=1&dry_run=maybe").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("dry_run=") && body.contains("use true or false"), "{body}");
        let (code, body) = post(router(s.clone()), "/dlq/replay?token=s3cret&limit=ten").await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("limit"), "{body}");
        // Well-formed and scoped: it gets as far as Redis (none here).
        for ok in [
            "/dlq/replay?token=s3cret&all=true",
            "/dlq/replay?token=s3cret&ids=1,2",
            "/dlq/replay?token=s3cret&dry_run",
        ] {
            assert_eq!(post(router(s.clone()), ok).await.0, StatusCode::SERVICE_UNAVAILABLE, "{ok}");
        }
        // The original's endpoint replays everything when asked without a filter, as it did.
        assert_eq!(get(router(s.clone()), "/reprocess-dlq?token=s3cret").await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(router(s), "/reprocess-dlq?token=s3cret&dryrun=1").await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn readiness_says_why_not() {
        let s = state();
        let (code, body) = get(router(s.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("redis unreachable at redis.shop:6379")
                && body.contains("consumer group missing on events:fast"),
            "{body}"
        );
        s.health.redis_ok.store(true, Ordering::Relaxed);
        s.health.set_group("events:fast", true);
        assert_eq!(get(router(s.clone()), "/readyz").await.0, StatusCode::OK);
        s.health.set_dlq_error(Some("http://dlq answered 500".into()));
        let (code, body) = get(router(s), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("dead-letter sink failing"), "{body}");
    }
}
