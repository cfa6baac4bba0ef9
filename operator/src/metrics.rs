//! The operator's own metrics: reconciles, their duration, errors by kind.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub failures: IntCounterVec,
    pub duration: Histogram,
    pub leader: IntGauge,
    /// Child applies by result: applied, unchanged (skipped), failed, conflict.
    pub applies: IntCounterVec,
    pub status_writes: IntCounter,
    /// Requests to the Kubernetes API server by verb (GET, PATCH, ...; watches included).
    pub kube_requests: IntCounterVec,
    /// EventWorkers this replica knows (0 on a standby).
    pub eventworkers: IntGauge,
    /// Worker pods desired and ready per EventWorker, from its Deployment: what the
    /// EventWorkerNotReady alert compares (pods that do not run report nothing themselves).
    worker_replicas: IntGaugeVec,
    /// The EventWorkers `worker_replicas` has series for.
    replica_series: Mutex<HashSet<(String, String)>>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles =
            IntCounter::new("eventworker_operator_reconciles_total", "Reconciles run").expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new("eventworker_operator_reconcile_errors_total", "Failed reconciles by kind"),
            &["kind"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new("eventworker_operator_reconcile_duration_seconds", "Reconcile duration")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        let leader = IntGauge::new("eventworker_operator_leader", "1 while this replica holds the leader lease")
            .expect("valid metric");
        let applies = IntCounterVec::new(
            Opts::new(
                "eventworker_operator_applies_total",
                "Child objects applied, by result (applied, unchanged, failed, conflict)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let status_writes =
            IntCounter::new("eventworker_operator_status_writes_total", "EventWorker status updates written")
                .expect("valid metric");
        let kube_requests = IntCounterVec::new(
            Opts::new("eventworker_operator_kube_requests_total", "Requests to the Kubernetes API server, by method"),
            &["method"],
        )
        .expect("valid metric");
        let eventworkers =
            IntGauge::new("eventworker_operator_eventworkers", "EventWorkers known to this replica (0 on a standby)")
                .expect("valid metric");
        // Not `namespace`: the operator's own scrape sets that label to the operator's.
        let worker_replicas = IntGaugeVec::new(
            Opts::new("eventworker_operator_worker_replicas", "Worker pods of an EventWorker, desired and ready"),
            &["eventworker_namespace", "eventworker", "state"],
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(eventworkers.clone()),
            Box::new(worker_replicas.clone()),
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
            Box::new(applies.clone()),
            Box::new(status_writes.clone()),
            Box::new(kube_requests.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            applies,
            status_writes,
            kube_requests,
            eventworkers,
            worker_replicas,
            replica_series: Mutex::new(HashSet::new()),
        }
    }

    /// Record an EventWorker's desired and ready worker pods.
    pub fn set_replicas(&self, namespace: &str, name: &str, desired: i32, ready: i32) {
        self.worker_replicas.with_label_values(&[namespace, name, "desired"]).set(desired.into());
        self.worker_replicas.with_label_values(&[namespace, name, "ready"]).set(ready.into());
        crate::lock(&self.replica_series).insert((namespace.to_string(), name.to_string()));
    }

    /// Drop the series of EventWorkers no longer known (deleted, or leadership lost:
    /// `known` empty).
    pub fn keep_replicas_of(&self, known: &HashSet<(String, String)>) {
        crate::lock(&self.replica_series).retain(|(ns, name)| {
            let keep = known.contains(&(ns.clone(), name.clone()));
            if !keep {
                for state in ["desired", "ready"] {
                    let _ = self.worker_replicas.remove_label_values(&[ns, name, state]);
                }
            }
            keep
        });
        self.eventworkers.set(known.len() as i64);
    }

    pub fn observe(&self, took: Duration, error_kind: Option<&str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = error_kind {
            self.failures.with_label_values(&[kind]).inc();
        }
    }

    /// A kube client whose requests are counted in `kube_requests`.
    pub fn counted_client(self: &std::sync::Arc<Self>, config: kube::Config) -> Result<kube::Client, kube::Error> {
        let metrics = self.clone();
        let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
            metrics.kube_requests.with_label_values(&[req.method().as_str()]).inc();
            req
        });
        Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&layer).build())
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_and_errors_by_kind() {
        let m = Metrics::new();
        m.observe(Duration::from_millis(5), None);
        m.observe(Duration::from_millis(5), Some("kube"));
        let t = m.render();
        assert!(t.contains("eventworker_operator_reconciles_total 2"), "{t}");
        assert!(t.contains("eventworker_operator_reconcile_errors_total{kind=\"kube\"} 1"), "{t}");
    }

    #[test]
    fn replica_series_follow_the_eventworkers_known() {
        let m = Metrics::new();
        m.set_replicas("shop", "orders", 3, 2);
        m.set_replicas("shop", "mail", 1, 1);
        let t = m.render();
        let series = r#"eventworker_operator_worker_replicas{eventworker="orders",eventworker_namespace="shop",state="ready"} 2"#;
        assert!(t.contains(series), "{t}");
        m.keep_replicas_of(&HashSet::from([("shop".to_string(), "mail".to_string())]));
        let t = m.render();
        assert!(!t.contains(r#"eventworker="orders""#), "deleted EventWorker's series gone: {t}");
        assert!(t.contains(r#"eventworker="mail""#), "{t}");
        assert!(t.contains("eventworker_operator_eventworkers 1"), "{t}");
    }
}
