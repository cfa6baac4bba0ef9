//! The metrics Service in front of the worker pods.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{child_meta, selector_labels, METRICS_PORT};
use crate::crd::EventWorker;

pub fn service(ew: &EventWorker) -> Service {
    Service {
        metadata: child_meta(ew),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(ew)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: METRICS_PORT,
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    #[test]
    fn selects_the_worker_pods_on_the_metrics_port() {
        let s = service(&ew(minimal()));
        let spec = s.spec.unwrap();
        assert_eq!(spec.selector.unwrap()["app.kubernetes.io/instance"], "orders");
        assert_eq!(spec.ports.unwrap()[0].port, 9000);
        assert_eq!(s.metadata.namespace.as_deref(), Some("shop"));
    }
}
