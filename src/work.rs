//! The work handle: what the components that take requests (the REST facade, the ingest port)
//! ask of the dispatcher, without importing it. `main.rs` wires a [`WorkHandle`] to the
//! dispatcher of the process; it is also the seam where work for an organization another replica
//! owns would be forwarded.
//!
//! What is forwarded names an endpoint by reference ([`EndpointRef`]), never carries it: the
//! replica that does the work looks it up in its own cache ([`perform`]), with the rule the REST
//! facade uses, so nothing in a request body is believed about an endpoint.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::delivery_log::DeliveryRecord;
use crate::endpoints::EndpointCache;
use crate::resources::WebhookEndpoint;

/// Why an event, a test, a retry or a read could not be done.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
// Adjacently tagged: an internally tagged newtype variant holding a string cannot be serialized,
// so a forwarded "not found" used to reach the forwarding replica as a broken answer.
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum SubmitError {
    /// The log could not be written (API server unreachable, or the log is full), or the
    /// dispatcher is shutting down.
    #[error("deliveries could not be persisted: {0}")]
    Unavailable(String),
    /// No such endpoint or delivery.
    #[error("{0}")]
    NotFound(String),
    /// The delivery is still pending.
    #[error("{0}")]
    Conflict(String),
    /// The write budget is spent: try again after this many seconds.
    #[error("the delivery log's write budget is spent; retry in {retry_after_secs} s")]
    Throttled {
        /// Seconds until the budget admits new work again.
        retry_after_secs: u64,
    },
    /// The organization's shard is changing replicas (or its owner just died): try again soon.
    #[error("this organization's deliveries are moving between replicas; retry in {retry_after_secs} s")]
    Moving {
        /// Seconds to wait before trying again.
        retry_after_secs: u64,
    },
}

impl SubmitError {
    /// The `Retry-After` of the 503 this error answers with.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::Throttled { retry_after_secs } | Self::Moving { retry_after_secs } => *retry_after_secs,
            _ => 2,
        }
    }
}

/// An endpoint as a [`WorkRequest`] names it: which object, of which organization. Only a
/// reference; the replica that does the work finds the endpoint itself
/// ([`EndpointCache::resolve`]) and refuses one it does not know by these four.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRef {
    /// Namespace of the WebhookEndpoint.
    pub namespace: String,
    /// Name (the endpoint id).
    pub name: String,
    /// uid: a deleted and re-created endpoint of the same name is another endpoint.
    pub uid: String,
    /// The organization the endpoint must belong to (and whose owner does the work).
    pub organization_id: String,
}

impl EndpointRef {
    /// The reference to `endpoint`.
    pub fn of(endpoint: &WebhookEndpoint) -> Self {
        Self {
            namespace: endpoint.metadata.namespace.clone().unwrap_or_default(),
            name: endpoint.metadata.name.clone().unwrap_or_default(),
            uid: endpoint.metadata.uid.clone().unwrap_or_default(),
            organization_id: endpoint.spec.organization_id.clone(),
        }
    }
}

/// One piece of [`Work`], as a replica forwards it to the replica that owns the organization
/// (over the internal port, `POST /internal/v1/work`, signed with the replicas' key:
/// [`crate::replica_key`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WorkRequest {
    /// [`Work::submit`].
    Submit {
        /// Organization id.
        organization_id: String,
        /// Event type.
        event_type: String,
        /// Event data.
        data: Value,
    },
    /// [`Work::send_test`].
    SendTest {
        /// The endpoint.
        endpoint: EndpointRef,
    },
    /// [`Work::retry`].
    Retry {
        /// The endpoint.
        endpoint: EndpointRef,
        /// The delivery.
        delivery_id: String,
    },
    /// [`Work::recover`].
    Recover {
        /// The endpoint.
        endpoint: EndpointRef,
        /// From (inclusive).
        since: jiff::Timestamp,
        /// Until (exclusive).
        until: jiff::Timestamp,
    },
    /// [`Work::deliveries`].
    Deliveries {
        /// The endpoint.
        endpoint: EndpointRef,
        /// Most deliveries.
        limit: usize,
    },
}

impl WorkRequest {
    /// The organization whose owner must do this.
    pub fn organization_id(&self) -> &str {
        match self {
            Self::Submit { organization_id, .. } => organization_id,
            Self::SendTest { endpoint }
            | Self::Retry { endpoint, .. }
            | Self::Recover { endpoint, .. }
            | Self::Deliveries { endpoint, .. } => &endpoint.organization_id,
        }
    }
}

/// The answer to a [`WorkRequest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkReply {
    /// The event id and the number of deliveries.
    Submitted(String, usize),
    /// One delivery and its payload.
    Listed(Box<Listed>),
    /// How many deliveries were sent again.
    Recovered(usize),
    /// Deliveries, newest first.
    Deliveries(Vec<Listed>),
    /// It could not be done.
    Failed(SubmitError),
}

/// How long a replica waits for its cache to show an endpoint another replica named (the
/// forwarding replica may have seen a create a moment earlier).
const LOOKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Does a request here, forwarded or not: the endpoint it names is looked up in `endpoints`
/// ([`EndpointCache::resolve`]); one unknown, of another uid or organization, being deleted or
/// not bound to its organization is not found.
pub async fn perform(work: &WorkHandle, endpoints: &EndpointCache, request: WorkRequest) -> WorkReply {
    let resolve = |r: EndpointRef| async move {
        endpoints.wait_for_uid(&r.namespace, &r.name, &r.uid, LOOKUP_WAIT).await;
        endpoints
            .resolve(&r)
            .ok_or_else(|| SubmitError::NotFound(format!("no endpoint {} in {}", r.name, r.namespace)))
    };
    let result = match request {
        WorkRequest::Submit {
            organization_id,
            event_type,
            data,
        } => work
            .submit(&organization_id, &event_type, data)
            .await
            .map(|(id, n)| WorkReply::Submitted(id, n)),
        WorkRequest::SendTest { endpoint } => match resolve(endpoint).await {
            Ok(endpoint) => work.send_test(&endpoint).await.map(|l| WorkReply::Listed(Box::new(l))),
            Err(e) => Err(e),
        },
        WorkRequest::Retry { endpoint, delivery_id } => match resolve(endpoint).await {
            Ok(endpoint) => work
                .retry(&endpoint, &delivery_id)
                .await
                .map(|l| WorkReply::Listed(Box::new(l))),
            Err(e) => Err(e),
        },
        WorkRequest::Recover { endpoint, since, until } => match resolve(endpoint).await {
            Ok(endpoint) => work.recover(&endpoint, since, until).await.map(WorkReply::Recovered),
            Err(e) => Err(e),
        },
        WorkRequest::Deliveries { endpoint, limit } => match resolve(endpoint).await {
            Ok(endpoint) => work.deliveries(&endpoint, limit).await.map(WorkReply::Deliveries),
            Err(e) => Err(e),
        },
    };
    result.unwrap_or_else(WorkReply::Failed)
}

/// A delivery as the REST facade shows it: the record and its event's payload.
pub type Listed = (DeliveryRecord, Option<Value>);

/// Most deliveries one recovery sends again.
pub const MAX_RECOVERED: usize = 10_000;

/// The work a dispatcher does on request.
pub trait Work: Send + Sync + 'static {
    /// Accepts an event: a durable pending delivery for every matching active endpoint of the
    /// organization. Returns the event id and the number of deliveries.
    fn submit<'a>(
        &'a self,
        organization_id: &'a str,
        event_type: &'a str,
        data: Value,
    ) -> BoxFuture<'a, Result<(String, usize), SubmitError>>;

    /// Sends a `webhook.test` event to one endpoint now.
    fn send_test<'a>(&'a self, endpoint: &'a WebhookEndpoint) -> BoxFuture<'a, Result<Listed, SubmitError>>;

    /// Sends a finished delivery again, now, once.
    fn retry<'a>(
        &'a self,
        endpoint: &'a WebhookEndpoint,
        delivery_id: &'a str,
    ) -> BoxFuture<'a, Result<Listed, SubmitError>>;

    /// Sends every `failed` delivery of an endpoint created in `[since, until)` again (the oldest
    /// [`MAX_RECOVERED`] at most), keeping their ids. Returns how many.
    fn recover<'a>(
        &'a self,
        endpoint: &'a WebhookEndpoint,
        since: jiff::Timestamp,
        until: jiff::Timestamp,
    ) -> BoxFuture<'a, Result<usize, SubmitError>>;

    /// Up to `limit` of an endpoint's deliveries, newest first.
    fn deliveries<'a>(
        &'a self,
        endpoint: &'a WebhookEndpoint,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Listed>, SubmitError>>;
}

/// A cheap, cloneable handle to the [`Work`] of this process.
#[derive(Clone)]
pub struct WorkHandle(Arc<dyn Work>);

impl std::fmt::Debug for WorkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkHandle")
    }
}

impl WorkHandle {
    /// A handle to `work`.
    pub fn new(work: impl Work) -> Self {
        Self(Arc::new(work))
    }

    /// See [`Work::submit`].
    pub async fn submit(
        &self,
        organization_id: &str,
        event_type: &str,
        data: Value,
    ) -> Result<(String, usize), SubmitError> {
        self.0.submit(organization_id, event_type, data).await
    }

    /// See [`Work::send_test`].
    pub async fn send_test(&self, endpoint: &WebhookEndpoint) -> Result<Listed, SubmitError> {
        self.0.send_test(endpoint).await
    }

    /// See [`Work::retry`].
    pub async fn retry(&self, endpoint: &WebhookEndpoint, delivery_id: &str) -> Result<Listed, SubmitError> {
        self.0.retry(endpoint, delivery_id).await
    }

    /// See [`Work::recover`].
    pub async fn recover(
        &self,
        endpoint: &WebhookEndpoint,
        since: jiff::Timestamp,
        until: jiff::Timestamp,
    ) -> Result<usize, SubmitError> {
        self.0.recover(endpoint, since, until).await
    }

    /// See [`Work::deliveries`].
    pub async fn deliveries(&self, endpoint: &WebhookEndpoint, limit: usize) -> Result<Vec<Listed>, SubmitError> {
        self.0.deliveries(endpoint, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_crosses_the_wire() {
        for e in [
            SubmitError::NotFound("no endpoint x".into()),
            SubmitError::Conflict("pending".into()),
            SubmitError::Unavailable("full".into()),
            SubmitError::Throttled { retry_after_secs: 3 },
            SubmitError::Moving { retry_after_secs: 1 },
        ] {
            let wire = serde_json::to_string(&WorkReply::Failed(e.clone())).expect("serializes");
            match serde_json::from_str::<WorkReply>(&wire).expect("parses") {
                WorkReply::Failed(back) => assert_eq!(back, e),
                other => panic!("{other:?}"),
            }
        }
    }
}
