//! Reconcile against a mock API server (an HTTP server that records requests and answers
//! like the API server does for server-side apply). The real-API-server suite comes with the
//! test control plane.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use eventworker_operator::controller::{error_policy, reconcile, Context, Error};
use eventworker_operator::metrics::Metrics;
use eventworker_operator::EventWorker;
use kube::runtime::controller::Action;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
struct Req {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

#[derive(Clone, Default)]
struct ApiState {
    log: Arc<Mutex<Vec<Req>>>,
    /// Objects the GETs find, by path.
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
}

async fn api(State(s): State<ApiState>, method: Method, uri: Uri, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_string();
    s.log.lock().unwrap().push(Req {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().unwrap_or("").into(),
        body: body.clone(),
    });
    let not_found = || {
        (StatusCode::NOT_FOUND, axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})))
            .into_response()
    };
    match method {
        Method::GET => match s.objects.lock().unwrap().get(&path) {
            Some(v) => axum::Json(v.clone()).into_response(),
            None => not_found(),
        },
        // Server-side apply answers with the object; POST (events) with what was created.
        // A status patch answers with the whole object, status merged in.
        Method::PATCH if path.ends_with("/status") => {
            let base = s.objects.lock().unwrap().get(path.trim_end_matches("/status")).cloned();
            match base {
                Some(mut obj) => {
                    obj["status"] = body["status"].clone();
                    axum::Json(obj).into_response()
                }
                None => not_found(),
            }
        }
        Method::PATCH | Method::POST => {
            let mut obj = body;
            if obj.get("metadata").is_some() {
                obj["metadata"]["uid"] = json!("uid-1");
                obj["metadata"]["resourceVersion"] = json!("1");
            }
            (if method == Method::POST { StatusCode::CREATED } else { StatusCode::OK }, axum::Json(obj)).into_response()
        }
        _ => not_found(),
    }
}

struct MockApi {
    state: ApiState,
    client: kube::Client,
}

impl MockApi {
    async fn start() -> Self {
        let state = ApiState::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(api).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        Self { state, client }
    }

    fn put(&self, path: &str, obj: Value) {
        self.state.objects.lock().unwrap().insert(path.into(), obj);
    }

    fn take(&self) -> Vec<Req> {
        std::mem::take(&mut *self.state.log.lock().unwrap())
    }

    fn ctx(&self) -> Arc<Context> {
        let mut ctx = Context::new(self.client.clone(), Arc::new(Metrics::new()));
        ctx.redis_timeout = std::time::Duration::from_millis(500);
        Arc::new(ctx)
    }
}

fn patches<'a>(log: &'a [Req], suffix: &str) -> Vec<&'a Req> {
    log.iter().filter(|r| r.method == Method::PATCH && r.path.ends_with(suffix)).collect()
}

/// The EventWorker as stored in the (mock) API server.
fn worker(api: &MockApi, spec: Value) -> Arc<EventWorker> {
    let obj = json!({
        "apiVersion": "eventworker.io/v1alpha1",
        "kind": "EventWorker",
        "metadata": {"name": "orders", "namespace": "shop", "uid": "ew-uid", "generation": 2},
        "spec": spec,
    });
    api.put("/apis/eventworker.io/v1alpha1/namespaces/shop/eventworkers/orders", obj.clone());
    Arc::new(serde_json::from_value(obj).unwrap())
}

fn spec() -> Value {
    // Port 1 on loopback: nothing listens, so Redis is unreachable.
    json!({"redis": {"host": "127.0.0.1", "port": 1, "passwordSecretRef": {"name": "redis", "key": "password"}},
           "target": {"uri": "http://orders-api/events"}, "streams": [{"name": "fast"}]})
}

fn env_of(deploy: &Value) -> BTreeMap<String, Value> {
    deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

fn hash_of(deploy: &Value) -> String {
    deploy["spec"]["template"]["metadata"]["annotations"]["eventworker.io/config-hash"].as_str().unwrap().to_string()
}

fn secret(value: &str) -> Value {
    use base64::Engine;
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis", "namespace": "shop"},
           "data": {"password": base64::engine::general_purpose::STANDARD.encode(value)}})
}

#[tokio::test]
async fn create_applies_children_with_one_field_manager_and_reports_status() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw1"));
    let action = reconcile(worker(&api, spec()), api.ctx()).await.expect("reconcile");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(30)));
    let log = api.take();

    let deploys = patches(&log, "/apis/apps/v1/namespaces/shop/deployments/orders");
    assert_eq!(deploys.len(), 1);
    let d = &deploys[0];
    assert!(d.query.contains("fieldManager=eventworker-operator") && d.query.contains("force=true"), "{}", d.query);
    let env = env_of(&d.body);
    assert_eq!(env["STREAMS"]["value"], "fast");
    assert_eq!(env["REDIS_URL"]["value"], "redis://127.0.0.1:1");
    assert_eq!(env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"], "redis");
    assert_eq!(d.body["metadata"]["ownerReferences"][0]["uid"], "ew-uid");
    // The admin API always has a token: generated into an owned Secret when none is given.
    assert_eq!(env["ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], "orders-admin");
    let created: Vec<&Req> =
        log.iter().filter(|r| r.method == Method::POST && r.path == "/api/v1/namespaces/shop/secrets").collect();
    assert_eq!(created.len(), 1, "the token Secret is created");
    assert_eq!(created[0].body["metadata"]["name"], "orders-admin");
    assert_eq!(created[0].body["metadata"]["ownerReferences"][0]["uid"], "ew-uid");
    assert_eq!(created[0].body["stringData"]["token"].as_str().map(str::len), Some(64));

    let services = patches(&log, "/api/v1/namespaces/shop/services/orders");
    assert_eq!(services.len(), 1);
    assert!(services[0].query.contains("fieldManager=eventworker-operator"));
    assert!(patches(&log, "/poddisruptionbudgets/orders").is_empty(), "no PDB unless asked");
    assert!(patches(&log, "/servicemonitors/orders").is_empty(), "no ServiceMonitor unless asked");

    let status = patches(&log, "/eventworkers/orders/status");
    assert_eq!(status.len(), 1);
    let st = &status[0].body["status"];
    assert_eq!(st["observedGeneration"], 2);
    let degraded = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("RedisUnreachable")));
    assert!(
        log.iter().any(|r| r.method == Method::POST && r.path.contains("/events")),
        "a Kubernetes Event is published"
    );
}

#[tokio::test]
async fn unchanged_spec_is_a_no_op_and_a_secret_change_rolls() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw1"));
    let ew = worker(&api, spec());
    reconcile(ew.clone(), api.ctx()).await.unwrap();
    let first = patches(&api.take(), "/deployments/orders")[0].body.clone();
    reconcile(ew.clone(), api.ctx()).await.unwrap();
    let second = patches(&api.take(), "/deployments/orders")[0].body.clone();
    assert_eq!(first["spec"], second["spec"], "same spec, same Secret: the applied Deployment is identical");

    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw2"));
    reconcile(ew.clone(), api.ctx()).await.unwrap();
    let third = patches(&api.take(), "/deployments/orders")[0].body.clone();
    assert_ne!(hash_of(&first), hash_of(&third), "a Secret change changes the pod-template hash");

    let mut changed = (*ew).clone();
    changed.spec.target.uri = "http://orders-api/v2/events".into();
    reconcile(Arc::new(changed), api.ctx()).await.unwrap();
    let fourth = patches(&api.take(), "/deployments/orders")[0].body.clone();
    assert_eq!(env_of(&fourth)["DEFAULT_WORKER_URI"]["value"], "http://orders-api/v2/events");
    assert_ne!(hash_of(&third), hash_of(&fourth));
}

#[tokio::test]
async fn a_missing_secret_degrades() {
    let api = MockApi::start().await;
    reconcile(worker(&api, spec()), api.ctx()).await.unwrap();
    let log = api.take();
    let st = &patches(&log, "/status")[0].body["status"];
    let degraded = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!(degraded["reason"], "SecretMissing");
    assert!(degraded["message"].as_str().unwrap().contains("redis/password"));
}

#[tokio::test]
async fn invalid_spec_applies_nothing_and_waits_for_a_change() {
    let api = MockApi::start().await;
    let mut s = spec();
    s["redis"]["url"] = json!("redis://also-set:6379");
    let ew = worker(&api, s);
    let err = reconcile(ew.clone(), api.ctx()).await.expect_err("invalid");
    assert!(matches!(err, Error::InvalidSpec(_)), "{err}");
    let log = api.take();
    assert!(patches(&log, "/deployments/orders").is_empty());
    let st = &patches(&log, "/status")[0].body["status"];
    assert!(st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["reason"] == "InvalidSpec" && c["type"] == "Ready" && c["status"] == "False"));
    assert_eq!(error_policy(ew, &err, api.ctx()), Action::await_change());
}

#[tokio::test]
async fn service_monitor_only_when_asked_and_its_crd_exists() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw"));
    let mut s = spec();
    s["metrics"] = json!({"serviceMonitor": {"enabled": true}});
    s["disruptionBudget"] = json!({"maxUnavailable": 1});
    reconcile(worker(&api, s.clone()), api.ctx()).await.unwrap();
    let log = api.take();
    assert!(patches(&log, "/servicemonitors/orders").is_empty(), "no CRD, no ServiceMonitor");
    assert_eq!(patches(&log, "/poddisruptionbudgets/orders").len(), 1);
    let st = &patches(&log, "/status")[0].body["status"];
    assert!(st["conditions"].as_array().unwrap().iter().any(|c| c["reason"] == "RedisUnreachable"));

    api.put(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com",
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
               "spec": {"group": "monitoring.coreos.com", "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"}, "scope": "Namespaced", "versions": []}}),
    );
    reconcile(worker(&api, s), api.ctx()).await.unwrap();
    let log = api.take();
    let sm = patches(&log, "/apis/monitoring.coreos.com/v1/namespaces/shop/servicemonitors/orders");
    assert_eq!(sm.len(), 1);
    assert_eq!(sm[0].body["spec"]["endpoints"][0]["port"], "metrics");
}
