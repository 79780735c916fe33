//! REST ⇄ CR mapping: the documented JSON shapes and how they map onto `WebhookEndpoint`s.
//! Pure functions, tested without IO.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::delivery_log::{DeliveryRecord, DeliveryState, MAX_ERROR_CHARS, truncate_error};
use crate::resources::{
    ClientCertificate, EVENT_TYPE_PATTERN, FORBIDDEN_HEADERS, HEADER_VALUE_PATTERN, Health, MAX_ATTEMPTS_LIMIT,
    MAX_CUSTOM_HEADERS, MAX_DESCRIPTION_LENGTH, MAX_EVENT_TYPE_LENGTH, MAX_EVENT_TYPES, MAX_FILTER_LENGTH,
    MAX_HEADER_VALUE_LENGTH, MAX_RATE_LIMIT, MAX_URL_LENGTH, ORGANIZATION_LABEL, Ordering, SignatureScheme,
    WebhookEndpoint, WebhookEndpointSpec,
};
use crate::validation::{
    UrlPolicy, validate_description, validate_event_types, validate_filter, validate_headers, validate_max_attempts,
    validate_rate_limit, validate_secret_name, validate_url,
};

// The doc comments of the types and fields below are the descriptions of the OpenAPI document
// (`super::openapi`): they are written for the API's users. Every response type denies unknown
// fields in its schema, so that an answer with a field the document does not name fails
// validation (schemathesis, `tests/fuzz.rs`).

/// The Endpoint object of the REST contract, field for field.
#[derive(Serialize, Debug, Clone, PartialEq, JsonSchema)]
#[schemars(rename = "Endpoint", deny_unknown_fields)]
pub struct EndpointView {
    /// RFC 3339, UTC, with a Z
    #[schemars(extend("format" = "date-time"))]
    pub created_at: String,
    /// Free text.
    #[schemars(length(max = MAX_DESCRIPTION_LENGTH))]
    pub description: String,
    /// Exact event types or prefixes ending in .*; empty means all
    #[schemars(
        length(max = MAX_EVENT_TYPES),
        inner(length(min = 1, max = MAX_EVENT_TYPE_LENGTH), pattern(EVENT_TYPE_PATTERN))
    )]
    pub event_types: Vec<String>,
    /// The endpoint's id.
    pub id: String,
    /// Whether deliveries are sent.
    pub is_active: bool,
    /// The organization that owns the endpoint.
    pub organization_id: String,
    /// RFC 3339, UTC, with a Z; moves when the endpoint's settings change.
    #[schemars(extend("format" = "date-time"))]
    pub updated_at: String,
    /// Where deliveries are sent.
    #[schemars(extend("format" = "uri"), length(max = MAX_URL_LENGTH))]
    pub url: String,
    /// Extension: how deliveries are signed; present only when not the default `hmac-sha256`
    /// (absent means `hmac-sha256`, so the documented object keeps its exact fields).
    #[serde(skip_serializing_if = "is_default_scheme")]
    #[schemars(default)]
    pub signature_scheme: SignatureScheme,
    /// Extension: the `kubernetes.io/tls` Secret whose certificate is presented to the receiver
    /// (mutual TLS); absent when none is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate_secret: Option<String>,
    /// Extension: `fifo` when deliveries are attempted one at a time in ingest order (a failing
    /// delivery holds back the later ones until it succeeds or exhausts its attempts); absent
    /// means `unordered`, so the documented object keeps its exact fields.
    #[serde(skip_serializing_if = "is_default_ordering")]
    #[schemars(default)]
    pub ordering: Ordering,
    /// Extension: the endpoint's CEL filter over `event.type` and `event.data`: only the events
    /// it gives `true` for are delivered. Absent when the endpoint has none, so the documented
    /// object keeps its exact fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_FILTER_LENGTH))]
    pub filter: Option<String>,
}

fn is_default_ordering(ordering: &Ordering) -> bool {
    *ordering == Ordering::default()
}

fn is_default_scheme(scheme: &SignatureScheme) -> bool {
    *scheme == SignatureScheme::default()
}

/// An endpoint as the list shows it: the Endpoint object and its health.
#[derive(Serialize, Debug, Clone, PartialEq, JsonSchema)]
#[schemars(rename = "EndpointWithHealth", deny_unknown_fields)]
pub struct ListedEndpointView {
    /// The Endpoint object's fields.
    #[serde(flatten)]
    pub endpoint: EndpointView,
    /// Health from recent deliveries (`disabled` when inactive, `unknown` before any delivery).
    pub health: Health,
}

/// `GET .../webhook-endpoints`.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EndpointList {
    /// The organization's endpoints, oldest first.
    pub webhook_endpoints: Vec<ListedEndpointView>,
}

/// An endpoint and its signing secret: create and rotate-secret.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EndpointWithSecret {
    /// The endpoint.
    pub webhook_endpoint: EndpointView,
    /// What receivers verify signatures with, shown only by create and rotate-secret: the
    /// `whsec_` secret in clear text (`hmac-sha256`), or the `whpk_` public key (`ed25519`; the
    /// private key never leaves the operator).
    #[schemars(extend("pattern" = RECEIVER_KEY_PATTERN))]
    pub plaintext_secret: String,
    /// Extension: what the request did that is allowed but ill-advised, such as subscribing to a
    /// deprecated event type of the catalog. Absent when there is none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Pattern of a Secret name (a DNS-1123 subdomain), as `validate_secret_name` checks it.
pub const SECRET_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// Pattern of `plaintext_secret`: an HMAC secret or an ed25519 public key.
pub const RECEIVER_KEY_PATTERN: &str = "^(whsec_|whpk_)";

/// An endpoint: update.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EndpointResponse {
    /// The endpoint.
    pub webhook_endpoint: EndpointView,
    /// Extension: present only when the update changed `signature_scheme`, which makes a new key
    /// of the new scheme as a rotation does: what receivers verify with from now on (as in the
    /// rotate-secret answer). The previous key co-signs for the grace period.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = RECEIVER_KEY_PATTERN))]
    pub plaintext_secret: Option<String>,
    /// Extension: what the request did that is allowed but ill-advised, such as subscribing to a
    /// deprecated event type of the catalog. Absent when there is none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `DELETE .../webhook-endpoints/{id}`.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Deleted {
    /// Always true.
    #[schemars(extend("const" = true))]
    pub deleted: bool,
}

impl Default for Deleted {
    fn default() -> Self {
        Self { deleted: true }
    }
}

/// The Delivery object of the REST contract, field for field.
#[derive(Serialize, Debug, Clone, PartialEq, JsonSchema)]
#[schemars(rename = "Delivery", deny_unknown_fields)]
pub struct DeliveryView {
    /// Attempts made so far.
    pub attempts: u32,
    /// RFC 3339, UTC, with a Z
    #[schemars(extend("format" = "date-time"))]
    pub created_at: String,
    /// When an attempt succeeded; null until then.
    #[schemars(extend("format" = "date-time"))]
    pub delivered_at: Option<String>,
    /// The endpoint's id.
    pub endpoint_id: String,
    /// The event's type.
    pub event_type: String,
    /// The delivery's id, also its `webhook-id` header.
    pub id: String,
    /// Why the last attempt failed, cut to 512 characters; null if none did.
    pub last_error: Option<String>,
    /// Attempts allowed before the delivery fails.
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    /// When the next attempt is due; null when none is planned.
    #[schemars(extend("format" = "date-time"))]
    pub next_attempt_at: Option<String>,
    /// The organization that owns the endpoint.
    pub organization_id: String,
    /// The event as sent (`{"type", "timestamp", "data"}`), or null once it is no longer kept.
    pub payload: Option<Value>,
    /// HTTP status of the last attempt that got an answer; null until one did.
    pub response_status: Option<u16>,
    /// `pending` (waiting for its first or next attempt), `succeeded`, or `failed` (gave up).
    #[schemars(schema_with = "delivery_state_schema")]
    pub state: DeliveryState,
    /// RFC 3339, UTC, with a Z
    #[schemars(extend("format" = "date-time"))]
    pub updated_at: String,
}

impl DeliveryView {
    /// A delivery of the log as the REST API shows it, with its event's payload if still kept.
    pub fn of(record: &DeliveryRecord, payload: Option<Value>) -> Self {
        let time = |t: Option<Timestamp>| t.map(rfc3339);
        Self {
            attempts: record.attempts,
            created_at: rfc3339(record.created_at),
            delivered_at: time(record.delivered_at),
            endpoint_id: record.endpoint_id.clone(),
            event_type: record.event_type.clone(),
            id: record.id.clone(),
            last_error: record.last_error.as_deref().map(|e| truncate_error(e, MAX_ERROR_CHARS)),
            max_attempts: record.max_attempts,
            next_attempt_at: time(record.next_attempt_at),
            organization_id: record.organization_id.clone(),
            payload,
            response_status: record.response_status,
            state: record.state,
            updated_at: rfc3339(record.updated_at),
        }
    }
}

/// The states of a delivery, every one: the match stops compiling when a state is added and not
/// listed here.
fn delivery_state_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let every = |state: DeliveryState| match state {
        DeliveryState::Pending | DeliveryState::Succeeded | DeliveryState::Failed => state.as_str(),
    };
    let names = [DeliveryState::Pending, DeliveryState::Succeeded, DeliveryState::Failed].map(every);
    schemars::json_schema!({"type": "string", "enum": names})
}

/// `GET .../deliveries`.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct DeliveryList {
    /// Newest first.
    pub deliveries: Vec<DeliveryView>,
}

/// One delivery: retry and test.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct DeliveryResponse {
    /// The delivery, pending: it is attempted now.
    pub delivery: DeliveryView,
}

/// `GET .../stats`: an endpoint's delivery attempts of the last 24 hours, by hour.
#[derive(Serialize, Debug, Clone, PartialEq, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EndpointStats {
    /// When counting began (RFC 3339, UTC). Counts are kept in memory by the replica that sends
    /// the endpoint's attempts, from when it took the endpoint's organization over (its start, or
    /// a hand-over between replicas): hours before this show no attempts because none were
    /// counted.
    #[schemars(extend("format" = "date-time"))]
    pub since: String,
    /// Successful attempts in the hours shown.
    pub succeeded: u64,
    /// Failed attempts in the hours shown.
    pub failed: u64,
    /// The current hour and the 23 before it, oldest first, each present (zeros when nothing was
    /// attempted).
    #[schemars(length(min = crate::delivery::attempt_stats::HOURS, max = crate::delivery::attempt_stats::HOURS))]
    pub hours: Vec<AttemptHour>,
}

/// One hour of an endpoint's delivery attempts.
#[derive(Serialize, Debug, Clone, PartialEq, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct AttemptHour {
    /// The hour's start (RFC 3339, UTC, on the hour).
    #[schemars(extend("format" = "date-time"))]
    pub start: String,
    /// Attempts answered with a 2xx.
    pub succeeded: u64,
    /// Attempts that failed: any other status, a timeout, a connection error, or an address the
    /// operator refused to connect to.
    pub failed: u64,
    /// Median time a successful attempt took, from sending to the answer, in milliseconds
    /// (estimated, to within about 10 %); null when none succeeded.
    #[schemars(range(min = 0.0))]
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile of the same; null when none succeeded.
    #[schemars(range(min = 0.0))]
    pub latency_p95_ms: Option<f64>,
}

impl EndpointStats {
    /// The attempts as the REST API shows them.
    pub fn of(stats: &crate::delivery::attempt_stats::AttemptStats) -> Self {
        Self {
            since: rfc3339(stats.since),
            succeeded: stats.succeeded(),
            failed: stats.failed(),
            hours: stats
                .hours
                .iter()
                .map(|h| AttemptHour {
                    start: rfc3339(h.start),
                    succeeded: h.succeeded,
                    failed: h.failed,
                    latency_p50_ms: h.latency_p50_ms,
                    latency_p95_ms: h.latency_p95_ms,
                })
                .collect(),
        }
    }
}

/// `POST .../recover`.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Recovered {
    /// How many failed deliveries are pending again.
    #[schemars(range(max = crate::work::MAX_RECOVERED))]
    pub recovered: usize,
}

/// `DELETE .../events/{eventID}`.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Erased {
    /// The event erased.
    pub event_id: String,
    /// How many deliveries carry it (each now listed with `payload: null`).
    pub deliveries: usize,
}

/// `POST .../portal-sessions`.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PortalSession {
    /// The portal with the token in its fragment (`.../portal/#token=...`); the page removes it
    /// from the address bar as it loads.
    pub url: String,
    /// Bearer token for the REST routes of this organization.
    #[schemars(extend("pattern" = format!(
        "^{}[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$",
        crate::auth::portal_token::TOKEN_PREFIX
    )))]
    pub token: String,
    /// When the session ends (RFC 3339, UTC, with a Z).
    #[schemars(extend("format" = "date-time"))]
    pub expires_at: String,
}

/// Body of `POST /webhook-endpoints`.
#[derive(Deserialize, Debug, Clone, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CreateEndpoint")]
pub struct CreateRequest {
    /// Where deliveries are sent: an absolute https:// URL (http:// where the operator allows
    /// it) with a host and no credentials.
    #[schemars(extend("format" = "uri"), length(max = MAX_URL_LENGTH))]
    pub url: String,
    /// Free text.
    #[serde(default)]
    #[schemars(length(max = MAX_DESCRIPTION_LENGTH))]
    pub description: Option<String>,
    /// Exact event types or prefixes ending in .*; empty or absent means all
    #[serde(default)]
    #[schemars(
        length(max = MAX_EVENT_TYPES),
        inner(length(min = 1, max = MAX_EVENT_TYPE_LENGTH), pattern(EVENT_TYPE_PATTERN))
    )]
    pub event_types: Option<Vec<String>>,
    /// Whether deliveries are sent; default true.
    #[serde(default)]
    #[schemars(extend("default" = true))]
    pub is_active: Option<bool>,
    /// Extension: how deliveries are signed, `hmac-sha256` (default; `v1` signatures) or
    /// `ed25519` (`v1a` signatures; `plaintext_secret` is then the `whpk_` public key).
    #[serde(default)]
    pub signature_scheme: Option<SignatureScheme>,
    /// Extension: mutual TLS. The name of a Secret of type `kubernetes.io/tls` in the operator's
    /// namespace whose certificate and key are presented to the receiver. Until it exists and
    /// holds a usable certificate, the endpoint is not ready and nothing is delivered.
    #[serde(default)]
    #[schemars(length(min = 1, max = 253), pattern(SECRET_NAME_PATTERN))]
    pub client_certificate_secret: Option<String>,
    /// Extension: `unordered` (default) or `fifo`: one delivery in flight at a time, in ingest
    /// order; a failing delivery holds back the later ones until it succeeds or exhausts its
    /// attempts.
    #[serde(default)]
    pub ordering: Option<Ordering>,
    /// Extension: a CEL expression over `event.type` (a string) and `event.data` (the event's
    /// object), e.g. `event.data.region.startsWith("eu-")`: only the events it gives `true` for
    /// are delivered. Refused with its line and column when it does not compile or is too costly;
    /// an evaluation error (such as a missing field) is no match.
    #[serde(default)]
    #[schemars(length(min = 1, max = MAX_FILTER_LENGTH))]
    pub filter: Option<String>,
}

/// Body of `PATCH /webhook-endpoints/{id}`: any subset of the settable fields.
#[derive(Deserialize, Debug, Clone, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "UpdateEndpoint")]
pub struct UpdateRequest {
    /// New delivery target (the rules of create).
    #[schemars(extend("format" = "uri"), length(max = MAX_URL_LENGTH))]
    pub url: Option<String>,
    /// New description.
    #[schemars(length(max = MAX_DESCRIPTION_LENGTH))]
    pub description: Option<String>,
    /// New event types (replaces the list); exact types or prefixes ending in .*
    #[schemars(
        length(max = MAX_EVENT_TYPES),
        inner(length(min = 1, max = MAX_EVENT_TYPE_LENGTH), pattern(EVENT_TYPE_PATTERN))
    )]
    pub event_types: Option<Vec<String>>,
    /// New active flag.
    pub is_active: Option<bool>,
    /// Extension: a new signature scheme (`hmac-sha256` or `ed25519`). A change makes a new key
    /// as a rotation does, returned in the answer's `plaintext_secret`.
    pub signature_scheme: Option<SignatureScheme>,
    /// Extension: the `kubernetes.io/tls` Secret presented to the receiver (mutual TLS), or null
    /// for none.
    #[serde(default, deserialize_with = "given")]
    #[schemars(with = "Option<String>", length(min = 1, max = 253), pattern(SECRET_NAME_PATTERN))]
    pub client_certificate_secret: Option<Option<String>>,
    /// Extension: `unordered` or `fifo` (one delivery in flight at a time, in ingest order).
    /// Pending deliveries follow the new ordering at once.
    pub ordering: Option<Ordering>,
    /// Extension: a new CEL filter (the rules of create), or null for none. Applies to events
    /// ingested from then on.
    #[serde(default, deserialize_with = "given")]
    #[schemars(with = "Option<String>", length(min = 1, max = MAX_FILTER_LENGTH))]
    pub filter: Option<Option<String>>,
}

pub use crate::resources::rfc3339;

fn created_at(endpoint: &WebhookEndpoint) -> Timestamp {
    endpoint
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// When the endpoint's settings last changed: the newest write to anything but status, as the
/// API server records it in `managedFields` (so kubectl edits count too), else creation time.
pub fn updated_at(endpoint: &WebhookEndpoint) -> Timestamp {
    let created = created_at(endpoint);
    endpoint
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref().unwrap_or("").is_empty())
        .filter_map(|m| m.time.as_ref().map(|t| t.0))
        .fold(created, Timestamp::max)
}

/// The health shown in list responses.
pub fn health(endpoint: &WebhookEndpoint) -> Health {
    if !endpoint.spec.active {
        return Health::Disabled;
    }
    endpoint
        .status
        .as_ref()
        .and_then(|s| s.health)
        .unwrap_or(Health::Unknown)
}

/// Maps a CR to the REST Endpoint object.
pub fn endpoint_view(endpoint: &WebhookEndpoint) -> EndpointView {
    EndpointView {
        created_at: rfc3339(created_at(endpoint)),
        description: endpoint.spec.description.clone(),
        event_types: endpoint.spec.event_types.clone(),
        id: endpoint.name_any(),
        is_active: endpoint.spec.active,
        organization_id: endpoint.spec.organization_id.clone(),
        updated_at: rfc3339(updated_at(endpoint)),
        url: endpoint.spec.url.clone(),
        signature_scheme: endpoint.spec.signature_scheme,
        client_certificate_secret: endpoint.spec.client_certificate.as_ref().map(|c| c.secret_name.clone()),
        ordering: endpoint.spec.ordering,
        filter: endpoint.spec.filter.clone(),
    }
}

/// Maps a CR to the Endpoint object of a list response, with its health.
pub fn listed_endpoint_view(endpoint: &WebhookEndpoint) -> ListedEndpointView {
    ListedEndpointView {
        endpoint: endpoint_view(endpoint),
        health: health(endpoint),
    }
}

/// Validates a create request and builds the CR it asks for.
pub fn new_endpoint(
    name: &str,
    namespace: &str,
    organization_id: &str,
    request: CreateRequest,
    policy: UrlPolicy,
) -> Result<WebhookEndpoint, String> {
    validate_url(&request.url, policy)?;
    let description = request.description.unwrap_or_default();
    validate_description(&description)?;
    let event_types = request.event_types.unwrap_or_default();
    validate_event_types(&event_types)?;
    if let Some(name) = &request.client_certificate_secret {
        validate_secret_name(name)?;
    }
    if let Some(filter) = &request.filter {
        validate_filter(filter)?;
    }
    Ok(WebhookEndpoint {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                ORGANIZATION_LABEL.to_string(),
                organization_id.to_string(),
            )])),
            ..Default::default()
        },
        spec: WebhookEndpointSpec {
            organization_id: organization_id.to_string(),
            url: request.url,
            description,
            event_types,
            active: request.is_active.unwrap_or(true),
            secret_rotation: 0,
            max_attempts: None,
            headers: Default::default(),
            rate_limit: None,
            signature_scheme: request.signature_scheme.unwrap_or_default(),
            client_certificate: request
                .client_certificate_secret
                .map(|secret_name| ClientCertificate { secret_name }),
            ordering: request.ordering.unwrap_or_default(),
            filter: request.filter,
        },
        status: None,
    })
}

/// Validates an update and builds a JSON Patch for it. The first operation tests the
/// organization, so the write fails atomically if the endpoint is not this organization's;
/// only the fields given are touched, so concurrent updates of other fields are never lost.
pub fn update_patch(organization_id: &str, request: &UpdateRequest, policy: UrlPolicy) -> Result<Value, String> {
    let mut ops = vec![json!({"op": "test", "path": "/spec/organizationId", "value": organization_id})];
    if let Some(url) = &request.url {
        validate_url(url, policy)?;
        ops.push(json!({"op": "add", "path": "/spec/url", "value": url}));
    }
    if let Some(description) = &request.description {
        validate_description(description)?;
        ops.push(json!({"op": "add", "path": "/spec/description", "value": description}));
    }
    if let Some(event_types) = &request.event_types {
        validate_event_types(event_types)?;
        ops.push(json!({"op": "add", "path": "/spec/eventTypes", "value": event_types}));
    }
    if let Some(active) = request.is_active {
        ops.push(json!({"op": "add", "path": "/spec/active", "value": active}));
    }
    if let Some(ordering) = request.ordering {
        ops.push(json!({"op": "add", "path": "/spec/ordering", "value": ordering}));
    }
    match &request.filter {
        None => {}
        Some(Some(filter)) => {
            validate_filter(filter)?;
            ops.push(json!({"op": "add", "path": "/spec/filter", "value": filter}));
        }
        // As for the certificate: `add` of null removes the field, present or not.
        Some(None) => ops.push(json!({"op": "add", "path": "/spec/filter", "value": null})),
    }
    match &request.client_certificate_secret {
        None => {}
        Some(Some(name)) => {
            validate_secret_name(name)?;
            ops.push(json!({"op": "add", "path": "/spec/clientCertificate", "value": {"secretName": name}}));
        }
        // `add` of null: absent or not, the field ends up removed.
        Some(None) => ops.push(json!({"op": "add", "path": "/spec/clientCertificate", "value": null})),
    }
    Ok(Value::Array(ops))
}

/// The operations an update adds when it changes the signature scheme, and the rotation the
/// controller will have completed once the new key exists: the scheme, and `secretRotation`
/// raised by one, so the update waits for the new key as rotate-secret does. `None` when the
/// scheme does not change.
pub fn scheme_change(existing: &WebhookEndpointSpec, wanted: Option<SignatureScheme>) -> Option<(Vec<Value>, i64)> {
    let wanted = wanted.filter(|w| *w != existing.signature_scheme)?;
    let target = existing.secret_rotation + 1;
    Some((
        vec![
            json!({"op": "add", "path": "/spec/signatureScheme", "value": wanted}),
            json!({"op": "add", "path": "/spec/secretRotation", "value": target}),
        ],
        target,
    ))
}

/// A new endpoint name: `ep-` and a lowercase ULID (see [`crate::ids`]). Sortable by creation
/// time, unguessable, and a valid DNS-1123 label.
pub fn new_endpoint_name(now: Timestamp) -> String {
    format!("ep-{}", crate::ids::time_sortable_id(now))
}

/// Body of `POST /webhook-endpoints/{id}/recover`.
#[derive(Deserialize, Debug, Clone, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "RecoverDeliveries")]
pub struct RecoverRequest {
    /// Start of the window, inclusive (RFC 3339): failed deliveries created since then.
    #[schemars(extend("format" = "date-time"))]
    pub since: String,
    /// End of the window, exclusive (RFC 3339); default now.
    #[schemars(extend("format" = "date-time"))]
    pub until: Option<String>,
}

/// Body of `POST /v1/organizations/{org}/filters/test`: a filter and an event to try it on.
#[derive(Deserialize, Debug, Clone, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "FilterTest")]
pub struct FilterTestRequest {
    /// The CEL filter, under the rules of an endpoint's `filter`.
    #[schemars(length(min = 1, max = MAX_FILTER_LENGTH))]
    pub filter: String,
    /// The event's type, `event.type` (an exact type, no wildcard).
    #[schemars(length(min = 1, max = MAX_EVENT_TYPE_LENGTH), pattern(EVENT_TYPE_PATTERN))]
    pub event_type: String,
    /// The event's `data` (an object). When absent or null, the example of `event_type` in the
    /// event-type catalog.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Map<String, Value>>")]
    pub data: Option<Value>,
}

/// Answer of `POST .../filters/test`.
#[derive(Serialize, Debug, Clone, PartialEq, JsonSchema)]
#[schemars(rename = "FilterTestResult", deny_unknown_fields)]
pub struct FilterTestResult {
    /// Whether the filter gives `true` for the event, that is whether an endpoint with this
    /// filter (and matching `event_types`) would be sent the event.
    pub matches: bool,
    /// Why the filter did not give a bool (a field the event lacks, a type mismatch, ...): the
    /// event then does not match, as at ingest. `null` when it gave one.
    pub evaluation_error: Option<String>,
    /// Whether `data` was the catalog's example of the type (the request gave none).
    pub used_example: bool,
}

/// Tries a filter on an event as ingest would, without sending anything: the filter must
/// compile under the rules of an endpoint's (the same message when it does not), and `data`,
/// when the request has none, is the catalog's example of the type.
pub fn test_filter(request: &FilterTestRequest, catalog: &crate::catalog::Catalog) -> Result<FilterTestResult, String> {
    let filter = crate::validation::compile_filter(&request.filter)?;
    if request.event_type.ends_with(".*") {
        return Err("event_type must be an exact type, not a pattern".into());
    }
    crate::validation::validate_event_type(&request.event_type)?;
    let (data, used_example) = match &request.data {
        Some(Value::Null) | None => {
            let example = catalog
                .definition(&request.event_type)
                .and_then(|def| def.example.clone())
                .ok_or_else(|| {
                    format!(
                        "give data: the event-type catalog has no example of {}",
                        request.event_type
                    )
                })?;
            (example, true)
        }
        Some(data) => (data.clone(), false),
    };
    if !data.is_object() {
        return Err("data must be a JSON object".into());
    }
    let input = crate::delivery::filter::EventInput::new(&request.event_type, &data);
    Ok(match filter.evaluate(&input) {
        Ok(matches) => FilterTestResult {
            matches,
            evaluation_error: None,
            used_example,
        },
        Err(e) => FilterTestResult {
            matches: false,
            evaluation_error: Some(e.to_string()),
            used_example,
        },
    })
}

/// Longest window one recovery covers.
pub const MAX_RECOVER_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_hours(14 * 24);

/// The window `[since, until)` of a recovery, checked: RFC 3339 times, `since` before `until`,
/// at most [`MAX_RECOVER_WINDOW`] long. `until` defaults to `now`.
pub fn recover_window(request: &RecoverRequest, now: Timestamp) -> Result<(Timestamp, Timestamp), String> {
    let parse = |field: &str, text: &str| {
        text.parse::<Timestamp>()
            .map_err(|_| format!("{field} must be an RFC 3339 time such as 2026-01-31T12:00:00Z"))
    };
    let since = parse("since", &request.since)?;
    let until = match &request.until {
        Some(text) => parse("until", text)?,
        None => now,
    };
    if since >= until {
        return Err("since must be before until".into());
    }
    if until.duration_since(since) > MAX_RECOVER_WINDOW {
        return Err("the window from since to until may be at most 14 days".into());
    }
    Ok((since, until))
}

/// The delivery settings of an endpoint (`GET` and `PATCH .../settings`): a sub-resource, so the
/// documented Endpoint object keeps its exact fields.
#[derive(Serialize, Debug, Clone, PartialEq, JsonSchema)]
#[schemars(rename = "Settings", deny_unknown_fields)]
pub struct SettingsView {
    /// Extra headers sent with every delivery. Names are HTTP tokens, unique ignoring case; the
    /// operator's own headers cannot be set. Values are never logged.
    #[schemars(schema_with = "headers_schema")]
    pub headers: BTreeMap<String, String>,
    /// Most deliveries per second to this endpoint; null for no limit. Deliveries over the rate
    /// wait; none is dropped.
    #[schemars(range(min = 1, max = MAX_RATE_LIMIT))]
    pub rate_limit: Option<u32>,
    /// Attempts per delivery before it fails; null for the retry schedule's length.
    #[schemars(range(min = 1, max = MAX_ATTEMPTS_LIMIT))]
    pub max_attempts: Option<u32>,
}

/// A header name the operator sets itself, in any case: `^(host|...)$` with every letter a
/// class of both cases (JSON Schema patterns have no flag for case).
fn forbidden_header_pattern() -> String {
    let any_case = |name: &str| -> String {
        name.chars()
            .map(|c| match c.is_ascii_alphabetic() {
                true => format!("[{}{}]", c.to_ascii_lowercase(), c.to_ascii_uppercase()),
                false => c.to_string(),
            })
            .collect()
    };
    let names: Vec<String> = FORBIDDEN_HEADERS.iter().map(|n| any_case(n)).collect();
    format!("^({})$", names.join("|"))
}

/// The schema of delivery headers, with every rule [`crate::validation::validate_headers`]
/// enforces that a schema can state (not: a name given twice in another case).
fn headers_object_schema() -> Value {
    json!({
        "type": "object",
        "maxProperties": MAX_CUSTOM_HEADERS,
        "propertyNames": {
            "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
            "maxLength": 256,
            "not": {"pattern": forbidden_header_pattern()},
        },
        "additionalProperties": {
            "type": "string",
            "maxLength": MAX_HEADER_VALUE_LENGTH,
            "pattern": HEADER_VALUE_PATTERN,
        },
    })
}

fn headers_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    serde_json::from_value(headers_object_schema()).expect("an object is a schema")
}

/// [`headers_schema`], or null.
fn nullable_headers_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = headers_object_schema();
    schema["type"] = json!(["object", "null"]);
    serde_json::from_value(schema).expect("an object is a schema")
}

/// What a redacted header value reads.
pub const REDACTED: &str = "<redacted>";

impl SettingsView {
    /// Replaces every header value with [`REDACTED`], keeping the names.
    pub fn redact_header_values(&mut self) {
        self.headers.values_mut().for_each(|v| *v = REDACTED.to_string());
    }
}

/// The settings of an endpoint, as REST shows them.
pub fn settings_view(endpoint: &WebhookEndpoint) -> SettingsView {
    SettingsView {
        headers: endpoint.spec.headers.clone(),
        rate_limit: endpoint.spec.rate_limit,
        max_attempts: endpoint.spec.max_attempts,
    }
}

/// Body of `PATCH .../settings`: a field left out is kept; a field set to `null` is cleared;
/// `headers` replaces the whole map.
#[derive(Deserialize, Debug, Clone, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "UpdateSettings")]
pub struct SettingsPatch {
    /// Extra headers sent with every delivery (the whole map), or null for none. Names are HTTP
    /// tokens, unique ignoring case; the operator's own headers (webhook-id, webhook-timestamp,
    /// webhook-signature, content-type, content-length, host, user-agent, connection,
    /// transfer-encoding, te, trailer, upgrade, keep-alive, proxy-connection) cannot be set.
    /// Values are never logged.
    #[serde(default, deserialize_with = "given")]
    #[schemars(schema_with = "nullable_headers_schema")]
    pub headers: Option<Option<BTreeMap<String, String>>>,
    /// Most deliveries per second to this endpoint, or null for no limit.
    #[serde(default, deserialize_with = "given")]
    #[schemars(with = "Option<u32>", range(min = 1, max = MAX_RATE_LIMIT))]
    pub rate_limit: Option<Option<u32>>,
    /// Attempts per delivery before it fails, or null for the retry schedule's length.
    #[serde(default, deserialize_with = "given")]
    #[schemars(with = "Option<u32>", range(min = 1, max = MAX_ATTEMPTS_LIMIT))]
    pub max_attempts: Option<Option<u32>>,
}

/// Tells a field set to `null` (`Some(None)`) from one left out (`None`, by `default`).
fn given<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Validates a settings change and builds a JSON Patch for it that first tests the
/// organization, like [`update_patch`]. A cleared field is written as `null`, which the API
/// server drops from the stored object.
pub fn settings_patch(organization_id: &str, request: &SettingsPatch) -> Result<Value, String> {
    let mut ops = vec![json!({"op": "test", "path": "/spec/organizationId", "value": organization_id})];
    if let Some(headers) = &request.headers {
        let headers = headers.clone().unwrap_or_default();
        validate_headers(&headers)?;
        ops.push(json!({"op": "add", "path": "/spec/headers", "value": headers}));
    }
    if let Some(rate) = request.rate_limit {
        validate_rate_limit(rate)?;
        ops.push(json!({"op": "add", "path": "/spec/rateLimit", "value": rate}));
    }
    if let Some(max_attempts) = request.max_attempts {
        validate_max_attempts(max_attempts)?;
        ops.push(json!({"op": "add", "path": "/spec/maxAttempts", "value": max_attempts}));
    }
    Ok(Value::Array(ops))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};

    const LAX: UrlPolicy = UrlPolicy { allow_http: true };

    fn catalog_with_example() -> crate::catalog::Catalog {
        let def = crate::catalog::EventTypeDef {
            name: "database.created".into(),
            description: "A database was created".into(),
            group: None,
            schema: None,
            example: Some(json!({"region": "eu-west-1", "size_gb": 10})),
            deprecated: false,
        };
        let source = crate::catalog::Source {
            object: "ns/database-created".into(),
            version: "1".into(),
            age: "2026-01-01T00:00:00Z".into(),
            def,
        };
        crate::catalog::Catalog::build(vec![source], &mut crate::catalog::SchemaCache::default())
    }

    fn filter_test(filter: &str, event_type: &str, data: Option<Value>) -> FilterTestRequest {
        FilterTestRequest {
            filter: filter.into(),
            event_type: event_type.into(),
            data,
        }
    }

    #[test]
    fn a_filter_is_tried_on_the_catalog_example_unless_data_is_given() {
        let catalog = catalog_with_example();
        let eu = r#"event.data.region.startsWith("eu-")"#;
        let tried = test_filter(&filter_test(eu, "database.created", None), &catalog).unwrap();
        assert_eq!(
            tried,
            FilterTestResult {
                matches: true,
                evaluation_error: None,
                used_example: true
            }
        );
        let given = json!({"region": "us-east-1"});
        let tried = test_filter(&filter_test(eu, "database.created", Some(given)), &catalog).unwrap();
        assert!(!tried.matches && !tried.used_example && tried.evaluation_error.is_none());
        // null is "not given", as an update's null is.
        let tried = test_filter(&filter_test(eu, "database.created", Some(Value::Null)), &catalog).unwrap();
        assert!(tried.matches && tried.used_example);
        // Any type may be tried with data of one's own, in or out of the catalog.
        let tried = test_filter(
            &filter_test(r#"event.type == "other.thing""#, "other.thing", Some(json!({}))),
            &catalog,
        )
        .unwrap();
        assert!(tried.matches);
    }

    #[test]
    fn a_missing_field_is_no_match_and_says_why() {
        let tried = test_filter(
            &filter_test("event.data.owner == \"ada\"", "database.created", None),
            &catalog_with_example(),
        )
        .unwrap();
        assert!(!tried.matches);
        let why = tried.evaluation_error.unwrap();
        assert!(why.contains("owner"), "{why}");
    }

    #[test]
    fn a_filter_test_refuses_what_an_endpoint_would_and_bad_events() {
        let catalog = catalog_with_example();
        let refused = |r: FilterTestRequest| test_filter(&r, &catalog).unwrap_err();
        let syntax = refused(filter_test("event.type ==", "database.created", None));
        assert!(
            syntax.starts_with("filter has a syntax error at line 1, column"),
            "{syntax}"
        );
        assert_eq!(
            syntax,
            crate::validation::validate_filter("event.type ==").unwrap_err(),
            "the message an endpoint write gives"
        );
        let typed = refused(filter_test("event.data + 1", "database.created", None));
        assert!(typed.contains("type error"), "{typed}");
        assert!(refused(filter_test(" ", "database.created", None)).contains("must not be empty"));
        let no_example = refused(filter_test("true", "backup.done", None));
        assert_eq!(
            no_example,
            "give data: the event-type catalog has no example of backup.done"
        );
        assert!(refused(filter_test("true", "database.*", Some(json!({})))).contains("exact type"));
        assert!(refused(filter_test("true", "no spaces", Some(json!({})))).contains("is invalid"));
        assert_eq!(
            refused(filter_test("true", "database.created", Some(json!([1])))),
            "data must be a JSON object"
        );
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn a_delivery_view_has_exactly_the_contract_keys() {
        let created = Timestamp::from_second(1_700_000_003).unwrap();
        let record = DeliveryRecord::pending(
            "msg_3".into(),
            "ep1",
            "org_1",
            ("evt_3", "database.created"),
            8,
            created,
        );
        let payload = json!({"type": "database.created", "timestamp": "2023-11-14T22:13:20Z", "data": {"n": 3}});
        let api = serde_json::to_value(DeliveryView::of(&record, Some(payload))).unwrap();
        let keys: Vec<&str> = api.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "attempts",
                "created_at",
                "delivered_at",
                "endpoint_id",
                "event_type",
                "id",
                "last_error",
                "max_attempts",
                "next_attempt_at",
                "organization_id",
                "payload",
                "response_status",
                "state",
                "updated_at"
            ]
        );
        assert_eq!(api["delivered_at"], Value::Null);
        assert_eq!(api["response_status"], Value::Null);
        assert_eq!(api["last_error"], Value::Null);
        assert_eq!(api["state"], "pending");
        assert_eq!(api["created_at"], "2023-11-14T22:13:23Z");
        assert_eq!(api["payload"]["data"]["n"], 3);

        let mut done = record;
        done.state = DeliveryState::Succeeded;
        done.delivered_at = Some(Timestamp::from_nanosecond(1_700_000_010_999_000_000).unwrap());
        done.response_status = Some(200);
        done.next_attempt_at = None;
        done.last_error = Some("e".repeat(MAX_ERROR_CHARS + 10));
        let api = serde_json::to_value(DeliveryView::of(&done, None)).unwrap();
        assert_eq!(api["payload"], Value::Null);
        assert_eq!(api["delivered_at"], "2023-11-14T22:13:30Z");
        assert_eq!(api["response_status"], 200);
        assert_eq!(api["next_attempt_at"], Value::Null);
        assert_eq!(api["state"], "succeeded");
        assert!(api["last_error"].as_str().unwrap().chars().count() <= MAX_ERROR_CHARS);
    }

    /// An endpoint with every optional setting given, for the document's tests.
    pub(in crate::api) fn example_endpoint() -> WebhookEndpoint {
        let mut ep = endpoint();
        ep.spec.description = "orders".into();
        ep.spec.event_types = vec!["database.*".into(), "webhook.test".into()];
        ep.spec.headers.insert("X-Tenant".into(), "a".into());
        ep.spec.rate_limit = Some(5);
        ep.spec.max_attempts = Some(3);
        ep.spec.ordering = Ordering::Fifo;
        ep
    }

    /// A pending delivery and a finished one, with every field that may be null given and not.
    pub(in crate::api) fn example_deliveries() -> Vec<DeliveryView> {
        let at = |s| Timestamp::from_second(s).unwrap();
        let pending = DeliveryRecord {
            id: "msg_1".into(),
            endpoint_id: "ep-1".into(),
            organization_id: "org_1".into(),
            event_id: "evt_1".into(),
            event_type: "database.created".into(),
            state: DeliveryState::Pending,
            attempts: 0,
            max_attempts: 8,
            created_at: at(1_700_000_000),
            updated_at: at(1_700_000_000),
            next_attempt_at: Some(at(1_700_000_005)),
            delivered_at: None,
            response_status: None,
            last_error: None,
            trace: None,
        };
        let done = DeliveryRecord {
            state: DeliveryState::Failed,
            attempts: 8,
            next_attempt_at: None,
            response_status: Some(500),
            last_error: Some("HTTP 500".into()),
            ..pending.clone()
        };
        let succeeded = DeliveryRecord {
            state: DeliveryState::Succeeded,
            attempts: 1,
            next_attempt_at: None,
            delivered_at: Some(at(1_700_000_001)),
            response_status: Some(200),
            ..pending.clone()
        };
        let payload = json!({"type": "database.created", "timestamp": "2023-11-14T22:13:20Z", "data": {"n": 1}});
        vec![
            DeliveryView::of(&pending, Some(payload)),
            DeliveryView::of(&done, None),
            DeliveryView::of(&succeeded, None),
        ]
    }

    fn endpoint() -> WebhookEndpoint {
        let mut ep = new_endpoint(
            "ep-1",
            "ns",
            "org_1",
            CreateRequest {
                url: "https://x.example/h".into(),
                description: None,
                event_types: None,
                is_active: None,
                signature_scheme: None,
                client_certificate_secret: None,
                ordering: None,
                filter: None,
            },
            LAX,
        )
        .unwrap();
        ep.metadata.creation_timestamp = Some(Time(ts(1_566_656_122)));
        ep
    }

    #[test]
    fn view_has_exactly_the_documented_fields() {
        let view = serde_json::to_value(endpoint_view(&endpoint())).unwrap();
        let keys: Vec<_> = view.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "created_at",
                "description",
                "event_types",
                "id",
                "is_active",
                "organization_id",
                "updated_at",
                "url"
            ]
        );
        assert_eq!(view["created_at"], "2019-08-24T14:15:22Z");
        assert_eq!(view["updated_at"], "2019-08-24T14:15:22Z");
        assert_eq!(view["is_active"], true);
        let listed = serde_json::to_value(listed_endpoint_view(&endpoint())).unwrap();
        let mut listed_keys: Vec<_> = listed.as_object().unwrap().keys().cloned().collect();
        listed_keys.retain(|k| k != "health");
        assert_eq!(listed_keys, keys, "the Endpoint object's fields and its health");
        assert_eq!(listed["health"], "unknown");
    }

    #[test]
    fn health_is_disabled_for_inactive_endpoints() {
        let mut ep = endpoint();
        ep.spec.active = false;
        assert_eq!(health(&ep), Health::Disabled);
    }

    #[test]
    fn updated_at_follows_spec_writes_not_status_writes() {
        let mut ep = endpoint();
        let entry = |sub: Option<&str>, t: i64| ManagedFieldsEntry {
            subresource: sub.map(str::to_string),
            time: Some(Time(ts(t))),
            ..Default::default()
        };
        ep.metadata.managed_fields = Some(vec![entry(None, 1_566_656_200), entry(Some("status"), 1_566_657_000)]);
        assert_eq!(updated_at(&ep), ts(1_566_656_200));
    }

    #[test]
    fn create_validates_and_defaults() {
        let req = |url: &str| CreateRequest {
            url: url.into(),
            description: None,
            event_types: None,
            is_active: None,
            signature_scheme: None,
            client_certificate_secret: None,
            ordering: None,
            filter: None,
        };
        let ep = endpoint();
        assert!(ep.spec.active);
        assert_eq!(ep.labels()[ORGANIZATION_LABEL], "org_1");
        assert!(new_endpoint("n", "ns", "o", req("http://x.example"), UrlPolicy { allow_http: false }).is_err());
        let bad_types = CreateRequest {
            event_types: Some(vec!["a b".into()]),
            ..req("https://x.example")
        };
        assert!(
            new_endpoint("n", "ns", "o", bad_types, LAX)
                .unwrap_err()
                .contains("event type")
        );
    }

    #[test]
    fn ordering_maps_both_ways_and_is_shown_only_when_fifo() {
        // REST -> CR: absent is unordered; "fifo" is spec.ordering fifo.
        assert_eq!(endpoint().spec.ordering, Ordering::Unordered);
        let request: CreateRequest =
            serde_json::from_value(json!({"url": "https://x.example/h", "ordering": "fifo"})).unwrap();
        let fifo = new_endpoint("ep-2", "ns", "org_1", request, LAX).unwrap();
        assert_eq!(fifo.spec.ordering, Ordering::Fifo);
        // CR -> REST: the view shows it only when not the default, so the documented object
        // keeps its exact fields.
        assert_eq!(serde_json::to_value(endpoint_view(&fifo)).unwrap()["ordering"], "fifo");
        assert!(
            serde_json::to_value(endpoint_view(&endpoint()))
                .unwrap()
                .get("ordering")
                .is_none()
        );
        // The CR's stored form: spec.ordering, absent when unordered.
        assert_eq!(serde_json::to_value(&fifo.spec).unwrap()["ordering"], "fifo");
        assert!(
            serde_json::to_value(&endpoint().spec)
                .unwrap()
                .get("ordering")
                .is_none()
        );
        // Update: one patch operation, either way; anything else is refused by name.
        for (ordering, want) in [(Ordering::Fifo, "fifo"), (Ordering::Unordered, "unordered")] {
            let req = UpdateRequest {
                ordering: Some(ordering),
                filter: None,
                ..Default::default()
            };
            let patch = update_patch("org_1", &req, LAX).unwrap();
            assert_eq!(patch[1], json!({"op": "add", "path": "/spec/ordering", "value": want}));
        }
        let err = serde_json::from_value::<UpdateRequest>(json!({"ordering": "lifo"})).unwrap_err();
        assert!(err.to_string().contains("unknown variant `lifo`"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = serde_json::from_str::<CreateRequest>(r#"{"url": "https://x", "secret": "s"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `secret`"));
        let err = serde_json::from_str::<UpdateRequest>(r#"{"active": true}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `active`"));
    }

    #[test]
    fn update_patch_touches_only_given_fields_and_tests_the_organization() {
        let req = UpdateRequest {
            description: Some("d".into()),
            ..Default::default()
        };
        let patch = update_patch("org_1", &req, LAX).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/spec/organizationId", "value": "org_1"},
                {"op": "add", "path": "/spec/description", "value": "d"},
            ])
        );
        let bad = UpdateRequest {
            url: Some("ftp://x".into()),
            ..Default::default()
        };
        assert!(update_patch("org_1", &bad, LAX).is_err());
    }

    #[test]
    fn names_are_dns_labels_sortable_by_time() {
        let a = new_endpoint_name(ts(1_700_000_000));
        let b = new_endpoint_name(ts(1_700_000_001));
        assert_eq!(a.len(), 29);
        assert!(a < b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_ne!(new_endpoint_name(ts(1)), new_endpoint_name(ts(1)));
    }

    #[test]
    fn recovery_windows_are_checked() {
        let now: Timestamp = "2026-03-15T12:00:00Z".parse().unwrap();
        let req = |since: &str, until: Option<&str>| RecoverRequest {
            since: since.into(),
            until: until.map(str::to_string),
        };
        let (since, until) = recover_window(&req("2026-03-15T11:00:00Z", None), now).unwrap();
        assert_eq!((since.to_string(), until), ("2026-03-15T11:00:00Z".to_string(), now));
        assert!(
            recover_window(&req("2026-03-01T12:00:00Z", None), now).is_ok(),
            "exactly 14 days"
        );
        for (bad, why) in [
            (req("2026-03-01T11:59:59Z", None), "at most 14 days"),
            (req("yesterday", None), "RFC 3339"),
            (req("2026-03-15T11:00:00Z", Some("soon")), "until must be an RFC 3339"),
            (req("2026-03-15T12:00:00Z", None), "before until"),
            (
                req("2026-03-15T11:00:00Z", Some("2026-03-15T10:00:00Z")),
                "before until",
            ),
        ] {
            let err = recover_window(&bad, now).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn settings_patches_tell_null_from_absent() {
        let parse = |body: &str| serde_json::from_str::<SettingsPatch>(body);
        let patch = settings_patch("org_a", &parse(r#"{"rate_limit": 5}"#).unwrap()).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/spec/organizationId", "value": "org_a"},
                {"op": "add", "path": "/spec/rateLimit", "value": 5},
            ])
        );
        let patch = settings_patch("org_a", &parse(r#"{"rate_limit": null, "headers": null}"#).unwrap()).unwrap();
        assert_eq!(patch[1], json!({"op": "add", "path": "/spec/headers", "value": {}}));
        assert_eq!(patch[2], json!({"op": "add", "path": "/spec/rateLimit", "value": null}));
        let patch = settings_patch(
            "org_a",
            &parse(r#"{"headers": {"X-Tenant": "a"}, "max_attempts": 3}"#).unwrap(),
        )
        .unwrap();
        assert_eq!(patch[1]["value"], json!({"X-Tenant": "a"}));
        assert_eq!(patch[2], json!({"op": "add", "path": "/spec/maxAttempts", "value": 3}));
        assert_eq!(
            settings_patch("org_a", &parse("{}").unwrap())
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn settings_are_validated() {
        let parse = |body: &str| serde_json::from_str::<SettingsPatch>(body);
        assert!(parse(r#"{"headerz": {}}"#).unwrap_err().to_string().contains("headerz"));
        assert!(parse(r#"{"rate_limit": "fast"}"#).is_err());
        assert!(parse(r#"{"rate_limit": -1}"#).is_err());
        for (body, want) in [
            (r#"{"rate_limit": 0}"#, "rate_limit"),
            (r#"{"max_attempts": 51}"#, "max_attempts"),
            (r#"{"headers": {"Host": "x"}}"#, "Host"),
            (
                r#"{"headers": {"Webhook-Signature": "v1,forged"}}"#,
                "Webhook-Signature",
            ),
        ] {
            let err = settings_patch("org_a", &parse(body).unwrap()).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
            assert!(!err.contains("forged"), "{err}");
        }
    }

    #[test]
    fn settings_view_shows_the_spec() {
        let mut ep = endpoint();
        assert_eq!(
            serde_json::to_value(settings_view(&ep)).unwrap(),
            json!({"headers": {}, "rate_limit": null, "max_attempts": null})
        );
        ep.spec.headers.insert("X-Tenant".into(), "a".into());
        ep.spec.rate_limit = Some(2);
        ep.spec.max_attempts = Some(3);
        let mut view = settings_view(&ep);
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            json!({"headers": {"X-Tenant": "a"}, "rate_limit": 2, "max_attempts": 3})
        );
        view.redact_header_values();
        assert_eq!(view.headers["X-Tenant"], REDACTED);
    }
}
