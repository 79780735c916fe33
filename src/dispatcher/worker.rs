//! One endpoint's worker: the single writer of its delivery log and the owner of its schedule.
//!
//! Group commit: while one log write is in flight, every change that arrives is collected and
//! goes out in the next write, so under load each API write carries many records. A new
//! delivery is attempted only once its pending record is durable, and ingest is acknowledged at
//! the same moment.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::status::{DispatchSummary, status_patch, transition_event};
use super::{DISPATCHER_FIELD_MANAGER, Shared, SubmitError};
use crate::delivery::health::{HealthWindow, health, should_auto_disable};
use crate::delivery::outcome::{AttemptOutcome, is_retryable};
use crate::delivery::schedule::next_attempt_delay;
use crate::delivery::sender::AttemptResult;
use crate::delivery_log::{DeliveryRecord, DeliveryState, EndpointLog, PendingWrites};
use crate::resources::{DeliverySummary, Health, WebhookEndpoint};
use crate::telemetry::{DeliveryOutcome, WriteKind};

/// Messages a worker handles.
pub(crate) enum Msg {
    /// New deliveries; `ack` answers once they are durable.
    Enqueue {
        records: Vec<DeliveryRecord>,
        ack: oneshot::Sender<Result<(), SubmitError>>,
    },
    /// An attempt finished.
    AttemptDone {
        id: String,
        result: AttemptResult,
        at: Timestamp,
    },
    /// The creates of a log write were applied: its records are durable.
    Stored { ids: Vec<String>, acks: Vec<Ack> },
    /// A log write finished. `acks` are those not answered by [`Msg::Stored`] (the creates failed).
    WriteDone {
        writes: PendingWrites,
        acks: Vec<Ack>,
        result: Result<usize, WriteFailure>,
    },
    /// Send a finished delivery again.
    Retry {
        id: String,
        reply: oneshot::Sender<Result<DeliveryRecord, SubmitError>>,
    },
    /// The endpoint changed (say, re-activated): look again.
    Wake,
}

/// Why a log write failed.
pub(crate) enum WriteFailure {
    /// A create failed: nothing of the batch is known to be durable.
    Creates(kube::Error),
    /// The creates were applied (and acknowledged), a delete failed.
    Deletes(kube::Error),
}

/// Someone waiting for the next durable write.
pub(crate) enum Ack {
    Enqueued(oneshot::Sender<Result<(), SubmitError>>),
    Retried(
        Box<DeliveryRecord>,
        oneshot::Sender<Result<DeliveryRecord, SubmitError>>,
    ),
}

impl Ack {
    fn answer(self, result: Result<(), SubmitError>) {
        match self {
            Ack::Enqueued(tx) => {
                let _ = tx.send(result);
            }
            Ack::Retried(record, tx) => {
                let _ = tx.send(result.map(|()| *record));
            }
        }
    }
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    namespace: String,
    name: String,
    log: EndpointLog,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    /// Durable pending deliveries by due time.
    due: BTreeSet<(Timestamp, String)>,
    /// New deliveries whose pending record is not durable yet.
    unpersisted: HashSet<String>,
    in_flight: HashSet<String>,
    waiting: Vec<Ack>,
    write_in_flight: bool,
    write_retry_at: Option<Instant>,
    write_failures: u32,
    window: HealthWindow,
    totals: DeliverySummary,
    last_health: Health,
    disabled_reason: Option<String>,
    /// Whether the endpoint was seen inactive since this worker last disabled it.
    seen_inactive: bool,
    summary_dirty: bool,
    summary_written_at: Option<Instant>,
    /// This worker's share of the pending-deliveries gauge.
    reported_pending: i64,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        endpoint: &WebhookEndpoint,
        log: EndpointLog,
        tx: mpsc::Sender<Msg>,
        rx: mpsc::Receiver<Msg>,
    ) -> Self {
        let status = endpoint.status.clone().unwrap_or_default();
        let due = log
            .pending()
            .map(|r| (r.next_attempt_at.unwrap_or(r.created_at), r.id.clone()))
            .collect::<BTreeSet<_>>();
        let mut totals = status.deliveries.clone().unwrap_or_default();
        totals.pending = log.pending_count() as u64;
        Self {
            namespace: endpoint.namespace().unwrap_or_default(),
            name: endpoint.name_any(),
            shared,
            log,
            tx,
            rx,
            due,
            unpersisted: HashSet::new(),
            in_flight: HashSet::new(),
            waiting: Vec::new(),
            write_in_flight: false,
            write_retry_at: None,
            write_failures: 0,
            window: HealthWindow::default(),
            totals,
            last_health: status.health.unwrap_or_default(),
            disabled_reason: status.disabled_reason,
            seen_inactive: !endpoint.spec.active,
            summary_dirty: false,
            summary_written_at: None,
            reported_pending: 0,
        }
    }

    fn endpoint(&self) -> Option<Arc<WebhookEndpoint>> {
        self.shared.endpoints.get(&self.namespace, &self.name)
    }

    pub(crate) async fn run(mut self) {
        let mut stopping = self.shared.stopping.clone();
        let mut grace_deadline: Option<Instant> = None;
        loop {
            self.report_pending();
            let is_stopping = *stopping.borrow();
            if is_stopping && grace_deadline.is_none() {
                grace_deadline = Some(Instant::now() + self.shared.config.shutdown_grace);
            }
            if !is_stopping {
                self.start_due_attempts();
            }
            self.start_write();
            self.write_summary().await;
            if is_stopping {
                let drained = self.in_flight.is_empty() && !self.write_in_flight && !self.log.has_changes();
                if drained || grace_deadline.is_some_and(|d| Instant::now() >= d) {
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
        for ack in self.waiting.drain(..) {
            ack.answer(Err(SubmitError::Unavailable("the dispatcher is shutting down".into())));
        }
        // A stopped worker no longer dispatches its pending deliveries: take them off the gauge.
        self.shared.config.metrics.pending_changed(-self.reported_pending);
        self.reported_pending = 0;
        debug!(endpoint = %self.name, "worker stopped");
    }

    /// Moves the pending-deliveries gauge by what changed since the last report.
    fn report_pending(&mut self) {
        let pending = self.log.pending_count() as i64;
        self.shared
            .config
            .metrics
            .pending_changed(pending - self.reported_pending);
        self.reported_pending = pending;
    }

    fn next_wake(&self, stopping: bool, grace_deadline: Option<Instant>) -> Instant {
        let now_ts = Timestamp::now();
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(60);
        if !stopping
            && self.in_flight.len() < self.shared.config.per_endpoint_concurrency
            && let Some((at, _)) = self.due.first()
        {
            let wait = now_ts.duration_until(*at).unsigned_abs();
            wake = wake.min(if *at <= now_ts { now } else { now + wait });
        }
        if let Some(at) = self.write_retry_at {
            wake = wake.min(at);
        }
        if self.summary_dirty {
            let at = self
                .summary_written_at
                .map_or(now, |t| t + self.shared.config.summary_interval);
            wake = wake.min(at);
        }
        if let Some(d) = grace_deadline {
            wake = wake.min(d);
        }
        wake
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Enqueue { records, ack } => {
                for record in records {
                    let id = record.id.clone();
                    if let Err(e) = self.log.insert(record) {
                        let _ = ack.send(Err(SubmitError::Unavailable(e.to_string())));
                        return;
                    }
                    self.unpersisted.insert(id);
                }
                self.totals.pending = self.log.pending_count() as u64;
                self.waiting.push(Ack::Enqueued(ack));
            }
            Msg::AttemptDone { id, result, at } => self.attempt_done(id, result, at),
            Msg::Stored { ids, acks } => self.stored(ids, acks),
            Msg::WriteDone { writes, acks, result } => self.write_done(writes, acks, result),
            Msg::Retry { id, reply } => self.retry(id, reply),
            Msg::Wake => {}
        }
    }

    fn start_due_attempts(&mut self) {
        let Some(endpoint) = self.endpoint() else { return };
        if !endpoint.spec.active {
            return;
        }
        let now = Timestamp::now();
        while self.in_flight.len() < self.shared.config.per_endpoint_concurrency {
            let Some((at, id)) = self.due.first().cloned() else {
                break;
            };
            if at > now {
                break;
            }
            self.due.pop_first();
            let Some(record) = self.log.get(&id).filter(|r| r.state == DeliveryState::Pending) else {
                continue;
            };
            let Some(ring) = self.shared.keys.ring(&self.namespace, &self.name) else {
                // The controller has not written (or is repairing) the secret: try again shortly,
                // without spending an attempt.
                self.due.insert((now + Duration::from_secs(2), id));
                break;
            };
            let body = serde_json::to_vec(&record.payload).expect("JSON values serialize");
            let url = endpoint.spec.url.clone();
            let shared = self.shared.clone();
            let tx = self.tx.clone();
            self.in_flight.insert(id.clone());
            tokio::spawn(async move {
                let at = Timestamp::now();
                let result = shared.sender.send(&url, &id, &body, &ring, at).await;
                let _ = tx
                    .send(Msg::AttemptDone {
                        id,
                        result,
                        at: Timestamp::now(),
                    })
                    .await;
            });
        }
    }

    fn attempt_done(&mut self, id: String, result: AttemptResult, at: Timestamp) {
        self.in_flight.remove(&id);
        let Some(mut record) = self.log.get(&id).cloned() else {
            return;
        };
        let endpoint = self.endpoint();
        let metrics = &self.shared.config.metrics;
        metrics.attempt(result.outcome.metric_label(), result.duration);
        record.attempts += 1;
        record.updated_at = at;
        record.response_status = result.outcome.status();
        let success = result.outcome.is_success();
        let mut disable: Option<String> = None;
        if success {
            record.state = DeliveryState::Succeeded;
            record.delivered_at = Some(at);
            record.next_attempt_at = None;
            record.last_error = None;
            self.totals.succeeded += 1;
            metrics.delivery(DeliveryOutcome::Succeeded);
            self.totals.consecutive_failures = 0;
            self.totals.last_success_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        } else {
            record.last_error = Some(describe(&result));
            self.totals.consecutive_failures += 1;
            self.totals.last_failure_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
            let override_max = Some(record.max_attempts);
            let delay = is_retryable(&result.outcome)
                .then(|| {
                    next_attempt_delay(
                        &self.shared.config.schedule,
                        record.attempts,
                        override_max,
                        result.outcome.retry_after(),
                        rand::random::<f64>(),
                    )
                })
                .flatten();
            match delay {
                Some(delay) => {
                    let next = at.checked_add(delay).unwrap_or(at);
                    record.next_attempt_at = Some(next);
                    self.due.insert((next, id.clone()));
                    metrics.delivery(DeliveryOutcome::Retried);
                }
                None => {
                    record.state = DeliveryState::Failed;
                    record.next_attempt_at = None;
                    self.totals.failed += 1;
                    metrics.delivery(DeliveryOutcome::Failed);
                }
            }
            if matches!(result.outcome, AttemptOutcome::Gone) {
                disable = Some("the receiver answered 410 Gone".into());
            }
        }
        self.window.record(at, success);
        if !success && disable.is_none() && should_auto_disable(&self.window, at, self.shared.config.auto_disable_after)
        {
            let since = self
                .window
                .first_failure_of_current_streak()
                .map(|t| t.to_string())
                .unwrap_or_default();
            disable = Some(format!("every delivery attempt failed since {since}"));
        }
        self.log.update(record);
        self.totals.pending = self.log.pending_count() as u64;
        self.summary_dirty = true;
        if let Some(reason) = disable
            && endpoint.is_some_and(|e| e.spec.active)
        {
            // The reason is this worker's to keep: the status summary writes it (one writer of the
            // dispatcher's status fields), and it stays until a user re-activates the endpoint.
            self.disabled_reason = Some(reason.clone());
            self.seen_inactive = false;
            self.disable(reason);
        }
    }

    fn retry(&mut self, id: String, reply: oneshot::Sender<Result<DeliveryRecord, SubmitError>>) {
        let Some(mut record) = self.log.get(&id).cloned() else {
            let _ = reply.send(Err(SubmitError::NotFound(format!("delivery {id} not found"))));
            return;
        };
        if record.state == DeliveryState::Pending {
            let _ = reply.send(Err(SubmitError::Conflict(format!("delivery {id} is still pending"))));
            return;
        }
        let now = Timestamp::now();
        record.state = DeliveryState::Pending;
        record.max_attempts = record.attempts + 1;
        record.next_attempt_at = Some(now);
        record.updated_at = now;
        self.log.update(record.clone());
        self.unpersisted.insert(id);
        self.totals.pending = self.log.pending_count() as u64;
        self.waiting.push(Ack::Retried(Box::new(record), reply));
    }

    fn start_write(&mut self) {
        if self.write_in_flight || !self.log.has_changes() || self.write_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.write_retry_at = None;
        let writes = self.log.take_writes();
        let acks = std::mem::take(&mut self.waiting);
        let client = self.shared.client.clone();
        let namespace = self.namespace.clone();
        let tx = self.tx.clone();
        self.write_in_flight = true;
        tokio::spawn(async move {
            use crate::delivery_log::apply_writes;
            // Acknowledge (and start attempting) as soon as the creates are in: the deletes only
            // collect segments that no longer hold a live record.
            let creates = match apply_writes(&client, &namespace, writes.creates()).await {
                Ok(calls) => calls,
                Err(e) => {
                    let result = Err(WriteFailure::Creates(e));
                    let _ = tx.send(Msg::WriteDone { writes, acks, result }).await;
                    return;
                }
            };
            let ids = writes.record_ids().map(str::to_string).collect();
            let _ = tx.send(Msg::Stored { ids, acks }).await;
            let result = apply_writes(&client, &namespace, writes.deletes())
                .await
                .map(|deletes| creates + deletes)
                .map_err(WriteFailure::Deletes);
            let _ = tx
                .send(Msg::WriteDone {
                    writes,
                    acks: Vec::new(),
                    result,
                })
                .await;
        });
    }

    /// The records of a log write are durable: attempt the new ones, answer those waiting.
    fn stored(&mut self, ids: Vec<String>, acks: Vec<Ack>) {
        self.shared.config.metrics.log_write(ids.len());
        for id in ids {
            if self.unpersisted.remove(&id)
                && let Some(r) = self.log.get(&id).filter(|r| r.state == DeliveryState::Pending)
            {
                self.due
                    .insert((r.next_attempt_at.unwrap_or(r.created_at), r.id.clone()));
            }
        }
        for ack in acks {
            ack.answer(Ok(()));
        }
    }

    fn write_done(&mut self, writes: PendingWrites, acks: Vec<Ack>, result: Result<usize, WriteFailure>) {
        self.write_in_flight = false;
        let metrics = &self.shared.config.metrics;
        match result {
            Ok(calls) => {
                metrics.apiserver_writes(WriteKind::ConfigMap, calls as u64);
                self.write_failures = 0;
            }
            Err(failure) => {
                self.write_failures += 1;
                let backoff = crate::controller::retry_delay(self.write_failures).min(Duration::from_secs(30));
                match failure {
                    WriteFailure::Creates(e) => {
                        warn!(endpoint = %self.name, error = %e, ?backoff, "delivery log write failed; will retry");
                        self.log.restore(writes);
                    }
                    WriteFailure::Deletes(e) => {
                        metrics.apiserver_writes(WriteKind::ConfigMap, writes.creates().len() as u64);
                        warn!(endpoint = %self.name, error = %e, ?backoff,
                            "deleting old delivery-log segments failed; will retry");
                        self.log.restore(writes.without_creates());
                    }
                }
                self.write_retry_at = Some(Instant::now() + backoff);
                // Those waiting are told now; what they submitted stays queued and is written on
                // the retry, so at worst it is delivered although the caller saw 503 (at least once).
                for ack in acks {
                    ack.answer(Err(SubmitError::Unavailable(
                        "the delivery log cannot be written".into(),
                    )));
                }
            }
        }
    }

    fn disable(&self, reason: String) {
        let shared = self.shared.clone();
        let (namespace, name) = (self.namespace.clone(), self.name.clone());
        warn!(%namespace, endpoint = %name, %reason, "disabling endpoint");
        tokio::spawn(async move {
            let api: Api<WebhookEndpoint> = Api::namespaced(shared.client.clone(), &namespace);
            let params = PatchParams {
                field_manager: Some(DISPATCHER_FIELD_MANAGER.into()),
                ..Default::default()
            };
            if let Err(e) = api
                .patch(&name, &params, &Patch::Merge(json!({"spec": {"active": false}})))
                .await
            {
                warn!(endpoint = %name, error = %e, "could not disable endpoint");
                return;
            }
            shared.config.metrics.apiserver_writes(WriteKind::Endpoint, 1);
            if let Ok(ep) = api.get(&name).await {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "EndpointDisabled".into(),
                    note: Some(format!("deliveries paused: {reason}; set is_active to true to resume")),
                    action: "Disable".into(),
                    secondary: None,
                };
                if shared.recorder.publish(&event, &ep.object_ref(&())).await.is_ok() {
                    shared.config.metrics.apiserver_writes(WriteKind::Event, 1);
                }
            }
        });
    }

    /// Writes the status summary when it changed, at most once per summary interval.
    async fn write_summary(&mut self) {
        if !self.summary_dirty {
            return;
        }
        if self
            .summary_written_at
            .is_some_and(|t| t.elapsed() < self.shared.config.summary_interval)
        {
            return;
        }
        let Some(endpoint) = self.endpoint() else {
            self.summary_dirty = false;
            return;
        };
        let now = Timestamp::now();
        let health = health(endpoint.spec.active, &self.window);
        if !endpoint.spec.active {
            self.seen_inactive = true;
        } else if self.seen_inactive {
            // Active again after being seen inactive: a user re-activated it.
            self.disabled_reason = None;
        }
        let disabled_reason = if endpoint.spec.active && self.disabled_reason.is_none() {
            None
        } else {
            self.disabled_reason
                .clone()
                .or_else(|| endpoint.status.as_ref().and_then(|s| s.disabled_reason.clone()))
        };
        let want = DispatchSummary {
            health,
            deliveries: self.totals.clone(),
            disabled_reason: disabled_reason.clone(),
        };
        self.summary_dirty = false;
        self.summary_written_at = Some(Instant::now());
        let Some(patch) = status_patch(endpoint.status.as_ref(), &want, now) else {
            return;
        };
        let api: Api<WebhookEndpoint> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        if let Err(e) = api
            .patch_status(
                &self.name,
                &PatchParams::apply(DISPATCHER_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            warn!(endpoint = %self.name, error = %e, "could not write the status summary");
            self.summary_dirty = true;
            return;
        }
        self.shared
            .config
            .metrics
            .apiserver_writes(WriteKind::EndpointStatus, 1);
        self.disabled_reason = disabled_reason;
        if let Some((warning, reason, note)) = transition_event(self.last_health, health) {
            info!(endpoint = %self.name, from = self.last_health.as_str(), to = health.as_str(), "health changed");
            let event = Event {
                type_: if warning { EventType::Warning } else { EventType::Normal },
                reason: reason.into(),
                note: Some(note),
                action: "Deliver".into(),
                secondary: None,
            };
            if self
                .shared
                .recorder
                .publish(&event, &endpoint.object_ref(&()))
                .await
                .is_ok()
            {
                self.shared.config.metrics.apiserver_writes(WriteKind::Event, 1);
            }
        }
        self.last_health = health;
    }
}

/// `last_error` text for a failed attempt: what happened, and the start of the response body.
fn describe(result: &AttemptResult) -> String {
    let what = match &result.outcome {
        AttemptOutcome::HttpFailure { status, .. } => format!("HTTP {status}"),
        AttemptOutcome::Gone => "HTTP 410 Gone".to_string(),
        AttemptOutcome::Timeout => "timed out".to_string(),
        AttemptOutcome::ConnectError(e) => format!("connection failed: {e}"),
        AttemptOutcome::Refused(e) => format!("refused: {e}"),
        AttemptOutcome::Success { status } => format!("HTTP {status}"),
    };
    match result.response_excerpt.as_deref().filter(|s| !s.is_empty()) {
        Some(body) => format!("{what}: {body}"),
        None => what,
    }
}
