//! The worker Deployment: the spec rendered into the worker's own environment variables.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

use kube::ResourceExt;

use super::{child_meta, labels, selector_labels, Defaults, METRICS_PORT};
use crate::crd::{
    DeadLetterMode, EventWorker, EventWorkerSpec, FlowControlSpec, HostConcurrency, Ordering, SecretKeyRef,
    SqlTableMode,
};

/// Pod-template annotation: hash of the rendered configuration and the referenced Secrets'
/// values, so that a change of either rolls the pods.
pub const CONFIG_HASH: &str = "eventworker.io/config-hash";

/// Data of the Secrets an EventWorker references, by Secret name.
pub type SecretData = BTreeMap<String, BTreeMap<String, ByteString>>;

fn plain(name: &str, value: impl ToString) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.to_string()), value_from: None }
}

fn secret(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: r.name.clone(), key: r.key.clone(), optional: Some(false) }),
            ..Default::default()
        }),
    }
}

fn ordering_name(o: Ordering) -> &'static str {
    match o {
        Ordering::Key => "key",
        Ordering::Stream => "stream",
        Ordering::None => "none",
    }
}

/// Every Secret key the spec references.
pub fn secret_refs(spec: &EventWorkerSpec) -> Vec<&SecretKeyRef> {
    let mut refs = Vec::new();
    refs.extend(spec.redis.password_secret_ref.as_ref());
    refs.extend(spec.target.signing_secret_ref.as_ref());
    refs.extend(spec.admin.token_secret_ref.as_ref());
    refs.extend(spec.target.headers_from.iter().flatten().map(|h| &h.secret_key_ref));
    if spec.dead_letter.mode == DeadLetterMode::Sql {
        refs.extend(spec.dead_letter.sql.as_ref().map(|s| &s.connection_secret_ref));
    }
    refs
}

/// The consumer group: `spec.group`, or the EventWorker's own name.
pub fn group(ew: &EventWorker) -> String {
    ew.spec.group.clone().unwrap_or_else(|| ew.name_any())
}

/// What 0.1's CRD wrote into every EventWorker without an image (a schema default, stored
/// with the object): taken as "no image set", so that such EventWorkers follow the operator.
pub const LEGACY_DEFAULT_IMAGE: &str = "eventworker:0.1.0";

/// The worker image: `spec.image`, or the operator's default.
pub fn image(ew: &EventWorker, defaults: &Defaults) -> String {
    match ew.spec.image.as_deref() {
        Some(i) if i != LEGACY_DEFAULT_IMAGE => i.to_string(),
        _ => defaults.image.clone(),
    }
}

/// The worker's environment: the same variables it reads when run by hand.
pub fn worker_env(ew: &EventWorker) -> Vec<EnvVar> {
    let spec = &ew.spec;
    let mut env = Vec::new();
    let redis_url = match (&spec.redis.url, &spec.redis.host) {
        (Some(url), _) => url.clone(),
        (None, Some(host)) => {
            format!("{}://{}:{}", if spec.redis.tls { "rediss" } else { "redis" }, host, spec.redis.port)
        }
        (None, None) => "redis://localhost:6379".into(),
    };
    // A cluster is addressed by its seed nodes, as a redis+cluster:// URL.
    let redis_url = match redis_url.split_once("://") {
        Some((scheme @ ("redis" | "rediss"), rest)) if spec.redis.cluster => format!("{scheme}+cluster://{rest}"),
        _ => redis_url,
    };
    env.push(plain("REDIS_URL", redis_url));
    if let Some(r) = &spec.redis.password_secret_ref {
        env.push(secret("REDIS_PASSWORD", r));
    }
    let names: Vec<&str> = spec.streams.iter().map(|s| s.name.as_str()).collect();
    env.push(plain("STREAMS", names.join(",")));
    let per_stream = |f: &dyn Fn(&crate::crd::StreamSpec) -> Option<String>| {
        spec.streams.iter().filter_map(|s| f(s).map(|v| format!("{}={v}", s.name))).collect::<Vec<_>>().join(",")
    };
    let in_flight = per_stream(&|s| s.max_in_flight.map(|n| n.to_string()));
    if !in_flight.is_empty() {
        env.push(plain("STREAM_MAX_IN_FLIGHT", in_flight));
    }
    let orderings = per_stream(&|s| s.ordering.map(|o| ordering_name(o).to_string()));
    if !orderings.is_empty() {
        env.push(plain("STREAM_ORDERING", orderings));
    }
    let priorities = per_stream(&|s| s.priority.map(|p| p.to_string()));
    if !priorities.is_empty() {
        env.push(plain("STREAM_PRIORITY", priorities));
    }
    env.push(plain("GROUP", group(ew)));
    if let Some(p) = &spec.consumer_prefix {
        env.push(plain("CONSUMER_PREFIX", p));
    }
    env.push(EnvVar {
        name: "POD_NAME".into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), api_version: None }),
            ..Default::default()
        }),
    });
    env.push(plain("DEFAULT_WORKER_URI", &spec.target.uri));
    if let Some(t) = spec.target.connect_timeout_seconds {
        env.push(plain("CONNECT_TIMEOUT", t));
    }
    if let Some(t) = spec.target.read_timeout_seconds {
        env.push(plain("READ_TIMEOUT", t));
    }
    if let Some(h) = spec.target.headers.as_ref().filter(|h| !h.is_empty()) {
        env.push(plain("TARGET_HEADERS", serde_json::to_string(h).unwrap_or_default()));
    }
    if let Some(from) = spec.target.headers_from.as_ref().filter(|h| !h.is_empty()) {
        // Values stay in their Secrets: one variable each, named to the worker.
        let mut names = Vec::new();
        for (i, h) in from.iter().enumerate() {
            let var = format!("TARGET_HEADER_VALUE_{i}");
            env.push(secret(&var, &h.secret_key_ref));
            names.push(format!("{}={var}", h.name));
        }
        env.push(plain("TARGET_HEADERS_FROM_ENV", names.join(",")));
    }
    if let Some(r) = &spec.target.signing_secret_ref {
        env.push(secret("WEBHOOK_SECRET", r));
    }
    if let Some(h) = &spec.target.allowed_hosts {
        env.push(plain("TARGET_ALLOWLIST", h.join(",")));
    }
    if let Some(n) = &spec.target.denied_networks {
        env.push(plain("TARGET_DENYLIST", n.join(",")));
    }
    if let Some(n) = spec.retry.max_attempts {
        env.push(plain("MAX_ATTEMPTS", n));
    }
    if let Some(b) = spec.retry.backoff_seconds {
        env.push(plain("RETRY_BACKOFF", b));
    }
    if let Some(c) = spec.retry.claim_idle_seconds {
        env.push(plain("CLAIM_IDLE", c));
    }
    if let Some(b) = spec.retry.host_backoff_seconds {
        env.push(plain("BACKOFF_BASE", b));
    }
    if let Some(b) = spec.retry.host_backoff_max_seconds {
        env.push(plain("BACKOFF_MAX", b));
    }
    flow_control_env(&spec.flow_control, &mut env);
    if let Some(l) = spec.ordering_lease_seconds {
        env.push(plain("ORDERING_LEASE", l));
    }
    match spec.dead_letter.mode {
        DeadLetterMode::Console => {}
        DeadLetterMode::Http => {
            if let Some(u) = &spec.dead_letter.http_uri {
                env.push(plain("DLQ_URI", u));
            }
        }
        DeadLetterMode::Sql => {
            if let Some(sql) = &spec.dead_letter.sql {
                env.push(secret("DLQ_DB_CONNECTION", &sql.connection_secret_ref));
                if let Some(t) = &sql.table {
                    env.push(plain("DLQ_DB_TABLE", t));
                }
                if let Some(t) = &sql.event_table {
                    env.push(plain("EVENT_DB_TABLE", t));
                }
                if let Some(m) = sql.table_mode {
                    let mode = match m {
                        SqlTableMode::Auto => "auto",
                        SqlTableMode::Deadletter => "deadletter",
                        SqlTableMode::Outbox => "outbox",
                    };
                    env.push(plain("DLQ_DB_MODE", mode));
                }
            }
        }
    }
    env.push(plain("ORDERING", ordering_name(spec.ordering)));
    if let Some(n) = spec.max_in_flight {
        env.push(plain("MAX_IN_FLIGHT", n));
    }
    env.push(plain("METRICS_PORT", METRICS_PORT));
    // Leave the pod a few seconds between the worker's drain and SIGKILL.
    env.push(plain("SHUTDOWN_GRACE", (spec.termination_grace_period_seconds - 5).max(1)));
    env.push(plain("LOG_FORMAT", "json"));
    env
}

fn concurrency_name(c: HostConcurrency) -> &'static str {
    match c {
        HostConcurrency::Adaptive => "adaptive",
        HostConcurrency::Fixed => "fixed",
    }
}

/// `spec.flowControl` as the worker's HOST_* settings.
fn flow_control_env(f: &FlowControlSpec, env: &mut Vec<EnvVar>) {
    if let Some(n) = f.max_concurrency_per_host {
        env.push(plain("HOST_MAX_CONCURRENCY", n));
    }
    if let Some(n) = f.initial_concurrency_per_host {
        env.push(plain("HOST_INITIAL_CONCURRENCY", n));
    }
    if let Some(c) = f.concurrency {
        env.push(plain("HOST_CONCURRENCY", concurrency_name(c)));
    }
    if let Some(r) = f.rate_limit_per_host {
        env.push(plain("HOST_RATE_LIMIT", r));
    }
    if let Some(a) = f.max_event_age_seconds {
        env.push(plain("MAX_EVENT_AGE", a));
    }
    if !f.hosts.is_empty() {
        let overrides: serde_json::Map<String, serde_json::Value> = f
            .hosts
            .iter()
            .map(|h| {
                let mut o = serde_json::Map::new();
                if let Some(n) = h.max_concurrency {
                    o.insert("maxConcurrency".into(), n.into());
                }
                if let Some(r) = h.rate_limit {
                    o.insert("rateLimit".into(), r.into());
                }
                if let Some(c) = h.concurrency {
                    o.insert("concurrency".into(), concurrency_name(c).into());
                }
                (h.url.clone(), serde_json::Value::Object(o))
            })
            .collect();
        env.push(plain("HOST_OVERRIDES", serde_json::Value::Object(overrides).to_string()));
    }
}

/// Salted hash of the rendered environment and the values of the referenced Secret keys (a
/// missing Secret or key hashes as missing, so its later creation rolls the pods too). The
/// salt (the operator's secret salt and the object's uid) keeps anyone who can read the
/// Deployment from testing guesses of a Secret value against the hash.
pub fn config_hash(ew: &EventWorker, env: &[EnvVar], secrets: &SecretData, salt: &str) -> String {
    let spec = &ew.spec;
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(b"\0");
    h.update(ew.uid().unwrap_or_default().as_bytes());
    h.update(b"\0");
    h.update(serde_json::to_vec(env).unwrap_or_default());
    let mut refs = secret_refs(spec);
    refs.sort_by(|a, b| (&a.name, &a.key).cmp(&(&b.name, &b.key)));
    for r in refs {
        h.update(format!("\0{}/{}=", r.name, r.key));
        match secrets.get(&r.name).and_then(|d| d.get(&r.key)) {
            Some(v) => h.update(&v.0),
            None => h.update(b"\0missing"),
        }
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// The worker Deployment. `replicas` is None when another component owns the count (KEDA's
/// HPA): leaving the field out of the apply leaves it to that owner.
pub fn deployment(ew: &EventWorker, secrets: &SecretData, replicas: Option<i32>, defaults: &Defaults) -> Deployment {
    let spec = &ew.spec;
    let mut env = worker_env(ew);
    // The admin API always needs a token (see `admin_secret.rs`).
    env.push(secret("ADMIN_TOKEN", &super::admin_secret::token_ref(ew)));
    // The user's extras last (validation refuses names we render).
    env.extend(spec.env.iter().flatten().cloned());
    // Ours last: user labels must not replace the ones the selector relies on.
    let mut pod_labels = spec.pod_labels.clone().unwrap_or_default();
    pod_labels.extend(labels(ew));
    let mut annotations = spec.pod_annotations.clone().unwrap_or_default();
    annotations.insert(CONFIG_HASH.into(), config_hash(ew, &env, secrets, &defaults.hash_salt));
    let container = Container {
        name: "worker".into(),
        image: Some(image(ew, defaults)),
        volume_mounts: spec.volume_mounts.clone(),
        image_pull_policy: spec.image_pull_policy.clone(),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: child_meta(ew),
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector { match_labels: Some(selector_labels(ew)), match_expressions: None },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    service_account_name: spec.service_account_name.clone(),
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    affinity: spec.affinity.clone(),
                    image_pull_secrets: spec.image_pull_secrets.clone(),
                    priority_class_name: spec.priority_class_name.clone(),
                    topology_spread_constraints: spec.topology_spread_constraints.clone(),
                    volumes: spec.volumes.clone(),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};
    use serde_json::json;

    fn env_map(d: &Deployment) -> BTreeMap<String, EnvVar> {
        let c = &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        c.env.clone().unwrap().into_iter().map(|e| (e.name.clone(), e)).collect()
    }

    fn value(env: &BTreeMap<String, EnvVar>, k: &str) -> Option<String> {
        env.get(k).and_then(|e| e.value.clone())
    }

    #[test]
    fn a_cluster_is_addressed_by_its_seed_nodes() {
        let mut s = minimal();
        s["redis"] = json!({"host": "redis-cluster.shop", "port": 7000, "tls": true, "cluster": true});
        let env = env_map(&deployment(&ew(s.clone()), &SecretData::new(), Some(1), &Defaults::test()));
        assert_eq!(value(&env, "REDIS_URL").as_deref(), Some("rediss+cluster://redis-cluster.shop:7000"));
        s["redis"] = json!({"url": "redis://a:7000", "cluster": true});
        let env = env_map(&deployment(&ew(s.clone()), &SecretData::new(), Some(1), &Defaults::test()));
        assert_eq!(value(&env, "REDIS_URL").as_deref(), Some("redis+cluster://a:7000"));
        s["redis"] = json!({"url": "redis+cluster://a:7000,b:7001"});
        let env = env_map(&deployment(&ew(s), &SecretData::new(), Some(1), &Defaults::test()));
        assert_eq!(value(&env, "REDIS_URL").as_deref(), Some("redis+cluster://a:7000,b:7001"));
    }

    #[test]
    fn spec_renders_into_the_workers_environment() {
        let mut s = minimal();
        s["redis"] = json!({"host": "redis.shop", "port": 6380, "tls": true, "passwordSecretRef": {"name": "redis", "key": "password"}});
        s["streams"] = json!([{"name": "fast", "maxInFlight": 16}, {"name": "slow", "ordering": "stream"}]);
        s["target"]["headers"] = json!({"Authorization": "Bearer x"});
        s["target"]["readTimeoutSeconds"] = json!(10.5);
        s["target"]["signingSecretRef"] = json!({"name": "hooks", "key": "secret"});
        s["retry"] = json!({"maxAttempts": 7});
        s["target"]["allowedHosts"] = json!(["hooks.example.com", "*.partner.io", "10.0.0.0/8"]);
        s["target"]["deniedNetworks"] = json!(["169.254.0.0/16"]);
        s["deadLetter"] = json!({"mode": "sql", "sql": {"connectionSecretRef": {"name": "db", "key": "url"}, "table": "failed", "eventTable": "outbox", "tableMode": "outbox"}});
        s["admin"] = json!({"tokenSecretRef": {"name": "ops", "key": "admin"}});
        s["ordering"] = "stream".into();
        let d = deployment(&ew(s), &SecretData::new(), Some(1), &Defaults::test());
        let env = env_map(&d);
        assert_eq!(value(&env, "REDIS_URL").as_deref(), Some("rediss://redis.shop:6380"));
        assert_eq!(value(&env, "STREAMS").as_deref(), Some("fast,slow"));
        assert_eq!(value(&env, "STREAM_MAX_IN_FLIGHT").as_deref(), Some("fast=16"));
        assert_eq!(value(&env, "STREAM_ORDERING").as_deref(), Some("slow=stream"));
        assert_eq!(value(&env, "TARGET_HEADERS").as_deref(), Some(r#"{"Authorization":"Bearer x"}"#));
        assert_eq!(value(&env, "GROUP").as_deref(), Some("orders"), "its own group by default");
        assert_eq!(value(&env, "DEFAULT_WORKER_URI").as_deref(), Some("http://orders-api/events/[EVENT_TYPE]"));
        assert_eq!(value(&env, "READ_TIMEOUT").as_deref(), Some("10.5"));
        assert_eq!(value(&env, "MAX_ATTEMPTS").as_deref(), Some("7"));
        assert_eq!(value(&env, "ORDERING").as_deref(), Some("stream"));
        assert_eq!(value(&env, "DLQ_DB_TABLE").as_deref(), Some("failed"));
        assert_eq!(value(&env, "EVENT_DB_TABLE").as_deref(), Some("outbox"));
        assert_eq!(value(&env, "DLQ_DB_MODE").as_deref(), Some("outbox"));
        assert_eq!(value(&env, "TARGET_ALLOWLIST").as_deref(), Some("hooks.example.com,*.partner.io,10.0.0.0/8"));
        assert_eq!(value(&env, "TARGET_DENYLIST").as_deref(), Some("169.254.0.0/16"));
        assert_eq!(value(&env, "METRICS_PORT").as_deref(), Some("9000"));
        assert_eq!(value(&env, "SHUTDOWN_GRACE").as_deref(), Some("25"));
        for (var, secret, key) in [
            ("REDIS_PASSWORD", "redis", "password"),
            ("WEBHOOK_SECRET", "hooks", "secret"),
            ("DLQ_DB_CONNECTION", "db", "url"),
            ("ADMIN_TOKEN", "ops", "admin"),
        ] {
            let r = env[var].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
            assert_eq!((r.name.as_str(), r.key.as_str()), (secret, key), "{var} comes from its Secret");
            assert!(env[var].value.is_none(), "{var} never inlined");
        }
        assert!(env["POD_NAME"].value_from.as_ref().unwrap().field_ref.is_some());
        assert!(!env.contains_key("DLQ_URI"));
    }

    #[test]
    fn flow_control_renders_into_the_host_settings() {
        let mut s = minimal();
        s["streams"] = json!([{"name": "critical", "priority": 0}, {"name": "bulk", "priority": 5}]);
        s["flowControl"] = json!({
            "maxConcurrencyPerHost": 16,
            "initialConcurrencyPerHost": 2,
            "concurrency": "fixed",
            "rateLimitPerHost": 50.5,
            "maxEventAgeSeconds": 3600,
            "hosts": [{"url": "https://api.example.com", "maxConcurrency": 4, "concurrency": "adaptive"}]
        });
        s["retry"] = json!({"hostBackoffSeconds": 0.5, "hostBackoffMaxSeconds": 30});
        s["orderingLeaseSeconds"] = json!(10);
        let env = env_map(&deployment(&ew(s), &SecretData::new(), Some(1), &Defaults::test()));
        for (var, want) in [
            ("HOST_MAX_CONCURRENCY", "16"),
            ("HOST_INITIAL_CONCURRENCY", "2"),
            ("HOST_CONCURRENCY", "fixed"),
            ("HOST_RATE_LIMIT", "50.5"),
            ("MAX_EVENT_AGE", "3600"),
            ("HOST_OVERRIDES", r#"{"https://api.example.com":{"concurrency":"adaptive","maxConcurrency":4}}"#),
            ("STREAM_PRIORITY", "critical=0,bulk=5"),
            ("BACKOFF_BASE", "0.5"),
            ("BACKOFF_MAX", "30"),
            ("ORDERING_LEASE", "10"),
        ] {
            assert_eq!(value(&env, var).as_deref(), Some(want), "{var}");
        }
        // Unset: the worker's own defaults apply.
        let env = env_map(&deployment(&ew(minimal()), &SecretData::new(), Some(1), &Defaults::test()));
        assert!(!env.contains_key("HOST_MAX_CONCURRENCY") && !env.contains_key("HOST_OVERRIDES"));
    }

    #[test]
    fn pods_are_locked_down_and_probed() {
        let d = deployment(&ew(minimal()), &SecretData::new(), Some(1), &Defaults::test());
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(pod.security_context.as_ref().unwrap().seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/healthz"));
        assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("EventWorker", Some(true)));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    }

    #[test]
    fn hash_changes_with_config_and_with_secret_values() {
        let mut s = minimal();
        s["redis"]["passwordSecretRef"] = json!({"name": "redis", "key": "password"});
        let w = ew(s);
        let hash = |w: &EventWorker, secrets: &SecretData| {
            let d = deployment(w, secrets, Some(1), &Defaults::test());
            d.spec.unwrap().template.metadata.unwrap().annotations.unwrap()[CONFIG_HASH].clone()
        };
        let with = |v: &str| {
            SecretData::from([(
                "redis".into(),
                BTreeMap::from([("password".into(), ByteString(v.as_bytes().to_vec()))]),
            )])
        };
        let h1 = hash(&w, &with("one"));
        assert_eq!(h1, hash(&w, &with("one")), "stable");
        assert_ne!(h1, hash(&w, &with("two")), "a Secret change rolls the pods");
        assert_ne!(h1, hash(&w, &SecretData::new()), "a missing Secret hashes differently");
        let mut changed = w.clone();
        changed.spec.target.uri = "http://other/events".into();
        assert_ne!(h1, hash(&changed, &with("one")), "a spec change rolls the pods");
        // Unrelated Secrets do not matter.
        let mut extra = with("one");
        extra.insert("unrelated".into(), BTreeMap::new());
        assert_eq!(h1, hash(&w, &extra));
    }

    #[test]
    fn image_and_group_default_per_object_and_pod_extras_render() {
        let d = deployment(&ew(minimal()), &SecretData::new(), Some(1), &Defaults::test());
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("registry.example/eventworker:9.9.9"));
        let mut legacy = minimal();
        legacy["image"] = json!(LEGACY_DEFAULT_IMAGE);
        let d = deployment(&ew(legacy), &SecretData::new(), Some(1), &Defaults::test());
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("registry.example/eventworker:9.9.9"),
            "0.1's stored default follows the operator"
        );
        let mut s = minimal();
        s["image"] = json!("mirror.local/eventworker@sha256:abc");
        s["group"] = json!("workers");
        s["imagePullSecrets"] = json!([{"name": "regcred"}]);
        s["priorityClassName"] = json!("events-high");
        s["topologySpreadConstraints"] = json!([{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]);
        s["env"] = json!([{"name": "RUST_LOG", "value": "debug"}]);
        s["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        s["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
        s["target"]["headersFrom"] = json!([{"name": "X-Api-Key", "secretKeyRef": {"name": "api", "key": "key"}}]);
        let d = deployment(&ew(s), &SecretData::new(), Some(1), &Defaults::test());
        let env = env_map(&d);
        let pod = d.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("mirror.local/eventworker@sha256:abc"));
        assert_eq!(value(&env, "GROUP").as_deref(), Some("workers"), "the original's group when asked");
        assert_eq!(value(&env, "RUST_LOG").as_deref(), Some("debug"));
        assert_eq!(value(&env, "TARGET_HEADERS_FROM_ENV").as_deref(), Some("X-Api-Key=TARGET_HEADER_VALUE_0"));
        let r = env["TARGET_HEADER_VALUE_0"].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("api", "key"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
        assert_eq!(pod.priority_class_name.as_deref(), Some("events-high"));
        assert_eq!(pod.topology_spread_constraints.unwrap().len(), 1);
        assert_eq!(pod.volumes.unwrap()[0].name, "data");
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/data");
    }

    #[test]
    fn the_config_hash_is_salted() {
        let w = ew(minimal());
        let hash = |salt: &str| config_hash(&w, &worker_env(&w), &SecretData::new(), salt);
        assert_eq!(hash("a"), hash("a"));
        assert_ne!(hash("a"), hash("b"), "another operator salt, another hash");
        let mut other = w.clone();
        other.metadata.uid = Some("another-uid".into());
        assert_ne!(hash("a"), config_hash(&other, &worker_env(&other), &SecretData::new(), "a"), "salted per object");
    }

    #[test]
    fn replicas_as_given_and_user_labels_cannot_break_the_selector() {
        let mut s = minimal();
        s["podLabels"] = json!({"app.kubernetes.io/instance": "hijack", "team": "payments"});
        let d = deployment(&ew(s.clone()), &SecretData::new(), Some(4), &Defaults::test()).spec.unwrap();
        assert_eq!(d.replicas, Some(4));
        let labels = d.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["app.kubernetes.io/instance"], "orders");
        assert_eq!(labels["team"], "payments");
        let v = serde_json::to_value(deployment(&ew(s), &SecretData::new(), None, &Defaults::test())).unwrap();
        assert!(v["spec"].get("replicas").is_none(), "left to its owner (KEDA)");
    }
}
