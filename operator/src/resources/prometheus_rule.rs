//! Alerts, as Prometheus rules: one source for the PrometheusRule applied per EventWorker
//! (`metrics.prometheusRule`) and for the chart's cluster-wide rules file
//! (`eventworker-operator prometheus-rules`, checked and unit-tested with promtool).
//!
//! Worker series carry the labels their ServiceMonitor scrape adds (`namespace`,
//! `service`: the Service is named after the EventWorker). The operator's series name the
//! EventWorker in `eventworker_namespace` / `eventworker`, since its own scrape sets
//! `namespace` to the operator's.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::ResourceExt;
use serde_json::{json, Value};

use super::child_meta;
use crate::crd::{EventWorker, PrometheusRuleSpec};

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule"),
        "prometheusrules",
    )
}

/// The CRD that must exist before a PrometheusRule is created.
pub const CRD_NAME: &str = "prometheusrules.monitoring.coreos.com";

/// Which series the rules look at: every EventWorker (the chart's rules) or one.
pub struct Scope {
    /// Matchers on worker series (`namespace="shop",service="orders"`), or empty.
    worker: String,
    /// Matchers on the operator's per-EventWorker series, or empty.
    operator: String,
}

impl Scope {
    pub fn all() -> Self {
        Self { worker: String::new(), operator: String::new() }
    }

    pub fn of(ew: &EventWorker) -> Self {
        Self::named(&ew.namespace().unwrap_or_default(), &ew.name_any())
    }

    /// The EventWorker `name` in namespace `ns`.
    pub fn named(ns: &str, name: &str) -> Self {
        Self {
            worker: format!("namespace={ns:?},service={name:?}"),
            operator: format!("eventworker_namespace={ns:?},eventworker={name:?}"),
        }
    }
}

/// `metric{matchers}`, or the bare name without matchers.
fn sel(metric: &str, matchers: &[&str]) -> String {
    let m: Vec<&str> = matchers.iter().copied().filter(|m| !m.is_empty()).collect();
    if m.is_empty() {
        metric.to_string()
    } else {
        format!("{metric}{{{}}}", m.join(","))
    }
}

fn alert(name: &str, expr: String, for_: &str, severity: &str, summary: &str, description: &str) -> Value {
    json!({
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": format!("{description} Runbook: the eventworker README, section Runbooks, {name}."),
        },
    })
}

/// The worker alerts, in one rule group.
pub fn worker_group(scope: &Scope, t: &PrometheusRuleSpec) -> Value {
    let w = |metric: &str| sel(metric, &[&scope.worker]);
    let o = |state: &str| sel("eventworker_operator_worker_replicas", &[&scope.operator, state]);
    let by = "namespace, service";
    let rules = vec![
        alert(
            "EventWorkerBacklogGrowing",
            format!(
                "max by ({by}, stream) (delta({b}[5m])) > 0 and max by ({by}, stream) ({b}) > 0",
                b = w("stream_backlog")
            ),
            &t.backlog_growing_for,
            "warning",
            "Backlog of {{ $labels.stream }} ({{ $labels.namespace }}/{{ $labels.service }}) keeps growing",
            "Events arrive faster than they are delivered, for longer than the threshold.",
        ),
        alert(
            "EventWorkerOldestEventTooOld",
            format!("max by ({by}, stream) ({}) > {}", w("stream_oldest_age_seconds"), t.oldest_event_age_seconds),
            "5m",
            "critical",
            "Oldest waiting event of {{ $labels.stream }} ({{ $labels.namespace }}/{{ $labels.service }}) is {{ $value | humanizeDuration }} old",
            "Events wait longer than the delivery SLO.",
        ),
        alert(
            "EventWorkerDeadLetters",
            format!(
                "sum by ({by}, reason) (rate({}[5m])) > {}",
                w("events_dead_lettered_total"),
                t.dead_letter_rate_per_second
            ),
            "10m",
            "warning",
            "{{ $labels.namespace }}/{{ $labels.service }} dead-letters {{ printf \"%.2f\" $value }} events/s ({{ $labels.reason }})",
            "Events are dead-lettered faster than the threshold.",
        ),
        alert(
            "EventWorkerHostPaused",
            format!("max by ({by}, host) ({}) > 0", w("host_circuit_open")),
            &t.host_paused_for,
            "warning",
            "Deliveries to {{ $labels.host }} ({{ $labels.namespace }}/{{ $labels.service }}) are paused",
            "The receiver has failed the worker's probes for longer than the threshold.",
        ),
        alert(
            "EventWorkerNotReady",
            format!(
                "max by (eventworker_namespace, eventworker) ({}) > max by (eventworker_namespace, eventworker) ({})",
                o(r#"state="desired""#),
                o(r#"state="ready""#)
            ),
            &t.not_ready_for,
            "warning",
            "{{ $labels.eventworker_namespace }}/{{ $labels.eventworker }} has fewer worker pods ready than desired",
            "Worker pods are not ready (crash loop, image, Redis unreachable, scheduling).",
        ),
    ];
    json!({"name": "eventworker", "rules": rules})
}

/// The operator's own alerts (the chart's rules only).
pub fn operator_group() -> Value {
    json!({"name": "eventworker-operator", "rules": [
        alert(
            "EventWorkerOperatorNoLeader",
            "max(eventworker_operator_leader) < 1 or absent(eventworker_operator_leader)".into(),
            "5m",
            "critical",
            "No eventworker operator replica holds the leader lease",
            "Nobody reconciles EventWorkers: the operator is down, not scraped, or its replicas cannot take the Lease (API server unreachable, RBAC).",
        ),
        alert(
            "EventWorkerOperatorNotReconciling",
            "sum(increase(eventworker_operator_reconciles_total[10m])) == 0 and max(eventworker_operator_leader) > 0 and max(eventworker_operator_eventworkers) > 0"
                .into(),
            "5m",
            "critical",
            "The eventworker operator's leader has not reconciled any EventWorker for 15 minutes",
            "The leader holds the Lease but reconciles nothing: a hung controller or watch.",
        ),
        alert(
            "EventWorkerOperatorReconcileErrors",
            "sum(rate(eventworker_operator_reconcile_errors_total[10m])) > 0".into(),
            "30m",
            "warning",
            "The eventworker operator's reconciles keep failing",
            "Reconciles have failed for half an hour; the EventWorkers' status says why.",
        ),
    ]})
}

/// The rules file of the chart and `eventworker-operator prometheus-rules`: the worker
/// alerts for every EventWorker with default thresholds, and the operator's; or, for one
/// EventWorker (`Some((namespace, name))`), its worker alerts alone.
pub fn rules_yaml(one: Option<(&str, &str)>) -> String {
    let defaults = PrometheusRuleSpec::default();
    let groups = match one {
        None => json!({"groups": [worker_group(&Scope::all(), &defaults), operator_group()]}),
        Some((ns, name)) => json!({"groups": [worker_group(&Scope::named(ns, name), &defaults)]}),
    };
    let yaml = serde_yaml::to_string(&groups).expect("rules serialize");
    format!("# Generated by `eventworker-operator prometheus-rules`; do not edit.\n{yaml}")
}

/// None unless `metrics.prometheusRule.enabled`.
pub fn prometheus_rule(ew: &EventWorker) -> Option<DynamicObject> {
    let spec = &ew.spec.metrics.prometheus_rule;
    if !spec.enabled {
        return None;
    }
    let mut meta = child_meta(ew);
    if let Some(extra) = &spec.labels {
        meta.labels.get_or_insert_with(Default::default).extend(extra.clone());
    }
    let mut obj = DynamicObject::new(meta.name.as_deref().unwrap_or_default(), &api_resource());
    obj.metadata = meta;
    obj.data = json!({"spec": {"groups": [worker_group(&Scope::of(ew), spec)]}});
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    #[test]
    fn only_when_enabled_and_scoped_to_the_eventworker() {
        assert!(prometheus_rule(&ew(minimal())).is_none());
        let mut s = minimal();
        s["metrics"] =
            json!({"prometheusRule": {"enabled": true, "labels": {"release": "prom"}, "oldestEventAgeSeconds": 60}});
        let v = serde_json::to_value(prometheus_rule(&ew(s)).unwrap()).unwrap();
        assert_eq!(v["kind"], "PrometheusRule");
        assert_eq!(v["metadata"]["labels"]["release"], "prom");
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "EventWorker");
        let rules = v["spec"]["groups"][0]["rules"].as_array().unwrap();
        let expr =
            |name: &str| rules.iter().find(|r| r["alert"] == name).unwrap()["expr"].as_str().unwrap().to_string();
        let old = expr("EventWorkerOldestEventTooOld");
        assert!(old.contains(r#"stream_oldest_age_seconds{namespace="shop",service="orders"}"#), "{old}");
        assert!(old.ends_with("> 60"), "{old}");
        let ready = expr("EventWorkerNotReady");
        assert!(ready.contains(r#"{eventworker_namespace="shop",eventworker="orders",state="ready"}"#), "{ready}");
        let paused = rules.iter().find(|r| r["alert"] == "EventWorkerHostPaused").unwrap();
        assert_eq!(paused["for"], "15m", "defaults apply");
    }

    #[test]
    fn the_charts_rules_cover_every_eventworker() {
        let y = rules_yaml(None);
        assert!(y.contains("delta(stream_backlog[5m])"), "{y}");
        assert!(y.contains(r#"eventworker_operator_worker_replicas{state="desired"}"#), "{y}");
        assert!(y.contains("EventWorkerOperatorNotReconciling"));
    }

    #[test]
    fn the_operator_series_the_rules_and_dashboard_read_are_exported() {
        let m = crate::metrics::Metrics::new();
        m.observe(std::time::Duration::from_millis(1), Some("kube"));
        m.set_replicas("shop", "orders", 2, 1);
        m.keep_replicas_of(&[("shop".to_string(), "orders".to_string())].into());
        let exported = m.render();
        let shipped =
            [rules_yaml(None), include_str!("../../../monitoring/grafana-dashboard.json").to_string()].concat();
        let mut used: Vec<&str> = shipped
            .match_indices("eventworker_operator_")
            .map(|(at, _)| {
                let rest = &shipped[at..];
                &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
            })
            .collect();
        used.sort_unstable();
        used.dedup();
        assert!(used.len() >= 4, "{used:?}");
        for name in used {
            assert!(
                exported.lines().any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
                "{name} is not exported:\n{exported}"
            );
        }
    }
}
