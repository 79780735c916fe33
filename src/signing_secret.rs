//! The signing Secret's stored format (`<endpoint>-signing`): written by the controller, read by
//! the REST facade (create and rotate-secret answer with the secret) and the dispatcher (which
//! signs with it). Shared, so none of them imports another.

use k8s_openapi::api::core::v1::Secret;

use crate::resources::{COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, SIGNING_SECRET_COMPONENT};
use crate::signing::{KeyRing, StoredKeyRing};

/// Secret data key of the current signing secret.
pub const CURRENT_SECRET_KEY: &str = "signing-secret";
/// Secret data key of the JSON list of previous secrets still in their grace period.
pub const PREVIOUS_SECRETS_KEY: &str = "previous-signing-secrets";
/// Secret annotation: the `spec.secretRotation` that produced the current secret.
pub const ROTATION_ANNOTATION: &str = "webhooks.capydb.io/secret-rotation";

/// Label selector matching every signing Secret this operator manages.
pub fn signing_secret_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{COMPONENT_LABEL}={SIGNING_SECRET_COMPONENT}")
}

/// Reads the key ring stored in a signing Secret.
pub fn stored_key_ring(secret: Option<&Secret>) -> StoredKeyRing {
    let Some(secret) = secret else {
        return StoredKeyRing::Missing;
    };
    let data = secret.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
    let rotation = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ROTATION_ANNOTATION))
        .map(String::as_str);
    KeyRing::from_parts(get(CURRENT_SECRET_KEY), get(PREVIOUS_SECRETS_KEY), rotation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_secret_reads_as_missing() {
        assert_eq!(stored_key_ring(None), StoredKeyRing::Missing);
        assert!(matches!(
            stored_key_ring(Some(&Secret::default())),
            StoredKeyRing::Corrupt(_)
        ));
    }
}
