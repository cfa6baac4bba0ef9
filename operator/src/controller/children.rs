//! Applying one child object: only when it is absent or controlled by this EventWorker,
//! only when what we would apply changed (or the object drifted), and after a failure only
//! once its backoff has passed. Problems are collected for the status and announced with a
//! Warning Event; they never stop the other children from being applied.

use std::collections::HashMap;
use std::fmt::Debug;
use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{publish, Context};
use crate::crd::EventWorker;
use crate::resources::MANAGER;

/// Annotation on every child: hash of what the operator last applied.
pub const APPLIED_HASH: &str = "eventworker.io/applied-hash";
/// An unchanged child is applied again this often anyway (reverts drift that leaves its
/// generation alone, such as a removed label).
const REFRESH: Duration = Duration::from_secs(600);
/// Backoff of a child the API server refused: doubling from here ...
const BACKOFF_START: Duration = Duration::from_secs(5);
/// ... up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// ... or this for a conflict.
const CONFLICT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What went wrong with children in one reconcile.
#[derive(Debug, Default)]
pub struct Problems {
    /// Children that exist and belong to someone else.
    pub conflicts: Vec<String>,
    /// Children the API server refused (its message).
    pub failures: Vec<String>,
    /// The soonest a backed-off child may be tried again.
    pub retry_in: Option<Duration>,
}

impl Problems {
    fn retry_within(&mut self, d: Duration) {
        self.retry_in = Some(self.retry_in.map_or(d, |r| r.min(d)));
    }
}

/// The operator's memory of one child.
#[derive(Debug, Default)]
pub(crate) struct ChildState {
    /// Hash and version (generation, else resourceVersion) of our last apply, and when.
    applied: Option<(String, String, Instant)>,
    failures: u32,
    retry_at: Option<Instant>,
    /// The problem last reported: (conflict, message).
    problem: Option<(bool, String)>,
    /// The EventWorker's generation when it failed: a new spec is tried at once.
    generation: Option<i64>,
    /// Known absent (deleted, or never there) as of this generation of the EventWorker.
    absent_at: Option<i64>,
    touched: Option<Instant>,
}

pub(crate) type ChildStates = HashMap<(String, String), ChildState>;

fn hash<K: Serialize>(obj: &K) -> String {
    let h = Sha256::digest(serde_json::to_vec(obj).unwrap_or_default());
    h.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn version<K: Resource>(obj: &K) -> String {
    let m = obj.meta();
    match m.generation.filter(|g| *g > 0) {
        Some(g) => format!("g{g}"),
        None => format!("rv{}", m.resource_version.clone().unwrap_or_default()),
    }
}

/// Whether `obj` is controlled by this EventWorker (owner reference with controller: true).
pub fn controlled_by<K: Resource>(obj: &K, ew: &EventWorker) -> bool {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == ew.metadata.uid.as_ref())
}

/// An orphan of ours: made by this operator for an EventWorker of this name (its labels),
/// controlled by nothing now (`kubectl delete --cascade=orphan`, then created again).
fn adoptable<K: Resource>(obj: &K, ew: &EventWorker) -> bool {
    let m = obj.meta();
    let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).map(String::as_str);
    let controlled = m.owner_references.iter().flatten().any(|o| o.controller == Some(true));
    !controlled
        && label("app.kubernetes.io/managed-by") == Some(MANAGER)
        && label("app.kubernetes.io/instance") == Some(&ew.name_any())
}

/// The name of the EventWorker of the same name (another uid) that controls `obj`.
fn previous_eventworker<K: Resource>(obj: &K, ew: &EventWorker) -> Option<String> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "EventWorker" && o.name == ew.name_any())
        .filter(|o| Some(&o.uid) != ew.metadata.uid.as_ref())
        .map(|o| o.name.clone())
}

/// The API server's own words for a refusal.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        other => other.to_string(),
    }
}

/// The namespace is being deleted: nothing can be created in it any more.
pub fn namespace_terminating(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403 && s.message.contains("being terminated"))
}

fn conflict_message(kind: &str, name: &str, existing: &impl Resource) -> String {
    let owner = existing
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| format!(" (controlled by {} {})", o.kind, o.name))
        .unwrap_or_default();
    format!(
        "{kind} {name} exists and is not controlled by this EventWorker{owner}; it is left alone: rename the EventWorker or remove that object"
    )
}

impl Context {
    fn child_key(ew: &EventWorker, kind: &str, name: &str) -> (String, String) {
        (ew.uid().unwrap_or_else(|| ew.name_any()), format!("{kind}/{name}"))
    }

    /// Record a problem with a child, back it off, announce it when it is new.
    async fn child_failed(
        &self,
        ew: &EventWorker,
        key: &(String, String),
        conflict: bool,
        msg: String,
        problems: &mut Problems,
    ) {
        let now = Instant::now();
        let (is_new, delay) = {
            let mut states = crate::lock(&self.children);
            let st = states.entry(key.clone()).or_default();
            if st.generation != ew.metadata.generation {
                // A new spec starts its own backoff.
                st.failures = 0;
            }
            st.failures = st.failures.saturating_add(1);
            // A conflict ends when someone removes the other object, which no watch of ours
            // sees: look again at least every 30 s.
            let max = if conflict { CONFLICT_BACKOFF_MAX } else { BACKOFF_MAX };
            let base = BACKOFF_START.saturating_mul(1u32 << (st.failures - 1).min(10)).min(max);
            let delay = base.mul_f64(rand::random_range(0.8..1.2));
            st.retry_at = Some(now + delay);
            st.touched = Some(now);
            let is_new = st.problem.as_ref().map(|p| &p.1) != Some(&msg);
            st.problem = Some((conflict, msg.clone()));
            st.generation = ew.metadata.generation;
            (is_new, delay)
        };
        self.metrics.applies.with_label_values(&[if conflict { "conflict" } else { "failed" }]).inc();
        if is_new {
            let reason = if conflict { "Conflict" } else { "ApplyFailed" };
            publish(self, ew, EventType::Warning, reason, msg.clone(), "Apply").await;
        }
        problems.retry_within(delay);
        if conflict {
            problems.conflicts.push(msg);
        } else {
            problems.failures.push(msg);
        }
    }

    /// Still backing off this child (and the spec did not change since it failed): report
    /// its last problem again.
    fn backing_off(&self, ew: &EventWorker, key: &(String, String), problems: &mut Problems) -> bool {
        let now = Instant::now();
        let states = crate::lock(&self.children);
        let Some(st) = states.get(key) else { return false };
        match (st.retry_at, &st.problem) {
            (Some(at), Some((conflict, msg))) if at > now && st.generation == ew.metadata.generation => {
                problems.retry_within(at - now);
                if *conflict {
                    problems.conflicts.push(msg.clone());
                } else {
                    problems.failures.push(msg.clone());
                }
                true
            }
            _ => false,
        }
    }

    /// Apply `desired` unless someone else controls an object of that name, or it is
    /// unchanged since our last apply. `cached` is the object from the operator's watch
    /// cache when it has one (a cache miss is confirmed with a GET: the object may be
    /// someone else's). Returns the object as it now is, when known.
    pub(crate) async fn apply_child<K>(
        &self,
        ew: &EventWorker,
        api: &Api<K>,
        kind: &str,
        mut desired: K,
        cached: Option<K>,
        problems: &mut Problems,
    ) -> Option<K>
    where
        K: Resource + Clone + Serialize + DeserializeOwned + Debug,
    {
        let name = desired.meta().name.clone().unwrap_or_default();
        let key = Self::child_key(ew, kind, &name);
        if self.backing_off(ew, &key, problems) {
            // Still report the object as it is (its status feeds ours).
            let current = match cached {
                Some(c) => Some(c),
                None => api.get_opt(&name).await.ok().flatten(),
            };
            return current.filter(|c| controlled_by(c, ew));
        }
        let existing = match cached {
            Some(c) => Some(c),
            None => match api.get_opt(&name).await {
                Ok(o) => o,
                Err(e) => {
                    self.child_failed(ew, &key, false, format!("{kind} {name}: {}", api_message(&e)), problems).await;
                    return None;
                }
            },
        };
        if let Some(obj) = existing.as_ref().filter(|o| !controlled_by(*o, ew) && !adoptable(*o, ew)) {
            if let Some(previous) = previous_eventworker(obj, ew) {
                // A deleted EventWorker of the same name: garbage collection removes its
                // children shortly. Not a conflict to announce, nor to back off from.
                problems.conflicts.push(format!(
                    "{kind} {name} still belongs to a deleted EventWorker {previous} (uid differs): waiting for its garbage collection"
                ));
                problems.retry_within(Duration::from_secs(2));
                return None;
            }
            self.child_failed(ew, &key, true, conflict_message(kind, &name, obj), problems).await;
            return None;
        }
        let h = hash(&desired);
        desired.meta_mut().annotations.get_or_insert_with(Default::default).insert(APPLIED_HASH.into(), h.clone());
        if let Some(obj) = &existing {
            let mut states = crate::lock(&self.children);
            let unchanged = states.get_mut(&key).filter(|s| {
                s.applied.as_ref().is_some_and(|(ah, v, at)| {
                    *ah == h
                        && *v == version(obj)
                        && at.elapsed() < REFRESH
                        && obj.annotations().get(APPLIED_HASH) == Some(&h)
                })
            });
            if let Some(st) = unchanged {
                st.touched = Some(Instant::now());
                drop(states);
                self.metrics.applies.with_label_values(&["unchanged"]).inc();
                return existing;
            }
        }
        match api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired)).await {
            Ok(obj) => {
                let mut states = crate::lock(&self.children);
                let st = states.entry(key).or_default();
                *st = ChildState {
                    applied: Some((h, version(&obj), Instant::now())),
                    touched: Some(Instant::now()),
                    ..Default::default()
                };
                drop(states);
                self.metrics.applies.with_label_values(&["applied"]).inc();
                Some(obj)
            }
            Err(e) => {
                self.child_failed(ew, &key, false, format!("{kind} {name}: {}", api_message(&e)), problems).await;
                existing
            }
        }
    }

    /// Delete a child we control, if it exists (a PDB or ServiceMonitor switched off); an
    /// object of that name that is someone else's is left alone. Looked for once per spec
    /// generation (a child only becomes unwanted through a spec change, or while no operator
    /// ran), not at every resync.
    pub(crate) async fn delete_child<K>(
        &self,
        ew: &EventWorker,
        api: &Api<K>,
        kind: &str,
        name: &str,
        problems: &mut Problems,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        let key = Self::child_key(ew, kind, name);
        let known_absent = crate::lock(&self.children)
            .get(&key)
            .is_some_and(|s| s.absent_at.is_some() && s.absent_at == ew.metadata.generation);
        if known_absent {
            return;
        }
        let result = match api.get_opt(name).await {
            Ok(Some(obj)) if controlled_by(&obj, ew) => api.delete(name, &DeleteParams::default()).await.map(|_| ()),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        let failed = match &result {
            Ok(()) => None,
            Err(kube::Error::Api(s)) if s.code == 404 => None,
            Err(e) => Some(api_message(e)),
        };
        match failed {
            Some(msg) => self.child_failed(ew, &key, false, format!("removing {kind} {name}: {msg}"), problems).await,
            None => {
                let state = ChildState {
                    absent_at: ew.metadata.generation,
                    touched: Some(Instant::now()),
                    ..Default::default()
                };
                crate::lock(&self.children).insert(key, state);
            }
        }
    }

    /// Forget children not touched for `after`.
    pub(crate) fn prune_children(&self, after: Duration) {
        let now = Instant::now();
        crate::lock(&self.children).retain(|_, s| s.touched.is_some_and(|t| now.saturating_duration_since(t) < after));
    }
}
