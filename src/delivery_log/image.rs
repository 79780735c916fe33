//! [`EndpointLog`]: the in-memory image of one endpoint's log and the group commit of its changes.
//! Pure: no client, no clock.
//!
//! The log is a journal. Every batch *creates* new segments holding the current version of each
//! record changed since the previous batch; a segment is never patched. The API server's cost of a
//! write is then proportional to what changed, not to what a segment already holds (a merge patch
//! makes it re-encode and re-parse the whole ConfigMap: profiled, that was 70 % of its CPU under
//! load). A record's *live* version is its copy in the newest segment holding it; older copies are
//! superseded.
//!
//! Segments are deleted oldest first, and only once they hold no live version: so whenever a
//! superseded copy of a record is still stored, every newer copy is too, and a recovery that lets
//! the newest copy win never brings back an older state (a pending delivery already sent, say).
//! When more than half of [`LogConfig::max_segments`] segments exist, a batch compacts: it copies
//! the live records of the oldest segment into the segments it creates and deletes that segment.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use tracing::warn;

use super::record::{self, DeliveryRecord, DeliveryState, is_valid_key, truncate_error};
use super::{GROWTH_RESERVE, HARD_SEGMENT_BYTES, MAX_RECORD_BYTES, MAX_SEGMENT_BYTES, segment_labels, segment_name};

/// Bounds of one endpoint's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Finished (succeeded or failed) records kept; older ones are pruned. Pending ones are always kept.
    pub max_finished: usize,
    /// Largest data (keys plus values) of one segment written by a batch; a larger batch is split
    /// into several segments (at most [`MAX_SEGMENT_BYTES`]; a single record larger than this gets
    /// a segment of its own).
    pub segment_bytes: usize,
    /// Bounds the log: its live records may take at most half of `max_segments × segment_bytes`
    /// (more is [`LogFull`]), and batches compact once more than `max_segments / 2` segments exist.
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

/// The log cannot take another record: its live records would exceed the capacity (see
/// [`LogConfig::max_segments`]), or the record alone is larger than [`MAX_RECORD_BYTES`], or its
/// id is not a valid ConfigMap key. Ingest answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the delivery log of this endpoint is full")]
pub struct LogFull;

/// One API write of a batch.
// A batch holds a handful of these: the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum SegmentWrite {
    /// Create a segment with its records.
    Create(ConfigMap),
    /// Delete a segment that holds no live record.
    Delete {
        /// The segment's ConfigMap name.
        name: String,
    },
}

impl SegmentWrite {
    /// Name of the ConfigMap written.
    pub fn name(&self) -> &str {
        match self {
            SegmentWrite::Create(cm) => cm.metadata.name.as_deref().unwrap_or_default(),
            SegmentWrite::Delete { name } => name,
        }
    }
}

/// A segment a batch creates, to hand it back on failure.
#[derive(Clone, Debug)]
struct Created {
    seq: u64,
    /// Ids of the live records it stores.
    live: Vec<String>,
    /// Records pruned before their last version was stored: it stores them, but they are gone
    /// from the image.
    retired: Vec<DeliveryRecord>,
}

/// A batch of writes from [`EndpointLog::take_writes`]: creates (oldest sequence number first),
/// then deletes (oldest first). Apply them in order, stopping at the first failure; on failure
/// give the batch back with [`EndpointLog::restore`].
#[derive(Clone, Debug, Default)]
pub struct PendingWrites {
    writes: Vec<SegmentWrite>,
    created: Vec<Created>,
    deleted: Vec<(u64, String)>,
}

impl PendingWrites {
    /// The writes, in the order to apply them.
    pub fn writes(&self) -> &[SegmentWrite] {
        &self.writes
    }

    /// The creates: once they are applied, every record of the batch is durable.
    pub fn creates(&self) -> &[SegmentWrite] {
        &self.writes[..self.created.len()]
    }

    /// The deletes, to apply after the creates.
    pub fn deletes(&self) -> &[SegmentWrite] {
        &self.writes[self.created.len()..]
    }

    /// The part of the batch left once its creates were applied (for [`EndpointLog::restore`]
    /// after only a delete failed).
    pub fn without_creates(self) -> PendingWrites {
        let writes = self.deletes().to_vec();
        PendingWrites {
            writes,
            created: Vec::new(),
            deleted: self.deleted,
        }
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Ids of the records these writes store (durable once they are applied).
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
    /// Ids of the live records it holds, sorted.
    pub ids: Vec<String>,
    /// Its data's size: keys plus values, superseded copies included.
    pub bytes: usize,
}

/// A segment that exists, or may: one whose create failed holds no live record and is deleted
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
}

fn reserve(state: DeliveryState) -> usize {
    if state.is_finished() { 0 } else { GROWTH_RESERVE }
}

/// The in-memory image of one endpoint's delivery log; its single writer (the dispatcher's worker
/// for the endpoint) changes it and persists the changes in batches with [`Self::take_writes`].
#[derive(Clone, Debug)]
pub struct EndpointLog {
    namespace: String,
    endpoint: String,
    endpoint_uid: String,
    organization_id: String,
    config: LogConfig,
    records: BTreeMap<String, Entry>,
    /// Segments that exist (or may), by sequence number.
    segments: BTreeMap<u64, Segment>,
    /// Oldest segments whose delete may have failed: the next batch deletes them again.
    deleting: BTreeMap<u64, String>,
    /// Records whose current version awaits the next batch.
    dirty: BTreeSet<String>,
    /// Records pruned before their last version was stored; the next batch stores them.
    retired: BTreeMap<String, DeliveryRecord>,
    /// Finished records by (updated_at, id): the first is pruned first.
    finished: BTreeSet<(Timestamp, String)>,
    pending: usize,
    /// Bytes of every record plus [`GROWTH_RESERVE`] per pending one: decides [`LogFull`].
    projected: usize,
    next_seq: u64,
}

impl EndpointLog {
    /// An empty log for an endpoint that has none yet (use [`Self::from_configmaps`] when it may
    /// have one: a new log numbers its segments from 1).
    pub fn new(
        namespace: &str,
        endpoint_name: &str,
        endpoint_uid: &str,
        organization_id: &str,
        config: LogConfig,
    ) -> Self {
        let log = Self {
            namespace: namespace.to_string(),
            endpoint: endpoint_name.to_string(),
            endpoint_uid: endpoint_uid.to_string(),
            organization_id: organization_id.to_string(),
            config,
            records: BTreeMap::new(),
            segments: BTreeMap::new(),
            deleting: BTreeMap::new(),
            dirty: BTreeSet::new(),
            retired: BTreeMap::new(),
            finished: BTreeSet::new(),
            pending: 0,
            projected: 0,
            next_seq: 1,
        };
        if log.endpoint_uid.is_empty() {
            warn!(namespace = %log.namespace, endpoint = %log.endpoint,
                "endpoint uid unknown: its delivery log gets no owner reference");
        }
        log
    }

    /// Rebuilds the image from the segments [`super::load_all`] found for this endpoint.
    ///
    /// Never fails: a record's copy in the newest segment holding it wins; an undecodable key is
    /// skipped with a warning (and goes with its segment); segments owned by another incarnation of
    /// the endpoint (another uid) are skipped. Retention applies at once.
    pub fn from_configmaps(
        namespace: &str,
        endpoint_name: &str,
        endpoint_uid: &str,
        organization_id: &str,
        config: LogConfig,
        configmaps: impl IntoIterator<Item = ConfigMap>,
    ) -> Self {
        let mut log = Self::new(namespace, endpoint_name, endpoint_uid, organization_id, config);
        let mut found: Vec<(u64, ConfigMap)> = Vec::new();
        for cm in configmaps {
            let name = cm.metadata.name.clone().unwrap_or_default();
            let Some(seq) = super::segment_seq(&name) else {
                warn!(configmap = %name, "not named like a delivery-log segment; ignored");
                continue;
            };
            // Never reuse a name that exists, whoever owns it.
            log.next_seq = log.next_seq.max(seq.saturating_add(1));
            let foreign_owner = cm
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "WebhookEndpoint" && !log.endpoint_uid.is_empty() && o.uid != log.endpoint_uid);
            if foreign_owner {
                warn!(configmap = %name, "segment of an earlier endpoint of the same name; ignored");
                continue;
            }
            found.push((seq, cm));
        }
        found.sort_by_key(|(seq, _)| *seq);
        for (seq, cm) in found {
            let name = cm.metadata.name.unwrap_or_default();
            let data = cm.data.unwrap_or_default();
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
                let mut record = match DeliveryRecord::from_stored(&value) {
                    Ok(r) if r.id == key => r,
                    Ok(r) => {
                        warn!(configmap = %name, key = %key, id = %r.id, "record id differs from its key; ignored");
                        continue;
                    }
                    Err(error) => {
                        warn!(configmap = %name, key = %key, %error, "undecodable delivery record; ignored");
                        continue;
                    }
                };
                record.normalize();
                // Segments come oldest first: this copy supersedes any seen before.
                log.detach(&key);
                let bytes = record.stored_len();
                log.attach(record, bytes, Some(seq));
            }
        }
        log.prune();
        log
    }

    /// Namespace of the endpoint (and of its log).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The endpoint's name.
    pub fn endpoint_name(&self) -> &str {
        &self.endpoint
    }

    /// The endpoint's organization.
    pub fn organization_id(&self) -> &str {
        &self.organization_id
    }

    /// The bounds in force.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Adds a new record (one with a known id is updated instead); the next batch stores it.
    /// [`LogFull`] when the live records would exceed the log's capacity.
    pub fn insert(&mut self, mut record: DeliveryRecord) -> Result<(), LogFull> {
        record.normalize();
        if self.records.contains_key(&record.id) {
            self.update(record);
            return Ok(());
        }
        if !is_valid_key(&record.id) {
            warn!(endpoint = %self.endpoint, id = %record.id, "delivery id is not a valid ConfigMap key; refused");
            return Err(LogFull);
        }
        let bytes = record.stored_len();
        if bytes > MAX_RECORD_BYTES {
            warn!(endpoint = %self.endpoint, id = %record.id, bytes, "delivery record too large for the log; refused");
            return Err(LogFull);
        }
        if self.projected + bytes + reserve(record.state) > self.capacity() {
            return Err(LogFull);
        }
        self.dirty.insert(record.id.clone());
        self.attach(record, bytes, None);
        self.prune();
        Ok(())
    }

    /// Replaces a record; the next batch stores the new version. Returns false, changing nothing,
    /// if the log has no record with its id (never inserted, or pruned). Should the record get
    /// above [`HARD_SEGMENT_BYTES`], its `last_error` is shortened until it fits.
    pub fn update(&mut self, mut record: DeliveryRecord) -> bool {
        record.normalize();
        if self.detach(&record.id).is_none() {
            return false;
        }
        let bytes = shorten_error_to_fit(&mut record, HARD_SEGMENT_BYTES);
        self.dirty.insert(record.id.clone());
        self.attach(record, bytes, None);
        self.prune();
        true
    }

    /// The record with this id.
    pub fn get(&self, id: &str) -> Option<&DeliveryRecord> {
        self.records.get(id).map(|e| &e.record)
    }

    /// Every record, oldest id first.
    pub fn records(&self) -> impl Iterator<Item = &DeliveryRecord> {
        self.records.values().map(|e| &e.record)
    }

    /// Pending records, oldest id first.
    pub fn pending(&self) -> impl Iterator<Item = &DeliveryRecord> {
        self.records().filter(|r| !r.is_finished())
    }

    /// Up to `limit` records, newest `created_at` first (then the larger id first).
    pub fn newest_first(&self, limit: usize) -> Vec<&DeliveryRecord> {
        let mut all: Vec<&DeliveryRecord> = self.records().collect();
        all.sort_by(|a, b| record::newest_first(a, b));
        all.truncate(limit);
        all
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Number of pending records.
    pub fn pending_count(&self) -> usize {
        self.pending
    }

    /// Number of finished records.
    pub fn finished_count(&self) -> usize {
        self.finished.len()
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
            || self.segments.values().next().is_some_and(|s| s.live.is_empty())
    }

    /// Everything changed since the previous call: creates of new segments holding the current
    /// version of every changed record (and the live records of a segment being compacted away),
    /// then deletes of the oldest segments that no longer hold a live record. The image assumes
    /// the writes will be applied; if applying fails, hand them back with [`Self::restore`].
    pub fn take_writes(&mut self) -> PendingWrites {
        let mut deleted: Vec<(u64, String)> = std::mem::take(&mut self.deleting).into_iter().collect();
        // Oldest first, and only from the front: what a deleted segment superseded is gone already.
        let budget = self.segment_budget();
        let (compact_above, hard_limit) = (self.compact_above(), self.config.max_segments.max(2));
        loop {
            let count = self.segments.len();
            let Some(entry) = self.segments.first_entry() else {
                break;
            };
            let segment = entry.get();
            // Compacting copies the oldest segment's live records: worth it when they are few, and
            // forced at the hard limit (a long-pending record must not hold the journal forever).
            let compact = count > compact_above && (segment.live_bytes <= budget / 2 || count > hard_limit);
            if !segment.live.is_empty() && !compact {
                break;
            }
            let (seq, segment) = entry.remove_entry();
            for id in &segment.live {
                let entry = self.records.get_mut(id).expect("live records are known");
                entry.seq = None;
                self.dirty.insert(id.clone());
            }
            deleted.push((seq, segment.name));
        }

        let mut writes = Vec::new();
        let mut created = Vec::new();
        let mut batch = Batch::default();
        let items: Vec<(String, String, Option<DeliveryRecord>)> = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|id| {
                let stored = self.records[&id].record.to_stored();
                (id, stored, None)
            })
            .chain(
                // An id back in the image (inserted again) is stored by its live version.
                std::mem::take(&mut self.retired)
                    .into_values()
                    .filter(|r| !self.records.contains_key(&r.id))
                    .map(|r| (r.id.clone(), r.to_stored(), Some(r))),
            )
            .collect();
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
        writes.extend(
            deleted
                .iter()
                .map(|(_, name)| SegmentWrite::Delete { name: name.clone() }),
        );
        PendingWrites {
            writes,
            created,
            deleted,
        }
    }

    /// Takes back a batch whose writes failed (all or some: which ones is unknown), so that the
    /// next batch writes it again: records it stored are stored again (in new segments), the
    /// segments it created may exist and are deleted once they are the oldest, and the segments it
    /// deleted are deleted again.
    pub fn restore(&mut self, writes: PendingWrites) {
        for (created, write) in writes.created.into_iter().zip(&writes.writes) {
            // A record pruned while this write was in flight is no longer dirty nor live here, yet
            // the version the write carried may be its newest: retire it, so that it is stored.
            if let SegmentWrite::Create(cm) = write {
                for id in &created.live {
                    if !self.records.contains_key(id)
                        && !self.retired.contains_key(id)
                        && let Some(Ok(record)) = cm
                            .data
                            .as_ref()
                            .and_then(|d| d.get(id))
                            .map(|v| DeliveryRecord::from_stored(v))
                    {
                        self.retired.insert(id.clone(), record);
                    }
                }
            }
            if let Some(segment) = self.segments.get_mut(&created.seq) {
                segment.live_bytes = 0;
                for id in std::mem::take(&mut segment.live) {
                    if let Some(entry) = self.records.get_mut(&id) {
                        entry.seq = None;
                        self.dirty.insert(id);
                    }
                }
            }
            for record in created.retired {
                if !self.records.contains_key(&record.id) {
                    self.retired.insert(record.id.clone(), record);
                }
            }
        }
        self.deleting.extend(writes.deleted);
    }

    /// Records a new segment for `batch` and the write creating it.
    fn create(&mut self, batch: Batch, writes: &mut Vec<SegmentWrite>, created: &mut Vec<Created>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let name = segment_name(&self.endpoint, seq);
        let mut live_bytes = 0;
        for id in &batch.live {
            let entry = self.records.get_mut(id).expect("dirty records are known");
            entry.seq = Some(seq);
            live_bytes += entry.bytes;
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
        writes.push(SegmentWrite::Create(self.configmap(&name, batch.data)));
        created.push(Created {
            seq,
            live: batch.live,
            retired: batch.retired,
        });
    }

    fn segment_budget(&self) -> usize {
        self.config.segment_bytes.clamp(1, MAX_SEGMENT_BYTES)
    }

    /// Bytes the live records (with [`GROWTH_RESERVE`] per pending one) may take.
    fn capacity(&self) -> usize {
        self.config.max_segments.max(2) / 2 * self.segment_budget()
    }

    /// Above this many segments, a batch compacts the oldest one away.
    fn compact_above(&self) -> usize {
        self.config.max_segments.max(2) / 2
    }

    /// Puts a record into the image's accounting, stored in segment `seq` (or awaiting a batch).
    fn attach(&mut self, record: DeliveryRecord, bytes: usize, seq: Option<u64>) {
        if let Some(segment) = seq.and_then(|seq| self.segments.get_mut(&seq)) {
            segment.live.insert(record.id.clone());
            segment.live_bytes += bytes;
        }
        self.projected += bytes + reserve(record.state);
        if record.is_finished() {
            self.finished.insert((record.updated_at, record.id.clone()));
        } else {
            self.pending += 1;
        }
        self.records.insert(record.id.clone(), Entry { record, seq, bytes });
    }

    /// Takes a record out of the image's accounting; its segment (if any) no longer holds its live
    /// version.
    fn detach(&mut self, id: &str) -> Option<Entry> {
        let entry = self.records.remove(id)?;
        if entry.record.is_finished() {
            self.finished
                .remove(&(entry.record.updated_at, entry.record.id.clone()));
        } else {
            self.pending -= 1;
        }
        self.projected -= entry.bytes + reserve(entry.record.state);
        if let Some(segment) = entry.seq.and_then(|seq| self.segments.get_mut(&seq)) {
            segment.live.remove(id);
            segment.live_bytes -= entry.bytes;
        }
        Some(entry)
    }

    /// Retention: finished records beyond the newest `max_finished` (by `updated_at`) go. One whose
    /// last version is not stored yet is retired: the next batch still stores that version, so
    /// that a recovery never finds an older one as the newest.
    fn prune(&mut self) {
        while self.finished.len() > self.config.max_finished {
            let Some((_, id)) = self.finished.first().cloned() else {
                break;
            };
            if let Some(entry) = self.detach(&id)
                && self.dirty.remove(&id)
            {
                self.retired.insert(id, entry.record);
            }
        }
    }

    fn owner_reference(&self) -> Option<OwnerReference> {
        (!self.endpoint_uid.is_empty()).then(|| OwnerReference {
            api_version: format!("{}/v1", crate::resources::GROUP),
            kind: "WebhookEndpoint".into(),
            name: self.endpoint.clone(),
            uid: self.endpoint_uid.clone(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        })
    }

    fn configmap(&self, name: &str, data: BTreeMap<String, String>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.namespace.clone()),
                labels: Some(segment_labels(&self.endpoint, &self.organization_id)),
                owner_references: self.owner_reference().map(|o| vec![o]),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }
}

/// Records gathered for one new segment.
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
