//! Leader election on a coordination.k8s.io Lease, with client-go's semantics: only the
//! holder reconciles. A lease held by another replica counts as expired only when its
//! record has not changed for `leaseDurationSeconds` of *our* clock since we first saw it
//! (the holder's `renewTime` is another machine's clock, and comparing it with ours would
//! elect two leaders under clock skew). A leader that stops releases the lease (empty
//! holder), so a standby takes over at its next try instead of after a full duration.
//! Updates use the object's resourceVersion (optimistic concurrency), which is what makes
//! the election safe.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    retry: Duration,
    /// The lease record as last seen, and when (our clock) it last changed.
    observed: Mutex<Option<(LeaseSpec, Instant)>>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    /// `duration`: how long a lease lasts without renewal; `retry`: how often a standby
    /// tries and a leader renews.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
        retry: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            retry: retry.min(duration / 2).max(Duration::from_millis(100)),
            observed: Mutex::new(None),
        }
    }

    pub fn retry_period(&self) -> Duration {
        self.retry
    }

    /// Remember the record; returns how long it has stayed as it is (our clock).
    fn observe(&self, spec: &LeaseSpec) -> Duration {
        let now = Instant::now();
        let mut observed = crate::lock(&self.observed);
        match observed.as_ref() {
            Some((seen, at)) if seen == spec => now.saturating_duration_since(*at),
            _ => {
                *observed = Some((spec.clone(), now));
                Duration::ZERO
            }
        }
    }

    /// Take or keep the lease. Ok(true) while we hold it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let spec = |acquired: Timestamp, transitions: i32| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(spec(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created.spec.unwrap_or_default());
                    Ok(true)
                }
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let cur = lease.spec.clone().unwrap_or_default();
        let unchanged_for = self.observe(&cur);
        let holder = cur.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = holder == Some(self.identity.as_str());
        let ttl = Duration::from_secs(cur.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        if holder.is_some() && !ours && unchanged_for < ttl {
            return Ok(false);
        }
        let transitions = cur.lease_transitions.unwrap_or(0) + if ours { 0 } else { 1 };
        let acquired = if ours { cur.acquire_time.map(|t| t.0).unwrap_or(now) } else { now };
        lease.spec = Some(spec(acquired, transitions));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.observe(&updated.spec.unwrap_or_default());
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (when stopping): an empty holder, one second long, so that a
    /// standby takes it at its next try. Does nothing unless we hold it.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let cur = lease.spec.clone().unwrap_or_default();
        if cur.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let now = MicroTime(Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: cur.lease_transitions,
            ..Default::default()
        });
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Someone else changed it meanwhile: it is not ours to release any more.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
