//! The `WebhookEndpoint` custom resource and the names every component shares.
//!
//! The CRD in `crds/` is generated from these types (`capy-webhooks crd`); a test fails when the
//! checked-in file drifts from them.

// Several `printcolumn(type_ = "string")` entries are distinct columns, not duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::signing::SignatureScheme;

/// API group of every resource this operator defines.
pub const GROUP: &str = "webhooks.capydb.io";
/// Field manager of every server-side apply this operator makes.
pub const FIELD_MANAGER: &str = "capy-webhooks";
/// Label naming the organization that owns an endpoint; lets one organization be listed by selector.
pub const ORGANIZATION_LABEL: &str = "webhooks.capydb.io/organization-id";
/// Label naming the endpoint an owned object (Secret, ConfigMap) belongs to.
pub const ENDPOINT_LABEL: &str = "webhooks.capydb.io/endpoint";
/// Standard label marking objects this operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "capy-webhooks";
/// Standard label telling what role an owned object plays.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// [`COMPONENT_LABEL`] value of signing-secret Secrets.
pub const SIGNING_SECRET_COMPONENT: &str = "signing-secret";

/// Condition type: the endpoint is fully reconciled and usable.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the signing secret exists and is valid.
pub const CONDITION_SECRET_READY: &str = "SecretReady";
/// Condition type: the client certificate the endpoint names can be presented (only on
/// endpoints that name one).
pub const CONDITION_CLIENT_CERTIFICATE_READY: &str = "ClientCertificateReady";

/// Longest URL accepted, in characters (the REST contract's limit).
pub const MAX_URL_LENGTH: usize = 2048;
/// Longest description accepted, in characters.
pub const MAX_DESCRIPTION_LENGTH: usize = 1024;
/// Most event-type patterns one endpoint may subscribe to.
pub const MAX_EVENT_TYPES: usize = 64;
/// Longest event-type pattern accepted, in characters.
pub const MAX_EVENT_TYPE_LENGTH: usize = 128;

/// Most `maxAttempts` accepted.
pub const MAX_ATTEMPTS_LIMIT: u32 = 50;
/// Most custom headers one endpoint may send.
pub const MAX_CUSTOM_HEADERS: usize = 16;
/// Longest custom header value accepted, in bytes.
pub const MAX_HEADER_VALUE_LENGTH: usize = 1024;
/// Highest `rateLimit` accepted, in deliveries per second.
pub const MAX_RATE_LIMIT: u32 = 10_000;
/// Header names a custom header may not take (lowercase): the signature, the body's framing and
/// type, the host, who sends, and hop-by-hop headers.
pub const FORBIDDEN_HEADERS: [&str; 14] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// Event-type pattern: dot-separated segments, optionally ending in `.*` (`database.*`).
pub const EVENT_TYPE_PATTERN: &str = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(\.\*)?$";
/// Organization ids end up in a label value, so they must be valid label values.
pub const ORGANIZATION_ID_PATTERN: &str = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$";

/// Desired state of one outbound webhook endpoint of one organization.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "webhooks.capydb.io",
    version = "v1",
    kind = "WebhookEndpoint",
    namespaced,
    status = "WebhookEndpointStatus",
    shortname = "whep",
    category = "capydb",
    doc = "An outbound webhook endpoint: where CapyDB delivers signed events for one organization.",
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".spec.url",
        description = "Where events are delivered"
    ),
    printcolumn(
        name = "Active",
        type_ = "boolean",
        json_path = ".spec.active",
        description = "Whether deliveries are sent"
    ),
    printcolumn(
        name = "Health",
        type_ = "string",
        json_path = ".status.health",
        description = "Health from recent delivery outcomes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Reconciled and usable"
    ),
    printcolumn(
        name = "Organization",
        type_ = "string",
        json_path = ".spec.organizationId",
        priority = 1,
        description = "Owning organization"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    selectable = ".spec.organizationId"
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointSpec {
    /// Organization that owns this endpoint. Set once at creation; it cannot change.
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
    )]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("organizationId is immutable"))]
    pub organization_id: String,

    /// Absolute http(s) URL that receives deliveries (at most 2048 characters). Whether plain
    /// http and private addresses are allowed is the operator's configuration.
    #[schemars(length(min = 1, max = MAX_URL_LENGTH))]
    #[x_kube(validation = kube::core::Rule::new(
        "isURL(self) && url(self).getScheme() in ['https', 'http'] && url(self).getHostname() != ''"
    ).message("url must be an absolute http:// or https:// URL with a host"))]
    pub url: String,

    /// Free text shown to users (at most 1024 characters).
    #[serde(default)]
    #[schemars(length(max = MAX_DESCRIPTION_LENGTH))]
    pub description: String,

    /// Event types delivered to this endpoint: exact names (`database.created`) or prefixes
    /// (`database.*`). Empty means every event type.
    #[serde(default)]
    #[schemars(
        length(max = MAX_EVENT_TYPES),
        inner(length(min = 1, max = MAX_EVENT_TYPE_LENGTH), pattern(EVENT_TYPE_PATTERN))
    )]
    pub event_types: Vec<String>,

    /// Whether events are delivered. Pending deliveries of an inactive endpoint wait.
    #[serde(default = "default_active")]
    pub active: bool,

    /// Raise this number to ask the controller for a new signing secret; the previous secret
    /// keeps co-signing for the grace period. It can only be raised.
    #[serde(default)]
    #[schemars(range(min = 0))]
    #[x_kube(validation = kube::core::Rule::new("self >= oldSelf").message("secretRotation can only be raised"))]
    pub secret_rotation: i64,

    /// Attempts per delivery before it is marked failed (1 to 50); defaults to the retry
    /// schedule's length. Applies to deliveries created after it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_ATTEMPTS_LIMIT))]
    pub max_attempts: Option<u32>,

    /// Extra HTTP headers sent with every delivery (at most 16; names are HTTP tokens; values at
    /// most 1024 printable ASCII characters). The signature headers, `content-type`,
    /// `content-length`, `host`, `user-agent` and hop-by-hop headers cannot be set. Anyone who may
    /// read this resource can read the values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "custom_headers_schema")]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(k, k.matches(\"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$\") && !(k.lowerAscii() in ['webhook-id', 'webhook-timestamp', 'webhook-signature', 'content-type', 'content-length', 'host', 'user-agent', 'connection', 'transfer-encoding', 'te', 'trailer', 'upgrade', 'keep-alive', 'proxy-connection']))"
    ).message("header names must be HTTP tokens and must not be a signature, content, host, user-agent or hop-by-hop header"))]
    pub headers: BTreeMap<String, String>,

    /// Most deliveries per second sent to this endpoint (1 to 10000); unset means no limit.
    /// Deliveries over the rate wait; none is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_RATE_LIMIT))]
    pub rate_limit: Option<u32>,

    /// How deliveries are signed: `hmac-sha256` (Standard Webhooks `v1`, a shared `whsec_`
    /// secret; the default) or `ed25519` (`v1a`; the Secret holds the `whsk_` private key and
    /// receivers verify with its `whpk_` public key). A change makes a new key of the new scheme
    /// the way a rotation does: the previous key co-signs for the grace period.
    #[serde(default, skip_serializing_if = "is_default_scheme")]
    pub signature_scheme: SignatureScheme,

    /// A client certificate the dispatcher presents to the receiver (mutual TLS). Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificate>,

    /// `unordered` (the default: up to the dispatcher's per-endpoint concurrency in flight, each
    /// delivery on its own schedule) or `fifo`: one attempt in flight at a time, in ingest order.
    /// A failing delivery then holds back every later one until it succeeds or exhausts its
    /// attempts.
    #[serde(default, skip_serializing_if = "is_default_ordering")]
    pub ordering: Ordering,

    /// A CEL expression over `event.type` and `event.data`: only the events it gives `true` for
    /// are delivered (on top of `eventTypes`). Unset: every event of the types. A filter that does
    /// not compile, or is estimated too costly, makes the endpoint not Ready (`InvalidSpec`) and
    /// matches nothing; an evaluation error is no match (README, "Filtering with CEL").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_FILTER_LENGTH))]
    pub filter: Option<String>,
}

/// Longest endpoint filter, in characters (see [`crate::delivery::filter`]).
pub const MAX_FILTER_LENGTH: usize = 2048;

/// In what order an endpoint's deliveries are attempted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Each delivery on its own schedule, several in flight at once.
    #[default]
    Unordered,
    /// One at a time, in ingest order: a failing head holds back the deliveries behind it.
    Fifo,
}

impl Ordering {
    /// The name used by the REST API and the CR.
    pub fn as_str(self) -> &'static str {
        match self {
            Ordering::Unordered => "unordered",
            Ordering::Fifo => "fifo",
        }
    }
}

fn is_default_ordering(ordering: &Ordering) -> bool {
    *ordering == Ordering::default()
}

/// Where an endpoint's client certificate is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificate {
    /// A Secret of type `kubernetes.io/tls` in the endpoint's namespace: `tls.crt` (the
    /// certificate, then any intermediates) and `tls.key`. While it is missing, of another type or
    /// malformed, the endpoint is not Ready and its deliveries wait.
    #[schemars(length(min = 1, max = 253), pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub secret_name: String,
}

fn is_default_scheme(scheme: &SignatureScheme) -> bool {
    *scheme == SignatureScheme::default()
}

/// Pattern of a custom header value: printable ASCII, spaces and tabs.
pub const HEADER_VALUE_PATTERN: &str = r"^[\t\x20-\x7e]*$";

/// The schema of `spec.headers`: a map of at most [`MAX_CUSTOM_HEADERS`] entries whose values
/// are bounded printable text (schemars' `length` and `inner` do not reach a map's values).
fn custom_headers_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": MAX_CUSTOM_HEADERS,
        "additionalProperties": {
            "type": "string",
            "maxLength": MAX_HEADER_VALUE_LENGTH,
            "pattern": HEADER_VALUE_PATTERN,
        },
    })
}

fn default_active() -> bool {
    true
}

/// Health of an endpoint, from recent delivery outcomes (the README defines the rule).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Recent deliveries succeed.
    Healthy,
    /// Some recent deliveries fail.
    Degraded,
    /// Recent deliveries fail.
    Failing,
    /// The endpoint is inactive.
    Disabled,
    /// No delivery yet.
    #[default]
    Unknown,
}

impl Health {
    /// The lowercase name used by the REST API and the CR status.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failing => "failing",
            Health::Disabled => "disabled",
            Health::Unknown => "unknown",
        }
    }
}

/// Observed state, written by the controller (and the dispatcher's periodic summary).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` and `SecretReady`, plus `Healthy` once deliveries happen.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Name of the Secret holding the signing secret(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// The last `spec.secretRotation` the controller completed.
    #[serde(default)]
    pub secret_rotation: i64,

    /// Health from recent delivery outcomes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,

    /// Why the endpoint was disabled automatically, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,

    /// Summary of delivery outcomes, written at most once per summary interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<DeliverySummary>,

    /// When this status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,

    /// The generation and `active` flag of the endpoint the controller last announced to the
    /// platform (operational webhooks): the next change is told against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced: Option<Announced>,
}

/// What the controller last announced of an endpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub struct Announced {
    /// The `metadata.generation` it described.
    pub generation: i64,
    /// Whether the endpoint was active then.
    pub active: bool,
}

/// Delivery counters kept in the endpoint's status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySummary {
    /// Deliveries that succeeded.
    pub succeeded: u64,
    /// Deliveries that gave up.
    pub failed: u64,
    /// Deliveries waiting for an attempt.
    pub pending: u64,
    /// Failed attempts since the last success.
    pub consecutive_failures: u64,
    /// Time of the last successful attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<Time>,
    /// Time of the last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_at: Option<Time>,
}

/// Longest event-type name in the catalog, in characters (the longest pattern an endpoint may
/// list).
pub const MAX_CATALOG_NAME_LENGTH: usize = MAX_EVENT_TYPE_LENGTH;
/// Pattern of a catalog event type's name: dot-separated segments, no wildcard.
pub const EVENT_TYPE_NAME_PATTERN: &str = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$";

/// One event type of the catalog: what platform services may send and endpoints subscribe to.
///
/// Read only in the operator's home namespace (the namespaced chart needs no cluster role). When
/// the catalog is empty, every type is accepted as before; once it has types, endpoints must
/// subscribe to catalog types and ingest validates `data` against each type's schema.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "webhooks.capydb.io",
    version = "v1",
    kind = "WebhookEventType",
    namespaced,
    shortname = "whet",
    category = "capydb",
    doc = "An event type of the webhook catalog: its name, description, optional JSON Schema of `data`, and an example.",
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.name",
        description = "The event type"
    ),
    printcolumn(
        name = "Group",
        type_ = "string",
        json_path = ".spec.group",
        description = "Group shown to users"
    ),
    printcolumn(
        name = "Deprecated",
        type_ = "boolean",
        json_path = ".spec.deprecated",
        description = "Still accepted, with a warning to subscribers"
    ),
    printcolumn(
        name = "Description",
        type_ = "string",
        json_path = ".spec.description",
        priority = 1,
        description = "What the event means"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEventTypeSpec {
    /// The event type, e.g. `database.backup.completed`: dot-separated segments of letters,
    /// digits, `_` and `-`, no wildcard; unique in the catalog (when two objects name the same
    /// type, the older one counts).
    #[schemars(length(min = 1, max = MAX_CATALOG_NAME_LENGTH))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.matches('^[A-Za-z0-9_-]+(\\\\.[A-Za-z0-9_-]+)*$')"
    ).message("name must be dot-separated segments of letters, digits, '_' and '-' (no wildcard), e.g. database.backup.completed"))]
    pub name: String,

    /// What the event means, shown to users choosing what to receive (at most 1024 characters).
    #[serde(default)]
    #[schemars(length(max = MAX_DESCRIPTION_LENGTH))]
    pub description: String,

    /// A group to show related types together (e.g. `database`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub group: Option<String>,

    /// JSON Schema (draft 2020-12) of the event's `data`; ingest refuses data that does not
    /// conform. Unset: any object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object_schema")]
    pub schema: Option<serde_json::Value>,

    /// An example of the event's `data`, shown to users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object_schema")]
    pub example: Option<serde_json::Value>,

    /// Deprecated types are still accepted; endpoints that subscribe to them get a warning.
    #[serde(default)]
    pub deprecated: bool,
}

/// Any JSON object, kept as written (a JSON Schema, an example payload).
fn free_object_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Which namespaces the operator serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One namespace.
    Namespace(String),
    /// Every namespace (needs cluster-wide RBAC).
    AllNamespaces,
}

impl Scope {
    /// An API handle over this scope for any namespaced kind.
    pub fn api<K>(&self, client: kube::Client) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            Scope::Namespace(ns) => kube::Api::namespaced(client, ns),
            Scope::AllNamespaces => kube::Api::all(client),
        }
    }
}

/// Formats a time as the REST contract wants it: RFC 3339, UTC, whole seconds, `Z`.
pub fn rfc3339(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Name of the Secret that holds an endpoint's signing secret.
pub fn signing_secret_name(endpoint_name: &str) -> String {
    format!("{endpoint_name}-signing")
}

/// The custom resources this operator defines, as `capy-webhooks crd --kind` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrdKind {
    /// `WebhookEndpoint`.
    WebhookEndpoint,
    /// `WebhookEventType` (the event-type catalog).
    WebhookEventType,
}

impl CrdKind {
    /// Every kind, in the order `capy-webhooks crd` prints them.
    pub const ALL: [CrdKind; 2] = [CrdKind::WebhookEndpoint, CrdKind::WebhookEventType];

    /// The file under `crds/` (and the chart's `files/`) that holds this kind's CRD.
    pub fn file_name(self) -> &'static str {
        match self {
            CrdKind::WebhookEndpoint => "webhookendpoints.webhooks.capydb.io.yaml",
            CrdKind::WebhookEventType => "webhookeventtypes.webhooks.capydb.io.yaml",
        }
    }
}

/// The WebhookEndpoint CRD as YAML, exactly as checked in under `crds/`.
pub fn crd_yaml() -> String {
    kind_crd_yaml(CrdKind::WebhookEndpoint)
}

/// One kind's CRD as YAML, exactly as checked in under `crds/` ([`CrdKind::file_name`]).
pub fn kind_crd_yaml(kind: CrdKind) -> String {
    let crd = match kind {
        CrdKind::WebhookEndpoint => WebhookEndpoint::crd(),
        CrdKind::WebhookEventType => WebhookEventType::crd(),
    };
    let yaml = serde_yaml::to_string(&crd).expect("the CRD always serializes");
    format!("# Generated by `capy-webhooks crd`; do not edit. Regenerate with `make crds`.\n{yaml}")
}

/// Every CRD as one multi-document YAML stream (what `capy-webhooks crd` prints without
/// `--kind`): `capy-webhooks crd | kubectl apply -f -` installs them all.
pub fn all_crds_yaml() -> String {
    CrdKind::ALL.map(kind_crd_yaml).join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_has_contracted_names_and_columns() {
        let crd = WebhookEndpoint::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("webhookendpoints.webhooks.capydb.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        for wanted in ["URL", "Active", "Health", "Age"] {
            assert!(columns.contains(&wanted), "missing printer column {wanted}");
        }
    }

    #[test]
    fn checked_in_crds_match_the_types() {
        for kind in CrdKind::ALL {
            let path = format!("{}/crds/{}", env!("CARGO_MANIFEST_DIR"), kind.file_name());
            let on_disk = std::fs::read_to_string(&path).expect("crds/ file exists");
            assert!(
                on_disk == kind_crd_yaml(kind),
                "crds/{} is stale: run `make crds`",
                kind.file_name()
            );
        }
    }

    #[test]
    fn event_type_crd_has_its_names_columns_and_name_rule() {
        let crd = WebhookEventType::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("webhookeventtypes.webhooks.capydb.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = serde_json::to_value(&crd.spec.versions[0]).unwrap();
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Type", "Group", "Deprecated", "Description", "Age"]);
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["name"]));
        let rule = spec["properties"]["name"]["x-kubernetes-validations"][0]["rule"]
            .as_str()
            .unwrap();
        // The CEL rule's regex (CEL string escapes undone) is the one the operator uses.
        assert_eq!(
            rule,
            format!("self.matches('{}')", EVENT_TYPE_NAME_PATTERN.replace('\\', "\\\\"))
        );
        for free in ["schema", "example"] {
            assert_eq!(spec["properties"][free]["x-kubernetes-preserve-unknown-fields"], true);
        }
    }

    #[test]
    fn all_crds_is_every_kind_in_one_stream() {
        let all = all_crds_yaml();
        assert_eq!(all.matches("kind: CustomResourceDefinition").count(), 2);
        assert!(all.contains("name: webhookendpoints.webhooks.capydb.io"));
        assert!(all.contains("name: webhookeventtypes.webhooks.capydb.io"));
    }

    #[test]
    fn spec_defaults_apply_when_fields_are_absent() {
        let spec: WebhookEndpointSpec =
            serde_json::from_str(r#"{"organizationId":"org_1","url":"https://example.com/hook"}"#).unwrap();
        assert!(spec.active);
        assert!(spec.event_types.is_empty());
        assert_eq!(spec.secret_rotation, 0);
        assert_eq!(spec.description, "");
    }

    #[test]
    fn patterns_in_constants_match_schema_attributes() {
        let schema = serde_json::to_string(&WebhookEndpoint::crd()).unwrap();
        let escaped = |p: &str| serde_json::to_string(p).unwrap();
        assert!(schema.contains(&escaped(EVENT_TYPE_PATTERN)));
        assert!(schema.contains(&escaped(ORGANIZATION_ID_PATTERN)));
    }

    #[test]
    fn the_header_rule_forbids_every_forbidden_header() {
        let crd = serde_json::to_value(WebhookEndpoint::crd()).unwrap();
        let headers =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["headers"];
        let rule = headers["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
        let named: Vec<&str> = rule
            .split_once(" in [")
            .unwrap()
            .1
            .split(']')
            .next()
            .unwrap()
            .split(", ")
            .map(|n| n.trim_matches('\''))
            .collect();
        assert_eq!(named, FORBIDDEN_HEADERS);
        assert_eq!(headers["maxProperties"], MAX_CUSTOM_HEADERS);
        assert_eq!(headers["additionalProperties"]["maxLength"], MAX_HEADER_VALUE_LENGTH);
    }
}
