//! The dispatcher: fans events out to endpoints, keeps each endpoint's deliveries durable in its
//! ConfigMap log, sends signed attempts, retries, and reports health.
//!
//! One worker task per endpoint is the single writer of that endpoint's log and owns its
//! schedule (see [`worker`]). Ingest hands records to workers and answers only once they are
//! durable. On start, pending deliveries are read back from the logs and resumed.

mod status;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::controller::desired::{ROTATION_ANNOTATION, signing_secret_selector, stored_key_ring};
use crate::delivery::event_types::matches;
use crate::delivery::schedule::RetrySchedule;
use crate::delivery::sender::{Sender, SenderConfig, envelope};
use crate::delivery_log::{DeliveryRecord, DeliveryState, EndpointLog, LogConfig, new_delivery_id};
use crate::endpoints::EndpointCache;
use crate::resources::{Scope, WebhookEndpoint, signing_secret_name};
use crate::signing::{KeyRing, StoredKeyRing};
use crate::telemetry::{Metrics, ReadyHandle};
pub use status::{CONDITION_HEALTHY, DispatchSummary};
use worker::{Msg, Worker};

/// Field manager of the dispatcher's writes.
pub const DISPATCHER_FIELD_MANAGER: &str = "capy-webhooks-dispatcher";
/// Event type of test deliveries.
pub const TEST_EVENT_TYPE: &str = "webhook.test";

/// Settings of the dispatcher.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// Namespaces served.
    pub scope: Scope,
    /// Delays before each attempt.
    pub schedule: RetrySchedule,
    /// Delivery log bounds.
    pub log: LogConfig,
    /// HTTP sending.
    pub sender: SenderConfig,
    /// Attempts in flight per endpoint at most.
    pub per_endpoint_concurrency: usize,
    /// Status summaries are written at most this often per endpoint.
    pub summary_interval: Duration,
    /// An endpoint whose deliveries all failed for this long is disabled.
    pub auto_disable_after: Duration,
    /// How long ingest waits for a durable write before answering 503.
    pub persist_timeout: Duration,
    /// On shutdown, how long in-flight attempts may take to finish.
    pub shutdown_grace: Duration,
    /// Where deliveries, attempts, log writes and API-server writes are counted.
    pub metrics: Metrics,
    /// Flipped once the caches are synced and every log is recovered.
    pub ready: ReadyHandle,
}

/// Why an event or a recovery request could not be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The log could not be written (API server unreachable, or the log is full).
    #[error("deliveries could not be persisted: {0}")]
    Unavailable(String),
    /// No such endpoint or delivery.
    #[error("{0}")]
    NotFound(String),
    /// The delivery is still pending.
    #[error("{0}")]
    Conflict(String),
}

/// A cache of every endpoint's key ring, from a watch on the signing Secrets.
#[derive(Clone)]
struct KeyRings {
    store: Store<Secret>,
}

impl KeyRings {
    fn start(client: Client, scope: &Scope) -> Self {
        let (store, writer) = reflector::store();
        let config = watcher::Config::default().labels(&signing_secret_selector());
        let events = watcher(scope.api::<Secret>(client), config)
            .default_backoff()
            // Thousands of these are cached: keep only what the key ring is read from.
            .modify(|secret: &mut Secret| {
                let meta = std::mem::take(&mut secret.metadata);
                let rotation = meta
                    .annotations
                    .and_then(|mut a| a.remove_entry(ROTATION_ANNOTATION))
                    .map(|entry| [entry].into());
                secret.metadata = ObjectMeta {
                    name: meta.name,
                    namespace: meta.namespace,
                    annotations: rotation,
                    ..Default::default()
                };
                secret.string_data = None;
                secret.type_ = None;
            });
        let stream = reflector::reflector(writer, events);
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    warn!(error = %e, "signing secret watch failed; retrying");
                }
            }
        });
        Self { store }
    }

    fn ring(&self, namespace: &str, endpoint: &str) -> Option<KeyRing> {
        let secret = self
            .store
            .get(&ObjectRef::new(&signing_secret_name(endpoint)).within(namespace));
        match stored_key_ring(secret.as_deref()) {
            StoredKeyRing::Valid(ring) => Some(ring),
            _ => None,
        }
    }
}

/// What every worker shares.
pub(crate) struct Shared {
    client: Client,
    config: DispatcherConfig,
    sender: Sender,
    endpoints: EndpointCache,
    keys: KeyRings,
    recorder: Recorder,
    stopping: watch::Receiver<bool>,
}

/// Handle to the running dispatcher: submit events, retry deliveries, send test events.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
    workers: Arc<Mutex<HashMap<ObjectRef<WebhookEndpoint>, mpsc::Sender<Msg>>>>,
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

impl Dispatcher {
    /// Starts the dispatcher: caches, recovery of every pending delivery from the logs, and the
    /// wake-ups on endpoint changes. `stopping` turns true on shutdown.
    pub async fn start(
        client: Client,
        endpoints: EndpointCache,
        config: DispatcherConfig,
        stopping: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let sender = Sender::new(config.sender.clone())?;
        let keys = KeyRings::start(client.clone(), &config.scope);
        keys.store
            .wait_until_ready()
            .await
            .map_err(|e| anyhow::anyhow!("signing secret cache never synced: {e}"))?;
        endpoints.wait_ready().await?;
        let reporter = Reporter {
            controller: "capy-webhooks-dispatcher".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let shared = Arc::new(Shared {
            recorder: Recorder::new(client.clone(), reporter),
            client: client.clone(),
            config,
            sender,
            endpoints,
            keys,
            stopping,
        });
        let dispatcher = Dispatcher {
            shared,
            workers: Arc::default(),
            tasks: Arc::new(Mutex::new(tokio::task::JoinSet::new())),
        };
        dispatcher.recover().await?;
        dispatcher.spawn_wakeups();
        dispatcher.shared.config.ready.set_ready();
        Ok(dispatcher)
    }

    /// Reads every endpoint's log back and starts a worker for each, so pending deliveries resume.
    async fn recover(&self) -> anyhow::Result<()> {
        let configmaps = crate::delivery_log::load_all(&self.shared.client, &self.shared.config.scope)
            .await
            .map_err(|e| anyhow::anyhow!("reading the delivery logs: {e}"))?;
        let mut resumed = 0;
        for ((namespace, name), cms) in crate::delivery_log::group_by_endpoint(configmaps) {
            let Some(ep) = self.shared.endpoints.get(&namespace, &name) else {
                continue;
            };
            let log = EndpointLog::from_configmaps(
                &namespace,
                &name,
                &ep.uid().unwrap_or_default(),
                &ep.spec.organization_id,
                self.shared.config.log.clone(),
                cms,
            );
            resumed += log.pending_count();
            self.spawn_worker(&ep, log);
        }
        info!(pending = resumed, "delivery logs recovered");
        Ok(())
    }

    fn spawn_wakeups(&self) {
        let mut changes = self.shared.endpoints.subscribe();
        let workers = self.workers.clone();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(key) => {
                        let tx = workers.lock().expect("workers lock").get(&key).cloned();
                        if let Some(tx) = tx {
                            let _ = tx.try_send(Msg::Wake);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let all: Vec<_> = workers.lock().expect("workers lock").values().cloned().collect();
                        for tx in all {
                            let _ = tx.try_send(Msg::Wake);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    fn spawn_worker(&self, endpoint: &WebhookEndpoint, log: EndpointLog) -> mpsc::Sender<Msg> {
        let key = ObjectRef::from(endpoint);
        let (tx, rx) = mpsc::channel(1024);
        let worker = Worker::new(self.shared.clone(), endpoint, log, tx.clone(), rx);
        self.tasks.lock().expect("tasks lock").spawn(worker.run());
        self.workers.lock().expect("workers lock").insert(key, tx.clone());
        tx
    }

    fn worker_for(&self, endpoint: &WebhookEndpoint) -> mpsc::Sender<Msg> {
        let key = ObjectRef::from(endpoint);
        if let Some(tx) = self
            .workers
            .lock()
            .expect("workers lock")
            .get(&key)
            .filter(|tx| !tx.is_closed())
        {
            return tx.clone();
        }
        let log = EndpointLog::new(
            &endpoint.namespace().unwrap_or_default(),
            &endpoint.name_any(),
            &endpoint.uid().unwrap_or_default(),
            &endpoint.spec.organization_id,
            self.shared.config.log.clone(),
        );
        self.spawn_worker(endpoint, log)
    }

    fn new_record(
        &self,
        endpoint: &WebhookEndpoint,
        event_id: &str,
        event_type: &str,
        payload: Value,
        now: Timestamp,
    ) -> DeliveryRecord {
        DeliveryRecord {
            id: new_delivery_id(now),
            endpoint_id: endpoint.name_any(),
            organization_id: endpoint.spec.organization_id.clone(),
            event_id: event_id.to_string(),
            event_type: event_type.to_string(),
            payload,
            state: DeliveryState::Pending,
            attempts: 0,
            max_attempts: endpoint
                .spec
                .max_attempts
                .unwrap_or(self.shared.config.schedule.max_attempts()),
            created_at: now,
            updated_at: now,
            next_attempt_at: Some(now),
            delivered_at: None,
            response_status: None,
            last_error: None,
        }
    }

    async fn enqueue(&self, endpoint: &WebhookEndpoint, records: Vec<DeliveryRecord>) -> Result<(), SubmitError> {
        let (ack, done) = oneshot::channel();
        let tx = self.worker_for(endpoint);
        tx.send(Msg::Enqueue { records, ack })
            .await
            .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))?;
        self.await_durable(done).await
    }

    /// Waits (bounded by the persist timeout) for a worker's answer, which comes once the log
    /// write carrying the request is durable.
    async fn await_durable<T>(&self, done: oneshot::Receiver<Result<T, SubmitError>>) -> Result<T, SubmitError> {
        match tokio::time::timeout(self.shared.config.persist_timeout, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(SubmitError::Unavailable("the dispatcher is shutting down".into())),
            Err(_) => Err(SubmitError::Unavailable("timed out writing the delivery log".into())),
        }
    }

    /// Accepts one event: a pending delivery for every active endpoint of the organization whose
    /// event types match, each durable in its log before this returns. Returns the event id and
    /// the number of deliveries.
    pub async fn submit(
        &self,
        organization_id: &str,
        event_type: &str,
        data: Value,
    ) -> Result<(String, usize), SubmitError> {
        if *self.shared.stopping.borrow() {
            return Err(SubmitError::Unavailable("the dispatcher is shutting down".into()));
        }
        let now = Timestamp::now();
        let event_id = format!("evt_{}", crate::ids::time_sortable_id(now));
        let payload = envelope(event_type, now, &data);
        let targets: Vec<_> = self
            .shared
            .endpoints
            .list(organization_id)
            .into_iter()
            .filter(|ep| ep.spec.active && ep.metadata.deletion_timestamp.is_none())
            .filter(|ep| matches(&ep.spec.event_types, event_type))
            .collect();
        let writes = targets.iter().map(|ep| {
            let record = self.new_record(ep, &event_id, event_type, payload.clone(), now);
            self.enqueue(ep, vec![record])
        });
        let results = futures::future::join_all(writes).await;
        if let Some(err) = results.into_iter().find_map(Result::err) {
            return Err(err);
        }
        Ok((event_id, targets.len()))
    }

    /// Sends a `webhook.test` event to one endpoint now (whatever its event types).
    pub async fn send_test(&self, endpoint: &WebhookEndpoint) -> Result<DeliveryRecord, SubmitError> {
        let now = Timestamp::now();
        let event_id = format!("evt_{}", crate::ids::time_sortable_id(now));
        let data =
            serde_json::json!({"endpoint_id": endpoint.name_any(), "message": "This is a test event from CapyDB."});
        let record = self.new_record(
            endpoint,
            &event_id,
            TEST_EVENT_TYPE,
            envelope(TEST_EVENT_TYPE, now, &data),
            now,
        );
        self.enqueue(endpoint, vec![record.clone()]).await?;
        Ok(record)
    }

    /// Sends a finished delivery again, now, once.
    pub async fn retry(&self, endpoint: &WebhookEndpoint, delivery_id: &str) -> Result<DeliveryRecord, SubmitError> {
        let (reply, done) = oneshot::channel();
        self.worker_for(endpoint)
            .send(Msg::Retry {
                id: delivery_id.to_string(),
                reply,
            })
            .await
            .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))?;
        self.await_durable(done).await
    }

    /// Waits until every worker has finished (after `stopping` turned true): in-flight attempts
    /// end within the grace period and every change is written to the logs.
    pub async fn wait_stopped(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        while tasks.join_next().await.is_some() {}
        info!("dispatcher stopped");
    }
}
