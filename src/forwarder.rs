//! The forwarder: any replica serves any request, and work for an organization is done by the
//! replica that owns the organization's shard ([`crate::shards`]). [`Router`] is the [`Work`] of
//! a replica among several: it hands each [`WorkRequest`] to this replica's dispatcher or to the
//! owner, over the owner's ingest port; nothing that takes requests imports it.
//!
//! Two kinds of forwarding, two credentials:
//! - Work (`POST` [`WORK_PATH`]: tests, retries, recoveries, delivery listings) is signed with
//!   the replicas' own key ([`crate::replica_key`]); the ingest token alone is refused there. Its
//!   body names an endpoint only by reference ([`crate::work::EndpointRef`]), which the owner
//!   looks up in its own cache.
//! - An event a producer posted ([`WorkRequest::Relay`]) is relayed as it came, to the owner's
//!   public events route, with the producer's ingest token and `Idempotency-Key`: it is the
//!   producer's own request, which the owner would accept from the producer directly, and the
//!   owner's idempotency cache answers it whichever replica the producer reached. The owner's
//!   answer (status, `Retry-After`, body) goes back as it is. [`FORWARDED_HEADER`] on it is
//!   believed for one thing only: not to relay it again (a producer who sets it gets its event
//!   handled, or refused, where it landed); it grants nothing. A [`WorkRequest::Submit`] is done
//!   here, never forwarded: ingest relays an event before it submits one.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tracing::debug;

use crate::replica_key::{ReplicaKey, unix_now};
use crate::shards::{Location, Placement};
use crate::work::{FORWARDED_HEADER, OwnerAnswer, SubmitError, WORK_PATH, Work, WorkHandle, WorkReply, WorkRequest};

/// How long to wait before trying again while a shard changes hands.
const MOVING_RETRY_SECS: u64 = 1;
/// How long to wait while a shard has no owner (a dead owner's Lease has to expire).
const UNOWNED_RETRY_SECS: u64 = 2;

/// Where a request for an organization goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
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
    /// A router over `placement`; `local` (this replica's dispatcher) does what this replica
    /// owns; `token` (the producers' ingest token) relays producers' events; `key` signs work for
    /// the other replicas; `timeout` bounds a forwarded request.
    pub fn new(
        placement: Placement,
        local: WorkHandle,
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
            http,
            token: token.into(),
            key,
            identity: identity.into(),
        })
    }

    /// Where work for `organization_id` goes now.
    fn route(&self, organization_id: &str) -> Route {
        match self.placement.locate_organization(organization_id) {
            Location::Here => Route::Local,
            Location::Peer { address, .. } => Route::Peer(address),
            Location::Moving => Route::Wait(MOVING_RETRY_SECS),
            Location::Unowned => Route::Wait(UNOWNED_RETRY_SECS),
        }
    }

    /// Posts an event, as received, to the owner's ingest port (with the producer's token: see
    /// the module's documentation); returns the owner's answer. An owner that cannot be reached
    /// is moving: 503.
    async fn relay(
        &self,
        address: &str,
        organization_id: &str,
        idempotency_key: Option<&str>,
        body: Bytes,
    ) -> Result<OwnerAnswer, SubmitError> {
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
        // The owner's spans of this event continue this replica's request span (and so the
        // producer's trace). Between replicas only: receivers never get a trace header.
        if let Some(traceparent) = crate::traces::current_traceparent() {
            request = request.header(crate::traces::TRACEPARENT, traceparent);
        }
        let response = request.send().await.map_err(|e| self.unreachable(address, &e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.bytes().await.map_err(|e| self.unreachable(address, &e))?;
        Ok(OwnerAnswer {
            status,
            retry_after,
            body,
        })
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
        // The owner's work (a retry, a test event, an erasure...) continues the trace of the
        // request that asked for it, as a relayed event does. Not signed, and not needed to be:
        // it only places spans.
        if let Some(traceparent) = crate::traces::current_traceparent() {
            post = post.header(crate::traces::TRACEPARENT, traceparent);
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
}

impl Work for Router {
    fn perform(&self, request: WorkRequest) -> BoxFuture<'_, WorkReply> {
        Box::pin(async move {
            let route = match &request {
                // Ingest relayed the event first if it was another replica's (see the module's
                // documentation): a submission is never forwarded.
                WorkRequest::Submit { .. } => Route::Local,
                request => self.route(request.organization_id()),
            };
            let forwarded = match (route, request) {
                (Route::Local, request) => return self.local.perform(request).await,
                (Route::Wait(retry_after_secs), _) => Err(SubmitError::Moving { retry_after_secs }),
                (
                    Route::Peer(address),
                    WorkRequest::Relay {
                        organization_id,
                        idempotency_key,
                        body,
                    },
                ) => self
                    .relay(&address, &organization_id, idempotency_key.as_deref(), body)
                    .await
                    .map(WorkReply::Relayed),
                (Route::Peer(address), request) => self.forward(&address, &request).await,
            };
            forwarded.unwrap_or_else(WorkReply::Failed)
        })
    }
}
