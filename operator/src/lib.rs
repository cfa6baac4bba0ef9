//! eventworker-operator: reconciles `EventWorker` resources into worker Deployments.

pub mod admin;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod scaler;
pub mod status;

pub use crd::{EventWorker, EventWorkerSpec, EventWorkerStatus};

/// The CRD as YAML, as committed under `crds/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&EventWorker::crd()).unwrap_or_default()
}
