//! Status from what was applied and observed: conditions Ready / Progressing / Degraded /
//! RedisReachable (and ScalingActive / ScalingLimited with autoscaling), replicas, and each
//! stream's backlog read from Redis (crate `backlog`, the definition the workers' gauges use).

use k8s_openapi::api::apps::v1::Deployment;

use crate::crd::{AutoscalingStatus, Condition, EventWorker, EventWorkerStatus, StreamStatus};
use crate::resources::deployment::SecretData;

/// What the reconciler found, to be turned into a status.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Replicas desired, updated, ready, available per the Deployment's status.
    pub desired: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    /// Deployment controller has seen the latest template.
    pub deployment_current: bool,
    /// A Deployment of ours exists (not the case before the first apply, or in a conflict).
    pub deployment_exists: bool,
    /// The Deployment's rollout is stuck: (reason, message) from its conditions
    /// (ProgressDeadlineExceeded, ReplicaFailure).
    pub rollout_stuck: Option<(String, String)>,
    /// Streams read from Redis, or why not; None when not read.
    pub redis: Option<Result<Vec<StreamStatus>, String>>,
    /// Referenced Secrets (or keys) that do not exist.
    pub missing_secrets: Vec<String>,
    /// Children that exist but belong to someone else, described.
    pub conflicts: Vec<String>,
    /// Children the API server refused, with its message.
    pub apply_failures: Vec<String>,
    /// Why the spec is invalid (nothing applied).
    pub invalid: Option<String>,
    /// Why a requested ServiceMonitor or PrometheusRule was not created.
    pub monitoring_skipped: Vec<(&'static str, String)>,
    /// Retries scheduled for later on this Redis.
    pub scheduled: i64,
    /// The autoscaler's state, when `spec.autoscaling` is set.
    pub scaling: Option<Scaling>,
    /// The worker image and consumer group in use.
    pub image: Option<String>,
    pub group: Option<String>,
}

/// What the autoscaler did, for the status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scaling {
    pub mode: &'static str,
    /// ScalingActive: (status, reason, message).
    pub active: (bool, String, String),
    /// ScalingLimited: (status, reason, message).
    pub limited: (bool, String, String),
    pub desired: Option<i32>,
    /// Time and reason of the last change (carried over when nothing changed).
    pub last_scale: Option<(String, String)>,
    /// Why the scaler wants what it wants now.
    pub reason: String,
}

impl Observed {
    pub fn from_deployment(d: &Deployment) -> Self {
        let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        let generation = d.metadata.generation.unwrap_or(0);
        let conds = st.conditions.clone().unwrap_or_default();
        let stuck = conds
            .iter()
            .find(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
            .or_else(|| conds.iter().find(|c| c.type_ == "ReplicaFailure" && c.status == "True"))
            .map(|c| {
                (
                    c.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| c.type_.clone()),
                    c.message.clone().unwrap_or_default(),
                )
            });
        Observed {
            desired,
            updated: st.updated_replicas.unwrap_or(0),
            ready: st.ready_replicas.unwrap_or(0),
            available: st.available_replicas.unwrap_or(0),
            deployment_current: st.observed_generation.unwrap_or(0) >= generation,
            deployment_exists: true,
            rollout_stuck: stuck,
            ..Default::default()
        }
    }
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: generation,
    }
}

/// The Degraded condition: the weightiest problem is the reason, the message lists all.
fn degraded(obs: &Observed, generation: Option<i64>) -> Condition {
    let mut problems: Vec<(&str, String)> = Vec::new();
    if let Some(why) = &obs.invalid {
        problems.push(("InvalidSpec", why.clone()));
    }
    for c in &obs.conflicts {
        problems.push(("Conflict", c.clone()));
    }
    for f in &obs.apply_failures {
        problems.push(("ApplyFailed", f.clone()));
    }
    if !obs.missing_secrets.is_empty() {
        problems.push(("SecretMissing", format!("missing: {}", obs.missing_secrets.join(", "))));
    }
    if let Some((reason, msg)) = &obs.rollout_stuck {
        problems.push((reason.as_str(), format!("Deployment: {msg}")));
    }
    for (reason, why) in &obs.monitoring_skipped {
        problems.push((reason, why.clone()));
    }
    match problems.first() {
        None => condition("Degraded", false, "AsExpected", String::new(), generation),
        Some((reason, _)) => {
            let msg = problems.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ");
            condition("Degraded", true, reason, msg, generation)
        }
    }
}

/// The status to apply. Transition times carry over from the previous status when a
/// condition's status did not change.
pub fn build(ew: &EventWorker, obs: &Observed, selector: String, now: &str) -> EventWorkerStatus {
    let generation = ew.metadata.generation;
    let rolling = !obs.deployment_current || obs.updated < obs.desired || obs.ready < obs.desired;
    let progressing = if let Some(why) = &obs.invalid {
        condition("Progressing", false, "InvalidSpec", why.clone(), generation)
    } else if let Some((reason, msg)) = &obs.rollout_stuck {
        condition("Progressing", false, reason, msg.clone(), generation)
    } else if !obs.deployment_exists {
        condition("Progressing", false, "NoDeployment", "the worker Deployment is not applied".into(), generation)
    } else if rolling {
        condition(
            "Progressing",
            true,
            "RollingOut",
            format!("{}/{} pods updated, {} ready", obs.updated, obs.desired, obs.ready),
            generation,
        )
    } else {
        condition("Progressing", false, "Stable", format!("{} pods up to date", obs.desired), generation)
    };
    // Ready is the workload's: the workers' own probes say whether they reach Redis.
    let ready = if let Some(why) = &obs.invalid {
        condition("Ready", false, "InvalidSpec", why.clone(), generation)
    } else if !obs.deployment_exists {
        let reason = if obs.conflicts.is_empty() { "NoDeployment" } else { "Conflict" };
        condition("Ready", false, reason, "no worker Deployment of this EventWorker".into(), generation)
    } else if obs.available < obs.desired || obs.ready < obs.desired {
        condition("Ready", false, "ReplicasNotReady", format!("{}/{} pods ready", obs.ready, obs.desired), generation)
    } else {
        condition("Ready", true, "AllReplicasReady", format!("{}/{} pods ready", obs.ready, obs.desired), generation)
    };
    let redis = match &obs.redis {
        Some(Ok(streams)) => {
            condition("RedisReachable", true, "Reachable", format!("{} streams read", streams.len()), generation)
        }
        Some(Err(e)) => condition("RedisReachable", false, "Unreachable", e.clone(), generation),
        None => Condition {
            status: "Unknown".into(),
            ..condition("RedisReachable", false, "NotRead", "the backlog was not read".into(), generation)
        },
    };
    let mut conditions = vec![ready, progressing, degraded(obs, generation), redis];
    if let Some(sc) = &obs.scaling {
        let (ok, reason, msg) = &sc.active;
        conditions.push(condition("ScalingActive", *ok, reason, msg.clone(), generation));
        let (ok, reason, msg) = &sc.limited;
        conditions.push(condition("ScalingLimited", *ok, reason, msg.clone(), generation));
    }
    let previous = ew.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let conditions = conditions
        .into_iter()
        .map(|mut c| {
            c.last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
                .and_then(|p| p.last_transition_time.clone())
                .or_else(|| Some(now.to_string()));
            c
        })
        .collect();
    let previous_status = ew.status.clone().unwrap_or_default();
    // Streams not read this time keep what was last read (the scale subresource and the
    // columns keep their meaning while Redis is away).
    let streams = match &obs.redis {
        Some(Ok(s)) => s.clone(),
        _ => previous_status.streams.clone(),
    };
    let oldest = streams.iter().filter(|s| s.backlog > 0).map(|s| s.oldest_age_seconds).fold(0.0, f64::max);
    let read = matches!(obs.redis, Some(Ok(_)));
    EventWorkerStatus {
        observed_generation: generation,
        conditions,
        image: obs.image.clone().or(previous_status.image),
        group: obs.group.clone().or(previous_status.group),
        replicas: obs.desired,
        ready_replicas: obs.ready,
        selector,
        total_lag: streams.iter().map(|s| s.lag).sum(),
        total_backlog: streams.iter().map(|s| s.backlog).sum(),
        oldest_age_seconds: if read { Some(oldest) } else { previous_status.oldest_age_seconds },
        scheduled_retries: if read { obs.scheduled } else { previous_status.scheduled_retries },
        autoscaling: obs.scaling.as_ref().map(|sc| AutoscalingStatus {
            mode: sc.mode.into(),
            desired_replicas: sc.desired,
            last_scale_time: sc.last_scale.as_ref().map(|l| l.0.clone()),
            last_scale_reason: sc.last_scale.as_ref().map(|l| l.1.clone()),
        }),
        streams,
    }
}

/// The Redis URL the worker will use, with the password from its Secret.
pub fn redis_url(ew: &EventWorker, secrets: &SecretData) -> String {
    let env = crate::resources::deployment::worker_env(ew);
    let base = env.iter().find(|e| e.name == "REDIS_URL").and_then(|e| e.value.clone()).unwrap_or_default();
    let password = ew
        .spec
        .redis
        .password_secret_ref
        .as_ref()
        .and_then(|r| secrets.get(&r.name).and_then(|d| d.get(&r.key)))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned());
    match (password, base.split_once("://")) {
        (Some(pw), Some((scheme, rest))) if !rest.contains('@') => {
            let enc: String = pw
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{scheme}://:{enc}@{rest}")
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    fn cond<'a>(s: &'a EventWorkerStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn running(n: i32) -> Observed {
        Observed {
            desired: n,
            updated: n,
            ready: n,
            available: n,
            deployment_current: true,
            deployment_exists: true,
            redis: Some(Ok(vec![])),
            ..Default::default()
        }
    }

    #[test]
    fn ready_when_all_pods_ready_and_redis_answers() {
        let w = ew(minimal());
        let obs = Observed {
            redis: Some(Ok(vec![StreamStatus {
                name: "events:fast".into(),
                length: 10,
                pending: 2,
                lag: 8,
                backlog: 10,
                ..Default::default()
            }])),
            ..running(2)
        };
        let s = build(&w, &obs, "sel".into(), "2026-01-01T00:00:00Z");
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(cond(&s, "RedisReachable").status, "True");
        assert_eq!((s.observed_generation, s.total_lag, s.ready_replicas), (Some(3), 8, 2));
    }

    #[test]
    fn redis_unreachable_is_its_own_condition_and_ready_stays_the_workloads() {
        let mut w = ew(minimal());
        let obs = Observed { redis: Some(Err("redis at redis:6379: connection refused".into())), ..running(1) };
        let s = build(&w, &obs, "sel".into(), "t1");
        let r = cond(&s, "RedisReachable");
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "Unreachable"));
        assert!(r.message.contains("connection refused"));
        assert_eq!(cond(&s, "Ready").status, "True", "healthy workers stay Ready");
        assert_eq!(cond(&s, "Degraded").status, "False");
        w.status = Some(s);
        let again = build(&w, &obs, "sel".into(), "t2");
        assert_eq!(
            cond(&again, "RedisReachable").last_transition_time.as_deref(),
            Some("t1"),
            "unchanged keeps its time"
        );
        assert_eq!(again, w.status.clone().unwrap(), "nothing changed: the same status (and no write)");
        let healed = Observed { redis: Some(Ok(vec![])), ..obs };
        let s = build(&w, &healed, "sel".into(), "t3");
        assert_eq!(cond(&s, "RedisReachable").last_transition_time.as_deref(), Some("t3"));
    }

    #[test]
    fn rolling_out_is_progressing_and_a_stuck_rollout_degrades() {
        let obs = Observed { updated: 1, ready: 2, available: 2, ..running(3) };
        let s = build(&ew(minimal()), &obs, "sel".into(), "t");
        assert_eq!(
            (cond(&s, "Progressing").status.as_str(), cond(&s, "Progressing").reason.as_str()),
            ("True", "RollingOut")
        );
        assert_eq!(cond(&s, "Ready").reason, "ReplicasNotReady");
        let stuck = Observed {
            rollout_stuck: Some((
                "ProgressDeadlineExceeded".into(),
                "ReplicaSet \"orders-1\" has timed out progressing.".into(),
            )),
            ..obs
        };
        let s = build(&ew(minimal()), &stuck, "sel".into(), "t");
        let d = cond(&s, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "ProgressDeadlineExceeded"));
        assert_eq!(cond(&s, "Progressing").status, "False");
    }

    #[test]
    fn conflicts_and_refusals_degrade_with_every_message() {
        let obs = Observed {
            conflicts: vec!["Service orders exists and is not controlled by this EventWorker".into()],
            apply_failures: vec!["ServiceMonitor orders: spec.endpoints[0].interval: Invalid value".into()],
            ..running(1)
        };
        let s = build(&ew(minimal()), &obs, "sel".into(), "t");
        let d = cond(&s, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "Conflict"));
        assert!(d.message.contains("Service orders") && d.message.contains("Invalid value"), "{}", d.message);
        assert_eq!(cond(&s, "Ready").status, "True", "the Deployment itself is fine");
    }

    #[test]
    fn an_invalid_spec_keeps_replicas_selector_and_what_redis_said() {
        let mut w = ew(minimal());
        w.status = Some(build(
            &w,
            &Observed { redis: Some(Ok(vec![StreamStatus { backlog: 5, ..Default::default() }])), ..running(2) },
            "sel".into(),
            "t1",
        ));
        let obs =
            Observed { invalid: Some("set exactly one of spec.redis.url and spec.redis.host".into()), ..running(2) };
        let obs = Observed { redis: None, ..obs };
        let s = build(&w, &obs, "sel".into(), "t2");
        assert_eq!((s.replicas, s.selector.as_str(), s.total_backlog), (2, "sel", 5));
        assert_eq!(cond(&s, "Degraded").reason, "InvalidSpec");
        let again = build(&with_status(&w, &s), &obs, "sel".into(), "t3");
        assert_eq!(cond(&again, "Degraded").last_transition_time.as_deref(), Some("t2"), "not reset each time");
    }

    fn with_status(w: &EventWorker, s: &EventWorkerStatus) -> EventWorker {
        let mut w = w.clone();
        w.status = Some(s.clone());
        w
    }

    #[test]
    fn password_joins_the_url() {
        let mut s = minimal();
        s["redis"]["passwordSecretRef"] = serde_json::json!({"name": "r", "key": "p"});
        let w = ew(s);
        let secrets = SecretData::from([(
            "r".into(),
            std::collections::BTreeMap::from([("p".into(), k8s_openapi::ByteString(b"a/b".to_vec()))]),
        )]);
        assert_eq!(redis_url(&w, &secrets), "redis://:a%2Fb@redis:6379");
        assert_eq!(redis_url(&w, &SecretData::new()), "redis://redis:6379");
    }
}
