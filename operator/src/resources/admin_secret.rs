//! The workers' admin token. Their dead-letter endpoints (`/dlq`, `/dlq/replay`,
//! `/reprocess-dlq`) are open without `ADMIN_TOKEN`, as the original's `/reprocess-dlq`
//! was; pods the operator runs always have one: the user's (`spec.admin.tokenSecretRef`)
//! or one generated once into the Secret `<name>-admin`, owned by the EventWorker.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use rand::Rng;

use super::child_meta;
use crate::crd::{EventWorker, SecretKeyRef};

/// Key of the generated token in its Secret.
pub const TOKEN_KEY: &str = "token";

/// Name of the Secret the operator generates when the spec names none.
pub fn generated_name(ew: &EventWorker) -> String {
    format!("{}-admin", ew.name_any())
}

/// Where the pods read `ADMIN_TOKEN` from.
pub fn token_ref(ew: &EventWorker) -> SecretKeyRef {
    ew.spec
        .admin
        .token_secret_ref
        .clone()
        .unwrap_or_else(|| SecretKeyRef { name: generated_name(ew), key: TOKEN_KEY.into() })
}

/// The Secret to create when the spec names none: a fresh random token (256 bits). It is
/// created once and never rewritten, so the token stays stable across reconciles.
pub fn generated(ew: &EventWorker) -> Option<Secret> {
    if ew.spec.admin.token_secret_ref.is_some() {
        return None;
    }
    let bytes: [u8; 32] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut meta = child_meta(ew);
    meta.name = Some(generated_name(ew));
    Some(Secret {
        metadata: meta,
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_string(), token)])),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{ew, minimal};

    #[test]
    fn a_token_is_generated_unless_the_user_gives_one() {
        let mut e = ew(minimal());
        let s = generated(&e).expect("generated");
        assert_eq!(s.metadata.name.as_deref(), Some("orders-admin"));
        let token = &s.string_data.as_ref().unwrap()[TOKEN_KEY];
        assert_eq!(token.len(), 64);
        assert_ne!(generated(&e).unwrap().string_data.unwrap()[TOKEN_KEY], *token, "random");
        assert!(s.metadata.owner_references.is_some(), "garbage-collected with the EventWorker");
        assert_eq!(token_ref(&e).name, "orders-admin");

        e.spec.admin.token_secret_ref = Some(SecretKeyRef { name: "mine".into(), key: "t".into() });
        assert!(generated(&e).is_none());
        assert_eq!(token_ref(&e), SecretKeyRef { name: "mine".into(), key: "t".into() });
    }
}
