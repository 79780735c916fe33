//! Pure builders of the objects the controller wants: the signing Secret and the status.
//! No client, no clock: everything they need is passed in, so they are tested without IO.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};

use crate::resources::{
    COMPONENT_LABEL, CONDITION_READY, CONDITION_SECRET_READY, ENDPOINT_LABEL, MANAGED_BY, MANAGED_BY_LABEL,
    ORGANIZATION_LABEL, SIGNING_SECRET_COMPONENT, WebhookEndpointStatus,
};
use crate::signing::KeyRing;
use crate::signing_secret::{CURRENT_SECRET_KEY, PREVIOUS_SECRETS_KEY, ROTATION_ANNOTATION};

/// Identity of the endpoint a Secret belongs to.
pub struct Owner<'a> {
    /// Endpoint name.
    pub name: &'a str,
    /// Endpoint namespace.
    pub namespace: &'a str,
    /// Organization id from the spec.
    pub organization_id: &'a str,
    /// Controller owner reference to the endpoint.
    pub owner_ref: OwnerReference,
}

/// The signing Secret as the controller wants it, ready for server-side apply.
pub fn desired_secret(owner: &Owner<'_>, secret_name: &str, ring: &KeyRing) -> Secret {
    let (current, previous, rotation) = ring.to_parts();
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.to_string()),
            namespace: Some(owner.namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (COMPONENT_LABEL.to_string(), SIGNING_SECRET_COMPONENT.to_string()),
                (ENDPOINT_LABEL.to_string(), owner.name.to_string()),
                (ORGANIZATION_LABEL.to_string(), owner.organization_id.to_string()),
            ])),
            annotations: Some(BTreeMap::from([(ROTATION_ANNOTATION.to_string(), rotation)])),
            owner_references: Some(vec![owner.owner_ref.clone()]),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            (CURRENT_SECRET_KEY.to_string(), ByteString(current.into_bytes())),
            (PREVIOUS_SECRETS_KEY.to_string(), ByteString(previous.into_bytes())),
        ])),
        ..Default::default()
    }
}

/// Whether the stored Secret already matches the desired one in everything the controller sets.
pub fn secret_matches(existing: &Secret, desired: &Secret) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>, have: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owned = desired.metadata.owner_references.iter().flatten().all(|want| {
        existing
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|have| have.uid == want.uid && have.controller == Some(true))
    });
    existing.data == desired.data
        && subset(&desired.metadata.labels, &existing.metadata.labels)
        && subset(&desired.metadata.annotations, &existing.metadata.annotations)
        && owned
}

/// The outcome of one reconcile, as the status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The signing secret is in place.
    Ready {
        /// Secret name.
        secret_name: String,
        /// Rotation the current secret belongs to.
        rotation: i64,
    },
    /// The spec is invalid; nothing is done until it changes.
    InvalidSpec(String),
}

/// The status the controller wants, given the current one.
///
/// Fields other components own (health, delivery summary, their conditions) are carried over.
/// Conditions keep their `lastTransitionTime` while their status stays the same, and `updatedAt`
/// only moves when something else changed, so an unchanged status compares equal to the stored one
/// and is not written.
pub fn desired_status(
    current: Option<&WebhookEndpointStatus>,
    generation: Option<i64>,
    outcome: &Outcome,
    now: Timestamp,
) -> WebhookEndpointStatus {
    let mut status = current.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let owned = |status: &str, reason: &str, message: String| (status.to_string(), reason.to_string(), message);
    let (ready, secret_ready) = match outcome {
        Outcome::Ready { secret_name, rotation } => {
            status.secret_name = Some(secret_name.clone());
            status.secret_rotation = *rotation;
            (
                owned("True", "Reconciled", "the endpoint is reconciled".to_string()),
                owned(
                    "True",
                    "SecretAvailable",
                    format!("signing secret is stored in Secret {secret_name}"),
                ),
            )
        }
        Outcome::InvalidSpec(reason) => {
            // The secret is left alone while the spec is invalid, so its condition stays as it was.
            let secret = status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_SECRET_READY)
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
                .unwrap_or_else(|| owned("Unknown", "InvalidSpec", "waiting for a valid spec".to_string()));
            (owned("False", "InvalidSpec", reason.clone()), secret)
        }
    };
    set_condition(&mut status.conditions, CONDITION_READY, ready, generation, now);
    set_condition(
        &mut status.conditions,
        CONDITION_SECRET_READY,
        secret_ready,
        generation,
        now,
    );
    if current != Some(&status) {
        status.updated_at = Some(Time(now));
    }
    status
}

fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    (status, reason, message): (String, String, String),
    generation: Option<i64>,
    now: Timestamp,
) {
    let fresh = Condition {
        type_: type_.to_string(),
        status,
        reason,
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) if existing.status == fresh.status => {
            existing.reason = fresh.reason;
            existing.message = fresh.message;
            existing.observed_generation = fresh.observed_generation;
        }
        Some(existing) => *existing = fresh,
        None => conditions.push(fresh),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{PreviousSecret, SigningSecret, StoredKeyRing};
    use crate::signing_secret::stored_key_ring;

    fn owner() -> Owner<'static> {
        Owner {
            name: "ep1",
            namespace: "ns",
            organization_id: "org_1",
            owner_ref: OwnerReference {
                api_version: "webhooks.capydb.io/v1".into(),
                kind: "WebhookEndpoint".into(),
                name: "ep1".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
        }
    }

    fn ring() -> KeyRing {
        KeyRing {
            current: SigningSecret::generate(),
            rotation: 2,
            previous: vec![PreviousSecret {
                secret: SigningSecret::generate(),
                expires_at: Timestamp::from_second(99).unwrap(),
            }],
        }
    }

    #[test]
    fn desired_secret_carries_labels_owner_and_data() {
        let ring = ring();
        let secret = desired_secret(&owner(), "ep1-signing", &ring);
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], "capy-webhooks");
        assert_eq!(labels[ENDPOINT_LABEL], "ep1");
        assert_eq!(labels[ORGANIZATION_LABEL], "org_1");
        assert_eq!(
            secret.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
        assert_eq!(stored_key_ring(Some(&secret)), StoredKeyRing::Valid(ring));
    }

    #[test]
    fn secret_matches_detects_drift() {
        let desired = desired_secret(&owner(), "ep1-signing", &ring());
        let mut existing = desired.clone();
        existing
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("extra".into(), "kept".into());
        assert!(secret_matches(&existing, &desired), "extra labels are not drift");
        existing.metadata.labels.as_mut().unwrap().remove(MANAGED_BY_LABEL);
        assert!(!secret_matches(&existing, &desired), "a removed label is drift");
        let mut no_owner = desired.clone();
        no_owner.metadata.owner_references = None;
        assert!(!secret_matches(&no_owner, &desired));
        let other_data = desired_secret(&owner(), "ep1-signing", &ring());
        assert!(!secret_matches(&other_data, &desired));
    }

    #[test]
    fn status_is_stable_when_nothing_changes() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let t1 = Timestamp::from_second(2000).unwrap();
        let ready = Outcome::Ready {
            secret_name: "ep1-signing".into(),
            rotation: 0,
        };
        let first = desired_status(None, Some(1), &ready, t0);
        assert_eq!(first.observed_generation, Some(1));
        assert_eq!(first.secret_name.as_deref(), Some("ep1-signing"));
        assert_eq!(first.updated_at, Some(Time(t0)));
        let ready_cond = first.conditions.iter().find(|c| c.type_ == CONDITION_READY).unwrap();
        assert_eq!(
            (ready_cond.status.as_str(), ready_cond.reason.as_str()),
            ("True", "Reconciled")
        );
        // Same inputs later: identical status, so no write.
        assert_eq!(desired_status(Some(&first), Some(1), &ready, t1), first);
    }

    #[test]
    fn status_moves_on_generation_and_rotation() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let t1 = Timestamp::from_second(2000).unwrap();
        let first = desired_status(
            None,
            Some(1),
            &Outcome::Ready {
                secret_name: "s".into(),
                rotation: 0,
            },
            t0,
        );
        let second = desired_status(
            Some(&first),
            Some(2),
            &Outcome::Ready {
                secret_name: "s".into(),
                rotation: 1,
            },
            t1,
        );
        assert_eq!(second.secret_rotation, 1);
        assert_eq!(second.observed_generation, Some(2));
        assert_eq!(second.updated_at, Some(Time(t1)));
        // Ready stayed True: its transition time is kept.
        let ready = second.conditions.iter().find(|c| c.type_ == CONDITION_READY).unwrap();
        assert_eq!(ready.last_transition_time, Time(t0));
        assert_eq!(ready.observed_generation, Some(2));
    }

    #[test]
    fn invalid_spec_sets_ready_false_and_keeps_secret_condition() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let t1 = Timestamp::from_second(2000).unwrap();
        let first = desired_status(
            None,
            Some(1),
            &Outcome::Ready {
                secret_name: "s".into(),
                rotation: 0,
            },
            t0,
        );
        let invalid = desired_status(
            Some(&first),
            Some(2),
            &Outcome::InvalidSpec("url must use https://".into()),
            t1,
        );
        let ready = invalid.conditions.iter().find(|c| c.type_ == CONDITION_READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
        assert_eq!(ready.message, "url must use https://");
        assert_eq!(ready.last_transition_time, Time(t1));
        let secret = invalid
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_SECRET_READY)
            .unwrap();
        assert_eq!(secret.status, "True");
    }

    #[test]
    fn other_components_conditions_are_kept() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let mut current = desired_status(
            None,
            Some(1),
            &Outcome::Ready {
                secret_name: "s".into(),
                rotation: 0,
            },
            t0,
        );
        current.conditions.push(Condition {
            type_: "Healthy".into(),
            status: "True".into(),
            reason: "DeliveriesSucceed".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(t0),
        });
        let next = desired_status(
            Some(&current),
            Some(1),
            &Outcome::Ready {
                secret_name: "s".into(),
                rotation: 0,
            },
            t0,
        );
        assert_eq!(next, current);
    }
}
