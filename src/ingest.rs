//! The internal ingest port: platform services post events here; the dispatcher fans them out.
//!
//! `POST /v1/organizations/{orgID}/events` with `Authorization: Bearer <ingest token>`, body
//! `{"type": "...", "data": {...}}`, optional `Idempotency-Key`. 202 once every delivery is
//! durable; 503 with `Retry-After` when they cannot be persisted. With several replicas, an event
//! of an organization another replica owns is relayed there through the work handle
//! ([`WorkHandle::relay`]), and that replica's answer is the producer's; the internal route
//! [`WORK_PATH`] does work other replicas forward here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Future;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{Instrument, info};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::catalog::{CatalogWatch, EventVerdict, SchemaViolation};
use crate::http::{ApiError, BodyRule, Route, RouteTable, bearer_token, parse_json, read_json_body};
use crate::replica_key::{Refused, ReplicaKey, unix_now};
use crate::telemetry::Metrics;
use crate::validation::validate_event_type;
use crate::work::{FORWARDED_HEADER, OwnerAnswer, SubmitError, WORK_PATH, WorkHandle, WorkRequest};

/// Settings of the ingest port.
#[derive(Clone)]
pub struct IngestConfig {
    /// The bearer token producers must present. Never logged.
    pub token: String,
    /// Timeouts and connection cap of the port.
    pub server_limits: crate::http::ServerLimits,
    /// Largest event body in bytes.
    pub payload_limit: usize,
    /// How long an `Idempotency-Key` answers with its first result.
    pub idempotency_window: Duration,
    /// How many keys are remembered at most.
    pub idempotency_capacity: usize,
    /// Where requests are counted.
    pub metrics: Metrics,
    /// With several replicas: what the others may ask of this one. `None`: every organization is
    /// served here, and nothing is forwarded here.
    pub replicas: Option<Replicas>,
    /// The event-type catalog: `data` is validated against its type's schema.
    pub catalog: CatalogWatch,
    /// `--strict-event-types`: refuse events whose type is not in a non-empty catalog.
    pub strict_event_types: bool,
}

/// What the internal work route ([`WORK_PATH`]) of a replica among several needs.
#[derive(Clone)]
pub struct Replicas {
    /// Checks that work comes from a replica.
    pub key: ReplicaKey,
    /// Does work here and never forwards it again (this replica's dispatcher): work comes here
    /// because another replica found this one the owner.
    pub here: WorkHandle,
}

impl std::fmt::Debug for IngestConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestConfig")
            .field("token", &"<redacted>")
            .field("payload_limit", &self.payload_limit)
            .field("strict_event_types", &self.strict_event_types)
            .finish()
    }
}

/// Body of an event.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// Event type, e.g. `database.created` (no wildcards).
    #[serde(rename = "type")]
    pub event_type: String,
    /// Event data: a JSON object.
    pub data: Value,
}

/// Remembers the first successful answer to each `(organization, Idempotency-Key)` for a
/// bounded time and number of keys.
#[derive(Default)]
pub struct IdempotencyCache {
    entries: HashMap<(String, String), (Instant, Value)>,
    order: VecDeque<(Instant, (String, String))>,
}

impl IdempotencyCache {
    /// The remembered answer, if still within `window`.
    pub fn get(&mut self, key: &(String, String), window: Duration, now: Instant) -> Option<Value> {
        self.expire(window, usize::MAX, now);
        self.entries.get(key).map(|(_, v)| v.clone())
    }

    /// Remembers an answer; the oldest keys go first when over `capacity`.
    pub fn put(&mut self, key: (String, String), value: Value, window: Duration, capacity: usize, now: Instant) {
        if self.entries.contains_key(&key) {
            return;
        }
        self.entries.insert(key.clone(), (now, value));
        self.order.push_back((now, key));
        self.expire(window, capacity, now);
    }

    fn expire(&mut self, window: Duration, capacity: usize, now: Instant) {
        while let Some((at, key)) = self.order.front() {
            if now.duration_since(*at) < window && self.entries.len() <= capacity {
                break;
            }
            self.entries.remove(key);
            self.order.pop_front();
        }
    }
}

/// Longest `Idempotency-Key` accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// One `(organization, Idempotency-Key)` pair.
type IdempotencyKey = (String, String);

struct IngestState {
    work: WorkHandle,
    config: IngestConfig,
    idempotency: Mutex<IdempotencyCache>,
    /// Keys whose first request is being handled: requests with the same key wait for its
    /// answer instead of submitting the event again.
    in_progress: Mutex<HashMap<IdempotencyKey, Arc<tokio::sync::OnceCell<Value>>>>,
}

fn authorize(headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    let presented = headers
        .get(warp::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing or malformed ingest token"))?;
    if tokens_match(presented, token) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid ingest token"))
    }
}

/// The 401 of a work request that is not a replica's.
fn refused(e: Refused) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())
}

/// Compares a presented token with the expected one in constant time, leaking neither content
/// nor length: both are hashed to 32 bytes first, so the comparison never stops early on a
/// length mismatch.
fn tokens_match(presented: &str, expected: &str) -> bool {
    let digest = |s: &str| Sha256::digest(s.as_bytes());
    bool::from(digest(presented).ct_eq(&digest(expected)))
}

fn validate(request: &EventRequest) -> Result<(), ApiError> {
    if request.event_type.ends_with(".*") {
        return Err(ApiError::bad_request("an event's type cannot be a pattern"));
    }
    validate_event_type(&request.event_type).map_err(ApiError::bad_request)?;
    if !request.data.is_object() {
        return Err(ApiError::bad_request("data must be a JSON object"));
    }
    Ok(())
}

/// What the catalog's verdict on an event means for ingest: a 400 for data that does not conform
/// to its type's schema, and for a type outside a non-empty catalog when `strict`; otherwise
/// accepted, `true` when the type is outside the catalog (counted).
fn catalog_rule(
    verdict: Result<EventVerdict, SchemaViolation>,
    event_type: &str,
    strict: bool,
) -> Result<bool, ApiError> {
    match verdict {
        Err(violation) => Err(ApiError::bad_request(violation.to_string())),
        Ok(EventVerdict::NotInCatalog) if strict => Err(ApiError::bad_request(format!(
            "event type {event_type} is not in the event-type catalog, and this operator accepts only catalog types"
        ))),
        Ok(EventVerdict::NotInCatalog) => Ok(true),
        Ok(EventVerdict::Known | EventVerdict::NoCatalog) => Ok(false),
    }
}

impl IngestState {
    /// The token was checked before the body was read (see [`IngestState::serve`]).
    async fn ingest(&self, org: String, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
        let request: EventRequest = parse_json(&body)?;
        validate(&request)?;
        // Before relaying: every replica has the catalog, so a bad event goes no further. A
        // schema is compiled once per version of its type, not here.
        let verdict = self
            .config
            .catalog
            .current()
            .check_event(&request.event_type, &request.data);
        let outside = catalog_rule(verdict, &request.event_type, self.config.strict_event_types)?;
        // Counted once, where the producer sent it (not again by the owner it is relayed to).
        if outside && !headers.contains_key(FORWARDED_HEADER) {
            self.config.metrics.event_outside_catalog();
        }
        let idempotency_key = headers
            .get("idempotency-key")
            .map(|v| v.to_str().map(str::to_string))
            .transpose()
            .map_err(|_| ApiError::bad_request("Idempotency-Key must be ASCII"))?;
        if idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES)
        {
            return Err(ApiError::bad_request(format!(
                "Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_BYTES} characters"
            )));
        }
        // Anyone may set this header: it is believed only so far as not to relay again (see
        // `crate::work`); the request was authenticated with the ingest token like any other.
        // Another replica's event goes to it before this one's idempotency cache is asked: the
        // owner's answers.
        if !headers.contains_key(FORWARDED_HEADER) {
            let relayed = self
                .work
                .relay(&org, idempotency_key.as_deref(), body)
                .await
                .map_err(not_accepted)?;
            if let Some(answer) = relayed {
                return Ok(owner_answer(answer));
            }
        }
        let answer = match idempotency_key {
            None => self.submit(&org, request).await?,
            Some(key) => self.submit_once((org.clone(), key), request).await?,
        };
        Ok(warp::reply::with_status(warp::reply::json(&answer), StatusCode::ACCEPTED).into_response())
    }

    /// Submits the event of the first request with this key; concurrent and later requests with
    /// the same key (within the window) get its answer and submit nothing.
    async fn submit_once(&self, key: IdempotencyKey, request: EventRequest) -> Result<Value, ApiError> {
        // The cache is read and the cell taken under the same lock that moves an answer from the
        // cell to the cache: a request never misses both.
        let cell = {
            let mut in_progress = self.in_progress.lock().expect("idempotency lock");
            let cached = self.idempotency.lock().expect("idempotency lock").get(
                &key,
                self.config.idempotency_window,
                Instant::now(),
            );
            if let Some(answer) = cached {
                return Ok(answer);
            }
            in_progress.entry(key.clone()).or_default().clone()
        };
        // One request at a time runs the submission; if it fails, the next waiting one tries.
        let result = cell.get_or_try_init(|| self.submit(&key.0, request)).await.cloned();
        let mut in_progress = self.in_progress.lock().expect("idempotency lock");
        if let Ok(answer) = &result {
            self.idempotency.lock().expect("idempotency lock").put(
                key.clone(),
                answer.clone(),
                self.config.idempotency_window,
                self.config.idempotency_capacity,
                Instant::now(),
            );
        }
        // The last one out forgets the key's cell (the cache answers from now on).
        if in_progress.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) && Arc::strong_count(&cell) == 2 {
            in_progress.remove(&key);
        }
        result
    }

    async fn submit(&self, org: &str, request: EventRequest) -> Result<Value, ApiError> {
        // A child of the request's span (and so of the producer's `traceparent`); the dispatcher
        // keeps its context with each delivery, so that every attempt joins the trace.
        let span = tracing::info_span!(
            target: crate::traces::TARGET,
            "ingest",
            otel.name = "ingest",
            capy.organization.id = org,
            capy.event.type = %request.event_type,
            capy.event.id = tracing::field::Empty,
            capy.endpoints.matched = tracing::field::Empty,
        );
        let (event_id, deliveries) = self
            .work
            .submit(org, &request.event_type, request.data)
            .instrument(span.clone())
            .await
            .map_err(not_accepted)?;
        span.record("capy.event.id", event_id.as_str());
        span.record("capy.endpoints.matched", deliveries as u64);
        info!(organization = %org, event = %event_id, event_type = %request.event_type, deliveries, "event accepted");
        Ok(json!({"id": event_id, "deliveries": deliveries}))
    }
}

/// The answer to an event that could not be accepted: the one mapping of [`SubmitError`] (a 503
/// with `Retry-After` for whatever may pass), saying what was not done.
fn not_accepted(e: SubmitError) -> ApiError {
    ApiError::from(e).prefixed("event not accepted: ")
}

/// The answer of the replica that owns an event's organization, as the producer gets it.
fn owner_answer(answer: OwnerAnswer) -> Response {
    let mut response = warp::http::Response::builder()
        .status(answer.status)
        .header("content-type", "application/json");
    if let Some(retry_after) = answer.retry_after {
        response = response.header("retry-after", retry_after);
    }
    response
        .body(warp::hyper::body::Bytes::from(answer.body.to_vec()).into())
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// What a route of the ingest port does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IngestOperation {
    /// A producer posts an event (with the ingest token).
    Event,
    /// Another replica forwards work ([`WORK_PATH`], signed with the replica key).
    Work,
}

/// Every route of the ingest port: its route templates (the `route` label of metrics), the
/// `Allow` header of a 405 and the dispatch come from here. The forwarder sends to [`WORK_PATH`].
static ROUTES: RouteTable<IngestOperation> = RouteTable::new(&[
    Route {
        template: "/v1/organizations/:org/events",
        method: "POST",
        operation: IngestOperation::Event,
    },
    Route {
        template: WORK_PATH,
        method: "POST",
        operation: IngestOperation::Work,
    },
]);

/// Room for a forwarded request's envelope around the event it may carry.
const WORK_ENVELOPE_BYTES: usize = 16 * 1024;

impl IngestState {
    /// Answers one request of the ingest port. Whoever sends a body proves who they are before it
    /// is read: an anonymous client cannot make the port buffer bodies.
    async fn serve<S, B>(&self, method: &str, path: &str, headers: HeaderMap, body: S) -> Result<Response, ApiError>
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send,
        B: bytes::Buf + Send,
    {
        let matched = ROUTES.resolve(method, path)?;
        match matched.route.operation {
            IngestOperation::Event => {
                authorize(&headers, &self.config.token)?;
                let body = read_json_body(&headers, body, self.config.payload_limit, BodyRule::Required).await?;
                self.ingest(matched.param("org"), headers, body).await
            }
            IngestOperation::Work => self.perform_forwarded(headers, body).await,
        }
    }

    /// Work forwarded by another replica: a few hundred bytes of reference and at most one event.
    /// Only replicas sign it ([`crate::replica_key`]); the producers' ingest token is worth
    /// nothing here, and so is [`FORWARDED_HEADER`]. A single process that serves every
    /// organization is sent nothing: the route is not there.
    async fn perform_forwarded<S, B>(&self, headers: HeaderMap, body: S) -> Result<Response, ApiError>
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send,
        B: bytes::Buf + Send,
    {
        let replicas = self
            .config
            .replicas
            .as_ref()
            .ok_or_else(|| ApiError::not_found("no such route"))?;
        // Fresh signature headers before the body is read.
        ReplicaKey::precheck(&headers, unix_now()).map_err(refused)?;
        let limit = self.config.payload_limit + WORK_ENVELOPE_BYTES;
        let body = read_json_body(&headers, body, limit, BodyRule::Required).await?;
        replicas
            .key
            .verify("POST", WORK_PATH, &headers, &body, unix_now())
            .map_err(refused)?;
        let request = parse_json::<WorkRequest>(&body)?;
        Ok(warp::reply::json(&replicas.here.perform(request).await).into_response())
    }
}

/// The ingest routes ([`ROUTES`]), with JSON errors for anything unmatched.
pub fn routes(
    work: WorkHandle,
    config: IngestConfig,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let metrics = config.metrics.clone();
    let state = Arc::new(IngestState {
        work,
        config,
        idempotency: Mutex::default(),
        in_progress: Mutex::default(),
    });
    let dispatch = warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::any().map(move || state.clone()))
        .then(
            |method: warp::http::Method,
             path: warp::path::FullPath,
             headers: HeaderMap,
             body,
             state: Arc<IngestState>| async move {
                let span =
                    crate::http::request_span("ingest", method.as_str(), route_template(path.as_str()), &headers);
                let serve = async {
                    state
                        .serve(method.as_str(), path.as_str(), headers, body)
                        .await
                        .unwrap_or_else(Reply::into_response)
                };
                crate::http::traced(span, serve).await
            },
        )
        .recover(crate::http::recover)
        .unify();
    crate::http::with_request_log(dispatch, "ingest", route_template, metrics)
}

/// The route template of an ingest path (the `route` label of HTTP metrics).
pub fn route_template(path: &str) -> &'static str {
    ROUTES.template_of(path)
}

/// Serves the ingest port until `shutdown` resolves.
pub async fn run(
    work: WorkHandle,
    config: IngestConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Events are checked against the catalog from the first one on: a strict operator must not
    // accept, nor a lenient one count, against a catalog not yet read.
    config.catalog.wait_ready().await;
    info!(listen = %listener.local_addr()?, "ingest serving");
    let limits = config.server_limits;
    crate::http::serve(listener, routes(work, config), shutdown, limits).await;
    info!("ingest stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_answers_within_the_window_and_forgets_after() {
        let mut cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let key = ("org".to_string(), "k1".to_string());
        let window = Duration::from_secs(60);
        cache.put(key.clone(), json!({"id": "evt_1"}), window, 10, t0);
        cache.put(key.clone(), json!({"id": "evt_2"}), window, 10, t0);
        assert_eq!(
            cache.get(&key, window, t0 + Duration::from_secs(59)),
            Some(json!({"id": "evt_1"}))
        );
        assert_eq!(cache.get(&key, window, t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn idempotency_is_bounded_in_size() {
        let mut cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        for i in 0..5 {
            cache.put(("o".into(), i.to_string()), json!(i), window, 3, t0);
        }
        assert!(cache.get(&("o".into(), "0".into()), window, t0).is_none());
        assert_eq!(cache.get(&("o".into(), "4".into()), window, t0), Some(json!(4)));
    }

    #[test]
    fn route_templates_hide_organizations() {
        use crate::http::OTHER_ROUTE;
        assert_eq!(route_template(WORK_PATH), WORK_PATH);
        assert_eq!(
            route_template("/v1/organizations/org_1/events"),
            "/v1/organizations/:org/events"
        );
        for other in [
            "/",
            "/v1/organizations//events",
            "/v1/organizations/org_1/events/x",
            "/metrics",
        ] {
            assert_eq!(route_template(other), OTHER_ROUTE, "{other}");
        }
        let wrong_method = ROUTES.resolve("PUT", "/v1/organizations/org_1/events").unwrap_err();
        assert_eq!(
            (wrong_method.status.as_u16(), wrong_method.allow.as_deref()),
            (405, Some("POST"))
        );
        assert_eq!(ROUTES.resolve("POST", "/metrics").unwrap_err().status.as_u16(), 404);
    }

    #[test]
    fn an_event_not_accepted_says_so_with_the_shared_status_and_retry_after() {
        let e = not_accepted(SubmitError::Unavailable("the log is full".into()));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.message, "event not accepted: the log is full");
        assert_eq!(e.retry_after, Some(crate::http::DEFAULT_RETRY_AFTER_SECS));
        let e = not_accepted(SubmitError::Moving { retry_after_secs: 1 });
        assert_eq!((e.status.as_u16(), e.retry_after), (503, Some(1)));
    }

    #[test]
    fn ingest_token_is_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            authorize(&headers, "secret-token").unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        headers.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(authorize(&headers, "secret-token").is_err());
        headers.insert("authorization", "Bearer secret-token".parse().unwrap());
        assert!(authorize(&headers, "secret-token").is_ok());
    }

    #[test]
    fn events_are_validated() {
        let ok = EventRequest {
            event_type: "database.created".into(),
            data: json!({"id": 1}),
        };
        assert!(validate(&ok).is_ok());
        let pattern = EventRequest {
            event_type: "database.*".into(),
            data: json!({}),
        };
        assert!(validate(&pattern).is_err());
        let not_object = EventRequest {
            event_type: "a.b".into(),
            data: json!([1]),
        };
        assert!(validate(&not_object).is_err());
    }

    #[test]
    fn the_catalog_refuses_bad_data_always_and_unknown_types_only_when_strict() {
        let violation = SchemaViolation {
            event_type: "a.b".into(),
            pointer: "/n".into(),
            reason: "-1 is less than the minimum of 0".into(),
        };
        for strict in [false, true] {
            let e = catalog_rule(Err(violation.clone()), "a.b", strict).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.message, violation.to_string());
            assert!(!catalog_rule(Ok(EventVerdict::Known), "a.b", strict).unwrap());
            assert!(!catalog_rule(Ok(EventVerdict::NoCatalog), "a.b", strict).unwrap());
        }
        assert!(catalog_rule(Ok(EventVerdict::NotInCatalog), "x.y", false).unwrap());
        let e = catalog_rule(Ok(EventVerdict::NotInCatalog), "x.y", true).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.starts_with("event type x.y is not in the event-type catalog"),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_ingest_token_is_checked_whatever_its_shape() {
        let expected = "test-ingest-token-0123456789";
        assert!(tokens_match(expected, expected));
        for wrong in [
            "",
            "t",
            "test-ingest-token-012345678",
            "test-ingest-token-01234567890",
            "TEST-INGEST-TOKEN-0123456789",
        ] {
            assert!(!tokens_match(wrong, expected), "{wrong:?}");
        }
        let headers = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(warp::http::header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        assert!(authorize(&headers(&format!("BEARER {expected}")), expected).is_ok());
        assert_eq!(
            authorize(&headers("Bearer nope"), expected).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            authorize(&HeaderMap::new(), expected).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }
}
