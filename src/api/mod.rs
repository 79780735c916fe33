//! The public REST facade: the documented routes over WebhookEndpoint CRs.
//!
//! Reads come from a watch-backed cache (a kube-runtime reflector), never a round trip per
//! request. Writes go to the API server and return once it accepted them; create and
//! rotate-secret also wait (bounded) for the controller to write the signing secret.

pub mod model;
pub mod portal;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Future;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::auth::{Authenticator, Principal};
use crate::endpoints::EndpointCache;
use crate::http::{ApiError, OTHER_ROUTE, parse_json, path_segments};
use crate::resources::{CONDITION_SECRET_READY, Scope, WebhookEndpoint, signing_secret_name};
use crate::signing::StoredKeyRing;
use crate::signing_secret::stored_key_ring;
use crate::telemetry::{Metrics, ReadyHandle, WriteKind};
use crate::validation::UrlPolicy;
use crate::work::{SubmitError, WorkHandle};
use model::{CreateRequest, UpdateRequest, endpoint_view, new_endpoint, new_endpoint_name, update_patch};

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
}

/// Secret, in the home namespace, holding the key that signs portal sessions. Deleting it (and
/// restarting the replicas) ends every session; nothing else uses it.
pub const PORTAL_KEY_SECRET: &str = "capy-webhooks-portal-key";

/// What a route does with the organization's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Only reads.
    Read,
    /// Changes something or sends deliveries.
    Write,
}

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
        let body = json!({
            "url": format!("{base}/portal/#token={}", session.token),
            "token": session.token,
            "expires_at": model::rfc3339(session.expires_at),
        });
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

    async fn read_signing_secret(&self, namespace: &str, name: &str) -> Result<String, ApiError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = secrets
            .get_opt(&signing_secret_name(name))
            .await
            .map_err(|e| kube_error(e, "reading signing secret"))?;
        match stored_key_ring(secret.as_ref()) {
            StoredKeyRing::Valid(ring) => Ok(ring.current.expose().to_string()),
            _ => Err(ApiError::unavailable(
                "the signing secret is being repaired; retry shortly",
                2,
            )),
        }
    }

    async fn list(&self, org: String, headers: HeaderMap) -> Result<Response, ApiError> {
        self.authorize(&org, &headers, Access::Read).await?;
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
        let endpoints: Vec<_> = self.cache.list(&org).iter().map(|e| endpoint_view(e, true)).collect();
        let body = Bytes::from(
            serde_json::to_vec(&json!({ "webhook_endpoints": endpoints })).map_err(|_| ApiError::internal())?,
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
        let body = json!({ "webhook_endpoint": endpoint_view(&ready, false), "plaintext_secret": secret });
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::CREATED).into_response())
    }

    /// Authenticated before the body was read.
    async fn update(&self, org: String, id: String, body: Bytes) -> Result<Response, ApiError> {
        let request: UpdateRequest = parse_json(&body)?;
        let existing = self.find(&org, &id)?;
        let patch = update_patch(&org, &request, self.config.url_policy).map_err(ApiError::bad_request)?;
        let updated = self.patch_endpoint(&existing, patch).await?;
        Ok(warp::reply::json(&json!({ "webhook_endpoint": endpoint_view(&updated, false) })).into_response())
    }

    async fn settings(&self, org: String, id: String, headers: HeaderMap) -> Result<Response, ApiError> {
        let principal = self.authorize(&org, &headers, Access::Read).await?;
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

    async fn delete(&self, org: String, id: String, headers: HeaderMap) -> Result<Response, ApiError> {
        let principal = self.authorize(&org, &headers, Access::Write).await?;
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
        Ok(warp::reply::json(&json!({ "deleted": true })).into_response())
    }

    async fn rotate_secret(&self, org: String, id: String, headers: HeaderMap) -> Result<Response, ApiError> {
        let principal = self.authorize(&org, &headers, Access::Write).await?;
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
        let rotated = self
            .cache
            .wait_for(&ns, &id, self.config.controller_wait, |ep| {
                ep.filter(|ep| secret_ready(ep) && ep.status.as_ref().is_some_and(|s| s.secret_rotation >= target))
                    .cloned()
            })
            .await;
        let Some(rotated) = rotated else {
            return Err(ApiError::unavailable(
                "the rotation was requested but the controller has not completed it yet; retry later to get the new secret",
                5,
            ));
        };
        let secret = self.read_signing_secret(&ns, &id).await?;
        info!(organization = %org, endpoint = %id, rotation = target, by = %principal.credential, "secret rotated");
        let body = json!({ "webhook_endpoint": endpoint_view(&rotated, false), "plaintext_secret": secret });
        Ok(warp::reply::json(&body).into_response())
    }

    async fn deliveries(
        &self,
        org: String,
        id: String,
        headers: HeaderMap,
        query: HashMap<String, String>,
    ) -> Result<Response, ApiError> {
        self.authorize(&org, &headers, Access::Read).await?;
        self.within_rate(&org)?;
        let limit = parse_limit(query.get("limit").map(String::as_str))?;
        let endpoint = self.find(&org, &id)?;
        let deliveries: Vec<Value> = match &self.work {
            // The dispatcher in this process holds every log in memory.
            Some(work) => work
                .deliveries(&endpoint, limit)
                .await
                .map_err(submit_error)?
                .iter()
                .map(|(record, payload)| record.to_api(payload.as_ref()))
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
                    .ok_or_else(|| ApiError::unavailable("the delivery log is still loading; retry shortly", 2))?;
                log.newest_first(&id, limit)
                    .into_iter()
                    .map(|r| r.to_api(log.payload_json(&r.event_id).as_ref()))
                    .collect()
            }
        };
        Ok(warp::reply::json(&json!({ "deliveries": deliveries })).into_response())
    }

    /// Sends the endpoint's failed deliveries of a window again (authenticated before the body
    /// was read): `202 {"recovered": N}`.
    async fn recover(&self, org: String, id: String, body: Bytes) -> Result<Response, ApiError> {
        self.within_rate(&org)?;
        let request: model::RecoverRequest = parse_json(&body)?;
        let (since, until) = model::recover_window(&request, Timestamp::now()).map_err(ApiError::bad_request)?;
        let endpoint = self.find(&org, &id)?;
        let recovered = self
            .work()?
            .recover(&endpoint, since, until)
            .await
            .map_err(submit_error)?;
        // Each delivery sent again counts against the organization's rate, as if it were a
        // request of its own: one call is no amplifier (the request itself took one).
        self.rate_limit
            .charge(&org, recovered.saturating_sub(1), std::time::Instant::now());
        info!(organization = %org, endpoint = %id, recovered, %since, %until, "failed deliveries recovered");
        let body = json!({ "recovered": recovered });
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response())
    }

    /// [`Self::authorize`] as a warp filter step, for routes with a body: the refusal is a
    /// rejection, so the body is never read for a caller who may not send it.
    async fn authorize_before_body(&self, org: &str, headers: &HeaderMap) -> Result<Principal, warp::Rejection> {
        self.authorize(org, headers, Access::Write)
            .await
            .map_err(warp::reject::custom)
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

    async fn retry_delivery(
        &self,
        org: String,
        id: String,
        delivery: String,
        headers: HeaderMap,
    ) -> Result<Response, ApiError> {
        self.authorize(&org, &headers, Access::Write).await?;
        self.within_rate(&org)?;
        let endpoint = self.find(&org, &id)?;
        let (record, payload) = self.work()?.retry(&endpoint, &delivery).await.map_err(submit_error)?;
        let body = json!({ "delivery": record.to_api(payload.as_ref()) });
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response())
    }

    async fn test_endpoint(&self, org: String, id: String, headers: HeaderMap) -> Result<Response, ApiError> {
        self.authorize(&org, &headers, Access::Write).await?;
        self.within_rate(&org)?;
        let endpoint = self.find(&org, &id)?;
        let (record, payload) = self.work()?.send_test(&endpoint).await.map_err(submit_error)?;
        let body = json!({ "delivery": record.to_api(payload.as_ref()) });
        Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response())
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::NotFound(m) => ApiError::not_found(m),
        SubmitError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
        SubmitError::Unavailable(m) => ApiError::unavailable(m, 2),
        busy @ (SubmitError::Throttled { .. } | SubmitError::Moving { .. }) => {
            ApiError::unavailable(busy.to_string(), busy.retry_after_secs())
        }
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

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(Reply::into_response)
}

/// The OpenAPI 3.1 document of the public API.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Every route of the public API, with JSON errors for anything unmatched.
pub fn routes(state: Shared) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let body_limit = state.config.body_limit;
    let metrics = state.config.metrics.clone();
    let with_state = warp::any().map(move || state.clone());
    let headers = warp::header::headers_cloned();
    let body = crate::http::json_bytes(body_limit);
    // Paths are matched before methods so that a known path with a wrong method is 405 and an
    // unknown path is 404.
    let collection = warp::path!("v1" / "organizations" / String / "webhook-endpoints");
    let item = warp::path!("v1" / "organizations" / String / "webhook-endpoints" / String);
    let rotate = warp::path!("v1" / "organizations" / String / "webhook-endpoints" / String / "rotate-secret");
    let deliveries = warp::path!("v1" / "organizations" / String / "webhook-endpoints" / String / "deliveries");
    let retry =
        warp::path!("v1" / "organizations" / String / "webhook-endpoints" / String / "deliveries" / String / "retry");
    let test = warp::path!("v1" / "organizations" / String / "webhook-endpoints" / String / "test");
    let recover = warp::path!("v1" / "organizations" / String / "webhook-endpoints" / String / "recover");
    let settings = warp::path!("v1" / "organizations" / String / "webhook-endpoints" / String / "settings");
    let portal_sessions = warp::path!("v1" / "organizations" / String / "portal-sessions");

    let list = collection
        .and(warp::get())
        .and(headers)
        .and(with_state.clone())
        .then(|org, h, s: Shared| async move { respond(s.list(org, h).await) });
    // Routes with a body authenticate before they read it: an anonymous client cannot make the
    // facade buffer bodies.
    let create = collection
        .and(warp::post())
        .and(headers)
        .and(with_state.clone())
        .and_then(|org: String, h: HeaderMap, s: Shared| async move {
            s.authorize_before_body(&org, &h).await.map(|p| (org, s, p))
        })
        .and(body.clone())
        .then(|(org, s, p): (String, Shared, Principal), b| async move { respond(s.create(org, p, b).await) });
    let update = item
        .and(warp::patch())
        .and(headers)
        .and(with_state.clone())
        .and_then(|org: String, id: String, h: HeaderMap, s: Shared| async move {
            s.authorize_before_body(&org, &h).await.map(|_| (org, id, s))
        })
        .and(body.clone())
        .then(|(org, id, s): (String, String, Shared), b| async move { respond(s.update(org, id, b).await) });
    let delete = item
        .and(warp::delete())
        .and(headers)
        .and(with_state.clone())
        .then(|org, id, h, s: Shared| async move { respond(s.delete(org, id, h).await) });
    let rotate = rotate
        .and(warp::post())
        .and(headers)
        .and(with_state.clone())
        .then(|org, id, h, s: Shared| async move { respond(s.rotate_secret(org, id, h).await) });
    let deliveries = deliveries
        .and(warp::get())
        .and(headers)
        .and(warp::query::<HashMap<String, String>>())
        .and(with_state.clone())
        .then(|org, id, h, q, s: Shared| async move { respond(s.deliveries(org, id, h, q).await) });
    let retry = retry
        .and(warp::post())
        .and(headers)
        .and(with_state.clone())
        .then(|org, id, d, h, s: Shared| async move { respond(s.retry_delivery(org, id, d, h).await) });
    let test = test
        .and(warp::post())
        .and(headers)
        .and(with_state.clone())
        .then(|org, id, h, s: Shared| async move { respond(s.test_endpoint(org, id, h).await) });
    let recover = recover
        .and(warp::post())
        .and(headers)
        .and(with_state.clone())
        .and_then(|org: String, id: String, h: HeaderMap, s: Shared| async move {
            s.authorize_before_body(&org, &h).await.map(|_| (org, id, s))
        })
        .and(body.clone())
        .then(|(org, id, s): (String, String, Shared), b| async move { respond(s.recover(org, id, b).await) });
    let read_settings = settings
        .and(warp::get())
        .and(headers)
        .and(with_state.clone())
        .then(|org, id, h, s: Shared| async move { respond(s.settings(org, id, h).await) });
    let open_portal_session = portal_sessions
        .and(warp::post())
        .and(headers)
        .and(with_state.clone())
        .and_then(|org: String, h: HeaderMap, s: Shared| async move {
            s.authorize_before_body(&org, &h).await.map(|p| (org, s, p, h))
        })
        .and(crate::http::optional_json_bytes(body_limit))
        .then(|(org, s, p, h): (String, Shared, Principal, HeaderMap), b| async move {
            respond(s.create_portal_session(org, p, h, b).await)
        });
    let update_settings = settings
        .and(warp::patch())
        .and(headers)
        .and(with_state)
        .and_then(|org: String, id: String, h: HeaderMap, s: Shared| async move {
            s.authorize_before_body(&org, &h).await.map(|_| (org, id, s))
        })
        .and(body)
        .then(|(org, id, s): (String, String, Shared), b| async move { respond(s.update_settings(org, id, b).await) });
    let openapi = warp::path!("openapi.json")
        .and(warp::get())
        .map(|| warp::reply::with_header(OPENAPI_JSON, "content-type", "application/json").into_response());

    // Boxed in two groups: one chain of this many filters nests types deep enough to overflow
    // the compiler's recursion limit in release builds.
    let documented = list
        .or(create)
        .unify()
        .or(update)
        .unify()
        .or(delete)
        .unify()
        .or(rotate)
        .unify()
        .or(deliveries)
        .unify()
        .boxed();
    let extensions = retry
        .or(test)
        .unify()
        .or(recover)
        .unify()
        .or(read_settings)
        .unify()
        .or(update_settings)
        .unify()
        .or(open_portal_session)
        .unify()
        .or(portal::routes())
        .unify()
        .or(openapi)
        .unify()
        .boxed();
    let routes = documented.or(extensions).unify().recover(crate::http::recover).unify();
    crate::http::with_request_log(routes, "api", route_template, allowed_methods, metrics)
}

/// The route template of a REST path (the `route` label of HTTP metrics): ids become `:org`,
/// `:id` and `:delivery`; a path no route serves is `other`.
pub fn route_template(path: &str) -> &'static str {
    let param = |s: &str| !s.is_empty();
    match path_segments(path).as_slice() {
        ["openapi.json"] => "/openapi.json",
        ["v1", "organizations", org, "portal-sessions"] if param(org) => "/v1/organizations/:org/portal-sessions",
        ["portal"] | ["portal", ""] => "/portal/",
        ["portal", asset] => portal::asset_route(asset).unwrap_or(OTHER_ROUTE),
        ["v1", "organizations", org, "webhook-endpoints", rest @ ..] if param(org) => match rest {
            [] => "/v1/organizations/:org/webhook-endpoints",
            [id] if param(id) => "/v1/organizations/:org/webhook-endpoints/:id",
            [id, "rotate-secret"] if param(id) => "/v1/organizations/:org/webhook-endpoints/:id/rotate-secret",
            [id, "deliveries"] if param(id) => "/v1/organizations/:org/webhook-endpoints/:id/deliveries",
            [id, "deliveries", delivery, "retry"] if param(id) && param(delivery) => {
                "/v1/organizations/:org/webhook-endpoints/:id/deliveries/:delivery/retry"
            }
            [id, "test"] if param(id) => "/v1/organizations/:org/webhook-endpoints/:id/test",
            [id, "recover"] if param(id) => "/v1/organizations/:org/webhook-endpoints/:id/recover",
            [id, "settings"] if param(id) => "/v1/organizations/:org/webhook-endpoints/:id/settings",
            _ => OTHER_ROUTE,
        },
        _ => OTHER_ROUTE,
    }
}

/// The methods each REST route template takes (the `Allow` header of a 405).
pub fn allowed_methods(template: &'static str) -> &'static str {
    match template {
        "/openapi.json" | "/portal/" | "/portal/app.js" | "/portal/app.css" => "GET",
        "/v1/organizations/:org/portal-sessions" => "POST",
        "/v1/organizations/:org/webhook-endpoints" => "GET, POST",
        "/v1/organizations/:org/webhook-endpoints/:id" => "PATCH, DELETE",
        "/v1/organizations/:org/webhook-endpoints/:id/deliveries" => "GET",
        "/v1/organizations/:org/webhook-endpoints/:id/settings" => "GET, PATCH",
        "/v1/organizations/:org/webhook-endpoints/:id/rotate-secret"
        | "/v1/organizations/:org/webhook-endpoints/:id/deliveries/:delivery/retry"
        | "/v1/organizations/:org/webhook-endpoints/:id/test"
        | "/v1/organizations/:org/webhook-endpoints/:id/recover" => "POST",
        _ => "",
    }
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

    #[test]
    fn route_templates_hide_ids() {
        let base = "/v1/organizations/:org/webhook-endpoints";
        for (path, want) in [
            ("/v1/organizations/org_1/webhook-endpoints", base.to_string()),
            ("/v1/organizations/org_1/webhook-endpoints/ep-01", format!("{base}/:id")),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/rotate-secret",
                format!("{base}/:id/rotate-secret"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/deliveries",
                format!("{base}/:id/deliveries"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/deliveries/msg_1/retry",
                format!("{base}/:id/deliveries/:delivery/retry"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/test",
                format!("{base}/:id/test"),
            ),
            (
                "/v1/organizations/org_1/webhook-endpoints/ep-01/settings",
                format!("{base}/:id/settings"),
            ),
            ("/openapi.json", "/openapi.json".to_string()),
            ("/portal", "/portal/".to_string()),
            ("/portal/", "/portal/".to_string()),
            ("/portal/app.js", "/portal/app.js".to_string()),
            (
                "/v1/organizations/org_1/portal-sessions",
                "/v1/organizations/:org/portal-sessions".to_string(),
            ),
        ] {
            assert_eq!(route_template(path), want, "{path}");
        }
        for other in [
            "/",
            "",
            "/v1/organizations/org_1/webhook-endpoints/",
            "/v1/organizations//webhook-endpoints",
            "/v1/organizations/org_1/webhook-endpoints/ep-01/nope",
            "/v1/organizations/org_1/events",
            "/openapi.json/x",
            "/secret-looking/ep-0123456789",
            "/portal/app.js.map",
            "/portal/x/y",
        ] {
            assert_eq!(route_template(other), OTHER_ROUTE, "{other}");
        }
    }

    #[test]
    fn openapi_document_is_json_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        // Every documented path is served: a concrete path made from it has a route template.
        let concrete = |p: &str| {
            p.split('/')
                .map(|seg| if seg.starts_with('{') { "x1" } else { seg })
                .collect::<Vec<_>>()
                .join("/")
        };
        let documented: std::collections::BTreeSet<&str> = paths.keys().map(|p| route_template(&concrete(p))).collect();
        assert!(!documented.contains(OTHER_ROUTE), "a documented path no route serves");
        // And every route the facade serves (but the document itself) is documented.
        let served = [
            "/v1/organizations/:org/webhook-endpoints",
            "/v1/organizations/:org/webhook-endpoints/:id",
            "/v1/organizations/:org/webhook-endpoints/:id/rotate-secret",
            "/v1/organizations/:org/webhook-endpoints/:id/deliveries",
            "/v1/organizations/:org/webhook-endpoints/:id/deliveries/:delivery/retry",
            "/v1/organizations/:org/webhook-endpoints/:id/test",
            "/v1/organizations/:org/webhook-endpoints/:id/recover",
            "/v1/organizations/:org/webhook-endpoints/:id/settings",
            "/v1/organizations/:org/portal-sessions",
        ];
        assert_eq!(documented, served.into_iter().collect());
        // Every route says which methods it takes, as the document does.
        for (path, item) in paths {
            let mut documented_methods: Vec<String> = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "patch", "delete", "put"].contains(&k.as_str()))
                .map(|m| m.to_uppercase())
                .collect();
            documented_methods.sort();
            let mut allowed: Vec<String> = allowed_methods(route_template(&concrete(path)))
                .split(", ")
                .map(str::to_string)
                .collect();
            allowed.sort();
            assert_eq!(allowed, documented_methods, "{path}");
        }
    }
}
