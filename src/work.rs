//! The work handle: how the components that take requests (the REST facade, the ingest port)
//! reach work, without importing who does it. Work is one request ([`WorkRequest`]) and one
//! answer ([`WorkReply`]): the [`Work`] trait has one method, [`Work::perform`], and the typed
//! calls (`submit`, `send_test`, ...) are spelled once, on [`WorkHandle`].
//!
//! Two things implement [`Work`], and `main.rs` wires a [`WorkHandle`] to one of them: the
//! dispatcher, which does the work (a single process that serves every organization uses it
//! alone), and the forwarder ([`crate::forwarder`]), which hands each request to the replica that
//! owns its organization and the dispatcher does what this replica owns.
//!
//! A request crosses between replicas as JSON, `POST` [`WORK_PATH`], signed with the replicas' key
//! ([`crate::replica_key`]). It names an endpoint by reference ([`EndpointRef`]), never carries
//! it: the replica that does the work looks it up in its own cache ([`EndpointRef::look_up`]),
//! with the rule the REST facade uses, so nothing in a request body is believed about an
//! endpoint. An event a producer posted is the exception: it goes to its owner as the producer's
//! own request ([`WorkRequest::Relay`]), so that the owner's idempotency cache answers it.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use warp::http::StatusCode;

use crate::delivery::attempt_stats::AttemptStats;
use crate::delivery_log::DeliveryRecord;
use crate::endpoints::EndpointCache;
use crate::http::{ApiError, DEFAULT_RETRY_AFTER_SECS};
use crate::operational::{OPERATIONAL_ORGANIZATION, OperationalEvent};
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
            _ => DEFAULT_RETRY_AFTER_SECS,
        }
    }
}

/// The one HTTP answer to work that could not be done, on the public API and the ingest port
/// alike: 404 and 409 as they say, 503 with `Retry-After` for everything that may pass.
impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let retry_after = e.retry_after_secs();
        match e {
            SubmitError::NotFound(m) => ApiError::not_found(m),
            SubmitError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            // The cause alone: "deliveries could not be persisted" is what a 503 says already.
            SubmitError::Unavailable(m) => ApiError::unavailable(m, retry_after),
            busy @ (SubmitError::Throttled { .. } | SubmitError::Moving { .. }) => {
                ApiError::unavailable(busy.to_string(), retry_after)
            }
        }
    }
}

/// Path of the internal route of the ingest port that does work another replica forwarded.
pub const WORK_PATH: &str = "/internal/v1/work";

/// Header a replica sets on what it forwards: an event it relays is never relayed again. Anyone
/// may set it, so it is trusted for nothing else.
pub const FORWARDED_HEADER: &str = "x-capy-webhooks-forwarded-by";

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

/// How long a replica waits for its cache to show an endpoint another replica named (the
/// forwarding replica may have seen a create a moment earlier).
const LOOKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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

    /// The endpoint this names, looked up in `endpoints` ([`EndpointCache::resolve`]), waiting a
    /// little for a cache behind the replica that named it; one unknown, of another uid or
    /// organization, being deleted or not bound to its organization is not found.
    pub async fn look_up(&self, endpoints: &EndpointCache) -> Result<Arc<WebhookEndpoint>, SubmitError> {
        endpoints
            .wait_for_uid(&self.namespace, &self.name, &self.uid, LOOKUP_WAIT)
            .await;
        endpoints
            .resolve(self)
            .ok_or_else(|| SubmitError::NotFound(format!("no endpoint {} in {}", self.name, self.namespace)))
    }
}

/// One piece of work: what a [`WorkHandle`] asks of a [`Work`], and what a replica forwards to
/// the replica that owns the organization.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WorkRequest {
    /// Accept an event: a durable pending delivery for every matching active endpoint of the
    /// organization. Answered [`WorkReply::Submitted`]. Done where it is asked, never forwarded:
    /// an event reaches its owner as a [`Self::Relay`] first.
    Submit {
        /// Organization id.
        organization_id: String,
        /// Event type.
        event_type: String,
        /// Event data.
        data: Value,
    },
    /// Pass an event a producer posted here, as it came, to the replica that owns its
    /// organization, with its `Idempotency-Key` and [`FORWARDED_HEADER`]. Answered
    /// [`WorkReply::Relayed`] with the owner's answer, or [`WorkReply::NotRelayed`] when the
    /// organization is this replica's. Never sent as work itself: it is the producer's request
    /// that goes, so that the owner's idempotency cache answers whichever replica the producer
    /// reached.
    #[serde(skip)]
    Relay {
        /// Organization id.
        organization_id: String,
        /// The producer's `Idempotency-Key`.
        idempotency_key: Option<String>,
        /// The event's body, as the producer sent it.
        body: Bytes,
    },
    /// Send a `webhook.test` event to one endpoint now. Answered [`WorkReply::Listed`].
    SendTest {
        /// The endpoint.
        endpoint: EndpointRef,
    },
    /// Send a finished delivery again, now, once. Answered [`WorkReply::Listed`].
    Retry {
        /// The endpoint.
        endpoint: EndpointRef,
        /// The delivery.
        delivery_id: String,
    },
    /// Send every `failed` delivery of an endpoint created in `[since, until)` again (the oldest
    /// [`MAX_RECOVERED`] at most), keeping their ids. Answered [`WorkReply::Recovered`].
    Recover {
        /// The endpoint.
        endpoint: EndpointRef,
        /// From (inclusive).
        since: jiff::Timestamp,
        /// Until (exclusive).
        until: jiff::Timestamp,
    },
    /// Store an operational event for the platform's receiver (see [`crate::operational`]), in
    /// the log of [`OPERATIONAL_ORGANIZATION`], unless the log holds its delivery already (the
    /// same change told again). Answered [`WorkReply::Submitted`] with the event id and 1 once
    /// durable (stored now or before).
    Operational {
        /// The event.
        event: OperationalEvent,
    },
    /// Erase an event's payload from every log of the organization; its pending deliveries end
    /// `failed`. Answered [`WorkReply::Erased`] once durable; not found when no delivery of the
    /// organization carries the event.
    EraseEvent {
        /// Organization id.
        organization_id: String,
        /// The event.
        event_id: String,
    },
    /// An endpoint's attempts of the last day, by hour. Answered [`WorkReply::AttemptStats`].
    AttemptStats {
        /// The endpoint.
        endpoint: EndpointRef,
    },
    /// Up to `limit` of an endpoint's deliveries, newest first. Answered
    /// [`WorkReply::Deliveries`].
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
            Self::Submit { organization_id, .. }
            | Self::Relay { organization_id, .. }
            | Self::EraseEvent { organization_id, .. } => organization_id,
            Self::Operational { .. } => OPERATIONAL_ORGANIZATION,
            Self::SendTest { endpoint }
            | Self::Retry { endpoint, .. }
            | Self::Recover { endpoint, .. }
            | Self::Deliveries { endpoint, .. }
            | Self::AttemptStats { endpoint } => &endpoint.organization_id,
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
    /// How many deliveries carry the erased event.
    Erased(usize),
    /// Deliveries, newest first.
    Deliveries(Vec<Listed>),
    /// An endpoint's attempts of the last day.
    AttemptStats(AttemptStats),
    /// The owner's answer to a relayed event.
    #[serde(skip)]
    Relayed(OwnerAnswer),
    /// The event's organization is this replica's: it is submitted here.
    #[serde(skip)]
    NotRelayed,
    /// It could not be done.
    Failed(SubmitError),
}

/// The answer of the replica that owns an organization to an event relayed to it, as the
/// producer must get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerAnswer {
    /// HTTP status.
    pub status: u16,
    /// Its `Retry-After`, if any.
    pub retry_after: Option<String>,
    /// Its body (JSON).
    pub body: Bytes,
}

/// A delivery as the REST facade shows it: the record and its event's payload.
pub type Listed = (DeliveryRecord, Option<Value>);

/// Most deliveries one recovery sends again.
pub const MAX_RECOVERED: usize = 10_000;

/// Whatever does work on request: the dispatcher, or the forwarder in front of it.
pub trait Work: Send + Sync + 'static {
    /// Does `request` (or has it done), and answers it; a failure is [`WorkReply::Failed`].
    fn perform(&self, request: WorkRequest) -> BoxFuture<'_, WorkReply>;
}

/// A cheap, cloneable handle to the [`Work`] of this process, with a typed call per request.
#[derive(Clone)]
pub struct WorkHandle(Arc<dyn Work>);

impl std::fmt::Debug for WorkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkHandle")
    }
}

/// A reply of the wrong kind (an owner that speaks another version, say).
fn unexpected(reply: WorkReply) -> SubmitError {
    SubmitError::Unavailable(format!("unexpected answer to work: {reply:?}"))
}

impl WorkHandle {
    /// A handle to `work`.
    pub fn new(work: impl Work) -> Self {
        Self(Arc::new(work))
    }

    /// See [`Work::perform`].
    pub async fn perform(&self, request: WorkRequest) -> WorkReply {
        self.0.perform(request).await
    }

    /// [`Self::perform`], with a [`WorkReply::Failed`] answer as the error.
    async fn ask(&self, request: WorkRequest) -> Result<WorkReply, SubmitError> {
        match self.perform(request).await {
            WorkReply::Failed(e) => Err(e),
            reply => Ok(reply),
        }
    }

    /// [`WorkRequest::Submit`]: returns the event id and the number of deliveries.
    pub async fn submit(
        &self,
        organization_id: &str,
        event_type: &str,
        data: Value,
    ) -> Result<(String, usize), SubmitError> {
        let request = WorkRequest::Submit {
            organization_id: organization_id.into(),
            event_type: event_type.into(),
            data,
        };
        match self.ask(request).await? {
            WorkReply::Submitted(id, n) => Ok((id, n)),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::Operational`]: returns once the event is durable (stored now or before).
    pub async fn operational(&self, event: OperationalEvent) -> Result<(), SubmitError> {
        match self.ask(WorkRequest::Operational { event }).await? {
            WorkReply::Submitted(..) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::Relay`]: the owner's answer, or `None` when the event is to be submitted
    /// here.
    pub async fn relay(
        &self,
        organization_id: &str,
        idempotency_key: Option<&str>,
        body: Bytes,
    ) -> Result<Option<OwnerAnswer>, SubmitError> {
        let request = WorkRequest::Relay {
            organization_id: organization_id.into(),
            idempotency_key: idempotency_key.map(str::to_string),
            body,
        };
        match self.ask(request).await? {
            WorkReply::Relayed(answer) => Ok(Some(answer)),
            WorkReply::NotRelayed => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::SendTest`]: the delivery and its payload.
    pub async fn send_test(&self, endpoint: &WebhookEndpoint) -> Result<Listed, SubmitError> {
        let request = WorkRequest::SendTest {
            endpoint: EndpointRef::of(endpoint),
        };
        match self.ask(request).await? {
            WorkReply::Listed(listed) => Ok(*listed),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::Retry`]: the delivery and its payload.
    pub async fn retry(&self, endpoint: &WebhookEndpoint, delivery_id: &str) -> Result<Listed, SubmitError> {
        let request = WorkRequest::Retry {
            endpoint: EndpointRef::of(endpoint),
            delivery_id: delivery_id.into(),
        };
        match self.ask(request).await? {
            WorkReply::Listed(listed) => Ok(*listed),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::Recover`]: how many deliveries were sent again.
    pub async fn recover(
        &self,
        endpoint: &WebhookEndpoint,
        since: jiff::Timestamp,
        until: jiff::Timestamp,
    ) -> Result<usize, SubmitError> {
        let request = WorkRequest::Recover {
            endpoint: EndpointRef::of(endpoint),
            since,
            until,
        };
        match self.ask(request).await? {
            WorkReply::Recovered(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::EraseEvent`]: how many deliveries carry the erased event.
    pub async fn erase_event(&self, organization_id: &str, event_id: &str) -> Result<usize, SubmitError> {
        let request = WorkRequest::EraseEvent {
            organization_id: organization_id.into(),
            event_id: event_id.into(),
        };
        match self.ask(request).await? {
            WorkReply::Erased(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::AttemptStats`]: the endpoint's attempts of the last day, by hour.
    pub async fn attempt_stats(&self, endpoint: &WebhookEndpoint) -> Result<AttemptStats, SubmitError> {
        let request = WorkRequest::AttemptStats {
            endpoint: EndpointRef::of(endpoint),
        };
        match self.ask(request).await? {
            WorkReply::AttemptStats(stats) => Ok(stats),
            other => Err(unexpected(other)),
        }
    }

    /// [`WorkRequest::Deliveries`]: newest first.
    pub async fn deliveries(&self, endpoint: &WebhookEndpoint, limit: usize) -> Result<Vec<Listed>, SubmitError> {
        let request = WorkRequest::Deliveries {
            endpoint: EndpointRef::of(endpoint),
            limit,
        };
        match self.ask(request).await? {
            WorkReply::Deliveries(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every request with a copy of one reply.
    struct Answers(fn() -> WorkReply);

    impl Work for Answers {
        fn perform(&self, _: WorkRequest) -> BoxFuture<'_, WorkReply> {
            Box::pin(async move { (self.0)() })
        }
    }

    #[tokio::test]
    async fn the_handle_unpacks_each_answer_and_refuses_the_wrong_kind() {
        let submitted = WorkHandle::new(Answers(|| WorkReply::Submitted("evt_1".into(), 2)));
        assert_eq!(
            submitted.submit("org", "a.b", Value::Null).await,
            Ok(("evt_1".to_string(), 2))
        );
        assert!(matches!(
            submitted.relay("org", None, Bytes::new()).await,
            Err(SubmitError::Unavailable(_))
        ));
        let here = WorkHandle::new(Answers(|| WorkReply::NotRelayed));
        assert_eq!(here.relay("org", Some("k"), Bytes::new()).await, Ok(None));
        let failed = WorkHandle::new(Answers(|| {
            WorkReply::Failed(SubmitError::Moving { retry_after_secs: 1 })
        }));
        assert_eq!(
            failed.submit("org", "a.b", Value::Null).await,
            Err(SubmitError::Moving { retry_after_secs: 1 })
        );
    }

    #[test]
    fn a_relayed_event_never_goes_as_work() {
        let relay = WorkRequest::Relay {
            organization_id: "org".into(),
            idempotency_key: None,
            body: Bytes::from_static(b"{}"),
        };
        assert!(serde_json::to_vec(&relay).is_err());
        assert!(serde_json::from_str::<WorkRequest>(r#"{"op":"relay","organization_id":"org"}"#).is_err());
    }

    #[test]
    fn each_failure_has_one_http_answer() {
        let answer = |e: SubmitError| {
            let e = ApiError::from(e);
            (e.status.as_u16(), e.message, e.retry_after)
        };
        assert_eq!(answer(SubmitError::NotFound("no x".into())), (404, "no x".into(), None));
        assert_eq!(
            answer(SubmitError::Conflict("pending".into())),
            (409, "pending".into(), None)
        );
        assert_eq!(
            answer(SubmitError::Unavailable("full".into())),
            (503, "full".into(), Some(DEFAULT_RETRY_AFTER_SECS))
        );
        let (status, message, retry_after) = answer(SubmitError::Throttled { retry_after_secs: 3 });
        assert_eq!((status, retry_after), (503, Some(3)));
        assert!(message.contains("budget"), "{message}");
        assert_eq!(answer(SubmitError::Moving { retry_after_secs: 1 }).2, Some(1));
    }

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
