//! [`DeliveryLog`]: the in-memory image of one organization's log in one namespace, and the group
//! commit of its changes. Pure: no client, no clock.
//!
//! The log holds two kinds of entries, each under its own id as a ConfigMap data key:
//! - **events** (`evt_...`): the payload (the envelope as sent), stored once per event however many
//!   endpoints it fans out to, and never changed. An event lives while a delivery in the image
//!   carries it, and goes when the last one is pruned or its endpoint removed;
//! - **deliveries** (`msg_...`): the small record of one delivery ([`DeliveryRecord`]), written
//!   again at every state change.
//!
//! The log is a journal. Every batch *creates* new segments holding the current version of each
//! entry changed since the previous batch; a segment is never patched. The API server's cost of a
//! write is then proportional to what changed, not to what a segment already holds (a merge patch
//! makes it re-encode and re-parse the whole ConfigMap: profiled, that was 70 % of its CPU under
//! load). An entry's *live* version is its copy in the newest segment holding it; older copies are
//! superseded.
//!
//! **Invariant** (what makes read-back safe): whenever a superseded copy of an entry is stored,
//! every newer copy of it is stored too, so a read-back that lets the copy in the newest segment
//! win never brings back an older state (a pending delivery already sent, say). It holds because
//! segments are deleted oldest first and only once they hold no live version, and because the
//! deletes of a batch are sent only after its creates succeeded. The one segment deleted out of
//! that order is one holding an erased payload ([`DeliveryLog::erase_event`]): its live versions
//! are copied into the same batch's creates first, so every entry's newest copy stays stored.
//!
//! When there are more segments than the live entries need ([`DeliveryLog::segment_limit`]), a
//! batch compacts: it copies the live entries of the oldest segment into the segments it creates
//! and deletes that segment.
//!
//! Segments of the first format (`<endpoint>-deliveries-<seq>`, one per endpoint, every record
//! with its own payload) are read on recovery, written again in this format by the next batch, and
//! deleted after it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use tracing::warn;

use super::record::{self, DeliveryRecord, DeliveryState, is_valid_key, truncate_error};
use super::segment;
use super::{
    EVENT_KEY_PREFIX, GROWTH_RESERVE, HARD_SEGMENT_BYTES, MAX_RECORD_BYTES, MAX_SEGMENT_BYTES, journal_segment_name,
    journal_seq, legacy_segment_seq, segment_labels,
};

/// Bounds of one organization's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Finished (succeeded or failed) deliveries kept per endpoint; older ones are pruned.
    /// Pending ones are always kept.
    pub max_finished: usize,
    /// Largest data (keys plus values) of one segment written by a batch; a larger batch is split
    /// into several segments (at most [`MAX_SEGMENT_BYTES`]; a single entry larger than this gets
    /// a segment of its own).
    pub segment_bytes: usize,
    /// Bounds the log: each endpoint's deliveries, with the payloads its pending ones carry, may
    /// take at most half of `max_segments × segment_bytes` (more is [`LogFull`]), and batches compact once more than `max_segments / 2`
    /// segments exist (see [`DeliveryLog::segment_limit`] for an organization whose live entries
    /// need more).
    pub max_segments: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_finished: 100,
            segment_bytes: 256 * 1024,
            max_segments: 16,
        }
    }
}

/// The log cannot take another entry: an endpoint's pending deliveries and their payloads would
/// exceed their capacity (see
/// [`LogConfig::max_segments`]), or the entry alone is larger than [`MAX_RECORD_BYTES`], or its id
/// is not a valid ConfigMap key. Ingest answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the delivery log of this endpoint is full")]
pub struct LogFull;

/// Why [`DeliveryLog::insert_checked`] refused a delivery.
enum Refused {
    /// Its endpoint's deliveries have no room for it: the record, handed back.
    NoRoom(Box<DeliveryRecord>),
    /// An invalid id, or a record too large for any segment.
    Invalid,
}

/// The `last_error` of a delivery stored failed because its endpoint's backlog was full
/// ([`DeliveryLog::insert_or_fail_when_full`]).
pub const BACKLOG_FULL_ERROR: &str = "not attempted: the endpoint's backlog of pending deliveries was full (it receives slower than events arrive); recover it once the endpoint keeps up";

/// One API write of a batch.
// A batch holds a handful of these: the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum SegmentWrite {
    /// Create a segment with its entries.
    Create(ConfigMap),
    /// Delete a segment that holds no live entry.
    Delete {
        /// The segment's ConfigMap name.
        name: String,
    },
}

/// Bytes a delete is counted as: its body is tiny, and etcd keeps a tombstone of the key and
/// revision until the next compaction.
pub const DELETE_BYTES: u64 = 128;

impl SegmentWrite {
    /// Name of the ConfigMap written.
    pub fn name(&self) -> &str {
        match self {
            SegmentWrite::Create(cm) => cm.metadata.name.as_deref().unwrap_or_default(),
            SegmentWrite::Delete { name } => name,
        }
    }

    /// Bytes this write sends to the API server: a create's object as JSON, or [`DELETE_BYTES`].
    pub fn bytes(&self) -> u64 {
        match self {
            SegmentWrite::Create(cm) => serde_json::to_vec(cm).map_or(0, |v| v.len() as u64),
            SegmentWrite::Delete { .. } => DELETE_BYTES,
        }
    }
}

/// A segment a batch creates, to hand it back on failure.
#[derive(Clone, Debug)]
struct Created {
    seq: u64,
    /// Ids of the live entries it stores.
    live: Vec<String>,
    /// Deliveries pruned before their last version was stored: it stores them, but they are gone
    /// from the image.
    retired: Vec<DeliveryRecord>,
}

/// A batch of writes from [`DeliveryLog::take_writes`]: creates (oldest sequence number first),
/// then deletes (oldest first). Apply them in order, stopping at the first failure; on failure
/// give the batch back with [`DeliveryLog::restore`].
#[derive(Clone, Debug, Default)]
pub struct PendingWrites {
    writes: Vec<SegmentWrite>,
    created: Vec<Created>,
    deleted: Vec<String>,
}

impl PendingWrites {
    /// The writes, in the order to apply them.
    pub fn writes(&self) -> &[SegmentWrite] {
        &self.writes
    }

    /// The creates: once they are applied, every entry of the batch is durable.
    pub fn creates(&self) -> &[SegmentWrite] {
        &self.writes[..self.created.len()]
    }

    /// The deletes, to apply after the creates.
    pub fn deletes(&self) -> &[SegmentWrite] {
        &self.writes[self.created.len()..]
    }

    /// The part of the batch left once its creates were applied (for [`DeliveryLog::restore`]
    /// after only a delete failed).
    pub fn without_creates(self) -> PendingWrites {
        let writes = self.deletes().to_vec();
        PendingWrites {
            writes,
            created: Vec::new(),
            deleted: self.deleted,
        }
    }

    /// Bytes these writes send to the API server (see [`SegmentWrite::bytes`]).
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(SegmentWrite::bytes).sum()
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Ids of the entries (deliveries and events) these writes store, durable once they are
    /// applied.
    pub fn record_ids(&self) -> impl Iterator<Item = &str> {
        self.created.iter().flat_map(|c| {
            c.live
                .iter()
                .map(String::as_str)
                .chain(c.retired.iter().map(|r| r.id.as_str()))
        })
    }
}

/// One segment as the image sees it (for metrics and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// ConfigMap name.
    pub name: String,
    /// Ids of the live entries it holds, sorted.
    pub ids: Vec<String>,
    /// Its data's size: keys plus values, superseded copies included.
    pub bytes: usize,
}

/// A segment that exists, or may: one whose create failed holds no live entry and is deleted
/// once it is the oldest.
#[derive(Clone, Debug)]
struct Segment {
    name: String,
    /// Ids whose live version this segment holds.
    live: BTreeSet<String>,
    /// Stored bytes of those live versions.
    live_bytes: usize,
    /// Keys plus values of everything it stores.
    bytes: usize,
}

#[derive(Clone, Debug)]
struct Entry {
    record: DeliveryRecord,
    /// The segment storing this very version; `None` while it awaits the next batch.
    seq: Option<u64>,
    bytes: usize,
    /// What its endpoint's capacity was charged for it (see [`EndpointEntries::projected`]).
    charged: usize,
}

#[derive(Clone, Debug)]
struct EventEntry {
    /// The envelope exactly as sent (JSON), or [`ERASED_PAYLOAD`] once erased.
    payload: Bytes,
    seq: Option<u64>,
    bytes: usize,
    /// Deliveries in the image that carry it.
    refs: usize,
    /// Whether the payload was erased ([`DeliveryLog::erase_event`]): the entry is a tombstone.
    erased: bool,
}

/// What an erased event's entry stores: a tombstone that wins over the payload, should a segment
/// holding the payload be found again (its delete interrupted), so that it is deleted again.
pub const ERASED_PAYLOAD: &str = "null";

/// What the image keeps per endpoint.
#[derive(Clone, Debug, Default)]
struct EndpointEntries {
    /// Finished deliveries by (updated_at, id): the first is pruned first.
    finished: BTreeSet<(Timestamp, String)>,
    pending: usize,
    /// Bytes of its deliveries, plus [`GROWTH_RESERVE`] and the payload of each pending one
    /// (counted for every endpoint it goes to, as when each delivery stored its own): decides
    /// [`LogFull`].
    projected: usize,
}

fn reserve(state: DeliveryState) -> usize {
    if state.is_finished() { 0 } else { GROWTH_RESERVE }
}

fn event_bytes(id: &str, payload: &[u8]) -> usize {
    id.len() + payload.len()
}

/// Whether a data key names an event (else a delivery).
pub fn is_event_key(key: &str) -> bool {
    key.starts_with(EVENT_KEY_PREFIX)
}

/// The in-memory image of one organization's delivery log in one namespace; its single writer
/// (the dispatcher's worker for the organization) changes it and persists the changes in batches
/// with [`Self::take_writes`].
#[derive(Clone, Debug)]
pub struct DeliveryLog {
    namespace: String,
    organization_id: String,
    config: LogConfig,
    records: BTreeMap<String, Entry>,
    events: BTreeMap<String, EventEntry>,
    endpoints: HashMap<String, EndpointEntries>,
    /// Segments that exist (or may), by sequence number.
    segments: BTreeMap<u64, Segment>,
    /// Segments, oldest first, whose delete may have failed or that are of the first format: the
    /// next batch deletes them (after its creates).
    deleting: Vec<String>,
    /// Entries whose current version awaits the next batch.
    dirty: BTreeSet<String>,
    /// Deliveries pruned before their last version was stored; the next batch stores them.
    retired: BTreeMap<String, DeliveryRecord>,
    pending: usize,
    /// Bytes of every entry plus [`GROWTH_RESERVE`] per pending delivery.
    projected: usize,
    next_seq: u64,
    /// Sequence numbers whose names objects this operator did not write hold (refused segments
    /// seen when the log was read back): never used, and never moving `next_seq`, so a squatted
    /// name costs one skipped number, whatever number it claims.
    avoided: BTreeSet<u64>,
    /// Segments a batch deletes whose delete is not confirmed yet: until it is, they may hold
    /// the only durable copy of an entry, so new segments' floors stay at or below them.
    unconfirmed_deletes: BTreeSet<u64>,
    /// Segments holding an erased payload: the next batch copies their live entries and deletes
    /// them, wherever they are in the journal.
    purge: BTreeSet<u64>,
}

impl DeliveryLog {
    /// An empty log (use [`Self::from_configmaps`] when one may exist: a new log numbers its
    /// segments from 1).
    pub fn new(namespace: &str, organization_id: &str, config: LogConfig) -> Self {
        Self {
            namespace: namespace.to_string(),
            organization_id: organization_id.to_string(),
            config,
            records: BTreeMap::new(),
            events: BTreeMap::new(),
            endpoints: HashMap::new(),
            segments: BTreeMap::new(),
            deleting: Vec::new(),
            dirty: BTreeSet::new(),
            retired: BTreeMap::new(),
            pending: 0,
            projected: 0,
            next_seq: 1,
            avoided: BTreeSet::new(),
            unconfirmed_deletes: BTreeSet::new(),
            purge: BTreeSet::new(),
        }
    }

    /// Never names a new segment `seq` or below: for names this process may have written for the
    /// same log before (a worker aborted with writes in flight, whose segments a read-back made
    /// meanwhile may not show yet). Only for the operator's own numbers, never for names found.
    pub fn start_names_after(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
    }

    /// The sequence number the next new segment will get (at least).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The lowest sequence number that may still hold a live entry: the floor new segments
    /// record ([`segment::FLOOR_KEY`]).
    fn floor(&self) -> u64 {
        let oldest = self.segments.keys().next().copied().unwrap_or(self.next_seq);
        self.unconfirmed_deletes.first().map_or(oldest, |&seq| seq.min(oldest))
    }

    /// The sequence number of a segment of this log, by name (`None` for another log's name or
    /// the first format).
    fn own_seq(&self, name: &str) -> Option<u64> {
        journal_seq(name).filter(|&seq| journal_segment_name(&self.organization_id, seq) == name)
    }

    /// Segments deleted, as the API server confirmed: they no longer hold back the floor, which
    /// the next batch records. (No write is made for the floor alone: a log that stays idle after
    /// a delete records it with its next change.)
    pub fn confirm_deleted(&mut self, names: &[String]) {
        for name in names {
            if let Some(seq) = self.own_seq(name) {
                self.unconfirmed_deletes.remove(&seq);
            }
        }
    }

    /// Never names a new segment `name`: it is held by an object that is not part of the log
    /// (a refused segment), which is never written into. Names of other logs are ignored.
    pub fn avoid_name(&mut self, name: &str) {
        if let Some(seq) = self.own_seq(name) {
            self.avoided.insert(seq);
        }
    }

    /// Rebuilds the image from the segments [`super::load_all`] found for this organization in
    /// this namespace: the one read-back of the log, used by recovery and by readers.
    ///
    /// Never fails: an entry's copy in the newest segment holding it wins; an undecodable entry,
    /// or a delivery of another organization, is skipped with a warning (and goes with its
    /// segment). Segments of the first format are read first (they are older than any of this
    /// format), their records kept as changes for the next batch, and the segments queued for
    /// deletion after it. Events no delivery carries are dropped; retention applies at once.
    pub fn from_configmaps(
        namespace: &str,
        organization_id: &str,
        config: LogConfig,
        configmaps: impl IntoIterator<Item = ConfigMap>,
    ) -> Self {
        let mut log = Self::new(namespace, organization_id, config);
        let mut current: Vec<(u64, ConfigMap)> = Vec::new();
        let mut legacy: Vec<(String, u64, ConfigMap)> = Vec::new();
        for cm in configmaps {
            let name = cm.metadata.name.clone().unwrap_or_default();
            if let Some(seq) = journal_seq(&name) {
                // Never reuse a name that exists.
                log.next_seq = log.next_seq.max(seq.saturating_add(1));
                current.push((seq, cm));
            } else if let Some(seq) = legacy_segment_seq(&name) {
                let prefix = name[..name.rfind('-').unwrap_or(0)].to_string();
                legacy.push((prefix, seq, cm));
            } else {
                warn!(configmap = %name, "not named like a delivery-log segment; ignored");
            }
        }
        // Below the newest floor: segments the operator deleted. One found again is a replay of
        // superseded entries (or a delete not yet done): never read, and deleted once more.
        let floor = current.iter().map(|(_, cm)| segment::floor(cm)).max().unwrap_or(0);
        current.retain(|(seq, cm)| {
            if *seq >= floor {
                return true;
            }
            let name = cm.metadata.name.clone().unwrap_or_default();
            warn!(configmap = %name, floor, "delivery-log segment below its log's floor (deleted before); ignored and deleted");
            log.unconfirmed_deletes.insert(*seq);
            log.deleting.push(name);
            false
        });
        legacy.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (_, _, cm) in legacy {
            let name = cm.metadata.name.unwrap_or_default();
            // A first-format segment is one endpoint's: its records must all name its owner.
            let owner = cm
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "WebhookEndpoint")
                .map(|o| o.name.clone());
            for (key, value) in cm.data.unwrap_or_default() {
                match DeliveryRecord::from_legacy(&value) {
                    Ok((record, payload))
                        if record.id == key
                            && record.organization_id == log.organization_id
                            && owner.as_ref().is_none_or(|o| *o == record.endpoint_id) =>
                    {
                        if !log.events.contains_key(&record.event_id) {
                            let payload = Bytes::from(serde_json::to_vec(&payload).expect("JSON values serialize"));
                            log.dirty.insert(record.event_id.clone());
                            log.attach_event(record.event_id.clone(), payload, None);
                        }
                        log.detach(&key);
                        log.dirty.insert(key);
                        let bytes = record.stored_len();
                        log.attach(record, bytes, None);
                    }
                    Ok(_) => {
                        warn!(configmap = %name, key = %key, "record of another id, organization or endpoint; ignored")
                    }
                    Err(error) => warn!(configmap = %name, key = %key, %error, "undecodable delivery record; ignored"),
                }
            }
            log.deleting.push(name);
        }
        current.sort_by_key(|(seq, _)| *seq);
        for (seq, cm) in current {
            let name = cm.metadata.name.clone().unwrap_or_default();
            let data = segment::entries(&cm).unwrap_or_else(|error| {
                warn!(configmap = %name, %error, "delivery-log segment unreadable; its entries are ignored");
                BTreeMap::new()
            });
            let bytes = data.iter().map(|(k, v)| k.len() + v.len()).sum();
            log.segments.insert(
                seq,
                Segment {
                    name: name.clone(),
                    live: BTreeSet::new(),
                    live_bytes: 0,
                    bytes,
                },
            );
            for (key, value) in data {
                if !is_valid_key(&key) {
                    continue;
                }
                // Segments come oldest first: this copy supersedes any seen before.
                if is_event_key(&key) {
                    if serde_json::from_str::<serde::de::IgnoredAny>(&value).is_err() {
                        warn!(configmap = %name, key = %key, "undecodable event payload; ignored");
                        continue;
                    }
                    let erased = value == ERASED_PAYLOAD;
                    // A payload the erasure's tombstone supersedes is in a segment whose delete
                    // did not happen: it goes again.
                    if let Some(older) = log.detach_event(&key)
                        && erased
                        && !older.erased
                        && let Some(older_seq) = older.seq
                    {
                        log.purge.insert(older_seq);
                    }
                    log.dirty.remove(&key);
                    log.attach_event(key, Bytes::from(value), Some(seq));
                    continue;
                }
                let record = match DeliveryRecord::from_stored(&key, &log.organization_id, &value) {
                    Ok(record) => record,
                    Err(error) => {
                        warn!(configmap = %name, key = %key, %error, "undecodable delivery record; ignored");
                        continue;
                    }
                };
                log.detach(&key);
                log.dirty.remove(&key);
                let bytes = record.stored_len();
                log.attach(record, bytes, Some(seq));
            }
        }
        for event in log.events.values_mut() {
            event.refs = 0;
        }
        for entry in log.records.values() {
            if let Some(event) = log.events.get_mut(&entry.record.event_id) {
                event.refs += 1;
            }
        }
        let unused: Vec<String> = log
            .events
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(id, _)| id.clone())
            .collect();
        for id in unused {
            log.detach_event(&id);
            log.dirty.remove(&id);
        }
        // A delivery read before its event was charged without the payload: charge it now.
        let ids: Vec<String> = log.records.keys().cloned().collect();
        for id in ids {
            let entry = &log.records[&id];
            let charged = log.charge(&entry.record, entry.bytes);
            let (old, endpoint) = (entry.charged, entry.record.endpoint_id.clone());
            if let Some(entries) = log.endpoints.get_mut(&endpoint) {
                entries.projected = entries.projected - old + charged;
            }
            log.records.get_mut(&id).expect("listed above").charged = charged;
        }
        let endpoints: Vec<String> = log.endpoints.keys().cloned().collect();
        for endpoint in endpoints {
            log.prune(&endpoint);
        }
        log
    }

    /// Namespace of the log.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The organization whose log this is.
    pub fn organization_id(&self) -> &str {
        &self.organization_id
    }

    /// The bounds in force.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Adds an event's payload (the envelope as sent); the next batch stores it. Insert the
    /// deliveries that carry it right after: an event no delivery carries is dropped when the
    /// next delivery leaves. [`LogFull`] when the payload alone is larger than
    /// [`MAX_RECORD_BYTES`] or its id is not a valid key.
    pub fn insert_event(&mut self, id: &str, payload: Bytes) -> Result<(), LogFull> {
        if self.events.contains_key(id) {
            return Ok(());
        }
        if !is_valid_key(id) || !is_event_key(id) {
            warn!(organization = %self.organization_id, id, "event id is not a valid key; refused");
            return Err(LogFull);
        }
        if event_bytes(id, &payload) > MAX_RECORD_BYTES {
            warn!(organization = %self.organization_id, id, bytes = payload.len(), "event too large for the log; refused");
            return Err(LogFull);
        }
        self.dirty.insert(id.to_string());
        self.attach_event(id.to_string(), payload, None);
        Ok(())
    }

    /// The payload of an event, if the log holds it.
    pub fn payload(&self, event_id: &str) -> Option<&Bytes> {
        self.events.get(event_id).filter(|e| !e.erased).map(|e| &e.payload)
    }

    /// The payload of an event as JSON, if the log holds it.
    pub fn payload_json(&self, event_id: &str) -> Option<Value> {
        self.payload(event_id).and_then(|p| serde_json::from_slice(p).ok())
    }

    /// Number of events held.
    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Erases an event's payload: the image keeps a tombstone ([`ERASED_PAYLOAD`]) in its place
    /// while deliveries carry it, and the next batch deletes the segment that stored the payload
    /// (copying its other live entries), so the payload's bytes leave the API server. Returns the
    /// ids of the deliveries carrying the event, oldest first (erased now or before: erasing is
    /// idempotent), or `None` if no delivery here carries it. The caller decides what becomes of
    /// pending ones: without a payload they cannot be sent.
    pub fn erase_event(&mut self, id: &str) -> Option<Vec<String>> {
        let carriers: Vec<String> = self
            .records
            .values()
            .filter(|e| e.record.event_id == id)
            .map(|e| e.record.id.clone())
            .collect();
        if carriers.is_empty() {
            return None;
        }
        if self.events.get(id).is_some_and(|e| !e.erased) {
            let event = self.detach_event(id).expect("checked above");
            if let Some(seq) = event.seq {
                self.purge.insert(seq);
            }
            self.attach_event(id.to_string(), Bytes::from_static(ERASED_PAYLOAD.as_bytes()), None);
            self.events.get_mut(id).expect("just attached").refs = event.refs;
            self.dirty.insert(id.to_string());
        }
        Some(carriers)
    }

    /// Events whose payload retention is over: every delivery carrying it is finished and was
    /// created before `cutoff`. Erase them with [`Self::erase_event`]; their records stay.
    pub fn expired_events(&self, cutoff: Timestamp) -> Vec<String> {
        let mut expired: BTreeMap<&str, bool> = BTreeMap::new();
        for entry in self.records.values() {
            let record = &entry.record;
            if self.events.get(&record.event_id).is_none_or(|e| e.erased) {
                continue;
            }
            let over = record.is_finished() && record.created_at < cutoff;
            expired
                .entry(record.event_id.as_str())
                .and_modify(|all| *all &= over)
                .or_insert(over);
        }
        expired
            .into_iter()
            .filter(|(_, over)| *over)
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// Adds a new delivery (one with a known id is updated instead); the next batch stores it.
    /// [`LogFull`] when its endpoint's deliveries would exceed their capacity.
    pub fn insert(&mut self, record: DeliveryRecord) -> Result<(), LogFull> {
        self.insert_checked(record, true).map_err(|_| LogFull)
    }

    /// Adds a new pending delivery like [`Self::insert`], except that when its endpoint's
    /// deliveries have no room left, it is stored `failed` at once, with `last_error` saying so
    /// (recoverable later like any failed delivery): an endpoint that cannot keep up never
    /// refuses its organization's events to the others. Finished deliveries are bounded by
    /// [`LogConfig::max_finished`], not by the capacity. Returns whether it was stored failed.
    pub fn insert_or_fail_when_full(&mut self, record: DeliveryRecord) -> Result<bool, LogFull> {
        match self.insert_checked(record, true) {
            Ok(()) => Ok(false),
            Err(Refused::NoRoom(mut record)) if !record.is_finished() => {
                record.state = DeliveryState::Failed;
                record.next_attempt_at = None;
                record.last_error = Some(BACKLOG_FULL_ERROR.to_string());
                self.insert_checked(*record, false).map(|()| true).map_err(|_| LogFull)
            }
            Err(_) => Err(LogFull),
        }
    }

    /// Adds a delivery; with `check_capacity`, refuses it (handing it back) when its endpoint's
    /// deliveries have no room for it. The record is measured once.
    fn insert_checked(&mut self, mut record: DeliveryRecord, check_capacity: bool) -> Result<(), Refused> {
        record.normalize();
        if self.records.contains_key(&record.id) {
            self.update(record);
            return Ok(());
        }
        if !is_valid_key(&record.id) || is_event_key(&record.id) {
            warn!(endpoint = %record.endpoint_id, id = %record.id, "delivery id is not a valid key; refused");
            return Err(Refused::Invalid);
        }
        let bytes = record.stored_len();
        if bytes > MAX_RECORD_BYTES {
            warn!(endpoint = %record.endpoint_id, id = %record.id, bytes, "delivery record too large for the log; refused");
            return Err(Refused::Invalid);
        }
        let projected = self.endpoints.get(&record.endpoint_id).map_or(0, |e| e.projected);
        if check_capacity && projected + self.charge(&record, bytes) > self.capacity() {
            return Err(Refused::NoRoom(Box::new(record)));
        }
        if let Some(event) = self.events.get_mut(&record.event_id) {
            event.refs += 1;
        }
        self.dirty.insert(record.id.clone());
        let endpoint = record.endpoint_id.clone();
        self.attach(record, bytes, None);
        self.prune(&endpoint);
        Ok(())
    }

    /// Replaces a delivery; the next batch stores the new version. Returns false, changing
    /// nothing, if the log has no delivery with its id (never inserted, or pruned). Should the
    /// record get above [`HARD_SEGMENT_BYTES`], its `last_error` is shortened until it fits.
    pub fn update(&mut self, mut record: DeliveryRecord) -> bool {
        record.normalize();
        if self.detach(&record.id).is_none() {
            return false;
        }
        let bytes = shorten_error_to_fit(&mut record, HARD_SEGMENT_BYTES);
        self.dirty.insert(record.id.clone());
        let endpoint = record.endpoint_id.clone();
        self.attach(record, bytes, None);
        self.prune(&endpoint);
        true
    }

    /// Drops every delivery of an endpoint (deleted, or moved to another organization) and the
    /// events only they carried; returns how many deliveries went. They are not written again:
    /// their stored copies go with their segments.
    pub fn remove_endpoint(&mut self, endpoint: &str) -> usize {
        let ids: Vec<String> = self
            .records
            .values()
            .filter(|e| e.record.endpoint_id == endpoint)
            .map(|e| e.record.id.clone())
            .collect();
        for id in &ids {
            self.dirty.remove(id);
            self.drop_record(id);
        }
        self.retired.retain(|_, r| r.endpoint_id != endpoint);
        self.endpoints.remove(endpoint);
        ids.len()
    }

    /// Drops a delivery that was inserted since the last batch and so never written (a request
    /// refused half way); false if there is no such delivery.
    pub fn discard_unstored(&mut self, id: &str) -> bool {
        if self.records.get(id).is_none_or(|e| e.seq.is_some()) {
            return false;
        }
        self.dirty.remove(id);
        self.drop_record(id).is_some()
    }

    /// Drops an event no delivery carries and that was never written; false otherwise.
    pub fn discard_unused_event(&mut self, id: &str) -> bool {
        if self.events.get(id).is_none_or(|e| e.refs > 0 || e.seq.is_some()) {
            return false;
        }
        self.dirty.remove(id);
        self.detach_event(id).is_some()
    }

    /// The delivery with this id.
    pub fn get(&self, id: &str) -> Option<&DeliveryRecord> {
        self.records.get(id).map(|e| &e.record)
    }

    /// Every delivery, oldest id first.
    pub fn records(&self) -> impl Iterator<Item = &DeliveryRecord> {
        self.records.values().map(|e| &e.record)
    }

    /// Pending deliveries, oldest id first.
    pub fn pending(&self) -> impl Iterator<Item = &DeliveryRecord> {
        self.records().filter(|r| !r.is_finished())
    }

    /// The endpoints that have deliveries in the log.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.endpoints.keys().map(String::as_str)
    }

    /// Up to `limit` deliveries of `endpoint`, newest `created_at` first (then the larger id
    /// first).
    pub fn newest_first(&self, endpoint: &str, limit: usize) -> Vec<&DeliveryRecord> {
        let mut all: Vec<&DeliveryRecord> = self.records().filter(|r| r.endpoint_id == endpoint).collect();
        all.sort_by(|a, b| record::newest_first(a, b));
        all.truncate(limit);
        all
    }

    /// Number of deliveries.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No deliveries.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Number of pending deliveries.
    pub fn pending_count(&self) -> usize {
        self.pending
    }

    /// Number of pending deliveries of one endpoint.
    pub fn pending_count_of(&self, endpoint: &str) -> usize {
        self.endpoints.get(endpoint).map_or(0, |e| e.pending)
    }

    /// Number of finished deliveries.
    pub fn finished_count(&self) -> usize {
        self.endpoints.values().map(|e| e.finished.len()).sum()
    }

    /// Bytes of all segments' data (keys plus values, superseded copies included).
    pub fn approx_bytes(&self) -> usize {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Segments that exist (or may).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Segments that exist (or may), oldest first.
    pub fn segments(&self) -> Vec<SegmentSummary> {
        self.segments
            .values()
            .map(|s| SegmentSummary {
                name: s.name.clone(),
                ids: s.live.iter().cloned().collect(),
                bytes: s.bytes,
            })
            .collect()
    }

    /// Whether [`Self::take_writes`] would return writes.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
            || !self.retired.is_empty()
            || !self.deleting.is_empty()
            || !self.purge.is_empty()
            || self.segments.values().next().is_some_and(|s| s.live.is_empty())
    }

    /// Everything changed since the previous call: creates of new segments holding the current
    /// version of every changed entry (and the live entries of a segment being compacted away),
    /// then deletes of the oldest segments that no longer hold a live entry. The image assumes
    /// the writes will be applied; if applying fails, hand them back with [`Self::restore`].
    pub fn take_writes(&mut self) -> PendingWrites {
        let mut deleted: Vec<String> = std::mem::take(&mut self.deleting);
        // Oldest first, and only from the front: what a deleted segment superseded is gone already.
        let budget = self.segment_budget();
        let hard_limit = self.segment_limit();
        let compact_above = hard_limit / 2;
        loop {
            let count = self.segments.len();
            let Some(entry) = self.segments.first_entry() else {
                break;
            };
            let segment = entry.get();
            // Compacting copies the oldest segment's live entries: worth it when they are few, and
            // forced at the hard limit (a long-pending delivery must not hold the journal forever).
            let compact = count > compact_above && (segment.live_bytes <= budget / 2 || count > hard_limit);
            if !segment.live.is_empty() && !compact {
                break;
            }
            let (_, segment) = entry.remove_entry();
            for id in &segment.live {
                self.forget_seq(id);
                self.dirty.insert(id.clone());
            }
            deleted.push(segment.name);
        }
        // Segments holding an erased payload go wherever they are: their live entries are copied
        // into this batch's creates, which are durable before any delete is sent.
        for seq in std::mem::take(&mut self.purge) {
            if let Some(segment) = self.segments.remove(&seq) {
                for id in &segment.live {
                    self.forget_seq(id);
                    self.dirty.insert(id.clone());
                }
                deleted.push(segment.name);
            }
        }

        // Before the creates: no floor passes a segment until the API server confirmed its delete
        // (a batch applied in part, or an earlier batch whose copies are not durable yet, leaves
        // it the only copy of live entries).
        for name in &deleted {
            if let Some(seq) = self.own_seq(name) {
                self.unconfirmed_deletes.insert(seq);
            }
        }
        let mut writes = Vec::new();
        let mut created = Vec::new();
        let mut batch = Batch::default();
        let mut items: Vec<(String, String, Option<DeliveryRecord>)> = Vec::with_capacity(self.dirty.len());
        for id in std::mem::take(&mut self.dirty) {
            if let Some(entry) = self.records.get(&id) {
                let stored = entry.record.to_stored();
                items.push((id, stored, None));
            } else if let Some(event) = self.events.get(&id) {
                let stored = String::from_utf8_lossy(&event.payload).into_owned();
                items.push((id, stored, None));
            }
        }
        // An id back in the image (inserted again) is stored by its live version.
        for record in std::mem::take(&mut self.retired).into_values() {
            if !self.records.contains_key(&record.id) {
                items.push((record.id.clone(), record.to_stored(), Some(record)));
            }
        }
        for (id, stored, retired) in items {
            if !batch.data.is_empty() && batch.bytes + id.len() + stored.len() > budget {
                let full = std::mem::take(&mut batch);
                self.create(full, &mut writes, &mut created);
            }
            batch.bytes += id.len() + stored.len();
            match retired {
                Some(record) => batch.retired.push(record),
                None => batch.live.push(id.clone()),
            }
            batch.data.insert(id, stored);
        }
        if !batch.data.is_empty() {
            self.create(batch, &mut writes, &mut created);
        }
        writes.extend(deleted.iter().map(|name| SegmentWrite::Delete { name: name.clone() }));
        PendingWrites {
            writes,
            created,
            deleted,
        }
    }

    /// Takes back a batch whose writes failed (all or some: which ones is unknown), so that the
    /// next batch writes it again: entries it stored are stored again (in new segments), the
    /// segments it created may exist and are deleted by the next batch, after its creates (so an
    /// entry taken out of the image meanwhile, such as a delivery whose event was answered 503,
    /// is not read back from one of them), and the segments it deleted are deleted again, before
    /// any deleted since.
    pub fn restore(&mut self, writes: PendingWrites) {
        let mut taken_back = Vec::new();
        for (created, write) in writes.created.into_iter().zip(&writes.writes) {
            // A delivery pruned while this write was in flight is no longer dirty nor live here,
            // yet the version the write carried may be its newest: retire it, so that it is stored.
            if let SegmentWrite::Create(cm) = write {
                let data = segment::entries(cm).unwrap_or_default();
                for id in &created.live {
                    if !is_event_key(id)
                        && !self.records.contains_key(id)
                        && !self.retired.contains_key(id)
                        && let Some(Ok(record)) = data
                            .get(id)
                            .map(|v| DeliveryRecord::from_stored(id, &self.organization_id, v))
                    {
                        self.retired.insert(id.clone(), record);
                    }
                }
            }
            // Gone from the image already if a later batch compacted it: that batch deletes it.
            if let Some(segment) = self.segments.remove(&created.seq) {
                for id in segment.live {
                    if self.forget_seq(&id) {
                        self.dirty.insert(id);
                    }
                }
                taken_back.push(segment.name);
            }
            for record in created.retired {
                if !self.records.contains_key(&record.id) {
                    self.retired.insert(record.id.clone(), record);
                }
            }
        }
        let mut deleting = writes.deleted;
        deleting.append(&mut self.deleting);
        // Restored newest batch first: the oldest of these last.
        taken_back.reverse();
        deleting.append(&mut taken_back);
        self.deleting = deleting;
    }

    /// Forgets a segment whose create failed because its name is held by an object that is not
    /// a segment (after [`Self::restore`], so it holds nothing live): it is never deleted, since
    /// the object there is not this log's.
    pub fn forget_segment(&mut self, name: &str) {
        self.segments
            .retain(|_, segment| segment.name != name || !segment.live.is_empty());
        self.deleting.retain(|deleting| deleting != name);
    }

    /// Marks an entry's live version as not stored; false if the image does not hold it.
    fn forget_seq(&mut self, id: &str) -> bool {
        if let Some(entry) = self.records.get_mut(id) {
            entry.seq = None;
            true
        } else if let Some(event) = self.events.get_mut(id) {
            event.seq = None;
            true
        } else {
            false
        }
    }

    /// Records a new segment for `batch` and the write creating it.
    fn create(&mut self, batch: Batch, writes: &mut Vec<SegmentWrite>, created: &mut Vec<Created>) {
        // Only trusted segments move the sequence, one per create: it never nears the end.
        while self.avoided.remove(&self.next_seq) {
            self.next_seq = self.next_seq.saturating_add(1);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        let name = journal_segment_name(&self.organization_id, seq);
        let mut live_bytes = 0;
        for id in &batch.live {
            if let Some(entry) = self.records.get_mut(id) {
                entry.seq = Some(seq);
                live_bytes += entry.bytes;
            } else if let Some(event) = self.events.get_mut(id) {
                event.seq = Some(seq);
                live_bytes += event.bytes;
            }
        }
        self.segments.insert(
            seq,
            Segment {
                name: name.clone(),
                live: batch.live.iter().cloned().collect(),
                live_bytes,
                bytes: batch.bytes,
            },
        );
        let floor = self.floor().min(seq);
        writes.push(SegmentWrite::Create(self.configmap(&name, batch.data, floor)));
        created.push(Created {
            seq,
            live: batch.live,
            retired: batch.retired,
        });
    }

    fn segment_budget(&self) -> usize {
        self.config.segment_bytes.clamp(1, MAX_SEGMENT_BYTES)
    }

    /// Bytes one endpoint's deliveries (with [`GROWTH_RESERVE`] per pending one) may take.
    fn capacity(&self) -> usize {
        self.config.max_segments.max(2) / 2 * self.segment_budget()
    }

    /// The segment count above which compaction is forced: `max_segments`, or twice the segments
    /// the live entries fill if that is more (an organization with many endpoints keeps more).
    /// Above half of it, a batch compacts the oldest segment when that is cheap.
    pub fn segment_limit(&self) -> usize {
        let needed = self.projected.div_ceil(self.segment_budget());
        self.config.max_segments.max(2).max(2 * needed)
    }

    /// Puts a delivery into the image's accounting, stored in segment `seq` (or awaiting a batch).
    fn attach(&mut self, record: DeliveryRecord, bytes: usize, seq: Option<u64>) {
        if let Some(segment) = seq.and_then(|seq| self.segments.get_mut(&seq)) {
            segment.live.insert(record.id.clone());
            segment.live_bytes += bytes;
        }
        let cost = bytes + reserve(record.state);
        self.projected += cost;
        let charged = self.charge(&record, bytes);
        let endpoint = self.endpoints.entry(record.endpoint_id.clone()).or_default();
        endpoint.projected += charged;
        if record.is_finished() {
            endpoint.finished.insert((record.updated_at, record.id.clone()));
        } else {
            endpoint.pending += 1;
            self.pending += 1;
        }
        self.records.insert(
            record.id.clone(),
            Entry {
                record,
                seq,
                bytes,
                charged,
            },
        );
    }

    /// What a delivery of `bytes` costs its endpoint's capacity: its bytes, and while it is
    /// pending, [`GROWTH_RESERVE`] and the payload it carries (finished ones are bounded by
    /// retention instead, so that history never blocks new deliveries).
    fn charge(&self, record: &DeliveryRecord, bytes: usize) -> usize {
        if record.is_finished() {
            bytes
        } else {
            let payload = self.events.get(&record.event_id).map_or(0, |e| e.bytes);
            bytes + GROWTH_RESERVE + payload
        }
    }

    /// Takes a delivery out of the image's accounting; its segment (if any) no longer holds its
    /// live version. Its event keeps its reference (see [`Self::drop_record`]).
    fn detach(&mut self, id: &str) -> Option<Entry> {
        let entry = self.records.remove(id)?;
        let cost = entry.bytes + reserve(entry.record.state);
        self.projected -= cost;
        if let Some(endpoint) = self.endpoints.get_mut(&entry.record.endpoint_id) {
            endpoint.projected -= entry.charged;
            if entry.record.is_finished() {
                endpoint
                    .finished
                    .remove(&(entry.record.updated_at, entry.record.id.clone()));
            } else {
                endpoint.pending -= 1;
                self.pending -= 1;
            }
            if endpoint.projected == 0 && endpoint.pending == 0 && endpoint.finished.is_empty() {
                self.endpoints.remove(&entry.record.endpoint_id);
            }
        }
        if let Some(segment) = entry.seq.and_then(|seq| self.segments.get_mut(&seq)) {
            segment.live.remove(id);
            segment.live_bytes -= entry.bytes;
        }
        Some(entry)
    }

    /// Takes a delivery out of the image for good, and its event once no delivery carries it.
    fn drop_record(&mut self, id: &str) -> Option<Entry> {
        let entry = self.detach(id)?;
        let event_id = &entry.record.event_id;
        if let Some(event) = self.events.get_mut(event_id) {
            event.refs = event.refs.saturating_sub(1);
            if event.refs == 0 {
                self.dirty.remove(event_id);
                self.detach_event(&event_id.clone());
            }
        }
        Some(entry)
    }

    /// Puts an event (or, with [`ERASED_PAYLOAD`], its tombstone) into the image's accounting.
    fn attach_event(&mut self, id: String, payload: Bytes, seq: Option<u64>) {
        let erased = payload == ERASED_PAYLOAD.as_bytes();
        let bytes = event_bytes(&id, &payload);
        if let Some(segment) = seq.and_then(|seq| self.segments.get_mut(&seq)) {
            segment.live.insert(id.clone());
            segment.live_bytes += bytes;
        }
        self.projected += bytes;
        self.events.insert(
            id,
            EventEntry {
                payload,
                seq,
                bytes,
                refs: 0,
                erased,
            },
        );
    }

    fn detach_event(&mut self, id: &str) -> Option<EventEntry> {
        let event = self.events.remove(id)?;
        self.projected -= event.bytes;
        if let Some(segment) = event.seq.and_then(|seq| self.segments.get_mut(&seq)) {
            segment.live.remove(id);
            segment.live_bytes -= event.bytes;
        }
        Some(event)
    }

    /// Retention: each endpoint's finished deliveries beyond the newest `max_finished` (by
    /// `updated_at`) go. One whose last version is not stored yet is retired: the next batch still
    /// stores that version, so that a recovery never finds an older one as the newest.
    ///
    /// Only `endpoint` is looked at: a delivery of it was just added or changed, and no other
    /// endpoint's count moved (scanning them all, per change, cost a few per cent of the CPU per
    /// delivery at 100 endpoints).
    fn prune(&mut self, endpoint: &str) {
        let max = self.config.max_finished;
        let over: Vec<String> = self
            .endpoints
            .get(endpoint)
            .filter(|e| e.finished.len() > max)
            .map(|e| {
                let extra = e.finished.len() - max;
                e.finished.iter().take(extra).map(|(_, id)| id.clone()).collect()
            })
            .unwrap_or_default();
        for id in over {
            self.prune_record(&id);
        }
    }

    /// Prunes one finished delivery (see [`Self::prune`]).
    fn prune_record(&mut self, id: &str) {
        let was_dirty = self.dirty.remove(id);
        if let Some(entry) = self.drop_record(id)
            && was_dirty
        {
            self.retired.insert(id.to_string(), entry.record);
        }
    }

    fn configmap(&self, name: &str, data: BTreeMap<String, String>, floor: u64) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.namespace.clone()),
                labels: Some(segment_labels(&self.organization_id)),
                ..Default::default()
            },
            binary_data: Some(BTreeMap::from([(
                segment::JOURNAL_KEY.to_string(),
                segment::pack(&data),
            )])),
            data: Some(BTreeMap::from([(segment::FLOOR_KEY.to_string(), floor.to_string())])),
            ..Default::default()
        }
    }
}

/// Entries gathered for one new segment.
#[derive(Default)]
struct Batch {
    data: BTreeMap<String, String>,
    bytes: usize,
    live: Vec<String>,
    retired: Vec<DeliveryRecord>,
}

/// Shortens `record.last_error` until its stored size is at most `room` (or nothing is left to
/// cut); returns the stored size.
fn shorten_error_to_fit(record: &mut DeliveryRecord, room: usize) -> usize {
    let mut bytes = record.stored_len();
    if bytes > room && record.last_error.is_some() {
        warn!(id = %record.id, bytes, room, "delivery record near the segment size limit: shortening last_error");
    }
    while bytes > room {
        let Some(error) = record.last_error.take() else {
            break;
        };
        let chars = error.chars().count();
        record.last_error = (chars > 1).then(|| truncate_error(&error, chars / 2));
        bytes = record.stored_len();
    }
    bytes
}

#[cfg(test)]
mod tests;
