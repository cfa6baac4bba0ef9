//! The External metrics API (`external.metrics.k8s.io/v1beta1`) for `autoscaling.mode: hpa`:
//! one metric, `eventworker-backlog`, the weighted backlog of an EventWorker's streams (the
//! definition in `backlog/`), for a HorizontalPodAutoscaler on the EventWorker.
//!
//! Served over TLS to the API server's aggregation layer only: the caller must present a
//! client certificate signed by the request-header CA that the API server publishes in
//! `kube-system/extension-apiserver-authentication` (the front proxy's), and the user it
//! names in `X-Remote-User` / `X-Remote-Group` must be allowed to `get` the metric (a
//! SubjectAccessReview, as any aggregated API server delegates authorization). Any replica
//! answers (the standby too): values are read from Redis on request, cached a few seconds.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use tokio_rustls::rustls;

use crate::crd::EventWorker;

pub const GROUP_VERSION: &str = "external.metrics.k8s.io/v1beta1";
/// The one metric.
pub const METRIC: &str = "eventworker-backlog";
/// Label selecting an EventWorker by name in the HPA's metric selector.
pub const NAME_LABEL: &str = "eventworker.io/name";

/// How long a value read from Redis is reused.
const FRESH: Duration = Duration::from_secs(5);
/// How long an authorization decision is reused.
const AUTHZ_FRESH: Duration = Duration::from_secs(30);

struct Inner {
    client: Client,
    redis_timeout: Duration,
    values: Mutex<HashMap<(String, String), (Instant, f64)>>,
    decisions: Mutex<HashMap<String, (Instant, bool)>>,
}

#[derive(Clone)]
struct ApiState(Arc<Inner>);

/// Serve the API on `port` with the certificate and key in PEM files, until `shutdown`.
pub async fn serve(
    client: Client,
    port: u16,
    cert_file: &str,
    key_file: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let config = tls_config(&client, cert_file, key_file).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let tcp = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|e| anyhow::anyhow!("METRICS_API_PORT {port}: {e}"))?;
    let local = tcp.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Handshakes run concurrently: one slow client must not hold up the others.
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = tcp.accept().await else { continue };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics API: TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "metrics API: TLS handshake timed out"),
                }
            });
        }
    });
    let state = ApiState(Arc::new(Inner {
        client,
        redis_timeout: Duration::from_secs(3),
        values: Mutex::default(),
        decisions: Mutex::default(),
    }));
    tracing::info!(port, "external metrics API listening (TLS, front-proxy client certificates)");
    axum::serve(TlsListener { rx, local }, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

/// Server certificate from files; clients must present a certificate of the API server's
/// request-header CA.
async fn tls_config(client: &Client, cert_file: &str, key_file: &str) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("METRICS_API_CERT_FILE {cert_file}: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| anyhow::anyhow!("METRICS_API_KEY_FILE {key_file}: {e}"))?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let cm = cms.get("extension-apiserver-authentication").await.map_err(|e| {
        anyhow::anyhow!("reading kube-system/extension-apiserver-authentication (the request-header CA): {e}")
    })?;
    let ca = cm.data.as_ref().and_then(|d| d.get("requestheader-client-ca-file")).ok_or_else(|| {
        anyhow::anyhow!(
            "kube-system/extension-apiserver-authentication has no requestheader-client-ca-file: \
             the API server runs without an aggregation layer (--requestheader-client-ca-file)"
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("request-header CA: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("METRICS_API_CERT_FILE / METRICS_API_KEY_FILE: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Connections whose TLS handshake (with a verified client certificate) is done.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task never ends; should it, serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

fn router(state: ApiState) -> Router {
    Router::new()
        .route("/apis/external.metrics.k8s.io/v1beta1", get(discovery))
        .route("/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}", get(value))
        .with_state(state)
}

async fn discovery() -> Json<Value> {
    Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION,
        "resources": [{"name": METRIC, "singularName": "", "namespaced": true,
                       "kind": "ExternalMetricValueList", "verbs": ["get"]}],
    }))
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                      "reason": reason, "code": code.as_u16()});
    (code, Json(body)).into_response()
}

async fn value(
    State(s): State<ApiState>,
    Path((ns, metric)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(user) = headers.get("x-remote-user").and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "no X-Remote-User from the front proxy".into());
    };
    let groups: Vec<String> =
        headers.get_all("x-remote-group").iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect();
    match s.authorized(&user, &groups, &ns, &metric).await {
        Ok(true) => {}
        Ok(false) => {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("{user} may not get {metric} in external.metrics.k8s.io in namespace {ns}"),
            )
        }
        Err(e) => return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", format!("authorization: {e}")),
    }
    if metric != METRIC {
        return status(StatusCode::NOT_FOUND, "NotFound", format!("no metric {metric}; this server has {METRIC}"));
    }
    let wanted = match q.get("labelSelector").map(|s| selected_name(s)).transpose() {
        Ok(w) => w.flatten(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let ews: Api<EventWorker> = Api::namespaced(s.0.client.clone(), &ns);
    let list = match &wanted {
        Some(name) => match ews.get_opt(name).await {
            Ok(found) => found.into_iter().collect(),
            Err(e) => return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()),
        },
        None => match ews.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()),
        },
    };
    if let (Some(name), true) = (&wanted, list.is_empty()) {
        return status(StatusCode::NOT_FOUND, "NotFound", format!("no EventWorker {name} in {ns}"));
    }
    let mut items = Vec::new();
    for ew in &list {
        match s.weighted_backlog(ew).await {
            Ok(v) => items.push(json!({
                "metricName": METRIC,
                "metricLabels": {NAME_LABEL: ew.name_any()},
                "timestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
                "value": format!("{}", v.ceil() as i64),
            })),
            // An HPA must not act on a guess: no value, and it keeps the replicas.
            Err(e) => {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!("backlog of {}/{}: {e}", ns, ew.name_any()),
                )
            }
        }
    }
    Json(json!({"kind": "ExternalMetricValueList", "apiVersion": GROUP_VERSION, "metadata": {}, "items": items}))
        .into_response()
}

/// The EventWorker a label selector names (`eventworker.io/name=orders`), if any; other
/// labels are refused (there are none to match).
fn selected_name(selector: &str) -> Result<Option<String>, String> {
    let mut name = None;
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| format!("labelSelector {selector:?}: only {NAME_LABEL}=<name> is supported"))?;
        if k.trim() != NAME_LABEL {
            return Err(format!("labelSelector {selector:?}: only {NAME_LABEL}=<name> is supported"));
        }
        name = Some(v.trim().to_string());
    }
    Ok(name)
}

impl ApiState {
    async fn authorized(&self, user: &str, groups: &[String], ns: &str, metric: &str) -> kube::Result<bool> {
        let key = format!("{user}\0{}\0{ns}\0{metric}", groups.join(","));
        if let Some((at, ok)) = crate::lock(&self.0.decisions).get(&key) {
            if at.elapsed() < AUTHZ_FRESH {
                return Ok(*ok);
            }
        }
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.into()),
                groups: Some(groups.to_vec()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("external.metrics.k8s.io".into()),
                    resource: Some(metric.into()),
                    namespace: Some(ns.into()),
                    verb: Some("get".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.0.client.clone());
        let ok = api.create(&PostParams::default(), &sar).await?.status.is_some_and(|s| s.allowed);
        let mut d = crate::lock(&self.0.decisions);
        d.retain(|_, (at, _)| at.elapsed() < AUTHZ_FRESH);
        d.insert(key, (Instant::now(), ok));
        Ok(ok)
    }

    /// Σ weight × backlog of the EventWorker's streams, read from its Redis (cached).
    async fn weighted_backlog(&self, ew: &EventWorker) -> Result<f64, String> {
        let key = (ew.namespace().unwrap_or_default(), ew.name_any());
        if let Some((at, v)) = crate::lock(&self.0.values).get(&key) {
            if at.elapsed() < FRESH {
                return Ok(*v);
            }
        }
        let ns = key.0.clone();
        let (secrets, _) = crate::controller::read_secrets(&self.0.client, ew, &ns).await.map_err(|e| e.to_string())?;
        let url = crate::status::redis_url(ew, &secrets);
        let names: Vec<String> = ew.spec.streams.iter().map(|s| s.name.clone()).collect();
        let (streams, _) = crate::status::read_backlog(&url, &names, &ew.spec.group, self.0.redis_timeout).await?;
        let v = ew
            .spec
            .streams
            .iter()
            .zip(&streams)
            .map(|(s, st)| s.autoscaling_weight.unwrap_or(1.0) * st.backlog as f64)
            .sum();
        let mut values = crate::lock(&self.0.values);
        values.retain(|_, (at, _)| at.elapsed() < FRESH);
        values.insert(key, (Instant::now(), v));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selector_names_one_eventworker() {
        assert_eq!(selected_name("eventworker.io/name=orders"), Ok(Some("orders".into())));
        assert_eq!(selected_name("eventworker.io/name==orders"), Ok(Some("orders".into())));
        assert_eq!(selected_name(""), Ok(None));
        assert!(selected_name("app=x").unwrap_err().contains("only eventworker.io/name"));
        assert!(selected_name("eventworker.io/name in (a,b)").is_err());
    }
}
