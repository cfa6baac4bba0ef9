//! Per-host pause: after a 502/503/504, connect error or timeout, deliveries to that host
//! wait until an `OPTIONS` probe answers; other hosts keep flowing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::delivery::{Deliverer, Target};
use crate::metrics::Metrics;
use crate::retry::backoff;

const PROBE_BASE: Duration = Duration::from_millis(250);
const PROBE_CAP: Duration = Duration::from_secs(30);

pub struct HostGate {
    /// `true` while the host accepts deliveries.
    hosts: Mutex<HashMap<String, watch::Sender<bool>>>,
    deliverer: Deliverer,
    metrics: Arc<Metrics>,
    hard: CancellationToken,
}

impl HostGate {
    pub fn new(deliverer: Deliverer, metrics: Arc<Metrics>, hard: CancellationToken) -> Arc<Self> {
        Arc::new(Self { hosts: Mutex::new(HashMap::new()), deliverer, metrics, hard })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        crate::lock(&self.hosts)
    }

    pub fn is_open(&self, host: &str) -> bool {
        self.lock().get(host).is_none_or(|tx| *tx.borrow())
    }

    /// Wait until `host` accepts deliveries. False when `cancel` fired first.
    pub async fn wait_open(&self, host: &str, cancel: &CancellationToken) -> bool {
        let mut rx = match self.lock().get(host) {
            Some(tx) if !*tx.borrow() => tx.subscribe(),
            _ => return true,
        };
        tokio::select! {
            r = rx.wait_for(|open| *open) => r.is_ok(),
            _ = cancel.cancelled() => false,
        }
    }

    /// Pause `host` and start probing `url` until it answers; no-op when already paused.
    pub fn trip(self: &Arc<Self>, target: &Target, reason: &str) {
        let host: &str = &target.host;
        {
            let mut map = self.lock();
            let tx = map.entry(host.to_string()).or_insert_with(|| watch::channel(true).0);
            if !*tx.borrow() {
                return;
            }
            tx.send_replace(false);
        }
        self.metrics.host_circuit_open.with_label_values(&[host]).set(1);
        tracing::warn!(host, reason, "target host unavailable: pausing its deliveries until a probe succeeds");
        let gate = self.clone();
        let (host, url) = (host.to_string(), target.url.clone());
        tokio::spawn(async move {
            for n in 1.. {
                tokio::select! {
                    _ = tokio::time::sleep(backoff(PROBE_BASE, n, PROBE_CAP)) => {}
                    _ = gate.hard.cancelled() => return,
                }
                if gate.deliverer.probe(&url).await {
                    if let Some(tx) = gate.lock().get(&host) {
                        tx.send_replace(true);
                    }
                    gate.metrics.host_circuit_open.with_label_values(&[&host]).set(0);
                    tracing::info!(host, probes = n, "target host answers again: resuming deliveries");
                    return;
                }
            }
        });
    }
}
