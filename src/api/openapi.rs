//! The OpenAPI 3.1 document of the public API, derived rather than written: its paths and
//! methods from the route table ([`ROUTES`]), what each route may answer from what its
//! [`Operation`] says of itself (access, body, rate limit), and every body's schema from the Rust
//! type that is (de)serialized, through schemars (JSON Schema 2020-12, which OpenAPI 3.1 uses).
//! A field added to a body type is in the document with it.

use std::sync::LazyLock;

use bytes::Bytes;
use schemars::generate::SchemaSettings;
use schemars::transform::{Transform, transform_subschemas};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use super::routes::{Access, Operation, ROUTES};
use super::{DEFAULT_DELIVERIES_LIMIT, MAX_DELIVERIES_LIMIT, model, portal};
use crate::http::ErrorBody;

/// Where components' schemas live, and what their `$ref`s start with.
const COMPONENTS: &str = "#/components/schemas/";

/// Builds a schema of a body type in a generator (which keeps the type's definition).
type SchemaOf = fn(&mut SchemaGenerator) -> Schema;

fn schema_of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// How an operation is documented, beyond what its route and [`Operation`] say.
struct OperationDoc {
    id: &'static str,
    summary: &'static str,
    description: Option<&'static str>,
    /// The request body's type (as it is deserialized), when the operation reads one.
    request: Option<SchemaOf>,
    /// Status of success, what it means, and the response body's type (as it is serialized).
    success: (u16, &'static str, SchemaOf),
    /// Answers beyond those every route of its kind has, or other words for one of them.
    errors: &'static [(u16, &'static str)],
}

/// The documentation of an operation; `None` for the routes outside the API (the document
/// itself and the portal's files).
fn operation_doc(operation: Operation) -> Option<OperationDoc> {
    use Operation::*;
    let doc = |id, summary, request, success| OperationDoc {
        id,
        summary,
        description: None,
        request,
        success,
        errors: &[],
    };
    Some(match operation {
        ListEndpoints => doc(
            "listWebhookEndpoints",
            "List endpoints with their health",
            None,
            (
                200,
                "The organization's endpoints, oldest first",
                schema_of::<model::EndpointList>,
            ),
        ),
        CreateEndpoint => OperationDoc {
            errors: &[(
                409,
                "The organization has the most endpoints allowed (`--max-endpoints-per-organization`, default 100); \
                 delete one first.",
            )],
            ..doc(
                "createWebhookEndpoint",
                "Create an endpoint; returns its signing secret once",
                Some(schema_of::<model::CreateRequest>),
                (201, "Created", schema_of::<model::EndpointWithSecret>),
            )
        },
        UpdateEndpoint => doc(
            "updateWebhookEndpoint",
            "Change any subset of url, description, event_types, is_active (and the extensions signature_scheme, client_certificate_secret, ordering, filter)",
            Some(schema_of::<model::UpdateRequest>),
            (200, "Updated", schema_of::<model::EndpointResponse>),
        ),
        DeleteEndpoint => doc(
            "deleteWebhookEndpoint",
            "Delete an endpoint",
            None,
            (200, "Deleted", schema_of::<model::Deleted>),
        ),
        RotateSecret => doc(
            "rotateWebhookEndpointSecret",
            "Rotate the signing secret; the previous one co-signs for a grace period",
            None,
            (200, "Rotated", schema_of::<model::EndpointWithSecret>),
        ),
        ListDeliveries => OperationDoc {
            errors: &[(400, "Invalid input: `limit` is not an integer from 1 to 1000.")],
            ..doc(
                "listWebhookDeliveries",
                "Newest deliveries first",
                None,
                (200, "Deliveries, newest first", schema_of::<model::DeliveryList>),
            )
        },
        EndpointStats => OperationDoc {
            description: Some(
                "Extension: the endpoint's delivery attempts of the current hour and the 23 before it (UTC \
                 hours), each hour with its successful and failed attempts and the median and 95th percentile \
                 latency of the successful ones: what the portal's chart draws. Counted in memory by the replica \
                 that sends the endpoint's attempts, since `since` (when that replica took the endpoint's \
                 organization over); nothing of it is stored.",
            ),
            ..doc(
                "getWebhookEndpointStats",
                "Attempts of the last 24 hours by hour (beyond the published contract)",
                None,
                (
                    200,
                    "24 hours of attempts, oldest first",
                    schema_of::<model::EndpointStats>,
                ),
            )
        },
        RetryDelivery => OperationDoc {
            errors: &[(409, "The delivery is still pending.")],
            ..doc(
                "retryWebhookDelivery",
                "Send a finished delivery once more, now (beyond the published contract)",
                None,
                (202, "Queued; it is attempted now", schema_of::<model::DeliveryResponse>),
            )
        },
        TestEndpoint => doc(
            "testWebhookEndpoint",
            "Send a webhook.test event to this endpoint (beyond the published contract)",
            None,
            (202, "Queued; it is attempted now", schema_of::<model::DeliveryResponse>),
        ),
        RecoverDeliveries => OperationDoc {
            description: Some(
                "Every `failed` delivery of the endpoint created in `[since, until)` is sent again, oldest \
                 first, at most 10,000 per call, each with one more attempt and its own id (`webhook-id` \
                 unchanged). The window is at most 14 days; `until` defaults to now. Answers once the \
                 deliveries are durable.",
            ),
            errors: &[(
                400,
                "Invalid JSON, unknown fields, a time that is not RFC 3339, since not before until, or a window \
                 longer than 14 days.",
            )],
            ..doc(
                "recoverDeliveries",
                "Send failed deliveries of a window again",
                Some(schema_of::<model::RecoverRequest>),
                (
                    202,
                    "The failed deliveries of the window are pending again.",
                    schema_of::<model::Recovered>,
                ),
            )
        },
        GetSettings => OperationDoc {
            description: Some(
                "Extension: custom headers, rate limit and attempt limit of one endpoint, kept in the \
                 WebhookEndpoint's spec (`headers`, `rateLimit`, `maxAttempts`). A read-only portal session \
                 sees header names only, each value `<redacted>`.",
            ),
            ..doc(
                "getEndpointSettings",
                "Read an endpoint's delivery settings",
                None,
                (
                    200,
                    "The endpoint's delivery settings.",
                    schema_of::<model::SettingsView>,
                ),
            )
        },
        UpdateSettings => OperationDoc {
            description: Some(
                "A field left out is kept; `null` clears it; `headers` replaces the whole map. `max_attempts` \
                 applies to deliveries created afterwards.",
            ),
            errors: &[(
                400,
                "Invalid JSON, unknown fields, wrong types, more than 16 headers, a header name that is not an \
                 HTTP token or that the operator sets (signature headers, content-type, content-length, host, \
                 user-agent, hop-by-hop headers), a name given twice in another case, a value over 1024 bytes \
                 or not printable ASCII, a rate limit outside 1..10000, or max_attempts outside 1..50.",
            )],
            ..doc(
                "updateEndpointSettings",
                "Change an endpoint's delivery settings",
                Some(schema_of::<model::SettingsPatch>),
                (
                    200,
                    "The endpoint's delivery settings after the change.",
                    schema_of::<model::SettingsView>,
                ),
            )
        },
        EraseEvent => OperationDoc {
            description: Some(
                "Extension (erasure, e.g. for GDPR): the event's payload is erased from every delivery log of \
                 the organization, and the ConfigMaps that stored it are rewritten without it. Its deliveries \
                 stay, listed with `payload: null`; those still pending end `failed`, with `last_error` saying \
                 the event was erased, and cannot be retried or recovered. Idempotent: erasing again answers \
                 the same count. Not for portal sessions (403). Answers once the erasure is durable (no \
                 attempt or read shows the payload again, even after a restart); the ConfigMap that held the \
                 payload is deleted right after.",
            ),
            errors: &[
                (
                    403,
                    "A valid credential of another organization, or a portal session (erasure needs an API key \
                     or a session token).",
                ),
                (
                    404,
                    "No delivery of this organization carries the event (unknown, another organization's, or \
                     pruned from the log).",
                ),
            ],
            ..doc(
                "eraseEvent",
                "Erase an event's payload",
                None,
                (
                    200,
                    "The payload is erased; how many deliveries carried it.",
                    schema_of::<model::Erased>,
                ),
            )
        },
        CreatePortalSession => OperationDoc {
            description: Some(
                "Extension: a signed, short-lived bearer token for the customer portal at `/portal/`, bound to \
                 this organization. It is accepted by the REST routes of this organization (a read-only \
                 session by the GET routes only; 403 elsewhere) and cannot open another portal session. It \
                 lasts `--portal-session-ttl` (1 h by default). The body may be empty.",
            ),
            errors: &[
                (400, "Invalid JSON, unknown fields or wrong types."),
                (
                    403,
                    "A valid credential of another organization, a session whose role is not one of \
                     `--clerk-required-role`, or a portal session (which cannot open another).",
                ),
            ],
            ..doc(
                "createPortalSession",
                "Open a portal session",
                Some(schema_of::<portal::SessionRequest>),
                (
                    201,
                    "The session: open `url` in a browser.",
                    schema_of::<model::PortalSession>,
                ),
            )
        },
        ListEventTypes => OperationDoc {
            description: Some(
                "Extension: the event-type catalog, every `WebhookEventType` of the operator's namespace, by \
                 name: what each type means, the JSON Schema its `data` must conform to (ingest refuses data \
                 that does not), an example, and whether it is deprecated. The same for every organization. \
                 When it is not empty, an endpoint's `event_types` must name its types or `prefix.*` patterns \
                 that match one of them.",
            ),
            ..doc(
                "listEventTypes",
                "List the event-type catalog",
                None,
                (200, "The catalog, by name", schema_of::<crate::catalog::EventTypeList>),
            )
        },
        TestFilter => OperationDoc {
            description: Some(
                "Extension: tries a CEL filter on an event, as ingest would evaluate an endpoint's `filter`, \
                 without sending or storing anything: the portal's \"Try\" button. The filter is refused as \
                 on an endpoint (400 with line and column). Without `data`, the catalog's example of \
                 `event_type` is the event's data (400 when the catalog has none). An evaluation error (a \
                 field the event lacks, a type mismatch) is no match, as at ingest, and is said in \
                 `evaluation_error`. Any credential of the organization, read-only portal sessions included.",
            ),
            ..doc(
                "testFilter",
                "Try a filter on an event",
                Some(schema_of::<model::FilterTestRequest>),
                (
                    200,
                    "Whether the filter matches the event",
                    schema_of::<model::FilterTestResult>,
                ),
            )
        },
        OpenApiDocument | PortalPage | PortalScript | PortalStyles => return None,
    })
}

const INVALID: &str = "Invalid input: bad JSON, an unknown field, a wrong type or an invalid value.";
const UNAUTHORIZED: &str = "Missing, malformed, unknown, revoked or expired credential.";
const FORBIDDEN: &str = "A valid credential of another organization (an organization or project-scoped API key, or \
                         a session); or a session whose organization role is not one of `--clerk-required-role`.";
const FORBIDDEN_TO_WRITE: &str = "A valid credential of another organization (an organization or project-scoped API \
                                  key, or a session); a session whose organization role is not one of \
                                  `--clerk-required-role`; or a read-only portal session.";
const NOT_FOUND: &str =
    "No such endpoint in this organization (another organization's endpoints are not found either).";
const TOO_LARGE: &str = "Request body too large.";
const NOT_JSON: &str = "Content-Type is not application/json.";
const TOO_MANY: &str = "Too many requests for this organization on the routes that send or read deliveries \
                        (`--organization-rate-limit`); retry after `Retry-After` seconds.";
const INTERNAL: &str = "Internal error.";
const UNAVAILABLE: &str = "The Kubernetes API or the credential store cannot be reached, the controller did not \
                           answer in time, or deliveries cannot be persisted now. See Retry-After.";

/// What a route may answer besides success, by status: what every route of its kind can answer
/// (authentication, a body, an endpoint in its path, the rate limit), then its own words.
fn error_statuses(template: &str, operation: Operation, doc: &OperationDoc) -> Vec<(u16, &'static str)> {
    let mut errors = vec![(401, UNAUTHORIZED), (500, INTERNAL), (503, UNAVAILABLE)];
    errors.push(match operation.access() {
        Some(Access::Write) => (403, FORBIDDEN_TO_WRITE),
        _ => (403, FORBIDDEN),
    });
    if operation.body().is_some() {
        errors.extend([(400, INVALID), (413, TOO_LARGE), (415, NOT_JSON)]);
    }
    if template.contains(":id") {
        errors.push((404, NOT_FOUND));
    }
    if operation.rate_limited() {
        errors.push((429, TOO_MANY));
    }
    for &(status, description) in doc.errors {
        errors.retain(|(s, _)| *s != status);
        errors.push((status, description));
    }
    errors.sort_by_key(|(status, _)| *status);
    errors
}

/// The path parameters of a template, with the names and words the document has for them.
fn path_parameter(name: &str) -> (&'static str, &'static str) {
    match name {
        super::routes::ORG => ("orgID", "Organization id"),
        super::routes::ENDPOINT => ("endpointID", "Endpoint id"),
        super::routes::DELIVERY => ("deliveryID", "Delivery id"),
        super::routes::EVENT => ("eventID", "Event id (`evt_...`), as ingest answered it"),
        other => panic!("path parameter :{other} has no documented name"),
    }
}

/// A route template as an OpenAPI path (`:org` is `{orgID}`), and its parameters.
fn openapi_path(template: &str) -> (String, Vec<Value>) {
    let mut parameters = Vec::new();
    let path = template
        .split('/')
        .map(|segment| match segment.strip_prefix(':') {
            Some(name) => {
                let (documented, description) = path_parameter(name);
                parameters.push(json!({
                    "name": documented,
                    "in": "path",
                    "required": true,
                    "schema": {"type": "string"},
                    "description": description,
                }));
                format!("{{{documented}}}")
            }
            None => segment.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/");
    (path, parameters)
}

fn json_content(schema: Schema) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn retry_after(status: u16) -> Option<Value> {
    match status {
        429 => Some(json!({"Retry-After": {
            "description": "Seconds to wait before the next request.",
            "schema": {"type": "integer", "minimum": 1},
        }})),
        503 => Some(json!({"Retry-After": {
            "description": "Seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 0},
        }})),
        _ => None,
    }
}

/// The query parameters of an operation.
fn query_parameters(operation: Operation) -> Vec<Value> {
    match operation {
        Operation::ListDeliveries => vec![json!({
            "name": "limit",
            "in": "query",
            "required": false,
            "description": "Most deliveries to return.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_DELIVERIES_LIMIT,
                "default": DEFAULT_DELIVERIES_LIMIT,
            },
        })],
        _ => Vec::new(),
    }
}

/// Tidies what schemars writes for the document's readers: no integer `format`s (`uint32`, ...:
/// OpenAPI knows none of them but `int32` and `int64`, and `minimum`/`maximum` say the range
/// already), and descriptions in paragraphs rather than the doc comments' wrapped lines.
#[derive(Clone)]
struct TidySchemas;

impl Transform for TidySchemas {
    fn transform(&mut self, schema: &mut Schema) {
        let is_integer = match schema.get("type") {
            Some(Value::String(t)) => t == "integer",
            Some(Value::Array(types)) => types.iter().any(|t| t == "integer"),
            _ => false,
        };
        if is_integer {
            schema.remove("format");
        }
        if let Some(Value::String(text)) = schema.get_mut("description") {
            *text = text
                .split("\n\n")
                .map(|paragraph| paragraph.replace('\n', " "))
                .collect::<Vec<_>>()
                .join("\n\n");
        }
        transform_subschemas(self, schema);
    }
}

fn generator(settings: SchemaSettings) -> SchemaGenerator {
    settings
        .with(|s| s.definitions_path = COMPONENTS.into())
        .with_transform(TidySchemas)
        .into_generator()
}

/// The OpenAPI document of every documented route.
pub fn document() -> Value {
    // Requests are described as they are read, responses as they are written: an optional field
    // of a request may be left out, one of a response is always there (as `null`).
    let mut requests = generator(SchemaSettings::draft2020_12().for_deserialize());
    let mut responses = generator(SchemaSettings::draft2020_12().for_serialize());
    let error = responses.subschema_for::<ErrorBody>();
    let mut paths = Map::new();
    for route in ROUTES.routes() {
        let Some(doc) = operation_doc(route.operation) else {
            continue;
        };
        let (path, parameters) = openapi_path(route.template);
        let item = paths.entry(path).or_insert_with(|| json!({"parameters": parameters}));
        let (status, description, schema) = doc.success;
        let mut answers = Map::new();
        answers.insert(
            status.to_string(),
            json!({"description": description, "content": json_content(schema(&mut responses))}),
        );
        for (status, description) in error_statuses(route.template, route.operation, &doc) {
            let mut answer = json!({"description": description, "content": json_content(error.clone())});
            if let Some(headers) = retry_after(status) {
                answer["headers"] = headers;
            }
            answers.insert(status.to_string(), answer);
        }
        let mut operation = json!({
            "operationId": doc.id,
            "summary": doc.summary,
            "responses": answers,
        });
        if let Some(description) = doc.description {
            operation["description"] = description.into();
        }
        let query = query_parameters(route.operation);
        if !query.is_empty() {
            operation["parameters"] = query.into();
        }
        if let (Some(request), Some(rule)) = (doc.request, route.operation.body()) {
            operation["requestBody"] = json!({
                "required": rule == crate::http::BodyRule::Required,
                "content": json_content(request(&mut requests)),
            });
        }
        item[route.method.to_ascii_lowercase()] = operation;
    }
    let mut schemas = responses.take_definitions(true);
    for (name, schema) in requests.take_definitions(true) {
        // One name, one schema: a type read and written alike must read as it is written.
        if let Some(written) = schemas.get(&name) {
            assert_eq!(written, &schema, "schema {name} differs between requests and responses");
        }
        schemas.insert(name, schema);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "CapyDB webhooks API",
            "version": "1.0.0",
            "description": "Outbound webhook endpoints and delivery history. Errors use the body {\"error\": \"...\"}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An organization or project-scoped API key (capy_live_...; either acts on every \
                                    route of its organization, and on no other), a Clerk session token (RS256 JWT), \
                                    or a portal session token (capy_portal_...)",
                },
            },
            "schemas": schemas,
        },
    })
}

/// The document as served at `GET /openapi.json`: built once, on first use.
pub static DOCUMENT_JSON: LazyLock<Bytes> =
    LazyLock::new(|| Bytes::from(serde_json::to_vec_pretty(&document()).expect("a JSON value serializes")));

/// The document as text: what `capy-webhooks openapi` prints and `GET /openapi.json` serves.
pub fn document_text() -> &'static str {
    std::str::from_utf8(&DOCUMENT_JSON).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::MAX_CUSTOM_HEADERS;

    fn doc() -> Value {
        document()
    }

    /// Every `$ref` in `value`.
    fn refs(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    found.push(r.clone());
                }
                map.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_ref_resolves() {
        let doc = doc();
        let served: Value = serde_json::from_slice(&DOCUMENT_JSON).unwrap();
        assert_eq!(served, doc, "the served bytes are the document");
        assert_eq!(doc["openapi"], "3.1.0");
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > 20, "{found:?}");
        for r in found {
            let name = r
                .strip_prefix(COMPONENTS)
                .unwrap_or_else(|| panic!("{r} is not a component"));
            assert!(schemas.contains_key(name), "{r} does not resolve");
        }
        // Every schema compiles as JSON Schema 2020-12 (what OpenAPI 3.1 uses).
        for name in schemas.keys() {
            let root = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$ref": format!("{COMPONENTS}{name}"),
                "components": doc["components"],
            });
            jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn the_documented_methods_are_the_ones_the_table_allows() {
        let doc = doc();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented_routes = 0;
        for route in ROUTES.routes() {
            let (path, _) = openapi_path(route.template);
            if route.operation.access().is_none() {
                assert!(!paths.contains_key(&path), "{path} is public, outside the API");
                continue;
            }
            documented_routes += 1;
            let item = paths[&path]
                .as_object()
                .unwrap_or_else(|| panic!("{path} is not documented"));
            let mut documented: Vec<String> = item
                .keys()
                .filter(|k| *k != "parameters")
                .map(|m| m.to_uppercase())
                .collect();
            documented.sort();
            let mut allowed: Vec<String> = ROUTES
                .allowed_methods(route.template)
                .split(", ")
                .map(str::to_string)
                .collect();
            allowed.sort();
            assert_eq!(allowed, documented, "{path}");
        }
        let documented_operations: usize = paths
            .values()
            .map(|item| item.as_object().unwrap().keys().filter(|k| *k != "parameters").count())
            .sum();
        assert_eq!(
            documented_operations, documented_routes,
            "every documented operation is a route"
        );
    }

    #[test]
    fn every_operation_documents_what_its_kind_answers() {
        let doc = doc();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap().iter().filter(|(k, _)| *k != "parameters") {
                let answers = operation["responses"].as_object().unwrap();
                for status in ["401", "403", "500", "503"] {
                    assert!(answers.contains_key(status), "{method} {path}: no {status}");
                }
                assert!(answers["503"]["headers"]["Retry-After"].is_object(), "{method} {path}");
                if operation.get("requestBody").is_some() {
                    for status in ["400", "413", "415"] {
                        assert!(answers.contains_key(status), "{method} {path}: no {status}");
                    }
                }
                if path.contains("{endpointID}") {
                    assert!(answers.contains_key("404"), "{method} {path}");
                }
            }
        }
    }

    /// Every key `value` has is a property of `schema` (a component), and every required one is
    /// there: what schemathesis checks on real answers, on an example here.
    fn assert_described(doc: &Value, schema: &str, value: &Value) {
        let component = &doc["components"]["schemas"][schema];
        let properties = component["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{schema}: {component}"));
        assert_eq!(
            component["additionalProperties"], false,
            "{schema} allows unknown fields"
        );
        let object = value.as_object().unwrap();
        for key in object.keys() {
            assert!(properties.contains_key(key), "{schema} lacks {key}");
        }
        for required in component["required"].as_array().into_iter().flatten() {
            assert!(
                object.contains_key(required.as_str().unwrap()),
                "{schema}: {required} missing"
            );
        }
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": format!("{COMPONENTS}{schema}"),
            "components": doc["components"],
        });
        let validator = jsonschema::validator_for(&root).unwrap();
        let errors: Vec<String> = validator.iter_errors(value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{schema}: {errors:?}\n{value:#}");
    }

    #[test]
    fn every_field_of_an_answer_is_in_its_schema() {
        let doc = doc();
        let endpoint = model::tests::example_endpoint();
        let view = model::endpoint_view(&endpoint);
        assert_described(&doc, "Endpoint", &serde_json::to_value(&view).unwrap());
        let listed = model::EndpointList {
            webhook_endpoints: vec![model::listed_endpoint_view(&endpoint)],
        };
        let listed = serde_json::to_value(&listed).unwrap();
        assert_described(&doc, "EndpointList", &listed);
        assert_described(&doc, "EndpointWithHealth", &listed["webhook_endpoints"][0]);
        let with_secret = model::EndpointWithSecret {
            webhook_endpoint: view.clone(),
            plaintext_secret: "whsec_c2VjcmV0".into(),
            warnings: vec!["event type legacy.done is deprecated".into()],
        };
        assert_described(&doc, "EndpointWithSecret", &serde_json::to_value(&with_secret).unwrap());
        let updated = model::EndpointResponse {
            webhook_endpoint: view,
            plaintext_secret: None,
            warnings: Vec::new(),
        };
        assert_described(&doc, "EndpointResponse", &serde_json::to_value(&updated).unwrap());
        assert_described(
            &doc,
            "Deleted",
            &serde_json::to_value(model::Deleted::default()).unwrap(),
        );
        let catalog = crate::catalog::Catalog::build(
            vec![crate::catalog::Source {
                object: "ns/backup".into(),
                version: "1".into(),
                age: String::new(),
                def: crate::catalog::EventTypeDef {
                    name: "database.backup.completed".into(),
                    description: "A backup finished".into(),
                    group: Some("database".into()),
                    schema: Some(json!({"type": "object", "required": ["database"]})),
                    example: Some(json!({"database": "db_1"})),
                    deprecated: false,
                },
            }],
            &mut Default::default(),
        );
        let listing: Value = serde_json::from_slice(&catalog.listing()).unwrap();
        assert_described(&doc, "EventTypeList", &listing);
        assert_described(&doc, "EventTypeList", &json!({"event_types": []}));
        let settings = model::settings_view(&endpoint);
        assert_described(&doc, "Settings", &serde_json::to_value(&settings).unwrap());
        for delivery in model::tests::example_deliveries() {
            let delivery = serde_json::to_value(&delivery).unwrap();
            assert_described(&doc, "Delivery", &delivery);
            assert_described(&doc, "DeliveryList", &json!({"deliveries": [delivery]}));
            assert_described(&doc, "DeliveryResponse", &json!({"delivery": delivery}));
        }
        assert_described(
            &doc,
            "Recovered",
            &serde_json::to_value(model::Recovered { recovered: 3 }).unwrap(),
        );
        let mut history = crate::delivery::attempt_stats::AttemptHistory::default();
        let now = jiff::Timestamp::from_second(1_796_637_600).unwrap();
        history.record(now, true, std::time::Duration::from_millis(42));
        history.record(now, false, std::time::Duration::from_millis(3));
        let stats = model::EndpointStats::of(&history.stats(now, now));
        let stats = serde_json::to_value(&stats).unwrap();
        assert_described(&doc, "EndpointStats", &stats);
        assert_described(&doc, "AttemptHour", &stats["hours"][23]);
        assert_described(&doc, "AttemptHour", &stats["hours"][0]);
        let session = model::PortalSession {
            url: "http://localhost/portal/#token=capy_portal_abc.def".into(),
            token: "capy_portal_abc.def".into(),
            expires_at: "2026-01-31T12:00:00Z".into(),
        };
        assert_described(&doc, "PortalSession", &serde_json::to_value(&session).unwrap());
        let error = crate::http::ApiError::not_found("x").body();
        assert_described(&doc, "Error", &serde_json::to_value(&error).unwrap());
    }

    #[test]
    fn request_schemas_state_the_validation_rules() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        let create = &schemas["CreateEndpoint"];
        assert_eq!(create["required"], json!(["url"]));
        assert_eq!(create["additionalProperties"], false);
        assert_eq!(create["properties"]["url"]["maxLength"], 2048);
        assert_eq!(create["properties"]["url"]["format"], "uri");
        assert_eq!(create["properties"]["description"]["maxLength"], 1024);
        let headers = &schemas["UpdateSettings"]["properties"]["headers"];
        assert_eq!(headers["maxProperties"], MAX_CUSTOM_HEADERS);
        assert!(
            headers["type"].as_array().unwrap().contains(&json!("null")),
            "{headers}"
        );
        let forbidden = headers["propertyNames"]["not"]["pattern"].as_str().unwrap();
        let forbidden = regex_lite_match(forbidden);
        for name in ["Host", "webhook-signature", "TE"] {
            assert!(forbidden(name), "{name}");
        }
        assert!(!forbidden("X-Tenant"));
        for (name, schema) in schemas.as_object().unwrap() {
            assert!(schema.get("$schema").is_none(), "{name}");
        }
    }

    /// Whether `name` matches the whole-name alternation `pattern` (`^(a|b)$`, letters written
    /// as `[xX]` classes): the document's forbidden header names, read back without a regex crate.
    fn regex_lite_match(pattern: &str) -> impl Fn(&str) -> bool {
        let inner = pattern.strip_prefix("^(").and_then(|p| p.strip_suffix(")$")).unwrap();
        let names: Vec<String> = inner
            .split('|')
            .map(|alternative| {
                let mut name = String::new();
                let mut chars = alternative.chars();
                while let Some(c) = chars.next() {
                    if c == '[' {
                        let class: String = chars.by_ref().take_while(|c| *c != ']').collect();
                        name.push(class.chars().next().unwrap().to_ascii_lowercase());
                    } else {
                        name.push(c);
                    }
                }
                name
            })
            .collect();
        move |candidate| names.contains(&candidate.to_ascii_lowercase())
    }
}
