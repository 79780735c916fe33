//! The public REST facade: the documented routes over WebhookEndpoint CRs.
//!
//! Reads come from a watch-backed cache (a kube-runtime reflector), never a round trip per
//! request. Writes go to the API server and return once it accepted them; create and
//! rotate-secret also wait (bounded) for the controller to write the signing secret.

pub mod model;
pub mod openapi;
pub mod portal;
pub mod routes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Future;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};
use warp::http::{HeaderMap, Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::auth::{Authenticator, Principal};
use crate::catalog::CatalogWatch;
use crate::endpoints::EndpointCache;
use crate::http::{ApiError, DEFAULT_RETRY_AFTER_SECS, parse_json};
use crate::resources::{CONDITION_SECRET_READY, Scope, WebhookEndpoint, signing_secret_name};
use crate::signing::StoredKeyRing;
use crate::signing_secret::stored_key_ring;
use crate::telemetry::{Metrics, ReadyHandle, WriteKind};
use crate::validation::UrlPolicy;
use crate::work::WorkHandle;
use model::{
    CreateRequest, DeliveryView, EndpointResponse, EndpointWithSecret, UpdateRequest, endpoint_view,
    listed_endpoint_view, new_endpoint, new_endpoint_name, update_patch,
};
use routes::{Access, Operation, ROUTES, route_template};

/// Field manager of the facade's writes (distinct from the controller's server-side applies).
pub const API_FIELD_MANAGER: &str = "capy-webhooks-api";
/// Default and largest `limit` of the deliveries route.
pub const DEFAULT_DELIVERIES_LIMIT: usize = 50;
/// Requests one organization may make at once on the rate-limited routes before the rate
/// applies.
const ORGANIZATION_BURST: u32 = 20;

/// Largest `limit` accepted by the deliveries route.
pub const MAX_DELIVERIES_LIMIT: usize = 1000;

/// Settings of the REST facade.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Namespaces whose endpoints are served.
    pub scope: Scope,
    /// Timeouts and connection cap of the port.
    pub server_limits: crate::http::ServerLimits,
    /// Namespace where endpoints created over REST are placed.
    pub home_namespace: String,
    /// Which URLs are accepted.
    pub url_policy: UrlPolicy,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// How long create and rotate-secret wait for the controller.
    pub controller_wait: Duration,
    /// Most endpoints one organization may have; creating one more is 409.
    pub max_endpoints_per_organization: usize,
    /// Requests per second per organization on the routes that send or read deliveries (test,
    /// retry, deliveries); beyond it 429 with `Retry-After`. 0: unlimited.
    pub organization_rate_limit: f64,
    /// Where requests and API-server writes are counted.
    pub metrics: Metrics,
    /// Flipped once the caches (endpoints, API keys) are synced and the API serves.
    pub ready: ReadyHandle,
    /// How long a portal session lasts.
    pub portal_session_ttl: jiff::SignedDuration,
    /// The public URL the portal links start with (`https://webhooks.example.com`); without it,
    /// the scheme and host the request came with.
    pub portal_url: Option<String>,
    /// The event-type catalog: listed, and what endpoints may subscribe to when it is not empty.
    pub catalog: CatalogWatch,
}

/// Secret, in the home namespace, holding the key that signs portal sessions. Deleting it (and
/// restarting the replicas) ends every session; nothing else uses it.
pub const PORTAL_KEY_SECRET: &str = "capy-webhooks-portal-key";

/// Shared state of the handlers.
pub struct ApiState {
    client: Client,
    cache: EndpointCache,
    auth: Authenticator,
    config: ApiConfig,
    /// Present when the dispatcher runs in this process: the recovery routes need it.
    work: Option<WorkHandle>,
    /// Without a dispatcher in this process, the delivery logs as a watch keeps them.
    log_watch: Option<crate::delivery_log::LogWatch>,
    /// The per-organization limit of the routes that send or read deliveries.
    rate_limit: crate::http::KeyedRateLimit,
    /// Endpoint creates in flight per organization.
    creating: std::sync::Mutex<HashMap<String, usize>>,
    /// Serialized list responses per organization, tagged with the cache version they were
    /// built from: a list is rebuilt only after an endpoint changed, not on every read.
    list_bodies: std::sync::Mutex<HashMap<String, (u64, Bytes)>>,
    /// Held while a list response is rebuilt.
    list_rebuild: tokio::sync::Mutex<()>,
}

/// An endpoint create in flight, counted against its organization's limit until dropped.
struct CreatingGuard<'a> {
    state: &'a ApiState,
    org: String,
}

impl Drop for CreatingGuard<'_> {
    fn drop(&mut self) {
        let mut creating = self
            .state
            .creating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = creating.get_mut(&self.org) {
            *n -= 1;
            if *n == 0 {
                creating.remove(&self.org);
            }
        }
    }
}

/// A 200 with a JSON body already serialized (shared, not copied).
fn json_response(body: Bytes) -> Response {
    let mut response = warp::http::Response::new(body).into_response();
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Most organizations whose list response is kept serialized.
const LIST_BODIES_KEPT: usize = 1024;

type Shared = Arc<ApiState>;

fn kube_error(e: kube::Error, doing: &str) -> ApiError {
    match &e {
        kube::Error::Api(status) if status.code >= 500 => {
            warn!(error = %e, doing, "API server error");
            ApiError::unavailable("the Kubernetes API is unavailable; retry later", 5)
        }
        kube::Error::Api(_) => {
            warn!(error = %e, doing, "unexpected API refusal");
            ApiError::internal()
        }
        _ => {
            warn!(error = %e, doing, "Kubernetes API unreachable");
            ApiError::unavailable("the Kubernetes API cannot be reached; retry later", 5)
        }
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl ApiState {
    /// Authenticates the caller and checks it may act on organization `org`.
    ///
    /// 401 for a missing or bad credential; 403 for a valid credential of another organization
    /// ([`Principal::may_act_on`]). Project-scoped API keys act on their own organization as
    /// organization keys do: endpoints carry no project.
    ///
    /// A read-only portal session may only [`Access::Read`]: 403 on every route that writes.
    async fn authorize(&self, org: &str, headers: &HeaderMap, access: Access) -> Result<Principal, ApiError> {
        let header = match headers.get(warp::http::header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "malformed Authorization header"))?,
            ),
        };
        let principal = self.auth.authenticate(header).await.map_err(|e| {
            let status = StatusCode::from_u16(e.status_code()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut err = ApiError::new(status, e.to_string());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                err.retry_after = Some(5);
            }
            err
        })?;
        if !principal.may_act_on(org) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this credential does not belong to this organization",
            ));
        }
        if access == Access::Write && principal.read_only() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this portal session is read-only; ask for a session that may make changes",
            ));
        }
        Ok(principal)
    }

    /// Answers one request: [`ROUTES`] finds its operation; the caller is authorized as the
    /// operation requires, and only then is its body (if it takes one) read, so that an anonymous
    /// client cannot make the facade buffer bodies; then the operation's handler answers.
    async fn serve<S, B>(
        &self,
        method: &str,
        path: &str,
        headers: HeaderMap,
        query: &str,
        body: S,
    ) -> Result<Response, ApiError>
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send,
        B: bytes::Buf + Send,
    {
        let matched = ROUTES.resolve(method, path)?;
        let operation = matched.route.operation;
        let org = matched.param(routes::ORG);
        let id = matched.param(routes::ENDPOINT);
        let principal = match operation.access() {
            Some(access) => Some(self.authorize(&org, &headers, access).await?),
            None => None,
        };
        let body = match operation.body() {
            Some(rule) => crate::http::read_json_body(&headers, body, self.config.body_limit, rule).await?,
            None => Bytes::new(),
        };
        // Every operation with an access rule has its principal by now.
        let authorized = |principal: Option<Principal>| principal.ok_or_else(ApiError::internal);
        match operation {
            Operation::ListEndpoints => self.list(org).await,
            Operation::CreateEndpoint => self.create(org, authorized(principal)?, body).await,
            Operation::UpdateEndpoint => self.update(org, id, body).await,
            Operation::DeleteEndpoint => self.delete(org, id, authorized(principal)?).await,
            Operation::RotateSecret => self.rotate_secret(org, id, authorized(principal)?).await,
            Operation::ListDeliveries => self.deliveries(org, id, query).await,
            Operation::EndpointStats => self.stats(org, id).await,
            Operation::RetryDelivery => self.retry_delivery(org, id, matched.param(routes::DELIVERY)).await,
            Operation::TestEndpoint => self.test_endpoint(org, id).await,
            Operation::RecoverDeliveries => self.recover(org, id, body).await,
            Operation::GetSettings => self.settings(org, id, authorized(principal)?).await,
            Operation::UpdateSettings => self.update_settings(org, id, body).await,
            Operation::EraseEvent => {
                self.erase_event(org, matched.param(routes::EVENT), authorized(principal)?)
                    .await
            }
            Operation::CreatePortalSession => {
                self.create_portal_session(org, authorized(principal)?, headers, body)
                    .await
            }
            // Serialized once per change of the catalog; the same for every organization.
            Operation::ListEventTypes => Ok(json_response(self.config.catalog.current().listing())),
            Operation::TestFilter => self.test_filter(org, body),
            Operation::OpenApiDocument => Ok(json_response(openapi::DOCUMENT_JSON.clone())),
            Operation::PortalPage => Ok(portal::page(path)),
            Operation::PortalScript => Ok(portal::script()),
            Operation::PortalStyles => Ok(portal::styles()),
        }
    }

    /// `POST .../portal-sessions` (authenticated before the body was read): a signed,
    /// short-lived token for the portal, bound to `org`, read-only if asked. A portal session may
    /// not open another (it could otherwise outlive its own expiry).
    async fn create_portal_session(
        &self,
        org: String,
        principal: Principal,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, ApiError> {
        if matches!(principal.credential, crate::auth::CredentialKind::PortalSession { .. }) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "a portal session cannot open another; use an API key or a session token",
            ));
        }
        let request = portal::SessionRequest::parse(&body)?;
        let sessions = self
            .auth
            .portal_sessions()
            .ok_or_else(|| ApiError::unavailable("portal sessions are not ready yet", 1))?;
        let session = sessions.issue(&org, request.read_only, Timestamp::now());
        let base = portal::base_url(self.config.portal_url.as_deref(), &headers);
        info!(organization = %org, session = %session.claims.sid, read_only = request.read_only,
            by = %principal.credential, "portal session opened");
        let body = model::PortalSession {
            url: format!("{base}/portal/#token={}", session.token),
            token: session.token,
            expires_at: model::rfc3339(session.expires_at),
        };
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::CREATED).into_response())
    }

    fn wrote(&self, kind: WriteKind) {
        self.config.metrics.apiserver_writes(kind, 1);
    }

    fn find(&self, org: &str, id: &str) -> Result<Arc<WebhookEndpoint>, ApiError> {
        self.cache
            .find(&self.config.scope, org, id)
            .ok_or_else(|| ApiError::not_found(format!("webhook endpoint {id} not found")))
    }

    /// Waits (up to `--controller-wait`) until the controller has completed rotation `target`
    /// of the endpoint, and reads what receivers verify with from then on; 503 with
    /// `not_yet` otherwise.
    async fn new_key(
        &self,
        namespace: &str,
        name: &str,
        target: i64,
        not_yet: &'static str,
    ) -> Result<(WebhookEndpoint, String), ApiError> {
        let rotated = self
            .cache
            .wait_for(namespace, name, self.config.controller_wait, |ep| {
                ep.filter(|ep| secret_ready(ep) && ep.status.as_ref().is_some_and(|s| s.secret_rotation >= target))
                    .cloned()
            })
            .await
            .ok_or_else(|| ApiError::unavailable(not_yet, 5))?;
        let secret = self.read_signing_secret(namespace, name).await?;
        Ok((rotated, secret))
    }

    async fn read_signing_secret(&self, namespace: &str, name: &str) -> Result<String, ApiError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = secrets
            .get_opt(&signing_secret_name(name))
            .await
            .map_err(|e| kube_error(e, "reading signing secret"))?;
        match stored_key_ring(secret.as_ref()) {
            StoredKeyRing::Valid(ring) => Ok(ring.current.for_receiver()),
            _ => Err(ApiError::unavailable(
                "the signing secret is being repaired; retry shortly",
                DEFAULT_RETRY_AFTER_SECS,
            )),
        }
    }

    async fn list(&self, org: String) -> Result<Response, ApiError> {
        if let Some(body) = self.cached_list(&org) {
            return Ok(json_response(body));
        }
        // One rebuild at a time: concurrent readers of a stale list wait for it instead of each
        // serializing the same endpoints.
        let _rebuilding = self.list_rebuild.lock().await;
        if let Some(body) = self.cached_list(&org) {
            return Ok(json_response(body));
        }
        // Read the version first: a change while building makes the entry stale, never wrong.
        let version = self.cache.version_of(&org);
        let webhook_endpoints = self.cache.list(&org).iter().map(|e| listed_endpoint_view(e)).collect();
        let body = Bytes::from(
            serde_json::to_vec(&model::EndpointList { webhook_endpoints }).map_err(|_| ApiError::internal())?,
        );
        let mut bodies = self.list_bodies.lock().expect("list cache lock");
        if bodies.len() >= LIST_BODIES_KEPT {
            bodies.clear();
        }
        bodies.insert(org, (version, body.clone()));
        Ok(json_response(body))
    }

    /// The serialized list of `org`, if it was built since the organization's endpoints last changed.
    fn cached_list(&self, org: &str) -> Option<Bytes> {
        let version = self.cache.version_of(org);
        self.list_bodies
            .lock()
            .expect("list cache lock")
            .get(org)
            .filter(|(v, _)| *v == version)
            .map(|(_, body)| body.clone())
    }

    /// `principal` was authenticated before the body was read.
    async fn create(&self, org: String, principal: Principal, body: Bytes) -> Result<Response, ApiError> {
        let request: CreateRequest = parse_json(&body)?;
        let _slot = self.endpoint_slot(&org)?;
        let ns = &self.config.home_namespace;
        let name = new_endpoint_name(Timestamp::now());
        let endpoint = new_endpoint(&name, ns, &org, request, self.config.url_policy).map_err(ApiError::bad_request)?;
        let warnings = self.subscription_warnings(&endpoint.spec.event_types)?;
        let api: Api<WebhookEndpoint> = Api::namespaced(self.client.clone(), ns);
        let params = PostParams {
            field_manager: Some(API_FIELD_MANAGER.into()),
            ..Default::default()
        };
        let created = api.create(&params, &endpoint).await.map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 422 => ApiError::bad_request(s.message.clone()),
            _ => kube_error(e, "creating endpoint"),
        })?;
        self.wrote(WriteKind::Endpoint);
        info!(organization = %org, endpoint = %name, by = %principal.credential, "endpoint created");

        let generation = created.metadata.generation;
        let ready = self
            .cache
            .wait_for(ns, &name, self.config.controller_wait, |ep| {
                ep.filter(|ep| secret_ready(ep) && ep.status.as_ref().and_then(|s| s.observed_generation) >= generation)
                    .cloned()
            })
            .await;
        let Some(ready) = ready else {
            // Without its secret the caller could never verify deliveries, and a retry would make
            // a second endpoint: take this one back so nothing half-made is left.
            if api.delete(&name, &DeleteParams::default()).await.is_ok() {
                self.wrote(WriteKind::Endpoint);
            }
            warn!(endpoint = %name, "controller did not write the signing secret in time; create undone");
            return Err(ApiError::unavailable(
                format!(
                    "the controller did not prepare the signing secret within {}s, so nothing was created; retry later",
                    self.config.controller_wait.as_secs()
                ),
                5,
            ));
        };
        let secret = self.read_signing_secret(ns, &name).await?;
        let body = EndpointWithSecret {
            webhook_endpoint: endpoint_view(&ready),
            plaintext_secret: secret,
            warnings,
        };
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::CREATED).into_response())
    }

    /// Authenticated before the body was read.
    async fn update(&self, org: String, id: String, body: Bytes) -> Result<Response, ApiError> {
        let request: UpdateRequest = parse_json(&body)?;
        let existing = self.find(&org, &id)?;
        let mut patch = update_patch(&org, &request, self.config.url_policy).map_err(ApiError::bad_request)?;
        let warnings = match &request.event_types {
            Some(event_types) => self.subscription_warnings(event_types)?,
            None => Vec::new(),
        };
        let scheme_change = model::scheme_change(&existing.spec, request.signature_scheme);
        if let (Some((ops, _)), Some(all)) = (&scheme_change, patch.as_array_mut()) {
            all.extend(ops.iter().cloned());
        }
        let updated = self.patch_endpoint(&existing, patch).await?;
        let Some((_, target)) = scheme_change else {
            let body = EndpointResponse {
                webhook_endpoint: endpoint_view(&updated),
                plaintext_secret: None,
                warnings,
            };
            return Ok(warp::reply::json(&body).into_response());
        };
        // A new scheme is a new key: wait for it as rotate-secret does, and answer with it.
        let ns = updated.namespace().unwrap_or_default();
        let (rotated, secret) = self
            .new_key(
                &ns,
                &id,
                target,
                "the signature scheme was changed but the controller has not made the new key yet; rotate-secret later to get it",
            )
            .await?;
        info!(organization = %org, endpoint = %id, scheme = rotated.spec.signature_scheme.as_str(), "signature scheme changed");
        let body = EndpointResponse {
            webhook_endpoint: endpoint_view(&rotated),
            plaintext_secret: Some(secret),
            warnings,
        };
        Ok(warp::reply::json(&body).into_response())
    }

    /// Checks an endpoint's event types against the catalog (when it has types): 400 naming the
    /// first unknown type or pattern; else the warnings for the answer (deprecated types).
    fn subscription_warnings(&self, event_types: &[String]) -> Result<Vec<String>, ApiError> {
        self.config
            .catalog
            .current()
            .check_subscription(event_types)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }

    async fn settings(&self, org: String, id: String, principal: Principal) -> Result<Response, ApiError> {
        let endpoint = self.find(&org, &id)?;
        let mut view = model::settings_view(&endpoint);
        // Header values are often the receiver's credentials: a read-only session sees names only.
        if principal.read_only() {
            view.redact_header_values();
        }
        Ok(warp::reply::json(&view).into_response())
    }

    /// Authenticated before the body was read.
    async fn update_settings(&self, org: String, id: String, body: Bytes) -> Result<Response, ApiError> {
        let request: model::SettingsPatch = parse_json(&body)?;
        let existing = self.find(&org, &id)?;
        let patch = model::settings_patch(&org, &request).map_err(ApiError::bad_request)?;
        let updated = self.patch_endpoint(&existing, patch).await?;
        info!(organization = %org, endpoint = %id, "delivery settings changed");
        Ok(warp::reply::json(&model::settings_view(&updated)).into_response())
    }

    /// Applies a JSON Patch (whose first operation tests the organization) to an endpoint and
    /// waits until the cache shows it, so the next read sees the change.
    async fn patch_endpoint(
        &self,
        existing: &WebhookEndpoint,
        patch: serde_json::Value,
    ) -> Result<WebhookEndpoint, ApiError> {
        let id = existing.name_any();
        let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|_| ApiError::internal())?;
        let ns = existing.namespace().unwrap_or_default();
        let api: Api<WebhookEndpoint> = Api::namespaced(self.client.clone(), &ns);
        let params = PatchParams {
            field_manager: Some(API_FIELD_MANAGER.into()),
            ..Default::default()
        };
        let updated = api.patch(&id, &params, &Patch::Json::<()>(patch)).await.map_err(|e| {
            if is_status(&e, 404) || is_status(&e, 422) && e.to_string().contains("test operation") {
                ApiError::not_found(format!("webhook endpoint {id} not found"))
            } else if let kube::Error::Api(s) = &e
                && s.code == 422
            {
                ApiError::bad_request(s.message.clone())
            } else {
                kube_error(e, "updating endpoint")
            }
        })?;
        self.wrote(WriteKind::Endpoint);
        let rv = updated.resource_version();
        self.cache
            .wait_for(&ns, &id, Duration::from_secs(2), |ep| {
                ep.is_none_or(|ep| ep.metadata.generation >= updated.metadata.generation || ep.resource_version() == rv)
                    .then_some(())
            })
            .await;
        Ok(updated)
    }

    async fn delete(&self, org: String, id: String, principal: Principal) -> Result<Response, ApiError> {
        let existing = self.find(&org, &id)?;
        let ns = existing.namespace().unwrap_or_default();
        let api: Api<WebhookEndpoint> = Api::namespaced(self.client.clone(), &ns);
        // The uid precondition makes sure the object checked above is the one deleted.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: existing.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        api.delete(&id, &params).await.map_err(|e| {
            if is_status(&e, 404) || is_status(&e, 409) {
                ApiError::not_found(format!("webhook endpoint {id} not found"))
            } else {
                kube_error(e, "deleting endpoint")
            }
        })?;
        self.wrote(WriteKind::Endpoint);
        info!(organization = %org, endpoint = %id, by = %principal.credential, "endpoint deleted");
        self.cache
            .wait_for(&ns, &id, Duration::from_secs(2), |ep| ep.is_none().then_some(()))
            .await;
        Ok(warp::reply::json(&model::Deleted::default()).into_response())
    }

    async fn rotate_secret(&self, org: String, id: String, principal: Principal) -> Result<Response, ApiError> {
        let existing = self.find(&org, &id)?;
        let ns = existing.namespace().unwrap_or_default();
        let api: Api<WebhookEndpoint> = Api::namespaced(self.client.clone(), &ns);
        let params = PatchParams {
            field_manager: Some(API_FIELD_MANAGER.into()),
            ..Default::default()
        };
        let mut current = existing.spec.secret_rotation;
        let mut attempts = 0;
        // Test-and-set on secretRotation: two racing rotations give two rotations, each of which
        // answers with the secret that its own request produced or a newer one.
        let target = loop {
            let target = current + 1;
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "test", "path": "/spec/organizationId", "value": org},
                {"op": "test", "path": "/spec/secretRotation", "value": current},
                {"op": "replace", "path": "/spec/secretRotation", "value": target},
            ]))
            .map_err(|_| ApiError::internal())?;
            match api.patch(&id, &params, &Patch::Json::<()>(patch)).await {
                Ok(_) => {
                    self.wrote(WriteKind::Endpoint);
                    break target;
                }
                Err(e) if is_status(&e, 422) && attempts < 5 => {
                    attempts += 1;
                    let fresh = api.get_opt(&id).await.map_err(|e| kube_error(e, "reading endpoint"))?;
                    match fresh {
                        Some(ep) if ep.spec.organization_id == org => current = ep.spec.secret_rotation,
                        _ => return Err(ApiError::not_found(format!("webhook endpoint {id} not found"))),
                    }
                }
                Err(e) if is_status(&e, 404) => {
                    return Err(ApiError::not_found(format!("webhook endpoint {id} not found")));
                }
                Err(e) => return Err(kube_error(e, "rotating secret")),
            }
        };
        let (rotated, secret) = self
            .new_key(
                &ns,
                &id,
                target,
                "the rotation was requested but the controller has not completed it yet; retry later to get the new secret",
            )
            .await?;
        info!(organization = %org, endpoint = %id, rotation = target, by = %principal.credential, "secret rotated");
        let body = EndpointWithSecret {
            webhook_endpoint: endpoint_view(&rotated),
            plaintext_secret: secret,
            warnings: Vec::new(),
        };
        Ok(warp::reply::json(&body).into_response())
    }

    async fn deliveries(&self, org: String, id: String, query: &str) -> Result<Response, ApiError> {
        self.within_rate(&org)?;
        let query: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let limit = parse_limit(query.get("limit").map(String::as_str))?;
        let endpoint = self.find(&org, &id)?;
        let deliveries: Vec<DeliveryView> = match &self.work {
            // The dispatcher in this process holds every log in memory.
            Some(work) => work
                .deliveries(&endpoint, limit)
                .await?
                .into_iter()
                .map(|(record, payload)| DeliveryView::of(&record, payload))
                .collect(),
            None => {
                let ns = endpoint.namespace().unwrap_or_default();
                let config = crate::delivery_log::LogConfig {
                    max_finished: usize::MAX,
                    ..Default::default()
                };
                let log = self
                    .log_watch
                    .as_ref()
                    .and_then(|watch| {
                        watch.read(&ns, &org, config, |name| {
                            self.cache.get(&ns, name).and_then(|e| e.metadata.uid.clone())
                        })
                    })
                    .ok_or_else(|| {
                        ApiError::unavailable(
                            "the delivery log is still loading; retry shortly",
                            DEFAULT_RETRY_AFTER_SECS,
                        )
                    })?;
                log.newest_first(&id, limit)
                    .into_iter()
                    .map(|r| DeliveryView::of(r, log.payload_json(&r.event_id)))
                    .collect()
            }
        };
        Ok(warp::reply::json(&model::DeliveryList { deliveries }).into_response())
    }

    /// `GET .../stats`: the endpoint's attempts of the last 24 hours by hour, as the replica that
    /// sends them counts them (asked of it when that is another replica).
    async fn stats(&self, org: String, id: String) -> Result<Response, ApiError> {
        self.within_rate(&org)?;
        let endpoint = self.find(&org, &id)?;
        let stats = self.work()?.attempt_stats(&endpoint).await?;
        Ok(warp::reply::json(&model::EndpointStats::of(&stats)).into_response())
    }

    /// Sends the endpoint's failed deliveries of a window again (authenticated before the body
    /// was read): `202 {"recovered": N}`.
    async fn recover(&self, org: String, id: String, body: Bytes) -> Result<Response, ApiError> {
        self.within_rate(&org)?;
        let request: model::RecoverRequest = parse_json(&body)?;
        let (since, until) = model::recover_window(&request, Timestamp::now()).map_err(ApiError::bad_request)?;
        let endpoint = self.find(&org, &id)?;
        let recovered = self.work()?.recover(&endpoint, since, until).await?;
        // Each delivery sent again counts against the organization's rate, as if it were a
        // request of its own: one call is no amplifier (the request itself took one).
        self.rate_limit
            .charge(&org, recovered.saturating_sub(1), std::time::Instant::now());
        info!(organization = %org, endpoint = %id, recovered, %since, %until, "failed deliveries recovered");
        let body = model::Recovered { recovered };
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response())
    }

    /// Tries a filter on an event (authenticated before the body was read): `200 {"matches",
    /// ...}`; nothing is sent or stored. Rate-limited: each call compiles and evaluates CEL.
    fn test_filter(&self, org: String, body: Bytes) -> Result<Response, ApiError> {
        self.within_rate(&org)?;
        let request: model::FilterTestRequest = parse_json(&body)?;
        let result = model::test_filter(&request, &self.config.catalog.current()).map_err(ApiError::bad_request)?;
        Ok(warp::reply::json(&result).into_response())
    }

    /// Erases an event's payload from the organization's logs: `200 {"event_id", "deliveries"}`
    /// once durable. An API key's or a session token's to do, never a portal session's.
    async fn erase_event(&self, org: String, event_id: String, principal: Principal) -> Result<Response, ApiError> {
        if matches!(principal.credential, crate::auth::CredentialKind::PortalSession { .. }) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "a portal session cannot erase events; use an API key or a session token",
            ));
        }
        let deliveries = self.work()?.erase_event(&org, &event_id).await?;
        info!(organization = %org, event = %event_id, deliveries, "event payload erased");
        let body = model::Erased { event_id, deliveries };
        Ok(warp::reply::json(&body).into_response())
    }

    /// Reserves room for one more endpoint of `org` until the returned guard drops (after the
    /// create answered, when the cache holds the new endpoint): 409 when the organization has
    /// `--max-endpoints-per-organization` already. Creates in flight count, so concurrent creates
    /// in this process cannot pass the limit together.
    fn endpoint_slot(&self, org: &str) -> Result<CreatingGuard<'_>, ApiError> {
        let mut creating = self.creating.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let in_flight = creating.get(org).copied().unwrap_or(0);
        let max = self.config.max_endpoints_per_organization;
        if self.cache.list(org).len() + in_flight >= max {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("this organization has the most endpoints allowed ({max}); delete one before creating another"),
            ));
        }
        *creating.entry(org.to_string()).or_default() += 1;
        Ok(CreatingGuard {
            state: self,
            org: org.to_string(),
        })
    }

    /// 429 with `Retry-After` when `org` is over its rate on the routes that send or read
    /// deliveries.
    fn within_rate(&self, org: &str) -> Result<(), ApiError> {
        self.rate_limit.take(org, std::time::Instant::now()).map_err(|wait| {
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests for this organization on the delivery routes; retry after the time in Retry-After",
            );
            err.retry_after = Some(wait.as_secs());
            err
        })
    }

    fn work(&self) -> Result<&WorkHandle, ApiError> {
        self.work.as_ref().ok_or_else(|| {
            ApiError::unavailable("the dispatcher does not run in this process; use one that runs it", 30)
        })
    }

    async fn retry_delivery(&self, org: String, id: String, delivery: String) -> Result<Response, ApiError> {
        self.within_rate(&org)?;
        let endpoint = self.find(&org, &id)?;
        let (record, payload) = self.work()?.retry(&endpoint, &delivery).await?;
        let body = model::DeliveryResponse {
            delivery: DeliveryView::of(&record, payload),
        };
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response())
    }

    async fn test_endpoint(&self, org: String, id: String) -> Result<Response, ApiError> {
        self.within_rate(&org)?;
        let endpoint = self.find(&org, &id)?;
        let (record, payload) = self.work()?.send_test(&endpoint).await?;
        let body = model::DeliveryResponse {
            delivery: DeliveryView::of(&record, payload),
        };
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response())
    }
}

fn secret_ready(ep: &WebhookEndpoint) -> bool {
    ep.status.as_ref().is_some_and(|s| {
        s.secret_name.is_some()
            && s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_SECRET_READY && c.status == "True")
    })
}

/// Parses the deliveries route's `limit`: absent is 50; 1 to 1000 accepted; anything else 400.
pub fn parse_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_DELIVERIES_LIMIT);
    };
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_DELIVERIES_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "limit must be an integer from 1 to {MAX_DELIVERIES_LIMIT}"
        ))),
    }
}

/// Every route of the public API ([`ROUTES`]), with JSON errors for anything unmatched.
pub fn routes(state: Shared) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let metrics = state.config.metrics.clone();
    // One filter for every route: the table matches the request, so the filter chain stays short
    // (a chain of `.or()` per route overflowed the compiler's recursion limit in release builds).
    let dispatch = warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::body::stream())
        .and(warp::any().map(move || state.clone()))
        .then(
            |method: Method, path: FullPath, headers: HeaderMap, query: String, body, state: Shared| async move {
                let span = crate::http::request_span("api", method.as_str(), route_template(path.as_str()), &headers);
                let serve = async {
                    state
                        .serve(method.as_str(), path.as_str(), headers, &query, body)
                        .await
                        .unwrap_or_else(Reply::into_response)
                };
                crate::http::traced(span, serve).await
            },
        )
        .recover(crate::http::recover)
        .unify();
    crate::http::with_request_log(dispatch, "api", route_template, metrics)
}

/// Runs the REST facade on `listener` until `shutdown` resolves. `cache` must be started; the
/// facade waits for it to sync before serving.
pub async fn run(
    client: Client,
    config: ApiConfig,
    auth: Authenticator,
    cache: EndpointCache,
    work: Option<WorkHandle>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    cache.wait_ready().await?;
    auth.api_keys().wait_ready().await;
    // Endpoints are checked against the catalog from the first request on.
    config.catalog.wait_ready().await;
    let ready = config.ready.clone();
    // Every replica reads the same key Secret, so any replica accepts the sessions another issued.
    let (portal_key, _) =
        crate::operator_keys::load_or_create(&client, &config.home_namespace, PORTAL_KEY_SECRET, Default::default())
            .await?;
    let auth = auth.with_portal_sessions(crate::auth::PortalSessions::new(portal_key, config.portal_session_ttl));
    // Without a dispatcher here, deliveries are read from a watch of the logs, never with an
    // API-server round trip per request.
    let log_watch = match work {
        Some(_) => None,
        None => {
            let key = crate::delivery_log::load_or_create_key(&client, &config.home_namespace).await?;
            Some(crate::delivery_log::LogWatch::start(client.clone(), &config.scope, key))
        }
    };
    let rate_limit = crate::http::KeyedRateLimit::new(config.organization_rate_limit, ORGANIZATION_BURST);
    let state = Arc::new(ApiState {
        client,
        cache,
        auth,
        config,
        log_watch,
        rate_limit,
        creating: Default::default(),
        work,
        list_bodies: Default::default(),
        list_rebuild: Default::default(),
    });
    info!(listen = %listener.local_addr()?, "REST API serving");
    ready.set_ready();
    let limits = state.config.server_limits;
    crate::http::serve(listener, routes(state), shutdown, limits).await;
    info!("REST API stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None).unwrap(), 50);
        assert_eq!(parse_limit(Some("1")).unwrap(), 1);
        assert_eq!(parse_limit(Some("1000")).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "ten", "", "1.5"] {
            assert_eq!(
                parse_limit(Some(bad)).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }
}
