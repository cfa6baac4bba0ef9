//! Admission per target host (scheme, host, port): why host X got N requests at once.
//!
//! Each host has its own concurrency limit ([`AdaptiveLimit`], capped), an optional rate
//! limit, and a bounded queue of events waiting for a free slot, admitted in stream
//! priority order. After a 502/503/504, connect error or timeout the host is paused:
//! nothing is admitted, waiting events are told to go elsewhere (the caller moves them to
//! a durable place), and an `OPTIONS` probe runs with backoff. When a probe answers below
//! 500 the host reopens gradually: one trial request, then the limit ramps up.
//!
//! Hosts are created on first use and dropped (with their metric series) once idle, so
//! memory stays bounded however many hosts events name.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::{Deliverer, Target};
use crate::limiter::{AdaptiveLimit, LimitSettings, RateLimit, Signal};
use crate::metrics::Metrics;
use crate::retry::backoff;

const PROBE_BASE: Duration = Duration::from_millis(250);
const PROBE_CAP: Duration = Duration::from_secs(30);
/// Farthest an event turned away by a busy host is told to come back.
const MAX_HORIZON: Duration = Duration::from_secs(300);
/// A host unused this long is forgotten (its limiter starts over when it is used again).
const IDLE_EVICT: Duration = Duration::from_secs(300);
/// Hosts with metric series of their own; the hosts beyond (producers choose `meta.url`)
/// are limited all the same, without series.
pub const MAX_HOST_SERIES: usize = 500;
/// Hosts tracked at most; beyond, hosts idle for a minute are forgotten early.
const MAX_HOSTS: usize = 10_000;

/// Per-host settings that may differ from the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostOverride {
    pub max: Option<usize>,
    pub rate: Option<f64>,
    pub adaptive: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostSettings {
    pub limit: LimitSettings,
    /// Requests per second per host; None: no rate limit.
    pub rate: Option<f64>,
    /// Most events waiting for one host.
    pub queue: usize,
    /// Keyed by host key (`scheme://host:port`).
    pub overrides: HashMap<String, HostOverride>,
}

impl Default for HostSettings {
    fn default() -> Self {
        Self { limit: LimitSettings::default(), rate: None, queue: 4096, overrides: HashMap::new() }
    }
}

impl HostSettings {
    fn for_host(&self, key: &str) -> (LimitSettings, Option<f64>) {
        let o = self.overrides.get(key).copied().unwrap_or_default();
        let mut l = self.limit;
        if let Some(m) = o.max {
            l.max = m.max(1);
        }
        if let Some(a) = o.adaptive {
            l.adaptive = a;
        }
        (l, o.rate.or(self.rate))
    }
}

/// The answer to "may this event be sent to its host now?".
pub enum Admit {
    /// Go ahead; report how it went through the permit.
    Go(HostPermit),
    /// The host is paused; try again after this long at the earliest.
    Paused { retry_in: Duration },
    /// The host's queue is full (or the wait ran out); it may drain in about this long.
    Busy { retry_in: Duration },
}

enum Grant {
    Go,
    Paused(Duration),
    Busy,
}

struct Pause {
    next_probe: Instant,
}

struct HostState {
    limiter: AdaptiveLimit,
    rate: Option<RateLimit>,
    in_flight: usize,
    /// Waiting events by (priority, arrival): the first entry is admitted next.
    waiters: BTreeMap<(u32, u64), oneshot::Sender<Grant>>,
    seq: u64,
    paused: Option<Pause>,
    rate_timer: bool,
    last_used: Instant,
    /// Events turned away as busy are spread over the time the host needs for them: the
    /// next one is told to come back at this horizon, which moves on by one request's
    /// share of the host's throughput each time.
    horizon: Instant,
}

struct Host {
    key: Arc<str>,
    st: Mutex<HostState>,
    gauges: Gauges,
}

struct Gauges {
    limit: prometheus::IntGauge,
    in_flight: prometheus::IntGauge,
    queued: prometheus::IntGauge,
    baseline: prometheus::Gauge,
    open: prometheus::IntGauge,
}

impl Host {
    fn lock(&self) -> MutexGuard<'_, HostState> {
        crate::lock(&self.st)
    }

    /// May one more request start now? Takes a rate token when it may.
    fn can_start(st: &mut HostState, now: Instant) -> Result<(), Option<Duration>> {
        if st.paused.is_some() || st.in_flight >= st.limiter.limit() {
            return Err(None);
        }
        match &mut st.rate {
            Some(r) => r.try_take(now.into_std()).map_err(Some),
            None => Ok(()),
        }
    }

    /// Admit waiting events while there is room, best priority first.
    fn grant_waiters(self: &Arc<Self>, st: &mut HostState) {
        let now = Instant::now();
        while !st.waiters.is_empty() {
            match Self::can_start(st, now) {
                Ok(()) => {
                    let Some((_, tx)) = st.waiters.pop_first() else { break };
                    st.in_flight += 1;
                    if tx.send(Grant::Go).is_err() {
                        st.in_flight -= 1; // the waiter gave up meanwhile
                    }
                }
                Err(Some(wait)) => {
                    if !st.rate_timer {
                        st.rate_timer = true;
                        let host = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            let mut st = host.lock();
                            st.rate_timer = false;
                            host.grant_waiters(&mut st);
                        });
                    }
                    break;
                }
                Err(None) => break,
            }
        }
        self.publish(st);
    }

    fn publish(&self, st: &HostState) {
        self.gauges.limit.set(st.limiter.limit() as i64);
        self.gauges.in_flight.set(st.in_flight as i64);
        self.gauges.queued.set(st.waiters.len() as i64);
        self.gauges.baseline.set(st.limiter.baseline().unwrap_or(0.0));
        self.gauges.open.set(st.paused.is_some() as i64);
    }

    /// When an event turned away now should come back: after the queue ahead has drained
    /// (from the limit and the latency baseline) and after those turned away before it.
    fn come_back_in(st: &mut HostState) -> Duration {
        let now = Instant::now();
        let rtt = st.limiter.baseline().unwrap_or(0.05).max(0.001);
        let per_sec = st.limiter.limit() as f64 / rtt;
        let drain = Duration::from_secs_f64(((st.waiters.len() + st.in_flight) as f64 / per_sec).clamp(0.5, 30.0));
        let at = (now + drain).max(st.horizon).min(now + MAX_HORIZON);
        st.horizon = at + Duration::from_secs_f64((1.0 / per_sec).min(1.0));
        at - now
    }
}

/// A slot at a host, held while one request is in flight. Dropping it without
/// [`HostPermit::finish`] (a cancelled or failed task) frees the slot all the same.
pub struct HostPermit {
    host: Arc<Host>,
    started: Instant,
    in_flight: usize,
    finished: bool,
}

impl HostPermit {
    /// Record how the request went and free the slot.
    pub fn finish(mut self, signal: Signal) {
        self.finished = true;
        let mut st = self.host.lock();
        st.limiter.on_response(Instant::now().into_std(), self.started.elapsed(), signal, self.in_flight);
        Self::release(&self.host, &mut st);
    }

    /// When the request started (admission time).
    pub fn started(&self) -> Instant {
        self.started
    }

    fn release(host: &Arc<Host>, st: &mut HostState) {
        st.in_flight = st.in_flight.saturating_sub(1);
        st.last_used = Instant::now();
        host.grant_waiters(st);
    }
}

impl Drop for HostPermit {
    fn drop(&mut self) {
        if !self.finished {
            let host = self.host.clone();
            let mut st = host.lock();
            Self::release(&host, &mut st);
        }
    }
}

/// Every host's admission state.
pub struct Hosts {
    map: Mutex<HashMap<Arc<str>, Arc<Host>>>,
    settings: HostSettings,
    deliverer: Deliverer,
    metrics: Arc<Metrics>,
    hard: CancellationToken,
}

impl Hosts {
    pub fn new(
        settings: HostSettings,
        deliverer: Deliverer,
        metrics: Arc<Metrics>,
        hard: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self { map: Mutex::new(HashMap::new()), settings, deliverer, metrics, hard })
    }

    fn host(&self, key: &Arc<str>) -> Arc<Host> {
        let mut map = crate::lock(&self.map);
        if let Some(h) = map.get(key) {
            return h.clone();
        }
        if map.len() >= MAX_HOSTS {
            self.forget_idle(&mut map, Duration::from_secs(60));
        }
        let (limit, rate) = self.settings.for_host(key);
        let m = &self.metrics;
        let labels = [&**key];
        let exported = map.len() < MAX_HOST_SERIES;
        let gauge = |v: &prometheus::IntGaugeVec| {
            if exported {
                v.with_label_values(&labels)
            } else {
                prometheus::IntGauge::new("unexported", "unexported").expect("valid gauge")
            }
        };
        let host = Arc::new(Host {
            key: key.clone(),
            st: Mutex::new(HostState {
                limiter: AdaptiveLimit::new(limit),
                rate: rate.and_then(RateLimit::new),
                in_flight: 0,
                waiters: BTreeMap::new(),
                seq: 0,
                paused: None,
                rate_timer: false,
                last_used: Instant::now(),
                horizon: Instant::now(),
            }),
            gauges: Gauges {
                limit: gauge(&m.host_limit),
                in_flight: gauge(&m.host_in_flight),
                queued: gauge(&m.host_queued),
                baseline: if exported {
                    m.host_latency_baseline.with_label_values(&labels)
                } else {
                    prometheus::Gauge::new("unexported", "unexported").expect("valid gauge")
                },
                open: gauge(&m.host_circuit_open),
            },
        });
        host.publish(&host.lock());
        map.insert(key.clone(), host.clone());
        host
    }

    /// Wait (at most `max_wait`, None: as long as it takes) for a slot at the event's host.
    /// `priority`: lower goes first. A full queue makes room for a better-priority event
    /// by turning away its worst waiter.
    pub async fn admit(&self, target: &Target, priority: u32, max_wait: Option<Duration>) -> Admit {
        let host = self.host(&target.host);
        let (mut rx, ticket) = {
            let mut st = host.lock();
            st.last_used = Instant::now();
            let now = Instant::now();
            if let Some(p) = &st.paused {
                return Admit::Paused { retry_in: p.next_probe.saturating_duration_since(now) };
            }
            if st.waiters.is_empty() && Host::can_start(&mut st, now).is_ok() {
                st.in_flight += 1;
                let n = st.in_flight;
                host.publish(&st);
                drop(st);
                return Admit::Go(HostPermit { host, started: now, in_flight: n, finished: false });
            }
            if st.waiters.len() >= self.settings.queue.max(1) {
                let worst = st.waiters.last_key_value().map(|(k, _)| *k);
                match worst {
                    Some(k) if k.0 > priority => {
                        if let Some(tx) = st.waiters.remove(&k) {
                            let _ = tx.send(Grant::Busy);
                        }
                    }
                    _ => return Admit::Busy { retry_in: Host::come_back_in(&mut st) },
                }
            }
            let (tx, rx) = oneshot::channel();
            let ticket = (priority, st.seq);
            st.seq += 1;
            st.waiters.insert(ticket, tx);
            host.grant_waiters(&mut st);
            (rx, ticket)
        };
        let waited = tokio::select! {
            r = &mut rx => Some(r),
            _ = sleep_or_forever(max_wait) => None,
            _ = self.hard.cancelled() => None,
        };
        let grant = match waited {
            Some(r) => r.ok(),
            None => {
                let gave_up = {
                    let mut st = host.lock();
                    let removed = st.waiters.remove(&ticket).is_some();
                    host.publish(&st);
                    removed.then(|| Host::come_back_in(&mut st))
                };
                match gave_up {
                    Some(retry_in) => return Admit::Busy { retry_in },
                    // Granted while we gave up: take it.
                    None => rx.await.ok(),
                }
            }
        };
        match grant {
            Some(Grant::Go) => {
                let n = host.lock().in_flight;
                Admit::Go(HostPermit { host, started: Instant::now(), in_flight: n, finished: false })
            }
            Some(Grant::Paused(d)) => Admit::Paused { retry_in: d },
            Some(Grant::Busy) | None => Admit::Busy { retry_in: Host::come_back_in(&mut host.lock()) },
        }
    }

    /// Would an event for this host have to queue (the host is at its limit, or others
    /// already wait)? A paused host answers at once, so it does not count.
    pub fn must_wait(&self, host: &str) -> bool {
        let h = crate::lock(&self.map).get(host).cloned();
        h.is_some_and(|h| {
            let st = h.lock();
            st.paused.is_none() && (!st.waiters.is_empty() || st.in_flight >= st.limiter.limit())
        })
    }

    pub fn is_paused(&self, host: &str) -> bool {
        crate::lock(&self.map).get(host).is_some_and(|h| h.lock().paused.is_some())
    }

    /// Pause the host and probe it until it answers; no-op when already paused. `headers`
    /// are the delivery headers, sent with the probe.
    pub fn trip(self: &Arc<Self>, target: &Target, reason: &str, headers: reqwest::header::HeaderMap) {
        let host = self.host(&target.host);
        {
            let mut st = host.lock();
            if st.paused.is_some() {
                return;
            }
            let first = backoff(PROBE_BASE, 1, PROBE_CAP);
            st.paused = Some(Pause { next_probe: Instant::now() + first });
            for (_, tx) in std::mem::take(&mut st.waiters) {
                let _ = tx.send(Grant::Paused(first));
            }
            host.publish(&st);
        }
        tracing::warn!(host = %host.key, reason, "target host unavailable: pausing its deliveries until a probe succeeds");
        let hosts = self.clone();
        let url = target.url.clone();
        tokio::spawn(async move {
            let mut delay = {
                let st = host.lock();
                st.paused.as_ref().map(|p| p.next_probe.saturating_duration_since(Instant::now())).unwrap_or_default()
            };
            for n in 1.. {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = hosts.hard.cancelled() => return,
                }
                {
                    // Nobody has asked for this host for a while: stop probing, so that the
                    // host (and its series) can be forgotten. The next event tries it again.
                    let mut st = host.lock();
                    if st.last_used.elapsed() > IDLE_EVICT && st.in_flight == 0 && st.waiters.is_empty() {
                        st.paused = None;
                        st.limiter.restart_from_one();
                        host.publish(&st);
                        tracing::info!(host = %host.key, "no events for an unavailable host any more: stopped probing it");
                        return;
                    }
                }
                let alive = hosts.deliverer.probe(&url, headers.clone()).await;
                {
                    let mut st = host.lock();
                    if alive {
                        st.paused = None;
                        st.limiter.restart_from_one();
                        host.grant_waiters(&mut st);
                    } else {
                        delay = backoff(PROBE_BASE, n + 1, PROBE_CAP);
                        st.paused = Some(Pause { next_probe: Instant::now() + delay });
                        continue;
                    }
                }
                tracing::info!(host = %host.key, probes = n, "target host answers again: resuming with one trial request");
                return;
            }
        });
    }

    /// Forget hosts idle for a while, with their metric series; runs until `stop`.
    pub async fn evict_idle(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(IDLE_EVICT / 5) => {}
                _ = stop.cancelled() => return,
            }
            self.evict_older_than(IDLE_EVICT);
        }
    }

    fn evict_older_than(&self, idle: Duration) -> usize {
        let mut map = crate::lock(&self.map);
        self.forget_idle(&mut map, idle)
    }

    fn forget_idle(&self, map: &mut HashMap<Arc<str>, Arc<Host>>, idle: Duration) -> usize {
        let before = map.len();
        map.retain(|key, h| {
            let st = h.lock();
            // A host someone is looking up right now (an admission in progress) stays.
            let keep = Arc::strong_count(h) > 1
                || st.in_flight > 0
                || !st.waiters.is_empty()
                || st.paused.is_some()
                || st.last_used.elapsed() < idle;
            if !keep {
                self.metrics.remove_host(key);
            }
            keep
        });
        before - map.len()
    }

    /// Hosts currently known (for tests and metrics).
    pub fn len(&self) -> usize {
        crate::lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(max: usize, queue: usize) -> Arc<Hosts> {
        let cfg = crate::config::tests::parse(&[]).expect("default config");
        let settings = HostSettings {
            limit: LimitSettings { adaptive: false, max, ..Default::default() },
            queue,
            ..Default::default()
        };
        Hosts::new(settings, Deliverer::new(&cfg).unwrap(), Arc::new(Metrics::new()), CancellationToken::new())
    }

    fn target(u: &str) -> Target {
        Target::parse(u, &crate::policy::TargetPolicy::parse("*", "", "http://a/").unwrap()).unwrap()
    }

    async fn go(h: &Hosts, t: &Target, prio: u32) -> HostPermit {
        match h.admit(t, prio, Some(Duration::ZERO)).await {
            Admit::Go(p) => p,
            _ => panic!("expected admission"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn producer_chosen_hosts_do_not_grow_the_metrics_without_bound() {
        let h = hosts(2, 10);
        for i in 0..MAX_HOST_SERIES + 50 {
            let p = go(&h, &target(&format!("http://h{i}:1/x")), 0).await;
            p.finish(Signal::Ok);
        }
        assert_eq!(h.len(), MAX_HOST_SERIES + 50, "every host is limited");
        let text = h.metrics.render();
        let series = text.lines().filter(|l| l.starts_with("host_concurrency_limit{")).count();
        assert_eq!(series, MAX_HOST_SERIES, "only the first hosts get series");
    }

    #[tokio::test(start_paused = true)]
    async fn admits_up_to_the_limit_then_queues_by_priority() {
        let h = hosts(2, 10);
        let t = target("http://a:1/x");
        let p1 = go(&h, &t, 3).await;
        let _p2 = go(&h, &t, 3).await;
        // Full: a slow event queues first, then a critical one; the critical one goes first.
        let (h1, t1) = (h.clone(), t.clone());
        let slow = tokio::spawn(async move { matches!(h1.admit(&t1, 3, None).await, Admit::Go(_)) });
        tokio::task::yield_now().await;
        let (h2, t2) = (h.clone(), t.clone());
        let order = Arc::new(Mutex::new(vec![]));
        let o = order.clone();
        let critical = tokio::spawn(async move {
            let p = h2.admit(&t2, 0, None).await;
            o.lock().unwrap().push("critical");
            p
        });
        tokio::task::yield_now().await;
        drop(p1);
        let granted = critical.await.unwrap();
        assert!(matches!(granted, Admit::Go(_)));
        assert_eq!(*order.lock().unwrap(), ["critical"]);
        assert!(!slow.is_finished(), "the slow event still waits");
        drop(granted);
        assert!(slow.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn other_hosts_are_not_affected() {
        let h = hosts(1, 1);
        let a = target("http://a:1/x");
        let b = target("http://b:1/x");
        let _pa = go(&h, &a, 0).await;
        let _pb = go(&h, &b, 0).await;
        assert!(matches!(h.admit(&a, 0, Some(Duration::from_millis(10))).await, Admit::Busy { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_turns_away_the_worst_priority() {
        let h = hosts(1, 1);
        let t = target("http://a:1/x");
        let _p = go(&h, &t, 0).await;
        let (h1, t1) = (h.clone(), t.clone());
        let slow = tokio::spawn(async move { h1.admit(&t1, 3, None).await });
        tokio::task::yield_now().await;
        let (h2, t2) = (h.clone(), t.clone());
        let critical = tokio::spawn(async move { h2.admit(&t2, 0, None).await });
        tokio::task::yield_now().await;
        assert!(matches!(slow.await.unwrap(), Admit::Busy { .. }), "the slow waiter made room");
        assert!(!critical.is_finished());
        // Equal or worse priority is refused when full.
        assert!(matches!(h.admit(&t, 1, None).await, Admit::Busy { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_permit_frees_its_slot() {
        let h = hosts(1, 4);
        let t = target("http://a:1/x");
        let p = go(&h, &t, 0).await;
        let task = tokio::spawn(async move {
            let _held = p;
            panic!("a delivery task that fails");
        });
        assert!(task.await.is_err());
        let _again = go(&h, &t, 0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_host_turns_waiters_away_and_idle_hosts_are_forgotten() {
        let h = hosts(1, 4);
        let t = target("http://127.0.0.1:9/x");
        let p = go(&h, &t, 0).await;
        let (h1, t1) = (h.clone(), t.clone());
        let waiter = tokio::spawn(async move { h1.admit(&t1, 0, None).await });
        tokio::task::yield_now().await;
        h.trip(&t, "test", Default::default());
        assert!(matches!(waiter.await.unwrap(), Admit::Paused { .. }));
        assert!(matches!(h.admit(&t, 0, None).await, Admit::Paused { .. }));
        assert!(h.is_paused(&t.host));
        p.finish(Signal::Backpressure);
        // Paused hosts are kept; others go once idle.
        let other = target("http://b:1/x");
        drop(go(&h, &other, 0).await);
        tokio::time::advance(IDLE_EVICT + Duration::from_secs(1)).await;
        assert_eq!(h.evict_older_than(IDLE_EVICT), 1);
        assert_eq!(h.len(), 1);
        // A paused host nobody asks for any more stops being probed, and goes too.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(31)).await;
            tokio::task::yield_now().await;
            if !h.is_paused(&t.host) {
                break;
            }
        }
        assert!(!h.is_paused(&t.host), "still probing a host without events");
        tokio::time::advance(IDLE_EVICT).await;
        h.evict_older_than(IDLE_EVICT);
        assert!(h.is_empty());
    }
}
