//! eventworker-operator: reconciles `EventWorker` resources into worker Deployments.

pub mod admin;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod metrics_api;
pub mod redis_pool;
pub mod resources;
pub mod scaler;
pub mod status;

pub use crd::{EventWorker, EventWorkerSpec, EventWorkerStatus};

/// The CRD as YAML, as committed under `crds/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&EventWorker::crd()).unwrap_or_default()
}

/// Lock a mutex, also one a panicking thread left poisoned (the data stays usable).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
