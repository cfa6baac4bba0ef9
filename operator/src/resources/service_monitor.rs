//! The Prometheus operator's ServiceMonitor, built untyped (its CRD may not be installed).

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{child_meta, selector_labels};
use crate::crd::EventWorker;

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// The CRD that must exist before a ServiceMonitor is created.
pub const CRD_NAME: &str = "servicemonitors.monitoring.coreos.com";

/// None unless `metrics.serviceMonitor.enabled`.
pub fn service_monitor(ew: &EventWorker) -> Option<DynamicObject> {
    let sm = &ew.spec.metrics.service_monitor;
    if !sm.enabled {
        return None;
    }
    let mut meta = child_meta(ew);
    if let Some(extra) = &sm.labels {
        meta.labels.get_or_insert_with(Default::default).extend(extra.clone());
    }
    let mut endpoint = json!({"port": "metrics", "path": "/metrics"});
    if let Some(i) = &sm.interval {
        endpoint["interval"] = json!(i);
    }
    let mut obj = DynamicObject::new(meta.name.as_deref().unwrap_or_default(), &api_resource());
    obj.metadata = meta;
    obj.data = json!({"spec": {"selector": {"matchLabels": selector_labels(ew)}, "endpoints": [endpoint]}});
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    #[test]
    fn only_when_enabled() {
        assert!(service_monitor(&ew(minimal())).is_none());
        let mut s = minimal();
        s["metrics"] = json!({"serviceMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "prom"}}});
        let sm = service_monitor(&ew(s)).unwrap();
        let v = serde_json::to_value(&sm).unwrap();
        assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(v["kind"], "ServiceMonitor");
        assert_eq!(v["metadata"]["labels"]["release"], "prom");
        assert_eq!(v["spec"]["endpoints"][0], json!({"port": "metrics", "path": "/metrics", "interval": "15s"}));
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"], "orders");
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "EventWorker");
    }
}
