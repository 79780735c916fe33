//! REST ⇄ CR mapping: the documented JSON shapes and how they map onto `WebhookEndpoint`s.
//! Pure functions, tested without IO.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::resources::{Health, ORGANIZATION_LABEL, WebhookEndpoint, WebhookEndpointSpec};
use crate::validation::{
    UrlPolicy, validate_description, validate_event_types, validate_headers, validate_max_attempts,
    validate_rate_limit, validate_url,
};

/// The Endpoint object of the REST contract, field for field.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct EndpointView {
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Free text.
    pub description: String,
    /// Subscribed event types; empty means all.
    pub event_types: Vec<String>,
    /// The CR's name.
    pub id: String,
    /// Whether deliveries are sent.
    pub is_active: bool,
    /// Owning organization.
    pub organization_id: String,
    /// RFC 3339 UTC; moves when the endpoint's settings change.
    pub updated_at: String,
    /// Delivery target.
    pub url: String,
    /// Only in list responses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<&'static str>,
}

/// Body of `POST /webhook-endpoints`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// Required delivery target.
    pub url: String,
    /// Optional free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Optional event types; absent or empty means all.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    /// Optional; defaults to true.
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// Body of `PATCH /webhook-endpoints/{id}`: any subset of the settable fields.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// New delivery target.
    pub url: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New event types (replaces the list).
    pub event_types: Option<Vec<String>>,
    /// New active flag.
    pub is_active: Option<bool>,
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

/// Maps a CR to the REST Endpoint object; `with_health` for list responses.
pub fn endpoint_view(endpoint: &WebhookEndpoint, with_health: bool) -> EndpointView {
    EndpointView {
        created_at: rfc3339(created_at(endpoint)),
        description: endpoint.spec.description.clone(),
        event_types: endpoint.spec.event_types.clone(),
        id: endpoint.name_any(),
        is_active: endpoint.spec.active,
        organization_id: endpoint.spec.organization_id.clone(),
        updated_at: rfc3339(updated_at(endpoint)),
        url: endpoint.spec.url.clone(),
        health: with_health.then(|| health(endpoint).as_str()),
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
    Ok(Value::Array(ops))
}

/// A new endpoint name: `ep-` and a lowercase ULID (see [`crate::ids`]). Sortable by creation
/// time, unguessable, and a valid DNS-1123 label.
pub fn new_endpoint_name(now: Timestamp) -> String {
    format!("ep-{}", crate::ids::time_sortable_id(now))
}

/// Body of `POST /webhook-endpoints/{id}/recover`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// Start of the window (RFC 3339), inclusive: failed deliveries created since then.
    pub since: String,
    /// End of the window (RFC 3339), exclusive; default now.
    pub until: Option<String>,
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
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SettingsView {
    /// Extra headers sent with every delivery.
    pub headers: BTreeMap<String, String>,
    /// Most deliveries per second, or null for no limit.
    pub rate_limit: Option<u32>,
    /// Attempts per delivery, or null for the retry schedule's length.
    pub max_attempts: Option<u32>,
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
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    /// New headers (the whole map), or null for none.
    #[serde(default, deserialize_with = "given")]
    pub headers: Option<Option<BTreeMap<String, String>>>,
    /// New rate limit, or null for none.
    #[serde(default, deserialize_with = "given")]
    pub rate_limit: Option<Option<u32>>,
    /// New attempt limit, or null for the schedule's length.
    #[serde(default, deserialize_with = "given")]
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
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};

    const LAX: UrlPolicy = UrlPolicy { allow_http: true };

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
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
            },
            LAX,
        )
        .unwrap();
        ep.metadata.creation_timestamp = Some(Time(ts(1_566_656_122)));
        ep
    }

    #[test]
    fn view_has_exactly_the_documented_fields() {
        let view = serde_json::to_value(endpoint_view(&endpoint(), false)).unwrap();
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
        let listed = serde_json::to_value(endpoint_view(&endpoint(), true)).unwrap();
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
