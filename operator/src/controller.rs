//! Context, reconcile, error_policy, run: EventWorker in, children applied with server-side
//! apply (one field manager), status patched.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{predicates, reflector, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;

use crate::crd::{AutoscalingMode, AutoscalingSpec, EventWorker, StreamStatus};
use crate::metrics::Metrics;
use crate::resources::deployment::{secret_refs, SecretData};
use crate::resources::{self, keda, service_monitor, MANAGER};
use crate::scaler::{Load, Policy, Scaler};
use crate::status::{self, Observed, Scaling};

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

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// How long to wait for Redis when reading lag.
    pub redis_timeout: Duration,
    /// How often a healthy EventWorker is looked at again (lag, readiness).
    pub resync: Duration,
    /// The built-in autoscaler's memory, per EventWorker uid.
    pub scalers: Mutex<HashMap<String, (tokio::time::Instant, Scaler)>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() },
        );
        Self {
            client,
            recorder,
            metrics,
            redis_timeout: Duration::from_secs(3),
            resync: Duration::from_secs(30),
            scalers: Mutex::new(HashMap::new()),
        }
    }
}

impl Context {
    /// Run `f` on this EventWorker's scaler (created on first use, seeded with `current`).
    /// Scalers of EventWorkers not seen for an hour are dropped.
    fn with_scaler<T>(
        &self,
        ew: &EventWorker,
        current: i32,
        f: impl FnOnce(&mut Scaler, tokio::time::Instant) -> T,
    ) -> T {
        let now = tokio::time::Instant::now();
        let key = ew.uid().unwrap_or_else(|| ew.name_any());
        let mut scalers = crate::lock(&self.scalers);
        scalers.retain(|_, (seen, _)| now.saturating_duration_since(*seen) < Duration::from_secs(3600));
        let (seen, scaler) = scalers.entry(key).or_insert_with(|| (now, Scaler::new(now, current)));
        *seen = now;
        f(scaler, now)
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
    Ok(())
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

async fn publish(ctx: &Context, ew: &EventWorker, type_: EventType, reason: &str, note: String, action: &str) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &ew.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}

/// Create the generated admin token Secret when the spec names none and it does not exist
/// yet; an existing one is left as it is (the token must not change under the pods).
async fn ensure_admin_secret(ctx: &Context, ew: &EventWorker, ns: &str) -> Result<()> {
    let Some(secret) = resources::admin_secret::generated(ew) else { return Ok(()) };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = resources::admin_secret::generated_name(ew);
    if api.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => {
            publish(
                ctx,
                ew,
                EventType::Normal,
                "AdminTokenCreated",
                format!("admin token generated into Secret {name}"),
                "Create",
            )
            .await;
            Ok(())
        }
        // Another replica (or a previous attempt) created it meanwhile.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Values of the Secret keys the spec references; missing ones are listed.
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

async fn crd_installed(client: &Client, name: &str) -> Result<bool> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    Ok(api.get_opt(name).await?.is_some())
}

pub async fn reconcile(ew: Arc<EventWorker>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&ew, &ctx).await;
    ctx.metrics.observe(started.elapsed(), result.as_ref().err().map(Error::kind));
    result
}

async fn reconcile_inner(ew: &EventWorker, ctx: &Context) -> Result<Action> {
    let ns = ew.namespace().unwrap_or_else(|| "default".into());
    let name = ew.name_any();
    if let Err(e) = validate(ew) {
        publish(ctx, ew, EventType::Warning, "InvalidSpec", e.to_string(), "Validate").await;
        patch_invalid_status(ctx, ew, &ns, &e.to_string()).await?;
        return Err(e);
    }
    ensure_admin_secret(ctx, ew, &ns).await?;
    let (secrets, missing) = read_secrets(&ctx.client, ew, &ns).await?;
    let pp = apply_params();

    // The backlog first: with autoscaling it decides the replica count.
    let url = status::redis_url(ew, &secrets);
    let names: Vec<String> = ew.spec.streams.iter().map(|s| s.name.clone()).collect();
    let read = status::read_backlog(&url, &names, &ew.spec.group, ctx.redis_timeout).await;

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = deployments.get_opt(&name).await?;
    let current = existing.as_ref().and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas);
    let (replicas, mut scaling) = match &ew.spec.autoscaling {
        // The HPA sets spec.replicas through the scale subresource.
        None => (Some(ew.spec.replicas), None),
        Some(a) if a.mode == AutoscalingMode::Hpa => (Some(ew.spec.replicas), None),
        Some(a) if a.mode == AutoscalingMode::Keda => {
            if let Some(d) = &existing {
                hand_over_replicas(&deployments, d).await?;
            }
            (None, None)
        }
        Some(a) => {
            let (n, sc) = scale_builtin(ctx, ew, a, current, &read);
            (Some(n), Some(sc))
        }
    };
    let desired = resources::deployment::deployment(ew, &secrets, replicas);
    let applied = deployments.patch(&name, &pp, &Patch::Apply(&desired)).await?;
    // A Deployment created by this apply starts from minReplicas, as far as scaling goes.
    let from = current.or(ew.spec.autoscaling.as_ref().map(|a| a.min_replicas));
    if let (Some(sc), Some(from), Some(to)) = (scaling.as_mut(), from, replicas) {
        if from != to {
            scaled(ctx, ew, sc, from, to).await;
        }
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    services.patch(&name, &pp, &Patch::Apply(&resources::service::service(ew))).await?;

    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    match resources::pdb::pdb(ew) {
        Some(p) => {
            pdbs.patch(&name, &pp, &Patch::Apply(&p)).await?;
        }
        None => delete_owned(&pdbs, &name, ew).await?,
    }

    let mut obs = Observed::from_deployment(&applied);
    obs.missing_secrets = missing;
    let wants_sm = ew.spec.metrics.service_monitor.enabled;
    if crd_installed(&ctx.client, service_monitor::CRD_NAME).await? {
        let sms: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &service_monitor::api_resource());
        match service_monitor::service_monitor(ew) {
            Some(sm) => {
                sms.patch(&name, &pp, &Patch::Apply(&sm)).await?;
            }
            None => delete_owned(&sms, &name, ew).await?,
        }
    } else if wants_sm {
        obs.service_monitor_skipped = Some(
            "metrics.serviceMonitor.enabled but the monitoring.coreos.com ServiceMonitor CRD is not installed".into(),
        );
    }

    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &ns);
    match resources::hpa::hpa(ew) {
        Some(h) => {
            let applied = hpas.patch(&name, &pp, &Patch::Apply(&h)).await?;
            scaling = Some(hpa_scaling(ew, &applied));
        }
        None => delete_owned(&hpas, &name, ew).await?,
    }

    let keda_installed = crd_installed(&ctx.client, keda::SCALED_OBJECT_CRD).await?;
    if keda_installed {
        apply_keda(ctx, ew, &ns).await?;
    }
    if ew.spec.autoscaling.as_ref().is_some_and(|a| a.mode == AutoscalingMode::Keda) {
        scaling = Some(keda_scaling(ew, keda_installed, applied.spec.as_ref().and_then(|s| s.replicas)));
    }
    obs.scaling = scaling;

    match read {
        Ok((streams, scheduled)) => {
            obs.redis = Ok(streams);
            obs.scheduled = scheduled;
        }
        Err(e) => obs.redis = Err(e),
    }
    // Ready says RedisUnreachable whenever Redis is (Degraded may name a weightier reason).
    let was_degraded_by_redis = ew
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.reason == "RedisUnreachable");
    match &obs.redis {
        Err(e) if !was_degraded_by_redis => {
            publish(ctx, ew, EventType::Warning, "RedisUnreachable", e.clone(), "ReadLag").await;
        }
        Ok(_) if was_degraded_by_redis => {
            publish(ctx, ew, EventType::Normal, "RedisReachable", "Redis answers again".into(), "ReadLag").await;
        }
        _ => {}
    }
    let new_status = status::build(ew, &obs, resources::selector_string(ew), &now_string());
    if ew.status.as_ref().map(|s| s.observed_generation) != Some(ew.metadata.generation) {
        publish(
            ctx,
            ew,
            EventType::Normal,
            "Applied",
            format!(
                "Deployment, Service{} applied",
                if ew.spec.disruption_budget.is_some() { ", PodDisruptionBudget" } else { "" }
            ),
            "Reconcile",
        )
        .await;
    }
    patch_status(ctx, ew, &ns, serde_json::to_value(&new_status)?).await?;
    // The built-in autoscaler reads the backlog every poll interval.
    let every = match &ew.spec.autoscaling {
        Some(a) if a.mode == AutoscalingMode::Builtin => a.poll_interval().min(ctx.resync),
        _ => ctx.resync,
    };
    Ok(Action::requeue(every))
}

/// The built-in autoscaler's decision: the replicas to apply, and what to report. The
/// change is recorded (rate budget, Event, status) by [`scaled`] once applied.
fn scale_builtin(
    ctx: &Context,
    ew: &EventWorker,
    a: &AutoscalingSpec,
    current: Option<i32>,
    read: &Result<(Vec<StreamStatus>, i64), String>,
) -> (i32, Scaling) {
    let current = current.unwrap_or(a.min_replicas);
    let load = read.as_ref().ok().map(|(streams, scheduled)| Load::from_status(&ew.spec, streams, *scheduled));
    let policy = Policy::from_spec(&ew.spec).expect("autoscaling is set");
    let d = ctx.with_scaler(ew, current, |s, now| s.decide(&policy, load.as_ref(), current, now));
    let last_scale = previous_scale(ew);
    let active = if d.active {
        (true, "ValidBacklog".into(), format!("{}; recommending {}", d.reason, d.recommended))
    } else {
        (false, "BacklogUnavailable".into(), d.reason.clone())
    };
    let limited = match &d.limited {
        Some(l) => (true, l.reason().into(), format!("recommended {}, applying {}", d.recommended, d.replicas)),
        None => (false, "DesiredWithinRange".into(), format!("{} replicas", d.replicas)),
    };
    let reason = d.reason.clone();
    (d.replicas, Scaling { mode: "builtin", active, limited, desired: Some(d.replicas), last_scale, reason })
}

/// A scale that was applied: counted against the rate policies, an Event, the status.
async fn scaled(ctx: &Context, ew: &EventWorker, sc: &mut Scaling, from: i32, to: i32) {
    ctx.with_scaler(ew, from, |s, now| s.applied(from, to, now));
    let why = format!("{from} -> {to}: {}", sc.reason);
    tracing::info!(name = %ew.name_any(), from, to, reason = %sc.reason, "scaled");
    let verb = if to > from { "ScaledUp" } else { "ScaledDown" };
    publish(ctx, ew, EventType::Normal, verb, why.clone(), "Scale").await;
    sc.last_scale = Some((now_string(), why));
}

/// Switching to KEDA: the replica count our apply owned would be removed (and reset to 1 by
/// the API server) when the next apply leaves it out. A field manager of its own keeps the
/// current count until KEDA's HPA writes it (and so takes it over).
async fn hand_over_replicas(deployments: &Api<Deployment>, d: &Deployment) -> Result<()> {
    let ours = d.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(MANAGER)
            && m.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
    });
    let Some(replicas) = d.spec.as_ref().and_then(|s| s.replicas).filter(|_| ours) else { return Ok(()) };
    let body = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": d.metadata.name},
        "spec": {"replicas": replicas}});
    let pp = PatchParams::apply(HANDOVER_MANAGER);
    match deployments.patch(d.metadata.name.as_deref().unwrap_or_default(), &pp, &Patch::Apply(&body)).await {
        Ok(_) => Ok(()),
        // Someone (KEDA's HPA) already set another count: theirs stands.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Field manager that holds the replica count between builtin (or fixed) and KEDA.
const HANDOVER_MANAGER: &str = "eventworker-operator-handover";

/// What KEDA mode looks like from here: whether the ScaledObject could be applied.
fn keda_scaling(ew: &EventWorker, installed: bool, replicas: Option<i32>) -> Scaling {
    let active = if installed {
        (true, "KedaScaledObject".into(), format!("ScaledObject {} scales the Deployment", ew.name_any()))
    } else {
        (
            false,
            "KedaNotInstalled".into(),
            format!(
                "autoscaling.mode is keda but KEDA's CRD {} is not installed: the replica count is left as it is",
                keda::SCALED_OBJECT_CRD
            ),
        )
    };
    let limited = (
        false,
        "DecidedByKeda".into(),
        format!(
            "{} replicas; KEDA's HorizontalPodAutoscaler keda-hpa-{} says whether it is limited",
            replicas.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into()),
            ew.name_any()
        ),
    );
    Scaling { mode: "keda", active, limited, desired: None, last_scale: previous_scale(ew), reason: String::new() }
}

/// What HPA mode looks like: the HorizontalPodAutoscaler's own conditions.
fn hpa_scaling(ew: &EventWorker, h: &HorizontalPodAutoscaler) -> Scaling {
    let st = h.status.as_ref();
    let cond = |t: &str| {
        st.and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == t))
            .map(|c| (c.status == "True", c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default()))
    };
    // The HPA's own reasons (ValidMetricFound, FailedGetExternalMetric, TooManyReplicas, ...).
    let active = cond("ScalingActive").unwrap_or_else(|| {
        (false, "Pending".into(), format!("HorizontalPodAutoscaler {} has not computed yet", ew.name_any()))
    });
    let limited = cond("ScalingLimited").unwrap_or_else(|| (false, "Pending".into(), String::new()));
    let last_scale = st
        .and_then(|s| s.last_scale_time.as_ref())
        .map(|t| (t.0.to_string(), format!("HorizontalPodAutoscaler {}", ew.name_any())))
        .or_else(|| previous_scale(ew));
    Scaling { mode: "hpa", active, limited, desired: st.map(|s| s.desired_replicas), last_scale, reason: String::new() }
}

/// The last scale the status recorded: carried over until the next one.
fn previous_scale(ew: &EventWorker) -> Option<(String, String)> {
    let a = ew.status.as_ref()?.autoscaling.as_ref()?;
    Some((a.last_scale_time.clone()?, a.last_scale_reason.clone()?))
}

/// Apply (keda mode) or remove (any other) the ScaledObject and its TriggerAuthentication.
async fn apply_keda(ctx: &Context, ew: &EventWorker, ns: &str) -> Result<()> {
    let pp = apply_params();
    let name = ew.name_any();
    let sos: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &keda::scaled_object_resource());
    let tas: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &keda::trigger_auth_resource());
    match keda::trigger_authentication(ew) {
        Some(t) => {
            tas.patch(&keda::trigger_auth_name(ew), &pp, &Patch::Apply(&t)).await?;
        }
        None => delete_owned(&tas, &keda::trigger_auth_name(ew), ew).await?,
    }
    match keda::scaled_object(ew) {
        Some(so) => {
            sos.patch(&name, &pp, &Patch::Apply(&so)).await?;
        }
        None => delete_owned(&sos, &name, ew).await?,
    }
    Ok(())
}

async fn patch_status(ctx: &Context, ew: &EventWorker, ns: &str, status: serde_json::Value) -> Result<()> {
    let api: Api<EventWorker> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({"apiVersion": "eventworker.io/v1alpha1", "kind": "EventWorker", "status": status});
    match api.patch_status(&ew.name_any(), &apply_params(), &Patch::Apply(&body)).await {
        // Deleted while we reconciled: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()).map_err(Error::from),
    }
}

async fn patch_invalid_status(ctx: &Context, ew: &EventWorker, ns: &str, why: &str) -> Result<()> {
    let cond = |t: &str, s: &str, r: &str| json!({"type": t, "status": s, "reason": r, "message": why, "lastTransitionTime": now_string(), "observedGeneration": ew.metadata.generation});
    patch_status(
        ctx,
        ew,
        ns,
        json!({
            "observedGeneration": ew.metadata.generation,
            "conditions": [cond("Ready", "False", "InvalidSpec"), cond("Progressing", "False", "InvalidSpec"), cond("Degraded", "True", "InvalidSpec")],
        }),
    )
    .await
}

/// Delete a child we own, if it exists (a PDB or ServiceMonitor switched off).
async fn delete_owned<K>(api: &Api<K>, name: &str, ew: &EventWorker) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if let Some(obj) = api.get_opt(name).await? {
        let ours = obj.meta().owner_references.iter().flatten().any(|o| Some(&o.uid) == ew.metadata.uid.as_ref());
        if ours {
            api.delete(name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

fn now_string() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// An invalid spec waits for a change (its condition says why); anything else is retried
/// after a bounded, jittered delay.
pub fn error_policy(ew: Arc<EventWorker>, err: &Error, ctx: Arc<Context>) -> Action {
    match err {
        Error::InvalidSpec(why) => {
            tracing::warn!(name = %ew.name_any(), %why, "invalid EventWorker; waiting for a change");
            Action::await_change()
        }
        other => {
            tracing::warn!(name = %ew.name_any(), error = %other, "reconcile failed; retrying");
            let jitter = rand::random_range(0..2000);
            Action::requeue(Duration::from_secs(5).min(ctx.resync) + Duration::from_millis(jitter))
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
    let controller = Controller::for_stream(trigger, reader);
    let store = controller.store();
    controller
        .owns(scoped::<Deployment>(&client, ns), watcher::Config::default())
        .owns(scoped::<Service>(&client, ns), watcher::Config::default())
        .owns(scoped::<PodDisruptionBudget>(&client, ns), watcher::Config::default())
        .owns(scoped::<HorizontalPodAutoscaler>(&client, ns), watcher::Config::default())
        // Metadata only: the mapper needs names, and holding every Secret's data in memory
        // would be both a memory and an exposure problem.
        .watches_stream(
            watcher(scoped::<PartialObjectMeta<Secret>>(&client, ns), watcher::Config::default())
                .default_backoff()
                .touched_objects(),
            move |secret: PartialObjectMeta<Secret>| {
                // A change of a referenced Secret re-renders the config hash (and rolls the pods).
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|ew| ew.namespace() == ns && secret_refs(&ew.spec).iter().any(|r| r.name == name))
                    .map(|ew| ObjectRef::from_obj(&*ew))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
}
