//! Pure builders and decisions of the controller: the signing Secret and the status it wants,
//! whose an existing Secret is, which Event a reconcile publishes and when it looks again.
//! No client, no clock: everything they need is passed in, so they are tested without IO.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};

use kube::Resource;

use crate::client_certificate::Problem;
use crate::resources::{
    COMPONENT_LABEL, CONDITION_CLIENT_CERTIFICATE_READY, CONDITION_READY, CONDITION_SECRET_READY, ENDPOINT_LABEL,
    MANAGED_BY, MANAGED_BY_LABEL, ORGANIZATION_LABEL, SIGNING_SECRET_COMPONENT, WebhookEndpoint, WebhookEndpointStatus,
    signing_secret_name,
};
use crate::signing::{KeyRing, KeyRingChange, SignatureScheme, SigningSecret, WantedKeys, plan_key_ring};
use crate::signing_secret::{CURRENT_SECRET_KEY, PREVIOUS_SECRETS_KEY, ROTATION_ANNOTATION, stored_key_ring};
use crate::telemetry::EventNote;
use crate::validation::{UrlPolicy, validate_spec};

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
    /// The endpoint's namespace may not serve the organization it names; it gets no secret and
    /// no deliveries.
    OrganizationNotAllowed {
        /// The endpoint's namespace.
        namespace: String,
        /// The organization its spec names.
        organization_id: String,
    },
    /// A Secret of the signing Secret's name exists and is not this endpoint's: it is neither
    /// read nor changed, since whoever made it would know the signing key.
    SecretNameTaken {
        /// Secret name.
        secret_name: String,
    },
}

/// What a reconcile read: the inputs of [`decide`].
pub struct Observed<'a> {
    /// The endpoint as the watch has it.
    pub endpoint: &'a WebhookEndpoint,
    /// The Secret of the endpoint's signing-Secret name, if any.
    pub secret: Option<&'a Secret>,
    /// Whether the endpoint's namespace may serve its organization.
    pub organization_allowed: bool,
    /// How URLs are judged.
    pub url_policy: UrlPolicy,
    /// How long a rotated-out secret co-signs.
    pub grace: Duration,
    /// The time of the reconcile.
    pub now: Timestamp,
    /// The client certificate the endpoint names, judged (`None` when it names none).
    pub client_certificate: Option<Result<(), Problem>>,
}

/// What a reconcile should do, decided without IO.
#[derive(Debug)]
pub struct Decision {
    /// The signing Secret to apply, when the stored one differs.
    pub secret: Option<Secret>,
    /// The status the controller wants.
    pub status: WebhookEndpointStatus,
    /// Whether it differs from the stored one (only then is it written).
    pub status_changed: bool,
    /// The Event to publish after the writes.
    pub event: Option<EventNote>,
    /// When to look again without a change; `None` waits for one.
    pub requeue: Option<Duration>,
}

/// Decides a reconcile: validate, then build the desired Secret and status, the Event and the
/// requeue time. `generate` makes a new signing secret when one is needed.
pub fn decide(
    observed: &Observed<'_>,
    generate: impl FnOnce(SignatureScheme) -> SigningSecret,
) -> Result<Decision, &'static str> {
    let endpoint = observed.endpoint;
    let namespace = endpoint.metadata.namespace.as_deref().ok_or("namespace")?;
    let name = endpoint.metadata.name.as_deref().ok_or("name")?;
    let owner_ref = endpoint.controller_owner_ref(&()).ok_or("uid")?;
    let secret_name = signing_secret_name(name);
    let mut secret = None;
    let (mut change, mut next_expiry) = (None, None);
    let outcome = if let Err(reason) = validate_spec(&endpoint.spec, observed.url_policy) {
        Outcome::InvalidSpec(reason)
    } else if !observed.organization_allowed {
        Outcome::OrganizationNotAllowed {
            namespace: namespace.to_string(),
            organization_id: endpoint.spec.organization_id.clone(),
        }
    } else {
        match secret_claim(observed.secret, &owner_ref.uid) {
            SecretClaim::Taken => Outcome::SecretNameTaken {
                secret_name: secret_name.clone(),
            },
            SecretClaim::Absent | SecretClaim::Ours => {
                let existed_before = endpoint.status.as_ref().is_some_and(|s| s.secret_name.is_some());
                let plan = plan_key_ring(
                    stored_key_ring(observed.secret),
                    existed_before,
                    WantedKeys {
                        rotation: endpoint.spec.secret_rotation,
                        scheme: endpoint.spec.signature_scheme,
                    },
                    observed.now,
                    observed.grace,
                    generate,
                );
                let owner = Owner {
                    name,
                    namespace,
                    organization_id: &endpoint.spec.organization_id,
                    owner_ref,
                };
                let desired = desired_secret(&owner, &secret_name, &plan.ring);
                if observed.secret.is_none_or(|stored| !secret_matches(stored, &desired)) {
                    secret = Some(desired);
                }
                next_expiry = plan.ring.next_expiry();
                change = Some(plan.change);
                Outcome::Ready {
                    secret_name,
                    rotation: plan.ring.rotation,
                }
            }
        }
    };
    let status = desired_status(
        observed.client_certificate.as_ref(),
        endpoint.status.as_ref(),
        endpoint.metadata.generation,
        &outcome,
        observed.now,
    );
    let status_changed = endpoint.status.as_ref() != Some(&status);
    let mut event = event_for(&outcome, change.as_ref(), status_changed, observed.grace);
    let mut requeue = requeue_after(&outcome, next_expiry, observed.now);
    if let (Some(certificate), Outcome::Ready { .. }) = (&observed.client_certificate, &outcome) {
        // The named Secret is not watched (it is anyone's): look at it again every so often.
        requeue = Some(requeue.map_or(CLIENT_CERTIFICATE_RECHECK, |r| r.min(CLIENT_CERTIFICATE_RECHECK)));
        if let Err(problem) = certificate
            && event.is_none()
            && status_changed
        {
            event = Some(EventNote {
                warning: true,
                reason: problem.reason(),
                action: "CheckClientCertificate",
                note: format!("{problem}; nothing is delivered until it is fixed"),
            });
        }
    }
    Ok(Decision {
        secret,
        event,
        requeue,
        status,
        status_changed,
    })
}

/// Whose the Secret of an endpoint's signing-Secret name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretClaim {
    /// No such Secret.
    Absent,
    /// Controlled by this endpoint (owner reference with its uid and `controller: true`).
    Ours,
    /// Made by someone else: another object controls it, or nothing does.
    Taken,
}

/// Classifies the stored Secret for the endpoint with uid `endpoint_uid`.
pub fn secret_claim(existing: Option<&Secret>, endpoint_uid: &str) -> SecretClaim {
    let Some(secret) = existing else {
        return SecretClaim::Absent;
    };
    let controlled_by_us = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == endpoint_uid);
    if controlled_by_us {
        SecretClaim::Ours
    } else {
        SecretClaim::Taken
    }
}

/// How long to wait before looking again at an endpoint whose Secret name is taken. The signing
/// Secret watch sees only Secrets with our labels, so a squatter's Secret going away may not
/// trigger a reconcile by itself.
pub const SECRET_NAME_TAKEN_RECHECK: Duration = Duration::from_secs(60);

/// The Event that goes with a reconcile's outcome, if any.
///
/// Refusals (invalid spec, organization not allowed, Secret name taken) are reported once, when
/// they first show in the status (`status_changed`), not on every resync. Key ring changes are
/// always reported.
pub fn event_for(
    outcome: &Outcome,
    change: Option<&KeyRingChange>,
    status_changed: bool,
    grace: Duration,
) -> Option<EventNote> {
    let warning = |reason, action, note| {
        Some(EventNote {
            warning: true,
            reason,
            action,
            note,
        })
    };
    match outcome {
        Outcome::InvalidSpec(reason) if status_changed => warning("InvalidSpec", "Validate", reason.clone()),
        Outcome::OrganizationNotAllowed {
            namespace,
            organization_id,
        } if status_changed => warning(
            "OrganizationNotAllowed",
            "Validate",
            organization_not_allowed_message(namespace, organization_id),
        ),
        Outcome::SecretNameTaken { secret_name } if status_changed => warning(
            "SecretNameTaken",
            "CreateSecret",
            secret_name_taken_message(secret_name),
        ),
        Outcome::InvalidSpec(_) | Outcome::OrganizationNotAllowed { .. } | Outcome::SecretNameTaken { .. } => None,
        Outcome::Ready { secret_name, rotation } => match change? {
            KeyRingChange::Unchanged | KeyRingChange::Pruned => None,
            KeyRingChange::Created => Some(EventNote {
                warning: false,
                reason: "SecretCreated",
                action: "CreateSecret",
                note: format!("created signing secret in Secret {secret_name}"),
            }),
            KeyRingChange::Rotated => {
                let grace = jiff::SignedDuration::try_from(grace).unwrap_or(jiff::SignedDuration::MAX);
                Some(EventNote {
                    warning: false,
                    reason: "SecretRotated",
                    action: "RotateSecret",
                    note: format!(
                        "rotated signing secret (rotation {rotation}); the previous secret co-signs for {grace:#}"
                    ),
                })
            }
            KeyRingChange::Repaired { reason } => warning(
                "SecretRepaired",
                "RepairSecret",
                format!("generated a new signing secret in Secret {secret_name}: {reason}"),
            ),
        },
    }
}

/// When to reconcile again without a change: when the oldest co-signing secret expires (to prune
/// it), or after [`SECRET_NAME_TAKEN_RECHECK`] while the Secret name is taken. `None` waits for a
/// change of the endpoint or its Secret.
pub fn requeue_after(outcome: &Outcome, next_expiry: Option<Timestamp>, now: Timestamp) -> Option<Duration> {
    match outcome {
        Outcome::SecretNameTaken { .. } => Some(SECRET_NAME_TAKEN_RECHECK),
        Outcome::Ready { .. } => {
            next_expiry.map(|expiry| now.duration_until(expiry).unsigned_abs() + Duration::from_secs(1))
        }
        Outcome::InvalidSpec(_) | Outcome::OrganizationNotAllowed { .. } => None,
    }
}

fn organization_not_allowed_message(namespace: &str, organization_id: &str) -> String {
    format!(
        "namespace {namespace} may not serve organization {organization_id}: label the namespace \
         {ORGANIZATION_LABEL}={organization_id} or create the endpoint in the operator's home namespace"
    )
}

fn secret_name_taken_message(secret_name: &str) -> String {
    format!(
        "Secret {secret_name} exists and is not owned by this endpoint; it is neither read nor changed. \
         Delete it (or rename the endpoint) and the controller creates the signing secret"
    )
}

/// How often an endpoint that names a client certificate is looked at again: the Secret it names
/// is not watched (any Secret of the namespace may be named), so a fixed or broken certificate
/// shows in the condition within this time. The dispatcher does not wait for it: it watches
/// `kubernetes.io/tls` Secrets itself and sends nothing without a usable certificate.
pub const CLIENT_CERTIFICATE_RECHECK: Duration = Duration::from_secs(30);

/// The status the controller wants, given the current one.
///
/// Fields other components own (health, delivery summary, their conditions) are carried over.
/// Conditions keep their `lastTransitionTime` while their status stays the same, and `updatedAt`
/// only moves when something else changed, so an unchanged status compares equal to the stored one
/// and is not written. An endpoint whose client certificate cannot be used (`client_certificate`)
/// is not Ready, and says why in `ClientCertificateReady`.
pub fn desired_status(
    client_certificate: Option<&Result<(), Problem>>,
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
        Outcome::OrganizationNotAllowed {
            namespace,
            organization_id,
        } => {
            let message = organization_not_allowed_message(namespace, organization_id);
            (
                owned("False", "OrganizationNotAllowed", message.clone()),
                owned("False", "OrganizationNotAllowed", message),
            )
        }
        Outcome::SecretNameTaken { secret_name } => {
            let message = secret_name_taken_message(secret_name);
            (
                owned("False", "SecretNameTaken", message.clone()),
                owned("False", "SecretNameTaken", message),
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
    let mut ready = ready;
    match (client_certificate, outcome) {
        (None, _) => status
            .conditions
            .retain(|c| c.type_ != CONDITION_CLIENT_CERTIFICATE_READY),
        // Refused before the certificate matters: its condition stays as it was.
        (Some(_), outcome) if !matches!(outcome, Outcome::Ready { .. }) => {}
        (Some(Ok(())), _) => set_condition(
            &mut status.conditions,
            CONDITION_CLIENT_CERTIFICATE_READY,
            owned(
                "True",
                "ClientCertificateAvailable",
                "the client certificate is presented to the receiver".to_string(),
            ),
            generation,
            now,
        ),
        (Some(Err(problem)), _) => {
            let message = format!("{problem}; nothing is delivered until it is fixed");
            ready = owned("False", problem.reason(), message.clone());
            set_condition(
                &mut status.conditions,
                CONDITION_CLIENT_CERTIFICATE_READY,
                owned("False", problem.reason(), message),
                generation,
                now,
            );
        }
    }
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
    use crate::signing::{PreviousSecret, StoredKeyRing};

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
        let first = desired_status(None, None, Some(1), &ready, t0);
        assert_eq!(first.observed_generation, Some(1));
        assert_eq!(first.secret_name.as_deref(), Some("ep1-signing"));
        assert_eq!(first.updated_at, Some(Time(t0)));
        let ready_cond = first.conditions.iter().find(|c| c.type_ == CONDITION_READY).unwrap();
        assert_eq!(
            (ready_cond.status.as_str(), ready_cond.reason.as_str()),
            ("True", "Reconciled")
        );
        // Same inputs later: identical status, so no write.
        assert_eq!(desired_status(None, Some(&first), Some(1), &ready, t1), first);
    }

    #[test]
    fn status_moves_on_generation_and_rotation() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let t1 = Timestamp::from_second(2000).unwrap();
        let first = desired_status(
            None,
            None,
            Some(1),
            &Outcome::Ready {
                secret_name: "s".into(),
                rotation: 0,
            },
            t0,
        );
        let second = desired_status(
            None,
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
            None,
            Some(1),
            &Outcome::Ready {
                secret_name: "s".into(),
                rotation: 0,
            },
            t0,
        );
        let invalid = desired_status(
            None,
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
            None,
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

    fn endpoint(uid: &str, status: Option<WebhookEndpointStatus>) -> WebhookEndpoint {
        let mut ep = WebhookEndpoint::new(
            "ep1",
            crate::resources::WebhookEndpointSpec {
                organization_id: "org_1".into(),
                url: "https://hooks.example.com/in".into(),
                description: String::new(),
                event_types: vec![],
                active: true,
                secret_rotation: 0,
                max_attempts: None,
                headers: Default::default(),
                rate_limit: None,
                signature_scheme: Default::default(),
                ordering: Default::default(),
                filter: None,
                client_certificate: None,
            },
        );
        ep.metadata.namespace = Some("ns".into());
        ep.metadata.uid = Some(uid.into());
        ep.metadata.generation = Some(1);
        ep.status = status;
        ep
    }

    fn observe<'a>(endpoint: &'a WebhookEndpoint, secret: Option<&'a Secret>, allowed: bool) -> Observed<'a> {
        Observed {
            endpoint,
            secret,
            organization_allowed: allowed,
            url_policy: UrlPolicy { allow_http: false },
            grace: Duration::from_secs(3600),
            now: Timestamp::from_second(1000).unwrap(),
            client_certificate: None,
        }
    }

    fn condition(status: &WebhookEndpointStatus, type_: &str) -> (String, String) {
        let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn the_first_reconcile_creates_a_secret_and_says_so() {
        let ep = endpoint("uid-1", None);
        let decision = decide(&observe(&ep, None, true), SigningSecret::generate_with).unwrap();
        let secret = decision.secret.expect("a Secret to apply");
        assert_eq!(secret.metadata.owner_references.unwrap()[0].uid, "uid-1");
        assert!(decision.status_changed);
        assert_eq!(
            condition(&decision.status, CONDITION_READY),
            ("True".into(), "Reconciled".into())
        );
        let event = decision.event.unwrap();
        assert_eq!((event.warning, event.reason), (false, "SecretCreated"));
        assert_eq!(decision.requeue, None, "nothing expires: wait for a change");
    }

    #[test]
    fn a_settled_endpoint_writes_nothing_and_publishes_nothing() {
        let ep = endpoint("uid-1", None);
        let first = decide(&observe(&ep, None, true), SigningSecret::generate_with).unwrap();
        let stored = first.secret.unwrap();
        let ep = endpoint("uid-1", Some(first.status));
        let again = decide(&observe(&ep, Some(&stored), true), |_| unreachable!("no new secret")).unwrap();
        assert!(again.secret.is_none());
        assert!(!again.status_changed);
        assert_eq!(again.event, None);
    }

    #[test]
    fn a_secret_of_another_owner_or_of_none_is_taken_and_never_used() {
        let other = endpoint("uid-other", None);
        let theirs = decide(&observe(&other, None, true), SigningSecret::generate_with)
            .unwrap()
            .secret
            .unwrap();
        let mut unowned = theirs.clone();
        unowned.metadata.owner_references = None;
        let ep = endpoint("uid-1", None);
        assert_eq!(secret_claim(None, "uid-1"), SecretClaim::Absent);
        for planted in [&theirs, &unowned] {
            assert_eq!(secret_claim(Some(planted), "uid-1"), SecretClaim::Taken);
            let decision = decide(&observe(&ep, Some(planted), true), |_| {
                unreachable!("nothing generated")
            })
            .unwrap();
            assert!(decision.secret.is_none(), "the taken Secret is not written");
            assert_eq!(decision.status.secret_name, None);
            assert_eq!(
                condition(&decision.status, CONDITION_READY),
                ("False".into(), "SecretNameTaken".into())
            );
            assert_eq!(
                condition(&decision.status, CONDITION_SECRET_READY),
                ("False".into(), "SecretNameTaken".into())
            );
            assert_eq!(
                decision.event.as_ref().map(|e| (e.warning, e.reason)),
                Some((true, "SecretNameTaken"))
            );
            assert_eq!(decision.requeue, Some(SECRET_NAME_TAKEN_RECHECK));
        }
    }

    #[test]
    fn an_unbound_namespace_gets_no_secret_and_one_event() {
        let ep = endpoint("uid-1", None);
        let decision = decide(&observe(&ep, None, false), |_| unreachable!("nothing generated")).unwrap();
        assert!(decision.secret.is_none());
        assert_eq!(
            condition(&decision.status, CONDITION_READY),
            ("False".into(), "OrganizationNotAllowed".into())
        );
        let event = decision.event.clone().unwrap();
        assert_eq!((event.warning, event.reason), (true, "OrganizationNotAllowed"));
        assert!(
            event.note.contains(ORGANIZATION_LABEL),
            "the note says how to fix it: {}",
            event.note
        );
        // Seen again, unchanged: no second Event.
        let ep = endpoint("uid-1", Some(decision.status));
        let again = decide(&observe(&ep, None, false), |_| unreachable!()).unwrap();
        assert!(!again.status_changed);
        assert_eq!(again.event, None);
    }

    #[test]
    fn an_invalid_spec_is_refused_before_anything_else() {
        let mut ep = endpoint("uid-1", None);
        ep.spec.url = "http://hooks.example.com/in".into();
        let decision = decide(&observe(&ep, None, false), |_| unreachable!()).unwrap();
        assert!(decision.secret.is_none());
        assert_eq!(condition(&decision.status, CONDITION_READY).1, "InvalidSpec");
        assert_eq!(decision.event.map(|e| e.reason), Some("InvalidSpec"));
        assert_eq!(decision.requeue, None);
    }

    #[test]
    fn malformed_watch_data_is_an_error_not_a_panic() {
        let mut ep = endpoint("uid-1", None);
        ep.metadata.uid = None;
        assert_eq!(
            decide(&observe(&ep, None, true), SigningSecret::generate_with).unwrap_err(),
            "uid"
        );
    }

    #[test]
    fn events_follow_key_ring_changes() {
        let ready = Outcome::Ready {
            secret_name: "s".into(),
            rotation: 3,
        };
        let grace = Duration::from_secs(90);
        assert_eq!(event_for(&ready, Some(&KeyRingChange::Unchanged), true, grace), None);
        assert_eq!(event_for(&ready, Some(&KeyRingChange::Pruned), true, grace), None);
        let rotated = event_for(&ready, Some(&KeyRingChange::Rotated), false, grace).unwrap();
        assert_eq!(rotated.reason, "SecretRotated");
        assert!(
            rotated.note.contains("rotation 3") && rotated.note.contains("1m 30s"),
            "{}",
            rotated.note
        );
        let repaired = KeyRingChange::Repaired {
            reason: "the signing Secret was deleted".into(),
        };
        let event = event_for(&ready, Some(&repaired), false, grace).unwrap();
        assert!(event.warning && event.note.ends_with("the signing Secret was deleted"));
    }

    #[test]
    fn requeue_waits_for_the_oldest_co_signing_secret() {
        let now = Timestamp::from_second(1000).unwrap();
        let ready = Outcome::Ready {
            secret_name: "s".into(),
            rotation: 1,
        };
        let expiry = Timestamp::from_second(1060).unwrap();
        assert_eq!(requeue_after(&ready, Some(expiry), now), Some(Duration::from_secs(61)));
        assert_eq!(requeue_after(&ready, None, now), None);
        assert_eq!(
            requeue_after(&Outcome::InvalidSpec("x".into()), Some(expiry), now),
            None
        );
    }

    #[test]
    fn an_unusable_client_certificate_makes_the_endpoint_not_ready_and_says_why() {
        let ep = endpoint("uid-1", None);
        let problem = Problem::NotTls {
            name: "client-tls".into(),
            found: "Opaque".into(),
        };
        let observed = Observed {
            client_certificate: Some(Err(problem.clone())),
            ..observe(&ep, None, true)
        };
        let decision = decide(&observed, SigningSecret::generate_with).unwrap();
        // The signing secret is still made: only the certificate is wrong.
        assert!(decision.secret.is_some());
        let condition = |status: &WebhookEndpointStatus, type_: &str| {
            status.conditions.iter().find(|c| c.type_ == type_).cloned().unwrap()
        };
        let ready = condition(&decision.status, CONDITION_READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ClientCertificateNotTLS")
        );
        assert!(ready.message.contains("not kubernetes.io/tls"), "{}", ready.message);
        let certificate = condition(&decision.status, CONDITION_CLIENT_CERTIFICATE_READY);
        assert_eq!(certificate.status, "False");
        assert_eq!(condition(&decision.status, CONDITION_SECRET_READY).status, "True");
        assert_eq!(decision.requeue, Some(CLIENT_CERTIFICATE_RECHECK));

        // Fixed: Ready again, the condition says the certificate is presented.
        let mut fixed = ep.clone();
        fixed.status = Some(decision.status.clone());
        let observed = Observed {
            client_certificate: Some(Ok(())),
            ..observe(&fixed, None, true)
        };
        let decision = decide(&observed, SigningSecret::generate_with).unwrap();
        assert_eq!(condition(&decision.status, CONDITION_READY).status, "True");
        assert_eq!(
            condition(&decision.status, CONDITION_CLIENT_CERTIFICATE_READY).status,
            "True"
        );

        // No certificate named any more: the condition goes.
        let mut plain = fixed.clone();
        plain.status = Some(decision.status);
        let decision = decide(&observe(&plain, None, true), SigningSecret::generate_with).unwrap();
        assert!(
            decision
                .status
                .conditions
                .iter()
                .all(|c| c.type_ != CONDITION_CLIENT_CERTIFICATE_READY)
        );
    }
}
