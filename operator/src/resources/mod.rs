//! Pure builders: an `EventWorker` (and the Secrets it references) in, Kubernetes objects
//! out. Nothing here talks to the API server.

pub mod admin_secret;
pub mod deployment;
pub mod hpa;
pub mod keda;
pub mod pdb;
pub mod prometheus_rule;
pub mod service;
pub mod service_monitor;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::EventWorker;

/// Field manager of every server-side apply.
pub const MANAGER: &str = "eventworker-operator";
/// Port of the worker's admin server.
pub const METRICS_PORT: i32 = 9000;

/// What the operator supplies beyond the spec (its settings).
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Worker image of EventWorkers without `spec.image` (`DEFAULT_WORKER_IMAGE`).
    pub image: String,
    /// Secret salt of the pods' config hash (`CONFIG_HASH_SALT`).
    pub hash_salt: String,
}

impl Defaults {
    #[cfg(test)]
    pub fn test() -> Self {
        Self { image: "registry.example/eventworker:9.9.9".into(), hash_salt: "salt".into() }
    }
}

/// Labels that select one EventWorker's pods.
pub fn selector_labels(ew: &EventWorker) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "eventworker".to_string()),
        ("app.kubernetes.io/instance".to_string(), ew.name_any()),
    ])
}

/// Labels on every child object.
pub fn labels(ew: &EventWorker) -> BTreeMap<String, String> {
    let mut l = selector_labels(ew);
    l.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    l.insert("app.kubernetes.io/component".into(), "worker".into());
    l
}

/// The selector string for status (scale subresource).
pub fn selector_string(ew: &EventWorker) -> String {
    selector_labels(ew).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub fn owner_reference(ew: &EventWorker) -> Option<OwnerReference> {
    ew.controller_owner_ref(&())
}

/// Metadata of a child: same name and namespace, our labels, owned by the EventWorker.
pub fn child_meta(ew: &EventWorker) -> ObjectMeta {
    ObjectMeta {
        name: Some(ew.name_any()),
        namespace: ew.namespace(),
        labels: Some(labels(ew)),
        owner_references: owner_reference(ew).map(|o| vec![o]),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::crd::{EventWorker, EventWorkerSpec};

    /// An EventWorker as the API server would hand it over (with uid and generation).
    pub fn ew(spec: serde_json::Value) -> EventWorker {
        let spec: EventWorkerSpec = serde_json::from_value(spec).expect("valid spec");
        let mut ew = EventWorker::new("orders", spec);
        ew.metadata.namespace = Some("shop".into());
        ew.metadata.uid = Some("0b6b7e5e-1111-2222-3333-444455556666".into());
        ew.metadata.generation = Some(3);
        ew
    }

    pub fn minimal() -> serde_json::Value {
        serde_json::json!({"redis": {"host": "redis"}, "target": {"uri": "http://orders-api/events/[EVENT_TYPE]"}})
    }
}
