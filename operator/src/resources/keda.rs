//! KEDA's ScaledObject and TriggerAuthentication for `autoscaling.mode: keda`, built
//! untyped (KEDA's CRDs may not be installed).
//!
//! One `redis-streams` trigger per stream in **streamLength** form (`XLEN`, no consumer
//! group): the workers delete what they deliver (`XDEL`), so a stream's length is its
//! backlog (undelivered + pending). `lagCount` is the form that goes wrong here: after
//! `XDEL` Redis may report a group's lag as nil (redis/redis#13337), which KEDA reads as -1.
//! The triggers are summed with the streams' weights by `scalingModifiers` (KEDA 2.12+):
//! `target` is `targetLagPerReplica`, so KEDA's HPA wants ceil(weighted backlog / target)
//! pods, like the built-in scaler. One more trigger on `events:retry` (whose length is the
//! number of retries scheduled) keeps one pod while retries wait, even at
//! `minReplicaCount: 0`: a worker must be there to put them back when due.
//!
//! For a Redis Cluster (`redis.cluster`, or a `redis+cluster://` URL) the triggers are
//! `redis-cluster-streams` with the seed nodes as `addresses`, and each stream's own
//! schedule (`{events:fast}:retry`) has a retry trigger of its own beside the original's.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{json, Value};

use backlog::layout::{Layout, RETRY_STREAM};

use super::child_meta;
use crate::crd::{AutoscalingMode, AutoscalingSpec, EventWorker};

pub const SCALED_OBJECT_CRD: &str = "scaledobjects.keda.sh";
pub const TRIGGER_AUTH_CRD: &str = "triggerauthentications.keda.sh";

pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"), "scaledobjects")
}

pub fn trigger_auth_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "TriggerAuthentication"),
        "triggerauthentications",
    )
}

/// The autoscaling spec when KEDA is the mode.
fn keda(ew: &EventWorker) -> Option<&AutoscalingSpec> {
    ew.spec.autoscaling.as_ref().filter(|a| a.mode == AutoscalingMode::Keda)
}

/// Where the worker connects: `host:port` (for a cluster, the seed nodes, comma-separated),
/// database index, TLS and whether it is a cluster.
struct Address {
    hostports: String,
    db: Option<String>,
    tls: bool,
    cluster: bool,
}

fn with_port(hostport: &str) -> String {
    if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        hostport.to_string()
    } else {
        format!("{hostport}:6379")
    }
}

fn redis_address(ew: &EventWorker) -> Address {
    let r = &ew.spec.redis;
    match (&r.url, &r.host) {
        (Some(url), _) => {
            let tls = url.starts_with("rediss://") || url.starts_with("rediss+cluster://");
            let cluster = r.cluster || url.contains("+cluster://");
            let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
            let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
            let (hosts, db) = match rest.split_once('/') {
                Some((h, db)) => (h, Some(db.split('?').next().unwrap_or_default()).filter(|d| !d.is_empty())),
                None => (rest.split('?').next().unwrap_or_default(), None),
            };
            let hostports = hosts.split(',').filter(|h| !h.is_empty()).map(with_port).collect::<Vec<_>>().join(",");
            Address { hostports, db: db.map(str::to_string).filter(|_| !cluster), tls, cluster }
        }
        (None, Some(host)) => {
            Address { hostports: format!("{host}:{}", r.port), db: None, tls: r.tls, cluster: r.cluster }
        }
        (None, None) => Address { hostports: "localhost:6379".into(), db: None, tls: false, cluster: r.cluster },
    }
}

/// The retry schedule's trigger (`events:retry`; in a cluster, each stream's are `r<i>`).
const RETRY_TRIGGER: &str = "retry";

/// A trigger name usable in KEDA's formula (an identifier).
fn trigger_name(i: usize) -> String {
    format!("s{i}")
}

/// None unless `autoscaling.mode: keda`.
pub fn scaled_object(ew: &EventWorker) -> Option<DynamicObject> {
    let a = keda(ew)?;
    let addr = redis_address(ew);
    let auth = trigger_authentication(ew).map(|t| t.metadata.name.unwrap_or_default());
    let layout = if addr.cluster { Layout::Cluster } else { Layout::Single };
    let keys = ew.spec.streams.iter().enumerate().map(|(i, s)| (trigger_name(i), format!("events:{}", s.name)));
    let mut retries = vec![(RETRY_TRIGGER.to_string(), RETRY_STREAM.to_string())];
    if addr.cluster {
        let own = ew.spec.streams.iter().enumerate();
        retries.extend(own.map(|(i, s)| (format!("r{i}"), layout.retry_stream(&format!("events:{}", s.name)))));
    }
    let retry_sum = retries.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" + ");
    let triggers: Vec<Value> = keys
        .chain(retries.clone())
        .map(|(name, stream)| {
            let mut metadata = json!({
                "stream": stream,
                "streamLength": a.target_lag_per_replica.to_string(),
                "activationLagCount": "0",
            });
            metadata[if addr.cluster { "addresses" } else { "address" }] = json!(addr.hostports);
            if let Some(db) = &addr.db {
                metadata["databaseIndex"] = json!(db);
            }
            if addr.tls {
                metadata["enableTLS"] = json!("true");
            }
            let kind = if addr.cluster { "redis-cluster-streams" } else { "redis-streams" };
            let mut t = json!({"type": kind, "name": name, "metadata": metadata});
            if let Some(name) = &auth {
                t["authenticationRef"] = json!({"name": name});
            }
            t
        })
        .collect();
    let backlog = ew
        .spec
        .streams
        .iter()
        .enumerate()
        .map(|(i, s)| match s.autoscaling_weight {
            Some(w) if w != 1.0 => format!("{w} * {}", trigger_name(i)),
            _ => trigger_name(i),
        })
        .collect::<Vec<_>>()
        .join(" + ");
    let formula = format!("max({backlog}, min({retry_sum}, 1) * {})", a.target_lag_per_replica);
    let mut advanced = json!({
        "scalingModifiers": {
            "formula": formula,
            "target": a.target_lag_per_replica.to_string(),
            "activationTarget": "0",
            "metricType": "AverageValue",
        }
    });
    if let Some(b) = &a.behavior {
        advanced["horizontalPodAutoscalerConfig"] = json!({"behavior": b});
    }
    // Scale to zero waits the scale-down window (KEDA's cooldownPeriod), like the builtin.
    let cooldown = a
        .behavior
        .as_ref()
        .and_then(|b| b.scale_down.as_ref())
        .and_then(|d| d.stabilization_window_seconds)
        .unwrap_or(300);
    let meta = child_meta(ew);
    let mut obj = DynamicObject::new(meta.name.as_deref().unwrap_or_default(), &scaled_object_resource());
    obj.metadata = meta;
    obj.data = json!({"spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ew.metadata.name},
        "minReplicaCount": a.min_replicas,
        "maxReplicaCount": a.max_replicas,
        "pollingInterval": a.poll_interval().as_secs(),
        "cooldownPeriod": cooldown,
        "advanced": advanced,
        "triggers": triggers,
    }});
    Some(obj)
}

/// The Redis password for KEDA, from the Secret the workers use; None when there is no
/// password (or the mode is not keda).
pub fn trigger_authentication(ew: &EventWorker) -> Option<DynamicObject> {
    keda(ew)?;
    let r = ew.spec.redis.password_secret_ref.as_ref()?;
    let mut meta = child_meta(ew);
    meta.name = Some(trigger_auth_name(ew));
    let mut obj = DynamicObject::new(meta.name.as_deref().unwrap_or_default(), &trigger_auth_resource());
    obj.metadata = meta;
    obj.data = json!({"spec": {"secretTargetRef": [{"parameter": "password", "name": r.name, "key": r.key}]}});
    Some(obj)
}

/// Name of the TriggerAuthentication this EventWorker may own.
pub fn trigger_auth_name(ew: &EventWorker) -> String {
    format!("{}-redis", ew.metadata.name.as_deref().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    #[test]
    fn only_in_keda_mode() {
        assert!(scaled_object(&ew(minimal())).is_none());
        let mut s = minimal();
        s["autoscaling"] = json!({"maxReplicas": 5});
        assert!(scaled_object(&ew(s)).is_none(), "builtin is the default");
    }

    #[test]
    fn one_stream_length_trigger_per_stream_summed_with_weights() {
        let mut s = minimal();
        s["streams"] = json!([{"name": "critical", "autoscalingWeight": 4.0}, {"name": "slow"}]);
        s["redis"] = json!({"url": "rediss://cache.shop:6380/2", "passwordSecretRef": {"name": "redis", "key": "pw"}});
        s["autoscaling"] = json!({"mode": "keda", "minReplicas": 0, "maxReplicas": 8, "targetLagPerReplica": 500,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}});
        let w = ew(s);
        let v = serde_json::to_value(scaled_object(&w).unwrap()).unwrap();
        assert_eq!(v["kind"], "ScaledObject");
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "EventWorker");
        let spec = &v["spec"];
        assert_eq!(spec["scaleTargetRef"], json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "orders"}));
        assert_eq!((spec["minReplicaCount"].as_i64(), spec["maxReplicaCount"].as_i64()), (Some(0), Some(8)));
        assert_eq!(spec["cooldownPeriod"], 60);
        assert_eq!(spec["pollingInterval"], 10);
        let t = &spec["triggers"][0];
        assert_eq!(t["type"], "redis-streams");
        assert_eq!(t["metadata"]["address"], "cache.shop:6380");
        assert_eq!(t["metadata"]["databaseIndex"], "2");
        assert_eq!(t["metadata"]["enableTLS"], "true");
        assert_eq!(t["metadata"]["stream"], "events:critical");
        assert_eq!(t["metadata"]["streamLength"], "500");
        assert!(t["metadata"].get("consumerGroup").is_none(), "lagCount/pending forms are not used");
        assert_eq!(t["authenticationRef"]["name"], "orders-redis");
        let m = &spec["advanced"]["scalingModifiers"];
        assert_eq!(m["formula"], "max(4 * s0 + s1, min(retry, 1) * 500)");
        let retry = &spec["triggers"][2];
        assert_eq!(
            (retry["name"].as_str(), retry["metadata"]["stream"].as_str()),
            (Some("retry"), Some("events:retry"))
        );
        assert_eq!((m["target"].as_str(), m["metricType"].as_str()), (Some("500"), Some("AverageValue")));
        assert_eq!(
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
            60
        );
        let auth = serde_json::to_value(trigger_authentication(&w).unwrap()).unwrap();
        assert_eq!(auth["metadata"]["name"], "orders-redis");
        assert_eq!(auth["spec"]["secretTargetRef"], json!([{"parameter": "password", "name": "redis", "key": "pw"}]));
    }

    #[test]
    fn host_and_port_form() {
        let mut s = minimal();
        s["redis"] = json!({"host": "redis.shop", "port": 6390, "tls": true});
        s["autoscaling"] = json!({"mode": "keda", "maxReplicas": 3});
        let v = serde_json::to_value(scaled_object(&ew(s.clone())).unwrap()).unwrap();
        assert_eq!(v["spec"]["triggers"][0]["metadata"]["address"], "redis.shop:6390");
        assert_eq!(v["spec"]["triggers"][0]["metadata"]["enableTLS"], "true");
        assert!(v["spec"]["triggers"][0].get("authenticationRef").is_none());
        assert!(trigger_authentication(&ew(s)).is_none(), "no password, no TriggerAuthentication");
    }

    #[test]
    fn a_cluster_gets_cluster_triggers_and_each_streams_own_schedule() {
        let mut s = minimal();
        s["streams"] = json!([{"name": "critical"}, {"name": "slow"}]);
        s["redis"] = json!({"url": "rediss+cluster://a:7000,b", "passwordSecretRef": {"name": "redis", "key": "pw"}});
        s["autoscaling"] = json!({"mode": "keda", "maxReplicas": 3, "targetLagPerReplica": 100});
        let v = serde_json::to_value(scaled_object(&ew(s)).unwrap()).unwrap();
        let triggers = v["spec"]["triggers"].as_array().unwrap();
        let streams: Vec<&str> = triggers.iter().map(|t| t["metadata"]["stream"].as_str().unwrap()).collect();
        assert_eq!(
            streams,
            ["events:critical", "events:slow", "events:retry", "{events:critical}:retry", "{events:slow}:retry"]
        );
        for t in triggers {
            assert_eq!(t["type"], "redis-cluster-streams");
            assert_eq!(t["metadata"]["addresses"], "a:7000,b:6379");
            assert_eq!(t["metadata"]["enableTLS"], "true");
            assert!(t["metadata"].get("address").is_none() && t["metadata"].get("databaseIndex").is_none());
            assert_eq!(t["authenticationRef"]["name"], "orders-redis");
        }
        let formula = &v["spec"]["advanced"]["scalingModifiers"]["formula"];
        assert_eq!(formula, "max(s0 + s1, min(retry + r0 + r1, 1) * 100)");
    }
}
