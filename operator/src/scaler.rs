//! The built-in autoscaler: desired replicas from the streams' backlog, with the
//! HorizontalPodAutoscaler's behaviour rules (stabilization windows, rate policies,
//! selectPolicy) so that `autoscaling.behavior` means what users know from the HPA.
//!
//! Pure: the reconciler feeds it what it read and the time; tests drive it with a paused
//! clock. State per EventWorker (past recommendations and scale events) lives in memory;
//! after an operator restart the current count counts as a fresh recommendation, so a
//! scale-down waits a full window again.

use std::collections::VecDeque;
use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::{HPAScalingRules, HorizontalPodAutoscalerBehavior};
use tokio::time::Instant;

use crate::crd::{EventWorkerSpec, Ordering, StreamSpec, StreamStatus};

/// One stream's share of the signal.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamLoad {
    /// Undelivered + pending entries.
    pub backlog: i64,
    /// `streams[].autoscalingWeight` (1 by default).
    pub weight: f64,
    /// Seconds the oldest entry nobody has read yet has waited (pending entries are being
    /// worked on or wait for a claim: more pods would not help them).
    pub oldest_undelivered_age: f64,
}

/// What the scaler read: the streams, and the retries scheduled for later.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Load {
    pub streams: Vec<StreamLoad>,
    pub scheduled: i64,
}

impl Load {
    /// The load of an EventWorker's streams as read into its status (same order as
    /// `spec.streams`), with the streams' weights.
    pub fn from_status(spec: &EventWorkerSpec, streams: &[StreamStatus], scheduled: i64) -> Self {
        Load {
            streams: spec
                .streams
                .iter()
                .zip(streams)
                .map(|(s, st)| StreamLoad {
                    backlog: st.backlog,
                    weight: s.autoscaling_weight.unwrap_or(1.0),
                    oldest_undelivered_age: st.oldest_undelivered_age_seconds,
                })
                .collect(),
            scheduled,
        }
    }

    pub fn weighted_backlog(&self) -> f64 {
        self.streams.iter().map(|s| s.backlog.max(0) as f64 * s.weight).sum()
    }

    pub fn oldest_undelivered_age(&self) -> f64 {
        self.streams.iter().filter(|s| s.backlog > 0).map(|s| s.oldest_undelivered_age).fold(0.0, f64::max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PolicyKind {
    Pods,
    Percent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Select {
    Max,
    Min,
    Disabled,
}

#[derive(Debug, Clone, PartialEq)]
struct Rules {
    window: Duration,
    policies: Vec<(PolicyKind, i32, Duration)>,
    select: Select,
}

impl Rules {
    /// The HPA's defaults for scaling up: at once, max(4 pods, 100%) per 15 s.
    fn default_up() -> Self {
        let p = Duration::from_secs(15);
        Rules {
            window: Duration::ZERO,
            policies: vec![(PolicyKind::Pods, 4, p), (PolicyKind::Percent, 100, p)],
            select: Select::Max,
        }
    }

    /// The HPA's defaults for scaling down: after 300 s, up to 100% per 15 s.
    fn default_down() -> Self {
        Rules {
            window: Duration::from_secs(300),
            policies: vec![(PolicyKind::Percent, 100, Duration::from_secs(15))],
            select: Select::Max,
        }
    }

    /// Fields set in `r` replace the defaults one by one, as in the HPA.
    fn from_spec(r: Option<&HPAScalingRules>, default: Rules) -> Self {
        let Some(r) = r else { return default };
        let policies = match &r.policies {
            Some(ps) if !ps.is_empty() => ps
                .iter()
                .map(|p| {
                    let kind = if p.type_ == "Percent" { PolicyKind::Percent } else { PolicyKind::Pods };
                    (kind, p.value.max(0), Duration::from_secs(p.period_seconds.clamp(1, 1800) as u64))
                })
                .collect(),
            _ => default.policies,
        };
        let select = match r.select_policy.as_deref() {
            Some("Min") => Select::Min,
            Some("Disabled") => Select::Disabled,
            Some(_) => Select::Max,
            None => default.select,
        };
        let window = r
            .stabilization_window_seconds
            .map(|s| Duration::from_secs(s.clamp(0, 3600) as u64))
            .unwrap_or(default.window);
        Rules { window, policies, select }
    }
}

/// The settings, parsed once per reconcile from `spec.autoscaling`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    /// Most pods that can deliver at once: an ordered stream is delivered by one pod at a
    /// time (its lease holder), so with every stream ordered, pods beyond the number of
    /// streams would only stand by.
    pub useful: Option<i32>,
    pub target_per_replica: f64,
    pub target_age: Option<f64>,
    up: Rules,
    down: Rules,
}

impl Policy {
    pub fn from_spec(spec: &EventWorkerSpec) -> Option<Self> {
        let a = spec.autoscaling.as_ref()?;
        let b: Option<&HorizontalPodAutoscalerBehavior> = a.behavior.as_ref();
        let ordered = |s: &StreamSpec| s.ordering.unwrap_or(spec.ordering) != Ordering::None;
        let useful = spec.streams.iter().all(ordered).then_some(spec.streams.len() as i32);
        Some(Policy {
            min: a.min_replicas.max(0),
            max: a.max_replicas.max(a.min_replicas).max(1),
            useful,
            target_per_replica: a.target_lag_per_replica.max(1) as f64,
            target_age: a.target_oldest_age_seconds.filter(|s| *s > 0.0),
            up: Rules::from_spec(b.and_then(|b| b.scale_up.as_ref()), Rules::default_up()),
            down: Rules::from_spec(b.and_then(|b| b.scale_down.as_ref()), Rules::default_down()),
        })
    }

    /// The most the signal may ask for: `max`, or fewer when every stream is ordered.
    fn ceiling(&self) -> i32 {
        self.useful.map_or(self.max, |u| u.min(self.max)).max(self.min)
    }
}

/// Why the scaler could not simply follow the signal (condition `ScalingLimited`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// The signal asks for more than `maxReplicas`.
    TooManyReplicas,
    /// Every stream is ordered: more pods than streams would only stand by.
    OrderedStreams,
    /// The signal asks for fewer than `minReplicas`.
    TooFewReplicas,
    /// A scale-up policy held it back for now.
    ScaleUpLimit,
    /// A scale-down policy held it back for now.
    ScaleDownLimit,
}

impl Limit {
    pub fn reason(&self) -> &'static str {
        match self {
            Limit::TooManyReplicas => "TooManyReplicas",
            Limit::OrderedStreams => "OrderedStreams",
            Limit::TooFewReplicas => "TooFewReplicas",
            Limit::ScaleUpLimit => "ScaleUpLimit",
            Limit::ScaleDownLimit => "ScaleDownLimit",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas to apply.
    pub replicas: i32,
    /// What the signal alone asks for (before windows, policies and bounds).
    pub recommended: i32,
    /// Set when bounds or policies changed the recommendation.
    pub limited: Option<Limit>,
    /// Why (for the status, the event and the log).
    pub reason: String,
    /// False while the signal cannot be read: the count is frozen.
    pub active: bool,
}

/// Past recommendations and scale events of one EventWorker.
#[derive(Debug, Clone)]
pub struct Scaler {
    recommendations: VecDeque<(Instant, i32)>,
    /// Applied changes (signed), for the rate policies.
    events: VecDeque<(Instant, i32)>,
}

impl Scaler {
    /// A scaler that has seen `current` replicas recommended just now.
    pub fn new(now: Instant, current: i32) -> Self {
        Scaler { recommendations: VecDeque::from([(now, current)]), events: VecDeque::new() }
    }

    /// Decide the replicas for `current` running ones. `load` is `None` while the backlog
    /// cannot be read: the count stays (never scale on a guess). A change is counted
    /// against the rate policies only once applied: call [`Scaler::applied`].
    pub fn decide(&mut self, p: &Policy, load: Option<&Load>, current: i32, now: Instant) -> Decision {
        let keep = p.up.window.max(p.down.window);
        self.recommendations.retain(|(t, _)| now.saturating_duration_since(*t) < keep);
        let longest_period = p.up.policies.iter().chain(&p.down.policies).map(|x| x.2).max().unwrap_or_default();
        self.events.retain(|(t, _)| now.saturating_duration_since(*t) <= longest_period);
        // Outside the bounds (they were just changed): straight to them, as the HPA does.
        if current > p.max || current < p.min {
            let replicas = current.clamp(p.min, p.max);
            let limit = if current > p.max { Limit::TooManyReplicas } else { Limit::TooFewReplicas };
            let reason = format!("replicas outside [{}, {}]", p.min, p.max);
            return Decision { replicas, recommended: replicas, limited: Some(limit), reason, active: load.is_some() };
        }
        let Some(load) = load else {
            return Decision {
                replicas: current,
                recommended: current,
                limited: None,
                reason: "backlog unknown (Redis cannot be read): replicas kept".into(),
                active: false,
            };
        };
        let (raw, why) = recommend(p, load, current);

        // Bounds first: what the HPA calls the normalized recommendation.
        let bounded = raw.clamp(p.min, p.ceiling());
        let mut limited = match raw {
            r if r > p.max && p.ceiling() == p.max => Some(Limit::TooManyReplicas),
            r if r > p.ceiling() => Some(Limit::OrderedStreams),
            r if r < p.min => Some(Limit::TooFewReplicas),
            _ => None,
        };

        // Stabilization: up to the lowest recommendation of the up window, down to the
        // highest of the down window.
        let (mut up_rec, mut down_rec) = (bounded, bounded);
        for (t, r) in &self.recommendations {
            let age = now.saturating_duration_since(*t);
            if age < p.up.window {
                up_rec = up_rec.min(*r);
            }
            if age < p.down.window {
                down_rec = down_rec.max(*r);
            }
        }
        self.recommendations.push_back((now, bounded));
        let stabilized = current.max(up_rec).min(down_rec);

        // Rate policies.
        let replicas = if stabilized > current {
            let mut limit = up_limit(&p.up, current, &self.events, now).min(p.max);
            if current == 0 && p.up.select != Select::Disabled {
                // Percentages of nothing are nothing: waking always brings one pod.
                limit = limit.max(1);
            }
            if stabilized > limit {
                limited = Some(Limit::ScaleUpLimit);
            }
            stabilized.min(limit)
        } else if stabilized < current {
            let limit = down_limit(&p.down, current, &self.events, now).max(p.min);
            if stabilized < limit {
                limited = Some(Limit::ScaleDownLimit);
            }
            stabilized.max(limit)
        } else {
            stabilized
        };
        Decision { replicas, recommended: raw, limited, reason: why, active: true }
    }

    /// Record a change that was applied (for the rate policies).
    pub fn applied(&mut self, from: i32, to: i32, now: Instant) {
        if from != to {
            self.events.push_back((now, to - from));
        }
    }
}

/// Within 10 % of the target the count stays (the HPA's tolerance), so that a backlog
/// hovering around a boundary does not flap the replicas.
const TOLERANCE: f64 = 0.1;

/// What the signal asks for, and why in words.
fn recommend(p: &Policy, load: &Load, current: i32) -> (i32, String) {
    let weighted = load.weighted_backlog();
    let mut raw = if current > 0 && (weighted / (current as f64 * p.target_per_replica) - 1.0).abs() <= TOLERANCE {
        current
    } else {
        (weighted / p.target_per_replica).ceil().min(i32::MAX as f64) as i32
    };
    let mut why = format!("backlog {weighted:.0} / {} per pod", p.target_per_replica);
    if let Some(target) = p.target_age {
        let age = load.oldest_undelivered_age();
        // One more pod per decision while events wait too long (the rate policies pace it):
        // the age does not fall the moment pods are added, a ratio would run to max.
        if age > target && current + 1 > raw {
            raw = current + 1;
            why = format!("oldest undelivered event waited {age:.0}s > {target:.0}s");
        }
    }
    if raw == 0 && load.scheduled > 0 {
        raw = 1;
        why = format!("{} retries scheduled", load.scheduled);
    }
    (raw, why)
}

/// Replicas added and removed within the last `period`.
fn changed_within(events: &VecDeque<(Instant, i32)>, period: Duration, now: Instant) -> (i32, i32) {
    events.iter().filter(|(t, _)| now.saturating_duration_since(*t) < period).fold((0, 0), |(up, down), (_, d)| {
        if *d > 0 {
            (up + d, down)
        } else {
            (up, down - d)
        }
    })
}

/// The count at the start of `period`, as the HPA computes it (net of both directions).
fn period_start(current: i32, events: &VecDeque<(Instant, i32)>, period: Duration, now: Instant) -> i32 {
    let (added, removed) = changed_within(events, period, now);
    current - added + removed
}

fn up_limit(r: &Rules, current: i32, events: &VecDeque<(Instant, i32)>, now: Instant) -> i32 {
    if r.select == Select::Disabled || r.policies.is_empty() {
        return current;
    }
    let proposals = r.policies.iter().map(|&(kind, value, period)| {
        let start = period_start(current, events, period, now);
        match kind {
            PolicyKind::Pods => start.saturating_add(value),
            PolicyKind::Percent => (start as f64 * (1.0 + value as f64 / 100.0)).ceil() as i32,
        }
    });
    let limit = if r.select == Select::Min { proposals.min() } else { proposals.max() };
    limit.unwrap_or(current).max(current)
}

fn down_limit(r: &Rules, current: i32, events: &VecDeque<(Instant, i32)>, now: Instant) -> i32 {
    if r.select == Select::Disabled || r.policies.is_empty() {
        return current;
    }
    let proposals = r.policies.iter().map(|&(kind, value, period)| {
        let start = period_start(current, events, period, now);
        match kind {
            PolicyKind::Pods => start - value,
            PolicyKind::Percent => (start as f64 * (1.0 - value as f64 / 100.0)) as i32,
        }
    });
    // "Max" selects the policy that allows the biggest change: the lowest count.
    let limit = if r.select == Select::Min { proposals.max() } else { proposals.min() };
    limit.unwrap_or(current).min(current).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: serde_json::Value) -> Policy {
        let mut a = json!({"minReplicas": 1, "maxReplicas": 10, "targetLagPerReplica": 1000});
        for (k, val) in v.as_object().unwrap() {
            a[k] = val.clone();
        }
        let spec =
            json!({"redis": {"host": "r"}, "target": {"uri": "http://t/"}, "ordering": "none", "autoscaling": a});
        Policy::from_spec(&serde_json::from_value(spec).unwrap()).unwrap()
    }

    fn load(backlog: i64) -> Load {
        Load { streams: vec![StreamLoad { backlog, weight: 1.0, oldest_undelivered_age: 1.0 }], scheduled: 0 }
    }

    /// What the controller does: decide, apply, record.
    fn step(s: &mut Scaler, p: &Policy, l: Option<&Load>, current: i32) -> Decision {
        let d = s.decide(p, l, current, Instant::now());
        s.applied(current, d.replicas, Instant::now());
        d
    }

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn scales_up_at_once_within_the_rate_policies() {
        let p = policy(json!({"maxReplicas": 20}));
        let mut s = Scaler::new(Instant::now(), 1);
        // 12,000 waiting: 12 pods wanted; from 1, max(4 pods, 100%) per 15 s allows 5.
        let d = step(&mut s, &p, Some(&load(12_000)), 1);
        assert_eq!((d.replicas, d.recommended, d.limited), (5, 12, Some(Limit::ScaleUpLimit)));
        // Within the same 15 s nothing more.
        tokio::time::advance(5 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(12_000)), 5).replicas, 5);
        // A new period: from 5, 100% allows 10.
        tokio::time::advance(11 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(12_000)), 5).replicas, 10);
        tokio::time::advance(16 * S).await;
        let d = step(&mut s, &p, Some(&load(12_000)), 10);
        assert_eq!((d.replicas, d.limited), (12, None));
        // Beyond max: clamped, and said so.
        let d = step(&mut s, &p, Some(&load(50_000)), 12);
        assert_eq!((d.replicas, d.limited), (20, Some(Limit::TooManyReplicas)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_that_was_not_applied_uses_no_budget() {
        let p = policy(json!({"maxReplicas": 20}));
        let mut s = Scaler::new(Instant::now(), 1);
        assert_eq!(s.decide(&p, Some(&load(12_000)), 1, Instant::now()).replicas, 5);
        // The apply failed: still 1 running, the same step is allowed again.
        tokio::time::advance(2 * S).await;
        assert_eq!(s.decide(&p, Some(&load(12_000)), 1, Instant::now()).replicas, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_period_start_counts_both_directions() {
        // Down 10 -> 5 just now: a burst may go to 10 + 100% = 20 within the period, as the
        // HPA computes it (start = current - added + removed).
        let p = policy(json!({"maxReplicas": 30, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}));
        let mut s = Scaler::new(Instant::now(), 10);
        assert_eq!(step(&mut s, &p, Some(&load(5_000)), 10).replicas, 5);
        tokio::time::advance(2 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(30_000)), 5).replicas, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn scales_down_only_after_the_window() {
        let p = policy(json!({"behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}}));
        let mut s = Scaler::new(Instant::now(), 6);
        assert_eq!(step(&mut s, &p, Some(&load(6_000)), 6).replicas, 6);
        // The backlog is gone: the highest recommendation of the last 60 s holds.
        for _ in 0..5 {
            tokio::time::advance(10 * S).await;
            assert_eq!(step(&mut s, &p, Some(&load(0)), 6).replicas, 6);
        }
        tokio::time::advance(11 * S).await;
        let d = step(&mut s, &p, Some(&load(0)), 6);
        assert_eq!((d.replicas, d.limited), (1, Some(Limit::TooFewReplicas)), "back to min");
    }

    #[tokio::test(start_paused = true)]
    async fn scale_down_steps_follow_the_policies() {
        let p = policy(json!({"behavior": {"scaleDown": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]
        }}}));
        let mut s = Scaler::new(Instant::now(), 8);
        let d = step(&mut s, &p, Some(&load(0)), 8);
        assert_eq!((d.replicas, d.limited), (6, Some(Limit::ScaleDownLimit)));
        tokio::time::advance(10 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(0)), 6).replicas, 6, "2 per 30 s used up");
        tokio::time::advance(21 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(0)), 6).replicas, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn scale_up_can_be_disabled_and_windowed() {
        let off = policy(json!({"behavior": {"scaleUp": {"selectPolicy": "Disabled"}}}));
        let mut s = Scaler::new(Instant::now(), 2);
        assert_eq!(step(&mut s, &off, Some(&load(9_000)), 2).replicas, 2);
        let windowed = policy(json!({"behavior": {"scaleUp": {"stabilizationWindowSeconds": 30}}}));
        let mut s = Scaler::new(Instant::now(), 2);
        tokio::time::advance(5 * S).await;
        // A burst shorter than the window does not scale up.
        assert_eq!(step(&mut s, &windowed, Some(&load(9_000)), 2).replicas, 2);
        tokio::time::advance(26 * S).await;
        assert_eq!(step(&mut s, &windowed, Some(&load(9_000)), 2).replicas, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_changed_under_it_apply_at_once() {
        let p = policy(json!({"minReplicas": 3, "maxReplicas": 4}));
        let mut s = Scaler::new(Instant::now(), 9);
        let d = step(&mut s, &p, Some(&load(9_000)), 9);
        assert_eq!((d.replicas, d.limited), (4, Some(Limit::TooManyReplicas)), "no window above max");
        let d = step(&mut s, &p, None, 1);
        assert_eq!((d.replicas, d.limited), (3, Some(Limit::TooFewReplicas)), "raised to min even unread");
    }

    #[tokio::test(start_paused = true)]
    async fn within_ten_percent_of_the_target_nothing_moves() {
        let p = policy(json!({"behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}));
        let mut s = Scaler::new(Instant::now(), 4);
        assert_eq!(step(&mut s, &p, Some(&load(4_300)), 4).replicas, 4, "4.3 per 4 pods is within 10%");
        assert_eq!(step(&mut s, &p, Some(&load(3_700)), 4).replicas, 4);
        assert_eq!(step(&mut s, &p, Some(&load(4_500)), 4).replicas, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn ordered_streams_are_not_given_pods_that_would_only_stand_by() {
        let spec = |ordering: serde_json::Value| {
            let s = json!({"redis": {"host": "r"}, "target": {"uri": "http://t/"},
                "streams": [{"name": "a"}, {"name": "b", "ordering": ordering}],
                "autoscaling": {"maxReplicas": 10}});
            Policy::from_spec(&serde_json::from_value(s).unwrap()).unwrap()
        };
        let ordered = spec(json!("stream"));
        let d = Scaler::new(Instant::now(), 1).decide(&ordered, Some(&load(9_000)), 1, Instant::now());
        assert_eq!((d.replicas, d.limited), (2, Some(Limit::OrderedStreams)), "two ordered streams: two pods");
        let mixed = spec(json!("none"));
        assert_eq!(Scaler::new(Instant::now(), 1).decide(&mixed, Some(&load(9_000)), 1, Instant::now()).replicas, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn weights_make_a_critical_backlog_count_more() {
        let p = policy(json!({}));
        let l = Load {
            streams: vec![
                StreamLoad { backlog: 500, weight: 4.0, oldest_undelivered_age: 1.0 },
                StreamLoad { backlog: 500, weight: 1.0, oldest_undelivered_age: 1.0 },
            ],
            scheduled: 0,
        };
        assert_eq!(l.weighted_backlog(), 2_500.0);
        let d = Scaler::new(Instant::now(), 1).decide(&p, Some(&l), 1, Instant::now());
        assert_eq!(d.recommended, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_event_adds_pods_one_at_a_time_whatever_the_count() {
        let p = policy(json!({"targetOldestAgeSeconds": 30.0}));
        let old = |age| Load {
            streams: vec![StreamLoad { backlog: 40, weight: 1.0, oldest_undelivered_age: age }],
            scheduled: 0,
        };
        let mut s = Scaler::new(Instant::now(), 2);
        let d = step(&mut s, &p, Some(&old(90.0)), 2);
        assert_eq!((d.recommended, d.replicas), (3, 3));
        assert!(d.reason.contains("oldest undelivered event waited 90s"), "{}", d.reason);
        assert_eq!(step(&mut s, &p, Some(&old(95.0)), 3).replicas, 4, "still waiting: one more");
        // Young enough: the count decides (and the window holds the pods for now).
        let d = s.decide(&p, Some(&old(10.0)), 4, Instant::now());
        assert_eq!((d.recommended, d.replicas), (1, 4));
        // A drained stream's stale age does not count.
        let drained =
            Load { streams: vec![StreamLoad { backlog: 0, weight: 1.0, oldest_undelivered_age: 500.0 }], scheduled: 0 };
        assert_eq!(drained.oldest_undelivered_age(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn frozen_while_the_backlog_cannot_be_read() {
        let p = policy(json!({"behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}));
        let mut s = Scaler::new(Instant::now(), 7);
        let d = step(&mut s, &p, None, 7);
        assert_eq!((d.replicas, d.active), (7, false));
        tokio::time::advance(600 * S).await;
        assert_eq!(step(&mut s, &p, None, 7).replicas, 7);
        assert_eq!(step(&mut s, &p, Some(&load(0)), 7).replicas, 1, "reads again: scales");
    }

    #[tokio::test(start_paused = true)]
    async fn scales_to_zero_and_wakes_on_the_first_event() {
        let p = policy(json!({"minReplicas": 0, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 30}}}));
        let mut s = Scaler::new(Instant::now(), 1);
        assert_eq!(step(&mut s, &p, Some(&load(0)), 1).replicas, 1, "within the window");
        tokio::time::advance(31 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(0)), 1).replicas, 0);
        // A retry scheduled for later needs a worker to move it when due.
        let waiting = Load { scheduled: 3, ..load(0) };
        assert_eq!(step(&mut s, &p, Some(&waiting), 0).replicas, 1);
        let mut s = Scaler::new(Instant::now(), 0);
        tokio::time::advance(31 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(0)), 0).replicas, 0);
        assert_eq!(step(&mut s, &p, Some(&load(1)), 0).replicas, 1, "one event wakes it");
        // Also when the only scale-up policy is a percentage (of nothing).
        let pct = policy(json!({"minReplicas": 0, "behavior": {"scaleUp": {
            "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}]}}}));
        let mut s = Scaler::new(Instant::now(), 0);
        assert_eq!(step(&mut s, &pct, Some(&load(5_000)), 0).replicas, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_operator_waits_a_full_window_before_scaling_down() {
        let p = policy(json!({}));
        let mut s = Scaler::new(Instant::now(), 5);
        tokio::time::advance(299 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(0)), 5).replicas, 5);
        tokio::time::advance(2 * S).await;
        assert_eq!(step(&mut s, &p, Some(&load(0)), 5).replicas, 1);
    }
}
