//! The PodDisruptionBudget, when the spec asks for one.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{child_meta, selector_labels};
use crate::crd::EventWorker;

pub fn pdb(ew: &EventWorker) -> Option<PodDisruptionBudget> {
    let budget = ew.spec.disruption_budget.as_ref()?;
    let (min_available, max_unavailable) = match (&budget.min_available, &budget.max_unavailable) {
        (None, None) => (None, Some(IntOrString::Int(1))),
        (min, max) => (min.clone(), max.clone()),
    };
    Some(PodDisruptionBudget {
        metadata: child_meta(ew),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector { match_labels: Some(selector_labels(ew)), match_expressions: None }),
            min_available,
            max_unavailable,
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    #[test]
    fn only_when_asked_and_one_unavailable_by_default() {
        assert!(pdb(&ew(minimal())).is_none());
        let mut s = minimal();
        s["disruptionBudget"] = serde_json::json!({});
        let p = pdb(&ew(s)).unwrap().spec.unwrap();
        assert_eq!(p.max_unavailable, Some(IntOrString::Int(1)));
        let mut s = minimal();
        s["disruptionBudget"] = serde_json::json!({"minAvailable": "50%"});
        let p = pdb(&ew(s)).unwrap().spec.unwrap();
        assert_eq!((p.min_available, p.max_unavailable), (Some(IntOrString::String("50%".into())), None));
    }
}
