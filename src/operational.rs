//! Operational webhooks: the events the platform itself is sent about endpoints and deliveries
//! (issue 24, item 4), as pure parts only.
//!
//! What is here: the event types ([`OperationalEventType`]), which observed change of an endpoint
//! maps to which of them ([`endpoint_change`]), why an endpoint was disabled ([`DisableCause`]:
//! paused by a user, or disabled by the health rule with its text, told apart by the
//! [`AUTO_DISABLED_ANNOTATION`] the dispatcher writes in the same patch that disables),
//! deterministic event and delivery ids derived from the change ([`event_id`], [`delivery_id`]),
//! the Standard Webhooks bodies ([`endpoint_event_body`], [`delivery_exhausted_body`]), and the
//! signing secret file's format ([`parse_secret_file`]).
//!
//! Ids are derived, never drawn: the same change seen twice (by a new controller leader, after a
//! restart, by a second replica) gives the same event id and the same delivery id, so the delivery
//! log can refuse the second copy. Bodies carry REST ids only (the organization and endpoint ids
//! the REST API shows), never a secret, a URL or a payload.
//!
//! No IO, no clock: every time and identity is passed in.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::resources::{WebhookEndpoint, WebhookEndpointSpec};
use crate::signing::{InvalidSecret, KeyRing, SignatureScheme, SigningSecret};
use crate::work::{SubmitError, WorkHandle};

/// The operational event types, as the `type` of the body says them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperationalEventType {
    /// An endpoint was created.
    EndpointCreated,
    /// An endpoint's spec changed, and not (only) its `active` flag.
    EndpointUpdated,
    /// An endpoint was deleted.
    EndpointDeleted,
    /// An endpoint stopped receiving deliveries: paused by a user or disabled by the health rule.
    EndpointDisabled,
    /// An inactive endpoint was made active again.
    EndpointEnabled,
    /// A delivery failed its last attempt.
    DeliveryExhausted,
}

impl OperationalEventType {
    /// Every type, in the order the README lists them.
    pub const ALL: [OperationalEventType; 6] = [
        Self::EndpointCreated,
        Self::EndpointUpdated,
        Self::EndpointDeleted,
        Self::EndpointDisabled,
        Self::EndpointEnabled,
        Self::DeliveryExhausted,
    ];

    /// The event type as sent (`endpoint.created`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EndpointCreated => "endpoint.created",
            Self::EndpointUpdated => "endpoint.updated",
            Self::EndpointDeleted => "endpoint.deleted",
            Self::EndpointDisabled => "endpoint.disabled",
            Self::EndpointEnabled => "endpoint.enabled",
            Self::DeliveryExhausted => "delivery.exhausted",
        }
    }
}

/// What was last announced of an endpoint (`status.announced`, written with the rest of the
/// controller's status, so a new leader knows it).
pub use crate::resources::Announced;

/// What was announced of an endpoint with this status, at the latest: its `announced`, else (a
/// status written before operational webhooks existed) its observed generation as it is now, so
/// that an upgrade announces nothing of the endpoints that exist; `None` for a new endpoint.
pub fn announced_of(status: Option<&crate::resources::WebhookEndpointStatus>, active: bool) -> Option<Announced> {
    let status = status?;
    status.announced.or_else(|| {
        status
            .observed_generation
            .map(|generation| Announced { generation, active })
    })
}

/// An endpoint as the controller observes it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Its `metadata.generation`.
    pub generation: i64,
    /// Its `spec.active`.
    pub active: bool,
    /// Whether it is being deleted (`metadata.deletionTimestamp` set) or gone.
    pub deleted: bool,
}

/// Which event, if any, the change from what was `announced` to what is `observed` makes.
///
/// One event per observed change: several changes between two observations (edits made while no
/// controller led) make one event, of the type the net change says. A change of `active` is
/// `endpoint.disabled` or `endpoint.enabled` even when other fields changed with it.
pub fn endpoint_change(announced: Option<Announced>, observed: Observed) -> Option<OperationalEventType> {
    use OperationalEventType::*;
    if observed.deleted {
        return Some(EndpointDeleted);
    }
    let Some(announced) = announced else {
        return Some(EndpointCreated);
    };
    if observed.generation <= announced.generation {
        return None;
    }
    Some(match (announced.active, observed.active) {
        (true, false) => EndpointDisabled,
        (false, true) => EndpointEnabled,
        _ => EndpointUpdated,
    })
}

/// Annotation the dispatcher sets on an endpoint in the same patch that disables it (no extra
/// write): `{"generation": G, "reason": "..."}`, the generation that patch makes and the health
/// rule's text.
pub const AUTO_DISABLED_ANNOTATION: &str = "webhooks.capydb.io/auto-disabled";

/// The value of [`AUTO_DISABLED_ANNOTATION`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoDisabled {
    /// The generation of the endpoint once disabled.
    pub generation: i64,
    /// Why (the health rule's text).
    pub reason: String,
}

impl AutoDisabled {
    /// The annotation's value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).expect("plain fields serialize")
    }
}

/// Why an endpoint was disabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisableCause {
    /// A user set it inactive (REST pause, `spec.active: false`).
    Manual,
    /// The dispatcher disabled it: the health rule, with its text.
    AutoDisabled(String),
}

/// Why the endpoint disabled at `generation` was disabled: by the dispatcher if its annotation
/// names that very generation, by a user otherwise (an annotation left from an earlier automatic
/// disable, or one that is not ours to read, says nothing of this one).
pub fn disable_cause(annotation: Option<&str>, generation: i64) -> DisableCause {
    annotation
        .and_then(|a| serde_json::from_str::<AutoDisabled>(a).ok())
        .filter(|a| a.generation == generation)
        .map_or(DisableCause::Manual, |a| DisableCause::AutoDisabled(a.reason))
}

/// 128 bits of a hash of `domain` and `parts`, as an id of [`crate::ids`]' shape.
fn id_of(domain: &str, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"capy-webhooks/operational\0");
    hash.update(domain.as_bytes());
    for part in parts {
        hash.update(b"\0");
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    crate::ids::from_bits(u128::from_be_bytes(bytes))
}

/// What an operational event is about: the change it was derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A change of an endpoint: its uid (a re-created endpoint of the same name is another) and
    /// the generation observed (0 for a deletion, which has one event per uid).
    Endpoint {
        /// `metadata.uid`.
        uid: &'a str,
        /// `metadata.generation` observed.
        generation: i64,
    },
    /// A delivery that failed its last attempt (its id is unique and never reused).
    Delivery {
        /// The delivery id (`msg_...`).
        delivery_id: &'a str,
    },
}

/// The event id of an operational event: `evt_` + 26 characters derived from its type and
/// subject, the same however often the change is seen.
pub fn event_id(event_type: OperationalEventType, subject: Subject<'_>) -> String {
    format!("evt_{}", subject_id("event", event_type, subject))
}

/// The id of the one delivery of an operational event to the platform's receiver (its
/// `webhook-id`): `msg_` + 26 characters derived like [`event_id`], so a replayed change names a
/// delivery the log already holds.
pub fn delivery_id(event_type: OperationalEventType, subject: Subject<'_>) -> String {
    format!("msg_{}", subject_id("delivery", event_type, subject))
}

fn subject_id(domain: &str, event_type: OperationalEventType, subject: Subject<'_>) -> String {
    match subject {
        Subject::Endpoint { uid, generation } => {
            // A deletion has one event per endpoint, whatever generation it was last seen at.
            let generation = if event_type == OperationalEventType::EndpointDeleted {
                0
            } else {
                generation
            };
            id_of(domain, &[event_type.as_str(), "endpoint", uid, &generation.to_string()])
        }
        Subject::Delivery { delivery_id } => id_of(domain, &[event_type.as_str(), "delivery", delivery_id]),
    }
}

/// The Standard Webhooks body `{"type", "timestamp", "data"}`.
fn body(event_type: OperationalEventType, at: Timestamp, data: Value) -> Value {
    json!({
        "type": event_type.as_str(),
        "timestamp": at.to_string(),
        "data": data,
    })
}

/// The body of an `endpoint.*` event. `cause` is read for `endpoint.disabled` only.
pub fn endpoint_event_body(
    event_type: OperationalEventType,
    at: Timestamp,
    organization_id: &str,
    endpoint_id: &str,
    cause: Option<&DisableCause>,
) -> Value {
    let mut data = json!({
        "organization_id": organization_id,
        "endpoint_id": endpoint_id,
    });
    if event_type == OperationalEventType::EndpointDisabled {
        let (reason, detail) = match cause.unwrap_or(&DisableCause::Manual) {
            DisableCause::Manual => ("manual", None),
            DisableCause::AutoDisabled(text) => ("auto_disabled", Some(text.as_str())),
        };
        data["reason"] = json!(reason);
        data["reason_detail"] = json!(detail);
    }
    body(event_type, at, data)
}

/// The operational event an endpoint as observed now makes, given what was announced of it
/// (`None`: nothing to tell). `at` is the event's timestamp.
pub fn endpoint_event(
    endpoint: &WebhookEndpoint,
    announced: Option<Announced>,
    at: Timestamp,
) -> Option<OperationalEvent> {
    let generation = endpoint.metadata.generation.unwrap_or(0);
    let observed = Observed {
        generation,
        active: endpoint.spec.active,
        deleted: false,
    };
    let event_type = endpoint_change(announced, observed)?;
    Some(told(endpoint, event_type, generation, at))
}

/// The `endpoint.deleted` event of an endpoint that is gone.
pub fn deleted_event(endpoint: &WebhookEndpoint, at: Timestamp) -> OperationalEvent {
    told(endpoint, OperationalEventType::EndpointDeleted, 0, at)
}

fn told(
    endpoint: &WebhookEndpoint,
    event_type: OperationalEventType,
    generation: i64,
    at: Timestamp,
) -> OperationalEvent {
    let cause = (event_type == OperationalEventType::EndpointDisabled).then(|| {
        let annotation = endpoint
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(AUTO_DISABLED_ANNOTATION));
        disable_cause(annotation.map(String::as_str), generation)
    });
    let name = endpoint.metadata.name.as_deref().unwrap_or_default();
    let uid = endpoint.metadata.uid.as_deref().unwrap_or_default();
    OperationalEvent::new(
        event_type,
        Subject::Endpoint { uid, generation },
        endpoint_event_body(event_type, at, &endpoint.spec.organization_id, name, cause.as_ref()),
    )
}

/// What a `delivery.exhausted` event tells of the delivery: ids, attempts and how the last
/// attempt failed. Never the payload, the receiver's URL or the error's text (which may name it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted<'a> {
    /// Organization of the endpoint.
    pub organization_id: &'a str,
    /// The endpoint's REST id.
    pub endpoint_id: &'a str,
    /// The event delivered.
    pub event_id: &'a str,
    /// Its type.
    pub event_type: &'a str,
    /// The delivery.
    pub delivery_id: &'a str,
    /// Attempts made.
    pub attempts: u32,
    /// The class of the last failure: the `result` label of the attempts metric
    /// (`http_error`, `timeout`, `connect_error`, `refused`, `gone`).
    pub last_error_class: &'a str,
    /// The last attempt's HTTP status, when the receiver answered.
    pub last_status: Option<u16>,
}

/// The body of a `delivery.exhausted` event.
pub fn delivery_exhausted_body(at: Timestamp, exhausted: &Exhausted<'_>) -> Value {
    body(
        OperationalEventType::DeliveryExhausted,
        at,
        json!({
            "organization_id": exhausted.organization_id,
            "endpoint_id": exhausted.endpoint_id,
            "event_id": exhausted.event_id,
            "event_type": exhausted.event_type,
            "delivery_id": exhausted.delivery_id,
            "attempts": exhausted.attempts,
            "last_error_class": exhausted.last_error_class,
            "last_status": exhausted.last_status,
        }),
    )
}

/// Why the operational secret file cannot be used. Never holds the file's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretFileError {
    /// Not a valid secret.
    #[error("the operational webhook secret file does not hold a valid secret: {0}")]
    Invalid(#[from] InvalidSecret),
    /// A `whsk_` (ed25519) key: operational webhooks are signed `v1`, HMAC-SHA256, like the
    /// platform's receivers verify by default.
    #[error("the operational webhook secret must be a whsec_ (HMAC-SHA256) secret")]
    NotHmac,
}

/// The signing secret from the content of `--operational-webhook-secret-file` (surrounding
/// whitespace, as a mounted Secret or `echo` leaves it, is ignored).
pub fn parse_secret_file(content: &str) -> Result<SigningSecret, SecretFileError> {
    let secret = SigningSecret::parse(content.trim())?;
    if secret.scheme() != SignatureScheme::HmacSha256 {
        return Err(SecretFileError::NotHmac);
    }
    Ok(secret)
}

/// The organization whose delivery log holds the operational deliveries (in the operator's home
/// namespace). Its shard's owner sends them, like any organization's: exactly one replica at a
/// time. Not an organization a customer has (REST never lists it).
pub const OPERATIONAL_ORGANIZATION: &str = "capy-webhooks.operational";

/// The name of the platform's endpoint in that log: not a valid object name, so no
/// `WebhookEndpoint` can ever share it.
pub const OPERATIONAL_ENDPOINT: &str = "_operational";

/// Where operational events go: `--operational-webhook-url` and the secret of
/// `--operational-webhook-secret-file`.
#[derive(Clone)]
pub struct OperationalTarget {
    /// The platform's receiver.
    pub url: String,
    /// Signs every operational delivery (`v1`).
    pub secret: SigningSecret,
}

impl std::fmt::Debug for OperationalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperationalTarget")
            .field("url", &crate::traces::shown(&self.url))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl OperationalTarget {
    /// The platform's endpoint as the dispatcher handles it: an endpoint that is no object (no
    /// uid, no status, never disabled), in `namespace`, always active, with the default retry
    /// schedule.
    pub fn endpoint(&self, namespace: &str) -> WebhookEndpoint {
        let mut endpoint = WebhookEndpoint::new(
            OPERATIONAL_ENDPOINT,
            WebhookEndpointSpec {
                organization_id: OPERATIONAL_ORGANIZATION.into(),
                url: self.url.clone(),
                description: String::new(),
                event_types: Vec::new(),
                active: true,
                secret_rotation: 0,
                max_attempts: None,
                headers: Default::default(),
                rate_limit: None,
                signature_scheme: SignatureScheme::HmacSha256,
                ordering: Default::default(),
                filter: None,
                client_certificate: None,
            },
        );
        endpoint.metadata.namespace = Some(namespace.to_string());
        endpoint
    }

    /// The key ring that signs operational deliveries: the one secret.
    pub fn key_ring(&self) -> KeyRing {
        KeyRing {
            current: self.secret.clone(),
            rotation: 0,
            previous: Vec::new(),
        }
    }
}

/// Hands operational events to the replica that owns the operational log, from whichever
/// component tells them (the controller, the dispatcher): the process's work handle, once it
/// exists (it wraps the dispatcher, which starts after the controller).
#[derive(Clone, Default)]
pub struct Emitter(Arc<OnceLock<WorkHandle>>);

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Emitter")
    }
}

impl Emitter {
    /// Events go through `work` from now on (the first call counts).
    pub fn connect(&self, work: WorkHandle) {
        let _ = self.0.set(work);
    }

    /// Stores `event` in the operational log (or finds it there already); returns once durable.
    pub async fn store(&self, event: OperationalEvent) -> Result<(), SubmitError> {
        match self.0.get() {
            Some(work) => work.operational(event).await,
            None => Err(SubmitError::Unavailable(
                "operational events cannot be stored before the dispatcher runs".into(),
            )),
        }
    }

    /// [`Self::store`], tried again with backoff until it is stored or `stopping` says so. The
    /// event's ids are derived from its change: a try again never makes a second delivery.
    pub async fn store_retrying(&self, event: OperationalEvent, stopping: impl Fn() -> bool) {
        let mut attempt = 0;
        loop {
            let Err(e) = self.store(event.clone()).await else {
                return;
            };
            attempt += 1;
            if stopping() {
                tracing::warn!(event = %event.event_id, event_type = %event.event_type, error = %e,
                    "shutting down: the operational event was not stored");
                return;
            }
            tracing::debug!(event = %event.event_id, error = %e, attempt, "operational event not stored yet; retrying");
            tokio::time::sleep(crate::backoff::doubling(
                attempt,
                Duration::from_millis(200),
                Duration::from_secs(10),
            ))
            .await;
        }
    }
}

/// One operational event, ready for the log: its derived ids and its body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationalEvent {
    /// The event type (`endpoint.created`, ...).
    pub event_type: String,
    /// [`event_id`] of the change.
    pub event_id: String,
    /// [`delivery_id`] of the change.
    pub delivery_id: String,
    /// The Standard Webhooks body.
    pub body: Value,
}

impl OperationalEvent {
    /// The event of `event_type` about `subject`, with its `body`.
    pub fn new(event_type: OperationalEventType, subject: Subject<'_>, body: Value) -> Self {
        Self {
            event_type: event_type.as_str().to_string(),
            event_id: event_id(event_type, subject),
            delivery_id: delivery_id(event_type, subject),
            body,
        }
    }

    /// The `delivery.exhausted` event of a delivery, told at `at`.
    pub fn exhausted(at: Timestamp, exhausted: &Exhausted<'_>) -> Self {
        Self::new(
            OperationalEventType::DeliveryExhausted,
            Subject::Delivery {
                delivery_id: exhausted.delivery_id,
            },
            delivery_exhausted_body(at, exhausted),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OperationalEventType::*;

    fn seen(generation: i64, active: bool) -> Observed {
        Observed {
            generation,
            active,
            deleted: false,
        }
    }

    fn announced(generation: i64, active: bool) -> Option<Announced> {
        Some(Announced { generation, active })
    }

    #[test]
    fn each_change_maps_to_one_type() {
        assert_eq!(endpoint_change(None, seen(1, true)), Some(EndpointCreated));
        // Created inactive is still created.
        assert_eq!(endpoint_change(None, seen(1, false)), Some(EndpointCreated));
        assert_eq!(endpoint_change(announced(1, true), seen(1, true)), None);
        // A status-only change (same generation) or an older view announces nothing.
        assert_eq!(endpoint_change(announced(3, true), seen(2, false)), None);
        assert_eq!(
            endpoint_change(announced(1, true), seen(2, true)),
            Some(EndpointUpdated)
        );
        assert_eq!(
            endpoint_change(announced(1, false), seen(2, false)),
            Some(EndpointUpdated)
        );
        assert_eq!(
            endpoint_change(announced(1, true), seen(2, false)),
            Some(EndpointDisabled)
        );
        assert_eq!(
            endpoint_change(announced(2, false), seen(5, true)),
            Some(EndpointEnabled)
        );
        let gone = Observed {
            generation: 4,
            active: true,
            deleted: true,
        };
        assert_eq!(endpoint_change(announced(4, true), gone), Some(EndpointDeleted));
        assert_eq!(endpoint_change(None, gone), Some(EndpointDeleted));
    }

    #[test]
    fn an_upgrade_announces_nothing_of_the_endpoints_that_exist() {
        use crate::resources::WebhookEndpointStatus;
        assert_eq!(announced_of(None, true), None, "a new endpoint");
        let before = WebhookEndpointStatus {
            observed_generation: Some(3),
            ..Default::default()
        };
        assert_eq!(announced_of(Some(&before), false), announced(3, false));
        let after = WebhookEndpointStatus {
            observed_generation: Some(3),
            announced: announced(2, true),
            ..Default::default()
        };
        assert_eq!(announced_of(Some(&after), false), announced(2, true));
    }

    #[test]
    fn an_endpoint_event_names_the_endpoint_by_its_rest_ids_and_its_change() {
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        let target = OperationalTarget {
            url: "https://user:pass@platform.example.com/hook".into(),
            secret: SigningSecret::generate(),
        };
        let mut endpoint = target.endpoint("ns");
        endpoint.metadata.name = Some("ep-1".into());
        endpoint.metadata.uid = Some("uid-1".into());
        endpoint.metadata.generation = Some(4);
        endpoint.spec.organization_id = "org_1".into();
        endpoint.spec.active = false;
        endpoint.metadata.annotations = Some(
            [(
                AUTO_DISABLED_ANNOTATION.to_string(),
                AutoDisabled {
                    generation: 4,
                    reason: "gone".into(),
                }
                .to_annotation(),
            )]
            .into(),
        );
        assert_eq!(endpoint_event(&endpoint, announced(4, true), at), None);
        let event = endpoint_event(&endpoint, announced(3, true), at).unwrap();
        assert_eq!(event.event_type, "endpoint.disabled");
        assert_eq!(
            event.event_id,
            event_id(
                EndpointDisabled,
                Subject::Endpoint {
                    uid: "uid-1",
                    generation: 4
                }
            )
        );
        assert_eq!(event.body["data"]["endpoint_id"], "ep-1");
        assert_eq!(event.body["data"]["reason"], "auto_disabled");
        let text = event.body.to_string();
        assert!(
            !text.contains("platform.example.com") && !text.contains("pass"),
            "{text}"
        );
        assert_eq!(deleted_event(&endpoint, at).event_type, "endpoint.deleted");
        // The target's Debug shows neither the secret nor the URL's credentials.
        let shown = format!("{target:?}");
        assert!(!shown.contains("whsec_") && !shown.contains("pass"), "{shown}");
    }

    #[test]
    fn the_disable_cause_is_automatic_only_for_the_generation_the_dispatcher_made() {
        let auto = AutoDisabled {
            generation: 7,
            reason: "every delivery failed for 5d".into(),
        }
        .to_annotation();
        assert_eq!(
            disable_cause(Some(&auto), 7),
            DisableCause::AutoDisabled("every delivery failed for 5d".into())
        );
        // Re-enabled and later paused by a user: the old annotation says nothing of it.
        assert_eq!(disable_cause(Some(&auto), 9), DisableCause::Manual);
        assert_eq!(disable_cause(None, 7), DisableCause::Manual);
        assert_eq!(disable_cause(Some("not json"), 7), DisableCause::Manual);
    }

    #[test]
    fn ids_are_derived_from_the_change_and_differ_between_changes() {
        let at = |generation| Subject::Endpoint {
            uid: "0b5c3d9e-uid",
            generation,
        };
        let id = event_id(EndpointUpdated, at(2));
        assert_eq!(id, event_id(EndpointUpdated, at(2)), "same change, same id");
        assert!(id.starts_with("evt_"));
        assert!(crate::ids::is_valid_id(&id["evt_".len()..]), "{id}");
        assert!(
            id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "a ConfigMap key: {id}"
        );
        let others = [
            event_id(EndpointUpdated, at(3)),
            event_id(EndpointDisabled, at(2)),
            event_id(
                EndpointUpdated,
                Subject::Endpoint {
                    uid: "another-uid",
                    generation: 2,
                },
            ),
            event_id(DeliveryExhausted, Subject::Delivery { delivery_id: "msg_1" }),
        ];
        for other in &others {
            assert_ne!(&id, other);
        }
        assert_ne!(
            event_id(DeliveryExhausted, Subject::Delivery { delivery_id: "msg_1" }),
            event_id(DeliveryExhausted, Subject::Delivery { delivery_id: "msg_2" })
        );
        // A deletion is one event per endpoint, whatever generation it was seen at.
        assert_eq!(event_id(EndpointDeleted, at(2)), event_id(EndpointDeleted, at(9)));
        // The delivery's id is derived too, and is not the event's.
        let delivery = delivery_id(EndpointUpdated, at(2));
        assert_eq!(delivery, delivery_id(EndpointUpdated, at(2)));
        assert!(delivery.starts_with("msg_"));
        assert_ne!(delivery[4..], id[4..]);
    }

    #[test]
    fn endpoint_bodies_have_the_standard_shape_and_rest_ids_only() {
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        let created = endpoint_event_body(EndpointCreated, at, "org_1", "ep_1", None);
        assert_eq!(
            created,
            json!({
                "type": "endpoint.created",
                "timestamp": "2023-11-14T22:13:20Z",
                "data": {"organization_id": "org_1", "endpoint_id": "ep_1"},
            })
        );
        let manual = endpoint_event_body(EndpointDisabled, at, "org_1", "ep_1", Some(&DisableCause::Manual));
        assert_eq!(manual["data"]["reason"], "manual");
        assert_eq!(manual["data"]["reason_detail"], Value::Null);
        let auto = endpoint_event_body(
            EndpointDisabled,
            at,
            "org_1",
            "ep_1",
            Some(&DisableCause::AutoDisabled("failing for 5d".into())),
        );
        assert_eq!(auto["data"]["reason"], "auto_disabled");
        assert_eq!(auto["data"]["reason_detail"], "failing for 5d");
        // Only a disable says why.
        let enabled = endpoint_event_body(EndpointEnabled, at, "org_1", "ep_1", Some(&DisableCause::Manual));
        assert!(enabled["data"].get("reason").is_none());
    }

    #[test]
    fn an_exhausted_delivery_is_told_without_payload_url_or_error_text() {
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        let body = delivery_exhausted_body(
            at,
            &Exhausted {
                organization_id: "org_1",
                endpoint_id: "ep_1",
                event_id: "evt_1",
                event_type: "database.created",
                delivery_id: "msg_1",
                attempts: 3,
                last_error_class: "http_error",
                last_status: Some(500),
            },
        );
        assert_eq!(body["type"], "delivery.exhausted");
        let keys: Vec<&str> = body["data"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "attempts",
                "delivery_id",
                "endpoint_id",
                "event_id",
                "event_type",
                "last_error_class",
                "last_status",
                "organization_id"
            ]
        );
        assert_eq!(body["data"]["attempts"], 3);
        assert_eq!(body["data"]["last_status"], 500);
    }

    #[test]
    fn the_secret_file_holds_one_whsec_secret() {
        let secret = SigningSecret::generate();
        let parsed = parse_secret_file(&format!("{}\n", secret.expose())).unwrap();
        assert_eq!(parsed, secret);
        assert!(matches!(
            parse_secret_file("hunter2"),
            Err(SecretFileError::Invalid(InvalidSecret::MissingPrefix))
        ));
        let ed25519 = SigningSecret::generate_with(SignatureScheme::Ed25519);
        assert_eq!(parse_secret_file(ed25519.expose()), Err(SecretFileError::NotHmac));
        // The error never repeats the file's content.
        let err = parse_secret_file("whsec_not*base64").unwrap_err().to_string();
        assert!(!err.contains("not*base64"), "{err}");
    }

    #[test]
    fn every_type_has_a_distinct_dotted_name() {
        let names: std::collections::BTreeSet<_> = OperationalEventType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names.len(), OperationalEventType::ALL.len());
        for name in names {
            assert!(crate::validation::validate_event_type(name).is_ok(), "{name}");
        }
    }
}
