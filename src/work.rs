//! The work handle: what the components that take requests (the REST facade, the ingest port)
//! ask of the dispatcher, without importing it. `main.rs` wires a [`WorkHandle`] to the
//! dispatcher of the process; it is also the seam where work for an organization another replica
//! owns would be forwarded.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::delivery_log::DeliveryRecord;
use crate::resources::WebhookEndpoint;

/// Why an event, a test, a retry or a read could not be done.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
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

/// One piece of [`Work`], as a replica forwards it to the replica that owns the organization
/// (over the internal port, `POST /internal/v1/work`, with the ingest token).
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
        /// The endpoint, as the forwarding replica's cache has it.
        endpoint: Box<WebhookEndpoint>,
    },
    /// [`Work::retry`].
    Retry {
        /// The endpoint.
        endpoint: Box<WebhookEndpoint>,
        /// The delivery.
        delivery_id: String,
    },
    /// [`Work::recover`].
    Recover {
        /// The endpoint.
        endpoint: Box<WebhookEndpoint>,
        /// From (inclusive).
        since: jiff::Timestamp,
        /// Until (exclusive).
        until: jiff::Timestamp,
    },
    /// [`Work::deliveries`].
    Deliveries {
        /// The endpoint.
        endpoint: Box<WebhookEndpoint>,
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
            | Self::Deliveries { endpoint, .. } => &endpoint.spec.organization_id,
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

/// Does a forwarded request here.
pub async fn perform(work: &WorkHandle, request: WorkRequest) -> WorkReply {
    let result = match request {
        WorkRequest::Submit {
            organization_id,
            event_type,
            data,
        } => work
            .submit(&organization_id, &event_type, data)
            .await
            .map(|(id, n)| WorkReply::Submitted(id, n)),
        WorkRequest::SendTest { endpoint } => work.send_test(&endpoint).await.map(|l| WorkReply::Listed(Box::new(l))),
        WorkRequest::Retry { endpoint, delivery_id } => work
            .retry(&endpoint, &delivery_id)
            .await
            .map(|l| WorkReply::Listed(Box::new(l))),
        WorkRequest::Recover { endpoint, since, until } => {
            work.recover(&endpoint, since, until).await.map(WorkReply::Recovered)
        }
        WorkRequest::Deliveries { endpoint, limit } => {
            work.deliveries(&endpoint, limit).await.map(WorkReply::Deliveries)
        }
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
