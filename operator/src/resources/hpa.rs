//! The HorizontalPodAutoscaler of `autoscaling.mode: hpa`: on the EventWorker itself (its
//! scale subresource), with the External metric `eventworker-backlog` that the operator
//! serves (`metrics_api.rs`), so that HPA behaviour policies apply and other metrics (CPU)
//! can be combined by editing nothing but the EventWorker.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, ExternalMetricSource, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::child_meta;
use crate::crd::{AutoscalingMode, EventWorker};
use crate::metrics_api::{METRIC, NAME_LABEL};

/// None unless `autoscaling.mode: hpa`.
pub fn hpa(ew: &EventWorker) -> Option<HorizontalPodAutoscaler> {
    let a = ew.spec.autoscaling.as_ref().filter(|a| a.mode == AutoscalingMode::Hpa)?;
    let name = ew.metadata.name.clone().unwrap_or_default();
    let external = ExternalMetricSource {
        metric: MetricIdentifier {
            name: METRIC.into(),
            selector: Some(LabelSelector {
                match_labels: Some([(NAME_LABEL.to_string(), name.clone())].into()),
                match_expressions: None,
            }),
        },
        target: MetricTarget {
            type_: "AverageValue".into(),
            average_value: Some(Quantity(a.target_lag_per_replica.to_string())),
            ..Default::default()
        },
    };
    Some(HorizontalPodAutoscaler {
        metadata: child_meta(ew),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("eventworker.io/v1alpha1".into()),
                kind: "EventWorker".into(),
                name,
            },
            // The CRD refuses 0 in this mode (HPAs do not scale to zero).
            min_replicas: Some(a.min_replicas.max(1)),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "External".into(),
                external: Some(external),
                ..Default::default()
            }]),
            behavior: a.behavior.clone(),
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};
    use serde_json::json;

    #[test]
    fn on_the_eventworker_with_the_external_backlog_metric() {
        assert!(hpa(&ew(minimal())).is_none());
        let mut s = minimal();
        s["autoscaling"] = json!({"mode": "hpa", "minReplicas": 2, "maxReplicas": 9, "targetLagPerReplica": 700,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 45}}});
        let v = serde_json::to_value(hpa(&ew(s)).unwrap()).unwrap();
        assert_eq!(
            v["spec"]["scaleTargetRef"],
            json!({"apiVersion": "eventworker.io/v1alpha1", "kind": "EventWorker", "name": "orders"})
        );
        assert_eq!((v["spec"]["minReplicas"].as_i64(), v["spec"]["maxReplicas"].as_i64()), (Some(2), Some(9)));
        let m = &v["spec"]["metrics"][0];
        assert_eq!(m["type"], "External");
        assert_eq!(m["external"]["metric"]["name"], "eventworker-backlog");
        assert_eq!(m["external"]["metric"]["selector"]["matchLabels"]["eventworker.io/name"], "orders");
        assert_eq!(m["external"]["target"], json!({"type": "AverageValue", "averageValue": "700"}));
        assert_eq!(v["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"], 45);
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "EventWorker");
    }
}
