//! Logging set-up, Prometheus metrics and readiness. Log lines never carry secrets or tokens:
//! the types that hold them redact themselves in `Debug`, and handlers log ids, not bodies.
//!
//! [`Metrics`] holds one `prometheus_client` registry with every metric family of the operator;
//! components get a clone (cheap: an `Arc`). [`Readiness`] is the registry behind `/readyz`:
//! each started component registers a name and flips it ready once it serves.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tracing_subscriber::{EnvFilter, fmt as log_fmt, prelude::*};

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter (`info`). With a
/// `tracer` (tracing is on), spans of the target [`crate::traces::TARGET`] also go to it, and only
/// those; log lines never show them, so turning traces on does not change the logs.
pub fn init(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(
            format!("{}=off", crate::traces::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let logs = match format {
        LogFormat::Text => log_fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => log_fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    match tracer {
        // No layer listens to the spans' target: their callsites are disabled once and for all.
        None => registry.init(),
        Some(tracer) => {
            let spans =
                tracing_subscriber::filter::Targets::new().with_target(crate::traces::TARGET, tracing::Level::TRACE);
            // Only the attributes each span sets itself: the layer's defaults add source location,
            // thread and target to every span, time every poll of an instrumented future for
            // busy/idle attributes, and make each poll activate an OpenTelemetry context. At an
            // attempt span per delivery that is work per delivery for attributes no one asked
            // for (`make bench`, row "traces on"). Without activation, parents are found through
            // the tracing spans, and nothing here reads an activated context (`crate::traces`
            // reads the tracing span's).
            let layer = tracing_opentelemetry::layer()
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_context_activation(false)
                .with_tracer(tracer);
            registry.with(layer.with_filter(spans)).init()
        }
    }
}

/// Prefix of every metric name.
pub const METRIC_PREFIX: &str = "capy_webhooks";
/// Content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a delivery ended (or that it will be attempted again): the `outcome` label of
/// `capy_webhooks_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Delivered (a 2xx).
    Succeeded,
    /// Given up: attempts used up, 410 Gone, or refused by the SSRF guard.
    Failed,
    /// An attempt failed and another one is scheduled.
    Retried,
}

impl DeliveryOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Succeeded => "succeeded",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::Retried => "retried",
        }
    }
}

/// What the operator wrote to the API server: the `kind` label of
/// `capy_webhooks_apiserver_writes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A signing Secret.
    Secret,
    /// The status subresource of a WebhookEndpoint.
    EndpointStatus,
    /// A WebhookEndpoint itself (create, spec or label patch, delete).
    Endpoint,
    /// A delivery-log ConfigMap.
    ConfigMap,
    /// An Event (created or patched into a series by the recorder).
    Event,
}

impl WriteKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Secret => "secret",
            WriteKind::EndpointStatus => "endpoint_status",
            WriteKind::Endpoint => "endpoint",
            WriteKind::ConfigMap => "configmap",
            WriteKind::Event => "event",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    component: &'static str,
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    component: &'static str,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Builds the per-route latency histograms of a family.
#[derive(Clone, Copy)]
struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(LATENCY_BUCKETS)
    }
}

/// Seconds: from 5 ms to 30 s (create and rotate-secret wait for the controller up to 10 s).
const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Reasons of `capy_webhooks_filter_errors_total`: those of
/// [`crate::delivery::filter::EvalError::label`], and `invalid` for a filter that does not compile.
pub const FILTER_ERROR_REASONS: [&str; 5] = ["missing_field", "type", "not_bool", "other", "invalid"];

struct Inner {
    registry: Registry,
    reconciles: Counter,
    reconcile_duration: Histogram,
    reconcile_errors: Family<ReasonLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram, LatencyBuckets>,
    deliveries: Family<OutcomeLabels, Counter>,
    attempts: Family<ResultLabels, Counter>,
    attempt_duration: Histogram,
    pending: Gauge,
    log_batch_records: Histogram,
    log_writes: Counter,
    apiserver_writes: Family<KindLabels, Counter>,
    apiserver_write_bytes: Family<KindLabels, Counter>,
    log_write_budget: Gauge,
    ingest_throttled: Counter,
    events_outside_catalog: Counter,
    log_segments_rejected: Counter,
    log_second_writers: Counter,
    backlog_overflows: Counter,
    payloads_expired: Counter,
    controller_leader: Gauge,
    owned_shards: Gauge,
    shard_handovers: Counter,
    ready: Gauge,
    shards_unowned: Gauge,
    first_attempt_delay: Histogram,
    endpoints_auto_disabled: Counter,
    filter_errors: Family<ReasonLabels, Counter>,
    oldest_pending_age: Gauge,
    /// Per dispatcher worker ([`DueSlot`]): when its longest-waiting due attempt became due, in
    /// Unix milliseconds. Read at scrape into `oldest_pending_age`.
    due_slots: Mutex<HashMap<u64, i64>>,
    next_due_slot: AtomicU64,
    process: ProcessMetrics,
}

/// `process_*` families in the names every Prometheus client library uses (no prefix), read
/// from `/proc/self/stat` at scrape (Linux only; elsewhere they are not exported).
struct ProcessMetrics {
    registry: Registry,
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_memory: Gauge,
    /// Serializes scrapes' updates of the CPU counter (it moves by the difference).
    update: Mutex<()>,
}

impl ProcessMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let cpu_seconds = Counter::<f64, AtomicU64>::default();
        let resident_memory = Gauge::default();
        if cfg!(target_os = "linux") {
            registry.register_with_unit(
                "process_cpu",
                "User and system CPU time the process spent",
                Unit::Seconds,
                cpu_seconds.clone(),
            );
            registry.register_with_unit(
                "process_resident_memory",
                "Resident memory of the process",
                Unit::Bytes,
                resident_memory.clone(),
            );
        }
        Self {
            registry,
            cpu_seconds,
            resident_memory,
            update: Mutex::new(()),
        }
    }

    fn refresh(&self) {
        let Some(stat) = read_proc_self_stat() else {
            return;
        };
        let _guard = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let delta = stat.cpu_seconds - self.cpu_seconds.get();
        if delta > 0.0 {
            self.cpu_seconds.inc_by(delta);
        }
        self.resident_memory
            .set(i64::try_from(stat.resident_bytes).unwrap_or(i64::MAX));
    }
}

/// What `/proc/self/stat` says about the process.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcStat {
    cpu_seconds: f64,
    resident_bytes: u64,
}

#[cfg(target_os = "linux")]
fn read_proc_self_stat() -> Option<ProcStat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    parse_proc_stat(&text, u64::try_from(ticks).ok()?, u64::try_from(page).ok()?)
}

#[cfg(not(target_os = "linux"))]
fn read_proc_self_stat() -> Option<ProcStat> {
    None
}

/// Parses `/proc/<pid>/stat` (proc(5)): utime and stime (fields 14 and 15, in clock ticks) and
/// rss (field 24, in pages). The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its last `)`.
fn parse_proc_stat(text: &str, ticks_per_second: u64, page_size: u64) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    if ticks_per_second == 0 {
        return None;
    }
    let ticks = field(14)? + field(15)?;
    Some(ProcStat {
        cpu_seconds: ticks as f64 / ticks_per_second as f64,
        resident_bytes: field(24)?.saturating_mul(page_size),
    })
}

fn unix_millis_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The seconds the longest-waiting due attempt has waited at `now_ms`: the earliest of the
/// workers' due times, 0 when none is due yet (or no worker reports one).
fn oldest_wait_seconds(due_ms: impl IntoIterator<Item = i64>, now_ms: i64) -> i64 {
    due_ms
        .into_iter()
        .min()
        .map_or(0, |due| now_ms.saturating_sub(due).max(0) / 1000)
}

/// A dispatcher worker's place in `capy_webhooks_oldest_pending_delivery_age_seconds`: it sets
/// when its longest-waiting pending delivery became due; dropped with the worker, it leaves.
pub struct DueSlot {
    metrics: Metrics,
    key: u64,
}

impl fmt::Debug for DueSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DueSlot").field("key", &self.key).finish()
    }
}

impl DueSlot {
    /// The earliest due time (Unix milliseconds) of an attempt this worker has not started, or
    /// `None` when it has none.
    pub fn set(&self, due_unix_ms: Option<i64>) {
        let mut slots = self
            .metrics
            .inner
            .due_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match due_unix_ms {
            Some(ms) => {
                slots.insert(self.key, ms);
            }
            None => {
                slots.remove(&self.key);
            }
        }
    }
}

impl Drop for DueSlot {
    fn drop(&mut self) {
        self.set(None);
    }
}

/// Every metric of the operator, in one registry. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric family at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(METRIC_PREFIX);
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles of WebhookEndpoints run", reconciles.clone());
        let reconcile_duration = Histogram::new(LATENCY_BUCKETS);
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of a reconcile",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by reason (controller::Error::reason)",
            reconcile_errors.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests served, by component, route template, method and status",
            http_requests.clone(),
        );
        let http_duration = Family::new_with_constructor(LatencyBuckets);
        registry.register_with_unit(
            "http_request_duration",
            "Duration of an HTTP request, by component and route template",
            Unit::Seconds,
            http_duration.clone(),
        );
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Delivery results: succeeded, failed (given up) or retried (another attempt scheduled)",
            deliveries.clone(),
        );
        let attempts = Family::<ResultLabels, Counter>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts, by result: success, http_error, timeout, connect_error, refused, gone",
            attempts.clone(),
        );
        let attempt_duration = Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0]);
        registry.register_with_unit(
            "attempt_duration",
            "Duration of a delivery attempt",
            Unit::Seconds,
            attempt_duration.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "pending_deliveries",
            "Deliveries pending, across every endpoint this process dispatches for",
            pending.clone(),
        );
        let log_batch_records = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "log_write_batch_records",
            "Records per group-commit write of a delivery log",
            log_batch_records.clone(),
        );
        let log_writes = Counter::default();
        registry.register(
            "log_writes",
            "Group-commit writes of delivery logs (batches) that the API server accepted",
            log_writes.clone(),
        );
        let apiserver_writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "apiserver_writes",
            "Creates, patches and deletes the API server accepted from the operator, by kind",
            apiserver_writes.clone(),
        );
        let apiserver_write_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "apiserver_write_bytes",
            "Bytes the dispatcher sent to the API server in writes (object JSON; a delete counts 128), by kind",
            apiserver_write_bytes.clone(),
        );
        let log_write_budget = Gauge::default();
        registry.register(
            "log_write_budget_bytes",
            "Bytes per second the dispatcher may write through the API server (--log-write-budget; 0: unlimited)",
            log_write_budget.clone(),
        );
        let ingest_throttled = Counter::default();
        registry.register(
            "ingest_throttled",
            "Events, tests and retries refused with 503 because the write budget was spent",
            ingest_throttled.clone(),
        );
        let events_outside_catalog = Counter::default();
        registry.register(
            "events_outside_catalog",
            "Events accepted whose type is not in the non-empty event-type catalog (refused instead with --strict-event-types)",
            events_outside_catalog.clone(),
        );
        let controller_leader = Gauge::default();
        registry.register(
            "controller_leader",
            "1 while this replica holds the controller Lease and reconciles, else 0",
            controller_leader.clone(),
        );
        let owned_shards = Gauge::default();
        registry.register(
            "owned_shards",
            "Dispatch shards this replica holds through their Leases",
            owned_shards.clone(),
        );
        let shard_handovers = Counter::default();
        registry.register(
            "shard_handovers",
            "Dispatch shards this replica took over (from another replica, or unheld)",
            shard_handovers.clone(),
        );
        let log_segments_rejected = Counter::default();
        registry.register(
            "log_segments_rejected",
            "ConfigMaps with the delivery-log labels ignored because this operator did not write them",
            log_segments_rejected.clone(),
        );
        let log_second_writers = Counter::default();
        registry.register(
            "log_second_writers",
            "Times a delivery-log write met a segment signed with this operator's key that it did not write \
             (a second writer), making the shard's logs be read back",
            log_second_writers.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while every started component is ready (what /readyz answers 200 for), else 0",
            ready.clone(),
        );
        let shards_unowned = Gauge::default();
        registry.register(
            "shards_unowned",
            "Dispatch shards whose Lease no live replica holds, as this replica sees the Leases",
            shards_unowned.clone(),
        );
        let first_attempt_delay = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ]);
        registry.register_with_unit(
            "first_attempt_delay",
            "From accepting an event to the start of its delivery's first attempt",
            Unit::Seconds,
            first_attempt_delay.clone(),
        );
        let endpoints_auto_disabled = Counter::default();
        registry.register(
            "endpoints_auto_disabled",
            "Endpoints the dispatcher disabled because they kept failing (--auto-disable-after)",
            endpoints_auto_disabled.clone(),
        );
        let oldest_pending_age = Gauge::default();
        registry.register_with_unit(
            "oldest_pending_delivery_age",
            "How long the longest-waiting pending delivery of an active endpoint has waited past the \
             time its next attempt was due (a first attempt is due when the event is accepted); 0 when none waits",
            Unit::Seconds,
            oldest_pending_age.clone(),
        );
        let backlog_overflows = Counter::default();
        registry.register(
            "endpoint_backlog_overflows",
            "Deliveries stored failed without an attempt because their endpoint's backlog was full",
            backlog_overflows.clone(),
        );
        let payloads_expired = Counter::default();
        registry.register(
            "payloads_expired",
            "Event payloads erased from the delivery log because their retention was over (--payload-retention)",
            payloads_expired.clone(),
        );
        let filter_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "filter_errors",
            "Endpoint filters that did not give a bool at ingest (no match), by reason",
            filter_errors.clone(),
        );
        // Label values known up front are exported at zero, so rates work from the first scrape.
        for reason in FILTER_ERROR_REASONS {
            let _ = filter_errors.get_or_create(&ReasonLabels { reason });
        }
        for kind in [
            WriteKind::Secret,
            WriteKind::EndpointStatus,
            WriteKind::Endpoint,
            WriteKind::ConfigMap,
            WriteKind::Event,
        ] {
            let _ = apiserver_writes.get_or_create(&KindLabels { kind: kind.as_str() });
            let _ = apiserver_write_bytes.get_or_create(&KindLabels { kind: kind.as_str() });
        }
        for outcome in [
            DeliveryOutcome::Succeeded,
            DeliveryOutcome::Failed,
            DeliveryOutcome::Retried,
        ] {
            let _ = deliveries.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        for result in ["success", "http_error", "timeout", "connect_error", "refused", "gone"] {
            let _ = attempts.get_or_create(&ResultLabels { result });
        }
        Self {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                reconcile_duration,
                reconcile_errors,
                http_requests,
                http_duration,
                deliveries,
                attempts,
                attempt_duration,
                pending,
                log_batch_records,
                log_writes,
                apiserver_writes,
                apiserver_write_bytes,
                log_write_budget,
                ingest_throttled,
                events_outside_catalog,
                log_segments_rejected,
                log_second_writers,
                backlog_overflows,
                payloads_expired,
                controller_leader,
                owned_shards,
                shard_handovers,
                ready,
                shards_unowned,
                first_attempt_delay,
                endpoints_auto_disabled,
                filter_errors,
                oldest_pending_age,
                due_slots: Mutex::new(HashMap::new()),
                next_due_slot: AtomicU64::new(0),
                process: ProcessMetrics::new(),
            }),
        }
    }

    /// One reconcile finished after `duration`; `error` is the failure's reason, if it failed.
    pub fn reconciled(&self, duration: Duration, error: Option<&'static str>) {
        self.inner.reconciles.inc();
        self.inner.reconcile_duration.observe(duration.as_secs_f64());
        if let Some(reason) = error {
            self.inner
                .reconcile_errors
                .get_or_create(&ReasonLabels { reason })
                .inc();
        }
    }

    /// Exports `capy_webhooks_reconcile_errors_total` at zero for each of `reasons`, so the
    /// series exist before the first failure.
    pub fn declare_reconcile_error_reasons(&self, reasons: &[&'static str]) {
        for &reason in reasons {
            let _ = self.inner.reconcile_errors.get_or_create(&ReasonLabels { reason });
        }
    }

    /// One HTTP request answered. `route` must be a template (ids replaced), never a raw path.
    pub fn http_request(
        &self,
        component: &'static str,
        route: &'static str,
        method: &str,
        status: u16,
        duration: Duration,
    ) {
        let method = method_label(method);
        self.inner
            .http_requests
            .get_or_create(&HttpLabels {
                component,
                route,
                method,
                status,
            })
            .inc();
        self.inner
            .http_duration
            .get_or_create(&RouteLabels { component, route })
            .observe(duration.as_secs_f64());
    }

    /// A delivery succeeded, failed for good, or will be retried.
    pub fn delivery(&self, outcome: DeliveryOutcome) {
        self.inner
            .deliveries
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// One delivery attempt ended with `result` (see `AttemptOutcome::metric_label`).
    pub fn attempt(&self, result: &'static str, duration: Duration) {
        self.inner.attempts.get_or_create(&ResultLabels { result }).inc();
        self.inner.attempt_duration.observe(duration.as_secs_f64());
    }

    /// Moves the pending-deliveries gauge by `delta`.
    pub fn pending_changed(&self, delta: i64) {
        if delta != 0 {
            self.inner.pending.inc_by(delta);
        }
    }

    /// A group-commit write of a delivery log carrying `records` records was accepted.
    pub fn log_write(&self, records: usize) {
        self.inner.log_writes.inc();
        self.inner.log_batch_records.observe(records as f64);
    }

    /// The API server accepted `count` writes of `kind`.
    pub fn apiserver_writes(&self, kind: WriteKind, count: u64) {
        if count > 0 {
            self.inner
                .apiserver_writes
                .get_or_create(&KindLabels { kind: kind.as_str() })
                .inc_by(count);
        }
    }

    /// `bytes` were sent to the API server in writes of `kind`.
    pub fn apiserver_write_bytes(&self, kind: WriteKind, bytes: u64) {
        if bytes > 0 {
            self.inner
                .apiserver_write_bytes
                .get_or_create(&KindLabels { kind: kind.as_str() })
                .inc_by(bytes);
        }
    }

    /// The write budget in force, in bytes per second (0: unlimited).
    pub fn log_write_budget(&self, bytes_per_second: u64) {
        self.inner
            .log_write_budget
            .set(i64::try_from(bytes_per_second).unwrap_or(i64::MAX));
    }

    /// New work was refused because the write budget was spent.
    pub fn ingest_throttled(&self) {
        self.inner.ingest_throttled.inc();
    }

    /// An event was accepted although its type is not in the (non-empty) catalog. No label: type
    /// names are the producers' to choose, and a label per name would be unbounded.
    pub fn event_outside_catalog(&self) {
        self.inner.events_outside_catalog.inc();
    }

    /// Whether this replica leads the controller.
    pub fn controller_leader(&self, leading: bool) {
        self.inner.controller_leader.set(i64::from(leading));
    }

    /// How many dispatch shards this replica holds.
    pub fn owned_shards(&self, count: usize) {
        self.inner.owned_shards.set(count as i64);
    }

    /// Counts a shard this replica took over.
    pub fn shard_handover(&self) {
        self.inner.shard_handovers.inc();
    }

    /// Counts a delivery-log segment ignored on recovery.
    pub fn log_segment_rejected(&self) {
        self.inner.log_segments_rejected.inc();
    }

    /// Counts a delivery stored failed because its endpoint's backlog was full.
    pub fn backlog_overflow(&self) {
        self.inner.backlog_overflows.inc();
    }

    /// Counts event payloads erased because their retention was over.
    pub fn payloads_expired(&self, events: u64) {
        self.inner.payloads_expired.inc_by(events);
    }

    /// Counts a second writer of a delivery log, detected on a write.
    pub fn log_second_writer(&self) {
        self.inner.log_second_writers.inc();
    }

    /// Whether every started component is ready (set by the operations port at each scrape).
    pub fn ready(&self, ready: bool) {
        self.inner.ready.set(i64::from(ready));
    }

    /// How many dispatch shards no live replica holds, as this replica sees their Leases.
    pub fn shards_unowned(&self, count: usize) {
        self.inner.shards_unowned.set(count as i64);
    }

    /// A delivery's first attempt starts `delay` after its event was accepted.
    pub fn first_attempt_started(&self, delay: Duration) {
        self.inner.first_attempt_delay.observe(delay.as_secs_f64());
    }

    /// Counts an endpoint the dispatcher disabled for failing.
    pub fn endpoint_auto_disabled(&self) {
        self.inner.endpoints_auto_disabled.inc();
    }

    /// An endpoint filter did not give a bool at ingest, so the event was not delivered to that
    /// endpoint. `reason` is one of [`FILTER_ERROR_REASONS`] (others are counted as `other`).
    pub fn filter_error(&self, reason: &'static str) {
        let reason = if FILTER_ERROR_REASONS.contains(&reason) {
            reason
        } else {
            "other"
        };
        self.inner.filter_errors.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A new slot in the oldest-pending gauge, for one dispatcher worker.
    pub fn due_slot(&self) -> DueSlot {
        DueSlot {
            metrics: self.clone(),
            key: self.inner.next_due_slot.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The registry in the OpenMetrics text format (ends with `# EOF`). Values read at scrape
    /// (the oldest pending wait, `process_*`) are brought up to date first: from memory and
    /// `/proc/self`, never from the API server.
    pub fn encode(&self) -> String {
        let wait = {
            let slots = self.inner.due_slots.lock().unwrap_or_else(PoisonError::into_inner);
            oldest_wait_seconds(slots.values().copied(), unix_millis_now())
        };
        self.inner.oldest_pending_age.set(wait);
        self.inner.process.refresh();
        let mut out = String::new();
        let encoded = prometheus_client::encoding::text::encode_registry(&mut out, &self.inner.registry)
            .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut out, &self.inner.process.registry))
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out));
        encoded.expect("writing to a String cannot fail");
        out
    }
}

/// The `method` label: the standard methods as they are, anything else `other` (a client can
/// send any token as a method; labels must stay few).
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Which started components are ready, for `/readyz`. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<String, bool>>>,
    details: Arc<Mutex<BTreeMap<String, serde_json::Value>>>,
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.snapshot()).finish()
    }
}

impl Readiness {
    /// An empty registry (ready, since nothing it waits for was started).
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component, not ready yet; it flips ready through the returned handle.
    pub fn register(&self, name: &str) -> ReadyHandle {
        self.components
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), false);
        ReadyHandle {
            target: Some((self.clone(), name.to_string())),
        }
    }

    /// Every registered component and whether it is ready, by name.
    pub fn snapshot(&self) -> BTreeMap<String, bool> {
        self.components.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sets a detail `/readyz` shows beside the components (e.g. the shards held).
    pub fn set_detail(&self, name: &str, value: serde_json::Value) {
        self.details
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), value);
    }

    /// Every detail set, by name.
    pub fn details(&self) -> BTreeMap<String, serde_json::Value> {
        self.details.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Names of the registered components not ready yet, sorted.
    pub fn not_ready(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, ready)| !ready)
            .map(|(name, _)| name)
            .collect()
    }
}

/// A component's switch in a [`Readiness`] registry. The default handle is detached: flipping
/// it does nothing (for components run without a registry, as in tests).
#[derive(Clone, Default)]
pub struct ReadyHandle {
    target: Option<(Readiness, String)>,
}

impl fmt::Debug for ReadyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Some((_, name)) => write!(f, "ReadyHandle({name})"),
            None => write!(f, "ReadyHandle(detached)"),
        }
    }
}

impl ReadyHandle {
    /// A handle that belongs to no registry.
    pub fn detached() -> Self {
        Self::default()
    }

    /// Marks the component ready.
    pub fn set_ready(&self) {
        if let Some((readiness, name)) = &self.target {
            readiness
                .components
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.clone(), true);
            tracing::info!(component = %name, "ready");
        }
    }
}

/// A Kubernetes Event a component publishes about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    /// Warning rather than Normal.
    pub warning: bool,
    /// Machine-readable reason (`kubectl get events` REASON).
    pub reason: &'static str,
    /// What the component did.
    pub action: &'static str,
    /// For humans; never a secret.
    pub note: String,
}

/// Publishes an Event and counts it as an API-server write. Events are best effort: a failure is
/// logged at warn and never fails the caller's work. The one way every component publishes.
pub async fn publish_event(
    recorder: &kube::runtime::events::Recorder,
    metrics: &Metrics,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    event: &EventNote,
) {
    use kube::runtime::events::{Event, EventType};
    let published = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.into(),
        note: Some(event.note.clone()),
        action: event.action.into(),
        secondary: None,
    };
    match recorder.publish(&published, regarding).await {
        Ok(()) => metrics.apiserver_writes(WriteKind::Event, 1),
        Err(e) => tracing::warn!(
            object = ?regarding.name,
            reason = event.reason,
            error = %e,
            "could not publish Event"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn readiness_waits_for_every_registered_component() {
        let readiness = Readiness::new();
        assert!(readiness.not_ready().is_empty(), "nothing started, nothing to wait for");
        let api = readiness.register("api");
        let controller = readiness.register("controller");
        assert!(!readiness.not_ready().is_empty());
        assert_eq!(readiness.not_ready(), ["api", "controller"]);
        controller.set_ready();
        assert_eq!(readiness.not_ready(), ["api"]);
        api.clone().set_ready();
        assert!(readiness.not_ready().is_empty());
        assert_eq!(readiness.snapshot().len(), 2);
        // Flipping twice, or a detached handle, changes nothing.
        api.set_ready();
        ReadyHandle::detached().set_ready();
        assert!(readiness.not_ready().is_empty());
        assert_eq!(readiness.snapshot().len(), 2);
    }

    /// `(name, type)` of every family in the encoded text, named as scraped: a counter `x` is
    /// `x_total`.
    fn families_in(text: &str) -> BTreeSet<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').expect("# TYPE name type");
                let name = if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                (name, kind.to_string())
            })
            .collect()
    }

    /// `(name, type)` of every row of the README's metrics table.
    fn families_in_readme() -> BTreeSet<(String, String)> {
        let readme = include_str!("../README.md");
        let mut lines = readme
            .lines()
            .skip_while(|l| !l.starts_with("| metric | type | labels | meaning |"));
        assert!(
            lines.next().is_some(),
            "README.md has no metrics table (| metric | type | labels | meaning |)"
        );
        let rows: BTreeSet<(String, String)> = lines
            .skip(1) // |---|
            .take_while(|l| l.starts_with('|'))
            .map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                (cells[1].trim_matches('`').to_string(), cells[2].to_string())
            })
            .collect();
        assert!(!rows.is_empty(), "README.md's metrics table is empty");
        rows
    }

    /// Every recording method is exercised, every family has a sample, and the README's metrics
    /// table and the scraped text name exactly the same families with the same types: a metric
    /// added without its README row (or a row left for a metric removed) fails here, and so does a
    /// family no recording method of this test reaches.
    #[test]
    fn metrics_text_has_every_family() {
        let metrics = Metrics::new();
        metrics.reconciled(Duration::from_millis(12), None);
        metrics.reconciled(Duration::from_millis(12), Some("WriteSecretFailed"));
        metrics.declare_reconcile_error_reasons(&["MissingMetadata"]);
        metrics.http_request(
            "api",
            "/v1/organizations/:org/webhook-endpoints",
            "POST",
            201,
            Duration::from_millis(30),
        );
        metrics.http_request("api", "other", "BREW", 404, Duration::from_millis(1));
        metrics.delivery(DeliveryOutcome::Succeeded);
        metrics.attempt("success", Duration::from_millis(40));
        metrics.pending_changed(3);
        metrics.pending_changed(-1);
        metrics.log_write(7);
        metrics.apiserver_writes(WriteKind::ConfigMap, 2);
        metrics.apiserver_write_bytes(WriteKind::ConfigMap, 4096);
        metrics.log_write_budget(524_288);
        metrics.ingest_throttled();
        metrics.controller_leader(true);
        metrics.owned_shards(5);
        metrics.shard_handover();
        metrics.log_segment_rejected();
        metrics.backlog_overflow();
        metrics.payloads_expired(3);
        metrics.log_second_writer();
        metrics.ready(true);
        metrics.shards_unowned(2);
        metrics.first_attempt_started(Duration::from_millis(30));
        metrics.endpoint_auto_disabled();
        metrics.filter_error("missing_field");
        metrics.filter_error("made-up");
        let slot = metrics.due_slot();
        slot.set(Some(unix_millis_now() - 90_000));
        let text = metrics.encode();

        let scraped = families_in(&text);
        let documented = families_in_readme();
        let undocumented: Vec<_> = scraped.difference(&documented).collect();
        let unregistered: Vec<_> = documented.difference(&scraped).collect();
        assert!(
            undocumented.is_empty() && unregistered.is_empty(),
            "README.md's metrics table and the registry disagree.\nregistered, not in the README (or \
             with another type): {undocumented:?}\nin the README, not registered: {unregistered:?}"
        );
        for (name, kind) in &scraped {
            let family = if kind == "counter" {
                name.strip_suffix("_total").unwrap()
            } else {
                name
            };
            let sampled = text.lines().filter(|l| !l.starts_with('#')).any(|l| {
                l.strip_prefix(family).is_some_and(|rest| {
                    ["_total", "_bucket", "_count", "_sum", "{", " "]
                        .iter()
                        .any(|s| rest.starts_with(s))
                })
            });
            assert!(
                sampled,
                "no sample of {name}: exercise its recording method here\n{text}"
            );
        }

        for sample in [
            "capy_webhooks_reconciles_total 2",
            "capy_webhooks_reconcile_errors_total{reason=\"WriteSecretFailed\"} 1",
            "capy_webhooks_http_requests_total{component=\"api\",route=\"/v1/organizations/:org/webhook-endpoints\",method=\"POST\",status=\"201\"} 1",
            "capy_webhooks_http_requests_total{component=\"api\",route=\"other\",method=\"other\",status=\"404\"} 1",
            "capy_webhooks_deliveries_total{outcome=\"succeeded\"} 1",
            "capy_webhooks_deliveries_total{outcome=\"retried\"} 0",
            "capy_webhooks_delivery_attempts_total{result=\"success\"} 1",
            "capy_webhooks_pending_deliveries 2",
            "capy_webhooks_log_writes_total 1",
            "capy_webhooks_log_write_batch_records_count 1",
            "capy_webhooks_apiserver_writes_total{kind=\"configmap\"} 2",
            "capy_webhooks_apiserver_writes_total{kind=\"secret\"} 0",
            "capy_webhooks_apiserver_write_bytes_total{kind=\"configmap\"} 4096",
            "capy_webhooks_apiserver_write_bytes_total{kind=\"endpoint_status\"} 0",
            "capy_webhooks_log_write_budget_bytes 524288",
            "capy_webhooks_ingest_throttled_total 1",
            "capy_webhooks_filter_errors_total{reason=\"missing_field\"} 1",
            "capy_webhooks_filter_errors_total{reason=\"other\"} 1",
            "capy_webhooks_filter_errors_total{reason=\"invalid\"} 0",
            "capy_webhooks_reconcile_errors_total{reason=\"MissingMetadata\"} 0",
            "capy_webhooks_controller_leader 1",
            "capy_webhooks_owned_shards 5",
            "capy_webhooks_shard_handovers_total 1",
            "capy_webhooks_log_segments_rejected_total 1",
            "capy_webhooks_endpoint_backlog_overflows_total 1",
            "capy_webhooks_payloads_expired_total 3",
            "capy_webhooks_log_second_writers_total 1",
            "capy_webhooks_ready 1",
            "capy_webhooks_shards_unowned 2",
            "capy_webhooks_first_attempt_delay_seconds_count 1",
            "capy_webhooks_endpoints_auto_disabled_total 1",
        ] {
            assert!(text.contains(sample), "{sample} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        let age = sample(&text, "capy_webhooks_oldest_pending_delivery_age_seconds");
        assert!((90.0..100.0).contains(&age), "{age}");
        drop(slot);
        let text = metrics.encode();
        assert_eq!(sample(&text, "capy_webhooks_oldest_pending_delivery_age_seconds"), 0.0);
        if cfg!(target_os = "linux") {
            // Spend a few clock ticks of CPU, so the counter has something to show.
            let start = std::time::Instant::now();
            let mut x = 0u64;
            while read_proc_self_stat().is_some_and(|s| s.cpu_seconds < 0.05)
                && start.elapsed() < Duration::from_secs(5)
            {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let text = metrics.encode();
            assert!(sample(&text, "process_resident_memory_bytes") > 1e6, "{text}");
            assert!(sample(&text, "process_cpu_seconds_total") > 0.0, "{text}");
        }
    }

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_oldest_wait_is_the_earliest_due_time_and_never_negative() {
        assert_eq!(oldest_wait_seconds([], 50_000), 0);
        assert_eq!(oldest_wait_seconds([40_000, 10_000, 45_000], 50_000), 40);
        assert_eq!(oldest_wait_seconds([60_000], 50_000), 0, "due later: nothing waits");
        assert_eq!(oldest_wait_seconds([49_500], 50_000), 0);
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        // proc(5): pid (comm) state ppid ... utime(14) stime(15) ... rss(24) ...
        let line = "4242 (capy (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 \
                    12345 200000000 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let stat = parse_proc_stat(line, 100, 4096).unwrap();
        assert_eq!(stat.cpu_seconds, 3.0);
        assert_eq!(stat.resident_bytes, 3000 * 4096);
        assert_eq!(parse_proc_stat("4242 (x) S 1", 100, 4096), None);
        assert_eq!(parse_proc_stat(line, 0, 4096), None);
    }
}
