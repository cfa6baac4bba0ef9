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
    redis: crate::redis_pool::RedisPool,
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
    redis_timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let (config, allowed_names) = tls_config(&client, cert_file, key_file).await?;
    let allowed_names = Arc::new(allowed_names);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let tcp = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|e| anyhow::anyhow!("METRICS_API_PORT {port}: {e}"))?;
    let local = tcp.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Handshakes run concurrently: one slow client must not hold up the others.
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "metrics API: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (acceptor, tx, allowed) = (acceptor.clone(), tx.clone(), allowed_names.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        // The front proxy's certificate must carry an allowed name, as the API
                        // server's own request-header authenticator requires.
                        let cn =
                            tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| subject_cn(c));
                        if !allowed.is_empty() && !cn.as_ref().is_some_and(|cn| allowed.contains(cn)) {
                            tracing::warn!(%peer, ?cn, "metrics API: client certificate name not in requestheader-allowed-names");
                            return;
                        }
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
        redis: crate::redis_pool::RedisPool::new(redis_timeout),
        values: Mutex::default(),
        decisions: Mutex::default(),
    }));
    tracing::info!(port, "external metrics API listening (TLS, front-proxy client certificates)");
    axum::serve(TlsListener { rx, local }, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

/// Who may connect: the request-header CA and the names its certificates may carry.
struct FrontProxy {
    roots: rustls::RootCertStore,
    /// `requestheader-allowed-names`; empty: any certificate of that CA.
    allowed_names: Vec<String>,
}

async fn front_proxy(client: &Client) -> anyhow::Result<FrontProxy> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let cm = cms.get("extension-apiserver-authentication").await.map_err(|e| {
        anyhow::anyhow!("reading kube-system/extension-apiserver-authentication (the request-header CA): {e}")
    })?;
    let data = cm.data.unwrap_or_default();
    let ca = data.get("requestheader-client-ca-file").ok_or_else(|| {
        anyhow::anyhow!(
            "kube-system/extension-apiserver-authentication has no requestheader-client-ca-file: \
             the API server runs without an aggregation layer (--requestheader-client-ca-file)"
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c?)?;
    }
    let allowed_names = data
        .get("requestheader-allowed-names")
        .map(|v| serde_json::from_str::<Vec<String>>(v).unwrap_or_default())
        .unwrap_or_default();
    Ok(FrontProxy { roots, allowed_names })
}

/// Server certificate from files (re-read when they change: a rotated Secret reaches the
/// pod without a restart); clients must present a certificate of the request-header CA.
async fn tls_config(
    client: &Client,
    cert_file: &str,
    key_file: &str,
) -> anyhow::Result<(rustls::ServerConfig, Vec<String>)> {
    let front = front_proxy(client).await?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = ReloadingCert::load(cert_file, key_file, &provider)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(front.roots), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("request-header CA: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(certs));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, front.allowed_names))
}

/// The serving certificate, re-read from its files at most every 10 s when they changed.
#[derive(Debug)]
struct ReloadingCert {
    cert_file: String,
    key_file: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    state: Mutex<(Instant, Option<std::time::SystemTime>, Arc<rustls::sign::CertifiedKey>)>,
}

impl ReloadingCert {
    fn load(cert_file: &str, key_file: &str, provider: &Arc<rustls::crypto::CryptoProvider>) -> anyhow::Result<Self> {
        let key = Self::read(cert_file, key_file, provider)?;
        Ok(Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            provider: provider.clone(),
            state: Mutex::new((Instant::now(), modified(cert_file, key_file), Arc::new(key))),
        })
    }

    fn read(
        cert_file: &str,
        key_file: &str,
        provider: &rustls::crypto::CryptoProvider,
    ) -> anyhow::Result<rustls::sign::CertifiedKey> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| anyhow::anyhow!("METRICS_API_CERT_FILE {cert_file}: {e}"))?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| anyhow::anyhow!("METRICS_API_KEY_FILE {key_file}: {e}"))?;
        rustls::sign::CertifiedKey::from_der(certs, key, provider)
            .map_err(|e| anyhow::anyhow!("METRICS_API_CERT_FILE / METRICS_API_KEY_FILE: {e}"))
    }
}

fn modified(cert_file: &str, key_file: &str) -> Option<std::time::SystemTime> {
    let m = |f: &str| std::fs::metadata(f).and_then(|m| m.modified()).ok();
    m(cert_file).max(m(key_file))
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let mut st = crate::lock(&self.state);
        if st.0.elapsed() >= Duration::from_secs(10) {
            st.0 = Instant::now();
            let now = modified(&self.cert_file, &self.key_file);
            if now != st.1 {
                match Self::read(&self.cert_file, &self.key_file, &self.provider) {
                    Ok(key) => {
                        tracing::info!("external metrics API: serving certificate reloaded");
                        *st = (Instant::now(), now, Arc::new(key));
                    }
                    // Half-written during a Secret update: keep the old one, try again later.
                    Err(e) => tracing::warn!(error = %e, "external metrics API: certificate not reloaded"),
                }
            }
        }
        Some(st.2.clone())
    }
}

/// The subject common name of a DER certificate (enough DER to walk to it).
pub fn subject_cn(der: &[u8]) -> Option<String> {
    /// One TLV: (tag, contents, rest).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&len0, mut b) = b.split_first()?;
        let len = if len0 < 0x80 {
            len0 as usize
        } else {
            let n = (len0 & 0x7f) as usize;
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    // version [0] (optional), serial, signature, issuer, validity, subject
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (_, mut subject, _) = tlv(tbs)?;
    let mut cn = None;
    while !subject.is_empty() {
        let (_, set, rest) = tlv(subject)?;
        subject = rest;
        let (_, atv, _) = tlv(set)?;
        let (_, oid, rest) = tlv(atv)?;
        if oid == [0x55, 0x04, 0x03] {
            let (_, value, _) = tlv(rest)?;
            cn = Some(String::from_utf8_lossy(value).into_owned());
        }
    }
    cn
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
                format!("{user} may not list {metric} in external.metrics.k8s.io in namespace {ns}"),
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
    let found = match &wanted {
        Some(name) => ews.get_opt(name).await.map(|f| f.into_iter().collect::<Vec<_>>()),
        None => ews.list(&ListParams::default()).await.map(|l| l.items),
    };
    let list = match found {
        Ok(l) => l,
        // A namespace this operator does not watch (chart watchNamespace): nothing here.
        Err(kube::Error::Api(e)) if e.code == 403 => vec![],
        Err(e) => return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()),
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
                    // A read of namespaces/{ns}/{metric} has no object name: the API server
                    // authorizes it as `list`, so do we.
                    group: Some("external.metrics.k8s.io".into()),
                    version: Some("v1beta1".into()),
                    resource: Some(metric.into()),
                    namespace: Some(ns.into()),
                    verb: Some("list".into()),
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
        let group = crate::resources::deployment::group(ew);
        let (streams, _) = self.0.redis.read_backlog(&url, &names, &group).await?;
        let v = crate::scaler::Load::from_status(&ew.spec, &streams, 0).weighted_backlog();
        let mut values = crate::lock(&self.0.values);
        values.retain(|_, (at, _)| at.elapsed() < FRESH);
        values.insert(key, (Instant::now(), v));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/O=eventworker/CN=front-proxy-client`, issued by `/CN=test-front-proxy-ca` (openssl).
    const FRONT_PROXY_PEM: &str = include_str!("../tests/front-proxy-client.pem");

    #[test]
    fn the_subject_cn_of_a_certificate() {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(FRONT_PROXY_PEM.as_bytes()).unwrap();
        assert_eq!(subject_cn(&der).as_deref(), Some("front-proxy-client"));
        assert_eq!(subject_cn(&der[..40]), None, "truncated: no name, no panic");
        assert_eq!(subject_cn(b""), None);
    }

    #[test]
    fn the_selector_names_one_eventworker() {
        assert_eq!(selected_name("eventworker.io/name=orders"), Ok(Some("orders".into())));
        assert_eq!(selected_name("eventworker.io/name==orders"), Ok(Some("orders".into())));
        assert_eq!(selected_name(""), Ok(None));
        assert!(selected_name("app=x").unwrap_err().contains("only eventworker.io/name"));
        assert!(selected_name("eventworker.io/name in (a,b)").is_err());
    }
}
