//! Any replica serves any request: work for an organization is done by the replica that owns the
//! organization's shard ([`crate::shards`]), and the others forward it there over the internal
//! port. Events keep their `Idempotency-Key` on the way, so the owner's idempotency cache answers
//! whichever replica a producer reached.
//!
//! Two kinds of forwarding, two credentials:
//! - Work (`POST` [`WORK_PATH`]: events submitted through REST, tests, retries, recoveries, delivery
//!   listings) is signed with the replicas' own key ([`crate::replica_key`]); the ingest token
//!   alone is refused there. Its body names an endpoint only by reference ([`EndpointRef`]),
//!   which the owner looks up in its own cache ([`perform`]).
//! - An event a producer posted is relayed as it came, to the owner's public events route, with
//!   the producer's ingest token: it is the producer's own request, which the owner would accept
//!   from the producer directly. [`FORWARDED_HEADER`] on it is believed for one thing only: not
//!   to forward it again (a producer who sets it gets its event handled, or refused, where it
//!   landed); it grants nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use jiff::Timestamp;
use serde_json::Value;
use tracing::debug;

use crate::endpoints::EndpointCache;
use crate::replica_key::{ReplicaKey, unix_now};
use crate::resources::WebhookEndpoint;
use crate::shards::{Location, Placement};
use crate::work::{EndpointRef, Listed, SubmitError, Work, WorkHandle, WorkReply, WorkRequest, perform};

/// Path of the internal route that does forwarded work (ingest port only).
pub const WORK_PATH: &str = "/internal/v1/work";

/// Header a replica sets on an event it relays; the receiver never forwards such a request again,
/// and trusts it for nothing else (anyone may set it).
pub const FORWARDED_HEADER: &str = "x-capy-webhooks-forwarded-by";

/// How long to wait before trying again while a shard changes hands.
const MOVING_RETRY_SECS: u64 = 1;
/// How long to wait while a shard has no owner (a dead owner's Lease has to expire).
const UNOWNED_RETRY_SECS: u64 = 2;

/// Where a request for an organization goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This replica owns it.
    Local,
    /// Another replica owns it, at this address.
    Peer(String),
    /// Nobody can take it now: answer 503 with this `Retry-After`.
    Wait(u64),
}

/// Sends each piece of work to the owner of its organization. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    placement: Placement,
    local: WorkHandle,
    endpoints: EndpointCache,
    http: reqwest::Client,
    token: Arc<str>,
    key: ReplicaKey,
    identity: Arc<str>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router over `placement`; `local` does what this replica owns, on the endpoints of
    /// `endpoints`; `token` (the producers' ingest token) relays producers' events; `key` signs
    /// work for, and checks work from, the other replicas; `timeout` bounds a forwarded request.
    pub fn new(
        placement: Placement,
        local: WorkHandle,
        endpoints: EndpointCache,
        token: &str,
        key: ReplicaKey,
        identity: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout)
            // Replicas talk to each other directly, never through an environment's proxy.
            .no_proxy()
            .build()?;
        Ok(Self {
            placement,
            local,
            endpoints,
            http,
            token: token.into(),
            key,
            identity: identity.into(),
        })
    }

    /// Where work for `organization_id` goes now.
    pub fn route(&self, organization_id: &str) -> Route {
        match self.placement.locate_organization(organization_id) {
            Location::Here => Route::Local,
            Location::Peer { address, .. } => Route::Peer(address),
            Location::Moving => Route::Wait(MOVING_RETRY_SECS),
            Location::Unowned => Route::Wait(UNOWNED_RETRY_SECS),
        }
    }

    /// This replica's identity (what [`FORWARDED_HEADER`] carries).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The key replicas sign their work with.
    pub fn replica_key(&self) -> &ReplicaKey {
        &self.key
    }

    /// Does work another replica sent here (its signature checked by the caller).
    pub async fn perform_here(&self, request: WorkRequest) -> WorkReply {
        perform(&self.local, &self.endpoints, request).await
    }

    /// Posts an event, as received, to the owner's ingest port (with the producer's token: see
    /// the module's documentation); returns the owner's answer
    /// (status, `Retry-After`, body). An owner that cannot be reached is moving: 503.
    pub async fn forward_event(
        &self,
        address: &str,
        organization_id: &str,
        idempotency_key: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, Option<String>, Bytes), SubmitError> {
        let url = format!("http://{address}/v1/organizations/{organization_id}/events");
        let mut request = self
            .http
            .post(url)
            .bearer_auth(&*self.token)
            .header(FORWARDED_HEADER, &*self.identity)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.map_err(|e| self.unreachable(address, &e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.bytes().await.map_err(|e| self.unreachable(address, &e))?;
        Ok((status, retry_after, body))
    }

    fn unreachable(&self, address: &str, e: &reqwest::Error) -> SubmitError {
        debug!(%address, error = %e, "the owning replica did not answer");
        SubmitError::Moving {
            retry_after_secs: MOVING_RETRY_SECS,
        }
    }

    async fn forward(&self, address: &str, request: &WorkRequest) -> Result<WorkReply, SubmitError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| SubmitError::Unavailable(format!("cannot encode forwarded work: {e}")))?;
        let mut post = self
            .http
            .post(format!("http://{address}{WORK_PATH}"))
            .header(FORWARDED_HEADER, &*self.identity)
            .header("content-type", "application/json");
        for (name, value) in self.key.sign("POST", WORK_PATH, unix_now(), &body) {
            post = post.header(name, value);
        }
        let response = post
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(address, &e))?;
        if !response.status().is_success() {
            return Err(SubmitError::Unavailable(format!(
                "the owning replica answered {}",
                response.status()
            )));
        }
        response
            .json::<WorkReply>()
            .await
            .map_err(|e| self.unreachable(address, &e))
    }

    async fn run(&self, request: WorkRequest) -> Result<WorkReply, SubmitError> {
        let reply = match self.route(request.organization_id()) {
            Route::Local => self.perform_here(request).await,
            Route::Peer(address) => self.forward(&address, &request).await?,
            Route::Wait(retry_after_secs) => return Err(SubmitError::Moving { retry_after_secs }),
        };
        match reply {
            WorkReply::Failed(e) => Err(e),
            reply => Ok(reply),
        }
    }
}

fn unexpected(reply: WorkReply) -> SubmitError {
    SubmitError::Unavailable(format!("unexpected answer from the owning replica: {reply:?}"))
}

impl Work for Router {
    fn submit<'a>(
        &'a self,
        organization_id: &'a str,
        event_type: &'a str,
        data: Value,
    ) -> BoxFuture<'a, Result<(String, usize), SubmitError>> {
        Box::pin(async move {
            let request = WorkRequest::Submit {
                organization_id: organization_id.into(),
                event_type: event_type.into(),
                data,
            };
            match self.run(request).await? {
                WorkReply::Submitted(id, n) => Ok((id, n)),
                other => Err(unexpected(other)),
            }
        })
    }

    fn send_test<'a>(&'a self, endpoint: &'a WebhookEndpoint) -> BoxFuture<'a, Result<Listed, SubmitError>> {
        Box::pin(async move {
            let request = WorkRequest::SendTest {
                endpoint: EndpointRef::of(endpoint),
            };
            match self.run(request).await? {
                WorkReply::Listed(listed) => Ok(*listed),
                other => Err(unexpected(other)),
            }
        })
    }

    fn retry<'a>(
        &'a self,
        endpoint: &'a WebhookEndpoint,
        delivery_id: &'a str,
    ) -> BoxFuture<'a, Result<Listed, SubmitError>> {
        Box::pin(async move {
            let request = WorkRequest::Retry {
                endpoint: EndpointRef::of(endpoint),
                delivery_id: delivery_id.into(),
            };
            match self.run(request).await? {
                WorkReply::Listed(listed) => Ok(*listed),
                other => Err(unexpected(other)),
            }
        })
    }

    fn recover<'a>(
        &'a self,
        endpoint: &'a WebhookEndpoint,
        since: Timestamp,
        until: Timestamp,
    ) -> BoxFuture<'a, Result<usize, SubmitError>> {
        Box::pin(async move {
            let request = WorkRequest::Recover {
                endpoint: EndpointRef::of(endpoint),
                since,
                until,
            };
            match self.run(request).await? {
                WorkReply::Recovered(n) => Ok(n),
                other => Err(unexpected(other)),
            }
        })
    }

    fn deliveries<'a>(
        &'a self,
        endpoint: &'a WebhookEndpoint,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Listed>, SubmitError>> {
        Box::pin(async move {
            let request = WorkRequest::Deliveries {
                endpoint: EndpointRef::of(endpoint),
                limit,
            };
            match self.run(request).await? {
                WorkReply::Deliveries(list) => Ok(list),
                other => Err(unexpected(other)),
            }
        })
    }
}
