//! The event-type catalog: which event types exist, what their `data` looks like, and the rules
//! that follow from it for endpoints (what they may subscribe to) and for ingest (what producers
//! may send).
//!
//! The catalog is the set of `WebhookEventType` objects in the operator's home namespace, read
//! through a watch ([`CatalogWatch`]). The rules ([`Catalog`]) are plain functions over plain
//! definitions ([`EventTypeDef`]), with no Kubernetes type in them. An empty catalog changes
//! nothing: every type is accepted, as before the catalog existed.
//!
//! Schemas are compiled once per version of their object ([`SchemaCache`]), when the catalog is
//! rebuilt after a change, never per event. Ingest reads the current [`Catalog`] behind an `Arc`:
//! a lookup in a prepared map, and a validation only for types that have a schema.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::delivery::event_types::matches_pattern;
use crate::resources::WebhookEventType;

/// One event type as the catalog lists it (and as `GET .../event-types` answers it).
#[derive(Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(rename = "EventType", deny_unknown_fields)]
pub struct EventTypeDef {
    /// The type, e.g. `database.backup.completed`.
    pub name: String,
    /// What the event means ("" when none was given).
    pub description: String,
    /// A group to show related types together; `null` when none.
    pub group: Option<String>,
    /// JSON Schema (draft 2020-12) of `data`; `null` when any object is accepted.
    #[schemars(with = "Option<serde_json::Map<String, Value>>")]
    pub schema: Option<Value>,
    /// An example of `data`; `null` when none.
    #[schemars(with = "Option<serde_json::Map<String, Value>>")]
    pub example: Option<Value>,
    /// Still accepted, with a warning to endpoints that subscribe to it.
    pub deprecated: bool,
}

/// One definition as read from the cluster, with what orders duplicates and keys compiled
/// schemas. Plain data: the watch makes these from `WebhookEventType` objects.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    /// Which object it is (`namespace/name`).
    pub object: String,
    /// The object's version (`resourceVersion`): a schema is compiled once per version.
    pub version: String,
    /// Orders objects that name the same type: the smallest wins (creation time, then object).
    pub age: String,
    /// The definition.
    pub def: EventTypeDef,
}

/// A schema compiled (or refused) for one version of one object.
#[derive(Clone)]
enum Compiled {
    Valid(Arc<jsonschema::Validator>),
    /// The schema is not a valid draft 2020-12 schema (logged); events of the type are not
    /// validated.
    Invalid,
}

/// Compiled schemas by object, each for the version it was compiled from: a rebuild after an
/// unrelated change compiles nothing again.
#[derive(Default)]
pub struct SchemaCache {
    by_object: HashMap<String, (String, Compiled)>,
}

impl SchemaCache {
    /// The compiled schema of `source`, compiling it only if its object changed since.
    fn compiled(&mut self, source: &Source, schema: &Value) -> Compiled {
        if let Some((version, compiled)) = self.by_object.get(&source.object)
            && *version == source.version
        {
            return compiled.clone();
        }
        let compiled = match jsonschema::draft202012::new(schema) {
            Ok(validator) => Compiled::Valid(Arc::new(validator)),
            Err(e) => {
                // The operator's own configuration, not event data: safe to log.
                warn!(object = %source.object, event_type = %source.def.name, error = %e,
                    "the schema of this event type is not a valid JSON Schema; its events are not validated");
                Compiled::Invalid
            }
        };
        self.by_object
            .insert(source.object.clone(), (source.version.clone(), compiled.clone()));
        compiled
    }

    /// Forgets objects that are gone.
    fn retain(&mut self, present: &HashSet<&str>) {
        self.by_object.retain(|object, _| present.contains(object.as_str()));
    }
}

struct Entry {
    def: EventTypeDef,
    validator: Option<Arc<jsonschema::Validator>>,
}

/// The catalog at one moment: every type by name, with its compiled schema, and the REST
/// listing already serialized.
pub struct Catalog {
    by_name: HashMap<String, Entry>,
    /// Names in order (the listing's order).
    names: Vec<String>,
    listing: Bytes,
}

/// An endpoint names an event type or pattern that the catalog does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// An exact type that is not in the catalog.
    #[error("event type {0} is not in the event-type catalog (GET /v1/organizations/{{orgID}}/event-types lists it)")]
    UnknownType(String),
    /// A `prefix.*` pattern that matches no type of the catalog.
    #[error(
        "event type pattern {0} matches no type of the event-type catalog (GET /v1/organizations/{{orgID}}/event-types lists it)"
    )]
    NoMatch(String),
}

/// What the catalog says of an event it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventVerdict {
    /// The catalog is empty: every type is accepted, as before the catalog existed.
    NoCatalog,
    /// The type is in the catalog, and its data conforms to the type's schema if it has one.
    Known,
    /// The catalog has types, but not this one (refused only with `--strict-event-types`).
    NotInCatalog,
}

/// An event's data does not conform to its type's schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data does not conform to the schema of event type {event_type} at {shown_pointer}: {reason}", shown_pointer = shown_pointer(.pointer))]
pub struct SchemaViolation {
    /// The event type.
    pub event_type: String,
    /// JSON pointer (RFC 6901) into `data` of the first value that does not conform; `""` is
    /// `data` itself.
    pub pointer: String,
    /// Why, as the validator says it (cut to [`MAX_REASON_CHARS`]).
    pub reason: String,
}

/// The longest reason a schema violation quotes: the validator may quote the offending value,
/// which can be as large as the event.
pub const MAX_REASON_CHARS: usize = 300;

fn shown_pointer(pointer: &str) -> String {
    if pointer.is_empty() {
        "\"\" (data itself)".to_string()
    } else {
        format!("\"{pointer}\"")
    }
}

fn cut(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// `GET /v1/organizations/{orgID}/event-types`: the catalog.
#[derive(Serialize, Debug, Clone, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EventTypeList {
    /// Every event type of the catalog, by name; empty when there is no catalog (every type is
    /// accepted then).
    pub event_types: Vec<EventTypeDef>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::build(Vec::new(), &mut SchemaCache::default())
    }
}

impl Catalog {
    /// The catalog of `sources`, compiling through `schemas` what changed. When several sources
    /// name one type, the oldest (smallest [`Source::age`], then [`Source::object`]) counts.
    pub fn build(mut sources: Vec<Source>, schemas: &mut SchemaCache) -> Self {
        sources.sort_by(|a, b| (&a.age, &a.object).cmp(&(&b.age, &b.object)));
        let mut by_name: HashMap<String, Entry> = HashMap::with_capacity(sources.len());
        for source in &sources {
            if by_name.contains_key(&source.def.name) {
                warn!(event_type = %source.def.name, ignored = %source.object,
                    "two WebhookEventTypes name the same type; the older one counts");
                continue;
            }
            let validator = match &source.def.schema {
                Some(schema) => match schemas.compiled(source, schema) {
                    Compiled::Valid(v) => Some(v),
                    Compiled::Invalid => None,
                },
                None => None,
            };
            by_name.insert(
                source.def.name.clone(),
                Entry {
                    def: source.def.clone(),
                    validator,
                },
            );
        }
        schemas.retain(&sources.iter().map(|s| s.object.as_str()).collect());
        let mut names: Vec<String> = by_name.keys().cloned().collect();
        names.sort();
        let listing = EventTypeList {
            event_types: names.iter().map(|n| by_name[n].def.clone()).collect(),
        };
        let listing = Bytes::from(serde_json::to_vec(&listing).expect("the listing always serializes"));
        Self {
            by_name,
            names,
            listing,
        }
    }

    /// Whether the catalog has no type (every rule then allows everything).
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The types, by name.
    pub fn types(&self) -> impl Iterator<Item = &EventTypeDef> {
        self.names.iter().map(|n| &self.by_name[n].def)
    }

    /// The definition of one type, if the catalog has it.
    pub fn definition(&self, name: &str) -> Option<&EventTypeDef> {
        self.by_name.get(name).map(|entry| &entry.def)
    }

    /// `{"event_types": [...]}`, serialized once per catalog.
    pub fn listing(&self) -> Bytes {
        self.listing.clone()
    }

    /// Checks an endpoint's `event_types` against the catalog: each exact type must be in it and
    /// each `prefix.*` pattern must match at least one of its types. Answers the warnings (a type
    /// that is deprecated, a pattern whose every match is). An empty catalog, or an empty list
    /// (every type), passes without warning.
    pub fn check_subscription(&self, patterns: &[String]) -> Result<Vec<String>, SubscriptionError> {
        let mut warnings = Vec::new();
        if self.is_empty() {
            return Ok(warnings);
        }
        for pattern in patterns {
            if !pattern.ends_with(".*") {
                match self.by_name.get(pattern) {
                    None => return Err(SubscriptionError::UnknownType(pattern.clone())),
                    Some(entry) if entry.def.deprecated => {
                        warnings.push(format!("event type {pattern} is deprecated"));
                    }
                    Some(_) => {}
                }
                continue;
            }
            let mut matched = self.types().filter(|t| matches_pattern(pattern, &t.name)).peekable();
            if matched.peek().is_none() {
                return Err(SubscriptionError::NoMatch(pattern.clone()));
            }
            if matched.all(|t| t.deprecated) {
                warnings.push(format!("event type pattern {pattern} matches only deprecated types"));
            }
        }
        Ok(warnings)
    }

    /// Checks an event against the catalog: its `data` must conform to its type's schema, if the
    /// type is in the catalog and has one. Allocates nothing for a type without a schema.
    pub fn check_event(&self, event_type: &str, data: &Value) -> Result<EventVerdict, SchemaViolation> {
        if self.is_empty() {
            return Ok(EventVerdict::NoCatalog);
        }
        let Some(entry) = self.by_name.get(event_type) else {
            return Ok(EventVerdict::NotInCatalog);
        };
        if let Some(validator) = &entry.validator
            && let Err(e) = validator.validate(data)
        {
            return Err(SchemaViolation {
                event_type: event_type.to_string(),
                pointer: e.instance_path().as_str().to_string(),
                reason: cut(e.to_string(), MAX_REASON_CHARS),
            });
        }
        Ok(EventVerdict::Known)
    }
}

/// The definition an object holds, or why it holds none the catalog can use.
pub fn source_of(object: &WebhookEventType) -> Source {
    let spec = &object.spec;
    Source {
        object: format!("{}/{}", object.namespace().unwrap_or_default(), object.name_any()),
        version: object.resource_version().unwrap_or_default(),
        age: object
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| crate::resources::rfc3339(t.0))
            .unwrap_or_default(),
        def: EventTypeDef {
            name: spec.name.clone(),
            description: spec.description.clone(),
            group: spec.group.clone(),
            schema: spec.schema.clone(),
            example: spec.example.clone(),
            deprecated: spec.deprecated,
        },
    }
}

/// The current catalog, kept up to date by a watch of the home namespace's `WebhookEventType`s.
/// Cheap to clone; clones share the catalog.
#[derive(Clone)]
pub struct CatalogWatch {
    current: Arc<RwLock<Arc<Catalog>>>,
    ready: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for CatalogWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogWatch")
            .field("event_types", &self.current().by_name.len())
            .field("ready", &*self.ready.borrow())
            .finish()
    }
}

impl Default for CatalogWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl CatalogWatch {
    /// An empty catalog, not ready until [`Self::run`] has listed the event types.
    pub fn new() -> Self {
        Self {
            current: Arc::default(),
            ready: Arc::new(watch::channel(false).0),
        }
    }

    /// A new catalog, watched in the background from now on (see [`Self::run`]).
    pub fn start(client: Client, namespace: &str) -> Self {
        let catalog = Self::new();
        tokio::spawn(catalog.clone().run(client, namespace.to_string()));
        catalog
    }

    /// A catalog that never changes (tests, tools).
    pub fn fixed(catalog: Catalog) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(catalog))),
            ready: Arc::new(watch::channel(true).0),
        }
    }

    /// Keeps the catalog up to date with the `WebhookEventType`s of `namespace`, until the
    /// process ends: every change rebuilds it (compiling only the schemas that changed).
    ///
    /// Without the `WebhookEventType` CRD in the cluster (an upgrade that did not apply it yet),
    /// the catalog is empty and ready, and the watch keeps trying, so it fills once the CRD is
    /// applied.
    pub async fn run(self, client: Client, namespace: String) {
        let api: Api<WebhookEventType> = Api::namespaced(client, &namespace);
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
        futures::pin_mut!(stream);
        let mut schemas = SchemaCache::default();
        let mut missing_told = false;
        while let Some(event) = stream.next().await {
            match event {
                // The reflector has applied the event to the store already.
                Ok(Event::Apply(_) | Event::Delete(_) | Event::InitDone) => {
                    let catalog = rebuild(&store, &mut schemas);
                    info!(namespace = %namespace, event_types = catalog.by_name.len(), "event-type catalog loaded");
                    *self.current.write().expect("catalog lock") = Arc::new(catalog);
                    self.ready.send_replace(true);
                }
                Ok(Event::Init | Event::InitApply(_)) => {}
                Err(e) if crd_missing(&e) => {
                    if !missing_told {
                        warn!(namespace = %namespace,
                            "the WebhookEventType CRD is not installed (apply crds/); the event-type catalog is empty until it is");
                        missing_told = true;
                    }
                    self.ready.send_replace(true);
                }
                Err(e) => warn!(error = %e, "event-type catalog watch failed; retrying"),
            }
        }
    }

    /// Waits until the first list of event types is in (or the CRD is known to be missing).
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as this handle: the wait ends only when ready.
        let _ = ready.wait_for(|r| *r).await;
    }

    /// The catalog as of now.
    pub fn current(&self) -> Arc<Catalog> {
        self.current.read().expect("catalog lock").clone()
    }
}

fn rebuild(store: &Store<WebhookEventType>, schemas: &mut SchemaCache) -> Catalog {
    let sources = store.state().iter().map(|o| source_of(o)).collect();
    Catalog::build(sources, schemas)
}

/// Whether a watch error says the resource is not served (its CRD is not installed).
fn crd_missing(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(name: &str) -> EventTypeDef {
        EventTypeDef {
            name: name.into(),
            description: format!("{name} happened"),
            group: None,
            schema: None,
            example: None,
            deprecated: false,
        }
    }

    fn source(object: &str, version: &str, age: &str, def: EventTypeDef) -> Source {
        Source {
            object: object.into(),
            version: version.into(),
            age: age.into(),
            def,
        }
    }

    fn catalog(defs: Vec<EventTypeDef>) -> Catalog {
        let sources = defs
            .into_iter()
            .enumerate()
            .map(|(i, d)| source(&format!("ns/o{i}"), "1", "2026-01-01T00:00:00Z", d))
            .collect();
        Catalog::build(sources, &mut SchemaCache::default())
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn backup_schema() -> Value {
        json!({
            "type": "object",
            "required": ["database", "size_bytes"],
            "properties": {
                "database": {"type": "string"},
                "size_bytes": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"type": "string"}}
            }
        })
    }

    #[test]
    fn an_empty_catalog_allows_every_subscription_and_event() {
        let empty = Catalog::default();
        assert!(empty.is_empty());
        assert_eq!(
            empty.check_subscription(&strings(&["anything.at.all", "x.*"])),
            Ok(vec![])
        );
        assert_eq!(
            empty.check_event("whatever", &json!({"a": 1})),
            Ok(EventVerdict::NoCatalog)
        );
        assert_eq!(&empty.listing()[..], br#"{"event_types":[]}"#);
    }

    #[test]
    fn subscriptions_must_name_catalog_types_or_patterns_that_match_one() {
        let c = catalog(vec![
            def("database.created"),
            def("database.backup.completed"),
            def("user.deleted"),
        ]);
        assert_eq!(c.check_subscription(&[]), Ok(vec![]), "every type");
        assert_eq!(
            c.check_subscription(&strings(&[
                "database.created",
                "database.*",
                "database.backup.*",
                "user.*"
            ])),
            Ok(vec![])
        );
        assert_eq!(
            c.check_subscription(&strings(&["database.created", "database.dropped"])),
            Err(SubscriptionError::UnknownType("database.dropped".into()))
        );
        // Exact and case-sensitive, as delivery matching is.
        assert_eq!(
            c.check_subscription(&strings(&["Database.created"])),
            Err(SubscriptionError::UnknownType("Database.created".into()))
        );
        assert_eq!(
            c.check_subscription(&strings(&["billing.*"])),
            Err(SubscriptionError::NoMatch("billing.*".into()))
        );
        // `user.*` needs a segment after the prefix: `user` alone is no type here.
        assert_eq!(
            c.check_subscription(&strings(&["user.deleted.*"])),
            Err(SubscriptionError::NoMatch("user.deleted.*".into()))
        );
        let message = SubscriptionError::UnknownType("database.dropped".into()).to_string();
        assert!(
            message.starts_with("event type database.dropped is not in the event-type catalog"),
            "{message}"
        );
    }

    #[test]
    fn deprecated_types_are_accepted_with_a_warning() {
        let old = EventTypeDef {
            deprecated: true,
            ..def("legacy.backup.done")
        };
        let c = catalog(vec![old, def("legacy.created"), def("database.created")]);
        assert_eq!(
            c.check_subscription(&strings(&["legacy.backup.done", "database.created"])),
            Ok(strings(&["event type legacy.backup.done is deprecated"]))
        );
        // A pattern warns only when everything it matches is deprecated.
        assert_eq!(c.check_subscription(&strings(&["legacy.*"])), Ok(vec![]));
        assert_eq!(
            c.check_subscription(&strings(&["legacy.backup.*"])),
            Ok(strings(&[
                "event type pattern legacy.backup.* matches only deprecated types"
            ]))
        );
    }

    #[test]
    fn events_are_checked_against_their_schema() {
        let backup = EventTypeDef {
            schema: Some(backup_schema()),
            ..def("database.backup.completed")
        };
        let c = catalog(vec![backup, def("database.created")]);
        let good = json!({"database": "db1", "size_bytes": 10, "tags": ["a"]});
        assert_eq!(
            c.check_event("database.backup.completed", &good),
            Ok(EventVerdict::Known)
        );
        assert_eq!(
            c.check_event("database.created", &json!({"x": [1]})),
            Ok(EventVerdict::Known)
        );
        assert_eq!(
            c.check_event("database.dropped", &json!({})),
            Ok(EventVerdict::NotInCatalog)
        );

        let bad = c
            .check_event(
                "database.backup.completed",
                &json!({"database": "db1", "size_bytes": -1}),
            )
            .unwrap_err();
        assert_eq!(bad.pointer, "/size_bytes");
        assert!(bad.reason.contains("minimum"), "{}", bad.reason);
        let nested = c
            .check_event(
                "database.backup.completed",
                &json!({"database": "db1", "size_bytes": 1, "tags": ["a", 2]}),
            )
            .unwrap_err();
        assert_eq!(nested.pointer, "/tags/1");
        let missing = c
            .check_event("database.backup.completed", &json!({"size_bytes": 1}))
            .unwrap_err();
        assert_eq!(missing.pointer, "");
        assert!(missing.reason.contains("database"), "{}", missing.reason);
        assert!(
            missing.to_string().starts_with(
                "data does not conform to the schema of event type database.backup.completed at \"\" (data itself): "
            ),
            "{missing}"
        );
        assert!(bad.to_string().contains("at \"/size_bytes\": "), "{bad}");
    }

    #[test]
    fn long_reasons_are_cut() {
        let c = catalog(vec![EventTypeDef {
            schema: Some(json!({"type": "object", "properties": {"s": {"type": "integer"}}})),
            ..def("a.b")
        }]);
        let huge = "x".repeat(10_000);
        let e = c.check_event("a.b", &json!({ "s": huge })).unwrap_err();
        assert!(e.reason.chars().count() <= MAX_REASON_CHARS + 1, "{}", e.reason.len());
        assert!(e.reason.ends_with('…'));
    }

    #[test]
    fn an_invalid_schema_validates_nothing_and_the_type_stays_listed() {
        let c = catalog(vec![EventTypeDef {
            schema: Some(json!({"type": "no-such-type"})),
            ..def("a.b")
        }]);
        assert_eq!(
            c.check_event("a.b", &json!({"anything": true})),
            Ok(EventVerdict::Known)
        );
        assert_eq!(c.types().count(), 1);
    }

    #[test]
    fn the_oldest_object_naming_a_type_counts() {
        let newer = EventTypeDef {
            description: "newer".into(),
            ..def("a.b")
        };
        let older = EventTypeDef {
            description: "older".into(),
            ..def("a.b")
        };
        let c = Catalog::build(
            vec![
                source("ns/z", "1", "2026-02-01T00:00:00Z", newer),
                source("ns/y", "1", "2026-01-01T00:00:00Z", older),
            ],
            &mut SchemaCache::default(),
        );
        assert_eq!(c.types().map(|t| t.description.as_str()).collect::<Vec<_>>(), ["older"]);
    }

    #[test]
    fn the_listing_is_sorted_by_name_with_every_field() {
        let c = catalog(vec![
            EventTypeDef {
                group: Some("user".into()),
                deprecated: true,
                ..def("user.deleted")
            },
            EventTypeDef {
                schema: Some(json!({"type": "object"})),
                example: Some(json!({"id": "db_1"})),
                ..def("database.created")
            },
        ]);
        let listed: Value = serde_json::from_slice(&c.listing()).unwrap();
        assert_eq!(
            listed,
            json!({"event_types": [
                {"name": "database.created", "description": "database.created happened", "group": null,
                 "schema": {"type": "object"}, "example": {"id": "db_1"}, "deprecated": false},
                {"name": "user.deleted", "description": "user.deleted happened", "group": "user",
                 "schema": null, "example": null, "deprecated": true},
            ]})
        );
    }

    #[test]
    fn schemas_are_compiled_once_per_object_version() {
        let mut cache = SchemaCache::default();
        let with_schema = |version: &str, minimum: i64| {
            source(
                "ns/backup",
                version,
                "2026-01-01T00:00:00Z",
                EventTypeDef {
                    schema: Some(json!({"properties": {"n": {"minimum": minimum}}})),
                    ..def("a.b")
                },
            )
        };
        let first = Catalog::build(vec![with_schema("1", 0)], &mut cache);
        let compiled = |c: &Catalog| c.by_name["a.b"].validator.clone().unwrap();
        let again = Catalog::build(
            vec![with_schema("1", 0), source("ns/o", "7", "", def("c.d"))],
            &mut cache,
        );
        assert!(
            Arc::ptr_eq(&compiled(&first), &compiled(&again)),
            "same version: not compiled again"
        );
        let changed = Catalog::build(vec![with_schema("2", 5)], &mut cache);
        assert!(!Arc::ptr_eq(&compiled(&first), &compiled(&changed)));
        assert!(changed.check_event("a.b", &json!({"n": 3})).is_err());
        // Objects that are gone are forgotten.
        Catalog::build(Vec::new(), &mut cache);
        assert!(cache.by_object.is_empty());
    }
}
