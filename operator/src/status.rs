//! Status from what was applied and observed: conditions Ready / Progressing / Degraded
//! (and ScalingActive / ScalingLimited with autoscaling), replicas, and each stream's
//! backlog read from Redis (crate `backlog`, the definition the workers' gauges use).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;

use crate::crd::{AutoscalingStatus, Condition, EventWorker, EventWorkerStatus, StreamStatus};
use crate::resources::deployment::SecretData;

/// What the reconciler found, to be turned into a status.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Replicas desired, updated, ready, available per the Deployment's status.
    pub desired: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    /// Deployment controller has seen the latest template.
    pub deployment_current: bool,
    /// Streams read from Redis, or why not.
    pub redis: Result<Vec<StreamStatus>, String>,
    /// Referenced Secrets (or keys) that do not exist.
    pub missing_secrets: Vec<String>,
    /// Why a requested ServiceMonitor was not created.
    pub service_monitor_skipped: Option<String>,
    /// Retries scheduled for later on this Redis.
    pub scheduled: i64,
    /// The autoscaler's state, when `spec.autoscaling` is set.
    pub scaling: Option<Scaling>,
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

impl Default for Observed {
    fn default() -> Self {
        Self {
            desired: 0,
            updated: 0,
            ready: 0,
            available: 0,
            deployment_current: false,
            redis: Ok(vec![]),
            missing_secrets: vec![],
            service_monitor_skipped: None,
            scheduled: 0,
            scaling: None,
        }
    }
}

impl Observed {
    pub fn from_deployment(d: &Deployment) -> Self {
        let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        let generation = d.metadata.generation.unwrap_or(0);
        Observed {
            desired,
            updated: st.updated_replicas.unwrap_or(0),
            ready: st.ready_replicas.unwrap_or(0),
            available: st.available_replicas.unwrap_or(0),
            deployment_current: st.observed_generation.unwrap_or(0) >= generation,
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

/// The status to apply. Transition times carry over from `previous` when a condition's
/// status did not change.
pub fn build(ew: &EventWorker, obs: &Observed, selector: String, now: &str) -> EventWorkerStatus {
    let generation = ew.metadata.generation;
    let rolling = !obs.deployment_current || obs.updated < obs.desired || obs.ready < obs.desired;
    let progressing = if rolling {
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
    let degraded = if !obs.missing_secrets.is_empty() {
        condition("Degraded", true, "SecretMissing", format!("missing: {}", obs.missing_secrets.join(", ")), generation)
    } else if let Err(e) = &obs.redis {
        condition("Degraded", true, "RedisUnreachable", e.clone(), generation)
    } else if let Some(why) = &obs.service_monitor_skipped {
        condition("Degraded", true, "ServiceMonitorUnavailable", why.clone(), generation)
    } else {
        condition("Degraded", false, "AsExpected", String::new(), generation)
    };
    let ready = if let Err(e) = &obs.redis {
        condition("Ready", false, "RedisUnreachable", e.clone(), generation)
    } else if !obs.missing_secrets.is_empty() {
        condition("Ready", false, "SecretMissing", format!("missing: {}", obs.missing_secrets.join(", ")), generation)
    } else if obs.available < obs.desired || obs.ready < obs.desired {
        condition("Ready", false, "ReplicasNotReady", format!("{}/{} pods ready", obs.ready, obs.desired), generation)
    } else {
        condition("Ready", true, "AllReplicasReady", format!("{}/{} pods ready", obs.ready, obs.desired), generation)
    };
    let mut conditions = vec![ready, progressing, degraded];
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
    let streams = obs.redis.clone().unwrap_or_default();
    let oldest = streams.iter().filter(|s| s.backlog > 0).map(|s| s.oldest_age_seconds).fold(0.0, f64::max);
    EventWorkerStatus {
        observed_generation: generation,
        conditions,
        replicas: obs.desired,
        ready_replicas: obs.ready,
        selector,
        total_lag: streams.iter().map(|s| s.lag).sum(),
        total_backlog: streams.iter().map(|s| s.backlog).sum(),
        oldest_age_seconds: obs.redis.is_ok().then_some(oldest),
        scheduled_retries: obs.scheduled,
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
    let env = crate::resources::deployment::worker_env(&ew.spec);
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

/// Each stream's backlog for the EventWorker's group, and the retries scheduled, within
/// `timeout`.
pub async fn read_backlog(
    url: &str,
    streams: &[String],
    group: &str,
    timeout: Duration,
) -> Result<(Vec<StreamStatus>, i64), String> {
    let work = async {
        let client = redis::Client::open(url).map_err(|e| format!("redis URL: {e}"))?;
        let mut con = client.get_multiplexed_async_connection().await.map_err(|e| format!("redis unreachable: {e}"))?;
        let now = backlog::now_unix_ms();
        let mut out = Vec::new();
        for s in streams {
            let key = format!("events:{s}");
            let b = backlog::read(&mut con, &key, group).await.map_err(|e| format!("backlog of {key}: {e}"))?;
            out.push(StreamStatus {
                length: b.length,
                pending: b.pending,
                lag: b.undelivered,
                backlog: b.total(),
                oldest_age_seconds: (b.oldest_age_secs(now) * 10.0).round() / 10.0,
                oldest_undelivered_age_seconds: (b.oldest_undelivered_age_secs(now) * 10.0).round() / 10.0,
                exact: b.exact,
                name: key,
            });
        }
        let scheduled = backlog::scheduled(&mut con).await.map_err(|e| format!("scheduled retries: {e}"))?;
        Ok((out, scheduled))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("redis did not answer within {timeout:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    fn cond<'a>(s: &'a EventWorkerStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn ready_when_all_pods_ready_and_redis_answers() {
        let w = ew(minimal());
        let obs = Observed {
            desired: 2,
            updated: 2,
            ready: 2,
            available: 2,
            deployment_current: true,
            redis: Ok(vec![StreamStatus {
                name: "events:fast".into(),
                length: 10,
                pending: 2,
                lag: 8,
                backlog: 10,
                ..Default::default()
            }]),
            ..Default::default()
        };
        let s = build(&w, &obs, "sel".into(), "2026-01-01T00:00:00Z");
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!((s.observed_generation, s.total_lag, s.ready_replicas), (Some(3), 8, 2));
    }

    #[test]
    fn redis_unreachable_degrades_and_keeps_transition_times() {
        let mut w = ew(minimal());
        let obs = Observed {
            desired: 1,
            updated: 1,
            ready: 1,
            available: 1,
            deployment_current: true,
            redis: Err("redis unreachable: refused".into()),
            ..Default::default()
        };
        let s = build(&w, &obs, "sel".into(), "t1");
        assert_eq!(
            (cond(&s, "Degraded").status.as_str(), cond(&s, "Degraded").reason.as_str()),
            ("True", "RedisUnreachable")
        );
        assert!(cond(&s, "Degraded").message.contains("refused"));
        assert_eq!(cond(&s, "Ready").status, "False");
        w.status = Some(s);
        let again = build(&w, &obs, "sel".into(), "t2");
        assert_eq!(
            cond(&again, "Degraded").last_transition_time.as_deref(),
            Some("t1"),
            "unchanged status keeps its time"
        );
        let healed = Observed { redis: Ok(vec![]), ..obs };
        let s = build(&w, &healed, "sel".into(), "t3");
        assert_eq!(cond(&s, "Degraded").last_transition_time.as_deref(), Some("t3"));
        assert_eq!(cond(&s, "Ready").status, "True");
    }

    #[test]
    fn rolling_out_is_progressing() {
        let obs = Observed {
            desired: 3,
            updated: 1,
            ready: 2,
            available: 2,
            deployment_current: true,
            redis: Ok(vec![]),
            ..Default::default()
        };
        let s = build(&ew(minimal()), &obs, "sel".into(), "t");
        assert_eq!(
            (cond(&s, "Progressing").status.as_str(), cond(&s, "Progressing").reason.as_str()),
            ("True", "RollingOut")
        );
        assert_eq!(cond(&s, "Ready").reason, "ReplicasNotReady");
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
