//! The controller's side of autoscaling: the built-in scaler's decision and its record,
//! the hand-over of the replica count to KEDA, and what each mode reports.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::json;

use super::children::Problems;
use super::{now_string, publish, Context, Result};
use crate::crd::{AutoscalingSpec, EventWorker, StreamStatus};
use crate::resources::{keda, MANAGER};
use crate::scaler::{Load, Policy};
use crate::status::Scaling;

/// The built-in autoscaler's decision: the replicas to apply, and what to report. The
/// change is recorded (rate budget, Event, status) by [`scaled`] once applied.
pub(super) fn scale_builtin(
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
pub(super) async fn scaled(ctx: &Context, ew: &EventWorker, sc: &mut Scaling, from: i32, to: i32) {
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
pub(super) async fn hand_over_replicas(deployments: &Api<Deployment>, d: &Deployment) -> Result<()> {
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
pub(super) fn keda_scaling(ew: &EventWorker, installed: bool, replicas: Option<i32>) -> Scaling {
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
pub(super) fn hpa_scaling(ew: &EventWorker, h: &HorizontalPodAutoscaler) -> Scaling {
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
pub(super) async fn apply_keda(ctx: &Context, ew: &EventWorker, ns: &str, problems: &mut Problems) {
    let name = ew.name_any();
    let sos: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &keda::scaled_object_resource());
    let tas: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &keda::trigger_auth_resource());
    match keda::trigger_authentication(ew) {
        Some(t) => {
            ctx.apply_child(ew, &tas, "TriggerAuthentication", t, None, problems).await;
        }
        None => ctx.delete_child(ew, &tas, "TriggerAuthentication", &keda::trigger_auth_name(ew), problems).await,
    }
    match keda::scaled_object(ew) {
        Some(so) => {
            ctx.apply_child(ew, &sos, "ScaledObject", so, None, problems).await;
        }
        None => ctx.delete_child(ew, &sos, "ScaledObject", &name, problems).await,
    }
}
