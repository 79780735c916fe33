//! The dispatcher: fans events out to endpoints, keeps their deliveries durable in each
//! organization's delivery log ([`crate::delivery_log`], ConfigMaps per organization and
//! namespace), sends signed attempts, retries, and reports health.
//!
//! One worker task per organization (and namespace) is the single writer of that organization's
//! log and owns the schedules of its endpoints (see [`worker`]): an event fans out in one place
//! and its payload is stored once. Work arrives through [`crate::work::Work::perform`] and is
//! answered only once durable. Organizations are partitioned into shards ([`crate::shards`]): the
//! dispatcher works only for the shards this replica holds, reads their logs back when it takes
//! them (pending deliveries resume), drains them when it hands them over, and stops writing at
//! once when a shard's fence closes.

mod status;
mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
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

use crate::client_certificate::{ClientIdentity, Problem, TLS_SECRET_TYPE, identity_from_secret};
use crate::delivery::attempt_stats::{AttemptHistory, AttemptStats};
use crate::delivery::event_types::matches;
use crate::delivery::filter::{EventInput, FilterCache};
use crate::delivery::schedule::RetrySchedule;
use crate::delivery::sender::{Sender, SenderConfig, envelope};
use crate::delivery_log::{DeliveryLog, DeliveryRecord, LogConfig, LogKey, WriteBudget, new_delivery_id, new_event_id};
use crate::endpoints::EndpointCache;
use crate::operational::{
    Emitter, OPERATIONAL_ENDPOINT, OPERATIONAL_ORGANIZATION, OperationalEvent, OperationalTarget,
};
use crate::resources::{Scope, WebhookEndpoint, signing_secret_name};
use crate::shards::{Fence, Placement, SHARD_COUNT, ShardEvent, ShardFeed, shard_of};
use crate::signing::{KeyRing, StoredKeyRing};
use crate::signing_secret::{ROTATION_ANNOTATION, signing_secret_selector, stored_key_ring};
use crate::telemetry::{EventNote, Metrics, ReadyHandle, publish_event};
pub use crate::work::{Listed, SubmitError};
use crate::work::{Work, WorkReply, WorkRequest};
pub use status::{CONDITION_HEALTHY, DispatchSummary};
use worker::{Msg, Worker};

/// How long reading back the logs of newly held shards may take before it is tried again.
const LOG_LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// Field manager of the dispatcher's own writes to endpoints: status summaries, and `active` when
/// it disables one (the delivery log's writes are [`crate::delivery_log::FIELD_MANAGER`]'s).
pub const FIELD_MANAGER: &str = "capy-webhooks-dispatcher";

/// Event type of test deliveries.
pub const TEST_EVENT_TYPE: &str = "webhook.test";

/// Settings of the dispatcher.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// Namespaces served.
    pub scope: Scope,
    /// Namespace of the operator's own Secrets (the delivery-log MAC key).
    pub home_namespace: String,
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
    /// Payloads of finished deliveries created longer ago than this are erased (`None`: kept
    /// while their deliveries are).
    pub payload_retention: Option<Duration>,
    /// Bytes per second the dispatcher may write through the API server; new work is refused
    /// while it is spent.
    pub budget: WriteBudget,
    /// How long ingest waits for a durable write before answering 503.
    pub persist_timeout: Duration,
    /// On shutdown, how long in-flight attempts may take to finish.
    pub shutdown_grace: Duration,
    /// Where deliveries, attempts, log writes and API-server writes are counted.
    pub metrics: Metrics,
    /// Flipped once the caches are synced and every log is recovered.
    pub ready: ReadyHandle,
    /// Where operational events go (`--operational-webhook-url`), if anywhere.
    pub operational: Option<OperationalTarget>,
    /// How this replica hands operational events (`delivery.exhausted`) to the owner of the
    /// operational log; connected to the process's work handle once it exists.
    pub emitter: Emitter,
}

/// Runs a reflector's watch in the background for as long as the process lives; its errors are
/// logged (the watcher's backoff retries them).
fn drive<S>(stream: S, what: &'static str)
where
    S: futures::Stream<Item = Result<watcher::Event<Secret>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                warn!(error = %e, "{what} watch failed; retrying");
            }
        }
    });
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
        drive(reflector::reflector(writer, events), "signing secret");
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

/// A cache of the `kubernetes.io/tls` Secrets endpoints may present as client certificates, from
/// a watch selecting that type, and the identities read from them (each read once per
/// `resourceVersion`). A Secret of another type is not seen here: the controller names that
/// problem in the endpoint's `ClientCertificateReady` condition.
#[derive(Clone)]
struct ClientIdentities {
    store: Store<Secret>,
    read: Arc<Mutex<HashMap<SecretKey, ReadIdentity>>>,
}

/// A Secret's namespace and name.
type SecretKey = (String, String);

/// The identity read from a Secret, with the `resourceVersion` it was read at.
type ReadIdentity = (Option<String>, Result<ClientIdentity, Problem>);

impl ClientIdentities {
    fn start(client: Client, scope: &Scope) -> Self {
        let (store, writer) = reflector::store();
        let config = watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}"));
        let events = watcher(scope.api::<Secret>(client), config)
            .default_backoff()
            .modify(|secret: &mut Secret| {
                let meta = std::mem::take(&mut secret.metadata);
                secret.metadata = ObjectMeta {
                    name: meta.name,
                    namespace: meta.namespace,
                    resource_version: meta.resource_version,
                    ..Default::default()
                };
                secret.string_data = None;
            });
        drive(reflector::reflector(writer, events), "client certificate");
        Self {
            store,
            read: Arc::default(),
        }
    }

    /// The identity in Secret `name` of `namespace`, or why there is none.
    fn get(&self, namespace: &str, name: &str) -> Result<ClientIdentity, Problem> {
        let secret = self.store.get(&ObjectRef::new(name).within(namespace));
        let version = secret.as_ref().and_then(|s| s.metadata.resource_version.clone());
        let key = (namespace.to_string(), name.to_string());
        let mut read = self.read.lock().expect("client identity lock");
        if let Some((seen, identity)) = read.get(&key)
            && *seen == version
        {
            return identity.clone();
        }
        let identity = identity_from_secret(name, secret.as_deref());
        if read.len() >= 4096 {
            read.clear();
        }
        read.insert(key, (version, identity.clone()));
        identity
    }
}

/// What every worker shares.
pub(crate) struct Shared {
    client: Client,
    config: DispatcherConfig,
    sender: Sender,
    endpoints: EndpointCache,
    keys: KeyRings,
    identities: ClientIdentities,
    /// The key of delivery-log segment MACs.
    log_key: LogKey,
    recorder: Recorder,
    stopping: watch::Receiver<bool>,
    /// Shards whose logs must be read back again (a second writer was detected).
    reload: mpsc::UnboundedSender<u32>,
    /// The highest segment number each log's worker in this process has named: a worker started
    /// later for the same log (after a shard was lost and taken again, or read back) names its
    /// segments above it. An aborted worker's last create may still land after the new worker's
    /// read-back; under the same name it would pass for a second writer and have the whole shard
    /// read back (events answered 503 although durable, deliveries sent twice).
    seq_marks: Mutex<HashMap<WorkerKey, Arc<AtomicU64>>>,
    /// Endpoint filters, compiled once per text (not per event).
    filters: FilterCache,
    /// The platform's endpoint and its key ring, when operational webhooks are on.
    operational: Option<(Arc<WebhookEndpoint>, KeyRing)>,
}

impl Shared {
    /// The platform's endpoint, if `namespace` and `name` are its.
    fn operational_endpoint(&self, namespace: &str, name: &str) -> Option<Arc<WebhookEndpoint>> {
        self.operational
            .as_ref()
            .filter(|(ep, _)| name == OPERATIONAL_ENDPOINT && ep.metadata.namespace.as_deref() == Some(namespace))
            .map(|(ep, _)| ep.clone())
    }

    /// Hands an operational event to the owner of the operational log, trying again until it
    /// is stored or the dispatcher stops.
    async fn emit(self: Arc<Self>, event: OperationalEvent) {
        let stopping = self.stopping.clone();
        self.config
            .emitter
            .store_retrying(event, move || *stopping.borrow())
            .await;
    }

    /// A log about to get a worker: its names start above any this process used for it. Returns
    /// the mark the worker raises as it names segments (no lock nor key on its write path).
    fn resume_names(&self, key: &WorkerKey, log: &mut DeliveryLog) -> Arc<AtomicU64> {
        let mark = self
            .seq_marks
            .lock()
            .expect("seq marks lock")
            .entry(key.clone())
            .or_default()
            .clone();
        log.start_names_after(mark.load(Ordering::Relaxed));
        mark
    }
}

/// The work of one shard this replica holds: its workers, stopped together.
struct ShardRun {
    /// Turns true to drain the shard's workers (hand-over or shutdown).
    stop: watch::Sender<bool>,
    /// Every worker of the shard, to wait until all have drained.
    tracker: tokio_util::task::TaskTracker,
    /// To stop the workers at once when the shard is lost.
    aborts: Vec<tokio::task::AbortHandle>,
    /// Closed when the shard's Lease can no longer be trusted.
    fence: Fence,
    /// When the shard's logs were read back here: attempts are counted from then.
    taken_at: Timestamp,
}

/// A worker's key: the namespace and organization of its log.
pub(crate) type WorkerKey = (String, String);

/// Handle to the running dispatcher. Work is asked of it as a [`WorkRequest`] ([`Work::perform`],
/// through a [`crate::work::WorkHandle`]).
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
    workers: Arc<Mutex<HashMap<WorkerKey, mpsc::Sender<Msg>>>>,
    /// Which worker holds deliveries of each endpoint, to wake it when the endpoint changes
    /// (also once it is deleted, when the cache no longer knows its organization).
    routes: Arc<Mutex<HashMap<ObjectRef<WebhookEndpoint>, WorkerKey>>>,
    /// The shards held here and running.
    shards: Arc<Mutex<HashMap<u32, ShardRun>>>,
    /// Which shards are held here and ready (shared with the coordinator and the router).
    placement: Placement,
    /// Ends once every shard event was handled after shutdown.
    events_done: Arc<tokio::sync::Notify>,
}

impl Dispatcher {
    /// Starts the dispatcher: caches, and the wake-ups on endpoint changes. Shards come from
    /// `shards`: for each one acquired, its logs are read back and its pending deliveries resume;
    /// those already acquired when this is called (every shard, for [`ShardFeed::all_here`]) are
    /// read back before it returns. `stopping` turns true on shutdown.
    pub async fn start(
        client: Client,
        endpoints: EndpointCache,
        config: DispatcherConfig,
        shards: ShardFeed,
        stopping: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let sender = Sender::new(config.sender.clone())?;
        let operational = config.operational.as_ref().map(|target| {
            let namespace = match &config.scope {
                Scope::Namespace(ns) => ns.clone(),
                Scope::AllNamespaces => config.home_namespace.clone(),
            };
            (Arc::new(target.endpoint(&namespace)), target.key_ring())
        });
        let keys = KeyRings::start(client.clone(), &config.scope);
        keys.store
            .wait_until_ready()
            .await
            .map_err(|e| anyhow::anyhow!("signing secret cache never synced: {e}"))?;
        let identities = ClientIdentities::start(client.clone(), &config.scope);
        endpoints.wait_ready().await?;
        let log_key = crate::delivery_log::load_or_create_key(&client, &config.home_namespace)
            .await
            .map_err(|e| anyhow::anyhow!("loading the delivery-log MAC key: {e}"))?;
        config.metrics.log_write_budget(config.budget.rate());
        let reporter = Reporter {
            controller: "capy-webhooks-dispatcher".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let (reload, reloads) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            recorder: Recorder::new(client.clone(), reporter),
            client: client.clone(),
            config,
            sender,
            endpoints,
            keys,
            identities,
            log_key,
            stopping,
            reload,
            seq_marks: Mutex::default(),
            filters: FilterCache::default(),
            operational,
        });
        let ShardFeed { mut events, placement } = shards;
        let dispatcher = Dispatcher {
            shared,
            workers: Arc::default(),
            routes: Arc::default(),
            shards: Arc::default(),
            placement,
            events_done: Arc::default(),
        };
        // What is held already is read back before this returns.
        let mut initial = Vec::new();
        let mut later = Vec::new();
        while let Ok(event) = events.try_recv() {
            match event {
                ShardEvent::Acquired(acquired) if later.is_empty() => initial.extend(acquired),
                // Whatever followed is acted on in order once the first shards are read back.
                event => later.push(event),
            }
        }
        if !initial.is_empty() {
            dispatcher.take_over(initial).await?;
        }
        for event in later {
            dispatcher.on_shard_event(event).await;
        }
        dispatcher.spawn_wakeups();
        tokio::spawn(dispatcher.clone().follow_shards(events, reloads));
        dispatcher.shared.config.ready.set_ready();
        Ok(dispatcher)
    }

    /// Acts on what the coordinator says about the shards held, and on reloads, until shutdown.
    async fn follow_shards(
        self,
        mut events: mpsc::UnboundedReceiver<ShardEvent>,
        mut reloads: mpsc::UnboundedReceiver<u32>,
    ) {
        let mut stopping = self.shared.stopping.clone();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.on_shard_event(event).await,
                    None => {
                        // Fixed ownership: nothing changes until shutdown.
                        let _ = self.shared.stopping.clone().wait_for(|s| *s).await;
                        break;
                    }
                },
                Some(shard) = reloads.recv() => {
                    let fence = self.abort_shard(shard);
                    if let Some(fence) = fence.filter(Fence::is_open) {
                        warn!(shard, "reading the shard's logs again after a second writer was detected");
                        self.placement.set(shard, crate::shards::Location::Moving);
                        if let Err(e) = self.take_over(vec![(shard, fence)]).await {
                            warn!(shard, error = %e, "reading a shard's logs again failed");
                        }
                    }
                }
                _ = async { stopping.wait_for(|s| *s).await.map(|_| ()) } => break,
            }
        }
        // Shutdown: every shard drains (the coordinator, if any, waits for it to release them).
        let held: Vec<u32> = self.shards.lock().expect("shards lock").keys().copied().collect();
        let mut drained: HashMap<u32, watch::Receiver<bool>> = HashMap::new();
        let mut drains = Vec::new();
        for shard in held {
            let (tx, rx) = watch::channel(false);
            drained.insert(shard, rx);
            let this = &self;
            drains.push(async move {
                this.drain_shard(shard).await;
                let _ = tx.send(true);
            });
        }
        // Each shard's release is answered as soon as that shard drained, so the coordinator
        // frees it without waiting for the slowest one.
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let ShardEvent::Release { shard, done } = event {
                    let rx = drained.get(&shard).cloned();
                    tokio::spawn(async move {
                        if let Some(mut rx) = rx {
                            let _ = rx.wait_for(|d| *d).await;
                        }
                        let _ = done.send(());
                    });
                }
            }
        });
        futures::future::join_all(drains).await;
        self.events_done.notify_one();
    }

    /// Acts on one thing the coordinator says about the shards held.
    async fn on_shard_event(&self, event: ShardEvent) {
        match event {
            ShardEvent::Acquired(acquired) => {
                if self.is_stopping() {
                    return;
                }
                if let Err(e) = self.take_over(acquired).await {
                    warn!(error = %e, "reading the logs of new shards failed");
                }
            }
            ShardEvent::Release { shard, done } => {
                let this = self.clone();
                tokio::spawn(async move {
                    this.drain_shard(shard).await;
                    let _ = done.send(());
                });
            }
            ShardEvent::Lost(shard) => {
                self.abort_shard(shard);
            }
        }
    }

    /// Starts the work of newly held shards: their logs are read back first (retrying while
    /// their fences are open), then their pending deliveries resume and they take work.
    async fn take_over(&self, acquired: Vec<(u32, Fence)>) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let mut attempt = 0;
        let shards: BTreeSet<u32> = acquired.iter().map(|(shard, _)| *shard).collect();
        let (client, scope) = (&self.shared.client, &self.shared.config.scope);
        let configmaps = loop {
            // Every shard at once (one process, or the first replica up): one LIST of everything.
            // A few shards: only their organizations' logs are read.
            let load = async {
                if shards.len() == SHARD_COUNT as usize {
                    crate::delivery_log::load_all(client, scope).await
                } else {
                    crate::delivery_log::load_organizations_where(client, scope, |org| shards.contains(&shard_of(org)))
                        .await
                }
            };
            // A LIST that hangs must not hold up the hand-overs and losses queued behind it.
            let listed = tokio::time::timeout(LOG_LIST_TIMEOUT, load)
                .await
                .unwrap_or_else(|_| Err(kube::Error::Service("listing the delivery logs timed out".into())));
            match listed {
                Ok(cms) => break cms,
                Err(e) if acquired.iter().any(|(_, f)| f.is_open()) && !self.is_stopping() => {
                    attempt += 1;
                    warn!(error = %e, "reading the delivery logs failed; retrying");
                    tokio::time::sleep(crate::backoff::doubling(
                        attempt,
                        Duration::from_millis(250),
                        Duration::from_secs(5),
                    ))
                    .await;
                }
                Err(e) => return Err(anyhow::anyhow!("reading the delivery logs: {e}")),
            }
        };
        let wanted: BTreeMap<u32, Fence> = acquired.into_iter().collect();
        let mut logs = Vec::new();
        let mut resumed = 0;
        for ((namespace, organization), cms) in crate::delivery_log::group_by_organization(configmaps) {
            if !wanted.contains_key(&shard_of(&organization)) {
                continue;
            }
            // Only segments this operator wrote count, for their entries and for the names the
            // log goes on with; anything else is reported and ignored. Should a foreign object
            // hold a name the log reaches, that write moves on to the next name.
            let (trusted, refused): (Vec<_>, Vec<_>) = cms.into_iter().partition(|cm| self.trusted(&namespace, cm));
            let mut log =
                DeliveryLog::from_configmaps(&namespace, &organization, self.shared.config.log.clone(), trusted);
            for cm in &refused {
                log.avoid_name(cm.metadata.name.as_deref().unwrap_or_default());
            }
            resumed += log.pending_count();
            logs.push(((namespace, organization), log));
        }
        // The shards' runs and every worker read back start in one step under the shards lock:
        // an event that passed the ownership check before the shard was read again must not
        // find the run without its log's worker and start one over an empty log.
        {
            let mut shards = self.shards.lock().expect("shards lock");
            for (&shard, fence) in &wanted {
                let (stop, _) = watch::channel(self.is_stopping());
                let run = ShardRun {
                    stop,
                    tracker: tokio_util::task::TaskTracker::new(),
                    aborts: Vec::new(),
                    fence: fence.clone(),
                    taken_at: Timestamp::now(),
                };
                if let Some(old) = shards.insert(shard, run) {
                    self.abort_run(shard, old);
                }
            }
            for (key, log) in logs {
                let endpoints: Vec<String> = log.endpoints().map(str::to_string).collect();
                self.spawn_worker_in(&mut shards, key.clone(), log);
                let mut routes = self.routes.lock().expect("routes lock");
                for endpoint in endpoints {
                    routes.insert(ObjectRef::new(&endpoint).within(&key.0), key.clone());
                }
            }
        }
        for &shard in wanted.keys() {
            self.placement.set_ready(shard);
        }
        info!(shards = ?wanted.keys().collect::<Vec<_>>(), pending = resumed, took_ms = started.elapsed().as_millis() as u64,
            "delivery logs of the shards read back; their deliveries resume");
        Ok(())
    }

    /// Stops a shard's workers gracefully: in-flight attempts finish (within the shutdown grace),
    /// every change is written; returns once all have stopped.
    async fn drain_shard(&self, shard: u32) {
        let Some(run) = self.shards.lock().expect("shards lock").remove(&shard) else {
            return;
        };
        let _ = run.stop.send(true);
        run.tracker.close();
        run.tracker.wait().await;
        // Only the workers that stopped: the shard may have been taken again meanwhile (lost,
        // then acquired afresh), and its new workers must stay reachable, or a second worker
        // would start on the same log.
        self.workers
            .lock()
            .expect("workers lock")
            .retain(|(_, org), tx| shard_of(org) != shard || !tx.is_closed());
        info!(shard, "shard drained");
    }

    /// Stops a shard's workers at once, writing nothing more; returns its fence.
    fn abort_shard(&self, shard: u32) -> Option<Fence> {
        let run = self.shards.lock().expect("shards lock").remove(&shard)?;
        Some(self.abort_run(shard, run))
    }

    /// Stops a shard run's workers at once (taken out of the shards already); returns its fence.
    fn abort_run(&self, shard: u32, run: ShardRun) -> Fence {
        for abort in &run.aborts {
            abort.abort();
        }
        // Aborted tasks stop at their next await, so their senders may look open a little longer:
        // every worker of the shard is forgotten now. Routes stay: an endpoint's organization
        // never changes, and a route to no worker leads nowhere.
        self.workers
            .lock()
            .expect("workers lock")
            .retain(|(_, org), _| shard_of(org) != shard);
        run.fence
    }

    fn is_stopping(&self) -> bool {
        *self.shared.stopping.borrow()
    }

    /// Refuses work for an organization whose shard is not held here and ready.
    fn owned(&self, organization_id: &str) -> Result<(), SubmitError> {
        match self.placement.locate_organization(organization_id) {
            crate::shards::Location::Here => Ok(()),
            _ => Err(SubmitError::Moving { retry_after_secs: 1 }),
        }
    }

    /// Whether a segment may be read ([`crate::delivery_log::judge_segment`]). A refused one is
    /// counted, logged, and reported with a Warning Event on the endpoints its records name.
    fn trusted(&self, namespace: &str, cm: &k8s_openapi::api::core::v1::ConfigMap) -> bool {
        let endpoints = &self.shared.endpoints;
        let uid_of = |name: &str| endpoints.get(namespace, name).and_then(|e| e.uid());
        let Err(rejection) = crate::delivery_log::judge_segment(cm, &self.shared.log_key, uid_of) else {
            return true;
        };
        let name = cm.metadata.name.clone().unwrap_or_default();
        warn!(%namespace, configmap = %name, reason = rejection.describe(), "delivery-log segment ignored");
        self.shared.config.metrics.log_segment_rejected();
        let named = crate::delivery_log::endpoints_named_in(cm);
        let shared = self.shared.clone();
        let namespace = namespace.to_string();
        tokio::spawn(async move {
            for endpoint in named.iter().take(5).filter_map(|n| shared.endpoints.get(&namespace, n)) {
                let event = EventNote {
                    warning: true,
                    reason: "LogSegmentRejected",
                    action: "RecoverLog",
                    note: format!(
                        "ConfigMap {name} looks like a delivery-log segment of this endpoint but was ignored: {}",
                        rejection.describe()
                    ),
                };
                publish_event(
                    &shared.recorder,
                    &shared.config.metrics,
                    &kube::Resource::object_ref(endpoint.as_ref(), &()),
                    &event,
                )
                .await;
            }
        });
        false
    }

    fn spawn_wakeups(&self) {
        let mut changes = self.shared.endpoints.subscribe();
        let (workers, routes) = (self.workers.clone(), self.routes.clone());
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(key) => {
                        let route = routes.lock().expect("routes lock").get(&key).cloned();
                        let tx = route.and_then(|r| workers.lock().expect("workers lock").get(&r).cloned());
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

    /// Starts the worker of a log in its shard, with the shards lock held (looking for a worker
    /// and starting one is one step); `None` when the shard is not held here.
    fn spawn_worker_in(
        &self,
        shards: &mut HashMap<u32, ShardRun>,
        key: WorkerKey,
        log: DeliveryLog,
    ) -> Option<mpsc::Sender<Msg>> {
        let shard = shard_of(&key.1);
        let run = shards.get_mut(&shard)?;
        let mut log = log;
        let names_mark = self.shared.resume_names(&key, &mut log);
        let (tx, rx) = mpsc::channel(1024);
        let worker = Worker::new(
            self.shared.clone(),
            log,
            names_mark,
            tx.clone(),
            rx,
            run.stop.subscribe(),
            run.fence.clone(),
        );
        let handle = run.tracker.spawn(worker.run());
        run.aborts.push(handle.abort_handle());
        self.workers.lock().expect("workers lock").insert(key, tx.clone());
        Some(tx)
    }

    /// The worker of an endpoint's organization, started (with an empty log) if its
    /// organization has none yet; refused while the organization's shard is not held here.
    fn worker_for(&self, endpoint: &WebhookEndpoint) -> Result<mpsc::Sender<Msg>, SubmitError> {
        self.owned(&endpoint.spec.organization_id)?;
        let moving = || SubmitError::Moving { retry_after_secs: 1 };
        let namespace = endpoint.namespace().unwrap_or_default();
        let key = (namespace.clone(), endpoint.spec.organization_id.clone());
        self.routes
            .lock()
            .expect("routes lock")
            .insert(ObjectRef::from(endpoint), key.clone());
        // Looking for the worker and starting one is a single step under the shards lock (which
        // spawning takes first anyway): two events of a new organization arriving together must
        // not each start a worker, or two writers would race for the log's first segment name.
        let mut shards = self.shards.lock().expect("shards lock");
        if let Some(tx) = self.workers.lock().expect("workers lock").get(&key) {
            // A worker that stopped is being replaced (hand-over, reload): never start an empty
            // log over one that exists.
            return if tx.is_closed() { Err(moving()) } else { Ok(tx.clone()) };
        }
        let log = DeliveryLog::new(
            &namespace,
            &endpoint.spec.organization_id,
            self.shared.config.log.clone(),
        );
        self.spawn_worker_in(&mut shards, key, log).ok_or_else(moving)
    }

    /// The worker of an endpoint's organization, if it runs; refused while the organization's
    /// shard is not held here.
    fn running_worker(&self, endpoint: &WebhookEndpoint) -> Result<Option<mpsc::Sender<Msg>>, SubmitError> {
        self.owned(&endpoint.spec.organization_id)?;
        let key = (
            endpoint.namespace().unwrap_or_default(),
            endpoint.spec.organization_id.clone(),
        );
        Ok(self
            .workers
            .lock()
            .expect("workers lock")
            .get(&key)
            .filter(|tx| !tx.is_closed())
            .cloned())
    }

    fn new_record(
        &self,
        endpoint: &WebhookEndpoint,
        event_id: &str,
        event_type: &str,
        now: Timestamp,
    ) -> DeliveryRecord {
        let max_attempts = endpoint
            .spec
            .max_attempts
            .unwrap_or(self.shared.config.schedule.max_attempts());
        let mut record = DeliveryRecord::pending(
            new_delivery_id(now),
            endpoint.name_any(),
            endpoint.spec.organization_id.clone(),
            (event_id, event_type),
            max_attempts,
            now,
        );
        // Work is done in the task of the request that asked for it: the current span is the
        // ingest span (or the REST request's, for a test event). Its attempts join that trace.
        record.trace = crate::traces::current_stored();
        record
    }

    /// Hands an event and its deliveries (all of one organization in one namespace) to their
    /// worker; returns once they are durable.
    async fn enqueue(
        &self,
        endpoint: &WebhookEndpoint,
        event: (String, Bytes),
        records: Vec<DeliveryRecord>,
        fan_out: bool,
    ) -> Result<(), SubmitError> {
        let (ack, done) = oneshot::channel();
        let tx = self.worker_for(endpoint)?;
        for record in &records {
            self.routes.lock().expect("routes lock").insert(
                ObjectRef::new(&record.endpoint_id).within(&endpoint.namespace().unwrap_or_default()),
                (
                    endpoint.namespace().unwrap_or_default(),
                    endpoint.spec.organization_id.clone(),
                ),
            );
        }
        tx.send(Msg::Enqueue {
            event: Some(event),
            records,
            fan_out,
            ack,
        })
        .await
        .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))?;
        self.await_durable(done).await
    }

    /// Refuses new work while the write budget is spent (counted).
    fn admit(&self) -> Result<(), SubmitError> {
        self.shared.config.budget.admit().map_err(|wait| {
            self.shared.config.metrics.ingest_throttled();
            SubmitError::Throttled {
                retry_after_secs: wait.as_secs(),
            }
        })
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
    /// event types match, each durable in its organization's log (with the payload, once) before
    /// this returns. Returns the event id and the number of deliveries.
    async fn submit(
        &self,
        organization_id: &str,
        event_type: &str,
        data: Value,
    ) -> Result<(String, usize), SubmitError> {
        if *self.shared.stopping.borrow() {
            return Err(SubmitError::Unavailable("the dispatcher is shutting down".into()));
        }
        self.owned(organization_id)?;
        self.admit()?;
        let now = Timestamp::now();
        let event_id = new_event_id(now);
        let payload =
            Bytes::from(serde_json::to_vec(&envelope(event_type, now, &data)).expect("JSON values serialize"));
        // The event as filters see it, converted once and only if an endpoint has a filter.
        let mut input = None;
        let targets: Vec<_> = self
            .shared
            .endpoints
            .list(organization_id)
            .into_iter()
            .filter(|ep| ep.spec.active && ep.metadata.deletion_timestamp.is_none())
            .filter(|ep| matches(&ep.spec.event_types, event_type))
            .filter(|ep| self.passes_filter(ep, &mut input, event_type, &data))
            .collect();
        // One log per namespace: the organization's endpoints usually share one.
        let mut by_namespace: BTreeMap<String, (Arc<WebhookEndpoint>, Vec<DeliveryRecord>)> = BTreeMap::new();
        for ep in &targets {
            let record = self.new_record(ep, &event_id, event_type, now);
            by_namespace
                .entry(ep.namespace().unwrap_or_default())
                .or_insert_with(|| (ep.clone(), Vec::new()))
                .1
                .push(record);
        }
        let writes = by_namespace.into_values().map(|(ep, records)| {
            let event = (event_id.clone(), payload.clone());
            async move { self.enqueue(&ep, event, records, true).await }
        });
        let results = futures::future::join_all(writes).await;
        if let Some(err) = results.into_iter().find_map(Result::err) {
            return Err(err);
        }
        Ok((event_id, targets.len()))
    }

    /// Whether the endpoint's filter, if any, gives `true` for the event. A filter that does not
    /// compile, an evaluation error and a non-bool result are no match, counted by reason.
    fn passes_filter(
        &self,
        endpoint: &WebhookEndpoint,
        input: &mut Option<EventInput>,
        event_type: &str,
        data: &Value,
    ) -> bool {
        let Some(source) = endpoint.spec.filter.as_deref() else {
            return true;
        };
        let metrics = &self.shared.config.metrics;
        let Some(filter) = self.shared.filters.get(source) else {
            metrics.filter_error("invalid");
            return false;
        };
        let input = input.get_or_insert_with(|| EventInput::new(event_type, data));
        filter.evaluate(input).unwrap_or_else(|e| {
            metrics.filter_error(e.label());
            false
        })
    }

    /// Sends a `webhook.test` event to one endpoint now (whatever its event types); returns the
    /// delivery and its payload.
    async fn send_test(&self, endpoint: &WebhookEndpoint) -> Result<Listed, SubmitError> {
        self.admit()?;
        let now = Timestamp::now();
        let event_id = new_event_id(now);
        let data =
            serde_json::json!({"endpoint_id": endpoint.name_any(), "message": "This is a test event from CapyDB."});
        let payload =
            Bytes::from(serde_json::to_vec(&envelope(TEST_EVENT_TYPE, now, &data)).expect("JSON values serialize"));
        let mut record = self.new_record(endpoint, &event_id, TEST_EVENT_TYPE, now);
        record.normalize();
        let view = serde_json::from_slice(&payload).ok();
        self.enqueue(endpoint, (event_id, payload), vec![record.clone()], false)
            .await?;
        Ok((record, view))
    }

    /// Sends a finished delivery again, now, once; returns it and its payload.
    async fn retry(&self, endpoint: &WebhookEndpoint, delivery_id: &str) -> Result<Listed, SubmitError> {
        self.admit()?;
        let not_found = || SubmitError::NotFound(format!("delivery {delivery_id} not found"));
        let tx = self.running_worker(endpoint)?.ok_or_else(not_found)?;
        let (reply, done) = oneshot::channel();
        tx.send(Msg::Retry {
            endpoint: endpoint.name_any(),
            id: delivery_id.to_string(),
            reply,
        })
        .await
        .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))?;
        self.await_durable(done).await
    }

    /// Sends the endpoint's failed deliveries created in `[since, until)` again, once durable.
    async fn recover(
        &self,
        endpoint: &WebhookEndpoint,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<usize, SubmitError> {
        self.admit()?;
        let Some(tx) = self.running_worker(endpoint)? else {
            return Ok(0);
        };
        let (reply, done) = oneshot::channel();
        tx.send(Msg::Recover {
            endpoint: endpoint.name_any(),
            since,
            until,
            reply,
        })
        .await
        .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))?;
        self.await_durable(done).await
    }

    /// Erases an event's payload from every log of the organization (one per namespace); returns
    /// how many deliveries carry it, once durable. Not found when none does.
    async fn erase_event(&self, organization_id: &str, event_id: &str) -> Result<usize, SubmitError> {
        self.owned(organization_id)?;
        let not_found = || SubmitError::NotFound(format!("event {event_id} not found"));
        if !crate::delivery_log::is_event_key(event_id) {
            return Err(not_found());
        }
        let workers: Vec<mpsc::Sender<Msg>> = self
            .workers
            .lock()
            .expect("workers lock")
            .iter()
            .filter(|((_, organization), tx)| organization == organization_id && !tx.is_closed())
            .map(|(_, tx)| tx.clone())
            .collect();
        let erasures = workers.into_iter().map(|tx| async move {
            let (reply, done) = oneshot::channel();
            tx.send(Msg::Erase {
                event_id: event_id.to_string(),
                reply,
            })
            .await
            .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))?;
            self.await_durable(done).await
        });
        let mut found = None;
        for result in futures::future::join_all(erasures).await {
            if let Some(count) = result? {
                found = Some(found.unwrap_or(0) + count);
            }
        }
        found.ok_or_else(not_found)
    }

    /// Up to `limit` of an endpoint's deliveries, newest first, each with its event's payload:
    /// from memory, no API-server round trip.
    async fn deliveries(&self, endpoint: &WebhookEndpoint, limit: usize) -> Result<Vec<Listed>, SubmitError> {
        let Some(tx) = self.running_worker(endpoint)? else {
            return Ok(Vec::new());
        };
        let (reply, done) = oneshot::channel();
        tx.send(Msg::List {
            endpoint: endpoint.name_any(),
            limit,
            reply,
        })
        .await
        .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))?;
        done.await
            .map_err(|_| SubmitError::Unavailable("the dispatcher is shutting down".into()))
    }

    /// An endpoint's attempts of the last day by hour, as counted here (in memory) since its
    /// organization's worker started; without a worker (nothing happened since the shard was
    /// taken), a day of zeros since then.
    async fn attempt_stats(&self, endpoint: &WebhookEndpoint) -> Result<AttemptStats, SubmitError> {
        let shutting_down = || SubmitError::Unavailable("the dispatcher is shutting down".into());
        let Some(tx) = self.running_worker(endpoint)? else {
            let shard = shard_of(&endpoint.spec.organization_id);
            let now = Timestamp::now();
            let since = self
                .shards
                .lock()
                .expect("shards lock")
                .get(&shard)
                .map_or(now, |run| run.taken_at);
            return Ok(AttemptHistory::default().stats(now, since));
        };
        let (reply, done) = oneshot::channel();
        tx.send(Msg::Stats {
            endpoint: endpoint.name_any(),
            reply,
        })
        .await
        .map_err(|_| shutting_down())?;
        done.await.map_err(|_| shutting_down())
    }

    /// Stores an operational event in the operational log (unless it holds the event's delivery
    /// already); returns once durable.
    async fn operational(&self, event: OperationalEvent) -> Result<(), SubmitError> {
        let Some((endpoint, _)) = self.shared.operational.clone() else {
            return Err(SubmitError::NotFound(
                "no operational webhook is configured here".into(),
            ));
        };
        if self.is_stopping() {
            return Err(SubmitError::Unavailable("the dispatcher is shutting down".into()));
        }
        // Not refused by the write budget: a few events per change, which must not be lost to
        // the customers' load.
        let now = Timestamp::now();
        let record = DeliveryRecord::pending(
            event.delivery_id.clone(),
            OPERATIONAL_ENDPOINT,
            OPERATIONAL_ORGANIZATION,
            (&event.event_id, &event.event_type),
            self.shared.config.schedule.max_attempts(),
            now,
        );
        let payload = Bytes::from(serde_json::to_vec(&event.body).expect("JSON values serialize"));
        self.enqueue(&endpoint, (event.event_id, payload), vec![record], false)
            .await
    }

    /// Waits until every worker has finished (after `stopping` turned true): in-flight attempts
    /// end within the grace period and every change is written to the logs.
    pub async fn wait_stopped(&self) {
        self.events_done.notified().await;
        info!("dispatcher stopped");
    }
}

impl Work for Dispatcher {
    /// Does work here: an endpoint a request names is looked up in this replica's cache
    /// ([`crate::work::EndpointRef::look_up`]), whoever sent the request; an event is never
    /// relayed from here.
    fn perform(&self, request: WorkRequest) -> BoxFuture<'_, WorkReply> {
        Box::pin(async move {
            let endpoints = &self.shared.endpoints;
            let done = async {
                Ok(match request {
                    WorkRequest::Submit {
                        organization_id,
                        event_type,
                        data,
                    } => {
                        let (id, n) = self.submit(&organization_id, &event_type, data).await?;
                        WorkReply::Submitted(id, n)
                    }
                    WorkRequest::Relay { .. } => WorkReply::NotRelayed,
                    WorkRequest::SendTest { endpoint } => {
                        let endpoint = endpoint.look_up(endpoints).await?;
                        WorkReply::Listed(Box::new(self.send_test(&endpoint).await?))
                    }
                    WorkRequest::Retry { endpoint, delivery_id } => {
                        let endpoint = endpoint.look_up(endpoints).await?;
                        WorkReply::Listed(Box::new(self.retry(&endpoint, &delivery_id).await?))
                    }
                    WorkRequest::Recover { endpoint, since, until } => {
                        let endpoint = endpoint.look_up(endpoints).await?;
                        WorkReply::Recovered(self.recover(&endpoint, since, until).await?)
                    }
                    WorkRequest::Operational { event } => {
                        let id = event.event_id.clone();
                        self.operational(event).await?;
                        WorkReply::Submitted(id, 1)
                    }
                    WorkRequest::EraseEvent {
                        organization_id,
                        event_id,
                    } => WorkReply::Erased(self.erase_event(&organization_id, &event_id).await?),
                    WorkRequest::Deliveries { endpoint, limit } => {
                        let endpoint = endpoint.look_up(endpoints).await?;
                        WorkReply::Deliveries(self.deliveries(&endpoint, limit).await?)
                    }
                    WorkRequest::AttemptStats { endpoint } => {
                        let endpoint = endpoint.look_up(endpoints).await?;
                        WorkReply::AttemptStats(self.attempt_stats(&endpoint).await?)
                    }
                })
            };
            done.await.unwrap_or_else(WorkReply::Failed)
        })
    }
}
