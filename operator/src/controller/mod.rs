//! The reconciler: an EventWorker in, its children applied (server-side apply, one field
//! manager, only objects it controls, only when changed), its status written when it
//! changed. `children` applies one child with conflict checks and backoff; `scaling` is the
//! autoscaling glue.

mod children;
mod scaling;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{self as kcontroller, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{predicates, reflector, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;
use tracing::Instrument;

use children::{api_message, namespace_terminating, ChildStates, Problems};
pub use children::{controlled_by, APPLIED_HASH};

use crate::crd::{AutoscalingMode, EventWorker};
use crate::metrics::Metrics;
use crate::redis_pool::RedisPool;
use crate::resources::deployment::{group, image, secret_refs, SecretData};
use crate::resources::{self, keda, prometheus_rule, service_monitor, Defaults, MANAGER};
use crate::scaler::Scaler;
use crate::status::{self, Observed};

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Kube(_) => "kube",
            Error::Json(_) => "json",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The operator's settings (flags / environment, chart values).
#[derive(Debug, Clone)]
pub struct Settings {
    pub defaults: Defaults,
    /// How long to wait for Redis when reading the backlog.
    pub redis_timeout: Duration,
    /// How often a healthy EventWorker is looked at again (backlog, readiness), ±10 %.
    pub resync: Duration,
    /// Most reconciles at once.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            defaults: Defaults { image: crate::crd::DEFAULT_IMAGE.into(), hash_salt: String::new() },
            redis_timeout: Duration::from_secs(3),
            resync: Duration::from_secs(30),
            concurrency: 8,
        }
    }
}

/// Watch caches of the children (filled by `run`; reconciles outside it GET instead).
pub struct Caches {
    deployments: Store<Deployment>,
    services: Store<Service>,
    pdbs: Store<PodDisruptionBudget>,
}

/// Whether the controller makes progress, for the liveness probe: a reconcile that has run
/// far longer than any should (every call it makes has a timeout) means the process is
/// stuck, and a restart helps. Waiting is not being stuck: an invalid spec or a backoff may
/// leave an EventWorker alone for minutes.
#[derive(Debug)]
pub struct Liveness {
    in_flight: Mutex<HashMap<u64, Instant>>,
    next: AtomicU64,
    /// EventWorkers the controller knows of.
    known: AtomicUsize,
    /// Leading: only the leader reconciles.
    pub leading: std::sync::atomic::AtomicBool,
    stall_after: Duration,
}

impl Liveness {
    pub fn new(resync: Duration) -> Self {
        Self {
            in_flight: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            known: AtomicUsize::new(0),
            leading: Default::default(),
            stall_after: (resync * 2).max(Duration::from_secs(300)),
        }
    }

    fn begin(&self) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        crate::lock(&self.in_flight).insert(id, Instant::now());
        id
    }

    fn end(&self, id: u64) {
        crate::lock(&self.in_flight).remove(&id);
    }

    /// Err when a reconcile has been running for longer than `stall_after`.
    pub fn check(&self) -> Result<(), String> {
        if !self.leading.load(Ordering::Relaxed) {
            return Ok(());
        }
        let oldest = crate::lock(&self.in_flight).values().min().map(|t| t.elapsed());
        match oldest {
            Some(running) if running > self.stall_after => Err(format!(
                "a reconcile has been running for {}s ({} EventWorkers known)",
                running.as_secs(),
                self.known.load(Ordering::Relaxed)
            )),
            _ => Ok(()),
        }
    }
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// One connection per Redis, shared by all reconciles.
    pub redis: RedisPool,
    pub liveness: Arc<Liveness>,
    caches: OnceLock<Caches>,
    /// Whether optional CRDs are installed, and since when we know.
    crds: Mutex<HashMap<&'static str, (Instant, bool)>>,
    /// The built-in autoscaler's memory, per EventWorker uid.
    pub scalers: Mutex<HashMap<String, (tokio::time::Instant, Scaler)>>,
    /// Per child: what was applied last, failures and backoff.
    children: Mutex<ChildStates>,
    /// Consecutive failed reconciles per EventWorker uid (their backoff).
    failures: Mutex<HashMap<String, u32>>,
    /// EventWorkers whose generated admin Secret is known to exist.
    admin_secrets: Mutex<HashMap<String, (Option<i64>, Instant)>>,
}

/// A generated admin Secret known to exist is looked for again after this long.
const ADMIN_RECHECK: Duration = Duration::from_secs(600);
/// What the operator remembers of an EventWorker (scaler, children) is dropped when it has
/// not been reconciled for this long (deleted, or another replica leads).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Optional CRDs are looked up again after this long.
const DISCOVERY_TTL: Duration = Duration::from_secs(60);

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: Settings) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() },
        );
        Self {
            client,
            recorder,
            metrics,
            redis: RedisPool::new(settings.redis_timeout),
            liveness: Arc::new(Liveness::new(settings.resync)),
            settings,
            caches: OnceLock::new(),
            crds: Mutex::new(HashMap::new()),
            scalers: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            admin_secrets: Mutex::new(HashMap::new()),
        }
    }

    /// Share the liveness state with the admin server.
    pub fn with_liveness(mut self, liveness: Arc<Liveness>) -> Self {
        self.liveness = liveness;
        self
    }

    /// Run `f` on this EventWorker's scaler (created on first use, seeded with `current`).
    fn with_scaler<T>(
        &self,
        ew: &EventWorker,
        current: i32,
        f: impl FnOnce(&mut Scaler, tokio::time::Instant) -> T,
    ) -> T {
        let now = tokio::time::Instant::now();
        let key = ew.uid().unwrap_or_else(|| ew.name_any());
        let mut scalers = crate::lock(&self.scalers);
        let (seen, scaler) = scalers.entry(key).or_insert_with(|| (now, Scaler::new(now, current)));
        *seen = now;
        f(scaler, now)
    }

    /// Drop the memory of EventWorkers not reconciled for a while (run periodically, off the
    /// reconcile path).
    fn forget_unseen(&self) {
        let now = tokio::time::Instant::now();
        crate::lock(&self.scalers).retain(|_, (seen, _)| now.saturating_duration_since(*seen) < FORGET_AFTER);
        crate::lock(&self.admin_secrets).retain(|_, (_, at)| at.elapsed() < ADMIN_RECHECK);
        self.prune_children(FORGET_AFTER);
    }

    /// Whether an optional CRD is installed (cached for a minute).
    async fn crd_installed(&self, name: &'static str) -> Result<bool, kube::Error> {
        if let Some((at, yes)) = crate::lock(&self.crds).get(name) {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(*yes);
            }
        }
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let yes = api.get_metadata_opt(name).await?.is_some();
        crate::lock(&self.crds).insert(name, (Instant::now(), yes));
        Ok(yes)
    }

    fn cached<K>(&self, pick: impl Fn(&Caches) -> &Store<K>, ew: &EventWorker) -> Option<K>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let store = pick(self.caches.get()?);
        let key = ObjectRef::new(&ew.name_any()).within(&ew.namespace().unwrap_or_default());
        store.get(&key).map(|o| (*o).clone())
    }
}

/// Checks the API server's CEL rules cannot express (or that older objects may violate).
pub fn validate(ew: &EventWorker) -> Result<()> {
    let s = &ew.spec;
    if s.streams.is_empty() {
        return Err(Error::InvalidSpec("spec.streams is empty".into()));
    }
    if let Some(a) = &s.autoscaling {
        if a.min_replicas > a.max_replicas {
            return Err(Error::InvalidSpec("autoscaling.minReplicas > autoscaling.maxReplicas".into()));
        }
    }
    if s.redis.url.is_some() == s.redis.host.is_some() {
        return Err(Error::InvalidSpec("set exactly one of spec.redis.url and spec.redis.host".into()));
    }
    let ours: HashSet<String> = resources::deployment::worker_env(ew).into_iter().map(|e| e.name).collect();
    let reserved = ["ADMIN_TOKEN", "TARGET_HEADERS_FROM_ENV"];
    for e in s.env.iter().flatten() {
        if ours.contains(&e.name) || reserved.contains(&e.name.as_str()) || e.name.starts_with("TARGET_HEADER_VALUE_") {
            return Err(Error::InvalidSpec(format!(
                "spec.env: {} is rendered by the operator from the spec; set the matching spec field instead",
                e.name
            )));
        }
    }
    Ok(())
}

async fn publish(ctx: &Context, ew: &EventWorker, type_: EventType, reason: &str, note: String, action: &str) {
    // Event notes are limited to 1 kB.
    let note: String = note.chars().take(1000).collect();
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &ew.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}

/// Create the generated admin token Secret when the spec names none and it does not exist
/// yet; an existing one is left as it is (the token must not change under the pods).
async fn ensure_admin_secret(ctx: &Context, ew: &EventWorker, ns: &str, problems: &mut Problems) {
    let Some(secret) = resources::admin_secret::generated(ew) else { return };
    let uid = ew.uid().unwrap_or_default();
    {
        // Known to exist for this generation, and checked within 10 minutes (a deleted one
        // is created again).
        let known = crate::lock(&ctx.admin_secrets);
        if known.get(&uid).is_some_and(|(g, at)| *g == ew.metadata.generation && at.elapsed() < ADMIN_RECHECK) {
            return;
        }
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = resources::admin_secret::generated_name(ew);
    let result = match api.get_metadata_opt(&name).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => match api.create(&kube::api::PostParams::default(), &secret).await {
            Ok(_) => {
                let note = format!("admin token generated into Secret {name}");
                publish(ctx, ew, EventType::Normal, "AdminTokenCreated", note, "Create").await;
                Ok(())
            }
            // Another replica (or a previous attempt) created it meanwhile.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            crate::lock(&ctx.admin_secrets).insert(uid, (ew.metadata.generation, Instant::now()));
        }
        Err(e) => problems.failures.push(format!("Secret {name}: {}", api_message(&e))),
    }
}

/// Values of the Secret keys the spec references (read by name: the operator cannot list
/// Secrets); missing ones are listed.
pub(crate) async fn read_secrets(client: &Client, ew: &EventWorker, ns: &str) -> Result<(SecretData, Vec<String>)> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut data = SecretData::new();
    let mut missing = Vec::new();
    let names: BTreeSet<&str> = secret_refs(&ew.spec).iter().map(|r| r.name.as_str()).collect();
    for name in names {
        if let Some(s) = api.get_opt(name).await? {
            data.insert(name.to_string(), s.data.unwrap_or_default());
        }
    }
    for r in secret_refs(&ew.spec) {
        if data.get(&r.name).and_then(|d| d.get(&r.key)).is_none() {
            missing.push(format!("{}/{}", r.name, r.key));
        }
    }
    Ok((data, missing))
}

pub async fn reconcile(ew: Arc<EventWorker>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let running = ctx.liveness.begin();
    // Exported as a trace when tracing is on (ew_otel), a no-op otherwise.
    let span = tracing::info_span!(
        target: ew_otel::TARGET,
        "reconcile",
        otel.kind = "internal",
        otel.status_code = tracing::field::Empty,
        k8s.namespace.name = ew.namespace().unwrap_or_default(),
        k8s.eventworker.name = ew.name_any(),
        k8s.object.generation = ew.metadata.generation.unwrap_or(0),
        eventworker.outcome = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    let result = match reconcile_inner(&ew, &ctx).instrument(span.clone()).await {
        // The namespace is going away with everything in it.
        Err(Error::Kube(e)) if namespace_terminating(&e) => Ok(Action::await_change()),
        other => other,
    };
    match &result {
        Ok(_) => span.record("eventworker.outcome", "ok"),
        Err(e) => {
            span.record("error.type", e.kind());
            span.record("otel.status_code", "ERROR");
            span.record("eventworker.outcome", "error")
        }
    };
    ctx.metrics.observe(started.elapsed(), result.as_ref().err().map(Error::kind));
    ctx.liveness.end(running);
    if result.is_ok() {
        crate::lock(&ctx.failures).remove(&ew.uid().unwrap_or_default());
    }
    result
}

/// `d` ± 10 %, so that EventWorkers created together do not all come back together.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.9..1.1))
}

async fn reconcile_inner(ew: &EventWorker, ctx: &Context) -> Result<Action> {
    if ew.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes the children.
        return Ok(Action::await_change());
    }
    let ns = ew.namespace().unwrap_or_else(|| "default".into());
    let name = ew.name_any();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = validate(ew) {
        invalid(ctx, ew, &deployments, &e.to_string()).await?;
        return Err(e);
    }
    let mut problems = Problems::default();
    ensure_admin_secret(ctx, ew, &ns, &mut problems).await;
    let (secrets, missing) = match read_secrets(&ctx.client, ew, &ns).await {
        Ok(read) => read,
        Err(e) => {
            // Without the values the config hash would be wrong (and roll the pods): apply
            // nothing, say why, and back off.
            let why = match &e {
                Error::Kube(k) => format!("reading the referenced Secrets: {}", api_message(k)),
                other => format!("reading the referenced Secrets: {other}"),
            };
            let existing = existing_deployment(ctx, ew, &deployments).await.ok().flatten();
            let mut obs = observed_as_is(existing.as_ref(), ew);
            obs.apply_failures = problems.failures.into_iter().chain([why]).collect();
            obs.image = Some(image(ew, &ctx.settings.defaults));
            obs.group = Some(group(ew));
            write_status(ctx, ew, &ns, &obs).await?;
            return Err(e);
        }
    };

    // The backlog first: with autoscaling it decides the replica count.
    let url = status::redis_url(ew, &secrets);
    let names: Vec<String> = ew.spec.streams.iter().map(|s| s.name.clone()).collect();
    let read = ctx.redis.read_backlog(&url, &names, &group(ew)).await;

    let existing = existing_deployment(ctx, ew, &deployments).await?;
    let existing_ours = existing.as_ref().filter(|d| controlled_by(*d, ew));
    let current = existing_ours.and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas);
    let (replicas, mut scaling) = match &ew.spec.autoscaling {
        // The HPA sets spec.replicas through the scale subresource.
        None => (Some(ew.spec.replicas), None),
        Some(a) if a.mode == AutoscalingMode::Hpa => (Some(ew.spec.replicas), None),
        Some(a) if a.mode == AutoscalingMode::Keda => {
            if let Some(d) = existing_ours {
                if let Err(e) = scaling::hand_over_replicas(&deployments, d).await {
                    problems.failures.push(format!("Deployment {name}: keeping its replicas for KEDA: {e}"));
                }
            }
            (None, None)
        }
        Some(a) => {
            let (n, sc) = scaling::scale_builtin(ctx, ew, a, current, &read);
            (Some(n), Some(sc))
        }
    };
    let desired = resources::deployment::deployment(ew, &secrets, replicas, &ctx.settings.defaults);
    let applied = ctx.apply_child(ew, &deployments, "Deployment", desired, existing, &mut problems).await;
    let applied_replicas = applied.as_ref().and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas);
    // A Deployment created by this apply starts from minReplicas, as far as scaling goes.
    let from = current.or(ew.spec.autoscaling.as_ref().map(|a| a.min_replicas));
    if let (Some(sc), Some(from), Some(to)) = (scaling.as_mut(), from, replicas) {
        if from != to && applied_replicas == Some(to) {
            scaling::scaled(ctx, ew, sc, from, to).await;
        }
    }

    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let cached = ctx.cached(|c| &c.services, ew);
    ctx.apply_child(ew, &services, "Service", resources::service::service(ew), cached, &mut problems).await;

    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    match resources::pdb::pdb(ew) {
        Some(p) => {
            let cached = ctx.cached(|c| &c.pdbs, ew);
            ctx.apply_child(ew, &pdbs, "PodDisruptionBudget", p, cached, &mut problems).await;
        }
        None => ctx.delete_child(ew, &pdbs, "PodDisruptionBudget", &name, &mut problems).await,
    }

    let mut obs = applied.as_ref().map(Observed::from_deployment).unwrap_or_default();
    obs.missing_secrets = missing;
    obs.image = Some(image(ew, &ctx.settings.defaults));
    obs.group = Some(group(ew));
    // Prometheus-operator objects: applied only when their CRD exists (no watch: a watch
    // on a kind that is not installed fails).
    let monitoring = [
        (
            "ServiceMonitor",
            "ServiceMonitorUnavailable",
            service_monitor::CRD_NAME,
            service_monitor::api_resource(),
            service_monitor::service_monitor(ew),
            ew.spec.metrics.service_monitor.enabled,
        ),
        (
            "PrometheusRule",
            "PrometheusRuleUnavailable",
            prometheus_rule::CRD_NAME,
            prometheus_rule::api_resource(),
            prometheus_rule::prometheus_rule(ew),
            ew.spec.metrics.prometheus_rule.enabled,
        ),
    ];
    for (kind, reason, crd, resource, wanted, enabled) in monitoring {
        match ctx.crd_installed(crd).await {
            Ok(true) => {
                let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
                match wanted {
                    Some(obj) => {
                        ctx.apply_child(ew, &api, kind, obj, None, &mut problems).await;
                    }
                    None => ctx.delete_child(ew, &api, kind, &name, &mut problems).await,
                }
            }
            Ok(false) if enabled => {
                obs.monitoring_skipped.push((
                    reason,
                    format!("{kind} requested but the Prometheus operator's {kind} CRD ({crd}) is not installed"),
                ));
            }
            Ok(false) => {}
            Err(e) if enabled => {
                problems.failures.push(format!("cannot tell whether the {kind} CRD is installed: {}", api_message(&e)))
            }
            Err(e) => tracing::debug!(error = %e, kind, "CRD lookup failed"),
        }
    }

    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &ns);
    match resources::hpa::hpa(ew) {
        Some(h) => {
            if let Some(applied) = ctx.apply_child(ew, &hpas, "HorizontalPodAutoscaler", h, None, &mut problems).await {
                scaling = Some(scaling::hpa_scaling(ew, &applied));
            }
        }
        None => ctx.delete_child(ew, &hpas, "HorizontalPodAutoscaler", &name, &mut problems).await,
    }

    let wants_keda = ew.spec.autoscaling.as_ref().is_some_and(|a| a.mode == AutoscalingMode::Keda);
    // Applied in keda mode, removed (once per generation) in any other.
    let keda_installed = match ctx.crd_installed(keda::SCALED_OBJECT_CRD).await {
        Ok(yes) => yes,
        Err(e) => {
            // Whatever the mode: a ScaledObject left from keda mode must not stay unnoticed.
            problems.failures.push(format!("cannot tell whether KEDA is installed: {}", api_message(&e)));
            false
        }
    };
    if keda_installed {
        scaling::apply_keda(ctx, ew, &ns, &mut problems).await;
    }
    if wants_keda {
        scaling = Some(scaling::keda_scaling(ew, keda_installed, applied_replicas));
    }
    obs.scaling = scaling;
    obs.conflicts = std::mem::take(&mut problems.conflicts);
    obs.apply_failures = std::mem::take(&mut problems.failures);
    match read {
        Ok((streams, scheduled)) => {
            obs.redis = Some(Ok(streams));
            obs.scheduled = scheduled;
        }
        Err(e) => obs.redis = Some(Err(e)),
    }
    redis_events(ctx, ew, &obs).await;
    if ew.status.as_ref().map(|s| s.observed_generation) != Some(ew.metadata.generation)
        && obs.apply_failures.is_empty()
        && obs.conflicts.is_empty()
    {
        publish(
            ctx,
            ew,
            EventType::Normal,
            "Applied",
            format!("generation {} applied", ew.metadata.generation.unwrap_or(0)),
            "Reconcile",
        )
        .await;
    }
    write_status(ctx, ew, &ns, &obs).await?;

    // The built-in autoscaler reads the backlog every poll interval.
    let mut every = jittered(match &ew.spec.autoscaling {
        Some(a) if a.mode == AutoscalingMode::Builtin => a.poll_interval().min(ctx.settings.resync),
        _ => ctx.settings.resync,
    });
    if !obs.missing_secrets.is_empty() {
        // No watch on Secrets: look again soon for one created after its EventWorker.
        every = every.min(Duration::from_secs(10));
    }
    if let Some(retry) = problems.retry_in {
        every = every.min(retry);
    }
    Ok(Action::requeue(every))
}

/// Events on Redis reachability changes.
async fn redis_events(ctx: &Context, ew: &EventWorker, obs: &Observed) {
    let was = ew
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "RedisReachable"))
        .map(|c| c.status.as_str());
    match (&obs.redis, was) {
        (Some(Err(e)), w) if w != Some("False") => {
            publish(ctx, ew, EventType::Warning, "RedisUnreachable", e.clone(), "ReadBacklog").await;
        }
        (Some(Ok(_)), Some("False")) => {
            publish(ctx, ew, EventType::Normal, "RedisReachable", "Redis answers again".into(), "ReadBacklog").await;
        }
        _ => {}
    }
}

/// The worker Deployment as it is: from the watch cache, else a GET.
async fn existing_deployment(
    ctx: &Context,
    ew: &EventWorker,
    deployments: &Api<Deployment>,
) -> Result<Option<Deployment>, kube::Error> {
    match ctx.cached(|c| &c.deployments, ew) {
        Some(d) => Ok(Some(d)),
        None => deployments.get_opt(&ew.name_any()).await,
    }
}

/// What a reconcile that applies nothing reports: our Deployment as it is.
fn observed_as_is(existing: Option<&Deployment>, ew: &EventWorker) -> Observed {
    existing.filter(|d| controlled_by(*d, ew)).map(Observed::from_deployment).unwrap_or_default()
}

/// An invalid spec: nothing is applied; the status says why and keeps what the Deployment
/// has (replicas, selector), so the scale subresource stays true.
async fn invalid(ctx: &Context, ew: &EventWorker, deployments: &Api<Deployment>, why: &str) -> Result<()> {
    let existing = existing_deployment(ctx, ew, deployments).await?;
    let mut obs = observed_as_is(existing.as_ref(), ew);
    obs.invalid = Some(why.to_string());
    let previous = ew.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"));
    if previous.is_none_or(|c| c.message != why) {
        publish(ctx, ew, EventType::Warning, "InvalidSpec", why.to_string(), "Validate").await;
    }
    write_status(ctx, ew, &ew.namespace().unwrap_or_default(), &obs).await
}

/// Write the status when it differs from the one the object has.
async fn write_status(ctx: &Context, ew: &EventWorker, ns: &str, obs: &Observed) -> Result<()> {
    ctx.metrics.set_replicas(ns, &ew.name_any(), obs.desired, obs.ready);
    let new_status = status::build(ew, obs, resources::selector_string(ew), &now_string());
    if ew.status.as_ref() == Some(&new_status) {
        return Ok(());
    }
    ctx.metrics.status_writes.inc();
    patch_status(ctx, ew, ns, serde_json::to_value(&new_status)?).await
}

async fn patch_status(ctx: &Context, ew: &EventWorker, ns: &str, status: serde_json::Value) -> Result<()> {
    let api: Api<EventWorker> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({"apiVersion": "eventworker.io/v1alpha1", "kind": "EventWorker", "status": status});
    match api.patch_status(&ew.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await {
        // Deleted while we reconciled: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()).map_err(Error::from),
    }
}

pub(crate) fn now_string() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// An invalid spec waits for a change (its condition says why); anything else is retried
/// with an exponential, jittered backoff per EventWorker (5 s doubling to 5 min).
pub fn error_policy(ew: Arc<EventWorker>, err: &Error, ctx: Arc<Context>) -> Action {
    match err {
        Error::InvalidSpec(why) => {
            tracing::warn!(name = %ew.name_any(), %why, "invalid EventWorker; waiting for a change");
            Action::await_change()
        }
        other => {
            let n = {
                let mut failures = crate::lock(&ctx.failures);
                let n = failures.entry(ew.uid().unwrap_or_default()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            };
            let delay = Duration::from_secs(5).saturating_mul(1 << (n - 1).min(6)).min(Duration::from_secs(300));
            let delay = delay.mul_f64(rand::random_range(0.8..1.2));
            tracing::warn!(name = %ew.name_any(), error = %other, retry_in = ?delay, failures = n, "reconcile failed");
            Action::requeue(delay)
        }
    }
}

/// An Api over every namespace, or over the one the operator is limited to.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Children carry this label; the operator watches (and caches) only those.
fn children_only() -> watcher::Config {
    watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"))
}

/// Run the controller until `shutdown` fires; `namespace` limits it to one namespace.
pub async fn run(ctx: Arc<Context>, shutdown: tokio_util::sync::CancellationToken, namespace: Option<String>) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    // Our own status patches change the object too; only spec changes (generation) trigger a
    // reconcile, or status writes would feed a loop. The resync keeps lag and readiness fresh.
    let (reader, writer) = reflector::store();
    let trigger = watcher(scoped::<EventWorker>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let controller = Controller::for_stream(trigger, reader).with_config(
        kcontroller::Config::default().concurrency(ctx.settings.concurrency).debounce(Duration::from_millis(500)),
    );
    // Children: watched through caches the reconciler reads instead of GETting.
    let (deployments, dw) = reflector::store::<Deployment>();
    let (services, sw) = reflector::store::<Service>();
    let (pdbs, pw) = reflector::store::<PodDisruptionBudget>();
    let _ = ctx.caches.set(Caches { deployments, services, pdbs });
    let known = controller.store();
    tokio::spawn({
        let (ctx, stop) = (ctx.clone(), shutdown.clone());
        async move {
            loop {
                let all = known.state();
                ctx.liveness.known.store(all.len(), Ordering::Relaxed);
                let keys = all.iter().map(|ew| (ew.namespace().unwrap_or_default(), ew.name_any())).collect();
                ctx.metrics.keep_replicas_of(&keys);
                ctx.forget_unseen();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    });
    ctx.liveness.leading.store(true, Ordering::Relaxed);
    controller
        .owns_stream(
            watcher(scoped::<Deployment>(&client, ns), children_only()).default_backoff().reflect(dw).touched_objects(),
        )
        .owns_stream(
            watcher(scoped::<Service>(&client, ns), children_only()).default_backoff().reflect(sw).touched_objects(),
        )
        .owns_stream(
            watcher(scoped::<PodDisruptionBudget>(&client, ns), children_only())
                .default_backoff()
                .reflect(pw)
                .touched_objects(),
        )
        .owns(scoped::<HorizontalPodAutoscaler>(&client, ns), children_only())
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_only_when_a_leaders_reconcile_hangs() {
        let l = Liveness { stall_after: Duration::from_millis(50), ..Liveness::new(Duration::from_secs(30)) };
        let id = l.begin();
        std::thread::sleep(Duration::from_millis(80));
        assert!(l.check().is_ok(), "a standby is alive");
        l.leading.store(true, Ordering::Relaxed);
        l.known.store(3, Ordering::Relaxed);
        let why = l.check().unwrap_err();
        assert!(why.contains("a reconcile has been running") && why.contains("3 EventWorkers"), "{why}");
        l.end(id);
        assert!(l.check().is_ok(), "nothing running: alive, however long since the last reconcile");
        let _quick = l.begin();
        assert!(l.check().is_ok(), "a reconcile just started");
        assert_eq!(Liveness::new(Duration::from_secs(30)).stall_after, Duration::from_secs(300));
    }
}
