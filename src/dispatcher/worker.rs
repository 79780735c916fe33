//! One organization's worker (in one namespace): the single writer of its delivery log and the
//! owner of the schedule of each of its endpoints.
//!
//! Group commit: while one log write is in flight, every change that arrives is collected and
//! goes out in the next write, so under load each API write carries many deliveries, of every
//! endpoint of the organization, and each event's payload once. A new delivery is attempted only
//! once its pending record is durable, and ingest is acknowledged at the same moment.
//!
//! Status summaries and Events are written by tasks of their own: a slow status write never holds
//! back the log writer or an acknowledgement.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::Shared;
use super::status::{DispatchSummary, status_patch, transition_event};
use crate::delivery::attempt_stats::{AttemptHistory, AttemptStats};
use crate::delivery::due::{
    Found, Lane, Queued, Start, ingest_key_after, next_fifo_start, next_start, plan_fifo_start, plan_starts,
};
use crate::delivery::health::{HealthWindow, disabled_reason, health};
use crate::delivery::outcome::{AttemptOutcome, NextStep, after_attempt, endpoint_after_attempt};
use crate::delivery::sender::AttemptResult;
use crate::delivery_log::{DeliveryLog, DeliveryRecord, DeliveryState, SegmentWrite, WritePipeline};
use crate::operational::{
    AUTO_DISABLED_ANNOTATION, AutoDisabled, Exhausted, OPERATIONAL_ORGANIZATION, OperationalEvent,
};
use crate::resources::{DeliverySummary, Health, Ordering as EndpointOrdering, WebhookEndpoint};
use crate::shards::{Fence, shard_of};
use crate::telemetry::{DeliveryOutcome, DueSlot, EventNote, WriteKind, publish_event};
use crate::work::{Listed, SubmitError};

/// Longest wait before writing again after the API server gave log writes back.
const LOG_WRITE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Log writes (batches) of one organization in flight at most.
pub(crate) const WRITES_IN_FLIGHT: usize = 4;

/// A delivery recovered is not recovered again for this long (it is pending meanwhile anyway,
/// until its one attempt fails again).
pub(crate) const RECOVER_COOLDOWN: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);

/// An endpoint whose backlog stays full is told so at most this often (a Warning Event).
const BACKLOG_FULL_EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// What the Warning Event of a full backlog says first.
const BACKLOG_NOTE: &str = "This endpoint's backlog of pending deliveries is full: it receives slower than events arrive \
     (a low rate_limit, or a slow or failing receiver).";

/// Messages a worker handles.
pub(crate) enum Msg {
    /// New deliveries, and the event they carry (absent when the log already holds it); `ack`
    /// answers once they are durable.
    Enqueue {
        event: Option<(String, Bytes)>,
        records: Vec<DeliveryRecord>,
        /// An event's fan-out: a delivery to an endpoint whose backlog is full is stored failed
        /// rather than refusing the event. Otherwise (a test) a full backlog refuses the request.
        fan_out: bool,
        ack: oneshot::Sender<Result<(), SubmitError>>,
    },
    /// An attempt finished.
    AttemptDone {
        id: String,
        endpoint: String,
        result: AttemptResult,
        at: Timestamp,
    },
    /// The creates of batch `batch` were sent: applied, or failed.
    CreatesDone {
        batch: u64,
        result: Result<usize, kube::Error>,
    },
    /// The deletes of batch `batch` were sent: applied, or failed.
    DeletesDone {
        batch: u64,
        result: Result<usize, kube::Error>,
    },
    /// Send a finished delivery of `endpoint` again.
    Retry {
        endpoint: String,
        id: String,
        reply: oneshot::Sender<Result<Listed, SubmitError>>,
    },
    /// Send the failed deliveries of `endpoint` created in `[since, until)` again.
    Recover {
        endpoint: String,
        since: Timestamp,
        until: Timestamp,
        reply: oneshot::Sender<Result<usize, SubmitError>>,
    },
    /// Erase an event's payload from this log; pending deliveries of it fail. Answered with the
    /// number of deliveries carrying it once durable, `None` if none here does.
    Erase {
        event_id: String,
        reply: oneshot::Sender<Result<Option<usize>, SubmitError>>,
    },
    /// The newest deliveries of an endpoint, with their payloads.
    List {
        endpoint: String,
        limit: usize,
        reply: oneshot::Sender<Vec<Listed>>,
    },
    /// An endpoint's attempts of the last day, by hour.
    Stats {
        endpoint: String,
        reply: oneshot::Sender<AttemptStats>,
    },
    /// A status summary write finished: `written` is what it wrote, if it succeeded.
    SummaryDone {
        endpoint: String,
        written: Option<(Health, Option<String>)>,
    },
    /// An endpoint changed (re-activated, deleted, ...): look again.
    Wake,
}

/// `last_error` of a pending delivery whose event was erased before it was delivered.
pub(crate) const ERASED_ERROR: &str = "the event was erased before it could be delivered";

/// How often a worker looks for payloads past their retention, at most.
const RETENTION_SWEEP_MAX: Duration = Duration::from_secs(60);

/// Someone waiting for the next durable write.
pub(crate) enum Ack {
    /// An event's deliveries: if they cannot be made durable, the caller is answered 503 and
    /// they are taken back out of the log, so a 503 never leads to a delivery.
    Enqueued(Added, oneshot::Sender<Result<(), SubmitError>>),
    Retried(Box<Listed>, oneshot::Sender<Result<Listed, SubmitError>>),
    Recovered(usize, oneshot::Sender<Result<usize, SubmitError>>),
    Erased(usize, oneshot::Sender<Result<Option<usize>, SubmitError>>),
}

impl Ack {
    /// Whether whoever waits has given up (the persist timeout answered them 503).
    fn abandoned(&self) -> bool {
        match self {
            Ack::Enqueued(_, tx) => tx.is_closed(),
            Ack::Retried(_, tx) => tx.is_closed(),
            Ack::Recovered(_, tx) => tx.is_closed(),
            Ack::Erased(_, tx) => tx.is_closed(),
        }
    }

    fn answer(self, result: Result<(), SubmitError>) {
        match self {
            Ack::Enqueued(_, tx) => {
                let _ = tx.send(result);
            }
            Ack::Retried(record, tx) => {
                let _ = tx.send(result.map(|()| *record));
            }
            Ack::Recovered(count, tx) => {
                let _ = tx.send(result.map(|()| count));
            }
            Ack::Erased(count, tx) => {
                let _ = tx.send(result.map(|()| Some(count)));
            }
        }
    }
}

/// What one enqueue added to the log and no write has carried yet.
#[derive(Default)]
pub(crate) struct Added {
    deliveries: Vec<String>,
    event: Option<String>,
}

/// The schedule and health of one endpoint.
struct EndpointState {
    /// Durable pending deliveries by due time.
    due: BTreeSet<(Timestamp, String)>,
    /// Pending deliveries by ingest order, `(created_at, id)`, durable or not yet: the queue of a
    /// `fifo` endpoint (kept for every endpoint, so that a change of ordering finds it).
    order: BTreeSet<(Timestamp, String)>,
    in_flight: usize,
    /// With a rate limit, no attempt of this endpoint starts before this time.
    paced_until: Timestamp,
    window: HealthWindow,
    /// Attempts of the last day by hour, for the portal's chart (in memory only).
    attempts: AttemptHistory,
    totals: DeliverySummary,
    last_health: Health,
    disabled_reason: Option<String>,
    /// Whether the endpoint was seen inactive since this worker last disabled it.
    seen_inactive: bool,
    summary_dirty: bool,
    summary_in_flight: bool,
    summary_written_at: Option<Instant>,
    /// When the endpoint's owner was last told its backlog is full.
    backlog_full_told_at: Option<Instant>,
}

impl EndpointState {
    fn new(endpoint: Option<&WebhookEndpoint>) -> Self {
        let status = endpoint.and_then(|e| e.status.clone()).unwrap_or_default();
        Self {
            due: BTreeSet::new(),
            order: BTreeSet::new(),
            in_flight: 0,
            paced_until: Timestamp::UNIX_EPOCH,
            window: HealthWindow::default(),
            attempts: AttemptHistory::default(),
            totals: status.deliveries.clone().unwrap_or_default(),
            last_health: status.health.unwrap_or_default(),
            disabled_reason: status.disabled_reason,
            seen_inactive: endpoint.is_some_and(|e| !e.spec.active),
            summary_dirty: false,
            summary_in_flight: false,
            summary_written_at: None,
            backlog_full_told_at: None,
        }
    }

    fn lane(&self) -> Lane<'_> {
        Lane {
            due: &self.due,
            in_flight: self.in_flight,
            paced_until: self.paced_until,
        }
    }
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    namespace: String,
    organization: String,
    log: DeliveryLog,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    endpoints: HashMap<String, EndpointState>,
    /// New deliveries whose pending record is not durable yet.
    unpersisted: HashSet<String>,
    in_flight: HashSet<String>,
    waiting: Vec<Ack>,
    /// Log writes in flight (see [`WritePipeline`]).
    pipeline: WritePipeline,
    /// Who waits for each batch in flight.
    batch_acks: HashMap<u64, Vec<Ack>>,
    /// Those whose batch failed: answered 503 once the failed batches are given back, when what
    /// they added can be taken out of the log again.
    refused: Vec<Ack>,
    write_retry_at: Option<Instant>,
    write_failures: u32,
    /// Segment names found held by objects this operator did not write, forgotten once the
    /// failed batches are given back.
    foreign_names: Vec<String>,
    /// Deliveries recovered within [`RECOVER_COOLDOWN`], and when (kept by this worker: a new
    /// owner of the shard starts without them).
    recovered_at: HashMap<String, Timestamp>,
    /// The highest segment number this log's workers in this process have named
    /// ([`super::Shared`]'s `seq_marks`).
    names_mark: Arc<AtomicU64>,
    /// Whether a write failed since the last give-back for another reason than a foreign name
    /// (only such failures make the worker pause before writing again).
    write_failed: bool,
    /// This worker's share of the pending-deliveries gauge.
    reported_pending: i64,
    /// When payloads past their retention were last looked for.
    retention_swept_at: Instant,
    /// This worker's share of the oldest-pending gauge (leaves it when the worker is dropped).
    due_slot: DueSlot,
    /// Turns true when the worker's shard is handed over or the process stops: drain.
    stopping: watch::Receiver<bool>,
    /// While open, this replica may write the log; once closed, the worker stops at once.
    fence: Fence,
    /// The shard of the organization.
    shard: u32,
    /// When this worker started: its endpoints' attempt counts begin here.
    started_at: Timestamp,
    /// Attempts, log writes and status writes in flight: when the worker is stopped at once (its
    /// shard lost), dropping them aborts them all, so nothing more is sent or written.
    tasks: tokio::task::JoinSet<()>,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        log: DeliveryLog,
        names_mark: Arc<AtomicU64>,
        tx: mpsc::Sender<Msg>,
        rx: mpsc::Receiver<Msg>,
        stopping: watch::Receiver<bool>,
        fence: Fence,
    ) -> Self {
        let mut worker = Self {
            stopping,
            fence,
            shard: shard_of(log.organization_id()),
            started_at: Timestamp::now(),
            tasks: tokio::task::JoinSet::new(),
            namespace: log.namespace().to_string(),
            organization: log.organization_id().to_string(),
            shared: shared.clone(),
            log,
            tx,
            rx,
            endpoints: HashMap::new(),
            unpersisted: HashSet::new(),
            in_flight: HashSet::new(),
            waiting: Vec::new(),
            pipeline: WritePipeline::new(WRITES_IN_FLIGHT),
            batch_acks: HashMap::new(),
            refused: Vec::new(),
            write_retry_at: None,
            write_failures: 0,
            foreign_names: Vec::new(),
            write_failed: false,
            recovered_at: HashMap::new(),
            names_mark,
            reported_pending: 0,
            // The first sweep comes one interval after the start, not during a recovery's rush.
            retention_swept_at: Instant::now(),
            due_slot: shared.config.metrics.due_slot(),
        };
        let due: Vec<(String, Timestamp, Timestamp, String)> = worker
            .log
            .pending()
            .map(|r| {
                (
                    r.endpoint_id.clone(),
                    r.next_attempt_at.unwrap_or(r.created_at),
                    r.created_at,
                    r.id.clone(),
                )
            })
            .collect();
        for (endpoint, at, created, id) in due {
            let state = worker.state(&endpoint);
            state.due.insert((at, id.clone()));
            state.order.insert((created, id));
        }
        worker.forget_departed_endpoints();
        worker
    }

    fn endpoint(&self, name: &str) -> Option<Arc<WebhookEndpoint>> {
        if self.is_operational() {
            return self.shared.operational_endpoint(&self.namespace, name);
        }
        self.shared
            .endpoints
            .get(&self.namespace, name)
            .filter(|e| e.spec.organization_id == self.organization)
    }

    /// Whether this is the operational log: the platform's endpoint, no `WebhookEndpoint`.
    fn is_operational(&self) -> bool {
        self.organization == OPERATIONAL_ORGANIZATION
    }

    /// Whether an endpoint's deliveries go one at a time in ingest order.
    fn is_fifo(&self, name: &str) -> bool {
        self.endpoint(name)
            .is_some_and(|e| e.spec.ordering == EndpointOrdering::Fifo)
    }

    /// When an attempt of endpoint `name` may start next (see [`next_start`], [`next_fifo_start`]).
    fn next_start_of(&self, name: &str, state: &EndpointState) -> Option<Timestamp> {
        if self.is_fifo(name) {
            let queued = queued(&self.log, &self.in_flight, &self.unpersisted);
            next_fifo_start(&state.order, state.in_flight, state.paced_until, queued)
        } else {
            next_start(&state.lane(), self.shared.config.per_endpoint_concurrency)
        }
    }

    /// The state of an endpoint, made from its status on first use.
    fn state(&mut self, endpoint: &str) -> &mut EndpointState {
        if !self.endpoints.contains_key(endpoint) {
            let current = self.endpoint(endpoint);
            let mut state = EndpointState::new(current.as_deref());
            state.totals.pending = self.log.pending_count_of(endpoint) as u64;
            self.endpoints.insert(endpoint.to_string(), state);
        }
        self.endpoints.get_mut(endpoint).expect("just inserted")
    }

    /// Whether an endpoint is gone for good: deleted, or naming another organization. One whose
    /// namespace no longer serves its organization (a label removed or changed, perhaps for a
    /// moment) is not: it is paused, its deliveries stay durable and resume with the binding.
    fn departed(&self, name: &str) -> bool {
        if self.is_operational() {
            return self.shared.operational_endpoint(&self.namespace, name).is_none();
        }
        self.shared
            .endpoints
            .stored(&self.namespace, name)
            .is_none_or(|e| e.spec.organization_id != self.organization)
    }

    /// Drops the deliveries of endpoints that were deleted or now belong to another
    /// organization; their stored copies go with the segments.
    fn forget_departed_endpoints(&mut self) {
        let known: BTreeSet<String> = self
            .log
            .endpoints()
            .map(str::to_string)
            .chain(self.endpoints.keys().cloned())
            .collect();
        for name in known {
            if !self.departed(&name) {
                continue;
            }
            let dropped = self.log.remove_endpoint(&name);
            if let Some(state) = self.endpoints.remove(&name) {
                for (_, id) in state.due {
                    self.unpersisted.remove(&id);
                }
            }
            if dropped > 0 {
                info!(namespace = %self.namespace, endpoint = %name, deliveries = dropped,
                    "endpoint gone: its deliveries are dropped");
            }
        }
    }

    pub(crate) async fn run(mut self) {
        let mut stopping = self.stopping.clone();
        let mut grace_deadline: Option<Instant> = None;
        loop {
            self.report_pending();
            while self.tasks.try_join_next().is_some() {}
            if !self.fence.is_open() {
                // The shard's Lease may be someone else's by now: not one more write.
                warn!(organization = %self.organization, shard = self.shard,
                    "the shard's Lease was not renewed in time; this worker stops without writing");
                break;
            }
            let is_stopping = *stopping.borrow();
            if is_stopping && grace_deadline.is_none() {
                grace_deadline = Some(Instant::now() + self.shared.config.shutdown_grace);
            }
            if !is_stopping {
                self.expire_payloads();
                self.start_due_attempts();
            }
            self.start_writes();
            self.start_summaries();
            if is_stopping {
                let summaries = self.endpoints.values().any(|s| s.summary_in_flight);
                let drained =
                    self.in_flight.is_empty() && self.pipeline.is_idle() && !self.log.has_changes() && !summaries;
                if drained {
                    break;
                }
                if grace_deadline.is_some_and(|d| Instant::now() >= d) {
                    warn!(organization = %self.organization, shard = self.shard,
                        attempts_in_flight = self.in_flight.len(), writes_idle = self.pipeline.is_idle(),
                        unwritten_changes = self.log.has_changes(), summaries_in_flight = summaries,
                        "the worker did not drain within the shutdown grace; it stops now");
                    break;
                }
            }
            let wake = self.next_wake(is_stopping, grace_deadline);
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = tokio::time::sleep_until(wake) => {}
                _ = stopping.changed(), if !is_stopping => {}
            }
            // Drain what else is queued, so one write carries all of it.
            while let Ok(msg) = self.rx.try_recv() {
                self.handle(msg);
            }
        }
        let unanswered = self
            .waiting
            .drain(..)
            .chain(self.refused.drain(..))
            .chain(self.batch_acks.drain().flat_map(|(_, acks)| acks));
        for ack in unanswered {
            ack.answer(Err(SubmitError::Unavailable("the dispatcher is shutting down".into())));
        }
        // A stopped worker no longer dispatches its pending deliveries: take them off the gauge.
        self.shared.config.metrics.pending_changed(-self.reported_pending);
        self.reported_pending = 0;
        debug!(namespace = %self.namespace, organization = %self.organization, "worker stopped");
    }

    /// Moves the pending-deliveries gauge by what changed since the last report.
    fn report_pending(&mut self) {
        let pending = self.log.pending_count() as i64;
        self.shared
            .config
            .metrics
            .pending_changed(pending - self.reported_pending);
        self.reported_pending = pending;
        // The earliest due time of an attempt not started, over the active endpoints (an inactive
        // one keeps its deliveries pending on purpose): one look per endpoint, no scan of records.
        let earliest_due = self
            .endpoints
            .iter()
            .filter_map(|(name, state)| state.due.first().map(|(at, _)| (name, *at)))
            .filter(|(name, _)| self.endpoint(name).is_some_and(|e| e.spec.active))
            .map(|(_, at)| at.as_millisecond())
            .min();
        self.due_slot.set(earliest_due);
    }

    fn next_wake(&self, stopping: bool, grace_deadline: Option<Instant>) -> Instant {
        let now_ts = Timestamp::now();
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(60);
        let at = |ts: Timestamp| {
            if ts <= now_ts {
                now
            } else {
                now + now_ts.duration_until(ts).unsigned_abs()
            }
        };
        for (name, state) in &self.endpoints {
            if !stopping && let Some(start) = self.next_start_of(name, state) {
                wake = wake.min(at(start));
            }
            if state.summary_dirty && !state.summary_in_flight {
                let next = state
                    .summary_written_at
                    .map_or(now, |t| t + self.shared.config.summary_interval);
                wake = wake.min(next);
            }
        }
        if let Some(at) = self.write_retry_at {
            wake = wake.min(at);
        }
        if let Some(retention) = self.shared.config.payload_retention.filter(|_| !stopping) {
            wake = wake.min(self.retention_swept_at + retention_sweep_interval(retention));
        }
        if let Some(d) = grace_deadline {
            wake = wake.min(d);
        }
        wake
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Enqueue {
                event,
                records,
                fan_out,
                ack,
            } => self.enqueue(event, records, fan_out, ack),
            Msg::AttemptDone {
                id,
                endpoint,
                result,
                at,
            } => self.attempt_done(id, endpoint, result, at),
            Msg::CreatesDone { batch, result } => self.creates_done(batch, result),
            Msg::DeletesDone { batch, result } => self.deletes_done(batch, result),
            Msg::Retry { endpoint, id, reply } => self.retry(endpoint, id, reply),
            Msg::Recover {
                endpoint,
                since,
                until,
                reply,
            } => self.recover(endpoint, since, until, reply),
            Msg::Erase { event_id, reply } => self.erase(&event_id, reply),
            Msg::List { endpoint, limit, reply } => {
                let listed = self
                    .log
                    .newest_first(&endpoint, limit)
                    .into_iter()
                    .map(|r| (r.clone(), self.log.payload_json(&r.event_id)))
                    .collect();
                let _ = reply.send(listed);
            }
            Msg::Stats { endpoint, reply } => {
                let stats = match self.endpoints.get(&endpoint) {
                    Some(state) => state.attempts.stats(Timestamp::now(), self.started_at),
                    None => AttemptHistory::default().stats(Timestamp::now(), self.started_at),
                };
                let _ = reply.send(stats);
            }
            Msg::SummaryDone { endpoint, written } => self.summary_done(endpoint, written),
            Msg::Wake => self.forget_departed_endpoints(),
        }
    }

    fn enqueue(
        &mut self,
        event: Option<(String, Bytes)>,
        records: Vec<DeliveryRecord>,
        fan_out: bool,
        ack: oneshot::Sender<Result<(), SubmitError>>,
    ) {
        let refused = |e: crate::delivery_log::LogFull| Err(SubmitError::Unavailable(e.to_string()));
        // An operational event's delivery id is derived from its change: one the log holds
        // already is that change told again (a new leader, a restart), and is not sent twice.
        let (records, told_before): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|r| !(self.is_operational() && self.log.get(&r.id).is_some()));
        if records.is_empty() && !told_before.is_empty() {
            debug!(deliveries = told_before.len(), "operational event stored already");
            let _ = ack.send(Ok(()));
            return;
        }
        let event_id = event.as_ref().map(|(id, _)| id.clone());
        if let Some((id, payload)) = event
            && let Err(e) = self.log.insert_event(&id, payload)
        {
            let _ = ack.send(refused(e));
            return;
        }
        let mut added = Added {
            deliveries: Vec::with_capacity(records.len()),
            event: event_id,
        };
        let mut overflowed: Vec<String> = Vec::new();
        for mut record in records {
            if self.is_fifo(&record.endpoint_id) {
                // Its place in the queue: after every delivery this worker accepted before it.
                record.normalize();
                let last = self.state(&record.endpoint_id).order.last().cloned();
                record.created_at = ingest_key_after(last.as_ref(), record.created_at, &record.id);
            }
            let id = record.id.clone();
            let endpoint = record.endpoint_id.clone();
            let stored = if fan_out {
                self.log.insert_or_fail_when_full(record)
            } else {
                self.log.insert(record).map(|()| false)
            };
            if stored == Ok(true) {
                overflowed.push(endpoint);
            }
            if let Err(e) = stored {
                // All or nothing: what this request added was never written, so it can go.
                self.withdraw(added);
                let _ = ack.send(refused(e));
                return;
            }
            self.unpersisted.insert(id.clone());
            added.deliveries.push(id);
        }
        for id in &added.deliveries {
            if let Some(r) = self.log.get(id) {
                let (endpoint, created, pending) =
                    (r.endpoint_id.clone(), r.created_at, r.state == DeliveryState::Pending);
                let count = self.log.pending_count_of(&endpoint) as u64;
                let state = self.state(&endpoint);
                state.totals.pending = count;
                if pending {
                    state.order.insert((created, id.clone()));
                }
            }
        }
        for endpoint in overflowed {
            self.backlog_overflowed(&endpoint);
        }
        self.waiting.push(Ack::Enqueued(added, ack));
    }

    /// Takes out of the log what an enqueue added, none of it written yet: its caller was (or is
    /// about to be) answered 503, so none of it may be delivered.
    fn withdraw(&mut self, added: Added) {
        for id in added.deliveries {
            let Some(record) = self.log.get(&id).cloned() else {
                continue;
            };
            if !self.log.discard_unstored(&id) {
                continue;
            }
            self.unpersisted.remove(&id);
            let pending = self.log.pending_count_of(&record.endpoint_id) as u64;
            let state = self.state(&record.endpoint_id);
            state.totals.pending = pending;
            state.order.remove(&(record.created_at, id));
            if record.state == DeliveryState::Failed {
                // Stored failed (the endpoint's backlog was full): it no longer exists either.
                state.totals.failed = state.totals.failed.saturating_sub(1);
                state.summary_dirty = true;
            }
        }
        if let Some(event) = added.event {
            self.log.discard_unused_event(&event);
        }
    }

    /// Answers 503 to whoever waits on a write that failed, and withdraws what they added. Call
    /// only with no batch in flight (every failed batch given back).
    fn refuse(&mut self, acks: Vec<Ack>, error: &SubmitError) {
        for ack in acks {
            if let Ack::Enqueued(added, tx) = ack {
                let stored_elsewhere = added
                    .deliveries
                    .iter()
                    .any(|id| !self.unpersisted.contains(id) && self.log.get(id).is_some());
                if stored_elsewhere {
                    // A batch that succeeded carried a copy (a compaction), so it may be sent
                    // already: it cannot be taken back; its caller waits for the rest instead.
                    self.waiting.push(Ack::Enqueued(added, tx));
                    continue;
                }
                self.withdraw(added);
                let _ = tx.send(Err(error.clone()));
            } else {
                ack.answer(Err(error.clone()));
            }
        }
    }

    /// A delivery of an event was stored failed because the endpoint's backlog was full: counted,
    /// in the endpoint's totals, and told to its owner with a Warning Event (once a minute at
    /// most per endpoint, however many events overflow).
    fn backlog_overflowed(&mut self, endpoint: &str) {
        let metrics = self.shared.config.metrics.clone();
        metrics.delivery(DeliveryOutcome::Failed);
        metrics.backlog_overflow();
        let now = Instant::now();
        let state = self.state(endpoint);
        state.totals.failed += 1;
        state.summary_dirty = true;
        if state
            .backlog_full_told_at
            .is_some_and(|t| now < t + BACKLOG_FULL_EVENT_INTERVAL)
        {
            return;
        }
        state.backlog_full_told_at = Some(now);
        let Some(current) = self.endpoint(endpoint).filter(|_| !self.is_operational()) else {
            return;
        };
        warn!(namespace = %self.namespace, endpoint, "the endpoint's backlog is full: new deliveries are stored failed");
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let event = EventNote {
                warning: true,
                reason: "BacklogFull",
                action: "Enqueue",
                note: format!(
                    "{BACKLOG_NOTE} New deliveries are stored failed (recoverable) until it catches up; \
                     other endpoints are not held back."
                ),
            };
            publish_event(
                &shared.recorder,
                &shared.config.metrics,
                &kube::Resource::object_ref(current.as_ref(), &()),
                &event,
            )
            .await;
        });
    }

    /// Starts the attempts [`plan_starts`] picks for each endpoint, fails the deliveries whose
    /// payload was lost, and puts back those that wait for their signing keys.
    fn start_due_attempts(&mut self) {
        let now = Timestamp::now();
        let concurrency = self.shared.config.per_endpoint_concurrency;
        let names: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(name, s)| self.next_start_of(name, s).is_some_and(|at| at <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let Some(endpoint) = self.endpoint(&name) else {
                continue;
            };
            let ring = if self.is_operational() {
                self.shared.operational.as_ref().map(|(_, ring)| ring.clone())
            } else {
                endpoint
                    .spec
                    .active
                    .then(|| self.shared.keys.ring(&self.namespace, &name))
                    .flatten()
            };
            // An endpoint that names a client certificate is sent nothing without a usable one:
            // its deliveries wait, as they do for signing keys.
            let identity = match (&endpoint.spec.client_certificate, endpoint.spec.active) {
                (Some(certificate), true) => self
                    .shared
                    .identities
                    .get(&self.namespace, &certificate.secret_name)
                    .ok()
                    .map(Some),
                _ => Some(None),
            };
            let fifo = endpoint.spec.ordering == EndpointOrdering::Fifo;
            let state = self.endpoints.get_mut(&name).expect("listed above");
            let (log, in_flight) = (&self.log, &self.in_flight);
            let plan = if fifo {
                plan_fifo_start(
                    &state.order,
                    state.in_flight,
                    state.paced_until,
                    endpoint.spec.rate_limit,
                    endpoint.spec.active,
                    ring.is_some() && identity.is_some(),
                    now,
                    queued(log, in_flight, &self.unpersisted),
                )
            } else {
                let found = |id: &str| match log.get(id) {
                    Some(r) if r.state == DeliveryState::Pending && !in_flight.contains(id) => {
                        if log.payload(&r.event_id).is_some() {
                            Found::Ready
                        } else {
                            Found::PayloadLost
                        }
                    }
                    _ => Found::Stale,
                };
                plan_starts(
                    &state.lane(),
                    concurrency,
                    endpoint.spec.rate_limit,
                    endpoint.spec.active,
                    ring.is_some() && identity.is_some(),
                    now,
                    found,
                )
            };
            state.in_flight = plan.in_flight;
            state.paced_until = plan.paced_until;
            for (key, start) in plan.steps {
                if fifo {
                    // The step names the queue's key; the delivery leaves the due times too.
                    if let Some(r) = self.log.get(&key.1) {
                        state
                            .due
                            .remove(&(r.next_attempt_at.unwrap_or(r.created_at), key.1.clone()));
                    }
                    if start != Start::Send {
                        state.order.remove(&key);
                    }
                } else {
                    state.due.remove(&key);
                }
                let (_, id) = key;
                match start {
                    Start::Skip => {}
                    Start::Postpone(at) => {
                        state.due.insert((at, id));
                    }
                    Start::Fail => {
                        let Some(mut record) = self.log.get(&id).cloned() else {
                            continue;
                        };
                        warn!(endpoint = %name, delivery = %id, event = %record.event_id,
                            "the event's payload is not in the log; the delivery fails");
                        state.order.remove(&(record.created_at, id.clone()));
                        record.fail("the event's payload was lost", now);
                        self.log.update(record);
                    }
                    Start::Send => {
                        let (Some(ring), Some(identity), Some(record)) =
                            (ring.clone(), identity.clone(), self.log.get(&id))
                        else {
                            continue;
                        };
                        let Some(body) = self.log.payload(&record.event_id).cloned() else {
                            continue;
                        };
                        if record.attempts == 0 {
                            // A clock step back makes it negative: counted as no wait.
                            let waited = Duration::try_from(record.created_at.duration_until(now)).unwrap_or_default();
                            self.shared.config.metrics.first_attempt_started(waited);
                        }
                        let span = crate::traces::AttemptSpan::start(crate::traces::AttemptOf {
                            endpoint: &name,
                            delivery: &record.id,
                            event: &record.event_id,
                            attempt: u64::from(record.attempts) + 1,
                            url: &endpoint.spec.url,
                            parent: record.trace.as_deref(),
                        });
                        self.in_flight.insert(id.clone());
                        let endpoint = endpoint.clone();
                        let shared = self.shared.clone();
                        let tx = self.tx.clone();
                        let endpoint_name = name.clone();
                        self.tasks.spawn(async move {
                            let at = Timestamp::now();
                            let spec = &endpoint.spec;
                            let result = shared
                                .sender
                                .send_as(identity.as_ref(), &spec.url, &spec.headers, &id, &body, &ring, at)
                                .await;
                            let failed = (!result.outcome.is_success()).then(|| result.outcome.metric_label());
                            span.end(result.outcome.status(), failed);
                            let _ = tx
                                .send(Msg::AttemptDone {
                                    id,
                                    endpoint: endpoint_name,
                                    result,
                                    at: Timestamp::now(),
                                })
                                .await;
                        });
                    }
                }
            }
        }
    }

    /// An attempt finished: the record and the endpoint take what [`after_attempt`] and
    /// [`endpoint_after_attempt`] decide, and the endpoint is disabled when they say so.
    fn attempt_done(&mut self, id: String, endpoint_name: String, result: AttemptResult, at: Timestamp) {
        self.in_flight.remove(&id);
        if let Some(state) = self.endpoints.get_mut(&endpoint_name) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        let Some(mut record) = self.log.get(&id).cloned() else {
            return;
        };
        if record.state != DeliveryState::Pending {
            // Finished while the attempt was in flight (its event erased): it stays as it is.
            self.shared
                .config
                .metrics
                .attempt(result.outcome.metric_label(), result.duration);
            return;
        }
        let active = self.endpoint(&endpoint_name).is_some_and(|e| e.spec.active);
        let metrics = self.shared.config.metrics.clone();
        metrics.attempt(result.outcome.metric_label(), result.duration);
        let schedule = self.shared.config.schedule.clone();
        let auto_disable_after = self.shared.config.auto_disable_after;
        let effect = after_attempt(
            &result.outcome,
            result.response_excerpt.as_deref(),
            record.attempts + 1,
            record.max_attempts,
            &schedule,
            at,
            rand::random::<f64>(),
        );
        record.attempted(result.outcome.status(), effect.next, effect.last_error.clone(), at);
        let state = self.state(&endpoint_name);
        state.window.record(at, result.outcome.is_success());
        state.attempts.record(at, result.outcome.is_success(), result.duration);
        let on_endpoint = endpoint_after_attempt(&effect, &state.totals, &state.window, at, auto_disable_after, active);
        state.totals = on_endpoint.totals;
        metrics.delivery(match effect.next {
            NextStep::Succeeded => {
                state.order.remove(&(record.created_at, id.clone()));
                DeliveryOutcome::Succeeded
            }
            NextStep::RetryAt(next) => {
                state.due.insert((next, id.clone()));
                DeliveryOutcome::Retried
            }
            NextStep::Failed => {
                state.order.remove(&(record.created_at, id.clone()));
                DeliveryOutcome::Failed
            }
        });
        state.summary_dirty = true;
        if let Some(reason) = &on_endpoint.disable {
            // The reason is this worker's to keep: the status summary writes it (one writer of the
            // dispatcher's status fields), and it stays until a user re-activates the endpoint.
            state.disabled_reason = Some(reason.clone());
            state.seen_inactive = false;
        }
        if effect.next == NextStep::Failed {
            self.tell_exhausted(&record, &result.outcome);
        }
        self.log.update(record);
        let pending = self.log.pending_count_of(&endpoint_name) as u64;
        self.state(&endpoint_name).totals.pending = pending;
        // The platform's endpoint is never disabled: its failures are logged and retried.
        if let Some(reason) = on_endpoint.disable.filter(|_| !self.is_operational()) {
            metrics.endpoint_auto_disabled();
            self.disable(&endpoint_name, reason);
        }
    }

    /// Makes the failed deliveries of `endpoint` created in `[since, until)` pending again, oldest
    /// first and at most [`crate::work::MAX_RECOVERED`], each with one more attempt; answers once
    /// they are durable.
    fn recover(
        &mut self,
        endpoint: String,
        since: Timestamp,
        until: Timestamp,
        reply: oneshot::Sender<Result<usize, SubmitError>>,
    ) {
        let now = Timestamp::now();
        let cooled = now - RECOVER_COOLDOWN;
        self.recovered_at.retain(|_, at| *at > cooled);
        let recovered_at = &self.recovered_at;
        let mut failed: Vec<DeliveryRecord> = self
            .log
            .newest_first(&endpoint, usize::MAX)
            .into_iter()
            .filter(|r| r.state == DeliveryState::Failed && r.created_at >= since && r.created_at < until)
            // Nothing to send without the payload (erased, or past its retention).
            .filter(|r| self.log.payload(&r.event_id).is_some())
            // Recovered within the cool-down: not again, or one call repeated at once would be a
            // POST amplifier toward the endpoint's URL.
            .filter(|r| !recovered_at.contains_key(&r.id))
            .cloned()
            .collect();
        failed.reverse();
        failed.truncate(crate::work::MAX_RECOVERED);
        if failed.is_empty() {
            let _ = reply.send(Ok(0));
            return;
        }
        let count = failed.len();
        for mut record in failed {
            self.recovered_at.insert(record.id.clone(), now);
            record.resend(now);
            self.unpersisted.insert(record.id.clone());
            // A fifo endpoint attempts it at its ingest place: before the ones accepted after it.
            self.state(&endpoint)
                .order
                .insert((record.created_at, record.id.clone()));
            self.log.update(record);
        }
        let pending = self.log.pending_count_of(&endpoint) as u64;
        self.state(&endpoint).totals.pending = pending;
        self.waiting.push(Ack::Recovered(count, reply));
    }

    /// Erases an event's payload (see [`DeliveryLog::erase_event`]); its pending deliveries fail
    /// with [`ERASED_ERROR`]. Answers once durable with how many deliveries carry the event.
    fn erase(&mut self, event_id: &str, reply: oneshot::Sender<Result<Option<usize>, SubmitError>>) {
        let Some(carriers) = self.log.erase_event(event_id) else {
            let _ = reply.send(Ok(None));
            return;
        };
        let now = Timestamp::now();
        for id in &carriers {
            let Some(mut record) = self.log.get(id).filter(|r| r.state == DeliveryState::Pending).cloned() else {
                continue;
            };
            let state = self.state(&record.endpoint_id);
            state
                .due
                .remove(&(record.next_attempt_at.unwrap_or(record.created_at), id.clone()));
            state.order.remove(&(record.created_at, id.clone()));
            state.totals.failed += 1;
            state.summary_dirty = true;
            self.shared.config.metrics.delivery(DeliveryOutcome::Failed);
            record.fail(ERASED_ERROR, now);
            let endpoint = record.endpoint_id.clone();
            self.log.update(record);
            let pending = self.log.pending_count_of(&endpoint) as u64;
            self.state(&endpoint).totals.pending = pending;
        }
        info!(namespace = %self.namespace, organization = %self.organization, event = event_id,
            deliveries = carriers.len(), "event payload erased");
        let ack = Ack::Erased(carriers.len(), reply);
        if self.log.has_changes() {
            self.waiting.push(ack);
        } else if let Some(newest) = self.batch_acks.keys().max().copied() {
            // Erased before, by a write still in flight: answered with it.
            self.batch_acks.entry(newest).or_default().push(ack);
        } else {
            // Erased before, and durable: nothing to write.
            ack.answer(Ok(()));
        }
    }

    /// Erases the payloads past their retention (`--payload-retention`), at most once per sweep
    /// interval; their delivery records stay.
    fn expire_payloads(&mut self) {
        let Some(retention) = self.shared.config.payload_retention else {
            return;
        };
        let now = Instant::now();
        if now < self.retention_swept_at + retention_sweep_interval(retention) {
            return;
        }
        self.retention_swept_at = now;
        let Ok(cutoff) = Timestamp::now().checked_sub(retention) else {
            return;
        };
        let expired = self.log.expired_events(cutoff);
        if expired.is_empty() {
            return;
        }
        for event_id in &expired {
            self.log.erase_event(event_id);
        }
        self.shared.config.metrics.payloads_expired(expired.len() as u64);
        debug!(namespace = %self.namespace, organization = %self.organization, events = expired.len(),
            "payloads past their retention erased");
    }

    fn retry(&mut self, endpoint: String, id: String, reply: oneshot::Sender<Result<Listed, SubmitError>>) {
        let Some(mut record) = self.log.get(&id).filter(|r| r.endpoint_id == endpoint).cloned() else {
            let _ = reply.send(Err(SubmitError::NotFound(format!("delivery {id} not found"))));
            return;
        };
        if record.state == DeliveryState::Pending {
            let _ = reply.send(Err(SubmitError::Conflict(format!("delivery {id} is still pending"))));
            return;
        }
        if self.log.payload(&record.event_id).is_none() {
            let _ = reply.send(Err(SubmitError::Conflict(format!(
                "delivery {id} cannot be sent again: its event's payload was erased"
            ))));
            return;
        }
        record.resend(Timestamp::now());
        self.state(&endpoint).order.insert((record.created_at, id.clone()));
        self.log.update(record.clone());
        let record = self.log.get(&id).cloned().unwrap_or(record);
        let payload = self.log.payload_json(&record.event_id);
        self.unpersisted.insert(id);
        let pending = self.log.pending_count_of(&endpoint) as u64;
        self.state(&endpoint).totals.pending = pending;
        self.waiting.push(Ack::Retried(Box::new((record, payload)), reply));
    }

    /// Starts log writes while there are changes and room in the pipeline: each takes every
    /// change made since the previous one (group commit).
    fn start_writes(&mut self) {
        if self.write_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.write_retry_at = None;
        // Whoever gave up waiting was answered 503 (the persist timeout): what they added is
        // not written. Not while a failed batch awaits its give-back: what it carried is not
        // back in the log yet, and would be written after all.
        if self.pipeline.has_room() && self.waiting.iter().any(Ack::abandoned) {
            let (abandoned, waiting): (Vec<Ack>, Vec<Ack>) =
                std::mem::take(&mut self.waiting).into_iter().partition(Ack::abandoned);
            self.waiting = waiting;
            self.refuse(
                abandoned,
                &SubmitError::Unavailable("timed out writing the delivery log".into()),
            );
        }
        while self.pipeline.has_room() && self.log.has_changes() {
            let writes = self.log.take_writes();
            self.names_mark
                .fetch_max(self.log.next_seq().saturating_sub(1), Ordering::Relaxed);
            let bytes = writes.bytes();
            let span = tracing::info_span!(
                target: crate::traces::TARGET,
                "log write",
                otel.name = "delivery log write",
                capy.organization.id = %self.organization,
                capy.log.records = tracing::field::Empty,
                capy.log.bytes = bytes,
            );
            if !span.is_disabled() {
                span.record("capy.log.records", writes.record_ids().count() as u64);
            }
            self.shared.config.budget.charge(bytes);
            self.shared
                .config
                .metrics
                .apiserver_write_bytes(WriteKind::ConfigMap, bytes);
            let started = self.pipeline.push(writes);
            self.batch_acks.insert(started.id, std::mem::take(&mut self.waiting));
            if started.creates.is_empty() {
                // Only deletes: nothing new to make durable.
                self.answer_batch(started.id, Ok(()));
            } else {
                self.send(started.id, started.creates, span, |batch, result| Msg::CreatesDone {
                    batch,
                    result,
                });
            }
        }
        self.start_deletes();
    }

    /// Sends writes of a batch in a task of their own; `done` makes the report.
    fn send(
        &mut self,
        batch: u64,
        mut writes: Vec<SegmentWrite>,
        span: tracing::Span,
        done: fn(u64, Result<usize, kube::Error>) -> Msg,
    ) {
        if !self.fence.is_open() {
            // Not one write once the fence closed: the batch fails (its callers get 503) and the
            // run loop stops the worker.
            let tx = self.tx.clone();
            self.tasks.spawn(async move {
                let closed = kube::Error::Service("the shard's fence closed".into());
                let _ = tx.send(done(batch, Err(closed))).await;
            });
            return;
        }
        let client = self.shared.client.clone();
        let namespace = self.namespace.clone();
        let tx = self.tx.clone();
        // Every segment carries the operator's MAC: only signed segments are read back.
        for write in &mut writes {
            if let SegmentWrite::Create(cm) = write {
                cm.metadata.namespace = Some(namespace.clone());
                self.shared.log_key.sign(cm);
            }
        }
        let fence = self.fence.clone();
        let key = self.shared.log_key.clone();
        self.tasks.spawn(async move {
            // A write still running when the fence closes is abandoned (a margin before anyone
            // else may take the shard).
            let write = crate::delivery_log::apply_writes(&client, &namespace, &key, &writes).instrument(span);
            let result = tokio::select! {
                result = write => result,
                () = fence.closed() => Err(kube::Error::Service("the shard's fence closed during the write".into())),
            };
            let _ = tx.send(done(batch, result)).await;
        });
    }

    /// Sends the next batch's deletes when it is their turn.
    fn start_deletes(&mut self) {
        if let Some((batch, deletes)) = self.pipeline.next_deletes() {
            self.send(batch, deletes, tracing::Span::none(), |batch, result| {
                Msg::DeletesDone { batch, result }
            });
        }
    }

    fn answer_batch(&mut self, batch: u64, result: Result<(), SubmitError>) {
        for ack in self.batch_acks.remove(&batch).unwrap_or_default() {
            ack.answer(result.clone());
        }
    }

    /// A batch's creates are applied (its entries are durable: attempt the new deliveries,
    /// answer those waiting) or failed (tell those waiting; the batch is written again).
    fn creates_done(&mut self, batch: u64, result: Result<usize, kube::Error>) {
        let metrics = self.shared.config.metrics.clone();
        match result {
            Ok(calls) => {
                metrics.apiserver_writes(WriteKind::ConfigMap, calls as u64);
                let ids = self.pipeline.creates_done(batch, true);
                metrics.log_write(ids.len());
                self.stored(ids);
                self.answer_batch(batch, Ok(()));
                self.write_failures = 0;
            }
            Err(e) => {
                self.pipeline.creates_done(batch, false);
                let acks = self.batch_acks.remove(&batch).unwrap_or_default();
                if let Some(name) = crate::delivery_log::foreign_segment_name(&e) {
                    // Not a second writer: the batch is written again under the next name, and
                    // the object holding this one is never deleted as if it were a segment.
                    // Those waiting wait for that write (at once), not for a 503.
                    self.foreign_names.push(name.to_string());
                    self.waiting.splice(0..0, acks);
                } else {
                    self.write_failed = true;
                    self.refused.extend(acks);
                }
                if crate::delivery_log::is_name_taken(&e) {
                    // A second writer: the name was taken by a segment this worker did not write.
                    // This worker stops; the shard's logs are read back again (if it is still
                    // held), never merged into.
                    warn!(organization = %self.organization, shard = self.shard,
                        "a second writer of this log was detected; reading the shard's logs back");
                    metrics.log_second_writer();
                    let _ = self.shared.reload.send(self.shard);
                }
                warn!(organization = %self.organization, error = %e, "delivery log write failed; will retry");
            }
        }
        self.after_write();
    }

    fn deletes_done(&mut self, batch: u64, result: Result<usize, kube::Error>) {
        match result {
            Ok(calls) => {
                self.shared
                    .config
                    .metrics
                    .apiserver_writes(WriteKind::ConfigMap, calls as u64);
                let deleted = self.pipeline.deletes_done(batch, true);
                self.log.confirm_deleted(&deleted);
            }
            Err(e) => {
                self.write_failed = true;
                warn!(organization = %self.organization, error = %e,
                    "deleting old delivery-log segments failed; will retry");
                self.pipeline.deletes_done(batch, false);
            }
        }
        self.after_write();
    }

    /// Next deletes, or, after a failure once every write has reported, the batches given back to
    /// the log and a pause before writing again.
    fn after_write(&mut self) {
        self.start_deletes();
        if self.pipeline.settle(&mut self.log) {
            for name in std::mem::take(&mut self.foreign_names) {
                self.log.forget_segment(&name);
            }
            // The failed batches are back in the log, their deliveries unwritten again: those
            // answered 503 now are taken out before the next write. (Should a failed create have
            // landed after all, its segment holds nothing live any more and is deleted.)
            let refused = std::mem::take(&mut self.refused);
            self.refuse(
                refused,
                &SubmitError::Unavailable("the delivery log cannot be written".into()),
            );
            if !std::mem::take(&mut self.write_failed) {
                // Only names held by foreign objects: the next names are free, write at once.
                self.write_retry_at = Some(Instant::now());
                return;
            }
            self.write_failures += 1;
            let backoff = crate::backoff::doubling(self.write_failures, Duration::from_secs(1), LOG_WRITE_RETRY_MAX);
            warn!(organization = %self.organization, ?backoff, "delivery log writes given back; retrying");
            self.write_retry_at = Some(Instant::now() + backoff);
        }
    }

    /// Entries of a log write are durable: attempt the new deliveries.
    fn stored(&mut self, ids: Vec<String>) {
        for id in ids {
            if !self.unpersisted.remove(&id) {
                continue;
            }
            let Some(r) = self.log.get(&id).filter(|r| r.state == DeliveryState::Pending) else {
                continue;
            };
            let (endpoint, at, created) = (
                r.endpoint_id.clone(),
                r.next_attempt_at.unwrap_or(r.created_at),
                r.created_at,
            );
            let state = self.state(&endpoint);
            state.due.insert((at, id.clone()));
            state.order.insert((created, id));
        }
    }

    /// A delivery failed its last attempt: the platform is told (`delivery.exhausted`), once,
    /// by this worker, the one that decides the delivery's outcome. Its ids and class only.
    fn tell_exhausted(&self, record: &DeliveryRecord, outcome: &AttemptOutcome) {
        if self.shared.operational.is_none() || self.is_operational() {
            return;
        }
        let event = OperationalEvent::exhausted(
            Timestamp::now(),
            &Exhausted {
                organization_id: &record.organization_id,
                endpoint_id: &record.endpoint_id,
                event_id: &record.event_id,
                event_type: &record.event_type,
                delivery_id: &record.id,
                attempts: record.attempts,
                last_error_class: outcome.metric_label(),
                last_status: outcome.status(),
            },
        );
        info!(namespace = %self.namespace, endpoint = %record.endpoint_id, delivery = %record.id,
            event = %event.event_id, "delivery exhausted: telling the platform");
        tokio::spawn(self.shared.clone().emit(event));
    }

    fn disable(&self, endpoint: &str, reason: String) {
        // The platform is told why (`endpoint.disabled`, by the controller): the annotation names
        // the generation this patch makes, so a later pause by a user is not taken for this one.
        let generation = self.endpoint(endpoint).and_then(|e| e.metadata.generation).unwrap_or(0) + 1;
        let annotation = AutoDisabled {
            generation,
            reason: reason.clone(),
        }
        .to_annotation();
        let shared = self.shared.clone();
        let (namespace, name) = (self.namespace.clone(), endpoint.to_string());
        warn!(%namespace, endpoint = %name, %reason, "disabling endpoint");
        tokio::spawn(async move {
            let api: Api<WebhookEndpoint> = Api::namespaced(shared.client.clone(), &namespace);
            let params = PatchParams {
                field_manager: Some(super::FIELD_MANAGER.into()),
                ..Default::default()
            };
            if let Err(e) = api
                .patch(
                    &name,
                    &params,
                    &Patch::Merge(json!({
                        "metadata": {"annotations": {AUTO_DISABLED_ANNOTATION: annotation}},
                        "spec": {"active": false},
                    })),
                )
                .await
            {
                warn!(endpoint = %name, error = %e, "could not disable endpoint");
                return;
            }
            shared.config.metrics.apiserver_writes(WriteKind::Endpoint, 1);
            if let Ok(ep) = api.get(&name).await {
                let event = EventNote {
                    warning: true,
                    reason: "EndpointDisabled",
                    action: "Disable",
                    note: format!("deliveries paused: {reason}; set spec.active to true to resume"),
                };
                publish_event(&shared.recorder, &shared.config.metrics, &ep.object_ref(&()), &event).await;
            }
        });
    }

    /// Starts a status summary write for every endpoint whose summary changed, at most once per
    /// summary interval each, in tasks of their own.
    fn start_summaries(&mut self) {
        let interval = self.shared.config.summary_interval;
        let names: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, s)| {
                s.summary_dirty && !s.summary_in_flight && s.summary_written_at.is_none_or(|t| t.elapsed() >= interval)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            self.start_summary(&name);
        }
    }

    fn start_summary(&mut self, name: &str) {
        let endpoint = self.endpoint(name);
        let state = self.endpoints.get_mut(name).expect("a listed endpoint");
        state.summary_dirty = false;
        // The platform's endpoint has no status to write.
        let Some(endpoint) = endpoint.filter(|_| self.organization != OPERATIONAL_ORGANIZATION) else {
            return;
        };
        let now = Timestamp::now();
        let health = health(endpoint.spec.active, &state.window);
        let reason = disabled_reason(
            endpoint.spec.active,
            state.seen_inactive,
            state.disabled_reason.as_deref(),
            endpoint.status.as_ref().and_then(|s| s.disabled_reason.as_deref()),
        );
        state.seen_inactive = reason.seen_inactive;
        state.disabled_reason = reason.kept;
        let disabled_reason = reason.shown;
        let want = DispatchSummary {
            health,
            deliveries: state.totals.clone(),
            disabled_reason: disabled_reason.clone(),
        };
        state.summary_written_at = Some(Instant::now());
        let Some(patch) = status_patch(endpoint.status.as_ref(), &want, now) else {
            return;
        };
        state.summary_in_flight = true;
        let transition = transition_event(state.last_health, health);
        let from = state.last_health;
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        let (namespace, name) = (self.namespace.clone(), name.to_string());
        self.tasks.spawn(async move {
            let api: Api<WebhookEndpoint> = Api::namespaced(shared.client.clone(), &namespace);
            let bytes = serde_json::to_vec(&patch).map_or(0, |v| v.len() as u64);
            shared.config.budget.charge(bytes);
            shared
                .config
                .metrics
                .apiserver_write_bytes(WriteKind::EndpointStatus, bytes);
            let result = api
                .patch_status(
                    &name,
                    &PatchParams::apply(super::FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await;
            let written = match result {
                Ok(_) => {
                    shared.config.metrics.apiserver_writes(WriteKind::EndpointStatus, 1);
                    if let Some((warning, reason, note)) = transition {
                        info!(endpoint = %name, from = from.as_str(), to = health.as_str(), "health changed");
                        let event = EventNote {
                            warning,
                            reason,
                            action: "Deliver",
                            note,
                        };
                        publish_event(
                            &shared.recorder,
                            &shared.config.metrics,
                            &endpoint.object_ref(&()),
                            &event,
                        )
                        .await;
                    }
                    Some((health, disabled_reason))
                }
                Err(e) => {
                    warn!(endpoint = %name, error = %e, "could not write the status summary");
                    None
                }
            };
            let _ = tx
                .send(Msg::SummaryDone {
                    endpoint: name,
                    written,
                })
                .await;
        });
    }

    fn summary_done(&mut self, endpoint: String, written: Option<(Health, Option<String>)>) {
        let Some(state) = self.endpoints.get_mut(&endpoint) else {
            return;
        };
        state.summary_in_flight = false;
        match written {
            Some((health, disabled_reason)) => {
                state.last_health = health;
                state.disabled_reason = disabled_reason;
            }
            None => state.summary_dirty = true,
        }
    }
}

/// What a `fifo` lane finds of its pending delivery `id`: in flight or not durable yet holds the
/// queue; otherwise when it is due.
fn queued<'a>(
    log: &'a DeliveryLog,
    in_flight: &'a HashSet<String>,
    unpersisted: &'a HashSet<String>,
) -> impl Fn(&str) -> Queued + 'a {
    move |id| match log.get(id) {
        Some(r) if r.state == DeliveryState::Pending => {
            if in_flight.contains(id) || unpersisted.contains(id) {
                Queued::Busy
            } else if log.payload(&r.event_id).is_none() {
                Queued::PayloadLost
            } else {
                Queued::Due(r.next_attempt_at.unwrap_or(r.created_at))
            }
        }
        _ => Queued::Gone,
    }
}

/// How often payloads past `retention` are looked for: a minute, or half the retention if that is
/// shorter (a short retention is a test's, or a policy that wants payloads gone soon).
fn retention_sweep_interval(retention: Duration) -> Duration {
    (retention / 2).clamp(Duration::from_millis(100), RETENTION_SWEEP_MAX)
}
