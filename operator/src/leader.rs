//! Leader election on a coordination.k8s.io Lease, so two replicas can run safely: only the
//! holder reconciles. Lease updates use the object's resourceVersion (optimistic
//! concurrency), which is what makes the election safe; server-side apply cannot do that.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// Take or keep the lease. Ok(true) while we hold it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let spec = |acquired: Timestamp, transitions: i32| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
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
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let cur = lease.spec.clone().unwrap_or_default();
        let ours = cur.holder_identity.as_deref() == Some(self.identity.as_str());
        let ttl = SignedDuration::from_secs(i64::from(cur.lease_duration_seconds.unwrap_or(15)));
        let expired = cur.renew_time.as_ref().is_none_or(|t| t.0.saturating_add(ttl).is_ok_and(|end| end < now));
        if !ours && !expired && cur.holder_identity.is_some() {
            return Ok(false);
        }
        let transitions = cur.lease_transitions.unwrap_or(0) + if ours { 0 } else { 1 };
        let acquired = if ours { cur.acquire_time.map(|t| t.0).unwrap_or(now) } else { now };
        lease.spec = Some(spec(acquired, transitions));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
