//! Which delivery-log segments the operator trusts: only those it wrote.
//!
//! Anyone who may create ConfigMaps in a namespace can make one that carries the log's labels.
//! Read back as part of a log, its pending records would be sent after the next restart, signed
//! with the endpoint's real key, and listed by the deliveries route. So every segment the
//! dispatcher creates carries an HMAC (annotation [`MAC_ANNOTATION`]) over its namespace, name,
//! organization and content, keyed by a secret only the operator reads (Secret
//! [`LOG_KEY_SECRET`] in the home namespace). A segment without a valid MAC is not part of any
//! log. Segments of the first format (one endpoint's log, `<endpoint>-deliveries-<n>`, written
//! before the MAC existed) count only with a controller owner reference to that endpoint's
//! current uid.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::{FIELD_MANAGER, journal_seq, legacy_segment_seq, log_selector};
use crate::resources::{ORGANIZATION_LABEL, Scope};

/// Annotation that holds a segment's MAC (base64 of HMAC-SHA256).
pub const MAC_ANNOTATION: &str = "webhooks.capydb.io/log-mac";
/// Secret, in the home namespace, holding the key of segment MACs.
pub const LOG_KEY_SECRET: &str = "capy-webhooks-log-key";
/// The key of segment MACs.
#[derive(Clone)]
pub struct LogKey([u8; 32]);

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKey(<redacted>)")
    }
}

impl LogKey {
    /// A key from its bytes (tests and the stored Secret).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The MAC of a segment as it is (annotations aside).
    pub fn mac(&self, cm: &ConfigMap) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"capy-webhooks/log-segment/v1\n");
        for part in [
            cm.metadata.namespace.as_deref().unwrap_or_default(),
            cm.metadata.name.as_deref().unwrap_or_default(),
            organization_of(cm).unwrap_or_default(),
        ] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac.update(&content_digest(cm));
        STANDARD.encode(mac.finalize().into_bytes())
    }

    /// Sets the segment's MAC annotation.
    pub fn sign(&self, cm: &mut ConfigMap) {
        let mac = self.mac(cm);
        cm.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(MAC_ANNOTATION.to_string(), mac);
    }

    /// Whether the segment carries a valid MAC (compared in constant time).
    pub fn verify(&self, cm: &ConfigMap) -> bool {
        use subtle::ConstantTimeEq;
        let Some(given) = cm.metadata.annotations.as_ref().and_then(|a| a.get(MAC_ANNOTATION)) else {
            return false;
        };
        bool::from(given.as_bytes().ct_eq(self.mac(cm).as_bytes()))
    }
}

fn organization_of(cm: &ConfigMap) -> Option<&str> {
    cm.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ORGANIZATION_LABEL))
        .map(String::as_str)
}

/// SHA-256 over the segment's data and binary data, in key order.
fn content_digest(cm: &ConfigMap) -> [u8; 32] {
    let mut hash = Sha256::new();
    for (key, value) in cm.data.iter().flatten() {
        hash.update(b"d");
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(value.as_bytes());
    }
    for (key, ByteString(value)) in cm.binary_data.iter().flatten() {
        hash.update(b"b");
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(value);
    }
    hash.finalize().into()
}

/// Why a segment is not part of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// A segment of the current format without a valid MAC.
    NotSignedByTheOperator,
    /// A first-format segment not owned by the current endpoint of its name.
    NotOwnedByTheEndpoint,
    /// Not named like a segment at all.
    NotASegment,
}

impl Rejection {
    /// For logs and Events.
    pub fn describe(self) -> &'static str {
        match self {
            Rejection::NotSignedByTheOperator => "it carries no valid MAC of this operator",
            Rejection::NotOwnedByTheEndpoint => "it is not owned by the current endpoint of its name",
            Rejection::NotASegment => "it is not named like a delivery-log segment",
        }
    }
}

/// Judges one segment. `endpoint_uid` gives the uid of the endpoint of a name in the segment's
/// namespace, if there is one.
pub fn judge(cm: &ConfigMap, key: &LogKey, endpoint_uid: impl Fn(&str) -> Option<String>) -> Result<(), Rejection> {
    let name = cm.metadata.name.as_deref().unwrap_or_default();
    if journal_seq(name).is_some() {
        return if key.verify(cm) {
            Ok(())
        } else {
            Err(Rejection::NotSignedByTheOperator)
        };
    }
    if legacy_segment_seq(name).is_some() {
        let owned = cm.metadata.owner_references.iter().flatten().any(|o| {
            o.kind == "WebhookEndpoint"
                && o.controller == Some(true)
                && endpoint_uid(&o.name).as_deref() == Some(o.uid.as_str())
        });
        return if owned {
            Ok(())
        } else {
            Err(Rejection::NotOwnedByTheEndpoint)
        };
    }
    Err(Rejection::NotASegment)
}

/// The endpoints a segment's delivery records name (to tell their owners about a refused
/// segment); undecodable entries are skipped.
pub fn endpoints_named_in(cm: &ConfigMap) -> std::collections::BTreeSet<String> {
    let organization = organization_of(cm).unwrap_or_default();
    let mut named = std::collections::BTreeSet::new();
    for (key, value) in super::segment::entries(cm).unwrap_or_default() {
        if let Ok(record) = super::DeliveryRecord::from_stored(&key, organization, &value) {
            named.insert(record.endpoint_id);
        } else if let Ok((record, _)) = super::DeliveryRecord::from_legacy(&value) {
            named.insert(record.endpoint_id);
        }
    }
    named
}

/// Reads the MAC key from [`LOG_KEY_SECRET`] in `home_namespace`, creating it on first use.
///
/// Creating the key blesses nothing: a segment written before the key existed (by a version
/// without MACs, or planted by a forger before an install or after the key was deleted) stays
/// untrusted. Upgrading from such a version is an administrator's explicit, one-time step,
/// [`sign_unsigned_segments`] (`capy-webhooks delivery-log sign-unsigned`).
pub async fn load_or_create_key(client: &Client, home_namespace: &str) -> anyhow::Result<LogKey> {
    let (key, _) =
        crate::operator_keys::load_or_create(client, home_namespace, LOG_KEY_SECRET, BTreeMap::new()).await?;
    Ok(LogKey(key))
}

/// Signs every current-format segment in `scope` that has no MAC annotation (those written before
/// MACs existed), with the key in [`LOG_KEY_SECRET`] of `home_namespace`: an administrator's
/// explicit upgrade step, never run by the operator itself, since it trusts whatever carries the
/// log's labels at the time. Returns the namespaced names signed, each also logged.
pub async fn sign_unsigned_segments(
    client: &Client,
    home_namespace: &str,
    scope: &Scope,
) -> anyhow::Result<Vec<String>> {
    let key = load_or_create_key(client, home_namespace).await?;
    let api: Api<ConfigMap> = scope.api(client.clone());
    let segments = api.list(&ListParams::default().labels(&log_selector())).await?;
    let mut signed = Vec::new();
    for cm in segments.items {
        let name = cm.metadata.name.clone().unwrap_or_default();
        let unsigned = cm
            .metadata
            .annotations
            .as_ref()
            .is_none_or(|a| !a.contains_key(MAC_ANNOTATION));
        if journal_seq(&name).is_none() || !unsigned {
            continue;
        }
        let namespace = cm.metadata.namespace.clone().unwrap_or_default();
        let patch = serde_json::json!({"metadata": {"annotations": {MAC_ANNOTATION: key.mac(&cm)}}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(client.clone(), &namespace)
            .patch(&name, &params, &Patch::Merge(&patch))
            .await?;
        warn!(%namespace, configmap = %name, "unsigned delivery-log segment signed by an administrator's request");
        signed.push(format!("{namespace}/{name}"));
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;
    use crate::delivery_log::{journal_segment_name, legacy_segment_name};

    fn segment(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(BTreeMap::from([(ORGANIZATION_LABEL.to_string(), "org_1".to_string())])),
                ..Default::default()
            },
            binary_data: Some(BTreeMap::from([("journal".to_string(), ByteString(vec![1, 2, 3]))])),
            ..Default::default()
        }
    }

    #[test]
    fn a_segment_names_the_endpoints_of_its_records() {
        let record = crate::delivery_log::DeliveryRecord {
            id: "msg_1".into(),
            endpoint_id: "ep-victim".into(),
            organization_id: "org_1".into(),
            event_id: "evt_1".into(),
            event_type: "a.b".into(),
            state: crate::delivery_log::DeliveryState::Pending,
            attempts: 0,
            max_attempts: 3,
            created_at: jiff::Timestamp::from_second(1_000).unwrap(),
            updated_at: jiff::Timestamp::from_second(1_000).unwrap(),
            next_attempt_at: None,
            delivered_at: None,
            response_status: None,
            last_error: None,
            trace: None,
        };
        let mut cm = segment(&journal_segment_name("org_1", 1));
        cm.binary_data = None;
        cm.data = Some(BTreeMap::from([("msg_1".to_string(), record.to_stored())]));
        assert_eq!(endpoints_named_in(&cm).into_iter().collect::<Vec<_>>(), ["ep-victim"]);
    }

    #[test]
    fn only_segments_signed_with_the_key_are_trusted() {
        let key = LogKey::from_bytes([7; 32]);
        let mut cm = segment(&journal_segment_name("org_1", 3));
        let none = |_: &str| None;
        assert_eq!(judge(&cm, &key, none), Err(Rejection::NotSignedByTheOperator));
        key.sign(&mut cm);
        assert_eq!(judge(&cm, &key, none), Ok(()));
        // Another key, or any change of content, name, namespace or organization, breaks it.
        assert!(judge(&cm, &LogKey::from_bytes([8; 32]), none).is_err());
        for change in [
            |c: &mut ConfigMap| {
                c.binary_data
                    .as_mut()
                    .unwrap()
                    .insert("journal".into(), ByteString(vec![1, 2, 4]));
            },
            |c: &mut ConfigMap| {
                c.data = Some(BTreeMap::from([("msg_x".to_string(), "{}".to_string())]));
            },
            |c: &mut ConfigMap| c.metadata.namespace = Some("other".into()),
            |c: &mut ConfigMap| {
                c.metadata
                    .labels
                    .as_mut()
                    .unwrap()
                    .insert(ORGANIZATION_LABEL.into(), "org_2".into());
            },
            |c: &mut ConfigMap| c.metadata.name = Some(journal_segment_name("org_1", 4)),
        ] {
            let mut forged = cm.clone();
            change(&mut forged);
            assert_eq!(judge(&forged, &key, none), Err(Rejection::NotSignedByTheOperator));
        }
    }

    #[test]
    fn first_format_segments_need_their_endpoints_current_uid() {
        let key = LogKey::from_bytes([7; 32]);
        let mut cm = segment(&legacy_segment_name("ep1", 1));
        let current = |name: &str| (name == "ep1").then(|| "uid-now".to_string());
        assert_eq!(judge(&cm, &key, current), Err(Rejection::NotOwnedByTheEndpoint));
        let owner = |uid: &str| OwnerReference {
            api_version: "webhooks.capydb.io/v1".into(),
            kind: "WebhookEndpoint".into(),
            name: "ep1".into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        cm.metadata.owner_references = Some(vec![owner("uid-old")]);
        assert_eq!(judge(&cm, &key, current), Err(Rejection::NotOwnedByTheEndpoint));
        cm.metadata.owner_references = Some(vec![owner("uid-now")]);
        assert_eq!(judge(&cm, &key, current), Ok(()));
        assert_eq!(judge(&segment("stray"), &key, current), Err(Rejection::NotASegment));
    }
}
