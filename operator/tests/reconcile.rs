//! Reconcile against a mock API server (an HTTP server that records requests and answers
//! like the API server does for server-side apply). The real-API-server suite comes with the
//! test control plane.

#[path = "../../worker/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use eventworker_operator::controller::{error_policy, reconcile, Context, Error, Settings};
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
    /// Objects the GETs find, by path; applies store what they applied.
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// PATCH and PUT refusals by path: (code, message).
    refuse: Arc<Mutex<BTreeMap<String, (u16, String)>>>,
    versions: Arc<std::sync::atomic::AtomicU64>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message})
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
    let not_found = || (StatusCode::NOT_FOUND, axum::Json(status_body(404, "NotFound", "not found"))).into_response();
    if let Some((code, msg)) = s.refuse.lock().unwrap().get(&path).cloned() {
        if method == Method::PATCH || method == Method::PUT {
            let code = StatusCode::from_u16(code).unwrap();
            return (code, axum::Json(status_body(code.as_u16(), "Invalid", &msg))).into_response();
        }
    }
    let rv = s.versions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    match method {
        Method::GET => match s.objects.lock().unwrap().get(&path) {
            Some(v) => axum::Json(v.clone()).into_response(),
            None => not_found(),
        },
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
        // Server-side apply stores and answers with the object; POST (events, Secrets) and
        // PUT (Leases) answer with what was written.
        Method::PATCH | Method::POST | Method::PUT => {
            let mut obj = body;
            if obj.get("metadata").is_some() {
                obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                if method == Method::PATCH {
                    let mut objects = s.objects.lock().unwrap();
                    let generation = objects.get(&path).and_then(|o| o["metadata"]["generation"].as_i64()).unwrap_or(0);
                    let same = objects.get(&path).is_some_and(|o| o["spec"] == obj["spec"]);
                    obj["metadata"]["generation"] = json!(if same { generation } else { generation + 1 });
                    objects.insert(path.clone(), obj.clone());
                }
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

    fn get(&self, path: &str) -> Option<Value> {
        self.state.objects.lock().unwrap().get(path).cloned()
    }

    fn refuse(&self, path: &str, code: u16, message: &str) {
        self.state.refuse.lock().unwrap().insert(path.into(), (code, message.into()));
    }

    fn take(&self) -> Vec<Req> {
        std::mem::take(&mut *self.state.log.lock().unwrap())
    }

    fn ctx(&self) -> Arc<Context> {
        let settings = Settings { redis_timeout: std::time::Duration::from_millis(500), ..Default::default() };
        Arc::new(Context::new(self.client.clone(), Arc::new(Metrics::new()), settings))
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

const DEPLOY_PATH: &str = "/apis/apps/v1/namespaces/shop/deployments/orders";

fn condition(status: &Value, type_: &str) -> (String, String, String) {
    let c = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).unwrap();
    (c["status"].as_str().unwrap().into(), c["reason"].as_str().unwrap().into(), c["message"].as_str().unwrap().into())
}

fn events<'a>(log: &'a [Req], reason: &str) -> Vec<&'a Req> {
    log.iter()
        .filter(|r| r.method == Method::POST && r.path.ends_with("/events") && r.body["reason"] == reason)
        .collect()
}

/// The EventWorker with the status the last reconcile wrote, as the next one sees it.
fn with_written_status(ew: &EventWorker, log: &[Req]) -> Arc<EventWorker> {
    let mut ew = ew.clone();
    let st = &patches(log, "/eventworkers/orders/status").last().expect("a status write").body["status"];
    ew.status = Some(serde_json::from_value(st.clone()).unwrap());
    Arc::new(ew)
}

fn requeue_within(action: &Action, lo: u64, hi: u64) {
    let d = action.requeue_after().unwrap_or_else(|| panic!("{action:?} requeues"));
    assert!(
        d >= std::time::Duration::from_secs(lo) && d <= std::time::Duration::from_secs(hi),
        "{d:?} not in {lo}..{hi}s"
    );
}

trait RequeueAfter {
    fn requeue_after(&self) -> Option<std::time::Duration>;
}

impl RequeueAfter for Action {
    fn requeue_after(&self) -> Option<std::time::Duration> {
        // Action keeps its delay private; its Debug form shows it (`Some(29.5s)`, `Some(950ms)`).
        let dbg = format!("{self:?}");
        let d = dbg.split("Some(").nth(1)?.split(')').next()?;
        let (num, unit) = d.split_at(d.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
        let n: f64 = num.parse().ok()?;
        let secs = match unit {
            "s" => n,
            "ms" => n / 1e3,
            "µs" => n / 1e6,
            "ns" => n / 1e9,
            _ => return None,
        };
        Some(std::time::Duration::from_secs_f64(secs))
    }
}

#[tokio::test]
async fn create_applies_children_with_one_field_manager_and_reports_status() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw1"));
    let action = reconcile(worker(&api, spec()), api.ctx()).await.expect("reconcile");
    requeue_within(&action, 27, 33);
    let log = api.take();

    let deploys = patches(&log, DEPLOY_PATH);
    assert_eq!(deploys.len(), 1);
    let d = &deploys[0];
    assert!(d.query.contains("fieldManager=eventworker-operator") && d.query.contains("force=true"), "{}", d.query);
    let env = env_of(&d.body);
    assert_eq!(env["STREAMS"]["value"], "fast");
    assert_eq!(env["REDIS_URL"]["value"], "redis://127.0.0.1:1");
    assert_eq!(env["GROUP"]["value"], "orders", "each EventWorker its own consumer group");
    assert_eq!(env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"], "redis");
    assert_eq!(d.body["metadata"]["ownerReferences"][0]["uid"], "ew-uid");
    assert_eq!(d.body["spec"]["template"]["spec"]["containers"][0]["image"], eventworker_operator::crd::DEFAULT_IMAGE);
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
    assert!(
        !log.iter().any(|r| r.path.contains("/secrets") && r.query.contains("watch")),
        "Secrets are never listed or watched"
    );

    let status = patches(&log, "/eventworkers/orders/status");
    assert_eq!(status.len(), 1);
    let st = &status[0].body["status"];
    assert_eq!(st["observedGeneration"], 2);
    assert_eq!(st["image"], eventworker_operator::crd::DEFAULT_IMAGE);
    assert_eq!(st["group"], "orders");
    let (s, reason, msg) = condition(st, "RedisReachable");
    assert_eq!((s.as_str(), reason.as_str()), ("False", "Unreachable"));
    assert_eq!(msg, "redis at 127.0.0.1:1: connection refused", "sanitised: no password, the server's address");
    assert_eq!(condition(st, "Degraded").0, "False", "an unreachable Redis is not the operator's failure");
    assert_eq!(events(&log, "RedisUnreachable").len(), 1, "a Kubernetes Event is published");
}

#[tokio::test]
async fn unchanged_objects_are_not_written_again_and_a_secret_change_rolls() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw1"));
    let ew = worker(&api, spec());
    let ctx = api.ctx();
    reconcile(ew.clone(), ctx.clone()).await.unwrap();
    let log = api.take();
    let first = patches(&log, DEPLOY_PATH)[0].body.clone();
    let ew = with_written_status(&ew, &log);

    reconcile(ew.clone(), ctx.clone()).await.unwrap();
    let log = api.take();
    let writes: Vec<_> =
        log.iter().filter(|r| r.method != Method::GET).map(|r| format!("{} {}", r.method, r.path)).collect();
    assert!(writes.is_empty(), "nothing changed, nothing written (children, status, events): {writes:?}");
    let reads: Vec<&str> = log.iter().map(|r| r.path.as_str()).collect();
    assert!(
        !reads.iter().any(|p| p.contains("poddisruptionbudgets")
            || p.contains("customresourcedefinitions")
            || p.ends_with("/secrets/orders-admin")),
        "known absent children, optional CRDs and the admin Secret are not looked up at every resync: {reads:?}"
    );

    // Drift: someone edits the Deployment (its generation moves): applied again.
    let mut drifted = api.get(DEPLOY_PATH).unwrap();
    drifted["spec"]["template"]["spec"]["containers"][0]["image"] = json!("someone/else:1");
    drifted["metadata"]["generation"] = json!(7);
    api.put(DEPLOY_PATH, drifted);
    reconcile(ew.clone(), ctx.clone()).await.unwrap();
    let reverted = patches(&api.take(), DEPLOY_PATH)[0].body.clone();
    assert_eq!(reverted["spec"], first["spec"], "drift reverted to what the spec says");

    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw2"));
    reconcile(ew.clone(), ctx.clone()).await.unwrap();
    let third = patches(&api.take(), DEPLOY_PATH)[0].body.clone();
    assert_ne!(hash_of(&first), hash_of(&third), "a Secret change changes the pod-template hash");

    let mut changed = (*ew).clone();
    changed.spec.target.uri = "http://orders-api/v2/events".into();
    reconcile(Arc::new(changed), ctx.clone()).await.unwrap();
    let fourth = patches(&api.take(), DEPLOY_PATH)[0].body.clone();
    assert_eq!(env_of(&fourth)["DEFAULT_WORKER_URI"]["value"], "http://orders-api/v2/events");
    assert_ne!(hash_of(&third), hash_of(&fourth));
}

#[tokio::test]
async fn a_missing_secret_degrades_and_is_looked_for_again_soon() {
    let api = MockApi::start().await;
    let action = reconcile(worker(&api, spec()), api.ctx()).await.unwrap();
    requeue_within(&action, 8, 12);
    let log = api.take();
    let (s, reason, msg) = condition(&patches(&log, "/status")[0].body["status"], "Degraded");
    assert_eq!((s.as_str(), reason.as_str()), ("True", "SecretMissing"));
    assert!(msg.contains("redis/password"));
}

#[tokio::test]
async fn invalid_spec_applies_nothing_keeps_the_scale_and_waits_for_a_change() {
    let api = MockApi::start().await;
    api.put(
        DEPLOY_PATH,
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "orders", "namespace": "shop", "generation": 4,
                            "ownerReferences": [{"apiVersion": "eventworker.io/v1alpha1", "kind": "EventWorker", "name": "orders", "uid": "ew-uid", "controller": true}]},
               "spec": {"replicas": 3, "selector": {"matchLabels": {"a": "b"}}, "template": {}},
               "status": {"observedGeneration": 4, "replicas": 3, "readyReplicas": 3, "availableReplicas": 3, "updatedReplicas": 3}}),
    );
    let mut s = spec();
    s["redis"]["url"] = json!("redis://also-set:6379");
    let ew = worker(&api, s);
    let ctx = api.ctx();
    let err = reconcile(ew.clone(), ctx.clone()).await.expect_err("invalid");
    assert!(matches!(err, Error::InvalidSpec(_)), "{err}");
    let log = api.take();
    assert!(patches(&log, DEPLOY_PATH).is_empty());
    let st = &patches(&log, "/status")[0].body["status"];
    assert_eq!(condition(st, "Degraded").1, "InvalidSpec");
    assert_eq!(
        (st["replicas"].as_i64(), st["readyReplicas"].as_i64()),
        (Some(3), Some(3)),
        "the scale subresource stays true"
    );
    assert_eq!(st["selector"], "app.kubernetes.io/instance=orders,app.kubernetes.io/name=eventworker");
    assert_eq!(events(&log, "InvalidSpec").len(), 1);
    assert_eq!(error_policy(ew.clone(), &err, ctx.clone()), Action::await_change());

    let ew = with_written_status(&ew, &log);
    reconcile(ew, ctx).await.expect_err("still invalid");
    let log = api.take();
    assert!(patches(&log, "/status").is_empty(), "same status: not written again (transition times kept)");
    assert!(events(&log, "InvalidSpec").is_empty(), "announced once");
}

#[tokio::test]
async fn someone_elses_object_of_the_same_name_is_left_alone() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw"));
    let users = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders", "namespace": "shop", "uid": "theirs"},
                       "spec": {"ports": [{"port": 80}]}});
    api.put("/api/v1/namespaces/shop/services/orders", users.clone());
    let action = reconcile(worker(&api, spec()), api.ctx()).await.unwrap();
    let log = api.take();
    assert!(patches(&log, "/services/orders").is_empty(), "the user's Service is not taken over");
    assert_eq!(api.get("/api/v1/namespaces/shop/services/orders").unwrap(), users);
    assert_eq!(patches(&log, DEPLOY_PATH).len(), 1, "the other children are applied");
    let (s, reason, msg) = condition(&patches(&log, "/status")[0].body["status"], "Degraded");
    assert_eq!((s.as_str(), reason.as_str()), ("True", "Conflict"));
    assert!(msg.contains("Service orders exists and is not controlled by this EventWorker"), "{msg}");
    assert_eq!(events(&log, "Conflict").len(), 1);
    requeue_within(&action, 4, 6);
}

#[tokio::test]
async fn a_refused_child_degrades_backs_off_and_never_blocks_the_deployment() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw"));
    api.put(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com",
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "servicemonitors.monitoring.coreos.com"}}),
    );
    let sm_path = "/apis/monitoring.coreos.com/v1/namespaces/shop/servicemonitors/orders";
    let refusal = "ServiceMonitor.monitoring.coreos.com \"orders\" is invalid: spec.endpoints[0].interval: Invalid value: \"soon\"";
    api.refuse(sm_path, 422, refusal);
    let mut s = spec();
    s["metrics"] = json!({"serviceMonitor": {"enabled": true}});
    let ew = worker(&api, s);
    let ctx = api.ctx();
    let action = reconcile(ew.clone(), ctx.clone()).await.expect("the reconcile itself goes on");
    requeue_within(&action, 4, 6);
    let log = api.take();
    assert_eq!(patches(&log, DEPLOY_PATH).len(), 1, "the Deployment is applied");
    assert_eq!(patches(&log, "/services/orders").len(), 1);
    let (s, reason, msg) = condition(&patches(&log, "/status")[0].body["status"], "Degraded");
    assert_eq!((s.as_str(), reason.as_str()), ("True", "ApplyFailed"));
    assert!(msg.contains(refusal), "the API server's message: {msg}");
    assert_eq!(events(&log, "ApplyFailed").len(), 1, "a Warning Event");
    assert_eq!(events(&log, "ApplyFailed")[0].body["type"], "Warning");

    // At once again: the ServiceMonitor is backing off, not retried; still reported.
    let ew = with_written_status(&ew, &log);
    reconcile(ew.clone(), ctx.clone()).await.unwrap();
    let log = api.take();
    assert!(patches(&log, sm_path).is_empty(), "backing off");
    assert!(patches(&log, "/status").is_empty(), "still the same problem, the same status");
    assert!(events(&log, "ApplyFailed").is_empty(), "announced once");

    // The user fixes the spec (a new generation): tried at once, whatever the backoff.
    api.state.refuse.lock().unwrap().clear();
    let mut fixed = (*ew).clone();
    fixed.spec.metrics.service_monitor.interval = Some("30s".into());
    fixed.metadata.generation = Some(3);
    reconcile(Arc::new(fixed), ctx.clone()).await.unwrap();
    let log = api.take();
    assert_eq!(patches(&log, sm_path).len(), 1, "a new spec is not held back by the old backoff");
    assert_eq!(condition(&patches(&log, "/status")[0].body["status"], "Degraded").0, "False");
}

#[tokio::test]
async fn failed_reconciles_back_off_exponentially() {
    let api = MockApi::start().await;
    let ew = worker(&api, spec());
    let ctx = api.ctx();
    let err = Error::Kube(kube::Error::Api(
        serde_json::from_value(status_body(500, "InternalError", "etcd unavailable")).unwrap(),
    ));
    let delays: Vec<f64> =
        (0..4).map(|_| error_policy(ew.clone(), &err, ctx.clone()).requeue_after().unwrap().as_secs_f64()).collect();
    for (d, base) in delays.iter().zip([5.0, 10.0, 20.0, 40.0]) {
        assert!(*d >= base * 0.8 && *d <= base * 1.2, "{delays:?}");
    }
}

#[tokio::test]
async fn service_monitor_and_prometheus_rule_only_when_asked_and_their_crds_exist() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw"));
    let mut s = spec();
    s["metrics"] =
        json!({"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true, "notReadyFor": "20m"}});
    s["disruptionBudget"] = json!({"maxUnavailable": 1});
    reconcile(worker(&api, s.clone()), api.ctx()).await.unwrap();
    let log = api.take();
    assert!(patches(&log, "/servicemonitors/orders").is_empty(), "no CRD, no ServiceMonitor");
    assert!(patches(&log, "/prometheusrules/orders").is_empty(), "no CRD, no PrometheusRule");
    assert_eq!(patches(&log, "/poddisruptionbudgets/orders").len(), 1);
    let st = &patches(&log, "/status")[0].body["status"];
    let (_, reason, message) = condition(st, "Degraded");
    assert_eq!(reason, "ServiceMonitorUnavailable");
    assert!(
        message.contains("PrometheusRule requested but") && message.contains("prometheusrules.monitoring.coreos.com"),
        "{message}"
    );

    for (plural, kind) in [("servicemonitors", "ServiceMonitor"), ("prometheusrules", "PrometheusRule")] {
        let name = format!("{plural}.monitoring.coreos.com");
        api.put(
            &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": name},
                   "spec": {"group": "monitoring.coreos.com", "names": {"kind": kind, "plural": plural}, "scope": "Namespaced", "versions": []}}),
        );
    }
    // A new operator (the CRD lookup is cached for a minute).
    reconcile(worker(&api, s.clone()), api.ctx()).await.unwrap();
    let log = api.take();
    let sm = patches(&log, "/apis/monitoring.coreos.com/v1/namespaces/shop/servicemonitors/orders");
    assert_eq!(sm.len(), 1);
    assert_eq!(sm[0].body["spec"]["endpoints"][0]["port"], "metrics");
    let pr = patches(&log, "/apis/monitoring.coreos.com/v1/namespaces/shop/prometheusrules/orders");
    assert_eq!(pr.len(), 1);
    let rules = pr[0].body["spec"]["groups"][0]["rules"].as_array().unwrap();
    let not_ready = rules.iter().find(|r| r["alert"] == "EventWorkerNotReady").unwrap();
    assert_eq!(not_ready["for"], "20m", "the EventWorker's threshold");
    assert!(rules.iter().all(|r| r["expr"].as_str().unwrap().contains(r#""shop""#)), "scoped to the EventWorker");

    // Switched off: removed (it is ours).
    api.put("/apis/monitoring.coreos.com/v1/namespaces/shop/prometheusrules/orders", pr[0].body.clone());
    s["metrics"]["prometheusRule"]["enabled"] = json!(false);
    let mut off = (*worker(&api, s)).clone();
    off.metadata.generation = Some(2);
    reconcile(Arc::new(off), api.ctx()).await.unwrap();
    let log = api.take();
    assert!(
        log.iter().any(|r| r.method == Method::DELETE && r.path.ends_with("/prometheusrules/orders")),
        "{:?}",
        log.iter().map(|r| format!("{} {}", r.method, r.path)).collect::<Vec<_>>()
    );
}

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/eventworker-operator";

fn lease(holder: &str, renew: &str, duration: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "eventworker-operator", "namespace": "ops", "resourceVersion": "5"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": renew,
                    "acquireTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 3}})
}

fn elector(api: &MockApi, duration: std::time::Duration) -> eventworker_operator::leader::Elector {
    eventworker_operator::leader::Elector::new(
        api.client.clone(),
        "ops",
        "eventworker-operator",
        "standby",
        duration,
        std::time::Duration::from_millis(100),
    )
}

#[tokio::test]
async fn a_lease_expires_by_our_clock_not_the_holders() {
    let api = MockApi::start().await;
    // The holder's clock is an hour behind ours: its renewTime looks long expired.
    api.put(LEASE_PATH, lease("leader", "2020-01-01T00:00:00.000000Z", 1));
    let e = elector(&api, std::time::Duration::from_secs(1));
    assert!(!e.try_acquire_or_renew().await.unwrap(), "first seen now: not expired, whatever its renewTime says");
    // The leader keeps renewing (the record changes): never taken over.
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < std::time::Duration::from_millis(1500) {
        n += 1;
        api.put(LEASE_PATH, lease("leader", &format!("2020-01-01T00:00:{n:02}.000000Z"), 1));
        assert!(!e.try_acquire_or_renew().await.unwrap(), "a renewed lease is not taken");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(!api.take().iter().any(|r| r.method == Method::PUT), "no write while the holder renews");
    // It stops renewing: taken once it stayed unchanged for its duration, on our clock.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if e.try_acquire_or_renew().await.unwrap() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "an unrenewed lease is taken after its duration");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let put = api.take().into_iter().rfind(|r| r.method == Method::PUT).expect("the lease is updated");
    assert_eq!(put.body["spec"]["holderIdentity"], "standby");
    assert_eq!(put.body["spec"]["leaseTransitions"], 4);
    assert_eq!(put.body["metadata"]["resourceVersion"], "5", "optimistic concurrency on the version read");
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_and_release_leaves_others_leases_alone() {
    let api = MockApi::start().await;
    api.put(LEASE_PATH, lease("", "2020-01-01T00:00:00.000000Z", 1));
    let e = elector(&api, std::time::Duration::from_secs(15));
    assert!(e.try_acquire_or_renew().await.unwrap(), "an empty holder (released) is free at once");
    api.put(LEASE_PATH, lease("standby", "2020-01-01T00:00:00.000000Z", 15));
    e.release().await.unwrap();
    let put = api.take().into_iter().rfind(|r| r.method == Method::PUT).expect("released");
    assert!(put.body["spec"].get("holderIdentity").is_none_or(|h| h.is_null() || h == ""), "{}", put.body);
    assert_eq!(put.body["spec"]["leaseDurationSeconds"], 1);
    api.put(LEASE_PATH, lease("someone-else", "2020-01-01T00:00:00.000000Z", 15));
    e.release().await.unwrap();
    assert!(!api.take().iter().any(|r| r.method == Method::PUT), "not ours: not released");
}

fn owned_by(uid: &str) -> Value {
    json!([{"apiVersion": "eventworker.io/v1alpha1", "kind": "EventWorker", "name": "orders", "uid": uid, "controller": true}])
}

#[tokio::test]
async fn orphans_of_ours_are_adopted_and_a_previous_eventworkers_children_awaited() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw"));
    // `kubectl delete ew orders --cascade=orphan`, then created again: our labels, no owner.
    api.put(
        "/api/v1/namespaces/shop/services/orders",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders", "namespace": "shop",
               "labels": {"app.kubernetes.io/managed-by": "eventworker-operator", "app.kubernetes.io/instance": "orders"}}}),
    );
    // Deleted and created again: the old one's Deployment waits for garbage collection.
    api.put(
        DEPLOY_PATH,
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "orders", "namespace": "shop", "ownerReferences": owned_by("old-uid")}}),
    );
    let action = reconcile(worker(&api, spec()), api.ctx()).await.unwrap();
    let log = api.take();
    assert_eq!(patches(&log, "/services/orders").len(), 1, "an orphan of ours is adopted");
    assert!(patches(&log, DEPLOY_PATH).is_empty(), "the previous EventWorker's Deployment is not taken");
    let (_, reason, msg) = condition(&patches(&log, "/status")[0].body["status"], "Degraded");
    assert_eq!(reason, "Conflict");
    assert!(msg.contains("waiting for its garbage collection"), "{msg}");
    assert!(events(&log, "Conflict").is_empty(), "nothing to warn about: it goes by itself");
    requeue_within(&action, 1, 3);
}

#[tokio::test]
async fn children_switched_off_are_removed_whatever_the_status_says() {
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw"));
    let hpa_path = "/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers/orders";
    api.put(
        hpa_path,
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "orders", "namespace": "shop", "ownerReferences": owned_by("ew-uid")}}),
    );
    // No status at all (never written, or lost): the HPA from an earlier hpa mode still goes.
    let ew = worker(&api, spec());
    let ctx = api.ctx();
    reconcile(ew.clone(), ctx.clone()).await.unwrap();
    let log = api.take();
    assert!(log.iter().any(|r| r.method == Method::DELETE && r.path == hpa_path), "the leftover HPA is deleted");
    // Known absent for this generation: not looked up again at the next resync.
    api.state.objects.lock().unwrap().remove(hpa_path);
    reconcile(with_written_status(&ew, &log), ctx).await.unwrap();
    assert!(!api.take().iter().any(|r| r.path == hpa_path), "looked for once per generation");
}

#[tokio::test]
async fn each_reconcile_is_exported_as_a_span_when_tracing_is_on() {
    use tracing::instrument::WithSubscriber;
    let Some(jaeger) = common::jaeger::Jaeger::start().await else { return };
    let service = "ew-operator-test";
    let (dispatch, telemetry) =
        ew_otel::subscriber(service, None, Some(&jaeger.otlp_endpoint())).expect("tracing set up");
    let api = MockApi::start().await;
    api.put("/api/v1/namespaces/shop/secrets/redis", secret("pw1"));
    reconcile(worker(&api, spec()), api.ctx()).with_subscriber(dispatch.clone()).await.expect("reconcile");
    // A refused status write fails the reconcile: the span says so.
    api.refuse("/apis/eventworker.io/v1alpha1/namespaces/shop/eventworkers/orders/status", 500, "etcd is down");
    let failed = reconcile(worker(&api, spec()), api.ctx()).with_subscriber(dispatch).await;
    assert!(failed.is_err());
    // Dropping the guard exports what is queued.
    tokio::task::spawn_blocking(move || drop(telemetry)).await.unwrap();

    let spans = jaeger.wait_spans(service, 2, |s| s.name == "reconcile").await;
    let outcome = |s: &common::jaeger::Span| s.tag_str("eventworker.outcome").unwrap_or_default();
    let ok = spans.iter().find(|s| outcome(s) == "ok").expect("a span for the good reconcile");
    assert_eq!(ok.tag_str("k8s.namespace.name").as_deref(), Some("shop"));
    assert_eq!(ok.tag_str("k8s.eventworker.name").as_deref(), Some("orders"));
    let bad = spans.iter().find(|s| outcome(s) == "error").expect("a span for the failed reconcile");
    assert_eq!(bad.tag_str("error.type").as_deref(), Some("kube"));
    assert_eq!(bad.tag_str("otel.status_code").as_deref(), Some("ERROR"));
}
